"""Dense heads: pyramid shapes, UperNet / linear / Mask R-CNN on a tiny encoder, training from
`training/run.py segment|detect` (time box, resume), export with parity, and serving the real graphs."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import make_fake_fmnist
from training.config import ConfigError
from training.dense.models import (
    CAEPyramid,
    CAESegmenter,
    build_mask_rcnn,
    pyramid_indices,
)
from training.dense.scenes import generate_scenes
from training.dense.train import load_dense_config, load_dense_model, train_dense
from training.evaluation import finetune_param_groups
from training.models import create_model, save_model
from training.models.layers import resample_abs_pos_embed as interpolate_pos_embed

TINY = dict(
    img_size=16,
    patch_size=4,
    embed_dim=32,
    depth=4,
    num_heads=2,
    decoder_embed_dim=32,
    decoder_num_heads=2,
    regressor_depth=1,
    decoder_depth=1,
    target="pixel",
)


def tiny_cae():
    torch.manual_seed(0)
    return create_model("cae_tiny_patch16_224", **TINY)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_model(tiny_cae(), path)
    return path


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dense")
    fm = make_fake_fmnist(root / "fm", n_train=16, n_test=8)
    generate_scenes(root / "scenes", n_train=12, n_test=4, size=32, seed=0, fmnist_root=fm)
    return root / "scenes"


# ------------------------------------------------------------------ model parts
@pytest.mark.parametrize(
    "depth,expected", [(12, [3, 5, 7, 11]), (24, [7, 11, 15, 23]), (6, [1, 2, 3, 5]), (4, [0, 1, 2, 3])]
)
def test_pyramid_indices(depth, expected):
    assert pyramid_indices(depth) == expected


def test_pyramid_indices_too_shallow():
    with pytest.raises(ValueError, match="depth >= 4"):
        pyramid_indices(3)


def test_pos_embed_interpolation_keeps_cls_and_identity():
    pos = torch.randn(1, 1 + 16, 8)
    assert torch.equal(interpolate_pos_embed(pos, (4, 4)), pos)
    big = interpolate_pos_embed(pos, (8, 8))
    assert big.shape == (1, 65, 8) and torch.equal(big[:, :1], pos[:, :1])


@pytest.mark.parametrize("size", [16, 32])
def test_pyramid_shapes(size):
    pyr = CAEPyramid(tiny_cae().encoder, size)
    feats = pyr(torch.randn(2, 3, size, size))
    g = size // 4
    assert [tuple(f.shape) for f in feats] == [
        (2, 32, 4 * g, 4 * g),
        (2, 32, 2 * g, 2 * g),
        (2, 32, g, g),
        (2, 32, g // 2, g // 2),
    ]
    assert pyr.strides == [1, 2, 4, 8]
    with pytest.raises(ValueError, match="expected images"):
        pyr(torch.randn(1, 3, size + 4, size + 4))


@pytest.mark.parametrize("size", [16, 32])
def test_coarser_pyramid_shapes_and_strides(size):
    """finest_stride = patch/2: one octave coarser than BEiT's pyramid, the same four block outputs."""
    cae = tiny_cae().eval()
    beit, coarse = CAEPyramid(cae.encoder, size).eval(), CAEPyramid(cae.encoder, size, finest_stride=2).eval()
    x = torch.randn(2, 3, size, size)
    feats = coarse(x)
    g = size // 4
    assert [tuple(f.shape) for f in feats] == [
        (2, 32, 2 * g, 2 * g),
        (2, 32, g, g),
        (2, 32, g // 2, g // 2),
        (2, 32, g // 4, g // 4),
    ]
    assert coarse.strides == [2, 4, 8, 16]
    with torch.no_grad():  # the same blocks feed both, shallow to fine; the grid level is a block's output
        for ta, tb in zip(beit.tokens(x), coarse.tokens(x), strict=True):
            torch.testing.assert_close(ta, tb)
        grid = coarse.tokens(x)[1].transpose(1, 2).reshape(2, 32, g, g)
        torch.testing.assert_close(coarse(x)[1], grid)
    assert CAEPyramid(cae.encoder, size, finest_stride=1).strides == [1, 2, 4, 8]  # = BEiT's, explicitly


def test_coarser_pyramid_errors():
    enc = tiny_cae().encoder
    with pytest.raises(ValueError, match="patch/4 .* or patch/2"):
        CAEPyramid(enc, 32, finest_stride=4)
    with pytest.raises(ValueError, match="divisible by 4"):
        CAEPyramid(enc, 24, finest_stride=2)  # 6x6 grid: the /4 level would not tile it


def test_mask_rcnn_anchors_keep_small_sizes_on_the_coarser_pyramid():
    enc = tiny_cae().encoder
    for fs in (None, 2):
        det = build_mask_rcnn(CAEPyramid(enc, 32, finest_stride=fs), 4, fpn_channels=16, size_divisible=1)
        assert det.rpn.anchor_generator.sizes == ((8,), (16,), (32,), (64,), (128,))


def test_pyramid_matches_encoder_at_the_pretraining_size():
    cae = tiny_cae().eval()
    pyr = CAEPyramid(cae.encoder, 16).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        last = pyr.tokens(x)[-1]
        ref = cae.encoder.encode_tokens(cae.encoder.embed(x), None, final_norm=False)[:, 1:]
    torch.testing.assert_close(last, ref)


@pytest.mark.parametrize("head", ["upernet", "linear"])
def test_segmenter_shapes_and_loss(head):
    seg = CAESegmenter(CAEPyramid(tiny_cae().encoder, 32), 5, head=head, channels=16)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2, 32, 32))
    y[0, :4] = 255  # ignored pixels
    assert seg(x).shape == (2, 5, 32, 32)
    losses = seg.loss(x, y)
    assert set(losses) == ({"loss", "loss_seg", "loss_aux"} if head == "upernet" else {"loss", "loss_seg"})
    assert math.isfinite(float(losses["loss"].detach()))


def test_mask_rcnn_train_and_eval_outputs():
    det = build_mask_rcnn(CAEPyramid(tiny_cae().encoder, 32), 4, fpn_channels=16, size_divisible=1)
    masks = torch.zeros(1, 32, 32, dtype=torch.uint8)
    masks[0, 4:20, 6:18] = 1
    target = [{"boxes": torch.tensor([[6.0, 4.0, 18.0, 20.0]]), "labels": torch.tensor([2]), "masks": masks}]
    losses = det([torch.randn(3, 32, 32)], target)
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"} <= set(
        losses
    )
    det.eval()
    with torch.no_grad():
        out = det([torch.randn(3, 32, 32)])[0]
    n = len(out["boxes"])
    assert (
        out["boxes"].shape == (n, 4) and out["masks"].shape == (n, 1, 32, 32) and out["labels"].shape == (n,)
    )


def test_layer_decay_groups():
    seg = CAESegmenter(CAEPyramid(tiny_cae().encoder, 16), 3, channels=16)
    groups = finetune_param_groups(seg, 0.05, 0.5)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert scale["backbone.encoder.patch_embed.proj.weight"] == pytest.approx(0.5**5)
    assert scale["backbone.encoder.blocks.3.mlp.fc1.weight"] == pytest.approx(0.5)
    assert scale["decode_head.cls.weight"] == 1.0
    no_wd = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    assert "backbone.encoder.cls_token" in no_wd and "decode_head.cls.bias" in no_wd


# ------------------------------------------------------------------ configs
def test_dense_presets_resolve():
    assert load_dense_config("segment", "fmnist_scenes_upernet").model.head == "upernet"
    assert load_dense_config("segment", "fmnist_scenes_linear").model.head == "linear"
    assert load_dense_config("detect", "fmnist_scenes_maskrcnn").model.head == "maskrcnn"
    for task, head in (("segment", "upernet"), ("detect", "maskrcnn")):
        light = load_dense_config(task, f"fmnist_scenes_v2_{head}_light")
        assert light.model.finest_stride == 2 and light.model.img_size == 96


@pytest.mark.parametrize("task,preset,extra,match", [
    ("detect", "fmnist_scenes_upernet", [], "config task"),
    ("segment", None, ["model.head=maskrcnn"], "not a segment head"),
    ("segment", None, ["optim.lr=5"], "optim.lr"),
    ("segment", None, ["optim.epochs=x"], "expected an integer"),
    ("segment", "no_such_preset", [], "no dense preset"),
])  # fmt: skip
def test_dense_config_errors(task, preset, extra, match):
    with pytest.raises(ConfigError, match=match):
        load_dense_config(task, preset, extra)


def test_pyramid_settings_that_do_not_fit_the_encoder_are_config_errors():
    from training.dense.train import assemble_dense_model

    cfg = load_dense_config("segment", None, ["model.img_size=32", "model.finest_stride=3"])
    with pytest.raises(ConfigError, match="model.finest_stride=3.*patch/4"):
        assemble_dense_model(cfg, tiny_cae(), 5)


# ------------------------------------------------------------------ train -> export -> serve
def _cfg(task: str, scenes: Path, ckpt: Path, *extra: str):
    preset = {"segment": "fmnist_scenes_upernet", "detect": "fmnist_scenes_maskrcnn"}[task]
    return load_dense_config(
        task,
        preset,
        [
            f"data.root={scenes}",
            f"model.checkpoint={ckpt}",
            "model.img_size=32",
            "model.channels=16",
            "optim.batch_size=4",
            "optim.epochs=2",
            "optim.warmup_epochs=0.5",
            "runtime.precision=fp32",
            "runtime.device=cpu",
            "runtime.log_every=1",
            "runtime.eval_every_epochs=1",
            "runtime.vis_every_epochs=2",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, scenes, tiny_ckpt) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("runs")
    seg = train_dense(_cfg("segment", scenes, tiny_ckpt), out / "seg")
    det = train_dense(_cfg("detect", scenes, tiny_ckpt, "optim.lr=1e-4"), out / "det")
    return {"segment": Path(seg["model"]), "detect": Path(det["model"]), "out": out}


def test_training_writes_metrics_model_and_pngs(trained):
    for task in ("segment", "detect"):
        run = trained[task].parent
        res = json.loads((run / "results.json").read_text())
        keys = (
            {"mIoU", "pixel_acc", "mean_acc"}
            if task == "segment"
            else {"bbox_mAP", "segm_mAP", "bbox_mAP_50"}
        )
        assert keys <= set(res)
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in recs if r["kind"] == "eval"] == [0, 1]
        assert (run / "loss_curve.png").stat().st_size > 0 and (
            run / "predictions-0001.png"
        ).stat().st_size > 0
        assert json.loads((run / "config.json").read_text())["task"] == task
        # as readable as its neighbours (safetensors alone writes 0600)
        assert trained[task].stat().st_mode & 0o777 == (run / "results.json").stat().st_mode & 0o777
        model, cfg, pre, classes = load_dense_model(trained[task])
        assert (
            cfg.task == task and classes[0] == "background" and len(classes) == 11 and pre["img_size"] == 32
        )


def test_segmentation_loss_goes_down(trained):
    recs = [json.loads(x) for x in (trained["segment"].parent / "metrics.jsonl").read_text().splitlines()]
    ep = [r["loss"] for r in recs if r["kind"] == "epoch"]
    assert ep[-1] < ep[0]


def test_time_box_shortens_the_schedule_and_resume_continues(tmp_path, scenes, tiny_ckpt):
    res = train_dense(
        _cfg("segment", scenes, tiny_ckpt, "optim.epochs=50", "runtime.time_limit_min=0.0001"),
        tmp_path / "box",
    )
    assert res["epochs"] == 1
    recs = [json.loads(x) for x in (tmp_path / "box" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "schedule" and r["epochs"] == 1 for r in recs)
    # resume a finished 1-epoch run with 2 epochs: it continues at epoch 2 with the saved optimizer
    run = tmp_path / "r"
    train_dense(_cfg("segment", scenes, tiny_ckpt, "optim.epochs=1"), run)
    res2 = train_dense(_cfg("segment", scenes, tiny_ckpt, "optim.epochs=2"), run, resume=True)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs if r["kind"] == "epoch"] == [0, 1] and res2["epochs"] == 2


def test_random_init_encoder_and_bad_checkpoint(tmp_path, scenes):
    with pytest.raises(ConfigError, match="model.checkpoint"):
        train_dense(_cfg("segment", scenes, tmp_path / "missing.safetensors"), tmp_path / "x")
    with pytest.raises(ConfigError, match="data.root"):
        train_dense(_cfg("segment", tmp_path / "nowhere", Path("random:fmnist_cae")), tmp_path / "y")


def test_load_dense_model_refuses_other_files(tmp_path, tiny_ckpt):
    with pytest.raises(ConfigError, match="not a dense-head file"):
        load_dense_model(tiny_ckpt)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 20)
    with pytest.raises(ConfigError, match="not a readable"):
        load_dense_model(bad)


def test_export_with_heads_parity_and_serving(trained, tiny_ckpt, scenes, tmp_path):
    pytest.importorskip("onnxruntime")
    from fastapi.testclient import TestClient

    from export.onnx_export import export_bundle

    out = tmp_path / "bundle"
    spec = export_bundle(
        tiny_ckpt,
        out,
        tasks=("embed",),
        segment=trained["segment"],
        detect=trained["detect"],
        scenes_root=scenes,
    )
    seg, det = spec["tasks"]["segment"], spec["tasks"]["detect"]
    assert seg["parity"]["max_abs_diff"] <= 1e-3 and seg["parity"]["real_inputs"]
    assert seg["outputs"][0]["shape"] == ["batch", 11, 32, 32] and seg["image"]["size"] == 32
    assert [o["name"] for o in det["outputs"]] == ["boxes", "labels", "scores", "masks"]
    assert det["inputs"][0]["shape"] == [1, 3, 32, 32] and det["classes"][0] == "background"
    # the three graphs plus their shared weights
    assert set(spec["files"]) == {"embed.onnx", "segment.onnx", "detect.onnx", "weights.bin"}

    from service.app import create_app
    from service.settings import Settings

    img = sorted((scenes / "ade" / "images" / "validation").glob("*.png"))[0].read_bytes()
    with TestClient(create_app(Settings(model_dir=out, backend="onnxruntime"))) as client:
        r = client.post("/segment?format=png", files={"file": ("s.png", img, "image/png")})
        assert r.status_code == 200, r.text
        body = r.json()["results"][0]
        assert (body["width"], body["height"]) == (32, 32)
        import base64

        from PIL import Image

        label_map = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["label_map"]))))
        assert label_map.shape == (32, 32) and label_map.max() < 11
        r = client.post("/detect?score_threshold=0&masks=rle", files={"file": ("s.png", img, "image/png")})
        assert r.status_code == 200, r.text
        for d in r.json()["results"][0]["detections"]:
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 <= x2 <= 32 and 0 <= y1 <= y2 <= 32 and 1 <= d["label"] <= 10
