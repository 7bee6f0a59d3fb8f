"""Run by a test with Label Studio's Python: drive a running Label Studio through label-studio-sdk
as an annotator would. Usage: labelstudio_client.py URL TOKEN CONFIG.xml TASKS.json EXPORT.json

Creates a project from the labelling config, imports the tasks with their predictions, accepts
every prediction as the annotation (what an annotator does who finds the draft right), and
exports the project as JSON (every task)."""

import json
import sys

from label_studio_sdk import LabelStudio

url, token, config, tasks, export = sys.argv[1:6]
ls = LabelStudio(base_url=url, api_key=token)
project = ls.projects.create(title="cxr Grad-CAM drafts", label_config=open(config, encoding="utf-8").read())
report = ls.projects.import_tasks(id=project.id, request=json.load(open(tasks, encoding="utf-8")))
accepted = 0
for task in ls.tasks.list(project=project.id, fields="all"):
    for prediction in task.predictions or []:
        result = prediction["result"] if isinstance(prediction, dict) else prediction.result
        ls.annotations.create(id=task.id, result=result, was_cancelled=False)
        accepted += 1
data = b"".join(ls.projects.exports.download_sync(id=project.id, export_type="JSON", download_all_tasks=True))
open(export, "wb").write(data)
print(json.dumps({"tasks": report.task_count, "predictions": report.prediction_count, "accepted": accepted,
                  "exported": len(json.loads(data))}))
