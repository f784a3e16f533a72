"""DINOv2 ViT-S/14 in plain torch: (B, 3, H, W) normalized -> (B, H // 14, W // 14, 384) patch tokens.

Parameter names follow Meta's reference layout (``dinov2_vits14_pretrain.pth``), so Meta weights load
almost as they are; the Hugging Face layout (``facebook/dinov2-small``) goes through
``remap_dinov2_hf``. Both end in ``load_state_dict(strict=True)``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.backbones.base import Backbone, BackboneInfo, FeatureLayout, file_sha256, load_weights_file
from engine.errors import WeightsError

__all__ = [
    "DinoV2ViTS14",
    "detect_layout",
    "load_dinov2",
    "remap_dinov2_hf",
    "remap_dinov2_meta",
]

logger = logging.getLogger(__name__)

_PATCH = 14
_DIM = 384
_DEPTH = 12
_HEADS = 6
_MLP_RATIO = 4
_EPS = 1e-6
_TRAIN_GRID = 37  # positions were learnt on 518 x 518 inputs: 37 x 37 patches + 1 class token


class _PatchEmbed(nn.Module):
    """(B, 3, H, W) -> (B, N, D) with N = (H // 14) * (W // 14), row-major over the (h, w) grid."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, _DIM, kernel_size=_PATCH, stride=_PATCH)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)  # B D h w
        return x.flatten(2).transpose(1, 2)  # B N D


class _Attention(nn.Module):
    """(B, N, D) -> (B, N, D); one fused qkv Linear, as in Meta's layout."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(_DIM, 3 * _DIM)
        self.proj = nn.Linear(_DIM, _DIM)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, _HEADS, D // _HEADS)  # B N 3 heads Dh
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each B heads N Dh
        x = F.scaled_dot_product_attention(q, k, v)  # B heads N Dh
        x = x.transpose(1, 2).reshape(B, N, D)  # B N D
        return self.proj(x)


class _Mlp(nn.Module):
    """(B, N, D) -> (B, N, D) through a 4 * D hidden layer with exact GELU."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(_DIM, _MLP_RATIO * _DIM)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(_MLP_RATIO * _DIM, _DIM)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _LayerScale(nn.Module):
    """(..., D) -> (..., D), scaled per channel by ``gamma``."""

    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(_DIM))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class _Block(nn.Module):
    """(B, N, D) -> (B, N, D): pre-norm attention and MLP, each with LayerScale on its branch."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(_DIM, eps=_EPS)
        self.attn = _Attention()
        self.ls1 = _LayerScale()
        self.norm2 = nn.LayerNorm(_DIM, eps=_EPS)
        self.mlp = _Mlp()
        self.ls2 = _LayerScale()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoV2ViTS14(Backbone):
    """DINOv2 ViT-S/14 (no registers): (B, 3, H, W) normalized -> (B, H // 14, W // 14, 384).

    Args:
        input_size: side in pixels that the engine feeds (recorded in ``info``); a multiple of 14.
        block: None for the last block's patch tokens; an int ``i`` (0-based) for the output of
            block ``i``. Both pass through the final LayerNorm.
        weights_sha256: sha256 of the weights file, recorded in ``info``.
    """

    def __init__(self, input_size: int = 448, block: int | None = None, weights_sha256: str = "") -> None:
        super().__init__()
        if input_size <= 0 or input_size % _PATCH:
            raise ValueError(f"input_size must be a positive multiple of {_PATCH}, got {input_size}")
        if block is not None and not 0 <= block < _DEPTH:
            raise ValueError(f"block must be None or in 0..{_DEPTH - 1}, got {block}")
        self.block = block
        self.info = BackboneInfo(
            name="dinov2_vits14",
            weights_sha256=weights_sha256,
            stride=_PATCH,
            input_size=input_size,
            feature_dim=_DIM,
            mean=(0.485 * 255, 0.456 * 255, 0.406 * 255),
            std=(0.229 * 255, 0.224 * 255, 0.225 * 255),
        )
        self.layout = FeatureLayout(levels=(_PATCH,), aggregation=1)
        self.patch_embed = _PatchEmbed()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, _DIM))
        self.pos_embed = nn.Parameter(torch.zeros(1, _TRAIN_GRID * _TRAIN_GRID + 1, _DIM))
        self.blocks = nn.ModuleList(_Block() for _ in range(_DEPTH))
        self.norm = nn.LayerNorm(_DIM, eps=_EPS)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def interpolate_pos_embed(self, h: int, w: int) -> Tensor:
        """Position embeddings (1, 1 + h * w, D) for an (h, w) patch grid, class position first."""
        if (h, w) == (_TRAIN_GRID, _TRAIN_GRID):
            return self.pos_embed
        cls_pos = self.pos_embed[:, :1]  # 1 1 D
        grid = self.pos_embed[:, 1:].reshape(1, _TRAIN_GRID, _TRAIN_GRID, _DIM)  # 1 37 37 D
        grid = grid.permute(0, 3, 1, 2)  # 1 D 37 37
        # Matches transformers 5.x Dinov2Embeddings.interpolate_pos_encoding: bicubic straight to
        # size=(h, w), no antialias, and no +0.1 offset. Meta's reference (and transformers 4.x)
        # instead pass scale_factor=((h + 0.1) / 37, (w + 0.1) / 37), which samples at slightly
        # different points. Interpolated in float32: bicubic in half precision shifts the values.
        grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False)  # 1 D h w
        grid = grid.to(self.pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, h * w, _DIM)  # 1 N D
        return torch.cat((cls_pos, grid), dim=1)  # 1 1+N D

    def check_layout(self, layout: FeatureLayout) -> None:
        if layout.levels != (_PATCH,):
            raise ValueError(f"dinov2_vits14 has one feature level ({_PATCH}), not {list(layout.levels)}")

    def feature_dim(self, layout: FeatureLayout) -> int:
        self.check_layout(layout)
        return _DIM

    def patch_features(self, x: Tensor, layout: FeatureLayout | None = None) -> Tensor:
        """(B, 3, H, W) normalized -> (B, H // 14, W // 14, 384) patch tokens after the final norm,
        averaged over ``layout.aggregation`` x ``layout.aggregation`` neighbourhoods when above 1.

        Raises:
            ValueError: x is not (B, 3, H, W) with H and W positive multiples of 14, or the layout
                asks for another level.
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) tensor, got shape {tuple(x.shape)}")
        layout = layout or self.layout
        self.check_layout(layout)
        B, _, H, W = x.shape
        if H <= 0 or W <= 0 or H % _PATCH or W % _PATCH:
            raise ValueError(f"DINOv2 ViT-S/14 needs H and W that are multiples of {_PATCH}, got H={H}, W={W}")
        h, w = H // _PATCH, W // _PATCH
        tokens = self.patch_embed(x)  # B N D
        tokens = torch.cat((self.cls_token.expand(B, -1, -1), tokens), dim=1)  # B 1+N D
        tokens = tokens + self.interpolate_pos_embed(h, w)
        last = _DEPTH - 1 if self.block is None else self.block
        for blk in self.blocks[: last + 1]:
            tokens = blk(tokens)
        tokens = self.norm(tokens)
        grid = tokens[:, 1:].reshape(B, h, w, _DIM)  # B h w D
        if layout.aggregation == 1:
            return grid
        a = layout.aggregation
        pooled = F.avg_pool2d(grid.permute(0, 3, 1, 2), a, stride=1, padding=a // 2)  # B D h w
        return pooled.permute(0, 2, 3, 1).contiguous()  # B h w D


# --- weights -------------------------------------------------------------------------------------

# Keys only used in training (masked-image modelling); dropped before the strict load.
_META_DROP = frozenset({"mask_token"})
_HF_DROP = frozenset({"embeddings.mask_token"})

# Hugging Face name -> Meta name, outside the blocks.
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
# Within "encoder.layer.N." -> within "blocks.N.". Two spellings of the attention output exist:
# the published facebook/dinov2-small safetensors ("attention.output.dense") and transformers >= 5
# state_dicts ("attention.o_proj").
_HF_BLOCK = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attention.output.dense.weight": "attn.proj.weight",
    "attention.output.dense.bias": "attn.proj.bias",
    "attention.o_proj.weight": "attn.proj.weight",
    "attention.o_proj.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "layer_scale2.lambda1": "ls2.gamma",
}
# Separate q, k, v projections (both spellings) -> their slot in the fused qkv, in that order.
_HF_QKV = {
    "attention.attention.query": 0,
    "attention.attention.key": 1,
    "attention.attention.value": 2,
    "attention.q_proj": 0,
    "attention.k_proj": 1,
    "attention.v_proj": 2,
}
_HF_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.+)")
_HF_QKV_PARAM = re.compile(r"(.+)\.(weight|bias)")


def remap_dinov2_meta(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Meta's ``dinov2_vits14_pretrain.pth`` keys -> this module's keys (the same names).

    Only drops the training-only ``mask_token``; any other key passes through unchanged, so a
    foreign key fails the strict load instead of vanishing.
    """
    return {k: v for k, v in sd.items() if k not in _META_DROP}


def remap_dinov2_hf(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face ``Dinov2Model`` keys -> this module's keys.

    ``encoder.layer.N.attention.{q,k,v}`` (D, D) / (D,) are concatenated, in that order, into
    ``blocks.N.attn.qkv`` (3D, D) / (3D,). Unknown keys pass through unchanged (the strict load
    names them); a layer with only some of q, k, v keeps them under their old names for the same
    reason.
    """
    out: dict[str, Tensor] = {}
    qkv_parts: dict[tuple[str, str], dict[int, tuple[str, Tensor]]] = {}
    for key, value in sd.items():
        if key in _HF_DROP:
            continue
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
            continue
        m = _HF_LAYER.fullmatch(key)
        if m is None:
            out[key] = value
            continue
        idx, rest = m.groups()
        if rest in _HF_BLOCK:
            out[f"blocks.{idx}.{_HF_BLOCK[rest]}"] = value
            continue
        p = _HF_QKV_PARAM.fullmatch(rest)
        if p is not None and p.group(1) in _HF_QKV:
            slot = _HF_QKV[p.group(1)]
            qkv_parts.setdefault((idx, p.group(2)), {})[slot] = (key, value)
            continue
        out[key] = value
    for (idx, param), parts in qkv_parts.items():
        if sorted(parts) == [0, 1, 2]:
            out[f"blocks.{idx}.attn.qkv.{param}"] = torch.cat([parts[i][1] for i in range(3)], dim=0)
        else:
            out.update(dict(parts.values()))
    return out


def detect_layout(sd: dict[str, Tensor]) -> Literal["meta", "hf"]:
    """Which checkpoint layout ``sd`` uses: Meta's reference or Hugging Face's ``Dinov2Model``.

    Raises:
        WeightsError: neither layout's marker keys are present.
    """
    if "pos_embed" in sd and "blocks.0.norm1.weight" in sd:
        return "meta"
    if "embeddings.position_embeddings" in sd and "encoder.layer.0.norm1.weight" in sd:
        return "hf"
    sample = ", ".join(sorted(sd)[:5]) or "no keys"
    raise WeightsError(
        "not a DINOv2 state_dict: expected Meta keys ('pos_embed', 'blocks.0.norm1.weight') or "
        f"Hugging Face keys ('embeddings.position_embeddings', 'encoder.layer.0.norm1.weight'); found {sample}"
    )


_REMAPS = {"meta": remap_dinov2_meta, "hf": remap_dinov2_hf}


def _check_keys(model: nn.Module, sd: dict[str, Tensor]) -> str | None:
    """A short description of what keeps ``sd`` from loading strictly into ``model``, or None."""
    want = model.state_dict()
    problems = []
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    mismatched = [
        f"{k} {tuple(sd[k].shape)} (expected {tuple(want[k].shape)})"
        for k in sorted(set(want) & set(sd))
        if sd[k].shape != want[k].shape
    ]
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
        if items:
            more = f" and {len(items) - 3} more" if len(items) > 3 else ""
            problems.append(f"{label}: {', '.join(items[:3])}{more}")
    return "; ".join(problems) or None


def load_dinov2(path: Path, input_size: int = 448, block: int | None = None) -> DinoV2ViTS14:
    """Load DINOv2 ViT-S/14 weights (Meta ``.pth`` or Hugging Face ``.safetensors``), frozen in eval mode.

    The file's actual sha256 is recorded in ``model.info.weights_sha256``.

    Raises:
        WeightsError: the file is missing, unreadable or truncated, is not a DINOv2 state_dict, or
            does not fit ViT-S/14 (missing or unexpected keys, wrong shapes).
    """
    path = Path(path)
    raw = load_weights_file(path)
    digest = file_sha256(path)
    model = DinoV2ViTS14(input_size=input_size, block=block, weights_sha256=digest)
    try:
        layout = detect_layout(raw)
    except WeightsError as exc:
        raise WeightsError(f"weights file {path}: {exc}") from exc
    sd = _REMAPS[layout](raw)
    problem = _check_keys(model, sd)
    if problem is not None:
        raise WeightsError(
            f"weights file {path} ({layout} layout) does not fit DINOv2 ViT-S/14 "
            f"(patch 14, width 384, 12 blocks, 37x37+1 positions): {problem}"
        )
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied into float32 parameters
        raise WeightsError(f"weights file {path} ({layout} layout) failed to load: {exc}") from exc
    model.eval()
    model.requires_grad_(False)
    logger.info("loaded DINOv2 ViT-S/14 weights from %s (%s layout, sha256 %s)", path, layout, digest)
    return model
