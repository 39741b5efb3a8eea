"""Entry point: ``python training/run.py {pretrain,eval,presets} ...``.

    python training/run.py pretrain --config fmnist_cae_small --output-dir runs/fmnist
    python training/run.py pretrain --config cae_base_800e --set data.dataset=imagefolder:/data/in1k \\
        --set data.tokenizer_weights=dalle_encoder.safetensors --output-dir runs/base800   # under torchrun
    python training/run.py eval --checkpoint runs/fmnist/model.safetensors --protocol linear \\
        --dataset fashion-mnist --json
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
        format=f"%(asctime)s %(levelname)s [rank{rank}] %(name)s: %(message)s" if "RANK" in os.environ
        else "%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from training.config import ConfigError, load_config
    from training.engine import pretrain

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


def _cmd_presets(args: argparse.Namespace) -> int:
    from training.config import list_presets, load_config

    if args.name:
        sys.stdout.write(load_config(args.name).to_yaml())
    else:
        sys.stdout.write("\n".join(list_presets()) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python training/run.py", description="CAE pretraining and evaluation")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("pretrain", help="pretrain a CAE (one process, or many under torchrun)")
    t.add_argument("--config", required=True, help="preset name (see `presets`) or a YAML file")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=1e-3 --set model.overrides.depth=6")
    t.add_argument("--output-dir", required=True, help="run directory (checkpoints, metrics, PNGs, model)")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    t.set_defaults(func=_cmd_pretrain)

    e = sub.add_parser("eval", help="evaluate an encoder: kNN, linear, attentive probe or fine-tuning")
    e.add_argument("--checkpoint", required=True, help="our .safetensors, an official/mmpretrain .pth, or 'random:NAME'")
    e.add_argument("--protocol", required=True, choices=["knn", "linear", "attentive", "finetune"])
    e.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist | imagefolder:PATH (PATH/train, PATH/val)")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="protocol hyper-parameters")
    e.add_argument("--cache-dir", default=None, help="frozen-feature cache (default: ~/.cache/cae-service/features)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default="auto")
    e.add_argument("--json", action="store_true", help="print one JSON object with the metrics (incl. top1)")
    e.set_defaults(func=_cmd_eval)

    s = sub.add_parser("presets", help="list presets, or print one resolved")
    s.add_argument("name", nargs="?")
    s.set_defaults(func=_cmd_presets)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    _setup_logging()
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
