"""Shared pieces of the service tests: one tiny bundle per session, image builders, fake backends."""

from __future__ import annotations

import io
import json
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service.backends.base import Backend
from service.backends.onnxruntime import OnnxRuntimeBackend
from service.bundle import Bundle

ort = pytest.importorskip("onnxruntime")


@dataclass(frozen=True)
class TinyBundle:
    path: Path  # pixel-target bundle (+ int8 embed variant, + model.safetensors for the torch backend)
    dalle_path: Path  # the same graphs with a DALL-E target in spec.json
    model: Any  # the torch CAE it was exported from
    spec: dict[str, Any]


_CACHE: dict[str, TinyBundle] = {}


def build_tiny_bundle(root: Path) -> TinyBundle:
    from export.onnx_export import export_bundle
    from tests.conftest import tiny_overrides
    from tests.test_checkpoint import perturbed
    from training.models import CAEConfig, save_model

    model = perturbed(CAEConfig(**tiny_overrides(target="pixel")))
    ckpt = save_model(model, root / "tiny.safetensors")
    out = root / "pixel"
    spec = export_bundle(ckpt, out, int8=True)
    shutil.copy(ckpt, out / "model.safetensors")  # the torch backend's checkpoint (not listed in files)
    # A DALL-E-target bundle only differs in what /reconstruct must refuse; its spec says so.
    dalle = root / "dalle"
    shutil.copytree(out, dalle)
    dspec = json.loads((dalle / "spec.json").read_text())
    dspec["target"].update(type="dalle", pred_dim=128)
    (dalle / "spec.json").write_text(json.dumps(dspec))
    return TinyBundle(out, dalle, model, spec)


def get_tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> TinyBundle:
    """The session's tiny bundle, built on first use. Each test module wraps this in its own
    ``tiny_bundle`` fixture (a fixture imported into several modules would be built once per module)."""
    if "tiny" not in _CACHE:
        _CACHE["tiny"] = build_tiny_bundle(tmp_path_factory.mktemp("service-bundle"))
    return _CACHE["tiny"]


# ------------------------------------------------------------------------------------------- images
def image_array(w: int = 40, h: int = 30, seed: int = 0) -> np.ndarray:
    """A smooth colour image with some texture (JPEG-friendly)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([127 + 100 * np.sin(xx / 7 + k + seed) * np.cos(yy / 5 - k) for k in range(3)], axis=-1)
    return np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)


def encode(img: Image.Image, fmt: str = "PNG", **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_bytes(w: int = 40, h: int = 30, seed: int = 0) -> bytes:
    return encode(Image.fromarray(image_array(w, h, seed)))


def huge_canvas_png(w: int = 30000, h: int = 30000) -> bytes:
    """A ~100-byte PNG whose header declares a w x h canvas (a decompression-bomb shape)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


# ----------------------------------------------------------------------------------------- backends
class SpyBackend(OnnxRuntimeBackend):
    """The real ONNX Runtime backend, recording each call's batch size, optionally slowed down."""

    def __init__(self, delay_s: float = 0.0) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.calls: list[tuple[str, int]] = []
        self.lock = threading.Lock()
        self.armed = False  # warm-up runs at full speed and is not recorded

    def _record(self, task: str, inputs: dict[str, np.ndarray]) -> None:
        if self.armed:
            with self.lock:
                self.calls.append((task, len(inputs["images"])))
            time.sleep(self.delay_s)

    def infer(self, task: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        self._record(task, inputs)
        return super().infer(task, inputs)

    def infer_outputs(self, task: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # multi-output graphs (embed with its block readouts) come through here
        self._record(task, inputs)
        return super().infer_outputs(task, inputs)


class FakeBackend(Backend):
    """Shape-correct zeros; can be slow, hang until released, or fail (after warm-up)."""

    name = "fake"

    def __init__(self, delay_s: float = 0.0, fail: bool = False) -> None:
        super().__init__()
        self.delay_s, self.fail = delay_s, fail
        self.release = threading.Event()  # set it to free a hanging call
        self.hang = False
        self.armed = False
        self.calls: list[tuple[str, int]] = []

    def load(self, bundle: Bundle, precision: str = "fp32") -> None:
        self.bundle = bundle
        self.capabilities = frozenset(bundle.tasks)
        self.task_precision = dict.fromkeys(bundle.tasks, "fp32")

    def infer(self, task: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        n = len(inputs["images"])
        if self.armed:
            self.calls.append((task, n))
            if self.hang:
                self.release.wait(10)
            time.sleep(self.delay_s)
            if self.fail:
                raise RuntimeError("secret internal detail /opt/models")
        b = self.bundle
        if task == "embed":
            return np.zeros((n, 1 + b.image.num_patches, b.embed_dim), np.float32)
        return np.zeros((n, int(inputs["mask"][0].sum()), b.pred_dim), np.float32)

    def infer_outputs(self, task: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Graphs with several outputs (embed with block readouts): the first as ``infer`` (the same
        recording, delay, hang and failure), the others zeros of the spec's shape."""
        first = self.infer(task, inputs)
        outs = self.bundle.spec["tasks"][task]["outputs"]
        n = len(first)
        rest = {o["name"]: np.zeros((n, *(int(d) for d in o["shape"][1:])), np.float32) for o in outs[1:]}
        return {outs[0]["name"]: first, **rest}


@contextmanager
def serve(bundle_dir: Path, instance: Backend | None = None, **settings: Any) -> Iterator[Any]:
    """A TestClient around a fresh app (lifespan run), with test-friendly defaults; ``instance``: a backend
    object to serve with instead of selecting one by the ``backend`` setting."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    opts: dict[str, Any] = {
        "model_dir": bundle_dir,
        "backend": "onnxruntime",
        "precision": "fp32",
        "decode_workers": 2,
    }
    opts.update(settings)
    app = create_app(Settings(**opts), backend=instance)
    pixels = Image.MAX_IMAGE_PIXELS  # the server sets Pillow's process-wide limit: restore it for other tests
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            if isinstance(instance, SpyBackend | FakeBackend):
                instance.armed = True
            yield client
    finally:
        Image.MAX_IMAGE_PIXELS = pixels


# ------------------------------------------------------------------------------------- shared cases
def error_cases() -> list[tuple[str, str, dict[str, Any], int, str]]:
    """(name, path, request kwargs for httpx, status, error code) for a server with limits
    max_images_per_request=3, max_body_bytes=300_000, max_pixels=1_000_000, min_side=16."""
    good = png_bytes()
    truncated = good[: len(good) // 2]
    raw = {"content-type": "image/png"}
    return [
        ("empty body", "/embed", {"content": b""}, 400, "empty_body"),
        ("empty raw image", "/embed", {"content": b"", "headers": raw}, 400, "empty_body"),
        (
            "wrong content type",
            "/embed",
            {"content": b"hello", "headers": {"content-type": "text/plain"}},
            415,
            "unsupported_media_type",
        ),
        (
            "not an image",
            "/embed",
            {"content": b"GIF-ish? no" * 10, "headers": raw},
            415,
            "unsupported_format",
        ),
        (
            "ppm is not accepted",
            "/embed",
            {"content": encode(Image.fromarray(image_array()), "PPM"), "headers": raw},
            415,
            "unsupported_format",
        ),
        ("corrupt image", "/embed", {"content": truncated, "headers": raw}, 400, "corrupt_image"),
        (
            "too many images",
            "/embed",
            {"files": [("files", (f"{i}.png", good, "image/png")) for i in range(4)]},
            413,
            "too_many_images",
        ),
        ("too many images json", "/embed", {"json": {"images": ["AAAA"] * 4}}, 413, "too_many_images"),
        (
            "body too large",
            "/embed",
            {"content": b"\xff\xd8\xff" + b"0" * 400_000, "headers": raw},
            413,
            "body_too_large",
        ),
        ("too many pixels", "/embed", {"content": huge_canvas_png(), "headers": raw}, 413, "too_many_pixels"),
        ("too small", "/embed", {"content": png_bytes(8, 40), "headers": raw}, 422, "image_too_small"),
        ("bad base64", "/embed", {"json": {"images": ["not base64!"]}}, 400, "bad_base64"),
        (
            "bad json",
            "/embed",
            {"content": b"{nope", "headers": {"content-type": "application/json"}},
            400,
            "bad_json",
        ),
        ("json wrong shape", "/embed", {"json": {"imgs": []}}, 422, "invalid_json"),
        (
            "unknown multipart field",
            "/embed",
            {"files": {"image": ("a.png", good, "image/png")}},
            400,
            "bad_multipart",
        ),
        ("bad pooling", "/embed?pooling=max", {"content": good, "headers": raw}, 422, "invalid_option"),
        ("bad dtype", "/embed?dtype=int8", {"content": good, "headers": raw}, 422, "invalid_option"),
        ("bad normalize", "/embed?normalize=maybe", {"content": good, "headers": raw}, 422, "invalid_option"),
        (
            "mask index out of range",
            "/reconstruct?masked=1,99",
            {"content": good, "headers": raw},
            422,
            "invalid_mask",
        ),
        ("mask repeats", "/reconstruct?masked=1,1", {"content": good, "headers": raw}, 422, "invalid_mask"),
        (
            "mask not a list",
            "/reconstruct?masked=a,b",
            {"content": good, "headers": raw},
            422,
            "invalid_option",
        ),
        (
            "mask and seed",
            "/reconstruct?masked=1&seed=3",
            {"content": good, "headers": raw},
            422,
            "invalid_mask",
        ),
        (
            "all masked",
            "/reconstruct?masked=" + ",".join(map(str, range(16))),
            {"content": good, "headers": raw},
            422,
            "invalid_mask",
        ),
        (
            "mask ratio out of range",
            "/reconstruct?mask_ratio=1.5",
            {"content": good, "headers": raw},
            422,
            "invalid_option",
        ),
        (
            "reconstruct two images",
            "/reconstruct",
            {"json": {"images": [png_b64(), png_b64()]}},
            413,
            "too_many_images",
        ),
        ("unknown route", "/nope", {}, 404, "not_found"),
    ]


def png_b64(w: int = 40, h: int = 30, seed: int = 0) -> str:
    import base64

    return base64.b64encode(png_bytes(w, h, seed)).decode()


CASE_LIMITS = {
    "max_images_per_request": 3,
    "max_body_bytes": 300_000,
    "max_pixels": 1_000_000,
    "min_side": 16,
}


# Runs the app in a fresh interpreter on a bundle, posts each route given after the bundle path (one PNG,
# raw body) with the onnxruntime and auto backends, and reports any attempt to import torch (recorded,
# not blocked, so nothing is hidden) and whether torch / training ended up imported.
TORCHLESS_DRIVER = r"""
import json, sys

attempts = []


class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            attempts.append(name)
        return None


sys.meta_path.insert(0, Watch())
from fastapi.testclient import TestClient
from service.app import create_app
from service.settings import Settings
import io
from PIL import Image

buf = io.BytesIO()
Image.new("RGB", (40, 30), (200, 100, 50)).save(buf, "PNG")
png = buf.getvalue()
used = []
for backend in ("onnxruntime", "auto"):
    app = create_app(Settings(model_dir=sys.argv[1], backend=backend))
    with TestClient(app) as c:
        for route in sys.argv[2:]:
            r = c.post(route, content=png, headers={"content-type": "image/png"})
            assert r.status_code == 200, (route, r.status_code, r.text[:500])
        used.append(c.get("/v1/models").json()["data"][0]["backend"]["name"])
print(json.dumps({"attempts": attempts, "torch": "torch" in sys.modules, "training": "training" in sys.modules,
                  "used": used}))
"""


def run_torchless_driver(bundle: Path, routes: list[str], timeout: float = 180) -> dict[str, Any]:
    """Serve ``routes`` from ``bundle`` in a subprocess (no CAE_* settings inherited); the driver's report."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {k: v for k, v in os.environ.items() if not k.startswith("CAE_")}
    env["PYTHONPATH"] = str(REPO)
    r = subprocess.run([sys.executable, "-c", TORCHLESS_DRIVER, str(bundle), *routes], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])
