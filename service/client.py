"""A Python client for cae-service: numpy arrays and typed results, binary transport, retries.

Needs only the ``serve`` extra (httpx, numpy, Pillow; never torch)::

    from service.client import CAEClient

    with CAEClient("http://127.0.0.1:8000", api_key="KEY") as cae:
        vectors = cae.embed(["shirt.png", "boot.jpg"])                  # float32 [2, D]
        tokens = cae.embed("shirt.png", pooling="none")                 # [1, N, D]
        rec = cae.reconstruct("shirt.png", mask_ratio=0.5, seed=0)      # rec.reconstruction: uint8 HxWxC
        seg = cae.segment("street.jpg")[0]                              # seg.labels: class id per pixel
        dets = cae.detect("street.jpg", masks="rle")[0].detections      # boxes in original pixels

Transport: images travel as raw bytes (one image: the request body; several: multipart parts), never
base64; answers come as ``.npy`` (``/embed``) and PNG (``/reconstruct``; ``/segment`` with one image),
JSON where the server has no binary form (``/detect``, several label maps). Images may be encoded files
(bytes), paths, PIL images or uint8 arrays (HxW or HxWxC, sent as PNG).

Retries: 429 (queue full) and 503 (overloaded, not ready) are retried up to ``retries`` times, waiting
the server's ``Retry-After`` (capped at ``max_retry_wait_s``; exponential backoff without one), and so
are connection failures; every other error raises :class:`CAEServiceError` with the server's code and
message.
"""

from __future__ import annotations

import base64
import email.utils
import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import httpx
import numpy as np
from PIL import Image

_logger = logging.getLogger("service.client")

ImageInput = Union[bytes, bytearray, memoryview, str, Path, Image.Image, np.ndarray]  # noqa: UP007
RETRY_STATUSES = frozenset({429, 503})
NPY = "application/x-npy"


class CAEServiceError(Exception):
    """An error answer: HTTP status, the server's stable ``code``, its message and the limit, if any."""

    def __init__(self, status: int, code: str, message: str, limit: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.limit = status, code, message, limit


@dataclass(frozen=True)
class Reconstruction:
    """The model's reconstruction of one image; every picture uint8 [H, W, C] at the model's input size."""

    original: np.ndarray
    masked: np.ndarray  # the visible patches, masked ones grey
    reconstruction: np.ndarray  # visible patches plus the predicted masked ones
    masked_count: int
    mask_ratio: float
    seed: int | None  # of the random mask (None for an explicit one)
    model: str


@dataclass(frozen=True)
class Segmentation:
    """One image's label map: class id per pixel at the image's original size."""

    labels: np.ndarray  # int [height, width]
    classes: list[str]  # index = class id
    overlay: np.ndarray | None = None  # uint8 [H, W, 3] with overlay=True

    def class_pixels(self) -> dict[str, int]:
        counts = np.bincount(self.labels.ravel(), minlength=len(self.classes))
        return {name: int(counts[i]) for i, name in enumerate(self.classes)}


@dataclass(frozen=True)
class Detection:
    box: np.ndarray  # float [4]: x1, y1, x2, y2 in original image pixels
    label: int
    label_name: str
    score: float
    mask: np.ndarray | None = None  # bool [height, width] with masks="rle" or "png"


@dataclass(frozen=True)
class Detections:
    """One image's detections, best first."""

    width: int
    height: int
    detections: list[Detection] = field(default_factory=list)

    @property
    def boxes(self) -> np.ndarray:
        return np.stack([d.box for d in self.detections]) if self.detections else np.zeros((0, 4), np.float32)

    @property
    def scores(self) -> np.ndarray:
        return np.asarray([d.score for d in self.detections], dtype=np.float32)


def image_bytes(image: ImageInput) -> bytes:
    """An encoded image file from any accepted input (arrays and PIL images become PNG)."""
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    if isinstance(image, str | Path):
        return Path(image).read_bytes()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(f"an image array must be uint8 HxW or HxWxC, got {image.dtype} {image.shape}")
        image = Image.fromarray(image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(f"not an image: {type(image).__name__} (bytes, path, PIL image or uint8 array)")


def _png_array(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img)


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """COCO uncompressed RLE (column-major runs, starting with a 0-run) -> bool [H, W]."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    values = np.arange(len(counts)) % 2 == 1
    flat = np.repeat(values, counts)
    return flat.reshape((w, h)).T if flat.size else np.zeros((h, w), bool)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class CAEClient:
    """A synchronous client of one cae-service server (thread-safe: one pooled httpx connection pool).

    ``api_key``: sent as ``Authorization: Bearer KEY``. ``request_timeout_s``: sent as the
    ``X-Request-Timeout`` deadline (1..3600 s) when given. ``timeout_s``: the HTTP client's own timeout."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        retries: int = 3,
        max_retry_wait_s: float = 30.0,
        request_timeout_s: float | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"user-agent": "cae-service-client"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        if request_timeout_s is not None:
            headers["x-request-timeout"] = f"{request_timeout_s:g}"
        self._http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout_s, transport=transport)
        self.retries, self.max_retry_wait_s = retries, max_retry_wait_s
        self._sleep: Callable[[float], None] = time.sleep
        self._card: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------- plumbing
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CAEClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as e:
                if last:
                    raise
                wait = min(self.max_retry_wait_s, 0.5 * 2**attempt)
                _logger.warning("%s %s: %s; retrying in %.1f s", method, path, type(e).__name__, wait)
                self._sleep(wait)
                continue
            if response.status_code in RETRY_STATUSES and not last:
                after = _retry_after(response)
                wait = min(self.max_retry_wait_s, 0.5 * 2**attempt if after is None else after)
                _logger.info("%s %s: %d; retrying in %.1f s", method, path, response.status_code, wait)
                self._sleep(wait)
                continue
            if response.status_code >= 400:
                raise self._error(response)
            return response
        raise AssertionError("unreachable")

    @staticmethod
    def _error(response: httpx.Response) -> CAEServiceError:
        try:
            err = response.json()["error"]
            return CAEServiceError(response.status_code, err["code"], err["message"], err.get("limit"))
        except (ValueError, KeyError, TypeError):
            return CAEServiceError(response.status_code, "http_error", response.text[:200])

    @staticmethod
    def _body(images: Sequence[ImageInput]) -> dict[str, Any]:
        """One image: the raw request body; several: multipart ``files`` parts (never base64)."""
        blobs = [image_bytes(i) for i in images]
        if not blobs:
            raise ValueError("no images given")
        if len(blobs) == 1:
            return {"content": blobs[0], "headers": {"content-type": "application/octet-stream"}}
        return {"files": [("files", (f"{i}", b, "application/octet-stream")) for i, b in enumerate(blobs)]}

    @staticmethod
    def _many(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
        if isinstance(images, list | tuple):
            return list(images)
        return [images]  # type: ignore[list-item]

    @staticmethod
    def _params(**kw: Any) -> dict[str, str]:
        out = {}
        for k, v in kw.items():
            if v is None:
                continue
            out[k] = ("true" if v else "false") if isinstance(v, bool) else str(v)
        return out

    # --------------------------------------------------------------------------------------- routes
    def health(self) -> bool:
        return self._http.get("/healthz").status_code == 200

    def ready(self) -> bool:
        return self._http.get("/readyz").status_code == 200

    def model(self, refresh: bool = False) -> dict[str, Any]:
        """The loaded model's card (``GET /v1/models``): id, tasks, backend, spec, limits."""
        if self._card is None or refresh:
            self._card = self._request("GET", "/v1/models").json()["data"][0]
        return self._card

    def embed(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        pooling: str | None = None,
        normalize: bool = False,
        dtype: Literal["float32", "float16"] = "float32",
    ) -> np.ndarray:
        """Embeddings as ``.npy``: [n, F] pooled, [n, num_patches, D] with ``pooling="none"``. ``pooling``:
        cls | mean | cls+mean | lastN | none; None: the model's default readout (``default_pooling``)."""
        # only what differs from the server's defaults goes into the query (the common call stays plain)
        r = self._request(
            "POST",
            "/embed",
            params=self._params(
                pooling=pooling, normalize=normalize or None, dtype=None if dtype == "float32" else dtype
            ),
            **self._merge_accept(self._body(self._many(images)), NPY),
        )
        return np.load(io.BytesIO(r.content), allow_pickle=False)

    def reconstruct(
        self,
        image: ImageInput,
        *,
        mask_ratio: float | None = None,
        seed: int | None = None,
        masked: Sequence[int] | None = None,
    ) -> Reconstruction:
        """Mask patches (at random, or ``masked`` indices) and get the model's reconstruction (PNG)."""
        params = self._params(
            mask_ratio=mask_ratio,
            seed=seed,
            masked=",".join(map(str, masked)) if masked is not None else None,
        )
        r = self._request(
            "POST", "/reconstruct", params=params, **self._merge_accept(self._body([image]), "image/png")
        )
        strip = _png_array(r.content)
        w = strip.shape[1] // 3
        seed_header = r.headers.get("x-seed")
        return Reconstruction(
            original=strip[:, :w],
            masked=strip[:, w : 2 * w],
            reconstruction=strip[:, 2 * w :],
            masked_count=int(r.headers["x-masked-count"]),
            mask_ratio=float(r.headers["x-mask-ratio"]),
            seed=int(seed_header) if seed_header is not None else None,
            model=r.headers.get("x-model-id", ""),
        )

    def segment(
        self, images: ImageInput | Sequence[ImageInput], *, overlay: bool = False
    ) -> list[Segmentation]:
        """A label map per image at its original size. One image without overlay: the PNG itself."""
        many = self._many(images)
        if len(many) == 1 and not overlay:
            r = self._request("POST", "/segment", **self._merge_accept(self._body(many), "image/png"))
            classes = list(self.model()["spec"]["tasks"]["segment"]["classes"])
            return [Segmentation(_png_array(r.content).astype(np.int64), classes)]
        r = self._request(
            "POST", "/segment", params=self._params(overlay=overlay or None), **self._body(many)
        )
        body = r.json()
        return [
            Segmentation(
                labels=_png_array(base64.b64decode(res["label_map"])).astype(np.int64),
                classes=list(body["classes"]),
                overlay=_png_array(base64.b64decode(res["overlay"])) if res.get("overlay") else None,
            )
            for res in body["results"]
        ]

    def detect(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        score_threshold: float | None = None,
        max_detections: int = 100,
        masks: Literal["none", "rle", "png"] = "none",
    ) -> list[Detections]:
        """Detections per image (JSON: the server's only answer), masks decoded to bool arrays."""
        params = self._params(score_threshold=score_threshold, max_detections=max_detections, masks=masks)
        body = self._request("POST", "/detect", params=params, **self._body(self._many(images))).json()
        out = []
        for res in body["results"]:
            dets = []
            for d in res["detections"]:
                mask = d.get("mask")
                if isinstance(mask, dict):
                    mask = rle_decode(mask)
                elif isinstance(mask, str):
                    mask = _png_array(base64.b64decode(mask)) > 127
                dets.append(Detection(np.asarray(d["box"], np.float32), int(d["label"]), d["label_name"],
                                      float(d["score"]), mask))  # fmt: skip
            out.append(Detections(int(res["width"]), int(res["height"]), dets))
        return out

    @staticmethod
    def _merge_accept(kwargs: dict[str, Any], accept: str) -> dict[str, Any]:
        headers = dict(kwargs.get("headers", {}))
        headers["accept"] = accept
        return {**kwargs, "headers": headers}
