"""Both stages on one batch of images: the per-batch analysis that `cxr run` and `cxr serve` share.

Stage 1 gives probabilities, the refer decision and every member's Grad-CAM from one forward
pass; stage 2 segments the images flagged as pneumonia or COVID (or all, ``segment_all``) at
their original size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from data import spec
from ensemble.refer import refer_decisions
from gradcam.cam import member_heatmaps
from gradcam.masks import mask_overlay, overlay
from segmenter.model import SegmentedImage, segment_image


@dataclass
class ImageAnalysis:
    """Both stages' answer for one image, at the image's original size."""

    probs: np.ndarray  # (num_classes,) in spec.CLASS_NAMES order
    heat: np.ndarray  # fused Grad-CAM, float32 (H, W) in [0, 1]
    seg: SegmentedImage | None  # None when stage 2 did not run
    refer: bool | None = None  # hand to a reader (ensemble.refer); None when the bundle has no rule
    refer_reason: str = ""

    @property
    def label(self) -> str:
        return spec.CLASS_NAMES[int(self.probs.argmax())]

    @property
    def probabilities(self) -> dict[str, float]:
        return {c: round(float(self.probs[k]), 6) for k, c in enumerate(spec.CLASS_NAMES)}

    @property
    def confidence(self) -> float:
        return round(float(self.probs.max()), 6)

    def answer_fields(self) -> dict[str, Any]:
        """What `cxr run`'s rows and `cxr serve`'s answers both say: label, confidence, refer and reason,
        then :meth:`stage2_fields` (each adds the probabilities in its own shape)."""
        return {"label": self.label, "confidence": self.confidence, "refer": self.refer,
                "refer_reason": self.refer_reason, **self.stage2_fields()}

    def stage2_fields(self) -> dict[str, Any]:
        """segmented, lesion_count, lesion_area_px, lesion_area_by_type, lung_affected_pct and lesions
        (type, box, area, score, share of lung)."""
        if self.seg is None:
            return {"segmented": False, "lesion_count": 0, "lesion_area_px": 0, "lesion_area_by_type": {},
                    "lung_affected_pct": None, "lesions": []}
        res = self.seg
        return {
            "segmented": True,
            "lesion_count": len(res.lesions),
            "lesion_area_px": int(sum(les.area_px for les in res.lesions)),
            "lesion_area_by_type": res.area_by_type,
            "lung_affected_pct": None if res.lung_affected_pct is None else round(res.lung_affected_pct, 3),
            "lesions": [{"type": les.type, "box": list(les.box), "area_px": les.area_px, "score": round(les.score, 4),
                         "lung_pct": None if les.lung_pct is None else round(les.lung_pct, 3)} for les in res.lesions],
        }


#: The pictures :func:`result_images` makes (the last two only when stage 2 ran).
RESULT_IMAGES = ("gradcam", "mask", "mask_overlay")


def result_images(analysis: ImageAnalysis, original: np.ndarray) -> dict[str, np.ndarray]:
    """The pictures of one analysed image at its own size: "gradcam" (overlay) always;
    "mask" (uint8 0/255) and "mask_overlay" when stage 2 ran. `cxr run` writes them, `cxr serve` serves them."""
    images = {"gradcam": overlay(original, analysis.heat)}
    if analysis.seg is not None:
        images["mask"] = analysis.seg.mask.astype(np.uint8) * 255
        images["mask_overlay"] = mask_overlay(original, analysis.seg.mask)
    return images


def analyse_batch(x: np.ndarray, originals, geometries, *, classifier, segmenter, lung_model=None,
                  segment_all: bool = False, heads=None) -> list[ImageAnalysis]:
    """Stage 1 with every member's Grad-CAM from one pass, then stage 2 on the flagged images.

    ``x`` is the classifier's (N, S, S, 3) batch, ``originals`` the decoded images at their own
    size (float32 RGB in [0, 255]) and ``geometries`` how ``x`` was made from them. Used by
    ``cxr run`` and ``cxr serve`` alike.
    """
    heads = heads if heads is not None else classifier.head_weights()
    pred = classifier.predict(x)
    cls = pred.probs.argmax(axis=1)
    decisions = refer_decisions(x, pred.probs, classifier.refer_rule)
    _, fused = member_heatmaps(pred.features, heads, cls, member_weights=classifier.member_weights,
                               size=classifier.image_size)
    flagged = [j for j, c in enumerate(cls) if segment_all or spec.CLASS_NAMES[c] in spec.SEGMENT_CLASSES]
    seg_out = _segment(flagged, originals, segmenter, lung_model)
    return [ImageAnalysis(pred.probs[j], geometries[j].map_to_original(fused[j]), seg_out.get(j),
                          *decisions[j])
            for j in range(len(x))]


def _segment(flagged: list[int], originals, segmenter, lung_model) -> dict[int, SegmentedImage]:
    """Stage 2 for the flagged rows of a batch, at each image's original size."""
    if not flagged:
        return {}
    xs, geos = zip(*[segmenter.preprocess(originals[j]) for j in flagged])
    maps = segmenter.predict_maps(np.stack(xs))
    lungs = None
    if lung_model is not None:
        lx, lgeos = zip(*[lung_model.preprocess(originals[j]) for j in flagged])
        lungs = [lung_model.to_original(p, g) for g, p in zip(lgeos, lung_model.predict(np.stack(lx)))]
    return {j: segment_image(segmenter.maps_to_original(maps[k], geos[k]), segmenter,
                             lungs[k] if lungs is not None else None)
            for k, j in enumerate(flagged)}
