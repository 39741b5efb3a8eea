"""kNN (k=20, T=0.07, cosine: the project's protocol) of readout variants built from cached block readouts.

Usage (after ``training/run.py eval ... --protocol knn --set feature=lastD`` has cached the ``lastD``
readout, D = the encoder depth, for both splits):

    python bench/knn_readout_sweep.py --checkpoint models/default/model.safetensors \\
        --dataset fashion-mnist-val --json docs/evals/knn-readout-sweep-val.json

Each variant is a slice or rescaling of the same [n, depth, 2, D] block readouts (each block's cls and patch
mean through the final norm), so the sweep costs one extraction: ``lastN`` (N = 1..depth), the cls or mean
parts only, each 192-d part L2-normalized before concatenation (``partnorm``), and each with the train
mean subtracted (``+center``). It answers whether a different readout of the same weights would move kNN;
it selects on whatever split it is given, so select on ``fashion-mnist-val`` and confirm on the test split.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.evaluation import DEFAULT_CACHE_DIR, resolve_backbone  # noqa: E402
from training.evaluation.common import pct, topk_correct  # noqa: E402
from training.evaluation.knn import knn_classify  # noqa: E402

_logger = logging.getLogger("bench.knn_readout_sweep")


def find_entry(cache: Path, model_identity: str, dataset: str, split: str, readout: str) -> Path:
    """The cache entry holding ``readout`` for this model, dataset and split (any preprocessing key)."""
    for meta_path in sorted(cache.glob("*/meta.json")):
        meta = json.loads(meta_path.read_text())
        if (meta.get("model"), meta.get("dataset"), meta.get("split")) == (model_identity, dataset, split):
            if (meta_path.parent / f"feat-{readout}.npy").exists():
                return meta_path.parent
    raise SystemExit(
        f"no cached {readout} features for {dataset}/{split} of this model in {cache}: run "
        f"training/run.py eval --protocol knn --set feature={readout} --dataset {dataset} first"
    )


def variants(x: np.ndarray, depth: int) -> dict[str, np.ndarray]:
    n = len(x)
    b = x.reshape(n, depth, 2, -1)
    unit = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    out: dict[str, np.ndarray] = {f"last{k}": b[:, -k:].reshape(n, -1) for k in range(1, depth + 1)}
    for k in sorted({min(4, depth), depth}):
        out[f"last{k}_partnorm"] = unit[:, -k:].reshape(n, -1)
        out[f"last{k}_cls_only"] = b[:, -k:, 0].reshape(n, -1)
        out[f"last{k}_mean_only"] = b[:, -k:, 1].reshape(n, -1)
    return out


def top1(tr: np.ndarray, ytr: np.ndarray, te: np.ndarray, yte: np.ndarray, nc: int) -> float:
    scores = knn_classify(torch.from_numpy(tr), torch.from_numpy(ytr), torch.from_numpy(te), nc)
    return pct(topk_correct(scores, torch.from_numpy(yte), ks=(1,))[0], len(yte))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="models/default/model.safetensors")
    p.add_argument("--dataset", default="fashion-mnist-val")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR))
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    backbone = resolve_backbone(args.checkpoint)
    depth = backbone.cfg.depth
    readout = f"last{depth}"
    cache = Path(args.cache_dir).expanduser()
    entries = {s: find_entry(cache, backbone.identity, args.dataset, s, readout) for s in ("train", "test")}
    x = {s: np.load(e / f"feat-{readout}.npy") for s, e in entries.items()}
    y = {s: np.load(e / "labels.npy") for s, e in entries.items()}
    nc = int(max(y["train"].max(), y["test"].max())) + 1
    vtr, vte = variants(x["train"], depth), variants(x["test"], depth)
    results: dict[str, float] = {}
    for name in vtr:
        mu = vtr[name].mean(axis=0)
        results[name] = top1(vtr[name], y["train"], vte[name], y["test"], nc)
        results[name + "+center"] = top1(vtr[name] - mu, y["train"], vte[name] - mu, y["test"], nc)
        _logger.info("%-22s %6.2f   +center %6.2f", name, results[name], results[name + "+center"])
    best = max(results, key=lambda k: results[k])
    default = backbone.readout or "cls"
    summary = {
        "checkpoint": args.checkpoint,
        "dataset": args.dataset,
        "protocol": {"k": 20, "temperature": 0.07, "metric": "cosine"},
        "default_readout": default,
        "default_top1": results.get(default),
        "best": best,
        "best_top1": results[best],
        "top1": results,
    }
    text = json.dumps(summary, indent=1)
    sys.stdout.write(text + "\n")
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
