"""DALL-E dVAE tokenizer: re-implemented encoder, safe conversion of OpenAI's encoder.pkl, second view."""

from __future__ import annotations

import os
import pickle
import sys
import types
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from training.files import file_mode
from training.tokenizers import (
    DalleEncoder,
    DalleSecondView,
    DalleTokenizer,
    DalleWeightsError,
    UnsafePickleError,
    convert_openai_encoder,
    map_pixels,
)
from training.tokenizers.dalle import main

N_HID, VOCAB = 16, 64


# ----------------------------------------------------------------------------------------------------------
# A stand-in for OpenAI's dall_e package: the original structure (without attrs), as real nn.Modules,
# registered as dall_e.encoder / dall_e.utils only while torch.save pickles it.
# ----------------------------------------------------------------------------------------------------------


def _make_fake_dall_e() -> dict[str, types.ModuleType]:
    pkg = types.ModuleType("dall_e")
    enc_mod = types.ModuleType("dall_e.encoder")
    utils_mod = types.ModuleType("dall_e.utils")

    class Conv2d(nn.Module):
        def __init__(self, n_in: int, n_out: int, kw: int, use_float16: bool = True) -> None:
            super().__init__()
            self.n_in, self.n_out, self.kw, self.use_float16 = n_in, n_out, kw, use_float16
            self.device, self.requires_grad = torch.device("cpu"), False
            w = torch.empty((n_out, n_in, kw, kw), dtype=torch.float32)
            w.normal_(std=1 / ((n_in * kw**2) ** (1 / 2)))
            # random (not zero) biases so that a mix-up of b tensors would show
            b = torch.randn((n_out,), dtype=torch.float32) * 0.1
            self.w, self.b = nn.Parameter(w), nn.Parameter(b)

        def forward(self, x: Tensor) -> Tensor:  # the original's, including its float16 path on CUDA
            if self.use_float16 and "cuda" in self.w.device.type:
                if x.dtype != torch.float16:
                    x = x.half()
                w, b = self.w.half(), self.b.half()
            else:
                if x.dtype != torch.float32:
                    x = x.float()
                w, b = self.w, self.b
            return F.conv2d(x, w, b, padding=(self.kw - 1) // 2)

    class EncoderBlock(nn.Module):
        def __init__(self, n_in: int, n_out: int, n_layers: int) -> None:
            super().__init__()
            self.n_in, self.n_out, self.n_layers = n_in, n_out, n_layers
            self.n_hid = n_out // 4
            self.post_gain = 1 / (n_layers**2)
            self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
            self.res_path = nn.Sequential(
                OrderedDict(
                    [
                        ("relu_1", nn.ReLU()),
                        ("conv_1", Conv2d(n_in, self.n_hid, 3)),
                        ("relu_2", nn.ReLU()),
                        ("conv_2", Conv2d(self.n_hid, self.n_hid, 3)),
                        ("relu_3", nn.ReLU()),
                        ("conv_3", Conv2d(self.n_hid, self.n_hid, 3)),
                        ("relu_4", nn.ReLU()),
                        ("conv_4", Conv2d(self.n_hid, n_out, 1)),
                    ]
                )
            )

        def forward(self, x: Tensor) -> Tensor:
            return self.id_path(x) + self.post_gain * self.res_path(x)

    class Encoder(nn.Module):
        def __init__(self, n_hid: int = 256, n_blk_per_group: int = 2, vocab_size: int = 8192) -> None:
            super().__init__()
            self.group_count, self.n_hid, self.n_blk_per_group = 4, n_hid, n_blk_per_group
            self.input_channels, self.vocab_size = 3, vocab_size
            self.device, self.requires_grad, self.use_mixed_precision = torch.device("cpu"), False, True
            rng = range(n_blk_per_group)
            n_layers = 4 * n_blk_per_group

            def blk(a: int, b: int) -> EncoderBlock:
                return EncoderBlock(a, b, n_layers)

            h = n_hid
            self.blocks = nn.Sequential(
                OrderedDict(
                    [
                        ("input", Conv2d(3, h, 7)),
                        (
                            "group_1",
                            nn.Sequential(
                                OrderedDict(
                                    [*[(f"block_{i + 1}", blk(h, h)) for i in rng], ("pool", nn.MaxPool2d(2))]
                                )
                            ),
                        ),
                        (
                            "group_2",
                            nn.Sequential(
                                OrderedDict(
                                    [
                                        *[
                                            (f"block_{i + 1}", blk(h if i == 0 else 2 * h, 2 * h))
                                            for i in rng
                                        ],
                                        ("pool", nn.MaxPool2d(2)),
                                    ]
                                )
                            ),
                        ),
                        (
                            "group_3",
                            nn.Sequential(
                                OrderedDict(
                                    [
                                        *[
                                            (f"block_{i + 1}", blk(2 * h if i == 0 else 4 * h, 4 * h))
                                            for i in rng
                                        ],
                                        ("pool", nn.MaxPool2d(2)),
                                    ]
                                )
                            ),
                        ),
                        (
                            "group_4",
                            nn.Sequential(
                                OrderedDict(
                                    [
                                        *[
                                            (f"block_{i + 1}", blk(4 * h if i == 0 else 8 * h, 8 * h))
                                            for i in rng
                                        ]
                                    ]
                                )
                            ),
                        ),
                        (
                            "output",
                            nn.Sequential(
                                OrderedDict(
                                    [
                                        ("relu", nn.ReLU()),
                                        ("conv", Conv2d(8 * h, vocab_size, 1, use_float16=False)),
                                    ]
                                )
                            ),
                        ),
                    ]
                )
            )

        def forward(self, x: Tensor) -> Tensor:
            return self.blocks(x)

    for cls, mod in ((Conv2d, utils_mod), (EncoderBlock, enc_mod), (Encoder, enc_mod)):
        cls.__module__ = mod.__name__
        cls.__qualname__ = cls.__name__
        setattr(mod, cls.__name__, cls)
    pkg.encoder, pkg.utils = enc_mod, utils_mod
    return {"dall_e": pkg, "dall_e.encoder": enc_mod, "dall_e.utils": utils_mod}


@pytest.fixture(scope="module")
def fake_dall_e() -> Iterator[dict[str, types.ModuleType]]:
    mods = _make_fake_dall_e()
    yield mods
    for name in mods:
        sys.modules.pop(name, None)


def _save_with_fake(obj: object, path: Path, mods: dict[str, types.ModuleType], legacy: bool = False) -> None:
    """torch.save with the fake dall_e importable (pickle checks the class path), then remove it again."""
    assert not any(name in sys.modules for name in mods), "a dall_e package is already importable"
    sys.modules.update(mods)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # legacy save: "Couldn't retrieve source code for container"
            torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    finally:
        for name in mods:
            sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def original(fake_dall_e: dict[str, types.ModuleType]) -> nn.Module:
    torch.manual_seed(0)
    enc_cls = fake_dall_e["dall_e.encoder"].Encoder
    return enc_cls(n_hid=N_HID, n_blk_per_group=2, vocab_size=VOCAB).eval()


@pytest.fixture(scope="module")
def original_pkl(
    tmp_path_factory: pytest.TempPathFactory, original: nn.Module, fake_dall_e: dict[str, types.ModuleType]
) -> Path:
    path = tmp_path_factory.mktemp("dalle") / "encoder.pkl"
    _save_with_fake(original, path, fake_dall_e)
    return path


# ----------------------------------------------------------------------------------------------------------
# Conversion of the whole pickled module
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_convert_pickled_module_matches_original_exactly(
    tmp_path: Path, original: nn.Module, fake_dall_e: dict[str, types.ModuleType], legacy: bool
) -> None:
    src = tmp_path / "encoder.pkl"
    _save_with_fake(original, src, fake_dall_e, legacy=legacy)
    assert "dall_e" not in sys.modules and "dall_e.encoder" not in sys.modules

    sd = convert_openai_encoder(src, tmp_path / "out" / "dalle.safetensors")
    assert "dall_e" not in sys.modules, "conversion must not import or register a dall_e package"
    # as readable as any file the umask allows (safetensors alone writes 0600)
    assert (tmp_path / "out" / "dalle.safetensors").stat().st_mode & 0o777 == file_mode()
    ref = original.state_dict()
    assert list(sd) == list(ref)
    assert "blocks.group_2.block_1.id_path.w" in sd  # n_in != n_out
    assert not any(k.startswith("blocks.group_1.block_1.id_path") for k in sd)  # identity
    for k in ref:
        assert torch.equal(sd[k], ref[k]), k

    tok = DalleTokenizer.from_safetensors(tmp_path / "out" / "dalle.safetensors")
    cfg = tok.encoder.config
    assert (cfg.n_hid, cfg.vocab_size, cfg.n_blk_per_group, cfg.group_count) == (N_HID, VOCAB, 2, 4)
    x = torch.rand(2, 3, 32, 40)
    with torch.no_grad():
        expected = original(map_pixels(x))
        got = tok.encoder(map_pixels(x))
    assert got.shape == (2, VOCAB, 4, 5)
    assert torch.equal(got, expected)
    assert torch.equal(tok.get_codebook_indices(x), expected.argmax(1).flatten(1))


def test_safetensors_metadata_and_frozen(original_pkl: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    dst = tmp_path / "dalle.safetensors"
    convert_openai_encoder(original_pkl, dst)
    with safe_open(str(dst), framework="pt") as f:
        meta = f.metadata()
    import hashlib

    assert meta["source_sha256"] == hashlib.sha256(original_pkl.read_bytes()).hexdigest()
    assert meta["format"] == "pt"
    assert meta["source_format"] == "openai-pickled-module"
    assert meta["vocab_size"] == str(VOCAB)

    tok = DalleTokenizer.from_safetensors(dst)
    assert not tok.training and not tok.encoder.training
    assert all(not p.requires_grad for p in tok.parameters())
    tok.train()
    assert not tok.training and not tok.encoder.training


def test_plain_state_dict_is_accepted(tmp_path: Path, original: nn.Module) -> None:
    src = tmp_path / "sd.pth"
    torch.save({"state_dict": original.state_dict()}, src)
    sd = convert_openai_encoder(src, tmp_path / "sd.safetensors")
    for k, v in original.state_dict().items():
        assert torch.equal(sd[k], v)


def test_full_size_encoder_shape() -> None:
    enc = DalleEncoder(device="meta")  # the released sizes; meta keeps this instant
    assert enc.config.vocab_size == 8192 and enc.config.n_hid == 256
    sd = enc.state_dict()
    assert sd["blocks.input.w"].shape == (256, 3, 7, 7)
    assert sd["blocks.group_1.block_1.res_path.conv_1.w"].shape == (64, 256, 3, 3)
    assert sd["blocks.group_4.block_1.id_path.w"].shape == (2048, 1024, 1, 1)
    assert sd["blocks.output.conv.w"].shape == (8192, 2048, 1, 1)
    out = enc(torch.empty(2, 3, 112, 112, device="meta"))
    assert out.shape == (2, 8192, 14, 14)


# ----------------------------------------------------------------------------------------------------------
# Refusals and errors
# ----------------------------------------------------------------------------------------------------------


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["torch_zip", "torch_legacy", "raw_pickle"])
def test_malicious_pickle_is_refused_and_not_run(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    src = tmp_path / "encoder.pkl"
    if kind.startswith("torch"):
        payload = {"blocks.input.w": torch.zeros(1), "x": _Evil(marker)}
        torch.save(payload, src, _use_new_zipfile_serialization=kind == "torch_zip")
    else:
        src.write_bytes(pickle.dumps(_Evil(marker), protocol=2))
    with pytest.raises(UnsafePickleError, match=r"refused.*system"):
        convert_openai_encoder(src, tmp_path / "out.safetensors")
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()
    # the stand-ins were allowed only during the load
    assert not any("StandIn" in repr(g) for g in torch.serialization.get_safe_globals())


def test_truncated_and_missing_files(
    original_pkl: Path, tmp_path: Path, original: nn.Module, fake_dall_e: dict[str, types.ModuleType]
) -> None:
    legacy_pkl = tmp_path / "legacy.pkl"
    _save_with_fake(original, legacy_pkl, fake_dall_e, legacy=True)
    for src in (original_pkl, legacy_pkl):
        data = src.read_bytes()
        bad = tmp_path / "truncated.pkl"
        bad.write_bytes(data[: len(data) // 2])
        with pytest.raises(DalleWeightsError, match="truncated"):
            convert_openai_encoder(bad, tmp_path / "o.safetensors")
    empty = tmp_path / "empty.pkl"
    empty.write_bytes(b"")
    with pytest.raises(DalleWeightsError, match="empty"):
        convert_openai_encoder(empty, tmp_path / "o.safetensors")
    with pytest.raises(FileNotFoundError, match="not found"):
        convert_openai_encoder(tmp_path / "nope.pkl", tmp_path / "o.safetensors")
    with pytest.raises(FileNotFoundError, match="not found"):
        DalleTokenizer.from_safetensors(tmp_path / "nope.safetensors")

    good = tmp_path / "good.safetensors"
    convert_openai_encoder(original_pkl, good)
    st = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(st[: len(st) - 100])
    with pytest.raises(DalleWeightsError, match="damaged or truncated"):
        DalleTokenizer.from_safetensors(cut)


def test_command_line(original_pkl: Path, tmp_path: Path) -> None:
    assert main([str(original_pkl), str(tmp_path / "cli.safetensors")]) == 0
    assert DalleTokenizer.from_safetensors(tmp_path / "cli.safetensors").vocab_size == VOCAB
    assert main([str(tmp_path / "missing.pkl"), str(tmp_path / "x.safetensors")]) == 1


def test_unknown_content_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "other.pth"
    torch.save({"head.weight": torch.zeros(2, 2)}, src)
    with pytest.raises(DalleWeightsError, match="missing 'blocks.input.w'"):
        convert_openai_encoder(src, tmp_path / "o.safetensors")
    torch.save([1, 2, 3], src)
    with pytest.raises(DalleWeightsError, match="unknown content"):
        convert_openai_encoder(src, tmp_path / "o.safetensors")


def test_shape_mismatch_is_refused(tmp_path: Path, original: nn.Module) -> None:
    sd = dict(original.state_dict())
    sd["blocks.group_2.block_1.res_path.conv_2.w"] = torch.zeros(3, 3, 3, 3)
    src = tmp_path / "sd.pth"
    torch.save(sd, src)
    with pytest.raises(DalleWeightsError, match="do not fit"):
        convert_openai_encoder(src, tmp_path / "o.safetensors")


# ----------------------------------------------------------------------------------------------------------
# map_pixels, get_codebook_indices, the second view
# ----------------------------------------------------------------------------------------------------------


def test_map_pixels_values() -> None:
    x = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(map_pixels(x), torch.tensor([0.1, 0.5, 0.9]))
    assert torch.allclose(map_pixels(x), 0.8 * x + 0.1)
    assert torch.allclose(map_pixels(x, eps=0.0), x)


def test_get_codebook_indices_shape_dtype_range_and_row_major() -> None:
    torch.manual_seed(0)
    enc = DalleEncoder(n_hid=N_HID, vocab_size=VOCAB, n_blk_per_group=1)
    tok = DalleTokenizer(enc)
    x = torch.rand(3, 3, 24, 40)
    ids = tok.get_codebook_indices(x)
    assert ids.dtype == torch.long and ids.shape == (3, 3 * 5)
    assert int(ids.min()) >= 0 and int(ids.max()) < VOCAB
    with torch.no_grad():
        logits = enc(0.8 * x + 0.1)
    grid = logits.argmax(1)  # [B, 3, 5]
    for b in range(3):
        for r in range(3):
            for c in range(5):
                assert ids[b, r * 5 + c] == grid[b, r, c]
    with pytest.raises(ValueError, match="multiples of 8"):
        tok.get_codebook_indices(torch.rand(1, 3, 20, 24))


def test_second_view() -> None:
    view = DalleSecondView()
    img = Image.new("RGB", (150, 97), (255, 0, 128))
    out = view(img)
    assert out.shape == (3, 112, 112) and out.dtype == torch.float32
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    assert torch.allclose(out[:, 50, 50], torch.tensor([1.0, 0.0, 128 / 255]))  # no mean/std
    ref = img.resize((112, 112), Image.Resampling.LANCZOS)
    assert torch.equal(
        (out * 255).round().to(torch.uint8).permute(1, 2, 0),
        torch.frombuffer(bytearray(ref.tobytes()), dtype=torch.uint8).view(112, 112, 3),
    )
    assert view(img.convert("L")).shape == (3, 112, 112)
    with pytest.raises(TypeError):
        view(torch.rand(3, 10, 10))  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_half_precision_matches_original(
    original: nn.Module, original_pkl: Path, tmp_path: Path
) -> None:
    dst = tmp_path / "dalle.safetensors"
    convert_openai_encoder(original_pkl, dst)
    tok = DalleTokenizer.from_safetensors(dst, device="cuda")
    ref = original.cuda()
    try:
        x = torch.rand(4, 3, 64, 64, device="cuda")
        with torch.no_grad():
            expected = ref(map_pixels(x))
            got = tok.encoder(map_pixels(x))
        assert got.dtype == torch.float32  # output conv runs in float32, as in the original
        assert torch.equal(got, expected)
        assert torch.equal(tok.get_codebook_indices(x), expected.argmax(1).flatten(1))
        with torch.autocast("cuda", dtype=torch.bfloat16):  # the caller's autocast does not leak in
            assert torch.equal(tok.get_codebook_indices(x), expected.argmax(1).flatten(1))
    finally:
        original.cpu()
