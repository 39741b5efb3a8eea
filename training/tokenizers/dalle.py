"""The one-time, restricted-unpickling conversion of OpenAI's DALL-E ``encoder.pkl`` to safetensors.

:func:`convert_openai_encoder` reads the pickle (a ``torch.save`` of the whole ``Encoder`` module object)
through ``torch.load(weights_only=True)`` and an explicit allow-list of inert stand-in classes: nothing
outside the allow-list can be constructed or called. The model itself is :mod:`training.tokenizers.dvae`
(its names are re-exported here).

Command line (one-time conversion; ``python -m export convert-tokenizer`` does the same)::

    python -m training.tokenizers.dalle /path/to/encoder.pkl /path/to/dalle_encoder.safetensors
"""

from __future__ import annotations

import _compat_pickle
import argparse
import logging
import pickle
import re
import types
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..files import save_safetensors_atomic, sha256_file
from .dvae import (  # the model lives in dvae.py; this module only converts the pickle
    SAFETENSORS_CONTENT,
    DalleWeightsError,
    UnsafePickleError,
    build_encoder,
    read_safetensors,
)

logger = logging.getLogger(__name__)

__all__ = ["convert_openai_encoder", "load_encoder_state_dict", "main"]


class _PickledModuleStandIn:
    """Inert record of a pickled module object: the pickle may create it and set its state, nothing else.

    It has no ``__init__``/``__call__``/``forward``; ``__setstate__`` only stores the state dict. Subclasses
    are made per allowed name and per load by :func:`_make_stand_ins`.
    """

    pickled_name: str = "?"
    # Read by torch's legacy loader when a saved class source differs from the current one; never dump
    # patches.
    dump_patches: bool = False

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(
                f"unexpected pickled state of type {type(state).__name__} for {self.pickled_name}"
            )
        object.__setattr__(self, "_pickled_state", state)

    @property
    def pickled_state(self) -> dict[Any, Any]:
        return self.__dict__.get("_pickled_state", {})

    def __repr__(self) -> str:
        return f"<stand-in for {self.pickled_name}>"


# Every class that OpenAI's encoder.pkl references (it is a torch.save of the whole dall_e Encoder module).
# SECURITY - why this is safe: the file is never given to a plain unpickler. Every global the pickle names is
# resolved only through an explicit allow-list, never by importing anything:
#   * zip files (torch >= 1.6): torch.load(weights_only=True), whose pure-Python unpickler allows torch's own
#     vetted list (tensor rebuild functions, storages, Parameter, OrderedDict, torch.device, set, dtypes) plus
#     the names registered here, and refuses to NEWOBJ/BUILD any other type;
#   * legacy (non-zip) files: torch.load(weights_only=True) cannot read a pickled module there (the classes
#     are saved as persistent ids), so torch's legacy reader is driven with _RestrictedUnpickler, whose
#     find_class returns only _LEGACY_ALLOWED_GLOBALS plus the names registered here.
# Each module class name maps to a fresh inert stand-in (_PickledModuleStandIn subclass made per load), NOT to
# the real class: the unpickler can only create it and hand it its state dict, so no code of dall_e or of
# torch.nn runs. Anything else (os.system, builtins.eval, the real dall_e classes, ...) is refused before it
# can be called. Nothing is put into sys.modules and the real dall_e package is never imported, installed or
# not.
_ALLOWED_MODULE_NAMES: tuple[str, ...] = (
    "dall_e.encoder.Encoder",
    "dall_e.encoder.EncoderBlock",
    "dall_e.utils.Conv2d",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.pooling.MaxPool2d",
    "torch.nn.modules.linear.Identity",
)

# Non-module globals a legacy torch.save of a module uses (storage types are handled by torch's own wrapper,
# which maps any "...Storage" name to an inert StorageType). All are data constructors without side effects.
_LEGACY_ALLOWED_GLOBALS: dict[str, Any] = {
    "collections.OrderedDict": OrderedDict,
    "builtins.set": set,
    "torch.device": torch.device,
    "torch.Size": torch.Size,
    "torch._utils._rebuild_tensor": torch._utils._rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": torch._utils._rebuild_parameter_with_state,
}


def _make_stand_ins() -> dict[str, type[_PickledModuleStandIn]]:
    """Fresh stand-in classes for one load (so a hostile BUILD on a class cannot leak into a later load)."""
    return {
        name: type(
            f"_StandIn_{name.rsplit('.', 1)[1]}",
            (_PickledModuleStandIn,),
            {"pickled_name": name, "__module__": __name__},
        )
        for name in _ALLOWED_MODULE_NAMES
    }


class _RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler whose find_class resolves only the allow-list (see the SECURITY note above)."""

    allowed: dict[str, Any] = {}

    def find_class(self, module: str, name: str) -> Any:
        # Protocol-2 pickles written by Python 3 use Python 2 names (e.g. __builtin__.set); map them back as
        # the default find_class would, without importing anything.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        full_name = f"{module}.{name}"
        if full_name in self.allowed:
            return self.allowed[full_name]
        raise pickle.UnpicklingError(f"GLOBAL {full_name} was not an allowed global")


def _restricted_pickle_module(stand_ins: Mapping[str, type[_PickledModuleStandIn]]) -> types.ModuleType:
    """A ``pickle_module`` for torch.load whose Unpickler and load() are restricted to the allow-list."""
    unpickler = type(
        "_DalleRestrictedUnpickler",
        (_RestrictedUnpickler,),
        {"allowed": {**_LEGACY_ALLOWED_GLOBALS, **stand_ins}},
    )

    def load(file: Any, **kwargs: Any) -> Any:
        return unpickler(file, **kwargs).load()

    module = types.ModuleType("_dalle_restricted_pickle")
    module.Unpickler = unpickler  # type: ignore[attr-defined]
    module.load = load  # type: ignore[attr-defined]
    module.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]
    return module


_STATE_DICT_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.", "encoder.")
_MAX_DEPTH = 32


def _is_safetensors(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


_REFUSAL_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"GLOBAL (\S+) was not an allowed global", "it references {0}, which is not in the allow-list"),
    (r"unsupported GLOBAL (\S+) whose module", "it references {0}, whose module is blocked"),
    (r"Trying to call reduce for unrecognized function (.+)", "it tries to call {0}"),
    (
        r"Can only create new object for nn.Parameter or classes allowlisted via `add_safe_globals` "
        r"but got (.+)",
        "it tries to create {0}",
    ),
    (
        r"Can only build Tensor, Parameter, OrderedDict or types allowlisted via `add_safe_globals`, "
        r"but got (.+)",
        "it tries to set the state of {0}",
    ),
)


def _refusal_reason(message: str) -> str | None:
    """Why torch's weights-only unpickler refused a file, or None if the error is not a refusal."""
    for pattern, text in _REFUSAL_PATTERNS:
        m = re.search(pattern, message)
        if m:
            return text.format(m.group(1).strip().rstrip("."))
    return None


def _torch_load_restricted(path: Path) -> Any:
    """torch.load of ``path`` resolving only the allow-list (see the SECURITY note); refuses the rest."""
    if not hasattr(torch.serialization, "safe_globals"):
        raise RuntimeError("converting encoder.pkl needs torch.serialization.safe_globals (torch >= 2.6)")
    stand_ins = _make_stand_ins()
    with path.open("rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    try:
        with warnings.catch_warnings():
            # Legacy files may carry the source of the saved classes, which torch compares against the
            # stand-ins and warns about; irrelevant here since only parameters are read.
            warnings.simplefilter("ignore")
            if is_zip:
                allow = [(cls, name) for name, cls in stand_ins.items()]
                with torch.serialization.safe_globals(allow):
                    return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
            return torch.load(
                path,
                map_location="cpu",
                weights_only=False,  # safe: every global goes through _RestrictedUnpickler.find_class
                pickle_module=_restricted_pickle_module(stand_ins),
                mmap=False,
            )
    except pickle.UnpicklingError as e:
        reason = _refusal_reason(str(e))
        if reason is not None:
            raise UnsafePickleError(
                f"{path}: refused to unpickle: {reason}. "
                "Only the DALL-E encoder classes and tensor types are allowed; "
                "the file was not loaded and none of its code ran. Do not load it with a "
                "plain unpickle (torch.load(weights_only=False)) unless you trust its source."
            ) from None
        last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise DalleWeightsError(f"{path}: damaged or unknown pickle: {last}") from None
    except (
        EOFError,
        RuntimeError,
        OSError,
        ValueError,
        KeyError,
        IndexError,
        TypeError,
        AttributeError,
    ) as e:
        raise DalleWeightsError(
            f"{path}: cannot read as a torch file (damaged or truncated?): {type(e).__name__}: {e}"
        ) from e


def _module_state(obj: Any) -> dict[Any, Any]:
    if isinstance(obj, _PickledModuleStandIn):
        return obj.pickled_state
    if isinstance(obj, nn.Module):  # only if a real nn class was allow-listed elsewhere in the process
        return vars(obj)
    raise DalleWeightsError(f"unexpected object of type {type(obj).__name__} in the pickled module tree")


def _collect_state_dict(root: Any) -> dict[str, Tensor]:
    """Walk a pickled module tree (``_modules``/``_parameters``/``_buffers``) into a flat state_dict."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()

    def walk(obj: Any, prefix: str, depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise DalleWeightsError(f"pickled module tree is deeper than {_MAX_DEPTH} at {prefix!r}")
        if id(obj) in seen:
            raise DalleWeightsError(f"pickled module tree has a shared or cyclic module at {prefix!r}")
        seen.add(id(obj))
        state = _module_state(obj)
        non_persistent = state.get("_non_persistent_buffers_set") or set()
        for attr in ("_parameters", "_buffers"):
            tensors = state.get(attr) or {}
            if not isinstance(tensors, Mapping):
                raise DalleWeightsError(
                    f"{prefix or '<root>'}: {attr} is a {type(tensors).__name__}, not a dict"
                )
            for name, t in tensors.items():
                if t is None or (attr == "_buffers" and name in non_persistent):
                    continue
                if not isinstance(t, Tensor):
                    raise DalleWeightsError(f"{prefix}{name}: expected a tensor, got {type(t).__name__}")
                out[f"{prefix}{name}"] = t.detach()
        children = state.get("_modules") or {}
        if not isinstance(children, Mapping):
            raise DalleWeightsError(
                f"{prefix or '<root>'}: _modules is a {type(children).__name__}, not a dict"
            )
        for name, child in children.items():
            if child is not None:
                walk(child, f"{prefix}{name}.", depth + 1)

    walk(root, "", 0)
    return out


def _normalize_state_dict(obj: Mapping[Any, Any]) -> dict[str, Tensor]:
    """A plain state_dict (possibly wrapped in {'state_dict': ...} or with a 'module.'-style prefix)."""
    for wrapper in ("state_dict", "model", "encoder"):
        inner = obj.get(wrapper)
        if len(obj) == 1 and isinstance(inner, Mapping):
            obj = inner
            break
    if not obj or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise DalleWeightsError("expected a dict of parameter name -> tensor")
    sd: dict[str, Tensor] = {k: v.detach() for k, v in obj.items()}
    for prefix in _STATE_DICT_PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def load_encoder_state_dict(src: str | Path) -> tuple[dict[str, Tensor], str]:
    """Read Encoder weights from ``src`` without ever running a plain unpickle.

    Accepts OpenAI's ``encoder.pkl`` (the whole pickled module, zip or legacy torch format), a ``torch.save``
    of an Encoder state_dict, or a safetensors file. Returns ``(state_dict, source_format)`` where
    ``source_format`` is ``"openai-pickled-module"``, ``"state_dict"`` or ``"safetensors"``.
    """
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"DALL-E encoder weights not found: {src}")
    if src.stat().st_size == 0:
        raise DalleWeightsError(f"{src}: file is empty")
    if _is_safetensors(src):
        tensors, _ = read_safetensors(src)
        return _normalize_state_dict(tensors), "safetensors"
    obj = _torch_load_restricted(src)
    if isinstance(obj, (_PickledModuleStandIn, nn.Module)):
        name = getattr(obj, "pickled_name", type(obj).__name__)
        if name != "dall_e.encoder.Encoder":
            raise DalleWeightsError(f"{src}: pickled object is a {name}, expected dall_e.encoder.Encoder")
        try:
            return _collect_state_dict(obj), "openai-pickled-module"
        except DalleWeightsError as e:
            raise DalleWeightsError(f"{src}: {e}") from e
    if isinstance(obj, Mapping):
        try:
            return _normalize_state_dict(obj), "state_dict"
        except DalleWeightsError as e:
            raise DalleWeightsError(f"{src}: {e}") from e
    raise DalleWeightsError(
        f"{src}: unknown content of type {type(obj).__name__}; expected OpenAI's pickled dall_e Encoder "
        "(encoder.pkl) or an Encoder state_dict"
    )


def convert_openai_encoder(src: str | Path, dst: str | Path) -> dict[str, Tensor]:
    """Convert OpenAI's ``encoder.pkl`` (or an Encoder state_dict file) to safetensors, once.

    The pickle is read with ``torch.load(weights_only=True)`` and an explicit allow-list of inert stand-ins
    (see :data:`_ALLOWED_MODULE_NAMES`); a file that references anything else is refused with
    :class:`UnsafePickleError` and none of it runs. The parameters are gathered under the original key names,
    checked to load strictly into a :class:`DalleEncoder` of the inferred size, and written as float32 to
    ``dst`` with metadata ``format``, ``content``, ``source_format``, ``source_file``, ``source_sha256`` and
    the inferred config. Returns the state_dict that was written.
    """
    src, dst = Path(src), Path(dst)
    state_dict, source_format = load_encoder_state_dict(src)
    try:
        model = build_encoder(state_dict)
    except DalleWeightsError as e:
        raise DalleWeightsError(f"{src}: {e}") from e
    out = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "format": "pt",
        "content": SAFETENSORS_CONTENT,
        "source_format": source_format,
        "source_file": src.name,
        "source_sha256": sha256_file(src),
        **{k: str(v) for k, v in asdict(model.config).items()},
    }
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(out, dst, metadata)
    logger.info(
        "converted %s (%s, sha256 %s) -> %s: %d tensors, %s",
        src,
        source_format,
        metadata["source_sha256"],
        dst,
        len(out),
        model.config,
    )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.tokenizers.dalle SRC DST``: one-time conversion of encoder.pkl to safetensors."""
    parser = argparse.ArgumentParser(
        description="Convert OpenAI's DALL-E encoder.pkl (or an Encoder state_dict) to safetensors, safely."
    )
    parser.add_argument("src", type=Path, help="OpenAI encoder.pkl, or an Encoder state_dict file")
    parser.add_argument("dst", type=Path, help="output .safetensors path")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        convert_openai_encoder(args.src, args.dst)
    except (DalleWeightsError, FileNotFoundError) as e:
        logger.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
