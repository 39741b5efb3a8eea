"""Entry point: ``python training/run.py {pretrain,eval,presets,scenes,segment,detect} ...``.

    python training/run.py pretrain --config fmnist_cae_small --output-dir runs/fmnist
    python training/run.py pretrain --config cae_base_800e --set data.dataset=imagefolder:/data/in1k \\
        --set data.tokenizer_weights=dalle_encoder.safetensors --output-dir runs/base800   # under torchrun
    python training/run.py eval --checkpoint runs/fmnist/model.safetensors --protocol linear \\
        --dataset fashion-mnist --json
    python training/run.py scenes --out runs/scenes --train 4000 --test 1000      # Fashion-MNIST scenes
    python training/run.py segment --config fmnist_scenes_upernet --output-dir runs/seg
    python training/run.py detect --config fmnist_scenes_maskrcnn --output-dir runs/det
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_logger = logging.getLogger("training")


def _setup_logging() -> None:
    import os

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s %(levelname)s [rank{rank}] %(name)s: %(message)s"
        if "RANK" in os.environ
        else "%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from training.config import ConfigError, load_config
    from training.pretrain import pretrain

    try:
        cfg = load_config(args.config, args.set)
        result = pretrain(cfg, args.output_dir, resume=args.resume)
    except ConfigError as e:
        _logger.error("%s", e)
        return 2
    _logger.info("done: %s", json.dumps(result))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from training.evaluation import EvalError, run_eval

    try:
        metrics = run_eval(
            checkpoint=args.checkpoint,
            protocol=args.protocol,
            dataset=args.dataset,
            overrides=args.set,
            cache_dir=args.cache_dir,
            seed=args.seed,
            device=args.device,
            output_dir=args.output_dir,
            resume=args.resume,
        )
    except EvalError as e:
        _logger.error("%s", e)
        return 2
    if args.json:
        sys.stdout.write(json.dumps(metrics) + "\n")
    else:
        for k, v in metrics.items():
            _logger.info("%s: %s", k, v)
    return 0


def _dense_task(name: str) -> str | None:
    """The task of a dense preset or dense YAML file (its top-level ``task``), None for a pretraining one."""
    from training.config import ConfigError, list_presets, load_preset_dict
    from training.dense.train import DENSE_CONFIG_DIR, list_dense_presets

    if name in list_presets():
        return None
    if name in list_dense_presets():
        data = load_preset_dict(str(DENSE_CONFIG_DIR / f"{name}.yaml"))
    elif Path(name).suffix and Path(name).is_file():
        data = load_preset_dict(name)
        if "task" not in data:
            return None
    else:
        raise ConfigError(
            f"no preset or file {name!r}; pretraining presets: {list_presets()}, "
            f"dense presets: {list_dense_presets()}"
        )
    task = data.get("task", "segment")
    if task not in ("segment", "detect"):
        raise ConfigError(f"{name}: task {task!r} is not one of 'segment', 'detect'")
    return str(task)


def _cmd_presets(args: argparse.Namespace) -> int:
    import yaml

    from training.config import ConfigError, list_presets, load_config
    from training.dense.train import list_dense_presets, load_dense_config

    if not args.name:
        lines = [
            "pretraining (pretrain --config NAME):",
            *(f"  {n}" for n in list_presets()),
            "dense heads (segment|detect --config NAME):",
            *(f"  {n}" for n in list_dense_presets()),
        ]
        sys.stdout.write("\n".join(lines) + "\n")
        return 0
    try:
        task = _dense_task(args.name)
        if task is None:
            text = load_config(args.name).to_yaml()
        else:
            text = yaml.safe_dump(load_dense_config(task, args.name).to_dict(), sort_keys=False)
    except ConfigError as e:
        _logger.error("%s", e)
        return 2
    sys.stdout.write(text)
    return 0


def _cmd_scenes(args: argparse.Namespace) -> int:
    from training.data import DataError
    from training.dense.scenes import generate_from_args

    try:
        summary = generate_from_args(args)
    except (DataError, FileExistsError, ValueError) as e:
        _logger.error("%s", e)
        return 2
    _logger.info("scenes: %s", json.dumps(summary, default=str))
    return 0


def _cmd_dense(args: argparse.Namespace) -> int:
    from training.config import ConfigError
    from training.dense.train import load_dense_config, train_dense

    try:
        cfg = load_dense_config(args.command, args.config, args.set)
        result = train_dense(cfg, args.output_dir, resume=args.resume)
    except ConfigError as e:
        _logger.error("%s", e)
        return 2
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python training/run.py", description="CAE pretraining and evaluation")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("pretrain", help="pretrain a CAE (one process, or many under torchrun)")
    t.add_argument("--config", required=True, help="preset name (see `presets`) or a YAML file")
    t.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.lr=1e-3 --set model.overrides.depth=6",
    )
    t.add_argument("--output-dir", required=True, help="run directory (checkpoints, metrics, PNGs, model)")
    t.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in --output-dir"
    )
    t.set_defaults(func=_cmd_pretrain)

    e = sub.add_parser("eval", help="evaluate an encoder: kNN, linear, attentive probe or fine-tuning")
    e.add_argument(
        "--checkpoint", required=True, help="our .safetensors, an official/mmpretrain .pth, or 'random:NAME'"
    )
    e.add_argument("--protocol", required=True, choices=["knn", "linear", "attentive", "finetune"])
    e.add_argument(
        "--dataset",
        default="fashion-mnist",
        help="fashion-mnist | fashion-mnist-shifted (smaller, off-centre test garments) | fashion-mnist-val "
        "(50k train -> the train split's last 10k, for recipe selection) | imagefolder:PATH "
        "(PATH/train, PATH/val)",
    )
    e.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="protocol hyper-parameters"
    )
    e.add_argument(
        "--cache-dir", default=None, help="frozen-feature cache (default: ~/.cache/cae-service/features)"
    )
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default="auto")
    e.add_argument("--json", action="store_true", help="print one JSON object with the metrics (incl. top1)")
    e.add_argument(
        "--output-dir", default=None,
        help="write result.json here; finetune also checkpoints each epoch and writes metrics and PNGs",
    )  # fmt: skip
    e.add_argument("--resume", action="store_true", help="finetune: continue the run in --output-dir")
    e.set_defaults(func=_cmd_eval)

    g = sub.add_parser("scenes", help="write the Fashion-MNIST scenes benchmark (ADE20K and COCO layouts)")
    from training.dense.cli import add_scenes_arguments

    add_scenes_arguments(g, out_flag=True)
    g.set_defaults(func=_cmd_scenes)

    for task, what in (
        ("segment", "semantic segmentation (UperNet + FCN aux, or linear)"),
        ("detect", "detection + instance masks (Mask R-CNN on an FPN)"),
    ):
        d = sub.add_parser(task, help=f"train and evaluate a {what} head on a CAE encoder")
        d.add_argument("--config", default=None, help="preset in training/configs/dense/ or a YAML file")
        d.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override, e.g. --set model.checkpoint=random:fmnist_cae --set optim.epochs=5",
        )
        d.add_argument("--output-dir", required=True)
        d.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pth")
        d.add_argument("--json", action="store_true", help="print the final metrics as one JSON object")
        d.set_defaults(func=_cmd_dense)

    s = sub.add_parser("presets", help="list pretraining and dense presets, or print one resolved")
    s.add_argument("name", nargs="?", help="a preset name or a YAML file (pretraining or dense)")
    s.set_defaults(func=_cmd_presets)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    _setup_logging()
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
