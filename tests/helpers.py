"""What test modules share (fixtures that wrap these are in ``conftest.py``): paths, tiny model configs
and checkpoints, fake datasets, the tiny service bundle and its dense variant, image builders, fake
backends, in-process and subprocess servers."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from service.backends.base import Backend
from service.backends.onnxruntime import OnnxRuntimeBackend
from service.bundle import Bundle

REPO = Path(__file__).resolve().parents[1]
# A copy of the official fixture ships with the tests (so CI always checks it); CAE_FIXTURES_DIR overrides.
FIXTURES = Path(os.environ.get("CAE_FIXTURES_DIR", REPO / "tests" / "fixtures"))
OFFICIAL_A = FIXTURES / "official-cae-a"


@dataclass(frozen=True)
class TinyBundle:
    path: Path  # pixel-target bundle (+ int8 embed variant, + model.safetensors for the torch backend)
    dalle_path: Path  # the same graphs with a DALL-E target in spec.json
    model: Any  # the torch CAE it was exported from
    spec: dict[str, Any]


_CACHE: dict[str, TinyBundle] = {}


def build_tiny_bundle(root: Path) -> TinyBundle:
    from export.onnx_export import export_bundle
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
    """The session's tiny bundle, built on first use (the ``tiny_bundle`` fixture in conftest.py)."""
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


# ------------------------------------------------------------------------------ synchronization
async def wait_event(event: threading.Event, timeout: float = 5.0) -> None:
    """Await a ``threading.Event`` (set from a worker thread) without blocking the event loop."""
    if not await asyncio.to_thread(event.wait, timeout):
        raise AssertionError(f"event not set within {timeout} s")


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Yield to the event loop until ``condition()`` holds (tasks run up to their next await), without
    guessing a duration; fails after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not condition():
        if loop.time() > end:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0)


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
        self.called = threading.Event()  # set by the first recorded call: a request reached the backend

    def load(self, bundle: Bundle, precision: str = "fp32") -> None:
        self.bundle = bundle
        self.capabilities = frozenset(bundle.tasks)
        self.task_precision = dict.fromkeys(bundle.tasks, "fp32")

    def infer(self, task: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        n = len(inputs["images"])
        if self.armed:
            self.calls.append((task, n))
            self.called.set()
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
print(json.dumps({"attempts": attempts, "torch": "torch" in sys.modules,
                  "training": "training" in sys.modules, "used": used}))
"""


def run_torchless_driver(bundle: Path, routes: list[str], timeout: float = 180) -> dict[str, Any]:
    """Serve ``routes`` from ``bundle`` in a subprocess (no CAE_* settings inherited); the driver's report."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAE_")}
    env["PYTHONPATH"] = str(REPO)
    r = subprocess.run([sys.executable, "-c", TORCHLESS_DRIVER, str(bundle), *routes], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------- models, data
def tiny_overrides(**kw):
    """A CAE small enough for fast CPU tests: 32x32 images, 16 patches of 8 px, 2 blocks."""
    base = dict(
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=2,
        num_heads=4,
        decoder_embed_dim=64,
        regressor_depth=2,
        decoder_depth=1,
        decoder_num_heads=4,
        vocab_size=128,
        drop_path_rate=0.0,
    )
    base.update(kw)
    return base


def make_image_folder(
    root: Path, n_classes: int = 3, per_class: int = 16, size: int = 20, seed: int = 0
) -> Path:
    """A small separable ImageFolder: class c = stripes at orientation c, random colours and phase."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    for c in range(n_classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        angle = np.pi * c / n_classes
        for i in range(per_class):
            phase = rng.uniform(0, 2 * np.pi)
            wave = np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * 1.2 + phase) > 0
            fg, bg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
            img = np.where(wave[..., None], fg, bg).astype(np.uint8)
            Image.fromarray(img).save(d / f"{i:03d}.png")
    return root


def random_mask(b: int, n: int, m: int, seed: int = 0) -> Any:
    """A [b, n] bool mask with m random patches masked per row (seeded)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(b, n, generator=g).argsort(dim=1)[:, :m]
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask.scatter_(1, idx, True)
    return mask


def perturbed(cfg: Any, seed: int = 0) -> Any:
    """A CAE (from a ``CAEConfig``) whose every tensor is distinctive (so a wrong mapping cannot pass by
    accident)."""
    import torch

    from training.models import CAE

    torch.manual_seed(seed)
    model = CAE(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.05 if p.ndim == 1 else 0.02))
    return model.eval()


TRAIN_CLASSES, TEST_CLASSES = range(0, 5), range(5, 10)  # the fake Fashion-MNIST's classes per split


def write_idx(path: Path, arr: np.ndarray) -> None:
    """A gzipped idx file (Fashion-MNIST's format) holding ``arr``."""
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def make_fake_fmnist(root: Path, n_train: int = 12, n_test: int = 8, seed: int = 0) -> Path:
    """Rectangular 'garments' on a 0 background; train dim with classes 0-4, test bright with classes 5-9."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n, (lo, hi), classes in (
        ("train", n_train, (100, 140), TRAIN_CLASSES),
        ("t10k", n_test, (200, 240), TEST_CLASSES),
    ):
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        for i in range(n):
            h, w = rng.integers(14, 25, size=2)
            y, x = rng.integers(0, 28 - h + 1), rng.integers(0, 28 - w + 1)
            images[i, y : y + h, x : x + w] = rng.integers(lo, hi + 1, size=(h, w))
        labels = np.array([classes[i % len(classes)] for i in range(n)], dtype=np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


# A pretraining run small enough for a 2-core CPU (overrides of the fmnist_cae preset).
TINY = [
    "model.name=cae_tiny_patch16_224",
    "model.overrides={img_size: 16, patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2,"
    " decoder_embed_dim: 32, decoder_num_heads: 2, regressor_depth: 1, decoder_depth: 1, target: pixel,"
    " drop_path_rate: 0.0}",
    "data.num_workers=0",
    "data.mask_ratio=0.5",
    "data.min_mask_patches_per_block=2",
    "data.scale=[0.5, 1.0]",
    "optim.batch_size=16",
    "optim.warmup_epochs=1",
    "optim.lr=2.0e-3",
    "runtime.precision=fp32",
    "runtime.device=cpu",
    "runtime.log_every=1",
    "runtime.tensorboard=false",
    "runtime.recon_every_epochs=1",
]


def tiny_cfg(image_folder: Path, *extra: str) -> Any:
    """The ``fmnist_cae`` preset shrunk by TINY, on an ImageFolder."""
    from training.config import load_config

    return load_config("fmnist_cae", [*TINY, f"data.dataset=imagefolder:{image_folder}", *extra])


def train_losses(run_dir: Path) -> dict[int, float]:
    """Training loss per step from a run's metrics.jsonl."""
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}


# ------------------------------------------------------------------ the dense variant of the bundle
# Hand-made dense heads (``onnx.helper``) that follow the export contract: segment = a 1x1 Conv from RGB to
# class logits, detect = constant detections kept or dropped (N = 0) by the input's mean brightness.
RAW = {"content-type": "image/png"}  # headers of a raw image/png body
S = 48  # the dense heads' input size (the tiny embed graph runs at 32: preprocessing must differ)
SEG_CLASSES = ["background", "red", "green"]
DET_CLASSES = ["background", "thing", "stuff"]
DET_BOXES = np.array([[4, 8, 20, 40], [24, 0, 48, 24], [0, 0, 48, 48]], np.float32)
DET_LABELS = np.array([1, 2, 1], np.int64)
DET_SCORES = np.array([0.9, 0.6, 0.3], np.float32)


def det_masks() -> np.ndarray:
    m = np.zeros((3, 1, S, S), np.float32)
    m[0, 0, 8:40, 4:20] = 1.0  # box 0
    m[1, 0, 0:24, 24:48] = 0.9  # box 1
    m[2, 0] = 0.75  # everything
    return m


def _save(graph: Any, path: Path) -> None:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def segment_graph(path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    # logits: background 1, red = R - G, green = G - R (normalized): grey -> background
    w = np.zeros((3, 3, 1, 1), np.float32)
    w[1, 0], w[1, 1], w[2, 0], w[2, 1] = 1, -1, -1, 1
    graph = helper.make_graph(
        [helper.make_node("Conv", ["images", "w", "b"], ["logits"])],
        "segment",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, S, S])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3, S, S])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([1, 0, 0], np.float32), "b")],
    )
    _save(graph, path)


def detect_graph(path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    # all three detections when the normalized image mean is > 0 (a bright image), none otherwise (N = 0)
    consts = {
        "cb": DET_BOXES,
        "cl": DET_LABELS,
        "cs": DET_SCORES,
        "cm": det_masks(),
        "zero": np.zeros(3, np.float32),
    }
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["m"], keepdims=0),
        helper.make_node("Add", ["zero", "m"], ["m3"]),
        helper.make_node("Greater", ["m3", "thr"], ["keep"]),
        *(helper.make_node("Compress", [c, "keep"], [o], axis=0) for c, o in
          (("cb", "boxes"), ("cl", "labels"), ("cs", "scores"), ("cm", "masks"))),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "detect",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, S, S])],
        [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("labels", TensorProto.INT64, ["N"]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N"]),
            helper.make_tensor_value_info("masks", TensorProto.FLOAT, ["N", 1, S, S]),
        ],
        [numpy_helper.from_array(v, k) for k, v in consts.items()]
        + [numpy_helper.from_array(np.array(0.0, np.float32), "thr")],
    )
    _save(graph, path)


def tensor_entry(name: str, shape: list[Any], dtype: str = "float32") -> dict[str, Any]:
    """A spec.json input/output entry."""
    return {"name": name, "dtype": dtype, "shape": shape}


def build_dense_bundle(tiny: TinyBundle, out: Path) -> Path:
    """The tiny bundle (embed, reconstruct, model.safetensors) plus segment.onnx and detect.onnx."""
    shutil.copytree(tiny.path, out)
    segment_graph(out / "segment.onnx")
    detect_graph(out / "detect.onnx")
    spec = json.loads((out / "spec.json").read_text())
    image = dict(spec["image"], size=S, grid=[6, 6], num_patches=36, patch_size=8)
    spec["tasks"]["segment"] = {
        "file": "segment.onnx",
        "inputs": [tensor_entry("images", ["batch", 3, S, S])],
        "outputs": [tensor_entry("logits", ["batch", len(SEG_CLASSES), S, S])],
        "precision": "fp32",
        "parity": {},
        "image": image,
        "classes": SEG_CLASSES,
    }
    spec["tasks"]["detect"] = {
        "file": "detect.onnx",
        "inputs": [tensor_entry("images", [1, 3, S, S])],
        "outputs": [
            tensor_entry("boxes", ["N", 4]),
            tensor_entry("labels", ["N"], "int64"),
            tensor_entry("scores", ["N"]),
            tensor_entry("masks", ["N", 1, S, S]),
        ],
        "precision": "fp32",
        "parity": {},
        "image": image,
        "classes": DET_CLASSES,
    }
    for f in ("segment.onnx", "detect.onnx"):
        spec["files"][f] = hashlib.sha256((out / f).read_bytes()).hexdigest()
    (out / "spec.json").write_text(json.dumps(spec))
    return out


# ------------------------------------------------------------------------------- server processes
def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def subprocess_env(**extra: str) -> dict[str, str]:
    """This process's environment without CAE_* settings, with the repository on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAE_")}
    env.update(PYTHONPATH=str(REPO), **extra)
    return env


@dataclass(frozen=True)
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path


def server_env(**extra: str) -> dict[str, str]:
    """``subprocess_env`` for a server process (access log off)."""
    return subprocess_env(CAE_ACCESS_LOG="false", **extra)


@contextmanager
def running_server(bundle: Path, log: Path, *, ready_s: float = 120, **env: str) -> Iterator[Server]:
    """``python -m service`` on ``bundle`` (onnxruntime fp32), ready before it is yielded; killed after.
    ``env``: extra ``CAE_*`` settings."""
    port = free_port()
    cmd = [sys.executable, "-m", "service", "--model-dir", str(bundle), "--port", str(port),
           "--backend", "onnxruntime", "--precision", "fp32"]  # fmt: skip
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=server_env(**env), stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_s
        with httpx.Client(base_url=url, timeout=5) as c:
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()}")
                try:
                    if c.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"server not ready in {ready_s} s:\n{log.read_text()}")
                time.sleep(0.1)
        yield Server(url, proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def file_tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path: byte-identical output trees compare equal."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def load_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im)
