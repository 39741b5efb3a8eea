"""Dense post-processing vs the inference it follows, on a photo-sized image (issue 15, item 4).

    python bench/dense_post.py [--bundle models/default] [--width 2560 --height 1600] [--backend onnxruntime]

Decodes one generated photo-like JPEG with the service's Preprocessor, runs the bundle's segment and
detect graphs in-process, then times the post-processing of the routes: the label map at the original
size (PNG or nested lists), the overlay (JPEG, as ``overlay_format=auto`` answers a JPEG input, or PNG),
and the detect masks (RLE, PNG) at a low score threshold; "before" is the previous implementation kept
as the reference (full-size resize + argmax, float overlay, Pillow PNGs, full-size masks). Best of
``--repeat`` runs each; one process, pin it with ``taskset`` to the cores you mean.
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def out(line: str = "") -> None:
    sys.stdout.write(line + "\n")


def best_ms(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def photo(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack(
        [127 + 100 * np.sin(xx / (150 + 40 * k) + k) * np.cos(yy / (90 + 30 * k)) for k in range(3)], -1
    )
    img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _pil_png_b64(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=REPO_ROOT / "models" / "default")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--width", type=int, default=2560)
    p.add_argument("--height", type=int, default=1600)
    p.add_argument("--score-threshold", type=float, default=0.05)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)

    from service import dense, fast
    from service.backends import select_backend
    from service.bundle import load_bundle
    from service.imaging import Limits, Preprocessor
    from service.routers.detect import detect_one
    from service.routers.segment import segment_one
    from service.schemas import LabelFormat, MaskFormat

    bundle = load_bundle(args.bundle)
    tasks = [t for t in ("segment", "detect") if t in bundle.tasks]
    be = select_backend(bundle, pinned=dict.fromkeys(tasks, (args.backend, args.precision))).backend
    data = photo(args.width, args.height)
    rows: list[tuple[str, float, float]] = []
    n = args.repeat
    if "segment" in tasks:
        pre = Preprocessor(bundle.image_for("segment"), Limits(100_000_000, 1))
        d = pre.process(data, keep_image=True)
        x = d.array[None]
        t_inf = best_ms(lambda: be.infer("segment", {"images": x}), n)
        logits = be.infer("segment", {"images": x})[0]
        classes = bundle.classes("segment")
        h, w = args.height, args.width
        labels = dense.label_map(logits, h, w)

        def before_png() -> None:
            lab = dense.label_map_reference(logits, h, w)
            _pil_png_b64(lab)
            np.bincount(lab.ravel(), minlength=len(classes))

        def before_overlay() -> None:
            before_png()
            _pil_png_b64(dense.overlay_reference(d.image, labels, len(classes), 0.5))

        def before_json() -> None:
            fast.dumps({"labels": dense.label_map_reference(logits, h, w).tolist()})

        def run(fmt: LabelFormat, alpha: float | None, of: str) -> Callable[[], None]:
            def go() -> None:
                dd = pre.process(data, keep_image=True) if alpha is not None else d
                fast.dumps(segment_one(logits, dd, classes, fmt, alpha, of))

            return go

        # the overlay rows include what an overlay adds to the decode (the full-resolution decode of a JPEG
        # that the model reads as a draft), not the decode every request pays
        t_decode = best_ms(lambda: pre.process(data), n)
        rows += [
            ("segment: label map PNG", best_ms(before_png, n), best_ms(run(LabelFormat.png, None, "png"), n)),
            (
                "segment: + overlay (JPEG input: overlay_format=auto -> jpeg)",
                best_ms(before_overlay, n),
                best_ms(run(LabelFormat.png, 0.5, "jpeg"), n) - t_decode,
            ),
            (
                "segment: + overlay, overlay_format=png",
                best_ms(before_overlay, n),
                best_ms(run(LabelFormat.png, 0.5, "png"), n) - t_decode,
            ),
            (
                "segment: format=json (nested lists)",
                best_ms(before_json, n),
                best_ms(run(LabelFormat.json, None, "png"), n),
            ),
        ]
        out(f"segment inference ({args.backend} {args.precision}, {x.shape[-1]}px input): {t_inf:.1f} ms")
    if "detect" in tasks:
        pre = Preprocessor(bundle.image_for("detect"), Limits(100_000_000, 1))
        d = pre.process(data)
        x = d.array[None]
        t_det = best_ms(lambda: be.infer_outputs("detect", {"images": x}), n)
        outs = be.infer_outputs("detect", {"images": x})
        size = bundle.image_for("detect").size
        classes = bundle.classes("detect")
        keep = dense.select_detections(outs["scores"], args.score_threshold, 100)

        def before_masks(kind: str) -> Callable[[], None]:
            def go() -> None:
                for i in keep:
                    full = np.zeros((args.height, args.width), bool)
                    for r, chunk in dense.resized_rows(
                        outs["masks"][i].reshape(1, *outs["masks"][i].shape[-2:]), args.height, args.width
                    ):
                        full[r] = chunk[0] > dense.MASK_THRESHOLD
                    dense.rle_encode(full) if kind == "rle" else _pil_png_b64(full.astype(np.uint8) * 255)

            return go

        for kind, fmt in (("rle", MaskFormat.rle), ("png", MaskFormat.png)):
            rows.append(
                (
                    f"detect: {len(keep)} masks as {kind}",
                    best_ms(before_masks(kind), n),
                    best_ms(
                        lambda fmt=fmt: detect_one(outs, d, classes, size, args.score_threshold, 100, fmt), n
                    ),
                )
            )
        out(f"detect inference ({args.backend} {args.precision}): {t_det:.1f} ms")
    out(f"\n{args.width}x{args.height} JPEG photo, post-processing ms (best of {n}):\n")
    out("| step | before | after |")
    out("|---|---:|---:|")
    for name, b, a in rows:
        out(f"| {name} | {b:.1f} | {a:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
