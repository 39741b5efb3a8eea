"""``python -m export``: checkpoint conversion, model bundles (ONNX + spec.json), TensorRT engines and Triton
model repositories."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

_logger = logging.getLogger("export")


def _cmd_convert(args: argparse.Namespace) -> int:
    from training.models.checkpoint import CheckpointError, convert_checkpoint

    overrides = {}
    if args.num_heads:
        overrides["num_heads"] = args.num_heads
    if args.decoder_num_heads:
        overrides["decoder_num_heads"] = args.decoder_num_heads
    try:
        model = convert_checkpoint(args.src, args.dst, readout=args.readout, **overrides)
    except CheckpointError as e:
        _logger.error("%s", e)
        return 2
    n_params = sum(p.numel() for p in model.parameters())
    summary = {"dst": str(args.dst), "params": n_params, "config": model.cfg.to_dict()}
    _logger.info("wrote %s (%s, %.2fM parameters)", args.dst, model.extra_repr(), n_params / 1e6)
    if args.json:
        sys.stdout.write(json.dumps(summary) + "\n")
    return 0


def _cmd_convert_tokenizer(args: argparse.Namespace) -> int:
    from training.tokenizers import DalleWeightsError, convert_openai_encoder

    try:
        convert_openai_encoder(args.src, args.dst)
    except (DalleWeightsError, FileNotFoundError) as e:
        _logger.error("%s", e)
        return 2
    _logger.info("wrote %s", args.dst)
    return 0


def _cmd_onnx(args: argparse.Namespace) -> int:
    from export.onnx_export import ExportError, export_bundle
    from training.models.checkpoint import CheckpointError

    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    try:
        spec = export_bundle(
            args.checkpoint,
            args.out_dir,
            tasks=tasks,
            image_size=args.image_size,
            opset=args.opset,
            fp16=args.fp16,
            int8=args.int8,
            segment=args.segment,
            detect=args.detect,
            scenes_root=args.scenes,
            detect_score_threshold=args.detect_score_threshold,
            detect_nms_iou=None if args.detect_nms_iou < 0 else args.detect_nms_iou,
            shared_weights=args.shared_weights,
        )
    except (ExportError, CheckpointError) as e:
        _logger.error("%s", e)
        return 2
    if args.json:
        sys.stdout.write(json.dumps(spec) + "\n")
    return 0


def _cmd_tensorrt(args: argparse.Namespace) -> int:
    from export.tensorrt import TensorRTError, export_tensorrt

    try:
        export_tensorrt(
            args.bundle,
            fp16=args.fp16,
            int8=args.int8,
            calib_dir=args.calib_dir,
            min_batch=args.min_batch,
            opt_batch=args.opt_batch,
            max_batch=args.max_batch,
        )
    except TensorRTError as e:
        _logger.error("%s", e)
        return 2
    return 0


def _cmd_triton(args: argparse.Namespace) -> int:
    from export.triton import TritonError, export_triton

    try:
        export_triton(
            args.bundle,
            args.repo,
            prefix=args.prefix,
            max_batch_size=args.max_batch_size,
            instance_kind=args.instance_kind,
            instances=args.instances,
            max_queue_delay_us=args.max_queue_delay_us,
        )
    except TritonError as e:
        _logger.error("%s", e)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser(
        "convert",
        help="official / mmpretrain / encoder-only .pth (or ours) -> our .safetensors",
        description="Convert a CAE checkpoint to our single-file safetensors format "
        "(config in the metadata). "
        "Foreign files are read with torch.load(weights_only=True) and an explicit allow-list.",
    )
    c.add_argument(
        "src", help="checkpoint to read (.pth from the official code or mmpretrain, or .safetensors)"
    )
    c.add_argument("dst", help="output path, ending in .safetensors")
    c.add_argument("--num-heads", type=int, default=None, help="encoder heads, when the file cannot tell")
    c.add_argument("--decoder-num-heads", type=int, default=None, help="regressor/decoder heads, likewise")
    c.add_argument(
        "--readout",
        default=None,
        help="default readout: cls | mean | cls+mean | lastN (what eval measures and /embed serves "
        "by default; written into the file)",
    )
    c.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    c.set_defaults(func=_cmd_convert)
    o = sub.add_parser(
        "onnx",
        help="checkpoint -> model bundle (ONNX graphs + spec.json), each graph checked against PyTorch",
    )
    o.add_argument("checkpoint", help="our .safetensors or any checkpoint load_model accepts")
    o.add_argument("out_dir", help="bundle directory to write")
    o.add_argument("--tasks", default="embed,reconstruct", help="comma-separated: embed, reconstruct")
    o.add_argument("--image-size", type=int, default=None, help="input size (default: the trained size)")
    o.add_argument("--opset", type=int, default=18)
    o.add_argument("--fp16", action="store_true", help="also write fp16 graphs (cosine >= 0.999 to fp32)")
    o.add_argument(
        "--int8",
        action="store_true",
        help="also write int8 graphs (ORT dynamic quantization, cosine >= 0.99)",
    )
    o.add_argument("--segment", default=None, help="a trained segmentation head (segment.safetensors) to add")
    o.add_argument("--detect", default=None, help="a trained detection head (detect.safetensors) to add")
    o.add_argument(
        "--detect-score-threshold",
        type=float,
        default=0.5,
        help="the service's default score threshold for /detect, recorded in spec.json",
    )
    o.add_argument(
        "--detect-nms-iou",
        type=float,
        default=0.5,
        help="IoU threshold of the service's class-agnostic NMS for /detect (spec.json); < 0: off",
    )
    o.add_argument(
        "--scenes", default=None, help="scenes benchmark folder: its validation images join the parity inputs"
    )
    o.add_argument(
        "--no-shared-weights",
        dest="shared_weights",
        action="store_false",
        help="self-contained graphs (each carries its weights) instead of one shared weights.bin "
        "that stores every tensor once",
    )
    o.add_argument("--json", action="store_true", help="print spec.json on stdout")
    o.set_defaults(func=_cmd_onnx)
    r = sub.add_parser("tensorrt", help="TensorRT engines from a bundle's ONNX graphs (needs a CUDA GPU)")
    r.add_argument("bundle", help="bundle directory written by `python -m export onnx`")
    r.add_argument("--fp16", action="store_true")
    r.add_argument("--int8", action="store_true", help="INT8 with entropy calibration (needs --calib-dir)")
    r.add_argument("--calib-dir", default=None, help="folder of real images for INT8 calibration")
    r.add_argument("--min-batch", type=int, default=1)
    r.add_argument("--opt-batch", type=int, default=8)
    r.add_argument("--max-batch", type=int, default=64)
    r.set_defaults(func=_cmd_tensorrt)
    tr = sub.add_parser("triton", help="an NVIDIA Triton model repository from a bundle")
    tr.add_argument("bundle", help="bundle directory written by `python -m export onnx`")
    tr.add_argument("repo", help="Triton model repository to write")
    tr.add_argument("--prefix", default="cae")
    tr.add_argument("--max-batch-size", type=int, default=64)
    tr.add_argument("--instance-kind", default="KIND_GPU", choices=["KIND_GPU", "KIND_CPU"])
    tr.add_argument("--instances", type=int, default=1)
    tr.add_argument("--max-queue-delay-us", type=int, default=2000)
    tr.set_defaults(func=_cmd_triton)
    t = sub.add_parser(
        "convert-tokenizer",
        help="OpenAI DALL-E encoder.pkl -> safetensors (restricted unpickling, done once)",
    )
    t.add_argument("src", help="OpenAI's encoder.pkl (or a state_dict file)")
    t.add_argument("dst", help="output .safetensors")
    t.set_defaults(func=_cmd_convert_tokenizer)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    # INFO for our loggers only: ONNX Runtime's quantizer logs every node on the root logger
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("export", "training"):
        logging.getLogger(name).setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
