"""PyTorch (optional): runs the original checkpoint when the bundle directory carries ``model.safetensors``.

Never chosen by ``auto`` and never imported unless ``backend=torch``: torch is imported inside ``load``.
The checkpoint must be the one the bundle was exported from (its sha256 is ``spec.model.source_sha256``).
It holds the encoder (and decoder) only: the dense heads (``segment``, ``detect``) exist as ONNX graphs
alone, so this backend reports them unavailable (their routes answer 501 naming why) and serves the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..bundle import Bundle
from ..bundle_format import sha256_file
from .base import Backend, BackendUnavailable, missing_modules

_logger = logging.getLogger("service")

CHECKPOINT_NAME = "model.safetensors"


class TorchBackend(Backend):
    name = "torch"
    speed_order = ("fp32", "bf16")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._model: Any = None
        self._torch: Any = None
        self._output_names: dict[str, str] = {}
        self._embed_outputs: list[str] = []

    @classmethod
    def probe(cls) -> str | None:
        return missing_modules("torch", "safetensors")

    def precisions(self, bundle: Bundle, task: str | None = None) -> list[str]:
        return ["fp32"] if (bundle.path / CHECKPOINT_NAME).is_file() else []

    def load(self, bundle: Bundle, precision: str = "fp32", tasks: Sequence[str] | None = None) -> None:
        ckpt = bundle.path / CHECKPOINT_NAME
        if not ckpt.is_file():
            raise BackendUnavailable(f"the torch backend needs {CHECKPOINT_NAME} in the bundle directory")
        if precision not in ("fp32", "bf16"):
            raise BackendUnavailable(f"the torch backend runs fp32 or bf16, not {precision}")
        expected = bundle.spec["model"]["source_sha256"]
        if sha256_file(ckpt) != expected:
            raise BackendUnavailable(
                f"{ckpt.name} is not the checkpoint this bundle was exported from (sha256)"
            )
        import torch

        from training.models import load_model

        if self.options.threads:
            torch.set_num_threads(self.options.threads)
        model = load_model(ckpt).eval()
        if model.cfg.img_size != bundle.image.size:
            raise BackendUnavailable(
                f"the checkpoint is {model.cfg.img_size}px, the bundle {bundle.image.size}px"
            )
        use_cuda = self.options.device != "cpu" and torch.cuda.is_available()
        if self.options.device == "cuda" and not use_cuda:
            raise BackendUnavailable("torch sees no CUDA GPU")
        self.device = "cuda" if use_cuda else "cpu"
        self._model, self._torch = model.to(self.device), torch
        runs = ["embed"] + (["reconstruct"] if not model.cfg.encoder_only else [])
        wanted = self.tasks_to_load(bundle, tasks)
        self.capabilities = frozenset(t for t in runs if t in wanted)
        self.unavailable = {
            t: f"the torch backend runs {CHECKPOINT_NAME}, which has no {t} head; "
            "serve with backend=onnxruntime or openvino (or auto)"
            for t in wanted
            if t not in self.capabilities
        }
        self._output_names = {t: bundle.spec["tasks"][t]["outputs"][0]["name"] for t in self.capabilities}
        self._embed_outputs = [o["name"] for o in bundle.spec["tasks"].get("embed", {}).get("outputs", [])][
            :2
        ]
        self.precision = precision
        self.task_precision = dict.fromkeys(self.capabilities, precision)

    def _run(self, task: str, inputs: dict[str, np.ndarray], every_output: bool) -> list[np.ndarray]:
        """The task's outputs in graph order: the first only, or all the checkpoint can give (embed: the
        tokens and, when the bundle's graph has them, the block readouts)."""
        if task not in self.capabilities:
            raise BackendUnavailable(self.unavailable.get(task, f"the torch backend has no task {task}"))
        torch, model = self._torch, self._model
        images = torch.from_numpy(inputs["images"]).to(self.device)
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        with (
            torch.inference_mode(),
            torch.autocast(self.device, dtype=dtype, enabled=self.precision == "bf16"),
        ):
            if task == "embed":
                blocks = every_output and len(self._embed_outputs) > 1
                outs = model.forward_embed(images) if blocks else (model.forward_features(images),)
            elif task == "reconstruct":
                outs = (model.forward_pred(images, torch.from_numpy(inputs["mask"]).to(self.device)),)
            else:
                raise BackendUnavailable(f"the torch backend has no task {task}")
        return [o.float().cpu().numpy() for o in outs]

    def infer(self, task: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self._run(task, inputs, every_output=False)[0]

    def infer_outputs(self, task: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # the multi-output heads are not in the checkpoint; embed graphs may also return block readouts
        outs = self._run(task, inputs, every_output=True)
        names = self._embed_outputs if task == "embed" and len(outs) > 1 else [self._output_names[task]]
        return dict(zip(names, outs, strict=True))

    def close(self) -> None:
        self._model = None
