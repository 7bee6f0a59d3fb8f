"""Response models of the web API (they make its OpenAPI schema)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Lesion(BaseModel):
    type: str = Field(description="the segmenter's lesion kind (e.g. infection), or ggo / consolidation for a "
                      "lesion-type model")
    box: list[int] = Field(description="x, y, width, height in pixels of the uploaded image (COCO order)")
    area_px: int
    score: float = Field(description="mean probability of the lesion's type inside the component")
    lung_pct: float | None = Field(description="lesion area as % of the lung field, when a lung model is loaded")


class Urls(BaseModel):
    gradcam: str = Field(description="Grad-CAM overlay (PNG) of this request")
    mask: str | None = Field(None, description="binary lesion mask (PNG), when segmented")
    mask_overlay: str | None = Field(None, description="lesion mask over the X-ray (PNG), when segmented")


class Prediction(BaseModel):
    label: str
    probabilities: dict[str, float] = Field(description="class name → probability (they sum to 1)")
    confidence: float
    refer: bool | None = Field(description="hand this image to a reader: low calibrated confidence or an input unlike "
                               "the training X-rays; null when the classifier bundle has no refer rule")
    refer_reason: str = Field(description="why it is referred (empty when it is not)")
    segmented: bool = Field(description="stage 2 ran (label pneumonia or covid)")
    lesion_count: int
    lesion_area_px: int
    lesion_area_by_type: dict[str, int] = Field(description="lesion pixels per lesion type of the segmenter")
    lung_affected_pct: float | None
    lesions: list[Lesion]
    width: int
    height: int
    urls: Urls
    note: str


class Models(BaseModel):
    classifier: str
    segmenter: str
    lung_model: str | None


class Health(BaseModel):
    status: str
    classes: list[str]
    segment_classes: list[str]
    models: Models
    queued: int
    max_upload_bytes: int


class Error(BaseModel):
    detail: str
