"""`report.html` of a pipeline run: one self-contained page (inline CSS and JS, no network),
linking only files inside the run folder. Rows sort by any numeric column on click."""

from __future__ import annotations

import html
import os
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

from data import spec

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:4px 6px;vertical-align:top}
th{background:#f3f3f3;cursor:pointer}img{max-width:180px;max-height:180px;display:block}
.warn{background:#fff4e5;border:1px solid #f0b37e;padding:.6em;margin:1em 0}
.bar{display:inline-block;height:8px;background:#4a7bd0;vertical-align:middle}
"""

_SORT_JS = """
document.querySelectorAll('th[data-sort]').forEach(function(th){th.addEventListener('click',function(){
 var t=th.closest('table'),b=t.tBodies[0],i=th.cellIndex,asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';
 Array.from(b.rows).sort(function(x,y){
  var a=parseFloat(x.cells[i].dataset.v||'0'),c=parseFloat(y.cells[i].dataset.v||'0');
 return asc?a-c:c-a;}).forEach(function(r){b.appendChild(r);});});});
"""


#: Lesions listed per image (largest first); results.jsonl keeps them all.
REPORT_LESIONS = 5


def _img(out: Path, rel: str | None, alt: str) -> str:
    if not rel or not (out / rel).is_file():
        return ""
    return f'<a href="{quote(rel)}"><img src="{quote(rel)}" alt="{html.escape(alt)}" loading="lazy"></a>'


def write_report(out: Path, rows: list[dict[str, Any]], failures: list[dict[str, Any]], identity: dict[str, Any],
                 model_note: str = "") -> Path:
    """Write ``out/report.html`` atomically and return its path. Referred images get their own table;
    ``model_note`` (e.g. the classifier's held-out accuracy) goes under the summary."""
    header = ("<table><thead><tr><th>file</th><th>label</th>"
              + "".join(f"<th data-sort='1'>p_{c}</th>" for c in spec.CLASS_NAMES)
              + "<th data-sort='1'>confidence</th><th>Grad-CAM</th><th>lesion mask</th>"
                "<th data-sort='1'>lung affected %</th><th>lesions</th></tr></thead><tbody>")
    counts = Counter(r["label"] for r in rows)
    seg = sum(1 for r in rows if r.get("segmented"))
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>cxr run report</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>Chest X-ray triage run</h1>",
        "<p class='warn'><b>Research use only.</b> These outputs are not a diagnosis and must not guide "
        "patient care.</p>",
        "<h2>Summary</h2><table><tr><th>images</th><th>failed</th>"
        + "".join(f"<th>{c}</th>" for c in spec.CLASS_NAMES) + "<th>segmented</th><th>referred</th></tr>",
        f"<tr><td>{len(rows)}</td><td>{len(failures)}</td>"
        + "".join(f"<td>{counts.get(c, 0)}</td>" for c in spec.CLASS_NAMES)
        + f"<td>{seg}</td><td>{sum(1 for r in rows if r.get('refer'))}</td></tr></table>",
        *([f"<p>{html.escape(model_note)}</p>"] if model_note else []),
        "<p>classifier sha256 <code>{}</code>, segmenter <code>{}</code>{}</p>".format(
            html.escape(str(identity.get("classifier", ""))[:16]), html.escape(str(identity.get("segmenter", ""))[:16]),
            f", lung model <code>{html.escape(str(identity['lung_model'])[:16])}</code>"
            if identity.get("lung_model") else ""),
        "<p>Tables: <a href='results.csv'>results.csv</a>, <a href='results.jsonl'>results.jsonl</a>, "
        "<a href='failures.csv'>failures.csv</a>. Click a numeric column header to sort.</p>",
        "<h2>Images</h2>" + header,
    ]
    referred = [r for r in rows if r.get("refer")]
    parts.extend(_row(out, r) for r in sorted((r for r in rows if not r.get("refer")), key=lambda r: -r["confidence"]))
    parts.append("</tbody></table>")
    if referred:
        parts.append(f"<h2 id='referred'>Referred to a reader ({len(referred)})</h2>"
                     "<p>The classifier's answer for these is not to be relied on: low calibrated confidence, or an "
                     "input unlike the X-rays it was trained on.</p>"
                     + header.replace("<th>file</th>", "<th>file</th><th>why referred</th>", 1))
        parts.extend(_row(out, r, reason=True) for r in sorted(referred, key=lambda r: r["file"]))
        parts.append("</tbody></table>")
    if failures:
        parts.append("<h2>Failed files</h2><table><tr><th>file</th><th>reason</th></tr>")
        parts.extend(f"<tr><td>{html.escape(f['file'])}</td><td>{html.escape(f['reason'])}</td></tr>" for f in failures)
        parts.append("</table>")
    parts.append(f"<script>{_SORT_JS}</script></body></html>\n")
    path = out / "report.html"
    tmp = path.with_name("report.html.tmp")
    try:
        tmp.write_text("\n".join(parts), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written report behind
        raise
    return path


def _row(out: Path, r: dict[str, Any], *, reason: bool = False) -> str:
    """One image's table row (with the refer reason in the referred table)."""
    probs = "".join(
        f"<td data-v='{p}'>{p:.3f} <span class='bar' style='width:{int(60 * p)}px'></span></td>"
        for p in (r[f"p_{c}"] for c in spec.CLASS_NAMES)
    )
    shown = r.get("lesions", [])[:REPORT_LESIONS]
    more = r.get("lesion_count", len(shown)) - len(shown)
    by_type = r.get("lesion_area_by_type") or {}
    lesions = (f"<li>{html.escape(', '.join(f'{t} {a} px' for t, a in by_type.items()))}</li>"
               if len(by_type) > 1 else "") + "".join(
        f"<li>{html.escape(les.get('type', 'lesion'))}: box {les['box']}, {les['area_px']} px, "
        f"score {les['score']:.2f}</li>" for les in shown
    ) + (f"<li>… and {more} smaller (results.jsonl)</li>" if more > 0 else "")
    pct = r.get("lung_affected_pct")
    why = f"<td>{html.escape(r.get('refer_reason') or '')}</td>" if reason else ""
    return (
        f"<tr><td>{html.escape(r['file'])}</td>{why}<td>{html.escape(r['label'])}</td>{probs}"
        f"<td data-v='{r['confidence']}'>{r['confidence']:.3f}</td>"
        f"<td>{_img(out, r.get('gradcam_overlay'), 'Grad-CAM overlay')}</td>"
        f"<td>{_img(out, r.get('mask_overlay'), 'lesion mask overlay')}</td>"
        f"<td data-v='{pct if pct is not None else -1}'>{'' if pct is None else f'{pct:.1f}'}</td>"
        f"<td><ul>{lesions}</ul></td></tr>"
    )
