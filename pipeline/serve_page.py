"""The upload page of `cxr serve` (self-contained: no external scripts, styles or fonts)."""

UPLOAD_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>cxr-triage</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 72rem; padding: 0 1rem; color: #222; }
 .warn { background: #fff4e0; border: 1px solid #e0a040; padding: .5rem .8rem; border-radius: 4px; }
 #error { background: #fde8e8; border: 1px solid #d04040; padding: .5rem .8rem; border-radius: 4px; }
 .images { display: flex; flex-wrap: wrap; gap: 1rem; }
 figure { margin: 0; } figure img { max-width: 34rem; max-height: 34rem; border: 1px solid #ccc; }
 .bar { display: flex; align-items: center; gap: .5rem; margin: .2rem 0; }
 .bar span.name { width: 6rem; } .bar .track { width: 20rem; background: #eee; height: 1rem; }
 .bar .fill { background: #3b6fb6; height: 1rem; }
 table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: .2rem .5rem; text-align: right; }
 [hidden] { display: none !important; }
</style>
</head>
<body>
<h1>Chest X-ray triage</h1>
<p class="warn">Research use only. Not for diagnosis: model outputs must not guide clinical decisions.</p>
<form id="form">
  <input type="file" id="file" name="file" required
         accept=".png,.jpg,.jpeg,.bmp,.tif,.tiff,.dcm,image/*,application/dicom">
  <button type="submit" id="submit">Analyse</button>
  <span id="status" role="status"></span>
</form>
<p id="error" role="alert" hidden></p>
<section id="result" hidden>
  <h2>Result: <span id="label"></span> (confidence <span id="confidence"></span>)</h2>
  <p id="refer" class="warn" role="note" hidden></p>
  <div id="bars"></div>
  <p id="stage2"></p>
  <div class="images">
    <figure><img id="gradcam" alt="Grad-CAM overlay"><figcaption>Grad-CAM of the predicted class</figcaption></figure>
    <figure id="maskfig" hidden>
      <img id="maskimg" alt="lesion mask overlay"><figcaption>Lesion mask</figcaption></figure>
  </div>
  <table id="lesions" hidden>
    <thead><tr><th>#</th><th>type</th><th>box (x, y, w, h)</th><th>area (px)</th><th>% of lung</th>
      <th>score</th></tr></thead>
    <tbody></tbody>
  </table>
</section>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
function text(el, value) { el.textContent = value; return el; }
function cell(row, value) { text(row.insertCell(), value); }
$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const file = $("file").files[0];
  if (!file) return;
  $("error").hidden = true; $("result").hidden = true;
  text($("status"), "analysing…"); $("submit").disabled = true;
  try {
    const body = new FormData(); body.append("file", file);
    const response = await fetch("/v1/predict", { method: "POST", body });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) {
      let detail = data.detail;
      if (Array.isArray(detail)) detail = detail.map((d) => d.msg).join("; ");
      if (response.status === 413) detail = "file too large for this server";
      throw new Error(`rejected (${response.status}): ${detail || response.statusText}`);
    }
    show(data);
    text($("status"), "");
  } catch (err) {
    text($("error"), err.message).hidden = false;
    text($("status"), "");
  } finally {
    $("submit").disabled = false;
  }
});
function show(r) {
  text($("label"), r.label);
  text($("confidence"), (100 * r.confidence).toFixed(1) + " %");
  // A referred image is set apart: its label is not to be relied on.
  text($("refer"), r.refer ? "Referred to a reader: " + r.refer_reason : "").hidden = !r.refer;
  const bars = $("bars"); bars.replaceChildren();
  for (const [name, p] of Object.entries(r.probabilities)) {
    const row = document.createElement("div"); row.className = "bar"; row.dataset.cls = name;
    const label = text(document.createElement("span"), name); label.className = "name";
    const track = document.createElement("div"); track.className = "track";
    const fill = document.createElement("div"); fill.className = "fill"; fill.style.width = (100 * p).toFixed(1) + "%";
    track.append(fill);
    row.append(label, track, text(document.createElement("span"), (100 * p).toFixed(1) + " %"));
    bars.append(row);
  }
  $("gradcam").src = r.urls.gradcam;
  $("maskfig").hidden = !r.urls.mask_overlay;
  if (r.urls.mask_overlay) $("maskimg").src = r.urls.mask_overlay;
  const pct = r.lung_affected_pct === null ? "" : `, ${r.lung_affected_pct.toFixed(1)} % of the lung affected`;
  const types = Object.entries(r.lesion_area_by_type);
  const byType = types.length > 1 ? ` (${types.map(([t, a]) => `${t} ${a} px`).join(", ")})` : "";
  text($("stage2"), r.segmented ? `${r.lesion_count} lesion(s), ${r.lesion_area_px} px${byType}${pct}`
                                : "Not segmented (stage 2 runs on pneumonia and COVID only).");
  const tbody = $("lesions").querySelector("tbody"); tbody.replaceChildren();
  r.lesions.forEach((les, i) => {
    const row = tbody.insertRow();
    cell(row, i + 1); cell(row, les.type); cell(row, les.box.join(", ")); cell(row, les.area_px);
    cell(row, les.lung_pct === null ? "–" : les.lung_pct.toFixed(1)); cell(row, les.score.toFixed(3));
  });
  $("lesions").hidden = r.lesions.length === 0;
  $("result").hidden = false;
}
</script>
</body>
</html>
"""
