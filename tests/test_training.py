"""Pretraining: configs, schedule, data determinism, loss goes down, exact resume, torchrun equivalence."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import REPO, TINY, random_mask, tiny_cfg, tiny_overrides, train_losses
from training.config import ConfigError, list_presets, load_config
from training.engine import lr_at, param_groups
from training.models import create_model, load_model
from training.pretrain import pretrain


# ------------------------------------------------------------------ configs
def test_presets_exist_and_resolve():
    names = list_presets()
    for n in ("cae_base_300e", "cae_base_800e", "cae_base_1600e", "cae_large_1600e", "fmnist_cae"):
        assert n in names
        load_config(n)


@pytest.mark.parametrize(
    "name,epochs,warmup",
    [
        ("cae_base_300e", 300, 10),
        ("cae_base_800e", 800, 20),
        ("cae_base_1600e", 1600, 40),
        ("cae_large_1600e", 1600, 40),
    ],
)
def test_official_recipes(name, epochs, warmup):
    c = load_config(name)
    o = c.optim
    assert (o.epochs, o.warmup_epochs, o.batch_size, o.lr, o.min_lr) == (epochs, warmup, 2048, 1.5e-3, 1e-5)
    assert (o.betas, o.weight_decay, o.clip_grad, o.decay_tokens) == ((0.9, 0.999), 0.05, 3.0, True)
    assert (c.data.mask, c.data.mask_ratio, c.data.min_mask_patches_per_block, c.data.second_size) == (
        "block",
        0.5,
        16,
        112,
    )
    assert c.model.overrides["target"] == "dalle" and c.model.overrides["drop_path_rate"] == 0.1
    assert c.data.scale == (0.08, 1.0)
    model_cfg = create_model(
        c.model.name, img_size=32, depth=1, regressor_depth=1, decoder_depth=1, **c.model.overrides
    ).cfg
    assert model_cfg.align_loss_weight == 2.0
    assert model_cfg.init_values == (1e-5 if "large" in name else 0.1)
    assert (model_cfg.embed_dim, model_cfg.decoder_embed_dim) == (
        (1024, 768) if "large" in name else (768, 768)
    )


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown keys"):
        load_config("fmnist_cae", ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="expected a number"):
        load_config("fmnist_cae", ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="no preset"):
        load_config("nope")
    with pytest.raises(ConfigError, match="key=value"):
        load_config("fmnist_cae", ["optim.lr"])
    with pytest.raises(ConfigError, match="mask_ratio"):
        load_config("fmnist_cae", ["data.mask_ratio=1.5"])


def test_lr_schedule_matches_official_cosine_scheduler():
    cfg = load_config(
        "fmnist_cae", ["optim.epochs=5", "optim.warmup_epochs=1", "optim.lr=1e-3", "optim.min_lr=1e-5"]
    )
    spe = 7
    ours = np.array([lr_at(s, cfg, spe) for s in range(5 * spe)])
    # furnace/utils.cosine_scheduler, written out
    warm = np.linspace(0, 1e-3, spe)
    iters = np.arange(5 * spe - spe)
    cos = 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + np.cos(np.pi * iters / len(iters)))
    np.testing.assert_allclose(ours, np.concatenate([warm, cos]), rtol=1e-12, atol=1e-15)


def test_param_groups_decay_tokens_like_official():
    model = create_model("cae_tiny_patch16_224", img_size=32, depth=1, regressor_depth=1, decoder_depth=1)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    dec = {names[id(p)] for p in decay["params"]}
    nod = {names[id(p)] for p in no_decay["params"]}
    assert {"encoder.cls_token", "mask_token", "encoder.blocks.0.attn.qkv.weight"} <= dec
    assert {"encoder.blocks.0.gamma_1", "encoder.blocks.0.attn.q_bias", "encoder.norm.weight"} <= nod
    assert not any("pos_embed" in n for n in dec | nod)
    _, nod2 = param_groups(model, 0.05, decay_tokens=False)
    assert "mask_token" in {names[id(p)] for p in nod2["params"]}


# ------------------------------------------------------------------ data
def test_pretrain_samples_are_seeded_by_epoch_and_index(image_folder):
    from training import data as D

    src = D.build_source(f"imagefolder:{image_folder}")
    ds = D.PretrainDataset(
        src,
        D.PretrainTransform(D.TransformConfig(img_size=16, scale=(0.3, 1.0))),
        "block",
        (4, 4),
        8,
        min_num_patches=2,
        seed=3,
    )
    a, b = ds[5], ds[5]
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["mask"], b["mask"])
    assert a["images"].shape == (3, 16, 16) and a["mask"].shape == (16,) and int(a["mask"].sum()) == 8
    ds.set_epoch(1)
    c = ds[5]
    assert not torch.equal(a["images"], c["images"]) or not torch.equal(a["mask"], c["mask"])


def test_second_view_for_tokenizer(image_folder):
    from training import data as D

    t = D.PretrainTransform(D.TransformConfig(img_size=32, second_size=16))
    img, _ = D.build_source(f"imagefolder:{image_folder}")[0]
    out = t(img, np.random.default_rng(0))
    assert out["images"].shape == (3, 32, 32) and out["tokenizer_images"].shape == (3, 16, 16)
    assert 0.0 <= float(out["tokenizer_images"].min()) and float(out["tokenizer_images"].max()) <= 1.0


def test_idx_reader_and_fashion_mnist_errors(tmp_path):
    from training import data as D

    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 0x08, 3]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape) + arr.tobytes()
    (tmp_path / "x-idx3-ubyte").write_bytes(raw)
    assert np.array_equal(D.read_idx(tmp_path / "x-idx3-ubyte"), arr)
    (tmp_path / "bad").write_bytes(raw[:-5])
    with pytest.raises(D.DataError, match="truncated"):
        D.read_idx(tmp_path / "bad")
    with pytest.raises(D.DataError, match="dataset-fashion-mnist"):
        D.FashionMNIST(tmp_path / "missing")


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").exists(), reason="dataset-fashion-mnist not installed"
)
def test_fashion_mnist_package():
    from training import data as D

    train, test = D.FashionMNIST(split="train"), D.FashionMNIST(split="test")
    assert len(train) == 60000 and len(test) == 10000
    img, label = train[0]
    assert img.size == (28, 28) and img.mode == "RGB" and 0 <= label < 10
    assert np.bincount(test.labels).tolist() == [1000] * 10


def test_webdataset_shards(tmp_path, image_folder):
    from training import data as D

    files = sorted(image_folder.rglob("*.png"))
    for s in range(2):
        with tarfile.open(tmp_path / f"shard-{s:02d}.tar", "w") as tar:
            for i, f in enumerate(files[s::2]):
                tar.add(f, arcname=f"s{s}_{i:04d}.png")
                cls = tmp_path / "cls.txt"
                cls.write_text(str(int(f.parent.name.split("_")[1])))
                tar.add(cls, arcname=f"s{s}_{i:04d}.cls")
        # a corrupt sample is skipped, not fatal
    with tarfile.open(tmp_path / "shard-02.tar", "w") as tar:
        bad = tmp_path / "bad.png"
        bad.write_bytes(b"not a png")
        tar.add(bad, arcname="bad_0000.png")
    ds = D.WebDatasetShards(str(tmp_path / "shard-{00..02}.tar"), shuffle_buffer=8, seed=0)
    items = list(ds)
    assert len(items) == len(files)
    assert {label for _, label, _ in items} == {0, 1, 2}


# ------------------------------------------------------------------ training runs
def test_pretrain_lowers_loss_and_writes_outputs(tmp_path, image_folder):
    cfg = tiny_cfg(image_folder, "optim.epochs=6", "runtime.keep_last=2")
    result = pretrain(cfg, tmp_path / "run")
    run = tmp_path / "run"
    losses = train_losses(run)
    steps = sorted(losses)
    assert len(steps) == 6 * 3  # 48 images / batch 16
    first, last = np.mean([losses[s] for s in steps[:3]]), np.mean([losses[s] for s in steps[-3:]])
    assert last < 0.85 * first, (first, last)
    for name in ("config.yaml", "loss_curve.png", "model.safetensors", "latest.json", "recon-0005.png"):
        assert (run / name).exists(), name
    assert len(list(run.glob("checkpoint-*.pth"))) == 2  # keep_last
    model = load_model(result["model"])
    assert model.cfg.embed_dim == 32 and not model.training
    ck = torch.load(sorted(run.glob("checkpoint-*.pth"))[-1], weights_only=False)
    assert ck["config"]["optim"]["epochs"] == 6  # resolved config inside the checkpoint


def test_resume_is_exact(tmp_path, image_folder):
    common = ["optim.epochs=3", "model.overrides.drop_path_rate=0.1", "runtime.save_every_steps=2"]
    full = tmp_path / "full"
    pretrain(tiny_cfg(image_folder, *common), full)
    part = tmp_path / "part"
    # interrupted mid-epoch 1 (after global step 5 of 9), then resumed from the step-4 checkpoint
    pretrain(tiny_cfg(image_folder, *common, "runtime.max_steps=5"), part)
    ck = json.loads((part / "latest.json").read_text())
    assert (ck["epoch"], ck["step_in_epoch"]) == (1, 2)
    # the step-5 record is past the checkpoint: it is dropped and recomputed on resume
    pretrain(tiny_cfg(image_folder, *common), part, resume=True)
    a, b = train_losses(full), train_losses(part)
    assert sorted(a) == sorted(b) == list(range(1, 10))
    for s in a:
        assert a[s] == b[s], (s, a[s], b[s])
    sa = load_model(full / "model.safetensors").state_dict()
    sb = load_model(part / "model.safetensors").state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path, image_folder):
    """2-process DDP (gloo, CPU) with the same global batch gives the same losses as one process."""
    args = [*TINY, f"data.dataset=imagefolder:{image_folder}", "optim.epochs=2"]
    sets = [x for a in args for x in ("--set", a)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [
            sys.executable,
            "training/run.py",
            "pretrain",
            "--config",
            "fmnist_cae",
            *sets,
            "--output-dir",
            str(tmp_path / "one"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    two = subprocess.run(
        [
            *torchrun,
            "training/run.py",
            "pretrain",
            "--config",
            "fmnist_cae",
            *sets,
            "--output-dir",
            str(tmp_path / "two"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert sorted(a) == sorted(b) and len(a) == 6
    for s in a:
        assert math.isclose(a[s], b[s], rel_tol=2e-4, abs_tol=1e-5), (s, a[s], b[s])


def test_cli_bad_config_exit_code(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "training/run.py",
            "pretrain",
            "--config",
            "fmnist_cae",
            "--set",
            "optim.lr=oops",
            "--output-dir",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "optim.lr" in r.stderr
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_pretrain_with_dalle_token_targets(tmp_path, image_folder):
    """The faithful path end to end: second view -> DALL-E encoder tokens -> CE on the masked tokens."""
    from safetensors.torch import save_file

    from training.tokenizers import DalleEncoder

    torch.manual_seed(0)
    enc = DalleEncoder(n_hid=8, vocab_size=32, n_blk_per_group=1)
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(tmp_path / "dalle.safetensors"))
    cfg = tiny_cfg(
        image_folder,
        "optim.epochs=1",
        "model.overrides.target=dalle",
        "model.overrides.vocab_size=32",
        "data.second_size=32",  # 32 px / 8 = the model's 4x4 patch grid (112 / 8 = 224 / 16 officially)
        f"data.tokenizer_weights={tmp_path / 'dalle.safetensors'}",
    )
    pretrain(cfg, tmp_path / "run")
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert train and all("mlm_acc" in r and math.isfinite(r["loss_main"]) for r in train)
    # CE over a 32-token vocabulary starts near log(32)
    assert abs(train[0]["loss_main"] - math.log(32)) < 1.5


def test_dalle_target_without_weights_is_a_clear_error(tmp_path, image_folder):
    cfg = tiny_cfg(image_folder, "model.overrides.target=dalle")
    with pytest.raises(ConfigError, match="tokenizer_weights"):
        pretrain(cfg, tmp_path / "run")


def test_checkpoint_pruning_keeps_epoch_ends(tmp_path):
    from training.checkpointing import prune_checkpoints

    names = ["0000-000100", "0000-000234", "0001-000100", "0001-000234", "0002-000100", "0002-000200"]
    for n in names:
        (tmp_path / f"checkpoint-{n}.pth").write_bytes(b"x")
    prune_checkpoints(tmp_path, steps_per_epoch=234, keep_last=2)
    left = sorted(p.stem[len("checkpoint-") :] for p in tmp_path.glob("checkpoint-*.pth"))
    assert left == ["0000-000234", "0001-000234", "0002-000200"]


def test_non_finite_loss_stops_before_any_save(tmp_path, image_folder, monkeypatch):
    """Losses are summed on the device (no per-step sync); a NaN at any step must still stop the run at the
    next log/save point, before a checkpoint with NaN weights is written."""
    from training.models.cae import CAE

    real = CAE.forward_loss
    calls = {"n": 0}

    def poisoned(self, out, target):
        res = real(self, out, target)
        calls["n"] += 1
        if calls["n"] == 2:  # step 2; the first log/save point is the epoch end (step 3)
            res = {k: v * float("nan") for k, v in res.items()}
        return res

    monkeypatch.setattr(CAE, "forward_loss", poisoned)
    cfg = tiny_cfg(image_folder, "optim.epochs=1", "runtime.log_every=4", "runtime.save_every_steps=4")
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        pretrain(cfg, tmp_path / "run")
    assert not list((tmp_path / "run").glob("checkpoint-*"))


# ------------------------------------------------------------------ instance-level extension
def test_zoom_out_shrinks_and_moves_the_object(image_folder):
    """Zoom-out pastes the crop at a fraction of the side on a canvas of the corner colour; off, the
    transform draws exactly the official random numbers."""
    from PIL import Image

    from training import data as D

    img = Image.new("RGB", (20, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))
    img.putpixel((0, 0), (0, 0, 0))  # corner colour: the canvas fill
    cfg = D.TransformConfig(
        img_size=16,
        scale=(1.0, 1.0),
        ratio=(1.0, 1.0),
        hflip=0.0,
        mean=(0, 0, 0),
        std=(1, 1, 1),
        zoom_out=(0.5, 0.5),
        zoom_out_prob=1.0,
    )
    x = D.PretrainTransform(cfg)(img, np.random.default_rng(0))["images"]
    bright = (x[0] > 0.5).nonzero()
    assert bright.shape[0] == pytest.approx(8 * 8, abs=8)  # half the side -> a quarter of the area
    assert (x[0] < 0.1).float().mean() > 0.7  # the rest is canvas
    plain = D.TransformConfig(img_size=16, mean=(0, 0, 0), std=(1, 1, 1))
    a = D.PretrainTransform(plain)(img, np.random.default_rng(3))["images"]
    b = D.PretrainTransform(
        D.TransformConfig(img_size=16, mean=(0, 0, 0), std=(1, 1, 1), zoom_out_prob=0.0, jitter=0.0)
    )(img, np.random.default_rng(3))["images"]
    assert torch.equal(a, b)


def test_two_views_are_independent(image_folder):
    from training import data as D

    img, _ = D.build_source(f"imagefolder:{image_folder}")[0]
    cfg = D.TransformConfig(img_size=16, two_views=True, jitter=0.4, zoom_out_prob=0.5)
    out = D.PretrainTransform(cfg)(img, np.random.default_rng(0))
    assert out["images"].shape == out["images2"].shape == (3, 16, 16)
    assert not torch.equal(out["images"], out["images2"])


def test_contrastive_term_trains_resumes_and_inits_from_a_model(tmp_path, image_folder):
    """instance.kind=contrastive adds loss_instance (and its accuracy) to the CAE loss, keeps the head in
    the checkpoint (exact resume), and model.init_from starts from saved weights."""
    base = tmp_path / "base"
    pretrain(tiny_cfg(image_folder, "optim.epochs=1"), base)
    common = ["optim.epochs=2", "instance.kind=contrastive", "instance.hidden_dim=32", "instance.proj_dim=16",
              "data.zoom_out_prob=0.5", "data.jitter=0.3", f"model.init_from={base / 'model.safetensors'}",
              "runtime.save_every_steps=2"]  # fmt: skip
    full, part = tmp_path / "full", tmp_path / "part"
    pretrain(tiny_cfg(image_folder, *common), full)
    recs = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert all("loss_instance" in r and 0.0 <= r["instance_acc"] <= 1.0 for r in train)
    for r in train:
        assert r["loss"] == pytest.approx(r["loss_main"] + r["loss_align"] + r["loss_instance"], rel=1e-5)
    ck = torch.load(sorted(full.glob("checkpoint-*.pth"))[-1], weights_only=False)
    assert any(k.startswith("net.") for k in ck["instance_head"])
    pretrain(tiny_cfg(image_folder, *common, "runtime.max_steps=4"), part)
    pretrain(tiny_cfg(image_folder, *common), part, resume=True)
    a, b = train_losses(full), train_losses(part)
    assert sorted(a) == sorted(b) and all(a[s] == b[s] for s in a)
    # the first step starts from the base weights, not from a fresh init
    fresh = tmp_path / "fresh"
    pretrain(
        tiny_cfg(
            image_folder, *[c for c in common if not c.startswith("model.init_from")], "runtime.max_steps=1"
        ),
        fresh,
    )
    assert train_losses(fresh)[1] != a[1]
    with pytest.raises(ConfigError, match="architecture differs"):
        pretrain(tiny_cfg(image_folder, *common, "model.overrides.depth=3"), tmp_path / "bad")
    with pytest.raises(ConfigError, match="init_from"):
        pretrain(
            tiny_cfg(image_folder, *common[:-2], f"model.init_from={tmp_path / 'missing.safetensors'}"),
            tmp_path / "bad2",
        )


def test_max_steps_eta_counts_only_the_steps_left(tmp_path, image_folder, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="training"):
        pretrain(tiny_cfg(image_folder, "optim.epochs=50", "runtime.max_steps=3"), tmp_path / "run")
    etas = [r.getMessage().rsplit("eta ", 1)[1] for r in caplog.records if " eta " in r.getMessage()]
    assert etas and etas[-1] == "0:00:00"  # the last logged step is the cap, not 147 steps before the end


def test_shifted_test_set_is_seeded_smaller_and_off_centre(image_folder):
    from PIL import Image

    from training import data as D

    img = Image.new("RGB", (28, 28), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 28, 28))
    img.putpixel((0, 0), (0, 0, 0))
    src = [(img, 3)] * 20
    ds = D.ShiftedDataset(src)  # type: ignore[arg-type]
    a, la = ds[5]
    b, _ = ds[5]
    assert la == 3 and a.size == (28, 28) and np.array_equal(np.asarray(a), np.asarray(b))  # seeded by index
    fracs, centres = [], []
    for i in range(20):
        arr = np.asarray(ds[i][0])[..., 0] > 128
        ys, xs = arr.nonzero()
        fracs.append(arr.mean())
        centres.append((ys.mean(), xs.mean()))
    lo, hi = D.ShiftedDataset.SCALE
    assert lo**2 * 0.8 <= min(fracs) and max(fracs) <= hi**2 * 1.1  # area ~ side fraction squared
    assert np.std([c[1] for c in centres]) > 1.0  # not all centred


def test_instance_term_on_the_served_lastn_readout(tmp_path, image_folder):
    """instance.pooling=lastN contrasts the readout /embed serves: the masked view's lastN is built from the
    blocks CAE.forward kept (its newest block equals the visible tokens' final cls and mean), the head takes
    the 2ND-wide feature, and an N beyond the depth or cls+mean is a config error."""
    from training.instance import masked_view_feature
    from training.models.cae import CAE, CAEConfig

    model = CAE(CAEConfig(**tiny_overrides(depth=3))).eval()
    images, mask = torch.randn(2, 3, 32, 32), random_mask(2, 16, 8)
    out = model(images, mask, keep_blocks=2)
    feat = masked_view_feature(out, model, "last2")
    d = model.embed_dim
    assert feat.shape == (2, 4 * d) and len(out.visible_blocks) == 2
    torch.testing.assert_close(feat[:, 2 * d : 3 * d], out.latent_visible[:, 0])
    torch.testing.assert_close(feat[:, 3 * d :], out.latent_visible[:, 1:].mean(dim=1))
    assert model(images, mask).visible_blocks == []
    with pytest.raises(ValueError, match="keep_blocks"):
        masked_view_feature(model(images, mask), model, "last2")
    run = tmp_path / "last"
    common = ["optim.epochs=1", "instance.kind=contrastive", "instance.hidden_dim=32", "instance.proj_dim=16"]
    pretrain(tiny_cfg(image_folder, *common, "instance.pooling=last2"), run)
    train = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("loss_instance" in r for r in train if r["kind"] == "train")
    ck = torch.load(sorted(run.glob("checkpoint-*.pth"))[-1], weights_only=False)
    assert ck["instance_head"]["net.0.weight"].shape[1] == 4 * 32  # last2 of the tiny preset's D=32
    for bad in ("last99", "cls+mean"):
        with pytest.raises(ConfigError, match="instance.pooling"):
            pretrain(tiny_cfg(image_folder, *common, f"instance.pooling={bad}"), tmp_path / bad)


def test_support_queue_is_a_ring_of_normalized_embeddings():
    from training.instance import SupportQueue

    q = SupportQueue(5, 2)
    assert not q.full
    q.push(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    assert not q.full and int(q.pushed) == 3
    q.push(torch.tensor([[0.0, -1.0], [0.6, 0.8], [0.8, 0.6]]))  # 6 > 5: the oldest row is overwritten
    assert q.full
    torch.testing.assert_close(q.feats[0], torch.tensor([0.8, 0.6]))
    torch.testing.assert_close(q.feats[1], torch.tensor([0.0, 1.0]))
    nn_ = q.nearest(torch.tensor([[1.0, 0.05], [0.0, -1.0]]))
    torch.testing.assert_close(nn_, torch.tensor([[0.8, 0.6], [0.0, -1.0]]))
    with pytest.raises(ValueError, match="queue_size"):
        SupportQueue(0, 2)


def test_nn_info_nce_uses_the_queue_neighbour_as_the_positive():
    """Plain InfoNCE until the queue is full; then row i's positive is NN(z2_i) against the batch's z1."""
    import torch.nn.functional as F

    from training.instance import SupportQueue, info_nce, nn_info_nce

    torch.manual_seed(0)
    z1, z2 = torch.randn(4, 8), torch.randn(4, 8)
    q = SupportQueue(8, 8)
    loss, _ = nn_info_nce(z1, z2, q, 0.2)
    torch.testing.assert_close(loss, info_nce(z1, z2, 0.2)[0])
    nn_info_nce(z1, z2, q, 0.2)  # 8 pushed: full
    z1n, z2n = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
    # the queue now holds z2n twice: NN(z2_i) is z2_i itself, NN(z1_i) the z2 closest to z1_i
    t = torch.arange(4)
    nn1 = z2n[(z1n @ z2n.t()).argmax(dim=1)]
    want = 0.5 * (F.cross_entropy(z2n @ z1n.t() / 0.2, t) + F.cross_entropy(nn1 @ z2n.t() / 0.2, t))
    z1g = z1.clone().requires_grad_()
    loss, acc = nn_info_nce(z1g, z2, q, 0.2)
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert z1g.grad is not None and z1g.grad.abs().sum() > 0 and 0.0 <= float(acc) <= 1.0


def test_nn_contrastive_term_trains_and_resumes_with_its_queue(tmp_path, image_folder):
    common = ["optim.epochs=2", "instance.kind=nn_contrastive", "instance.hidden_dim=32",
              "instance.proj_dim=16", "instance.queue_size=16", "runtime.save_every_steps=2"]  # fmt: skip
    full, part = tmp_path / "full", tmp_path / "part"
    pretrain(tiny_cfg(image_folder, *common), full)
    ck = torch.load(sorted(full.glob("checkpoint-*.pth"))[-1], weights_only=False)
    head = ck["instance_head"]
    assert head["queue.feats"].shape == (16, 16) and int(head["queue.pushed"]) > 32
    pretrain(tiny_cfg(image_folder, *common, "runtime.max_steps=4"), part)
    pretrain(tiny_cfg(image_folder, *common), part, resume=True)
    a, b = train_losses(full), train_losses(part)
    assert sorted(a) == sorted(b) and all(a[s] == b[s] for s in a)  # the queue came back with the head
    with pytest.raises(ConfigError, match="queue_size"):
        pretrain(tiny_cfg(image_folder, *common[:4], "instance.queue_size=1"), tmp_path / "bad")


def test_fashion_mnist_val_holds_out_the_end_of_the_train_split(tmp_path, monkeypatch):
    from tests.helpers import make_fake_fmnist
    from training import data as D

    monkeypatch.setattr(D, "FMNIST_VAL_SIZE", 5)
    root = make_fake_fmnist(tmp_path / "fm", n_train=12, n_test=8)
    tr, va = (D.build_source(f"fashion-mnist-val:{root}", s) for s in ("train", "test"))
    full = D.build_source(f"fashion-mnist:{root}", "train")
    assert len(tr) == 7 and len(va) == 5 and va.classes == full.classes
    assert np.array_equal(np.asarray(va[0][0]), np.asarray(full[7][0])) and va[0][1] == full[7][1]
    assert np.array_equal(np.asarray(tr[6][0]), np.asarray(full[6][0]))


def test_progress_rate_and_eta_leave_out_resumed_units(monkeypatch: pytest.MonkeyPatch) -> None:
    """A resumed run's rate counts only the units this process did, so its ETA is not wildly short."""
    import logging

    from training import tracking

    clock = iter([100.0, 110.0])
    monkeypatch.setattr(tracking.time, "perf_counter", lambda: next(clock))
    lines: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    log = logging.getLogger("test.progress")
    log.addHandler(Grab())
    log.setLevel(logging.INFO)
    p = tracking.Progress("finetune", 1000, unit="step", logger=log, start=500)
    p.update(600, force=True)  # 100 steps in 10 s after resuming at 500
    assert lines == ["finetune: 600/1000 step (10.0 step/s, ETA 0:00:40)"], lines


@pytest.mark.parametrize("script", sorted((REPO / "bench").glob("*.sh")), ids=lambda p: p.name)
def test_bench_shell_scripts_parse_and_name_real_presets(script: Path) -> None:
    """The prepared GPU/CPU scripts run where there is no second chance (a lent GPU's minutes): they must
    at least parse, and every preset they pass to --config must load."""
    import re
    import subprocess

    from training.config import load_config
    from training.dense.config import load_dense_config

    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for task, name in re.findall(r"\b(segment|detect)\s+--config\s+([a-z0-9_]+)", text):
        load_dense_config(task, name)  # raises ConfigError for a preset that does not exist
    presets = set(re.findall(r"pretrain\s+--config\s+([a-z0-9_]+)", text))
    presets |= {p for line in re.findall(r"STAGES=\(([^)]*)\)", text) for p in line.split()}
    for name in presets:
        load_config(name)
