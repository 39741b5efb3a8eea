"""Typed request options and response bodies (they also make the OpenAPI schema at /docs)."""

from __future__ import annotations

from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, Field


class Pooling(str, Enum):
    cls = "cls"
    mean = "mean"
    none = "none"


class OutDType(str, Enum):
    float32 = "float32"
    float16 = "float16"


class View(str, Enum):
    panel = "panel"
    reconstruction = "reconstruction"


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable reason, e.g. too_many_pixels.")
    message: str = Field(description="What is wrong, in words; names the limit where one applies.")
    limit: int | float | None = Field(None, description="The limit that was exceeded, when one applies.")


class ErrorBody(BaseModel):
    error: ErrorDetail


class ImagesJSONBody(BaseModel):
    images: list[str] = Field(
        description="Base64 images (or data URIs) in any accepted format.", min_length=1
    )


class ImageJSONBody(BaseModel):
    image: str = Field(description="One base64 image (or data URI).")


class EmbedResponse(BaseModel):
    model: str = Field(description="Model id (spec.model.id).")
    pooling: Pooling
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
    backend: dict[str, Any]
    selection: dict[str, Any]
    image: dict[str, Any]
    embed_dim: int
    target: dict[str, Any]
    limits: dict[str, Any]
    spec: dict[str, Any]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
