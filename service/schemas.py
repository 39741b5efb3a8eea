"""Typed request options and response bodies (they also make the OpenAPI schema at /docs)."""

from __future__ import annotations

from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Pooling(str, Enum):
    """The fixed readout names; ``lastN`` (N = 1..depth) is matched by :data:`POOLING_PATTERN`."""

    cls = "cls"
    mean = "mean"
    cls_mean = "cls+mean"
    none = "none"


# cls | mean | cls+mean | lastN (DINOv2: cls and patch mean of each of the last N blocks) | none
# (an unescaped "+" in a query string arrives as a space: "cls mean" is read as cls+mean)
POOLING_PATTERN = r"^(cls|mean|cls[+ ]mean|none|last[1-9][0-9]?)$"


class OutDType(str, Enum):
    float32 = "float32"
    float16 = "float16"


class View(str, Enum):
    panel = "panel"
    reconstruction = "reconstruction"


class LabelFormat(str, Enum):
    png = "png"
    json = "json"


class MaskFormat(str, Enum):
    none = "none"
    rle = "rle"
    png = "png"


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable reason, e.g. too_many_pixels.")
    message: str = Field(description="What is wrong, in words; names the limit where one applies.")
    limit: int | float | None = Field(None, description="The limit that was exceeded, when one applies.")


class ErrorBody(BaseModel):
    error: ErrorDetail


class ImagesJSON(BaseModel):
    """The JSON request body: ``{"images": ["<base64>", ...]}`` or ``{"image": "<base64>"}``; data URIs
    are accepted. ``service/inputs.py`` parses bodies with it; the OpenAPI document shows the form each
    route takes (:meth:`openapi_schema`)."""

    model_config = ConfigDict(extra="forbid")
    images: list[str] | None = Field(None, description="Base64 images (or data URIs) in any accepted format.")
    image: str | None = Field(None, description="One base64 image (or data URI).")

    @classmethod
    def openapi_schema(cls, single: bool) -> dict[str, Any]:
        """The body schema of a route taking one image (``image``) or several (``images``, at least one).
        Written out: both keys are optional in the model (exactly one is required, checked on parsing),
        which a JSON schema of the model itself would not say."""
        name = "image" if single else "images"
        prop: dict[str, Any] = {"description": cls.model_fields[name].description, "title": name.title()}
        if single:
            prop["type"] = "string"
        else:
            prop.update(type="array", items={"type": "string"}, minItems=1)
        title = "ImageJSONBody" if single else "ImagesJSONBody"  # the names clients' generated code uses
        return {"properties": {name: prop}, "required": [name], "title": title, "type": "object"}


class EmbedResponse(BaseModel):
    model: str = Field(description="Model id (spec.model.id).")
    pooling: str = Field(description="The readout returned (the bundle's default when none was asked for).")
    normalized: bool
    dtype: OutDType
    shape: list[int] = Field(description="[n, dim] pooled; [n, num_patches, dim] with pooling=none.")
    dim: int
    patch_grid: list[int] | None = Field(None, description="[rows, cols] of the patch tokens (pooling=none).")
    embeddings: list[Any] = Field(description="Nested lists of floats with the given shape.")


class ReconstructImages(BaseModel):
    original: str = Field(description="Base64 PNG: the model input (resized) image.")
    masked: str = Field(description="Base64 PNG: the visible patches, masked ones grey.")
    reconstruction: str = Field(description="Base64 PNG: visible patches plus predicted masked patches.")


class ReconstructResponse(BaseModel):
    model: str
    grid: list[int] = Field(description="[rows, cols] of patches.")
    patch_size: int
    mask_ratio: float = Field(description="Masked patches / all patches.")
    seed: int | None = Field(None, description="Seed of the random mask (null for an explicit mask).")
    masked_indices: list[int] = Field(description="Masked patch indices, row-major, ascending.")
    mask: list[list[bool]] = Field(description="The mask as a grid (true = masked).")
    per_patch_error: list[float] = Field(
        description="MSE per masked patch (same order as masked_indices) between reconstruction and input, "
        "in [0, 1] RGB units."
    )
    mean_error: float
    images: ReconstructImages


class Timing(BaseModel):
    decode_ms: float = Field(description="Reading, decoding and preprocessing the images.")
    inference_ms: float = Field(description="Queue wait plus inference.")
    postprocess_ms: float = Field(description="Resizing to the original size, encoding.")
    total_ms: float


class ClassPixels(BaseModel):
    id: int
    name: str
    pixels: int = Field(description="Pixels of the label map with this class.")
    fraction: float = Field(description="pixels / (width * height).")


class SegmentResult(BaseModel):
    width: int = Field(description="Original image width; the label map has this size.")
    height: int
    label_map: str | None = Field(
        None,
        description="format=png: base64 PNG whose pixel values are class ids "
        "(8-bit; 16-bit past 256 classes).",
    )
    labels: list[list[int]] | None = Field(None, description="format=json: class ids, [height][width].")
    class_pixels: list[ClassPixels] = Field(description="Every class, in id order.")
    overlay: str | None = Field(
        None, description="overlay=true: base64 PNG of the classes blended on the image."
    )


class SegmentResponse(BaseModel):
    model: str
    classes: list[str] = Field(description="Class names; index = class id; 0 is background.")
    input_size: list[int] = Field(description="[height, width] the model ran at.")
    format: LabelFormat
    resize: str = Field(description="How the label map reaches the original size.")
    palette: list[list[int]] | None = Field(None, description="overlay=true: RGB colour per class id.")
    results: list[SegmentResult] = Field(description="One per image, in request order.")
    timing_ms: Timing


class RLEMask(BaseModel):
    size: list[int] = Field(description="[height, width].")
    counts: list[int] = Field(
        description="COCO uncompressed RLE: column-major run lengths, alternating 0-runs and 1-runs, "
        "starting with a 0-run."
    )


class Detection(BaseModel):
    box: list[float] = Field(description="[x1, y1, x2, y2] in original image pixels.")
    label: int = Field(description="Class id (index into classes, >= 1).")
    label_name: str
    score: float
    mask: RLEMask | str | None = Field(
        None, description="masks=rle: RLE at the original size; masks=png: base64 PNG (0 / 255); else null."
    )


class DetectResult(BaseModel):
    width: int
    height: int
    detections: list[Detection] = Field(description="Best first.")


class DetectResponse(BaseModel):
    model: str
    classes: list[str]
    input_size: list[int] = Field(description="[height, width] the model ran at.")
    score_threshold: float
    max_detections: int
    masks: MaskFormat
    mask_threshold: float = Field(description="Mask probability above which a pixel is in the instance.")
    results: list[DetectResult] = Field(description="One per image, in request order.")
    timing_ms: Timing


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    status: str = Field(description="ready | loading | stopping | unhealthy | failed")
    model: str | None = None
    backend: str | None = None
    detail: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    tasks: list[str]
    unavailable_tasks: dict[str, str] = Field(
        default_factory=dict, description="Tasks of the bundle this backend does not serve, and why."
    )
    backend: dict[str, Any]
    selection: dict[str, Any]
    image: dict[str, Any]
    embed_dim: int
    poolings: list[str] = Field(default_factory=list, description="/embed?pooling= values this model offers.")
    default_pooling: str = Field(
        "cls", description="What /embed returns without ?pooling= (the measured readout)."
    )
    target: dict[str, Any]
    limits: dict[str, Any]
    spec: dict[str, Any]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
