"""The scenes generator's command-line options, shared by ``python -m training.dense.scenes OUT`` and
``python training/run.py scenes --out OUT`` so that both spell and default them alike. Kept free of heavy
imports: ``training/run.py`` builds its parser before it knows the command."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_scenes_arguments"]


def add_scenes_arguments(p: argparse.ArgumentParser, out_flag: bool = False) -> None:
    """Add the generator's options to ``p``; ``out_flag``: the output directory as ``--out`` (run.py)
    rather than positional. The preset name is checked by the generator (one list of presets)."""
    if out_flag:
        p.add_argument("--out", type=Path, required=True, help="output directory")
    else:
        p.add_argument("out", type=Path, help="output directory")
    p.add_argument("--train", type=int, default=4000, help="training scenes (from the train split only)")
    p.add_argument("--test", type=int, default=1000, help="validation scenes (from the test split only)")
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help="fixed square canvas side in pixels (default: 64 for v1, the preset's range otherwise)",
    )
    p.add_argument("--min-objects", type=int, default=None, help="default: the preset's (v1: 2)")
    p.add_argument("--max-objects", type=int, default=None, help="default: the preset's (v1: 4)")
    p.add_argument(
        "--preset", default="v1", help="v1: the original black 64-px scenes; v2: varied; shifted: outside v2"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--fmnist-root", type=Path, default=None,
        help="folder with the Fashion-MNIST idx files (default: /usr/share/datasets/fashion-mnist)",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing ade/, coco/ and scenes.json")
