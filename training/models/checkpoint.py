"""Checkpoints: our ``.safetensors`` format, and import of official and mmpretrain CAE checkpoints.

Our format is one safetensors file: the model's state_dict plus metadata ``format = "cae-service"``,
``format_version``, ``config`` (the :class:`CAEConfig` as JSON) and free-form provenance.

Foreign checkpoints are read with ``torch.load(weights_only=True)`` and an explicit allow-list
(``argparse.Namespace`` for the official ``args``, and numpy's array reconstruction for mmengine
``meta``): nothing else in the pickle can be constructed. Every dimension, depth and option is inferred
from tensor shapes; only head counts, which shapes cannot show, come from the saved ``args`` or the
official size table (and can be given explicitly).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..files import save_safetensors_atomic, sha256_file
from .cae import CAE, CAEConfig
from .registry import official_num_heads

__all__ = [
    "CheckpointError",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "convert_checkpoint",
    "load_model",
    "load_state_dict_any",
    "read_foreign_checkpoint",
    "read_metadata",
    "save_model",
    "safe_globals",
]

_logger = logging.getLogger(__name__)

FORMAT_NAME = "cae-service"
FORMAT_VERSION = "1"
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_PICKLE_PREFIX = b"\x80"  # torch's legacy (non-zip) format starts with a pickle protocol opcode


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, or not one we know how to read. The message says which."""


# ---------------------------------------------------------------------------------------------- ours
def save_model(model: CAE, path: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``model`` to ``path`` in our safetensors format (atomically: temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(model.cfg.to_dict(), sort_keys=True),
        **{str(k): str(v) for k, v in (metadata or {}).items()},
    }
    save_safetensors_atomic(state, path, meta)
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of one of our safetensors files ({} for foreign files)."""
    path = Path(path)
    if sniff_format(path) != "safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        return dict(f.metadata() or {})


def _load_ours(path: Path, overrides: Mapping[str, Any]) -> CAE:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT_NAME:
                raise CheckpointError(
                    f"{path}: a safetensors file without our metadata (format={meta.get('format')!r}); "
                    "convert it with `python -m export convert SRC DST.safetensors`"
                )
            if meta.get("format_version") != FORMAT_VERSION:
                raise CheckpointError(
                    f"{path}: format_version {meta.get('format_version')!r}, "
                    f"this code reads {FORMAT_VERSION!r}"
                )
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    except SafetensorError as e:
        raise CheckpointError(f"{path}: damaged safetensors file ({e})") from e
    try:
        cfg_dict = json.loads(meta["config"])
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: missing or unreadable model config in the metadata ({e})") from e
    cfg = CAEConfig.from_dict({**cfg_dict, **overrides})
    model = CAE(cfg)
    _load_strict(model, state, str(path))
    return model


# ---------------------------------------------------------------------------------------------- foreign
def safe_globals() -> list[Any]:
    """The allow-list for ``torch.load(weights_only=True)``: plain data containers only."""
    import numpy as np

    allowed: list[Any] = [argparse.Namespace]
    # mmengine checkpoints keep numpy scalars/arrays in ``meta``/``message_hub``.
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar  # type: ignore[no-redef]
    allowed += [_reconstruct, scalar, np.ndarray, np.dtype]
    allowed += [
        type(np.dtype(t)) for t in ("float64", "float32", "float16", "int64", "int32", "bool", "uint8")
    ]
    return allowed


def read_foreign_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a ``.pth`` checkpoint without executing arbitrary pickled code."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(safe_globals()):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for damaged or hostile files
        msg = str(e).split("\n")[0][:300]
        if "Unsupported global" in str(e) or "weights_only" in str(e):
            raise CheckpointError(
                f"{path}: refused to load: the file pickles an object outside the allow-list ({msg}). "
                "Only tensors, containers, argparse.Namespace and numpy arrays are accepted."
            ) from e
        raise CheckpointError(
            f"{path}: damaged or unreadable torch checkpoint ({type(e).__name__}: {msg})"
        ) from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    return dict(obj)


def _find_state_dict(ckpt: Mapping[str, Any]) -> dict[str, Tensor]:
    for key in ("model", "module", "state_dict", "model_state"):
        if key in ckpt and isinstance(ckpt[key], Mapping):
            sd = ckpt[key]
            break
    else:
        sd = ckpt
    tensors = {k: v for k, v in sd.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(
            "no tensors found (looked under 'model', 'module', 'state_dict' and the top level)"
        )
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


_MMPRE_BLOCK = [
    (r"ln1\.", "norm1."),
    (r"ln2\.", "norm2."),
    (r"ffn\.layers\.0\.0\.", "mlp.fc1."),
    (r"ffn\.layers\.1\.", "mlp.fc2."),
]
_MMPRE_REGRESSOR = [
    (r"norm1_q_cross\.", "norm1_q."),
    (r"norm1_k_cross\.", "norm1_k."),
    (r"norm1_v_cross\.", "norm1_v."),
    (r"ffn\.layers\.0\.0\.", "mlp_cross.fc1."),
    (r"ffn\.layers\.1\.", "mlp_cross.fc2."),
]
_MMPRE_IGNORED = ("teacher.", "target_generator.", "data_preprocessor.")


def _sub_all(s: str, rules: list[tuple[str, str]]) -> str:
    for pat, rep in rules:
        s = re.sub(pat, rep, s)
    return s


def _from_mmpretrain(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """mmpretrain CAE (``backbone.*``, ``neck.*``; teacher and target generator dropped) -> official names."""
    out: dict[str, Tensor] = {}
    unknown = []
    for k, v in sd.items():
        if k.startswith(_MMPRE_IGNORED):
            continue
        if k.startswith("backbone."):
            r = k[len("backbone.") :]
            if r.startswith("patch_embed.projection."):
                r = r.replace("patch_embed.projection.", "patch_embed.proj.")
            elif r.startswith("layers."):
                r = "blocks." + _sub_all(r[len("layers.") :], _MMPRE_BLOCK)
            elif r.startswith("ln1."):  # final norm (final_norm=True)
                r = "norm." + r[len("ln1.") :]
            elif r.startswith("ln2."):  # post-pool norm of a fine-tuned BEiTViT (avg_featmap)
                r = "norm." + r[len("ln2.") :]
            elif r.startswith("rel_pos_bias."):
                unknown.append(k)
                continue
            out["encoder." + r] = v
        elif k.startswith("neck."):
            r = k[len("neck.") :]
            if r.startswith("regressors."):
                r = "regresser.regressor_blocks." + _sub_all(r[len("regressors.") :], _MMPRE_REGRESSOR)
            elif r.startswith("decoders."):
                r = "decoder.decoder_blocks." + _sub_all(r[len("decoders.") :], _MMPRE_BLOCK)
            elif r.startswith("norm_regressor."):
                r = "regresser.norm." + r[len("norm_regressor.") :]
            elif r.startswith("norm_decoder."):
                r = "decoder.norm." + r[len("norm_decoder.") :]
            elif r.startswith("head."):
                r = "decoder." + r
            elif r == "mask_token":
                pass
            else:
                unknown.append(k)
                continue
            out[r] = v
        elif k.startswith("head."):
            out[k] = v  # a fine-tuned classifier head; dropped later with a log line
        else:
            unknown.append(k)
    if unknown:
        raise CheckpointError(f"mmpretrain checkpoint has keys this converter does not know: {unknown[:8]}")
    return out


def _from_encoder_only(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official fine-tuned / linear-probe ViT keys -> ``encoder.*``."""
    out: dict[str, Tensor] = {}
    has_fc_norm = any(k.startswith("fc_norm.") for k in sd)
    for k, v in sd.items():
        if k.endswith("relative_position_index"):
            continue  # rebuilt from the grid
        if k.startswith("fc_norm."):
            # Fine-tuning loads the pretrained final norm into fc_norm and pools before it.
            out["encoder.norm." + k[len("fc_norm.") :]] = v
        elif k.startswith("norm.") and has_fc_norm:
            continue
        elif k.startswith("rel_pos_bias."):
            raise CheckpointError(
                "shared relative position bias (rel_pos_bias.*) is not supported; BEiT-style"
            )
        else:
            out["encoder." + k] = v
    return out


def _detect_flavour(sd: Mapping[str, Tensor]) -> str:
    keys = list(sd)
    if any(k.startswith("backbone.") for k in keys) or any(k.startswith("neck.") for k in keys):
        return "mmpretrain"
    if any(k.startswith("encoder.blocks.") for k in keys):
        return "official"
    if any(k.startswith("blocks.") for k in keys) and "patch_embed.proj.weight" in sd:
        return "encoder_only"
    raise CheckpointError(
        "not a CAE checkpoint: expected official keys (encoder.blocks.*), "
        "mmpretrain keys (backbone.*/neck.*) "
        f"or an encoder-only ViT (blocks.*, patch_embed.proj.weight); first keys: {keys[:5]}"
    )


def _count(sd: Mapping[str, Tensor], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = {int(m.group(1)) for k in sd if (m := pat.match(k))}
    if idx and idx != set(range(len(idx))):
        raise CheckpointError(f"non-contiguous block indices under {prefix}: {sorted(idx)}")
    return len(idx)


def _heads_for_width(width: int, attn_width: int, candidates: list[tuple[int | None, str]], what: str) -> int:
    """The first candidate head count consistent with the attention width ``heads * (width // heads)``.

    Candidates are (heads, where it came from); a guess (anything not explicit or official) is logged.
    """
    tried = list(candidates) + [
        (width // hd, f"head_dim {hd} guess") for hd in (64, 32, 16, 8) if width % hd == 0
    ]
    for h, source in tried:
        if h and h > 0 and width // h > 0 and h * (width // h) == attn_width:
            if "guess" in source or "args.decoder_num_heads" in source:
                _logger.warning(
                    "%s heads are not recorded in the checkpoint; using %d (%s). Pass num_heads=/"
                    "decoder_num_heads= (--num-heads/--decoder-num-heads) if that is wrong.",
                    what,
                    h,
                    source,
                )
            return h
    raise CheckpointError(
        f"cannot infer the number of {what} heads for width {width} (attention width {attn_width})"
    )


def cfg_has_decoder_gamma(sd: Mapping[str, Tensor]) -> bool:
    return "decoder.decoder_blocks.0.gamma_1" in sd or not any(
        k.startswith("decoder.decoder_blocks.") for k in sd
    )


def infer_config(
    sd: Mapping[str, Tensor],
    args: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> CAEConfig:
    """Build a :class:`CAEConfig` from official-named tensors; ``args`` is the saved Namespace, if any."""
    args = dict(args or {})
    overrides = dict(overrides or {})
    need = [
        "encoder.patch_embed.proj.weight",
        "encoder.blocks.0.attn.qkv.weight",
        "encoder.blocks.0.mlp.fc1.weight",
    ]
    missing = [k for k in need if k not in sd]
    if missing:
        raise CheckpointError(f"checkpoint lacks required encoder tensors: {missing}")
    proj_w = sd["encoder.patch_embed.proj.weight"]
    d, in_chans, patch = proj_w.shape[0], proj_w.shape[1], proj_w.shape[-1]
    if "encoder.pos_embed" in sd:
        n = sd["encoder.pos_embed"].shape[1] - 1
    elif "input_size" in args:
        n = (int(args["input_size"]) // patch) ** 2
    else:
        n = (224 // patch) ** 2
    grid = math.isqrt(n)
    if grid * grid != n:
        raise CheckpointError(f"position table with {n} patches is not a square grid")
    depth = _count(sd, "encoder.blocks.")
    hidden = sd["encoder.blocks.0.mlp.fc1.weight"].shape[0]
    attn_w = sd["encoder.blocks.0.attn.qkv.weight"].shape[0] // 3
    name = str(args.get("model", "")) or None
    is_official_name = (
        bool(name)
        and official_num_heads(d, name) is not None
        and name.startswith(("cae_tiny_", "cae_small_", "cae_base_", "cae_large_"))
    )
    # Heads are invisible in shapes. Official registered sizes have fixed heads (12; 16 for large);
    # custom builders (like the fixture's) pass one count to both encoder and decoder, saved as
    # args.decoder_num_heads.
    dec_heads_arg = args.get("decoder_num_heads")
    enc_candidates = [(overrides.pop("num_heads", None), "given"), (args.get("num_heads"), "args.num_heads")]
    if is_official_name:
        enc_candidates.append((official_num_heads(d, name), f"official {name}"))
    else:
        enc_candidates += [
            (dec_heads_arg, "args.decoder_num_heads, as custom builders pass one count to both"),
            (official_num_heads(d, None), f"official size of width {d}, a guess"),
        ]
    num_heads = _heads_for_width(d, attn_w, enc_candidates, "encoder")
    if attn_w != d and num_heads * (d // num_heads) != attn_w:
        raise CheckpointError(f"unsupported encoder attention width {attn_w} for D={d}")

    cfg: dict[str, Any] = dict(
        img_size=grid * patch,
        patch_size=patch,
        in_chans=in_chans,
        embed_dim=d,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=hidden / d,
        mlp_hidden_dim=hidden if int(d * (hidden / d)) != hidden else None,
        qkv_bias="encoder.blocks.0.attn.q_bias" in sd,
        init_values=float(args.get("layer_scale_init_value") or 0.1)
        if "encoder.blocks.0.gamma_1" in sd
        else 0.0,
        drop_path_rate=float(args.get("drop_path", 0.1)),
        use_rel_pos_bias="encoder.blocks.0.attn.relative_position_bias_table" in sd,
    )
    if "regresser.norm.weight" not in sd:
        cfg["encoder_only"] = True
        if "decoder_embed_dim" in overrides or any(k.startswith("decoder.") for k in sd):
            raise CheckpointError(
                "checkpoint has a decoder but no regressor (regresser.*): damaged or partial"
            )
    else:
        dd = sd["regresser.norm.weight"].shape[0]
        dec_attn_w = sd["regresser.regressor_blocks.0.cross_attn.q.weight"].shape[0]
        dec_candidates = [(overrides.pop("decoder_num_heads", None), "given")]
        if is_official_name:  # the official model ignores --decoder_num_heads: always 12
            dec_candidates.append((12, "official constructor default"))
        else:
            dec_candidates += [(dec_heads_arg, "args"), (12, "official constructor default, a guess")]
        dec_heads = _heads_for_width(dd, dec_attn_w, dec_candidates, "regressor/decoder")
        dec_hidden = sd["regresser.regressor_blocks.0.mlp_cross.fc1.weight"].shape[0]
        head_w = sd.get("decoder.head.weight")
        if head_w is None:
            raise CheckpointError("checkpoint lacks decoder.head.weight")
        cfg.update(
            decoder_embed_dim=dd,
            regressor_depth=_count(sd, "regresser.regressor_blocks."),
            decoder_depth=_count(sd, "decoder.decoder_blocks."),
            decoder_num_heads=dec_heads,
            decoder_mlp_ratio=dec_hidden / dd,
            decoder_mlp_hidden_dim=dec_hidden if int(dd * (dec_hidden / dd)) != dec_hidden else None,
            use_projection="encoder_to_regresser.weight" in sd,
            # official decoder blocks have no gammas when their init is 0 (regressor gammas always exist)
            decoder_layer_scale_init_value=0.1 if cfg_has_decoder_gamma(sd) else 0.0,
            vocab_size=head_w.shape[0],
            target="dalle",
            align_loss_weight=float(args.get("align_loss_weight", 2.0)),
        )
    cfg.update(overrides)
    try:
        return CAEConfig.from_dict(cfg)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"inferred an invalid config: {e}") from e


def _load_strict(model: CAE, sd: Mapping[str, Tensor], source: str) -> None:
    """Strict load, except that fixed sin-cos tables absent from ``sd`` keep their rebuilt values."""
    own = model.state_dict()
    sd = dict(sd)
    for k in ("rd_pos_embed", "encoder.pos_embed"):
        if k not in sd and k in own:
            sd[k] = own[k]
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: keys do not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    bad = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in own if sd[k].shape != own[k].shape]
    if bad:
        raise CheckpointError(f"{source}: shape mismatch (key, file, model): {bad[:5]}")
    for k in ("rd_pos_embed", "encoder.pos_embed"):
        if k in own and not torch.allclose(sd[k].float(), own[k].float(), atol=1e-4):
            _logger.warning("%s: %s differs from the 2-D sin-cos table; using the stored one", source, k)
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)


def load_state_dict_any(
    path: str | Path, **overrides: Any
) -> tuple[CAEConfig, dict[str, Tensor], dict[str, Any]]:
    """Read an official, mmpretrain or encoder-only ``.pth`` and return (config, official-named state
    dict without duplicates, info)."""
    ckpt = read_foreign_checkpoint(path)
    try:
        return _interpret(ckpt, overrides)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e


def _interpret(
    ckpt: Mapping[str, Any], overrides: Mapping[str, Any]
) -> tuple[CAEConfig, dict[str, Tensor], dict[str, Any]]:
    if ckpt.get("format") == "cae-service-train" and isinstance(ckpt.get("model_config"), Mapping):
        # our own training checkpoint: the exact config is stored, nothing to infer
        cfg = CAEConfig.from_dict({**ckpt["model_config"], **overrides})
        info = {
            "flavour": "ours-train",
            "dropped_alignment_keys": 0,
            "args_model": None,
            "epoch": ckpt.get("epoch"),
        }
        return cfg, dict(ckpt["model"]), info
    sd = _find_state_dict(ckpt)
    flavour = _detect_flavour(sd)
    args = ckpt.get("args")
    args_d = (
        vars(args)
        if isinstance(args, argparse.Namespace)
        else dict(args)
        if isinstance(args, Mapping)
        else {}
    )
    if flavour == "mmpretrain":
        sd = _from_mmpretrain(sd)
    elif flavour == "encoder_only":
        sd = _from_encoder_only(sd)
    # The alignment encoder duplicates the encoder (momentum 0, aliased storage): drop it.
    dropped = [k for k in sd if k.startswith(("alignment_encoder.", "teacher."))]
    head = [k for k in sd if k.startswith("encoder.head.")]
    sd = {
        k: v for k, v in sd.items() if not k.startswith(("alignment_encoder.", "teacher.", "encoder.head."))
    }
    if head:
        _logger.info("dropped a fine-tuned classifier head (%s)", ", ".join(head))
    cfg = infer_config(sd, args_d, overrides)
    info = {
        "flavour": flavour,
        "dropped_alignment_keys": len(dropped),
        "args_model": args_d.get("model"),
        "epoch": ckpt.get("epoch"),
    }
    return cfg, sd, info


def sniff_format(path: Path) -> str:
    """What a checkpoint file is, from its first bytes: "safetensors" or "torch" (zip or legacy pickle)."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: empty file")
    with open(path, "rb") as f:
        head = f.read(16)
    # safetensors first: its first byte is the low byte of the header length, which can be 0x80 and
    # would otherwise pass for a pickle protocol opcode
    if len(head) >= 9:
        n = int.from_bytes(head[:8], "little")
        if 0 < n < size and head[8:9] == b"{":
            return "safetensors"
    if head.startswith(_ZIP_MAGIC) or (
        head.startswith(_LEGACY_PICKLE_PREFIX) and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    ):
        return "torch"
    raise CheckpointError(f"{path}: unknown file type (neither safetensors nor a torch checkpoint)")


def load_model(path: str | Path, device: str | torch.device = "cpu", **overrides: Any) -> CAE:
    """Load any CAE checkpoint we know: ours (``.safetensors``), the official release (pretraining,
    encoder-only or fine-tuned ``.pth``) or mmpretrain. Returns the model in eval mode.

    ``overrides`` set config fields (for example ``num_heads`` when a foreign file cannot tell it).
    """
    path = Path(path)
    kind = sniff_format(path)
    if kind == "safetensors":
        model = _load_ours(path, overrides)
    else:
        cfg, sd, info = load_state_dict_any(path, **overrides)
        cfg.extra = {**cfg.extra, "source": path.name, "source_flavour": info["flavour"]}
        model = CAE(cfg)
        _load_strict(model, sd, str(path))
        _logger.info("loaded %s checkpoint %s (%s)", info["flavour"], path, model.extra_repr())
    return model.to(device).eval()


CARRIED_METADATA = ("preprocess", "run_config", "epoch", "readout")


def convert_checkpoint(src: str | Path, dst: str | Path, readout: str | None = None, **overrides: Any) -> CAE:
    """Convert any checkpoint :func:`load_model` reads into our safetensors format. Our own files keep
    their preprocessing, run config and readout; ``readout`` sets the default readout (what evaluation
    measures and ``/embed`` serves by default, e.g. ``cls`` or ``last4``)."""
    from .cae import parse_readout

    src, dst = Path(src), Path(dst)
    if dst.suffix != ".safetensors":
        raise CheckpointError(f"destination must end in .safetensors, got {dst.name}")
    model = load_model(src, **overrides)
    meta = {k: v for k, v in read_metadata(src).items() if k in CARRIED_METADATA}
    if readout is not None:
        try:
            parse_readout(readout, model.cfg.depth)
        except ValueError as e:
            raise CheckpointError(str(e)) from e
        meta["readout"] = readout
    save_model(model, dst, metadata={**meta, "source_file": src.name, "source_sha256": sha256_file(src)})
    return model
