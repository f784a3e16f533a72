"""DINOv2 ViT-S/14: strict loads from both layouts, and features equal to transformers' Dinov2Model."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from engine.backbones.dinov2 import (
    DinoV2ViTS14,
    detect_layout,
    load_dinov2,
    remap_dinov2_hf,
    remap_dinov2_meta,
)
from engine.errors import WeightsError

transformers = pytest.importorskip("transformers")

TOL = 1e-4


def _hf_to_meta(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Independent HF (transformers 5) -> Meta converter, written the other way round from the engine's."""
    out = {
        "cls_token": sd["embeddings.cls_token"],
        "mask_token": sd["embeddings.mask_token"].reshape(1, 384),
        "pos_embed": sd["embeddings.position_embeddings"],
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"],
        "norm.bias": sd["layernorm.bias"],
    }
    for i in range(12):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            qkv = [sd[f"{src}attention.{n}_proj.{p}"] for n in "qkv"]
            out[f"{dst}attn.qkv.{p}"] = torch.cat(qkv, 0)
            out[f"{dst}attn.proj.{p}"] = sd[f"{src}attention.o_proj.{p}"]
            for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[f"{dst}{n}.{p}"] = sd[f"{src}{n}.{p}"]
        out[f"{dst}ls1.gamma"] = sd[f"{src}layer_scale1.lambda1"]
        out[f"{dst}ls2.gamma"] = sd[f"{src}layer_scale2.lambda1"]
    return {k: v.clone().contiguous() for k, v in out.items()}


def _hf_to_published(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers 5 key names -> the names in the published facebook/dinov2-small safetensors."""
    names = {
        "attention.q_proj": "attention.attention.query",
        "attention.k_proj": "attention.attention.key",
        "attention.v_proj": "attention.attention.value",
        "attention.o_proj": "attention.output.dense",
    }
    pattern = re.compile("|".join(re.escape(k) for k in names))
    return {pattern.sub(lambda m: names[m.group(0)], k): v for k, v in sd.items()}


@pytest.fixture(scope="module")
def hf_model() -> torch.nn.Module:
    config = transformers.Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        image_size=518,
        patch_size=14,
        qkv_bias=True,
        layerscale_value=1.0,
        use_swiglu_ffn=False,
        use_mask_token=True,
    )
    torch.manual_seed(0)
    model = transformers.Dinov2Model(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lambda1"):  # LayerScale: non-trivial, per channel
                p.copy_(torch.empty(p.shape).uniform_(0.2, 1.0, generator=gen))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("position_embeddings"):  # large, so a wrong interpolation shows
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name.endswith("bias") or name.endswith("token"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
    return model


@pytest.fixture(scope="module")
def weight_files(hf_model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dinov2")
    sd = {k: v.clone().contiguous() for k, v in hf_model.state_dict().items()}
    files = {
        "hf": root / "dinov2-small.safetensors",
        "published": root / "dinov2-small-published.safetensors",
        "meta": root / "dinov2_vits14_pretrain.pth",
    }
    save_file(sd, str(files["hf"]))
    save_file(_hf_to_published(sd), str(files["published"]))
    torch.save(_hf_to_meta(sd), files["meta"])
    return files


@pytest.fixture(scope="module")
def ours(weight_files: dict[str, Path]) -> DinoV2ViTS14:
    return load_dinov2(weight_files["hf"])


def _hf_patch_tokens(hidden: Tensor, height: int, width: int) -> Tensor:
    B = hidden.shape[0]
    return hidden[:, 1:].reshape(B, height // 14, width // 14, 384)  # B h w D


def test_both_layouts_load_to_identical_state_dicts(weight_files: dict[str, Path]) -> None:
    models = {name: load_dinov2(path) for name, path in weight_files.items()}
    ref = models["hf"].state_dict()
    for name in ("meta", "published"):
        sd = models[name].state_dict()
        assert sd.keys() == ref.keys()
        for k in ref:
            assert torch.equal(sd[k], ref[k]), (name, k)


def test_load_records_sha256_and_freezes(weight_files: dict[str, Path]) -> None:
    model = load_dinov2(weight_files["meta"], input_size=224, block=5)
    assert model.info.weights_sha256 == hashlib.sha256(weight_files["meta"].read_bytes()).hexdigest()
    assert model.info.name == "dinov2_vits14"
    assert (model.info.stride, model.info.input_size, model.info.feature_dim) == (14, 224, 384)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_detect_layout(weight_files: dict[str, Path]) -> None:
    assert detect_layout(load_file(str(weight_files["hf"]))) == "hf"
    assert detect_layout(load_file(str(weight_files["published"]))) == "hf"
    assert detect_layout(torch.load(weight_files["meta"], weights_only=True)) == "meta"
    with pytest.raises(WeightsError):
        detect_layout({"conv1.weight": torch.zeros(1)})


def test_remaps_drop_mask_token_and_fuse_qkv(weight_files: dict[str, Path]) -> None:
    meta = torch.load(weight_files["meta"], weights_only=True)
    assert "mask_token" not in remap_dinov2_meta(meta)
    hf = remap_dinov2_hf(load_file(str(weight_files["hf"])))
    assert "embeddings.mask_token" not in hf
    assert hf["blocks.3.attn.qkv.weight"].shape == (1152, 384)
    assert torch.equal(hf["blocks.3.attn.qkv.bias"], meta["blocks.3.attn.qkv.bias"])


@pytest.mark.parametrize(("height", "width"), [(224, 224), (448, 308)])
def test_patch_tokens_match_transformers(
    hf_model: torch.nn.Module, ours: DinoV2ViTS14, height: int, width: int
) -> None:
    x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = _hf_patch_tokens(hf_model(pixel_values=x).last_hidden_state, height, width)
        got = ours.patch_features(x)
    assert got.shape == (2, height // 14, width // 14, 384)
    assert (got - ref).abs().max().item() < TOL


def test_interpolated_positions_match_transformers(hf_model: torch.nn.Module, ours: DinoV2ViTS14) -> None:
    # 448 x 308 -> a 32 x 22 grid: non-square, so a swapped h/w would show
    dummy = torch.zeros(1, 1 + 32 * 22, 384)
    with torch.no_grad():
        ref = hf_model.embeddings.interpolate_pos_encoding(dummy, 448, 308)
        got = ours.interpolate_pos_embed(32, 22)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < 1e-6


def test_intermediate_block_matches_transformers_hidden_state(
    hf_model: torch.nn.Module, weight_files: dict[str, Path]
) -> None:
    block = 7
    model = load_dinov2(weight_files["meta"], block=block)
    x = torch.randn(1, 3, 224, 196, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = hf_model(pixel_values=x, output_hidden_states=True)
        # hidden_states[0] is the embedding output, hidden_states[i + 1] the output of block i
        ref = _hf_patch_tokens(hf_model.layernorm(out.hidden_states[block + 1]), 224, 196)
        got = model.patch_features(x)
    assert (got - ref).abs().max().item() < TOL


def test_random_init_forward_shape_and_finite() -> None:
    torch.manual_seed(0)
    model = DinoV2ViTS14(input_size=224).eval()
    images = torch.randint(0, 256, (2, 224, 168, 3), dtype=torch.uint8)
    with torch.no_grad():
        out = model(images)
    assert out.shape == (2, 16, 12, 384)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("height", "width"), [(225, 224), (224, 230), (10, 14)])
def test_input_not_multiple_of_14_raises(height: int, width: int) -> None:
    model = DinoV2ViTS14(input_size=224)
    with pytest.raises(ValueError, match="multiples of 14"):
        model.patch_features(torch.zeros(1, 3, height, width))


def test_bad_constructor_arguments_raise() -> None:
    with pytest.raises(ValueError):
        DinoV2ViTS14(input_size=450)
    with pytest.raises(ValueError):
        DinoV2ViTS14(block=12)


def test_missing_file_raises_weights_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.safetensors"
    with pytest.raises(WeightsError, match=re.escape(str(path))):
        load_dinov2(path)


@pytest.mark.parametrize("kind", ["hf", "meta"])
def test_truncated_file_raises_weights_error(weight_files: dict[str, Path], tmp_path: Path, kind: str) -> None:
    src = weight_files[kind]
    path = tmp_path / src.name
    path.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(WeightsError, match=re.escape(str(path))):
        load_dinov2(path)


def test_wrong_layout_file_raises_weights_error(tmp_path: Path) -> None:
    path = tmp_path / "resnet.safetensors"
    save_file({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.bias": torch.zeros(10)}, str(path))
    with pytest.raises(WeightsError, match=re.escape(str(path))) as info:
        load_dinov2(path)
    assert "pos_embed" in str(info.value)


def test_missing_and_misshapen_keys_raise_weights_error(weight_files: dict[str, Path], tmp_path: Path) -> None:
    sd = torch.load(weight_files["meta"], weights_only=True)
    del sd["blocks.11.ls2.gamma"]
    sd["pos_embed"] = sd["pos_embed"][:, :257]  # a 224-grid (16 x 16 + 1) position table
    sd["register_tokens"] = torch.zeros(1, 4, 384)
    path = tmp_path / "dinov2_vits14_broken.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsError, match=re.escape(str(path))) as info:
        load_dinov2(path)
    message = str(info.value)
    assert "blocks.11.ls2.gamma" in message
    assert "register_tokens" in message
    assert "pos_embed" in message
