"""Model tests, parametrized over the registry: exact shapes, gradients, masking semantics, sizes."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import random_mask, tiny_overrides
from training.models import CAE, CAEConfig, create_model, list_models, mask_indices, patchify, unpatchify
from training.models.layers import build_2d_sincos_position_embedding


def official_param_total(model: CAE) -> int:
    """Parameters as the official state_dict counts them: + the duplicate alignment encoder and the
    three sin-cos tables (parameters there, buffers here)."""
    own = sum(p.numel() for p in model.parameters())
    enc = sum(p.numel() for p in model.encoder.parameters())
    return own + enc + 2 * model.encoder.pos_embed.numel() + model.rd_pos_embed.numel()


def test_registry_lists_official_sizes():
    assert list_models() == [
        "cae_base_patch16_224",
        "cae_large_patch16_224",
        "cae_small_patch16_224",
        "cae_tiny_patch16_224",
    ]
    with pytest.raises(ValueError, match="unknown model"):
        create_model("cae_huge_patch14_224")


@pytest.mark.parametrize(
    "name,d,depth,heads,dd",
    [
        ("cae_tiny_patch16_224", 192, 12, 12, 192),
        ("cae_small_patch16_224", 384, 12, 12, 384),
        ("cae_base_patch16_224", 768, 12, 12, 768),
        ("cae_large_patch16_224", 1024, 24, 16, 768),
    ],
)
def test_official_widths(name, d, depth, heads, dd):
    cfg = create_model(name, img_size=32).cfg
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.decoder_embed_dim) == (d, depth, heads, dd)
    assert (cfg.regressor_depth, cfg.decoder_depth, cfg.decoder_num_heads) == (4, 4, 12)
    assert cfg.has_projection == (d != dd)


@pytest.mark.slow
def test_param_counts_match_spec():
    base = create_model("cae_base_patch16_224")
    assert official_param_total(base) == 234_791_936
    enc = sum(p.numel() for p in base.encoder.parameters()) + base.encoder.pos_embed.numel()
    assert round(enc / 1e6, 2) == 85.81
    assert round(sum(p.numel() for p in base.regresser.parameters()) / 1e6, 2) == 28.37
    assert round(sum(p.numel() for p in base.decoder.parameters()) / 1e6, 2) == 34.66
    large = create_model("cae_large_patch16_224")
    assert round(official_param_total(large) / 1e6, 1) == 670.6
    proj = sum(p.numel() for p in large.encoder_to_regresser.parameters())
    proj += sum(p.numel() for p in large.encoder_to_regresser_norm.parameters())
    assert round(proj / 1e6, 2) == 0.79
    # the intended (unscripted) large: Dd = 1024 with 12 heads -> 1020-wide attention
    large_1024 = create_model("cae_large_patch16_224", decoder_embed_dim=1024)
    assert large_1024.regresser.regressor_blocks[0].cross_attn.q.weight.shape == (1020, 1024)
    assert round(official_param_total(large_1024) / 1e6, 1) == 715.9


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_every_size(name):
    torch.manual_seed(0)
    model = create_model(name, img_size=64, vocab_size=256, drop_path_rate=0.1)
    cfg = model.cfg
    n, b, m = 16, 2, 8
    images = torch.randn(b, 3, 64, 64)
    mask = random_mask(b, n, m)
    out = model(images, mask)
    assert out.latent_visible.shape == (b, 1 + n - m, cfg.embed_dim)
    assert out.latent_pred.shape == (b, m, cfg.decoder_embed_dim)
    assert out.latent_target.shape == (b, m, cfg.decoder_embed_dim)
    assert out.pred.shape == (b, m, 256)
    assert not out.latent_target.requires_grad
    tokens = torch.randint(0, 256, (b, n))
    losses = model.forward_loss(out, tokens)
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    assert model.encoder.patch_embed.proj.weight.grad is not None
    assert model.mask_token.grad is not None and model.decoder.head.weight.grad is not None
    assert model.encoder.pos_embed.grad is None  # fixed table
    with torch.no_grad():
        feats = model.eval().forward_features(images)
    assert feats.shape == (b, 1 + n, cfg.embed_dim)


def test_pixel_target_and_reconstruct():
    torch.manual_seed(0)
    model = CAE(CAEConfig(**tiny_overrides(target="pixel")))
    images = torch.randn(3, 3, 32, 32)
    mask = random_mask(3, 16, 6)
    out = model(images, mask)
    assert out.pred.shape == (3, 6, 8 * 8 * 3)
    losses = model.forward_loss(out, images)
    assert set(losses) == {"loss", "loss_main", "loss_align"}
    # normalized targets: each masked patch has zero mean and unit variance
    tgt = model.pixel_targets(images, mask)
    assert torch.allclose(tgt.mean(-1), torch.zeros(3, 6), atol=1e-5)
    losses["loss"].backward()
    rec = model.eval().reconstruct(images, mask)
    assert rec.shape == images.shape
    # visible patches are untouched
    vis = ~mask
    assert torch.allclose(patchify(rec, 8)[vis], patchify(images, 8)[vis])


def test_patchify_roundtrip():
    x = torch.randn(2, 3, 32, 48)
    p = patchify(x, 8)
    assert p.shape == (2, 4 * 6, 192)
    assert torch.equal(unpatchify(p, 8, (4, 6)), x)
    # row-major patch order: patch 1 is row 0, column 1
    assert torch.equal(p[0, 1].reshape(8, 8, 3).permute(2, 0, 1), x[0, :, 0:8, 8:16])


def test_target_is_encoder_on_masked_patches_only():
    torch.manual_seed(0)
    model = CAE(CAEConfig(**tiny_overrides())).eval()
    images = torch.randn(2, 3, 32, 32)
    mask = random_mask(2, 16, 7)
    with torch.no_grad():
        out = model(images, mask)
        direct = model.forward_encoder(images, ~mask)[:, 1:]
        full = model.forward_features(images)[:, 1:]
    assert torch.allclose(out.latent_target, direct, atol=1e-6)
    # ... which is not the full-context encoding of those patches
    masked_full = full[mask].reshape(2, 7, -1)
    assert not torch.allclose(out.latent_target, masked_full, atol=1e-3)


def test_projection_when_widths_differ():
    model = CAE(CAEConfig(**tiny_overrides(decoder_embed_dim=48, decoder_num_heads=4)))
    assert model.encoder_to_regresser is not None
    out = model(torch.randn(2, 3, 32, 32), random_mask(2, 16, 8))
    assert out.latent_pred.shape == out.latent_target.shape == (2, 8, 48)


def test_train_mode_target_is_stochastic_with_drop_path():
    torch.manual_seed(0)
    model = CAE(CAEConfig(**tiny_overrides(drop_path_rate=0.5, depth=4)))
    images, mask = torch.randn(2, 3, 32, 32), random_mask(2, 16, 8)
    t1 = model.forward_target(images, mask)
    t2 = model.forward_target(images, mask)
    assert not torch.allclose(t1, t2)
    model.eval()
    assert torch.equal(model.forward_target(images, mask), model.forward_target(images, mask))


def test_mask_validation():
    model = CAE(CAEConfig(**tiny_overrides()))
    images = torch.randn(2, 3, 32, 32)
    bad = random_mask(2, 16, 8)
    bad[0, bad[0].nonzero()[0]] = False
    with pytest.raises(ValueError, match="same number"):
        model(images, bad)
    with pytest.raises(ValueError, match="bool"):
        model(images, bad.long())
    with pytest.raises(ValueError, match="at least one"):
        model(images, torch.zeros(2, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="needs a mask"):
        model(images, None)
    with pytest.raises(ValueError, match="32x32"):
        model.forward_features(torch.randn(1, 3, 48, 48))


def test_mask_indices_order():
    mask = torch.tensor([[False, True, False, True, True, False]])
    vis, msk = mask_indices(mask)
    assert vis.tolist() == [[0, 2, 5]] and msk.tolist() == [[1, 3, 4]]


def test_sincos_row_column_order():
    d, g = 16, 4
    table = build_2d_sincos_position_embedding(g, d)
    assert table.shape == (1, 1 + g * g, d)
    assert torch.equal(table[0, 0], torch.zeros(d))
    omega = 1.0 / 10000 ** (torch.arange(d // 4, dtype=torch.float32) / (d // 4))
    r, c = 1, 3
    row = table[0, 1 + r * g + c]
    assert torch.allclose(row[: d // 4], torch.sin(r * omega))  # first quarter: the patch *row*
    assert torch.allclose(row[d // 2 : 3 * d // 4], torch.sin(c * omega))


def test_config_errors():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        CAEConfig(img_size=30, patch_size=8)
    with pytest.raises(ValueError, match="target"):
        CAEConfig(target="clip")
    with pytest.raises(ValueError, match="unknown CAE config keys"):
        create_model("cae_tiny_patch16_224", embed_dimm=3)


def test_weight_init_follows_official():
    model = CAE(CAEConfig(**tiny_overrides()))
    w = model.encoder.blocks[0].mlp.fc1.weight
    bound = math.sqrt(6.0 / (w.shape[0] + w.shape[1]))
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound  # xavier-uniform
    assert torch.count_nonzero(model.encoder.blocks[0].attn.q_bias) == 0
    assert model.encoder.cls_token.abs().max() <= 0.02
    assert torch.allclose(model.encoder.blocks[0].gamma_1, torch.full((64,), 0.1))


def test_encoder_only_model_refuses_pretext():
    model = CAE(CAEConfig(**tiny_overrides(encoder_only=True)))
    assert model.decoder is None
    assert model.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 17, 64)
    with pytest.raises(ValueError, match="encoder-only"):
        model(torch.randn(1, 3, 32, 32), random_mask(1, 16, 8))


def test_ablation_variants():
    torch.manual_seed(0)
    images, mask = torch.randn(2, 3, 32, 32), random_mask(2, 16, 8)
    mae = CAE(CAEConfig(**tiny_overrides(arch="mae", target="pixel")))
    out = mae(images, mask)
    assert out.pred.shape == (2, 8, 192) and out.latent_pred.shape == (2, 8, 0)
    losses = mae.forward_loss(out, images)
    assert float(losses["loss_align"]) == 0.0 and torch.equal(losses["loss"], losses["loss_main"])
    losses["loss"].backward()
    assert mae.encoder.patch_embed.proj.weight.grad is not None
    assert mae.regresser.regressor_blocks[0].cross_attn.q.weight.grad is None  # unused in this ablation
    align_only = CAE(CAEConfig(**tiny_overrides(recon_loss_weight=0.0, target="pixel")))
    o = align_only(images, mask)
    l2 = align_only.forward_loss(o, images)
    assert torch.allclose(l2["loss"], l2["loss_align"])
    no_align = CAE(CAEConfig(**tiny_overrides(align_loss_weight=0.0, target="pixel")))
    l3 = no_align.forward_loss(no_align(images, mask), images)
    assert float(l3["loss_align"]) == 0.0
    with pytest.raises(ValueError, match="arch"):
        CAEConfig(arch="beit")


def test_encoder_owns_drop_path_and_rel_pos_tables():
    """What fine-tuning changes is set on the encoder itself: the drop-path ramp, and relative position
    tables with the same parameter names (and forward) as an encoder built with them."""
    torch.manual_seed(0)
    enc = CAE(CAEConfig(**tiny_overrides(depth=3))).encoder
    enc.set_drop_path(0.2)
    rates = [getattr(blk.drop_path, "drop_prob", 0.0) for blk in enc.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2])
    assert isinstance(enc.blocks[0].drop_path, torch.nn.Identity)
    enc.set_drop_path(0.0)
    assert all(isinstance(blk.drop_path, torch.nn.Identity) for blk in enc.blocks)

    built = CAE(CAEConfig(**tiny_overrides(depth=3, use_rel_pos_bias=True))).encoder
    assert enc.init_rel_pos_bias() == 3 and enc.init_rel_pos_bias() == 0
    assert list(enc.state_dict()) == list(built.state_dict())
    assert all(enc.state_dict()[k].shape == v.shape for k, v in built.state_dict().items())
    enc.eval()
    x = torch.randn(2, 3, 32, 32)
    ref = CAE(CAEConfig(**tiny_overrides(depth=3))).encoder.eval()
    ref.load_state_dict({k: v for k, v in enc.state_dict().items() if "relative_position" not in k})
    with torch.no_grad():  # zero tables: the same function as without them
        torch.testing.assert_close(enc(x), ref(x))


@pytest.mark.parametrize("with_bias", [False, True])
def test_cpu_attention_matches_sdpa(with_bias):
    """The explicit attention (what bf16 runs on the CPU, faster here) computes what the fused SDPA kernel
    does: values and gradients in fp32, with and without the relative-position bias; in bf16 on the CPU
    ``attention`` takes it and stays close to fp32."""
    import torch.nn.functional as F

    from training.models import layers

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 3, 26, 16, generator=g, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 3, 26, 26, generator=g) if with_bias else None
    out = layers.explicit_attention(q, k, v, bias)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    low_bias = None if bias is None else bias.bfloat16()
    low = layers.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), low_bias)
    assert low.dtype == torch.bfloat16 and (low.float() - ref).abs().max() < 0.1
    assert torch.equal(low, layers.explicit_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), low_bias))


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk", [None, 3, 7, 1000])
def test_linear_cross_entropy_matches_materialized_logits(with_bias, chunk):
    """Loss, accuracy and the gradients of input, weight and bias equal F.cross_entropy on h @ W.T + b,
    for chunks that do and do not divide the rows; no grads are built when none are needed."""
    import torch.nn.functional as F

    from training.models.losses import linear_cross_entropy

    torch.manual_seed(0)
    h = torch.randn(20, 6, dtype=torch.float64).float().requires_grad_()
    w = torch.randn(11, 6).requires_grad_()
    b = torch.randn(11).requires_grad_() if with_bias else None
    labels = torch.randint(0, 11, (20,))
    labels[:5] = F.linear(h, w, b)[:5].argmax(-1)  # some rows right, so the accuracy is not trivially 0
    ref_logits = F.linear(h, w, b)
    ref = F.cross_entropy(ref_logits, labels)
    ref_acc = (ref_logits.argmax(-1) == labels).float().mean()
    params = [h, w] + ([b] if b is not None else [])
    ref_grads = torch.autograd.grad(ref * 3.0, params)
    loss, acc = linear_cross_entropy(h, w, b, labels, chunk)
    torch.testing.assert_close(loss, ref)
    assert float(acc) == float(ref_acc) and float(acc) >= 0.25 and not acc.requires_grad
    for got, want in zip(torch.autograd.grad(loss * 3.0, params), ref_grads, strict=True):
        torch.testing.assert_close(got, want)  # the upstream gradient (3.0) is applied
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, b, labels, chunk)[0], ref.detach())
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(h, w, b, labels[:-1])


def test_forward_without_head_gives_the_same_loss_and_grads():
    """CAE.forward(head=False) leaves the vocabulary head to forward_loss (fused with the cross-entropy):
    same losses, same gradients everywhere as the materialized logits; pixel targets too."""
    for target, tokens_dim in (("dalle", 64), ("pixel", None)):
        torch.manual_seed(0)
        model = CAE(CAEConfig(**tiny_overrides(target=target, vocab_size=64, drop_path_rate=0.0)))
        b, n = 3, model.cfg.num_patches
        images, mask = torch.randn(b, 3, model.cfg.img_size, model.cfg.img_size), random_mask(b, n, n // 2)
        target_t = torch.randint(0, tokens_dim, (b, n)) if tokens_dim else images
        grads = []
        for head in (True, False):
            model.zero_grad()
            out = model(images, mask, head=head)
            assert (out.pred is None) == (not head) and (out.decoded is None) == head
            assert out.predictions(model).shape[:2] == (b, n // 2)
            losses = model.forward_loss(out, target_t)
            losses["loss"].backward()
            got = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
            grads.append(({k: v.detach() for k, v in losses.items()}, got))
        (la, ga), (lb, gb) = grads
        assert la.keys() == lb.keys() and ga.keys() == gb.keys()
        for k in la:
            torch.testing.assert_close(la[k], lb[k], msg=f"{target} {k}")
        for k in ga:
            torch.testing.assert_close(ga[k], gb[k], rtol=1e-4, atol=1e-6, msg=f"{target} {k}")
