"""Run by a test with the tools' Python: load a COCO instances dataset with Datumaro (the library
CVAT imports "COCO 1.0" with) and save every mask annotation. Usage: datumaro_load.py ROOT OUT.npz"""

import json
import sys

import datumaro as dm
import numpy as np

root, out = sys.argv[1], sys.argv[2]
dataset = dm.Dataset.import_from(root, "coco_instances")
labels = dataset.categories()[dm.AnnotationType.label]
arrays, info = {}, []
for item in dataset:
    for ann in item.annotations:
        if ann.type != dm.AnnotationType.mask:
            continue
        arrays[f"m{len(info)}"] = np.asarray(ann.image, bool)
        info.append({"item": item.id, "label": labels[ann.label].name, "is_crowd": bool(ann.attributes.get("is_crowd")),
                     "kind": type(ann).__name__})
np.savez_compressed(out, **arrays)
print(json.dumps({"items": sorted(item.id for item in dataset), "masks": info}))
