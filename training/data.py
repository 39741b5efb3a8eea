"""Datasets and the pretraining transform.

Every random choice for a sample (flip, crop box, mask) comes from a generator seeded by
``(seed, epoch, index)``. The data a step sees therefore depends only on the seed, the epoch and the
sampler's order, not on the number of loader workers, processes or restarts: that is what makes
``--resume`` and 1-process vs N-process runs reproduce each other exactly.
"""

from __future__ import annotations

import gzip
import io
import logging
import math
import random
import struct
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .masking import build_mask_generator

_logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Fashion-MNIST train-set pixel statistics (gray replicated to 3 channels).
FMNIST_MEAN = (0.2860, 0.2860, 0.2860)
FMNIST_STD = (0.3530, 0.3530, 0.3530)
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_VAL_SIZE = 10_000  # fashion-mnist-val: held out from the end of the train split
FMNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def normalization_for(
    dataset: str, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std for a dataset spec: explicit values win, else Fashion-MNIST's statistics for
    ``fashion-mnist``, else ImageNet's (the official recipes). The one rule training, eval and export
    share."""
    fm = dataset.startswith("fashion-mnist")
    return (
        tuple(mean) if mean else (FMNIST_MEAN if fm else IMAGENET_MEAN),
        tuple(std) if std else (FMNIST_STD if fm else IMAGENET_STD),
    )


class DataError(ValueError):
    """A dataset path or file is missing or malformed; the message says which and what was expected."""


# ---------------------------------------------------------------------------------------------- sources
def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped), the format of (Fashion-)MNIST."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: not found (Fashion-MNIST: `apt-get install dataset-fashion-mnist`)")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path}: not an IDX file")
    dtype = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}.get(data[2])
    if dtype is None:
        raise DataError(f"{path}: unknown IDX element type 0x{data[2]:02x}")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim)
    if arr.size != math.prod(shape):
        raise DataError(f"{path}: truncated ({arr.size} elements, header says {math.prod(shape)})")
    return arr.reshape(shape)


class FashionMNIST(Dataset):
    """Fashion-MNIST from the Debian package's idx files. Items: (PIL RGB image 28x28, label)."""

    classes = FMNIST_CLASSES

    def __init__(self, root: str | Path = FMNIST_DIR, split: str = "train") -> None:
        if split not in ("train", "test"):
            raise DataError(f"split must be 'train' or 'test', got {split!r}")
        root = Path(root)
        prefix = "train" if split == "train" else "t10k"

        def find(stem: str) -> Path:
            for name in (
                f"{prefix}-{stem}-ubyte.gz",
                f"{prefix}-{stem}-ubyte",
                f"{prefix}-{stem}.idx3-ubyte",
            ):
                if (root / name).exists():
                    return root / name
            raise DataError(f"{root}: no {prefix}-{stem}-ubyte[.gz] (install dataset-fashion-mnist)")

        self.images = read_idx(find("images-idx3"))
        self.labels = read_idx(find("labels-idx1")).astype(np.int64)
        if len(self.images) != len(self.labels):
            raise DataError(f"{root}: {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[i], mode="L").convert("RGB"), int(self.labels[i])

    def take(self, rows: slice) -> FashionMNIST:
        """A view of ``rows`` (e.g. the validation hold-out of the train split), same class list."""
        out = object.__new__(FashionMNIST)
        out.images, out.labels = self.images[rows], self.labels[rows]
        return out


class ImageFolderDataset(Dataset):
    """ImageNet layout: ``root/<class>/<image>``. Items: (PIL RGB image, class index)."""

    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: not a directory (expected root/<class>/<image>)")
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        if not self.classes:
            raise DataError(f"{root}: no class sub-directories")
        self.samples = [
            (p, ci)
            for ci, c in enumerate(self.classes)
            for p in sorted((root / c).rglob("*"))
            if p.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not self.samples:
            raise DataError(f"{root}: no images with extensions {IMAGE_EXTENSIONS}")
        self.labels = np.array([c for _, c in self.samples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        path, label = self.samples[i]
        with Image.open(path) as im:
            return im.convert("RGB"), label


def _split_for_worker(items: Sequence[Any], rank: int, world: int) -> list[Any]:
    info = get_worker_info()
    wid, nw = (info.id, info.num_workers) if info else (0, 1)
    return list(items)[rank * nw + wid :: world * nw]


class WebDatasetShards(IterableDataset):
    """WebDataset tar shards (``{key}.jpg``/``.png``/... plus optional ``{key}.cls``), streamed.

    Shards are split across ranks and loader workers; within a worker samples pass through a seeded
    shuffle buffer. Items: (PIL RGB image, label or -1, global sample key hash used as the index).
    """

    def __init__(
        self,
        shards: Sequence[str | Path] | str,
        rank: int = 0,
        world: int = 1,
        shuffle_buffer: int = 1000,
        seed: int = 0,
    ) -> None:
        if isinstance(shards, str):
            shards = expand_shards(shards)
        self.shards = [Path(s) for s in shards]
        missing = [str(s) for s in self.shards if not s.exists()]
        if missing:
            raise DataError(f"missing shards: {missing[:5]}")
        self.rank, self.world, self.shuffle_buffer, self.seed = rank, world, shuffle_buffer, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _samples(self, shard: Path) -> Iterator[tuple[Image.Image, int, int]]:
        with tarfile.open(shard) as tar:
            group: dict[str, dict[str, bytes]] = {}
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.rpartition(".")
                f = tar.extractfile(member)
                if f is not None:
                    group.setdefault(key, {})[ext.lower()] = f.read()
            for key, parts in group.items():
                img_bytes = next((parts[e] for e in ("jpg", "jpeg", "png", "webp") if e in parts), None)
                if img_bytes is None:
                    continue
                try:
                    with Image.open(io.BytesIO(img_bytes)) as im:
                        img = im.convert("RGB")
                except Exception as e:  # a bad sample must not end the run
                    _logger.warning("%s: skipping undecodable sample %s (%s)", shard, key, e)
                    continue
                label = int(parts["cls"].decode().strip()) if "cls" in parts else -1
                yield img, label, hash((shard.name, key)) & 0x7FFFFFFF

    def __iter__(self) -> Iterator[tuple[Image.Image, int, int]]:
        rng = random.Random(hash((self.seed, self.epoch, self.rank)))
        shards = list(self.shards)
        random.Random(self.seed + self.epoch).shuffle(shards)
        buf: list[tuple[Image.Image, int, int]] = []
        for shard in _split_for_worker(shards, self.rank, self.world):
            for sample in self._samples(shard):
                buf.append(sample)
                if len(buf) >= self.shuffle_buffer:
                    yield buf.pop(rng.randrange(len(buf)))
        rng.shuffle(buf)
        yield from buf


def expand_shards(spec: str) -> list[str]:
    """``data/shard-{000000..000099}.tar`` brace notation (or a glob) -> list of paths."""
    import glob
    import re

    m = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
    if m:
        lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
        return [spec[: m.start()] + str(i).zfill(width) + spec[m.end() :] for i in range(lo, hi + 1)]
    return sorted(glob.glob(spec))


class ShiftedDataset(Dataset):
    """Each image shrunk to a side fraction in ``scale`` and pasted at a random place on a canvas of its
    corner colour, seeded by (seed, index): garments that are not framed like the training images (small,
    off-centre), as a user's loose crop is. Same size and labels as ``source``."""

    SCALE = (0.55, 0.85)

    def __init__(self, source: Dataset, scale: tuple[float, float] = SCALE, seed: int = 0) -> None:
        self.source, self.scale, self.seed = source, scale, seed
        self.classes = getattr(source, "classes", None)
        self.labels = getattr(source, "labels", None)

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        img, label = self.source[i]
        rng = np.random.default_rng([self.seed, i])
        side = max(1, int(round(min(img.size) * rng.uniform(*self.scale))))
        inner = img.resize((side, side), Image.Resampling.BICUBIC)
        canvas = Image.new(img.mode, img.size, img.getpixel((0, 0)))
        canvas.paste(
            inner, (int(rng.integers(0, img.width - side + 1)), int(rng.integers(0, img.height - side + 1)))
        )
        return canvas, label


def build_source(dataset: str, split: str = "train") -> Dataset:
    """``fashion-mnist[:ROOT]``, ``fashion-mnist-shifted[:ROOT]`` (the train split as is, the test split
    through :class:`ShiftedDataset`), ``fashion-mnist-val[:ROOT]`` (train split minus its last 10k -> those
    10k, for choosing recipes without touching the test set), ``imagefolder:PATH`` (``PATH/train``,
    ``PATH/val`` when present)."""
    kind, _, arg = dataset.partition(":")
    if kind == "fashion-mnist":
        return FashionMNIST(arg or FMNIST_DIR, split="train" if split == "train" else "test")
    if kind == "fashion-mnist-val":
        # recipe selection without the test set: the train split's last FMNIST_VAL_SIZE images are held out
        full = FashionMNIST(arg or FMNIST_DIR, split="train")
        cut = len(full) - FMNIST_VAL_SIZE
        return full.take(slice(0, cut) if split == "train" else slice(cut, None))
    if kind == "fashion-mnist-shifted":
        if split == "train":
            return FashionMNIST(arg or FMNIST_DIR, split="train")
        return ShiftedDataset(FashionMNIST(arg or FMNIST_DIR, split="test"))
    if kind == "imagefolder":
        if not arg:
            raise DataError("imagefolder needs a path: imagefolder:PATH")
        root = Path(arg)
        sub = root / ("train" if split == "train" else "val")
        return ImageFolderDataset(sub if sub.is_dir() else root)
    raise DataError(
        f"unknown dataset {dataset!r}; use fashion-mnist, fashion-mnist-shifted, fashion-mnist-val, "
        "imagefolder:PATH or webdataset:SHARDS"
    )


# ---------------------------------------------------------------------------------------------- transforms
@dataclass
class TransformConfig:
    img_size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    second_size: int | None = None  # tokenizer view (112 for DALL-E); None = no second view
    zoom_out: tuple[float, float] = (0.4, 1.0)  # side fraction of the pasted crop when zooming out
    zoom_out_prob: float = 0.0
    jitter: float = 0.0  # brightness/contrast strength, applied with probability 0.8
    two_views: bool = False  # also an independently augmented ``images2`` (instance-level objective)


def random_resized_crop_box(
    w: int, h: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """(top, left, height, width) as torchvision's RandomResizedCrop.get_params, but from ``rng``."""
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        ar = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * ar)))
        ch = int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def to_tensor(img: Image.Image) -> Tensor:
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    return (x - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)


class PretrainTransform:
    """The official pretraining augmentation: flip, one RandomResizedCrop box shared by the encoder view
    (bicubic, mean/std) and the tokenizer view (Lanczos, [0, 1], no mean/std).

    Options beside the official path (each draws no random numbers when off): zoom-out (the crop shrunk
    and pasted at a random place on a canvas of the image's corner colour, so the model also sees
    small, off-centre objects), brightness/contrast jitter, and a second independent view."""

    def __init__(self, cfg: TransformConfig) -> None:
        self.cfg = cfg

    def _geometry(
        self, img: Image.Image, rng: np.random.Generator
    ) -> tuple[bool, tuple[int, int, int, int], Any]:
        c = self.cfg
        flip = bool(rng.random() < c.hflip)
        top, left, ch, cw = random_resized_crop_box(img.width, img.height, c.scale, c.ratio, rng)
        paste = None
        if c.zoom_out_prob > 0 and rng.random() < c.zoom_out_prob:
            frac = float(rng.uniform(*c.zoom_out))
            paste = (
                frac,
                float(rng.random()),
                float(rng.random()),
            )  # side fraction, x and y position in [0, 1]
        return flip, (left, top, left + cw, top + ch), paste

    @staticmethod
    def _render(
        img: Image.Image, size: int, box: tuple[int, int, int, int], paste: Any, resample: Any
    ) -> Image.Image:
        if paste is None:
            return img.resize((size, size), resample, box=box)
        frac, px, py = paste
        side = max(1, int(round(size * frac)))
        inner = img.resize((side, side), resample, box=box)
        canvas = Image.new(img.mode, (size, size), img.getpixel((0, 0)))
        canvas.paste(inner, (int(round(px * (size - side))), int(round(py * (size - side)))))
        return canvas

    def _photometric(self, view: Image.Image, rng: np.random.Generator) -> Image.Image:
        j = self.cfg.jitter
        if j > 0 and rng.random() < 0.8:
            from PIL import ImageEnhance

            view = ImageEnhance.Brightness(view).enhance(float(rng.uniform(1 - j, 1 + j)))
            view = ImageEnhance.Contrast(view).enhance(float(rng.uniform(1 - j, 1 + j)))
        return view

    def view(self, img: Image.Image, rng: np.random.Generator, second: bool = False) -> dict[str, Tensor]:
        c = self.cfg
        flip, box, paste = self._geometry(img, rng)
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        view = self._photometric(self._render(img, c.img_size, box, paste, Image.Resampling.BICUBIC), rng)
        out = {"images": normalize(to_tensor(view), c.mean, c.std)}
        if c.second_size and second:
            tok = self._render(img, c.second_size, box, paste, Image.Resampling.LANCZOS)
            out["tokenizer_images"] = to_tensor(tok)
        return out

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> dict[str, Tensor]:
        out = self.view(img, rng, second=True)
        if self.cfg.two_views:
            out["images2"] = self.view(img, rng)["images"]
        return out


class EvalTransform:
    """Resize (shorter side to img_size / crop_pct, bicubic) + center crop + mean/std."""

    def __init__(
        self, img_size: int, mean: Sequence[float], std: Sequence[float], crop_pct: float = 1.0
    ) -> None:
        self.img_size, self.mean, self.std, self.crop_pct = img_size, mean, std, crop_pct

    def __call__(self, img: Image.Image) -> Tensor:
        size = int(round(self.img_size / self.crop_pct))
        w, h = img.size
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
        left, top = (img.width - self.img_size) // 2, (img.height - self.img_size) // 2
        img = img.crop((left, top, left + self.img_size, top + self.img_size))
        return normalize(to_tensor(img), self.mean, self.std)


class PretrainDataset(Dataset):
    """A labeled source + the pretraining transform + a mask per sample, all seeded by (seed, epoch, i)."""

    def __init__(
        self,
        source: Dataset,
        transform: PretrainTransform,
        mask_kind: str,
        grid: tuple[int, int],
        num_masking_patches: int,
        min_num_patches: int = 16,
        seed: int = 0,
    ) -> None:
        self.source, self.transform, self.seed = source, transform, seed
        self.mask_gen = build_mask_generator(
            mask_kind,
            grid,
            num_masking_patches=num_masking_patches,
            min_num_patches=min_num_patches,
            seed=seed,
        )
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    def sample(self, img: Image.Image, index: int) -> dict[str, Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        out = self.transform(img, rng)
        self.mask_gen.reseed(int(rng.integers(0, 2**31 - 1)))
        out["mask"] = torch.from_numpy(np.asarray(self.mask_gen(), dtype=bool).reshape(-1))
        return out

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        img, _ = self.source[index]
        return self.sample(img, index)


class PretrainShards(IterableDataset):
    """WebDataset shards through the same per-sample transform and masking."""

    def __init__(self, shards: WebDatasetShards, inner: PretrainDataset) -> None:
        self.shards, self.inner = shards, inner

    def set_epoch(self, epoch: int) -> None:
        self.shards.set_epoch(epoch)
        self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        for img, _, key in self.shards:
            yield self.inner.sample(img, key)


class TransformedDataset(Dataset):
    """(PIL, label) source -> (tensor, label) through ``transform``."""

    def __init__(self, source: Dataset, transform: Callable[[Image.Image], Tensor]) -> None:
        self.source, self.transform = source, transform
        self.classes = getattr(source, "classes", None)

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        img, label = self.source[i]
        return self.transform(img), label
