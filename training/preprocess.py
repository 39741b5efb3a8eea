"""How images must be prepared for an encoder: one typed record, written into and read from model files."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import data as D

__all__ = ["Preprocessing", "PreprocessingError"]

_logger = logging.getLogger("training")


_KNOWN = ("img_size", "mean", "std", "interpolation", "color", "dataset", "class_names", "source")


class PreprocessingError(ValueError):
    """A model file's preprocessing metadata cannot be read; the message says which entry."""


@dataclass
class Preprocessing:
    """Input size, normalization and resizing of an encoder, and where they came from.

    In a model file's header it is the JSON ``preprocess`` entry (:meth:`to_metadata`); files without one
    fall back to their training run's dataset, then to ImageNet statistics (:meth:`from_metadata`).
    """

    img_size: int
    mean: list[float]
    std: list[float]
    interpolation: str = "bicubic"
    color: str = "rgb"
    dataset: str | None = None
    class_names: list[str] | None = None
    # metadata.preprocess | metadata.run_config | preset NAME | imagenet-default
    source: str = "metadata.preprocess"
    # keys of a recorded entry this type does not interpret (the dense heads' ``scenes``), kept as they are
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_dataset(
        cls,
        dataset: str,
        img_size: int,
        mean: Any = None,
        std: Any = None,
        source: str = "imagenet-default",
    ) -> Preprocessing:
        """The statistics of a dataset spec; explicit ``mean``/``std`` win (``data.normalization_for``)."""
        m, s = D.normalization_for(dataset, mean, std)
        return cls(
            img_size=img_size,
            mean=list(m),
            std=list(s),
            dataset=dataset.split(":")[0] or None,
            class_names=list(D.FMNIST_CLASSES) if dataset.startswith("fashion-mnist") else None,
            source=source,
        )

    def to_metadata(self) -> str:
        """The ``preprocess`` header entry of a pretrained model file."""
        return json.dumps(
            {
                "img_size": self.img_size,
                "mean": list(self.mean),
                "std": list(self.std),
                "interpolation": self.interpolation,
                "color": self.color,
                "dataset": self.dataset,
                "class_names": self.class_names,
                **self.extra,
            }
        )

    def to_dict(self) -> dict[str, Any]:
        """What evaluation and the dense heads record: size, normalization, resizing and source."""
        return {
            "img_size": self.img_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "source": self.source,
            **self.extra,
        }

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], img_size: int | None = None) -> Preprocessing:
        """From a model file's header: its ``preprocess`` entry, else its ``run_config``'s dataset, else
        ImageNet statistics. ``img_size`` (the model's) wins over a recorded size, with a warning."""
        if "preprocess" in meta:
            try:
                pre = json.loads(meta["preprocess"])
                size = img_size if img_size is not None else int(pre["img_size"])
                out = cls(
                    img_size=size,
                    mean=[float(v) for v in pre["mean"]],
                    std=[float(v) for v in pre["std"]],
                    interpolation=str(pre.get("interpolation", "bicubic")),
                    color=str(pre.get("color", "rgb")),
                    dataset=pre.get("dataset"),
                    class_names=pre.get("class_names"),
                    source=str(pre.get("source", "metadata.preprocess")),
                    extra={k: v for k, v in pre.items() if k not in _KNOWN},
                )
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise PreprocessingError(f"unreadable 'preprocess' metadata in the checkpoint ({e})") from e
            if pre.get("img_size") not in (None, size):
                _logger.warning(
                    "preprocess img_size %s differs from the model's %d; using the model's",
                    pre["img_size"],
                    size,
                )
            return out
        if img_size is None:
            raise PreprocessingError("no 'preprocess' metadata and no image size to fall back on")
        if "run_config" in meta:
            try:
                data = json.loads(meta["run_config"]).get("data", {})
                return cls.for_dataset(
                    str(data.get("dataset", "")),
                    img_size,
                    data.get("mean"),
                    data.get("std"),
                    "metadata.run_config",
                )
            except (json.JSONDecodeError, AttributeError, TypeError) as e:
                raise PreprocessingError(f"unreadable 'run_config' metadata in the checkpoint ({e})") from e
        return cls.for_dataset("", img_size)
