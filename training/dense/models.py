"""Dense heads on the CAE encoder, as in the paper's semantic-segmentation and detection setups.

* :class:`CAEPyramid`: features of four encoder blocks (base: 3, 5, 7, 11; spread the same way for other
  depths) turned into a 4-level pyramid at strides patch/4, patch/2, patch, 2*patch (transposed convs x4
  and x2, identity, max-pool), as BEiT/CAE's semantic-segmentation and detection backbones do. The fixed
  position table is interpolated when the dense task runs at another input size than pretraining.
* :class:`UperNetHead` (+ :class:`FCNHead` as the auxiliary head) and :class:`LinearSegHead` (a light
  option: BatchNorm + 1x1 conv on the last block's patch tokens), combined in :class:`CAESegmenter`.
* :func:`build_mask_rcnn`: torchvision's Mask R-CNN with an FPN on the pyramid, sized for small inputs.

The encoder is the same :class:`training.models.cae.Encoder` that pretraining and the service use.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.cae import Encoder
from ..models.layers import resample_abs_pos_embed

__all__ = [
    "CAEPyramid",
    "UperNetHead",
    "FCNHead",
    "LinearSegHead",
    "CAESegmenter",
    "build_mask_rcnn",
    "pyramid_indices",
]


def pyramid_indices(depth: int) -> list[int]:
    """Blocks whose outputs feed the pyramid: 1-based depth/3, depth/2, 2*depth/3, depth (base 12 ->
    0-based 3, 5, 7, 11; large 24 -> 7, 11, 15, 23, the official choices)."""
    if depth < 4:
        raise ValueError(f"a 4-level pyramid needs an encoder of depth >= 4, got {depth}")
    ids = [
        max(round(depth / 3), 1) - 1,
        max(round(depth / 2), 2) - 1,
        max(round(2 * depth / 3), 3) - 1,
        depth - 1,
    ]
    for i in range(1, 4):  # keep them strictly increasing for shallow encoders
        ids[i] = max(ids[i], ids[i - 1] + 1)
    return ids


def _conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class CAEPyramid(nn.Module):
    """CAE encoder -> 4 feature maps [B, D, H*4/p, ...], [B, D, H*2/p], [B, D, H/p], [B, D, H/(2p)] (BEiT's);
    with ``finest_stride=p/2`` one octave coarser: [B, D, H*2/p], [B, D, H/p], [B, D, H/(2p)],
    [B, D, H/(4p)]."""

    def __init__(
        self,
        encoder: Encoder,
        img_size: int,
        out_indices: list[int] | None = None,
        finest_stride: int | None = None,
    ) -> None:
        super().__init__()
        cfg = encoder.cfg
        if img_size % cfg.patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of the patch size {cfg.patch_size}")
        self.encoder = encoder
        self.img_size = img_size
        self.patch_size = cfg.patch_size
        self.grid = (img_size // cfg.patch_size, img_size // cfg.patch_size)
        if self.grid[0] % 2:
            raise ValueError(
                f"the pyramid's max-pool level needs an even patch grid, got {self.grid} at {img_size} px"
            )
        self.out_indices = out_indices or pyramid_indices(cfg.depth)
        d = cfg.embed_dim
        # The dense task's own (interpolated) table, trained or not like the encoder's (a fixed buffer); a
        # copy, never the encoder's tensor itself.
        table = resample_abs_pos_embed(encoder.pos_embed, self.grid).clone()
        self.register_buffer("pos_embed", table, persistent=True)
        p = cfg.patch_size
        beit = p // 4 or 1
        finest = beit if finest_stride is None else finest_stride
        self.out_channels = [d, d, d, d]
        if finest == beit:  # BEiT/CAE: x4, x2, x1, /2 of the patch grid
            self.fpn1: nn.Module = nn.Sequential(
                nn.ConvTranspose2d(d, d, 2, 2), nn.BatchNorm2d(d), nn.GELU(), nn.ConvTranspose2d(d, d, 2, 2)
            )
            self.fpn2: nn.Module = nn.ConvTranspose2d(d, d, 2, 2)
            self.fpn3: nn.Module = nn.Identity()
            self.fpn4: nn.Module = nn.MaxPool2d(2, 2)
            self.strides = [beit, max(p // 2, 1), p, p * 2]
        elif finest == p // 2 and p >= 2:
            # One octave coarser (x2, x1, /2, /4): for small patches (p=4 puts BEiT's finest level at the
            # input's full resolution, where the 192-channel maps cost more than the encoder itself).
            if self.grid[0] % 4 or self.grid[1] % 4:
                raise ValueError(f"finest_stride {finest} needs a patch grid divisible by 4, got {self.grid}")
            self.fpn1 = nn.ConvTranspose2d(d, d, 2, 2)
            self.fpn2 = nn.Identity()
            self.fpn3 = nn.MaxPool2d(2, 2)
            self.fpn4 = nn.MaxPool2d(4, 4)
            self.strides = [p // 2, p, 2 * p, 4 * p]
        else:
            raise ValueError(
                f"finest_stride must be patch/4 ({beit}, BEiT's pyramid) or patch/2 ({p // 2}), got {finest}"
            )

    @property
    def num_layers(self) -> int:
        return self.encoder.cfg.depth

    def tokens(self, x: Tensor) -> list[Tensor]:
        """Raw outputs [B, N, D] of the selected blocks (no cls, no final norm, as BEiT/CAE take them)."""
        if x.dim() != 4 or tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(
                f"expected images [B, C, {self.img_size}, {self.img_size}], got {tuple(x.shape)}"
            )
        enc = self.encoder
        _, inter = enc.forward_intermediates(
            enc.patch_embed(x),
            None,
            self.out_indices,
            final_norm=False,
            pos_embed=self.pos_embed,
            stop_early=True,
        )
        return [h[:, 1:] for h in inter]

    def forward(self, x: Tensor) -> list[Tensor]:
        b = x.shape[0]
        gh, gw = self.grid
        maps = [t.transpose(1, 2).reshape(b, -1, gh, gw) for t in self.tokens(x)]
        return [op(m) for op, m in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), maps, strict=True)]


class PPM(nn.Module):
    """Pyramid pooling module of UperNet (adaptive average pools at several scales)."""

    def __init__(self, cin: int, channels: int, scales: tuple[int, ...]) -> None:
        super().__init__()
        self.scales = scales
        self.stages = nn.ModuleList(_conv_bn_relu(cin, channels, 1) for _ in scales)

    def forward(self, x: Tensor) -> list[Tensor]:
        size = x.shape[-2:]
        return [
            F.interpolate(stage(F.adaptive_avg_pool2d(x, s)), size=size, mode="bilinear", align_corners=False)
            for s, stage in zip(self.scales, self.stages, strict=True)
        ]


class UperNetHead(nn.Module):
    """UperNet (Xiao et al. 2018) as mmsegmentation's UPerHead: PPM on the coarsest level, a top-down FPN,
    all levels fused at the finest resolution, 3x3 bottleneck, dropout, 1x1 classifier."""

    def __init__(
        self,
        in_channels: list[int],
        channels: int,
        num_classes: int,
        pool_scales: tuple[int, ...] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.ppm = PPM(in_channels[-1], channels, pool_scales)
        self.bottleneck = _conv_bn_relu(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(_conv_bn_relu(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(_conv_bn_relu(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = _conv_bn_relu(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: list[Tensor]) -> Tensor:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats[:-1], strict=True)]
        laterals.append(self.bottleneck(torch.cat([feats[-1], *self.ppm(feats[-1])], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="bilinear", align_corners=False
            )
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals[:-1], strict=True)] + [laterals[-1]]
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [
            F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs[1:]
        ]
        return self.cls(self.dropout(self.fpn_bottleneck(torch.cat(outs, dim=1))))


class FCNHead(nn.Module):
    """The auxiliary head (mmsegmentation FCNHead, one conv): on pyramid level ``in_index``."""

    def __init__(
        self, cin: int, channels: int, num_classes: int, in_index: int = 2, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.in_index = in_index
        self.conv = _conv_bn_relu(cin, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: list[Tensor]) -> Tensor:
        return self.cls(self.dropout(self.conv(feats[self.in_index])))


class LinearSegHead(nn.Module):
    """Light option: BatchNorm + 1x1 conv on the last selected block's patch grid (linear probe per patch)."""

    def __init__(self, cin: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.cls = nn.Conv2d(cin, num_classes, 1)

    def forward(self, feats: list[Tensor]) -> Tensor:
        return self.cls(self.bn(feats[2]))


class CAESegmenter(nn.Module):
    """Encoder pyramid + decode head (+ auxiliary head in training). ``forward`` returns logits at the
    input resolution [B, C, H, W]; ``forward_train`` also returns the auxiliary logits."""

    def __init__(
        self,
        backbone: CAEPyramid,
        num_classes: int,
        head: str = "upernet",
        channels: int = 128,
        aux_weight: float = 0.4,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.head_type = head
        if head == "upernet":
            self.decode_head: nn.Module = UperNetHead(backbone.out_channels, channels, num_classes)
            self.aux_head: nn.Module | None = FCNHead(
                backbone.out_channels[2], max(channels // 2, 16), num_classes
            )
        elif head == "linear":
            self.decode_head = LinearSegHead(backbone.out_channels[2], num_classes)
            self.aux_head = None
        else:
            raise ValueError(f"unknown segmentation head {head!r}; use upernet or linear")
        self.aux_weight = aux_weight if self.aux_head is not None else 0.0

    @property
    def num_layers(self) -> int:
        return self.backbone.num_layers

    def forward_train(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        feats = self.backbone(x)
        size = x.shape[-2:]
        out = F.interpolate(self.decode_head(feats), size=size, mode="bilinear", align_corners=False)
        aux = None
        if self.aux_head is not None:
            aux = F.interpolate(self.aux_head(feats), size=size, mode="bilinear", align_corners=False)
        return out, aux

    def forward(self, x: Tensor) -> Tensor:
        feats = self.backbone(x)
        return F.interpolate(self.decode_head(feats), size=x.shape[-2:], mode="bilinear", align_corners=False)

    def loss(self, x: Tensor, target: Tensor, ignore_index: int = 255) -> dict[str, Tensor]:
        out, aux = self.forward_train(x)
        main = F.cross_entropy(out.float(), target.long(), ignore_index=ignore_index)
        res = {"loss_seg": main}
        total = main
        if aux is not None and self.aux_weight:
            res["loss_aux"] = F.cross_entropy(aux.float(), target.long(), ignore_index=ignore_index)
            total = total + self.aux_weight * res["loss_aux"]
        res["loss"] = total
        return res


class _PyramidFPN(nn.Module):
    """torchvision detection backbone: the CAE pyramid + an FPN (+ a max-pooled 5th level for the RPN)."""

    def __init__(self, pyramid: CAEPyramid, out_channels: int) -> None:
        super().__init__()
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

        self.body = pyramid
        self.fpn = FeaturePyramidNetwork(pyramid.out_channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    @property
    def num_layers(self) -> int:
        return self.body.num_layers

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


def build_mask_rcnn(
    pyramid: CAEPyramid,
    num_classes: int,
    fpn_channels: int = 128,
    representation: int = 256,
    mask_channels: int = 64,
    detections_per_img: int = 50,
    **kwargs: Any,
) -> nn.Module:
    """torchvision Mask R-CNN on the CAE pyramid, sized for small inputs: anchors from 2 px strides up,
    no resizing inside the model (min = max = the pyramid's input size), inputs already normalized.

    ``num_classes`` counts the background (K object classes -> K + 1)."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign

    backbone = _PyramidFPN(pyramid, fpn_channels)
    s = pyramid.img_size
    # One anchor size per level (5 with the pooled level): 8 px on the finest, doubling per level, whatever
    # the finest stride (a coarser pyramid keeps the small anchors that a tenth-of-a-side garment needs).
    base = pyramid.patch_size // 4 or 1  # BEiT's finest stride
    sizes = tuple((8 * base * 2**i,) for i in range(5))
    anchors = AnchorGenerator(sizes=sizes, aspect_ratios=((0.5, 1.0, 2.0),) * len(sizes))
    names = ["0", "1", "2", "3"]
    model = MaskRCNN(
        backbone,
        num_classes=None,
        min_size=s,
        max_size=s,
        image_mean=[0.0, 0.0, 0.0],  # the dataset transform already normalized the images
        image_std=[1.0, 1.0, 1.0],
        rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(fpn_channels * 7 * 7, representation),
        box_predictor=FastRCNNPredictor(representation, num_classes),
        mask_roi_pool=MultiScaleRoIAlign(names, output_size=14, sampling_ratio=2),
        mask_head=MaskRCNNHeads(fpn_channels, (mask_channels,) * 4, 1),
        mask_predictor=MaskRCNNPredictor(mask_channels, mask_channels, num_classes),
        box_detections_per_img=detections_per_img,
        # Scenes hold a handful of objects: far fewer proposals and sampled RoIs than COCO's defaults
        # (2000/1000 proposals, 512 RoIs) lose nothing and cut the RoI heads' cost several-fold.
        **{
            "rpn_pre_nms_top_n_train": 600,
            "rpn_post_nms_top_n_train": 300,
            "rpn_pre_nms_top_n_test": 300,
            "rpn_post_nms_top_n_test": 150,
            "rpn_batch_size_per_image": 128,
            "box_batch_size_per_image": 128,
            **kwargs,
        },
    )
    model.num_layers = pyramid.num_layers  # for layer-wise lr decay
    return model
