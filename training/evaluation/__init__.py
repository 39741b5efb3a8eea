"""Encoder evaluation: kNN, linear probe, attentive probe and full fine-tuning, one module each.

    run_eval("runs/fmnist/model.safetensors", "linear")                      # Fashion-MNIST
    run_eval("random:fmnist_cae", "knn", overrides=["k=10"])                   # the random-init baseline
    run_eval("cae_base.pth", "attentive", dataset="imagefolder:/data/in1k")   # PATH/train, PATH/val

The frozen protocols (knn, linear, attentive) extract features once and cache them on disk, keyed by the
checkpoint's weights (or the random spec and seed), the dataset, the split, the preprocessing, the
precision and the subset; later runs only train the small head. Hyper-parameters are overridable with
``key=value`` strings (``--set`` on the command line); :func:`allowed_overrides` lists them.

Differences from the official scripts, on purpose:

* linear and attentive probes train on cached features of the *evaluation* view, with no augmentation
  (the official linear probe uses RandomResizedCrop + flip at train time);
* the attentive head works (the released one raises a TypeError) and its BatchNorm uses running
  statistics at test time (the released loop uses batch statistics);
* defaults are sized for small data and a small CPU (epochs, batches), and two learning rates differ:
  linear ``base_lr`` 1.0 (official 0.1 assumes ~7000 LARS steps) and attentive ``lr`` 0.1 (official 0.4
  is for batch 8192). Every one is overridable;
* fine-tuning uses light augmentation (random crop with padding + flip; random erasing and mixup/cutmix
  off unless set: ``reprob``, ``mixup``, ``cutmix``) instead of RandAugment, random erasing 0.25 and
  mixup 0.8 / cutmix 1.0.
"""

from __future__ import annotations

from ..optim import LARS, finetune_param_groups, layer_id_for
from .attentive import AttentiveBlock, AttentiveProbe
from .backbone import Backbone, PixelFeatures, pixel_backbone, resolve_backbone
from .features import CACHE_VERSION, DEFAULT_CACHE_DIR, extract_features
from .finetune import FinetuneClassifier
from .knn import knn_classify
from .linear import LinearProbe
from .params import (
    PROTOCOLS,
    AttentiveParams,
    CommonParams,
    EvalError,
    FinetuneParams,
    KnnParams,
    LinearParams,
    allowed_overrides,
    parse_overrides,
)
from .runner import run_eval

__all__ = [
    "CACHE_VERSION",
    "DEFAULT_CACHE_DIR",
    "LARS",
    "PROTOCOLS",
    "AttentiveBlock",
    "AttentiveParams",
    "AttentiveProbe",
    "Backbone",
    "CommonParams",
    "EvalError",
    "FinetuneClassifier",
    "FinetuneParams",
    "KnnParams",
    "LinearParams",
    "LinearProbe",
    "PixelFeatures",
    "allowed_overrides",
    "extract_features",
    "finetune_param_groups",
    "knn_classify",
    "layer_id_for",
    "parse_overrides",
    "pixel_backbone",
    "resolve_backbone",
    "run_eval",
]
