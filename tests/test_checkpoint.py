"""Checkpoint formats: ours, official pretraining (any size), encoder-only, mmpretrain; hostile files."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO, perturbed, random_mask, tiny_overrides
from training.models import CAE, CAEConfig, CheckpointError, load_model, save_model
from training.models.checkpoint import convert_checkpoint


def to_official(model: CAE) -> dict[str, torch.Tensor]:
    """Our state_dict laid out as the official code saves it (with the alignment encoder duplicate)."""
    sd = dict(model.state_dict())
    for k in list(sd):
        if k.startswith("encoder."):
            sd["alignment_encoder." + k[len("encoder.") :]] = sd[k]
    return sd


def official_ckpt(model: CAE, path, model_name: str = "cae_custom_8k_vocab", **args) -> None:
    ns = argparse.Namespace(
        model=model_name,
        model_type="cae",
        decoder_num_heads=model.cfg.decoder_num_heads,
        regressor_depth=model.cfg.regressor_depth,
        decoder_depth=model.cfg.decoder_depth,
        decoder_embed_dim=model.cfg.decoder_embed_dim,
        layer_scale_init_value=model.cfg.init_values,
        **args,
    )
    torch.save({"model": to_official(model), "optimizer": {}, "epoch": 3, "scaler": {}, "args": ns}, path)


def assert_same_outputs(a: CAE, b: CAE, pretext: bool = True) -> None:
    cfg = a.cfg
    torch.manual_seed(1)
    images = torch.randn(2, cfg.in_chans, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        assert torch.allclose(a.forward_features(images), b.forward_features(images), atol=1e-6)
        if pretext:
            mask = random_mask(2, cfg.num_patches, cfg.num_patches // 2)
            oa, ob = a(images, mask), b(images, mask)
            for k in ("latent_visible", "latent_pred", "latent_target", "pred"):
                assert torch.allclose(getattr(oa, k), getattr(ob, k), atol=1e-5), k


def test_ours_roundtrip(tmp_path):
    model = perturbed(CAEConfig(**tiny_overrides(target="pixel")))
    path = save_model(model, tmp_path / "m.safetensors", metadata={"note": "x"})
    loaded = load_model(path)
    assert loaded.cfg == model.cfg and not loaded.training
    assert_same_outputs(model, loaded)
    assert not (tmp_path / "m.safetensors.tmp").exists()


OFFICIAL_VARIANTS = {
    "fixture-like": dict(embed_dim=96, num_heads=3, decoder_embed_dim=96, decoder_num_heads=3),
    "projection": dict(embed_dim=64, num_heads=4, decoder_embed_dim=48, decoder_num_heads=12),
    "dd-1020-attn": dict(embed_dim=64, num_heads=4, decoder_embed_dim=128, decoder_num_heads=12),
    "no-layer-scale": dict(init_values=0.0, depth=3, regressor_depth=1, decoder_depth=3),
    "patch16-grid3": dict(img_size=48, patch_size=16, mlp_ratio=2.0, decoder_mlp_ratio=3.0),
}


@pytest.mark.parametrize("variant", list(OFFICIAL_VARIANTS))
def test_official_checkpoint_any_size(tmp_path, variant):
    model = perturbed(CAEConfig(**tiny_overrides(**OFFICIAL_VARIANTS[variant])))
    path = tmp_path / "official.pth"
    official_ckpt(model, path)
    # heads are invisible in shapes: custom builders with different encoder/decoder heads must say so
    heads = {} if model.cfg.num_heads == model.cfg.decoder_num_heads else {"num_heads": model.cfg.num_heads}
    loaded = load_model(path, **heads)
    for field in (
        "img_size",
        "patch_size",
        "embed_dim",
        "depth",
        "num_heads",
        "decoder_embed_dim",
        "regressor_depth",
        "decoder_depth",
        "decoder_num_heads",
        "vocab_size",
        "has_projection",
    ):
        assert getattr(loaded.cfg, field) == getattr(model.cfg, field), field
    assert_same_outputs(model, loaded)
    # and through the converter
    dst = tmp_path / "conv.safetensors"
    convert_checkpoint(path, dst, **heads)
    assert_same_outputs(model, load_model(dst))


def test_official_name_fixes_heads(tmp_path):
    """A released base-like checkpoint: the name decides heads (12), whatever args.decoder_num_heads says
    (the official model ignores that flag)."""
    model = perturbed(
        CAEConfig(**tiny_overrides(embed_dim=96, num_heads=12, decoder_embed_dim=96, decoder_num_heads=12))
    )
    path = tmp_path / "base.pth"
    official_ckpt(model, path, model_name="cae_base_patch16_224_8k_vocab")
    ck = torch.load(path, weights_only=False)
    ck["args"].decoder_num_heads = 16
    torch.save(ck, path)
    loaded = load_model(path)
    assert (loaded.cfg.num_heads, loaded.cfg.decoder_num_heads) == (12, 12)
    assert_same_outputs(model, loaded)


def test_encoder_only_and_finetuned(tmp_path):
    model = perturbed(CAEConfig(**tiny_overrides()))
    enc = {k[len("encoder.") :]: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    torch.save({"model": enc}, tmp_path / "enc.pth")
    loaded = load_model(tmp_path / "enc.pth", num_heads=4)
    assert loaded.cfg.encoder_only
    assert_same_outputs(model, loaded, pretext=False)
    # fine-tuned layout: norm -> fc_norm, a classifier head, zero relative position tables
    ft = {("fc_norm." + k[5:] if k.startswith("norm.") else k): v for k, v in enc.items()}
    ft["head.weight"], ft["head.bias"] = torch.randn(10, 64), torch.zeros(10)
    for i in range(model.cfg.depth):
        ft[f"blocks.{i}.attn.relative_position_bias_table"] = torch.zeros((2 * 4 - 1) ** 2 + 3, 4)
    torch.save({"model": ft}, tmp_path / "ft.pth")
    fl = load_model(tmp_path / "ft.pth", num_heads=4)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(
            fl.forward_pooled(images, "mean"), model.forward_pooled(images, "mean"), atol=1e-6
        )
        # a non-zero relative bias must change the features
        fl.encoder.blocks[0].attn.relative_position_bias_table.normal_()
        assert not torch.allclose(fl.forward_features(images), model.forward_features(images), atol=1e-4)


MMPRE_BLOCK = {"norm1.": "ln1.", "norm2.": "ln2.", "mlp.fc1.": "ffn.layers.0.0.", "mlp.fc2.": "ffn.layers.1."}
MMPRE_REG = {
    "norm1_q.": "norm1_q_cross.",
    "norm1_k.": "norm1_k_cross.",
    "norm1_v.": "norm1_v_cross.",
    "mlp_cross.fc1.": "ffn.layers.0.0.",
    "mlp_cross.fc2.": "ffn.layers.1.",
}


def _rename(s: str, table: dict[str, str]) -> str:
    for a, b in table.items():
        s = s.replace(a, b)
    return s


def to_mmpretrain(model: CAE) -> dict[str, torch.Tensor]:
    """Spec §6.3, written out independently of the converter."""
    out = {}
    for k, v in model.state_dict().items():
        if k == "rd_pos_embed":
            continue
        if k.startswith("encoder."):
            r = k[len("encoder.") :]
            r = r.replace("patch_embed.proj.", "patch_embed.projection.")
            if r.startswith("blocks."):
                r = "layers." + _rename(r[len("blocks.") :], MMPRE_BLOCK)
            if r.startswith("norm."):
                r = "ln1." + r[len("norm.") :]
            out["backbone." + r] = v
            out["teacher." + r] = v
        elif k.startswith("regresser.regressor_blocks."):
            out["neck.regressors." + _rename(k[len("regresser.regressor_blocks.") :], MMPRE_REG)] = v
        elif k.startswith("regresser.norm."):
            out["neck.norm_regressor." + k[len("regresser.norm.") :]] = v
        elif k.startswith("decoder.decoder_blocks."):
            out["neck.decoders." + _rename(k[len("decoder.decoder_blocks.") :], MMPRE_BLOCK)] = v
        elif k.startswith("decoder.norm."):
            out["neck.norm_decoder." + k[len("decoder.norm.") :]] = v
        elif k.startswith("decoder.head."):
            out["neck." + k[len("decoder.") :]] = v
        elif k == "mask_token":
            out["neck.mask_token"] = v
        else:
            raise AssertionError(k)
    out["target_generator.encoder.blocks.input.w"] = torch.zeros(4, 3, 7, 7)
    return out


def test_mmpretrain_checkpoint(tmp_path):
    # mmpretrain ships CAE-base widths (arch 'b': 768, 12 heads); heads come from the width table
    model = perturbed(
        CAEConfig(**tiny_overrides(embed_dim=768, num_heads=12, decoder_embed_dim=768, decoder_num_heads=12))
    )
    import numpy as np

    meta = {"epoch": 300, "seed": np.int64(0), "hist": np.zeros(3)}
    torch.save({"meta": meta, "state_dict": to_mmpretrain(model)}, tmp_path / "mm.pth")
    loaded = load_model(tmp_path / "mm.pth")
    assert loaded.cfg.num_heads == 12
    assert_same_outputs(model, loaded)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_malicious_pickle_refused(tmp_path):
    _Evil.marker = str(tmp_path / "pwned")
    torch.save({"model": {"x": torch.zeros(1)}, "args": _Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="allow-list"):
        load_model(tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("case", ["missing", "empty", "garbage", "truncated", "not-cae", "bad-safetensors"])
def test_damaged_files(tmp_path, case):
    path = tmp_path / "x.pth"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "garbage":
        path.write_bytes(os.urandom(1000))
    elif case == "truncated":
        official_ckpt(perturbed(CAEConfig(**tiny_overrides())), path)
        path.write_bytes(path.read_bytes()[:5000])
    elif case == "not-cae":
        torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, path)
    elif case == "bad-safetensors":
        path = tmp_path / "x.safetensors"
        save_model(perturbed(CAEConfig(**tiny_overrides())), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    assert str(path) in str(e.value)


def test_convert_cli(tmp_path):
    src = tmp_path / "official.pth"
    model = perturbed(CAEConfig(**tiny_overrides()))
    official_ckpt(model, src)
    dst = tmp_path / "out.safetensors"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-m", "export", "convert", str(src), str(dst), "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr
    assert_same_outputs(model, load_model(dst))
    r = subprocess.run(
        [sys.executable, "-m", "export", "convert", str(tmp_path / "nope.pth"), str(dst)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert r.returncode == 2 and "no such file" in r.stderr


def test_sniff_safetensors_whose_header_length_starts_with_0x80(tmp_path):
    """A safetensors header length with low byte 0x80 must not be mistaken for a pickle opcode."""
    from training.models.checkpoint import sniff_format

    model = perturbed(CAEConfig(**tiny_overrides()))
    for pad in range(300):  # vary the metadata length until the header length's low byte is 0x80
        path = save_model(model, tmp_path / "m.safetensors", metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.skip("could not produce a 0x80 header length")
    assert sniff_format(path) == "safetensors"
    assert_same_outputs(model, load_model(path))
