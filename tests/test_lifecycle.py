"""Model lifecycle on the real engine (EfficientNet-Lite0 at 64 px, real MVTec AD bottles at 128 px):
versions and rollback, retention, add_ok, mark_ok / mark_ng, export and import between data roots,
and the bad-archive table.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from engine.api import Engine
from engine.errors import ArchiveInvalid, FitInProgress, InvalidInput, ModelNotFound, VersionNotFound
from engine.settings import Settings
from engine.storage import seal
from tests.support import load_bgr, part_png, png_bytes

SIDE, INPUT, MM, ROLE = 128, 64, 0.1, "top"


def _engine(root: Path, **changes: object) -> Engine:
    return Engine(Settings(data_root=root, backbone="efficientnet_lite0", input_size=INPUT, **changes))


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    eng = _engine(tmp_path_factory.mktemp("lifecycle"))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def bottles(bottle_dir: Path) -> dict[str, list[bytes]]:
    def load(folder: str, first: int, count: int) -> list[bytes]:
        paths = sorted((bottle_dir / folder).glob("*.png"))[first:first + count]
        return [png_bytes(load_bgr(p, SIDE)) for p in paths]

    return {"train": load("train/good", 0, 6), "more": load("train/good", 6, 4), "good": load("test/good", 0, 3),
            "broken": load("test/broken_large", 0, 3)}


def _score(engine: Engine, roi: str, image: bytes) -> float:
    return engine.infer(ROLE, roi, MM, image, allow_uncalibrated=True, heatmap="none").score


def _raw_map(engine: Engine, roi: str, image: bytes) -> bytes:
    result = engine.infer(ROLE, roi, MM, image, allow_uncalibrated=True, heatmap="float32")
    assert result.heatmap_raw is not None
    return bytes(result.heatmap_raw.data)


def test_every_write_is_a_version_and_activate_restores_identical_scores(
        engine: Engine, bottles: dict[str, list[bytes]]) -> None:
    engine.fit_ok(ROLE, "rb", MM, bottles["train"])
    probe = bottles["good"][0]
    first_map = _raw_map(engine, "rb", probe)
    engine.calibrate_ng(ROLE, "rb", MM, [_score(engine, "rb", im) for im in bottles["good"]])
    added = engine.lifecycle.add_ok(ROLE, "rb", bottles["more"], operator_id="op7")
    listing = engine.lifecycle.versions(ROLE, "rb")
    assert [(v.version, v.created_by, v.active) for v in listing.versions] == [
        (1, "fit", False), (2, "calibration", False), (3, "add_ok", True)]
    assert listing.versions[2].n_images == 10 and listing.versions[0].n_images == 6
    assert listing.versions[0].threshold is None and listing.versions[2].threshold == added.threshold
    assert engine.state(ROLE, "rb").active_version == 3 and engine.manifest(ROLE, "rb")["version"] == 3
    grown_map = _raw_map(engine, "rb", probe)
    assert grown_map != first_map          # the memory changed

    back = engine.lifecycle.activate(ROLE, "rb", 1)
    assert (back.active_version, back.previous_version, back.threshold) == (1, 3, None)
    assert _raw_map(engine, "rb", probe) == first_map
    assert engine.state(ROLE, "rb").active_version == 1 and not engine.state(ROLE, "rb").calib_present
    engine.lifecycle.activate(ROLE, "rb", 3)
    assert _raw_map(engine, "rb", probe) == grown_map
    with pytest.raises(VersionNotFound) as info:
        engine.lifecycle.activate(ROLE, "rb", 9)
    assert (info.value.code, info.value.status) == ("version_not_found", 404)
    with pytest.raises(InvalidInput):
        engine.lifecycle.activate(ROLE, "rb", 0)
    with pytest.raises(ModelNotFound):
        engine.lifecycle.versions(ROLE, "never")


def test_add_ok_grows_the_memory_by_coverage_and_carries_the_calibration(
        engine: Engine, bottles: dict[str, list[bytes]]) -> None:
    fit = engine.fit_ok(ROLE, "grow", MM, bottles["train"])
    engine.calibrate_ng(ROLE, "grow", MM, list(fit.ok_scores), [_score(engine, "grow", im) for im in bottles["broken"]])
    before = [_score(engine, "grow", im) for im in bottles["more"]]
    added = engine.lifecycle.add_ok(ROLE, "grow", bottles["more"])
    patches = len(bottles["more"]) * fit.token_shape[0] * fit.token_shape[1]
    assert 0 < added.rows_added < patches and added.coreset_size == fit.coreset_size + added.rows_added
    assert added.covering_radius > 0 and added.n_images == 4 and added.n_images_total == 10
    assert added.ok_scores == pytest.approx(before, rel=1e-5)   # scored against the memory before the call
    assert added.calibration is not None and added.calibration.carried and added.threshold is not None
    after = [_score(engine, "grow", im) for im in bottles["more"]]
    assert all(a < b for a, b in zip(after, before, strict=True))       # their patches are covered now
    assert max(after) <= added.covering_radius * 1.0001                  # within the radius of a kept row
    manifest = engine.manifest(ROLE, "grow")
    assert manifest["coverage"]["radius"] == added.covering_radius and manifest["n_images"] == 10
    assert len(manifest["ok_scores"]["values"]) == len(fit.ok_scores) + 4
    # every row, added ones included, still names its training image and patch (explanations)
    stored = engine.models.store(None).load(ROLE, "grow")
    assert stored.origins is not None and len(stored.origins) == added.coreset_size
    added_rows = stored.origins[fit.coreset_size:]
    assert added_rows[:, 0].min() >= 6 and added_rows[:, 0].max() <= 9
    assert len(manifest["training_images"]["sizes"]) == 10
    with pytest.raises(ModelNotFound):
        engine.lifecycle.add_ok(ROLE, "nothing", bottles["more"][:1])
    with pytest.raises(InvalidInput):
        engine.lifecycle.add_ok(ROLE, "grow", [])


def test_add_ok_is_refused_while_a_fit_of_the_model_runs(engine: Engine, bottles: dict[str, list[bytes]]) -> None:
    engine.fit_ok(ROLE, "busy", MM, bottles["train"][:3])
    with engine.models.fit_guard(engine.models.key(ROLE, "busy")), pytest.raises(FitInProgress):
        engine.lifecycle.add_ok(ROLE, "busy", bottles["more"][:1])


def _sticker(image: bytes) -> bytes:
    """A good bottle with a new but acceptable look: a flat label on its rim."""
    bgr = cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_COLOR)
    cv2.rectangle(bgr, (20, 54), (40, 74), (40, 160, 40), -1)
    return png_bytes(bgr)


def test_mark_ok_clears_a_false_alarm_and_leaves_other_decisions(
        engine: Engine, bottles: dict[str, list[bytes]]) -> None:
    engine.fit_ok(ROLE, "fb", MM, bottles["train"])
    good, broken = bottles["good"], bottles["broken"]
    engine.calibrate_ng(ROLE, "fb", MM, [_score(engine, "fb", im) for im in good[:2]],
                        [_score(engine, "fb", im) for im in broken], area_mm2_thr=0.0)
    threshold = engine.state(ROLE, "fb").threshold
    alarm = _sticker(good[1])
    first = engine.infer(ROLE, "fb", MM, alarm, heatmap="none")
    assert first.decision == "ng"                     # a false alarm: a good part with a new look
    others = [good[0], good[2], *broken]
    decisions = [engine.infer(ROLE, "fb", MM, im, heatmap="none").decision for im in others]
    assert "ng" in decisions and "ok" in decisions

    marked = engine.lifecycle.mark_ok(ROLE, "fb", alarm, operator_id="op3")
    assert marked.label == "ok" and marked.score == pytest.approx(first.score) and marked.marked_version == 2
    assert marked.added is not None and marked.added.version == 3 and marked.added.rows_added > 0
    assert engine.infer(ROLE, "fb", MM, alarm, heatmap="none").decision == "ok"
    assert [engine.infer(ROLE, "fb", MM, im, heatmap="none").decision for im in others] == decisions
    assert engine.state(ROLE, "fb").threshold == threshold          # feedback keeps the threshold
    manifest = engine.manifest(ROLE, "fb")
    fitted = engine.models.store(None).read_version(ROLE, "fb", 1)[0].manifest
    assert manifest["ok_scores"]["values"] == fitted["ok_scores"]["values"]    # its own score stays out
    meta = engine.dataset_meta(ROLE, "fb", "ok", marked.filename)
    assert meta["marked"]["operator_id"] == "op3" and meta["marked"]["version"] == 2
    assert meta["marked"]["score"] == pytest.approx(first.score) and meta["marked"]["threshold"] == threshold
    assert engine.dataset_file(ROLE, "fb", "ok", marked.filename) == alarm


def test_mark_ng_stores_a_missed_defect_and_keeps_the_model(engine: Engine, bottles: dict[str, list[bytes]]) -> None:
    engine.fit_ok(ROLE, "miss", MM, bottles["train"][:3])
    marked = engine.lifecycle.mark_ng(ROLE, "miss", bottles["broken"][2], operator_id="op9")
    assert marked.label == "ng" and marked.added is None and marked.decision is None
    assert engine.lifecycle.versions(ROLE, "miss").active_version == 1
    assert engine.dataset_list(ROLE, "miss").classes["ng"].files == (marked.filename,)
    assert engine.dataset_meta(ROLE, "miss", "ng", marked.filename)["marked"]["operator_id"] == "op9"


def test_retention_keeps_the_newest_versions_and_the_served_one(tmp_path: Path) -> None:
    eng = _engine(tmp_path, model_versions_kept=3)
    try:
        eng.fit_ok(ROLE, "r", MM, [part_png(i) for i in range(3)])
        for threshold in (1.0, 2.0, 3.0, 4.0):
            eng.calibrate_ng(ROLE, "r", MM, [threshold / 1.1])
        assert [v.version for v in eng.lifecycle.versions(ROLE, "r").versions] == [3, 4, 5]
        eng.lifecycle.activate(ROLE, "r", 3)
        eng.calibrate_ng(ROLE, "r", MM, [9.0])            # version 6: 3 is no longer among the newest
        assert [v.version for v in eng.lifecycle.versions(ROLE, "r").versions] == [4, 5, 6]
        with pytest.raises(VersionNotFound):
            eng.lifecycle.activate(ROLE, "r", 2)
        folders = sorted(p.name for p in (tmp_path / "model_versions" / ROLE / "r").iterdir())
        assert folders == ["4", "5", "6"]
        eng.delete_model(ROLE, "r")
        assert not (tmp_path / "model_versions" / ROLE / "r").exists()
    finally:
        eng.close()


def test_a_model_stored_before_versions_reads_as_version_1(tmp_path: Path) -> None:
    eng = _engine(tmp_path)
    try:
        eng.fit_ok(ROLE, "old", MM, [part_png(i) for i in range(3)])
        store = eng.models.store(None)
        manifest = json.loads((store.model_dir(ROLE, "old") / "manifest.json").read_text())
        legacy = seal({k: v for k, v in manifest.items() if not k.startswith("version")})
        (store.model_dir(ROLE, "old") / "manifest.json").write_text(json.dumps(legacy))
        store.history(ROLE, "old").remove_all()
        eng.models.invalidate(eng.models.key(ROLE, "old"))
        assert eng.state(ROLE, "old").active_version == 1
        eng.calibrate_ng(ROLE, "old", MM, [1.0])
        assert [(v.version, v.created_by) for v in eng.lifecycle.versions(ROLE, "old").versions] == [
            (1, "unknown"), (2, "calibration")]
    finally:
        eng.close()


# --- archives ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(engine: Engine, bottles: dict[str, list[bytes]]) -> bytes:
    fit = engine.fit_ok(ROLE, "ship", MM, bottles["train"])
    engine.calibrate_ng(ROLE, "ship", MM, list(fit.ok_scores))
    result = engine.lifecycle.export_model(ROLE, "ship")
    assert result.version == 2 and result.sha256 == hashlib.sha256(result.archive).hexdigest()
    return result.archive


@pytest.fixture(scope="module")
def station(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    eng = _engine(tmp_path_factory.mktemp("station2"))
    yield eng
    eng.close()


def test_export_on_one_root_import_on_another_scores_equal(
        engine: Engine, station: Engine, exported: bytes, bottles: dict[str, list[bytes]]) -> None:
    imported = station.lifecycle.import_model("line2", "cap", exported)
    assert imported.version == 1 and imported.origin["roi_id"] == "ship" and imported.origin["version"] == 2
    assert imported.threshold == engine.state(ROLE, "ship").threshold
    for image in [*bottles["good"], *bottles["broken"]]:
        here = engine.infer(ROLE, "ship", MM, image, heatmap="none")
        there = station.infer("line2", "cap", MM, image, heatmap="none")
        assert abs(here.score - there.score) <= 1e-6 and here.decision == there.decision
    assert station.lifecycle.versions("line2", "cap").versions[0].created_by == "import"
    here_rows = engine.models.store(None).load(ROLE, "ship").origins
    there_rows = station.models.store(None).load("line2", "cap").origins
    assert here_rows is not None and there_rows is not None and np.array_equal(here_rows, there_rows)
    again = station.lifecycle.import_model("line2", "cap", exported)
    assert again.version == 2 and again.model_version == 2


def _rebuilt(archive: bytes, change: dict[str, bytes | None], *, fix_checksums: bool = True) -> bytes:
    """``archive`` with members replaced (None: removed), checksums recomputed unless told not to."""
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    for name, data in change.items():
        if data is None:
            members.pop(name, None)
        else:
            members[name] = data
    if fix_checksums:
        members["checksums.json"] = json.dumps({n[len("model/"):]: hashlib.sha256(d).hexdigest()
                                                for n, d in members.items() if n.startswith("model/")}).encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _other_backbone(archive: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        manifest = json.loads(zf.read("model/manifest.json"))
    manifest = seal({**manifest, "backbone": {**manifest["backbone"], "name": "dinov2_vits14"}})
    return _rebuilt(archive, {"model/manifest.json": json.dumps(manifest).encode()})


def _with_link(archive: bytes) -> bytes:
    buf = io.BytesIO(archive)
    with zipfile.ZipFile(buf, "a") as zf:
        info = zipfile.ZipInfo("model/extra.bin")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


BAD_ARCHIVES = {
    "truncated": lambda a: a[: len(a) * 2 // 3],
    "not a zip": lambda a: b"PK\x03\x04 not really",
    "wrong checksum": lambda a: _rebuilt(a, {"model/embeddings.npy": a[:64]}, fix_checksums=False),
    "edited manifest": lambda a: _rebuilt(a, {"model/manifest.json": b'{"threshold": 0.0}'}),
    "other backbone": _other_backbone,
    "parent path": lambda a: _rebuilt(a, {"model/../../evil.txt": b"x"}),
    "absolute path": lambda a: _rebuilt(a, {"/tmp/evil.txt": b"x"}),
    "nested folder": lambda a: _rebuilt(a, {"model/sub/evil.txt": b"x"}),
    "backslash path": lambda a: _rebuilt(a, {"model\\..\\evil.txt": b"x"}),
    "symlink member": _with_link,
    "missing index": lambda a: _rebuilt(a, {"model/coreset.faiss": None}),
}


@pytest.mark.parametrize("case", sorted(BAD_ARCHIVES))
def test_bad_archives_are_refused_and_nothing_is_installed(station: Engine, exported: bytes, case: str) -> None:
    before = station.list_models()
    with pytest.raises(ArchiveInvalid) as info:
        station.lifecycle.import_model("line3", "cap", BAD_ARCHIVES[case](exported))
    assert (info.value.code, info.value.status) == ("archive_invalid", 400)
    assert station.list_models() == before
    assert not (station.data_root / "models" / "line3").exists()
    assert not (station.data_root / "model_versions" / "line3").exists()
