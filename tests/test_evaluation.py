"""Evaluation protocols on a tiny CAE and a synthetic, easily separable ImageFolder dataset."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import REPO
from training import evaluation as E
from training.data import FMNIST_MEAN, IMAGENET_MEAN, EvalTransform, ImageFolderDataset, TransformedDataset
from training.evaluation import features as eval_features
from training.models import CAE, CAEConfig, save_model

RESULT_KEYS = {
    "protocol", "checkpoint", "dataset", "top1", "top5", "train_loss", "n_train", "n_test", "num_classes",
    "feature_dim", "seed", "device", "precision", "features_cached", "preprocess", "params", "seconds",
}  # fmt: skip
FAST = {
    "knn": ["k=10"],
    "linear": [
        "epochs=50",
        "batch_size=32",
        "base_lr=40",
        "warmup_epochs=5",
    ],  # tiny data: few steps, big LARS lr
    "attentive": ["epochs=10", "batch_size=32", "warmup_epochs=1", "lr=0.1", "threads=1"],
    "finetune": ["epochs=1", "batch_size=16", "log_every=2", "limit_test=15", "threads=1"],
}
N_TRAIN, N_VAL, CLASSES = 30, 15, ("blue", "green", "red")


def tiny_cae(seed: int = 0) -> CAE:
    torch.manual_seed(seed)
    cfg = CAEConfig(
        img_size=16,
        patch_size=4,
        embed_dim=32,
        depth=2,
        num_heads=2,
        decoder_embed_dim=32,
        regressor_depth=1,
        decoder_depth=1,
        decoder_num_heads=2,
        vocab_size=16,
        target="pixel",
        drop_path_rate=0.0,
    )
    return CAE(cfg).eval()


def _image(cls: int, rng: np.random.Generator) -> Image.Image:
    """20x20 noisy image dominated by one colour channel, with stripes whose orientation is the class."""
    img = rng.uniform(0, 90, size=(20, 20, 3))
    img[..., 2 - cls] += rng.uniform(110, 160)  # blue, green, red
    stripes = (np.arange(20) // 2) % 2 * 40.0
    img += stripes[None, :, None] if cls == 0 else stripes[:, None, None] if cls == 1 else 0.0
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="RGB")


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    data = root / "data"
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        for ci, name in enumerate(CLASSES):
            (data / split / name).mkdir(parents=True)
            for i in range(n):
                _image(ci, rng).save(data / split / name / f"{i:03d}.png")
    ckpt = save_model(tiny_cae(), root / "tiny.safetensors")
    return {"root": root, "data": data, "ckpt": ckpt, "cache": root / "cache"}


def _eval(assets: dict[str, Path], protocol: str, **kw: object) -> dict:
    kw.setdefault("overrides", FAST[protocol])
    kw.setdefault("cache_dir", str(assets["cache"]))
    return E.run_eval(
        str(kw.pop("checkpoint", assets["ckpt"])),
        protocol,
        dataset=f"imagefolder:{assets['data']}",
        device="cpu",
        **kw,
    )  # type: ignore[arg-type]


@pytest.mark.parametrize("protocol", E.PROTOCOLS)
def test_protocol_results(assets: dict[str, Path], protocol: str) -> None:
    r = _eval(assets, protocol)
    frozen_vectors = protocol in ("knn", "linear")
    extra = (
        {"feature"}
        | ({"baseline_pixels"} if frozen_vectors else set())
        | ({"budget_2x"} if protocol == "linear" else set())
        | ({"curve"} if protocol == "finetune" else set())
    )
    assert set(r) == RESULT_KEYS | extra
    if frozen_vectors:  # the raw-pixel baseline by the same code, on the same split
        assert r["feature"] == "cls" and r["baseline_pixels"]["feature_dim"] == 3 * 16 * 16
        assert 0.0 <= r["baseline_pixels"]["top1"] <= 100.0
    if protocol == "linear":  # twice the epochs, to show (non-)convergence
        assert r["budget_2x"]["epochs"] == 2 * r["params"]["epochs"]
        assert r["budget_2x"]["delta_top1"] == pytest.approx(r["budget_2x"]["top1"] - r["top1"])
    json.dumps(r)  # serializable
    assert r["protocol"] == protocol and r["num_classes"] == 3 and r["feature_dim"] == 32
    assert r["n_train"] == 3 * N_TRAIN and r["n_test"] == (15 if protocol == "finetune" else 3 * N_VAL)
    assert 0.0 <= r["top1"] <= r["top5"] <= 100.0 and r["top5"] == 100.0  # 3 classes: top5 is everything
    assert r["preprocess"]["crop_pct"] == 0.875 and r["preprocess"]["source"] == "imagenet-default"
    if protocol in ("knn", "linear", "attentive"):
        assert r["top1"] > 60.0, r  # chance is 33%
    if protocol == "finetune":
        assert r["features_cached"] is None and np.isfinite(r["train_loss"])
        assert r["params"]["layer_decay"] == 0.65 and r["params"]["epochs"] == 1
        assert [c["epoch"] for c in r["curve"]] == [1] and r["curve"][-1]["top1"] == r["top1"]


def test_finetune_resumes_a_cut_run_exactly(assets: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A run cut after its first epoch's checkpoint, resumed, ends where the uninterrupted one does: same
    weights, curve and numbers; the checkpoint refuses another recipe and a second run on top of it."""
    from training.evaluation import finetune as ft

    over = ["epochs=2", "batch_size=16", "log_every=2", "limit_test=15", "threads=1"]
    whole = _eval(assets, "finetune", overrides=over, output_dir=assets["root"] / "ft-whole")
    assert [c["epoch"] for c in whole["curve"]] == [1, 2] and "resumed_at_epoch" not in whole
    cut_dir = assets["root"] / "ft-cut"
    real_save = ft.atomic_torch_save

    def save_then_die(obj: object, path: Path) -> None:
        real_save(obj, path)
        raise KeyboardInterrupt  # the session ends right after the first epoch's checkpoint

    monkeypatch.setattr(ft, "atomic_torch_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _eval(assets, "finetune", overrides=over, output_dir=cut_dir)
    monkeypatch.setattr(ft, "atomic_torch_save", real_save)
    with pytest.raises(E.EvalError, match="pass --resume"):
        _eval(assets, "finetune", overrides=over, output_dir=cut_dir)
    with pytest.raises(E.EvalError, match=r"another fine-tuning run \(differs in: params.lr\)"):
        _eval(assets, "finetune", overrides=[*over, "lr=0.01"], output_dir=cut_dir, resume=True)
    resumed = _eval(assets, "finetune", overrides=over, output_dir=cut_dir, resume=True)
    assert resumed["resumed_at_epoch"] == 1
    assert resumed["curve"] == whole["curve"] and resumed["train_loss"] == whole["train_loss"]
    a = torch.load(assets["root"] / "ft-whole" / ft.FINETUNE_CHECKPOINT, weights_only=False)["model"]
    b = torch.load(cut_dir / ft.FINETUNE_CHECKPOINT, weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("result.json", "metrics.jsonl", "finetune_curve.png", "finetune_loss.png"):
        assert (cut_dir / name).stat().st_size > 0, name
    steps = [json.loads(line)["step"] for line in (cut_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # the resumed run's records follow the cut one's, none twice
    assert json.loads((cut_dir / "result.json").read_text())["top1"] == resumed["top1"]
    with pytest.raises(E.EvalError, match="needs protocol finetune"):
        _eval(assets, "knn", output_dir=cut_dir, resume=True)


def test_cache_is_reused(assets: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    cache = assets["root"] / "cache-reuse"
    first = _eval(assets, "linear", cache_dir=str(cache))
    assert first["features_cached"] is False
    # train and test of the model, and of the raw-pixel baseline
    assert len(list(cache.glob("*/cls.npy"))) == 4 and len(list(cache.glob("*/labels.npy"))) == 4

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("features should come from the cache")

    monkeypatch.setattr(eval_features, "extract_features", boom)
    again = _eval(assets, "linear", cache_dir=str(cache))
    assert again["features_cached"] is True
    assert again["top1"] == first["top1"] and again["train_loss"] == first["train_loss"]  # deterministic
    assert _eval(assets, "knn", cache_dir=str(cache))["features_cached"] is True
    with pytest.raises(AssertionError, match="from the cache"):  # tokens are a different feature kind
        _eval(assets, "attentive", cache_dir=str(cache))
    with pytest.raises(AssertionError, match="from the cache"):  # preprocessing is part of the key
        _eval(assets, "knn", cache_dir=str(cache), overrides=["crop_pct=1.0"])


def test_attentive_budget_check(assets: dict[str, Path]) -> None:
    """``budget_check=true`` retrains the attentive probe with twice the epochs and reports the move; off
    by default (it doubles the cost), where the result carries no ``budget_2x``."""
    plain = _eval(assets, "attentive", overrides=[*FAST["attentive"], "epochs=2"])
    assert "budget_2x" not in plain and plain["params"]["epochs"] == 2
    r = _eval(assets, "attentive", overrides=[*FAST["attentive"], "epochs=2", "budget_check=true"])
    assert r["budget_2x"]["epochs"] == 4 and r["top1"] == plain["top1"]  # the first probe is unchanged
    assert r["budget_2x"]["delta_top1"] == pytest.approx(r["budget_2x"]["top1"] - r["top1"])


def test_random_checkpoints(assets: dict[str, Path]) -> None:
    a, b, c = (E.resolve_backbone("random:fmnist_cae", s) for s in (0, 0, 1))
    assert a.cfg.img_size == 28 and a.cfg.depth == 6 and a.preprocess["mean"] == list(FMNIST_MEAN)
    assert a.identity == b.identity != c.identity
    sa, sb, sc = (x.model().state_dict()["encoder.cls_token"] for x in (a, b, c))
    assert torch.equal(sa, sb) and not torch.equal(sa, sc)
    assert E.resolve_backbone("random:cae_tiny_patch16_224").preprocess["mean"] == list(IMAGENET_MEAN)
    r = _eval(assets, "knn", checkpoint="random:fmnist_cae", overrides=["limit_train=30", "limit_test=15"])
    assert r["n_train"] == 30 and r["n_test"] == 15 and r["feature_dim"] == 192 and 0 <= r["top1"] <= 100
    with pytest.raises(E.EvalError, match="unknown model or preset"):
        E.resolve_backbone("random:no_such_model")


def test_preprocess_from_metadata(assets: dict[str, Path]) -> None:
    model, root = tiny_cae(), assets["root"]
    pre = {"img_size": 16, "mean": [0.1, 0.2, 0.3], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic"}
    p1 = save_model(model, root / "pre.safetensors", metadata={"preprocess": json.dumps(pre)})
    p2 = save_model(
        model,
        root / "run.safetensors",
        metadata={"run_config": json.dumps({"data": {"dataset": "fashion-mnist"}})},
    )
    assert E.resolve_backbone(str(p1)).preprocess["mean"] == [0.1, 0.2, 0.3]
    assert E.resolve_backbone(str(p2)).preprocess["mean"] == list(FMNIST_MEAN)
    b = E.resolve_backbone(str(assets["ckpt"]))
    assert b.preprocess["source"] == "imagenet-default" and b.identity.startswith(
        "weights:"
    )  # ours: weights digest
    run_dir = root / "run"
    save_model(model, run_dir / "model.safetensors")
    # a run directory resolves to its model.safetensors (safetensors headers are not byte-stable across
    # saves, so compare against that very file rather than another save of the same weights)
    assert (
        E.resolve_backbone(str(run_dir)).identity
        == E.resolve_backbone(str(run_dir / "model.safetensors")).identity
    )


def test_errors(assets: dict[str, Path]) -> None:
    with pytest.raises(E.EvalError, match="no such file"):
        E.run_eval(
            str(assets["root"] / "missing.safetensors"), "knn", dataset=f"imagefolder:{assets['data']}"
        )
    with pytest.raises(E.EvalError, match="unknown protocol"):
        E.run_eval(str(assets["ckpt"]), "svm")
    with pytest.raises(E.EvalError, match=r"unknown linear parameter 'lrr'; allowed: .*base_lr.*epochs"):
        E.run_eval(str(assets["ckpt"]), "linear", overrides=["lrr=0.1"])
    with pytest.raises(E.EvalError, match="expected int"):
        E.parse_overrides("finetune", ["epochs=two"])
    with pytest.raises(E.EvalError, match="key=value"):
        E.parse_overrides("knn", ["k"])
    with pytest.raises(E.EvalError, match="unknown dataset"):
        E.run_eval(str(assets["ckpt"]), "knn", dataset="cifar10")
    with pytest.raises(E.EvalError, match="missing"):
        E.run_eval(str(assets["ckpt"]), "knn", dataset=f"imagefolder:{assets['root']}")
    bad = assets["root"] / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(E.EvalError, match="cannot read checkpoint"):
        E.resolve_backbone(str(bad))
    assert E.parse_overrides("finetune", ["mixup=0.8", "limit_train=null"]).mixup == 0.8
    with pytest.raises(E.EvalError, match=r"reprob must be in \[0, 1\], got 1.5"):
        E.run_eval(str(assets["ckpt"]), "finetune", overrides=["reprob=1.5"])


def test_random_erasing() -> None:
    from training.evaluation.finetune import random_erase

    x = torch.zeros(2000, 3, 28, 28)
    assert random_erase(x, np.random.default_rng(0), 0.0) is x
    y = random_erase(x, np.random.default_rng(0), 0.25)
    assert y.shape == x.shape
    assert torch.equal(y, random_erase(x, np.random.default_rng(0), 0.25))  # every draw from the rng
    erased = (y != 0).any(dim=1)  # [B, H, W]
    hit = erased.flatten(1).any(dim=1)
    assert 0.21 < hit.float().mean().item() < 0.29
    for m in erased[hit][:200]:
        rows, cols = m.any(dim=1).nonzero().flatten(), m.any(dim=0).nonzero().flatten()
        box = m[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.all() and int(m.sum()) == box.numel()  # one solid rectangle
        assert 0.02 * 784 - 30 <= box.numel() <= 784 / 3 + 30  # timm's area range, rounding allowed
    noise = y[hit]
    noise = noise[noise != 0]
    assert abs(noise.mean().item()) < 0.05 and abs(noise.std().item() - 1.0) < 0.05


def test_attentive_probe_shapes() -> None:
    torch.manual_seed(0)
    probe = E.AttentiveProbe(dim=32, num_heads=2, num_classes=3)
    tokens = torch.randn(4, 17, 32)
    assert probe.query_token.shape == (1, 1, 32) and not probe.query_token.any()
    assert probe.pool(tokens).shape == (4, 32) and probe(tokens).shape == (4, 3)
    attn = probe.block.cross_attn
    assert attn.num_heads == 2 and attn.k.bias is None and attn.q_bias is not None and attn.v_bias is not None
    assert not probe.bn.affine
    probe.eval()  # running statistics: a single sample works and does not depend on the batch
    one = probe(tokens[:1])
    assert torch.allclose(one, probe(tokens)[:1], atol=1e-5)


@pytest.mark.parametrize("num_heads", [1, 2, 4])
def test_attentive_single_query_matches_cross_attention(num_heads: int) -> None:
    """The probe's single-query path (projections moved across the attention sums) computes what the
    generic cross-attention computes, values and gradients."""
    torch.manual_seed(0)
    block = E.AttentiveBlock(64, num_heads)
    for p in block.parameters():  # non-trivial LNs and biases, so that every term is exercised
        torch.nn.init.normal_(p, std=0.3)
    q, kv = torch.randn(5, 1, 64, requires_grad=True), torch.randn(5, 23, 64, requires_grad=True)
    fast = block(q, kv)
    ref = block.cross_attn(block.norm1_q(q), block.norm1_k(kv), block.norm1_v(kv))
    assert fast.shape == ref.shape == (5, 1, 64)
    assert torch.allclose(fast, ref, atol=1e-5, rtol=1e-4)
    g_fast = torch.autograd.grad(fast.square().sum(), [q, kv, *block.parameters()])
    g_ref = torch.autograd.grad(ref.square().sum(), [q, kv, *block.parameters()])
    for a, b in zip(g_fast, g_ref, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-3)


def test_finetune_layer_decay_groups() -> None:
    model = E.FinetuneClassifier(tiny_cae().encoder, num_classes=3)
    groups = E.finetune_param_groups(model, weight_decay=0.05, layer_decay=0.5)
    ids = {n: g["layer_id"] for g in groups for n in g["names"]}
    wd = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert ids["encoder.cls_token"] == 0 and ids["encoder.patch_embed.proj.weight"] == 0
    assert ids["encoder.patch_embed.proj.bias"] == 0
    assert ids["encoder.blocks.0.attn.qkv.weight"] == 1 and ids["encoder.blocks.0.gamma_1"] == 1
    assert ids["encoder.blocks.1.mlp.fc2.weight"] == 2 and ids["encoder.blocks.1.norm1.bias"] == 2
    assert ids["encoder.norm.weight"] == 3 and ids["head.weight"] == 3 and ids["head.bias"] == 3
    assert {n for n, i in ids.items() if i == 0} == {
        "encoder.cls_token", "encoder.patch_embed.proj.weight", "encoder.patch_embed.proj.bias",
    }  # fmt: skip
    assert sorted({g["layer_id"] for g in groups}) == [0, 1, 2, 3]
    for g in groups:
        assert g["lr_scale"] == pytest.approx(0.5 ** (3 - g["layer_id"]))
    assert (
        wd["encoder.cls_token"] == 0.0
        and wd["encoder.blocks.0.attn.q_bias"] == 0.0
        and wd["head.bias"] == 0.0
    )
    assert wd["encoder.blocks.0.attn.qkv.weight"] == 0.05 and wd["head.weight"] == 0.05
    assert len(ids) == sum(1 for _ in model.parameters())
    assert (
        E.layer_id_for("encoder.blocks.11.attn.proj.weight", 12) == 12
        and E.layer_id_for("head.weight", 12) == 13
    )


def test_bf16_features_close_to_fp32(assets: dict[str, Path]) -> None:
    ds = TransformedDataset(
        ImageFolderDataset(assets["data"] / "val"), EvalTransform(16, IMAGENET_MEAN, (0.2, 0.2, 0.2), 0.875)
    )
    sub = torch.utils.data.Subset(ds, list(range(0, 45, 5)))
    f32 = E.extract_features(tiny_cae(), sub, tokens=True, amp_dtype=None)
    bf16 = E.extract_features(tiny_cae(), sub, tokens=True, amp_dtype=torch.bfloat16)
    assert (
        f32["cls"].shape == (9, 32)
        and f32["tokens"].shape == (9, 17, 32)
        and f32["tokens"].dtype == np.float16
    )
    assert np.array_equal(f32["labels"], bf16["labels"])
    cos = torch.nn.functional.cosine_similarity(
        torch.from_numpy(f32["cls"]), torch.from_numpy(bf16["cls"]), dim=1
    )
    assert cos.min() > 0.995, cos
    assert np.allclose(f32["cls"], f32["tokens"][:, 0], atol=1e-2)


def test_block_tokens(assets: dict[str, Path]) -> None:
    """``token_blocks=n``: each of the last n blocks' tokens through the final norm, concatenated on
    channels, oldest first; the newest block's slice is the final-norm token grid."""
    ds = TransformedDataset(
        ImageFolderDataset(assets["data"] / "val"), EvalTransform(16, IMAGENET_MEAN, (0.2, 0.2, 0.2), 0.875)
    )
    sub = torch.utils.data.Subset(ds, list(range(0, 45, 9)))
    model = tiny_cae()
    final = E.extract_features(model, sub, tokens=True)["tokens"]
    two = E.extract_features(model, sub, tokens=True, token_blocks=2)["tokens"]
    assert final.shape == (5, 17, 32) and two.shape == (5, 17, 64)
    assert np.array_equal(two[..., 32:], final)
    assert not np.allclose(two[..., :32], final, atol=1e-2)  # the block before is another feature
    with pytest.raises(ValueError, match="token_blocks"):
        model.forward_readouts(torch.zeros(1, 3, 16, 16), ["cls"], token_blocks=model.cfg.depth + 1)


def test_attentive_block_tokens(assets: dict[str, Path]) -> None:
    """``tokens=lastN`` trains the probe on [1+Np, N*D] tokens, cached beside the final-norm grid."""
    cache = assets["root"] / "cache-block-tokens"
    r = _eval(
        assets, "attentive", overrides=[*FAST["attentive"], "epochs=2", "tokens=last2"], cache_dir=str(cache)
    )
    assert r["params"]["tokens"] == "last2" and 0 <= r["top1"] <= 100
    assert len(list(cache.glob("*/tokens-last2.npy"))) == 2 and not list(cache.glob("*/tokens.npy"))
    with pytest.raises(E.EvalError, match="tokens must be final or lastN"):
        _eval(assets, "attentive", overrides=[*FAST["attentive"], "tokens=last99"], cache_dir=str(cache))


def test_attentive_tokens_follow_the_default_readout(assets: dict[str, Path]) -> None:
    """``tokens`` unset: the blocks of the checkpoint's default readout (what /embed serves), else final."""
    from training.models.checkpoint import convert_checkpoint

    over = [*FAST["attentive"], "epochs=1", "limit_train=20", "limit_test=10"]
    plain = _eval(assets, "attentive", overrides=over)
    assert plain["params"]["tokens"] == "final"
    ckpt = assets["root"] / "readout-last2.safetensors"
    convert_checkpoint(assets["ckpt"], ckpt, readout="last2")
    r = _eval(assets, "attentive", checkpoint=ckpt, overrides=over)
    assert r["params"]["tokens"] == "last2"
    assert _eval(assets, "attentive", checkpoint=ckpt, overrides=[*over, "tokens=final"])["params"][
        "tokens"
    ] == ("final")


def test_cli_json(assets: dict[str, Path]) -> None:
    cmd = [
        sys.executable, "training/run.py", "eval", "--checkpoint", str(assets["ckpt"]), "--protocol", "knn",
        "--dataset", f"imagefolder:{assets['data']}", "--cache-dir", str(assets["root"] / "cache-cli"),
        "--set", "k=5", "--device", "cpu", "--json",
    ]  # fmt: skip
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["params"]["k"] == 5 and 0 <= result["top1"] <= 100
    bad = subprocess.run(
        cmd[:-1] + ["--set", "nope=1"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "unknown knn parameter 'nope'" in bad.stderr


@pytest.mark.parametrize(("feature", "dim"), [("mean", 32), ("cls+mean", 64), ("last2", 128), ("last1", 64)])
def test_pooled_patch_features(assets: dict[str, Path], feature: str, dim: int) -> None:
    r = _eval(assets, "knn", overrides=[*FAST["knn"], f"feature={feature}"])
    assert (
        r["params"]["feature"] == feature
        and r["feature"] == feature
        and r["feature_dim"] == dim
        and r["top1"] > 60
    )
    lin = _eval(assets, "linear", overrides=[*FAST["linear"], f"feature={feature}"])
    assert lin["feature_dim"] == dim and 0 <= lin["top1"] <= 100
    with pytest.raises(E.EvalError, match="readout of this 2-block encoder"):
        _eval(assets, "knn", overrides=["feature=last3"])
    with pytest.raises(E.EvalError, match="feature must be"):
        _eval(assets, "knn", overrides=["feature=max"])


def test_default_feature_is_the_checkpoint_readout(assets: dict[str, Path]) -> None:
    """The readout a checkpoint declares (what its bundle's /embed serves by default) is what eval
    measures."""
    path = save_model(tiny_cae(), assets["root"] / "readout.safetensors", metadata={"readout": "cls+mean"})
    r = _eval(assets, "knn", checkpoint=path)
    assert r["feature"] == "cls+mean" and r["feature_dim"] == 64
    assert _eval(assets, "knn")["feature"] == "cls"  # no declaration: the official cls token


def test_readouts_match_the_model(assets: dict[str, Path]) -> None:
    """extract_features' readouts are CAE.forward_readout's, and lastN ends with cls+mean of the last
    block."""
    model = tiny_cae()
    ds = TransformedDataset(
        ImageFolderDataset(assets["data"] / "val"), EvalTransform(16, IMAGENET_MEAN, (0.2, 0.2, 0.2))
    )
    feats = E.extract_features(
        model, torch.utils.data.Subset(ds, range(6)), readouts=["mean", "cls+mean", "last2"]
    )
    x = torch.stack([ds[i][0] for i in range(6)])
    with torch.no_grad():
        for r in ("mean", "cls+mean", "last2"):
            np.testing.assert_allclose(feats[r], model.forward_readout(x, r).numpy(), atol=1e-5)
    assert feats["last2"].shape == (6, 128)
    np.testing.assert_allclose(feats["last2"][:, 64:], feats["cls+mean"], atol=1e-5)


def test_linear_solvers(assets: dict[str, Path]) -> None:
    """lbfgs (default) converges: doubling its budget does not move it; the official LARS recipe runs too."""
    lb = _eval(assets, "linear", overrides=["max_iter=200"])
    assert lb["params"]["solver"] == "lbfgs" and lb["top1"] > 60
    assert lb["budget_2x"]["max_iter"] == 400 and abs(lb["budget_2x"]["delta_top1"]) <= 1.0
    lars = _eval(assets, "linear", overrides=[*FAST["linear"], "solver=lars"])
    assert lars["params"]["solver"] == "lars" and lars["top1"] > 60 and lars["budget_2x"]["epochs"] == 100
    with pytest.raises(E.EvalError, match="solver must be"):
        _eval(assets, "linear", overrides=["solver=sgd"])
