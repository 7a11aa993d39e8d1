"""Stage 3 (YOLO on 2.5D tiles): offline training/prediction, weight integrity, tile geometry, scoring, fusion."""

from __future__ import annotations

import json
import socket
from argparse import Namespace

import numpy as np
import pytest

from CMBDetectorLib import yolo
from CMBDetectorLib.errors import WeightsError
from CMBDetectorLib.weights import sha256_of
from helpers import BLANK_RAS, SPHERE_RAS, TUBE_RAS, flip_a_byte, synthetic_prepared

torch = pytest.importorskip("torch")


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------

def write_weights(path, network, card_extra=None) -> None:
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in network.state_dict().items()}, path)
    card = {"sha256": sha256_of(path), "architecture": yolo.ARCHITECTURE, **(card_extra or {})}
    path.with_suffix(".json").write_text(json.dumps(card))


@pytest.fixture
def no_network(monkeypatch):
    """Every socket creation or connection attempt raises; the attempts are recorded."""
    attempts = []

    class BlockedSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            attempts.append(("socket", args))
            raise OSError("network access blocked by the test")

    def blocked(*args, **kwargs):
        attempts.append(("connect", args))
        raise OSError("network access blocked by the test")

    monkeypatch.setattr(socket, "socket", BlockedSocket)
    monkeypatch.setattr(socket, "create_connection", blocked)
    monkeypatch.setattr(socket, "getaddrinfo", blocked)
    return attempts


# ----------------------------------------------------------------------------------------------------
# offline training and prediction
# ----------------------------------------------------------------------------------------------------

def tiny_dataset(folder, rng) -> object:
    """Eight 64x64 RGB tiles, six with one dark dot (labelled), two empty; data.yaml in ultralytics layout."""
    import cv2

    images, labels = folder / "images", folder / "labels"
    images.mkdir(parents=True)
    labels.mkdir()
    rows, cols = np.mgrid[:64, :64]
    for index in range(8):
        tile = np.full((64, 64, 3), 170, np.uint8) + rng.integers(0, 20, (64, 64, 3)).astype(np.uint8)
        text = ""
        if index < 6:
            x, y = rng.integers(16, 48, 2)
            tile[(rows - y) ** 2 + (cols - x) ** 2 <= 16] = 20
            text = f"0 {x / 64:.4f} {y / 64:.4f} {12 / 64:.4f} {12 / 64:.4f}\n"
        cv2.imwrite(str(images / f"t{index}.png"), tile)
        (labels / f"t{index}.txt").write_text(text)
    listing = "\n".join(str(images / f"t{i}.png") for i in range(8)) + "\n"
    (folder / "train.txt").write_text(listing)
    (folder / "val.txt").write_text(listing)
    data_yaml = folder / "data.yaml"
    data_yaml.write_text(json.dumps({"path": str(folder), "train": "train.txt", "val": "val.txt",
                                     "names": {0: "microbleed"}}))
    return data_yaml


def test_train_one_epoch_and_predict_with_sockets_blocked(tmp_path, no_network):
    from CMBDetectorLib.train.train_yolo import train_network

    data_yaml = tiny_dataset(tmp_path / "dataset", np.random.default_rng(0))
    checkpoint = train_network(data_yaml, tmp_path, Namespace(epochs=1, batch=4, workers=0, seed=0))
    weights = tmp_path / "tiny_yolo.pt"
    torch.save(yolo.state_dict_from_checkpoint(checkpoint), weights)
    weights.with_suffix(".json").write_text(json.dumps({"sha256": sha256_of(weights),
                                                        "architecture": yolo.ARCHITECTURE}))
    model = yolo.load_yolo(weights)
    tiles = np.random.default_rng(1).random((3, 3, yolo.TILE_PX, yolo.TILE_PX)).astype(np.float32)
    predictions = yolo.predict_tiles(model, tiles)
    assert predictions.shape[0] == 3 and predictions.shape[2] == 5
    assert np.isfinite(predictions).all()
    assert no_network == [], f"ultralytics tried to reach the network: {no_network}"


def test_offline_configuration_writes_settings_and_font(tmp_path, monkeypatch):
    monkeypatch.delenv("YOLO_CONFIG_DIR", raising=False)
    user_dir = yolo.configure_offline(tmp_path / "cfg")
    try:
        settings = json.loads((user_dir / "settings.json").read_text())
        assert settings["sync"] is False and settings["comet"] is False
        assert (user_dir / "Arial.ttf").read_bytes()[:4] in (b"\x00\x01\x00\x00", b"true")  # a TrueType font
        import os

        assert os.environ["YOLO_OFFLINE"] == "1" and os.environ["YOLO_AUTOINSTALL"] == "0"
        import ultralytics.utils as ultralytics_utils

        assert ultralytics_utils.ONLINE is False
    finally:
        yolo.configure_offline()  # back to the default folder for the other tests


# ----------------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------------

def test_corrupt_or_unverified_weights_are_refused(tmp_path):
    weights = tmp_path / "cmb_yolo.pt"
    write_weights(weights, yolo.build_network())
    assert yolo.load_yolo(weights).sha256 == sha256_of(weights)

    flip_a_byte(weights)
    with pytest.raises(WeightsError, match="do not match"):
        yolo.load_yolo(weights)

    weights.with_suffix(".json").unlink()
    with pytest.raises(WeightsError, match="card"):
        yolo.load_yolo(weights)
    with pytest.raises(WeightsError, match="not found"):
        yolo.load_yolo(tmp_path / "missing.pt")


def test_weights_for_another_tile_geometry_are_refused(tmp_path):
    weights = tmp_path / "other.pt"
    write_weights(weights, yolo.build_network())
    card = json.loads(weights.with_suffix(".json").read_text())
    card["architecture"] = dict(card["architecture"], pixel_mm=0.75)
    weights.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="another"):
        yolo.load_yolo(weights)


# ----------------------------------------------------------------------------------------------------
# tiles and scoring
# ----------------------------------------------------------------------------------------------------

def test_tiles_are_centred_ras_axial_with_neighbour_slices():
    prepared = synthetic_prepared()
    tiles = yolo.make_tiles(prepared, np.array([SPHERE_RAS, TUBE_RAS]))
    assert tiles.shape == (2, 3, yolo.TILE_PX, yolo.TILE_PX) and tiles.dtype == np.float32
    assert 0.0 <= tiles.min() and tiles.max() <= 1.0
    centre = yolo.TILE_PX // 2
    sphere, tube = tiles
    # the 3.6 mm sphere is dark at the tile centre of the middle slice, and absent 2 mm above and below
    assert sphere[1, centre - 1:centre + 1, centre - 1:centre + 1].mean() < 0.3
    assert sphere[0, centre, centre] > 0.5 and sphere[2, centre, centre] > 0.5
    # the tube runs along z: dark on all three channels
    assert (tube[:, centre, centre] < 0.3).all()
    # in-plane axes: the tube sits +15 mm in x (columns) and y (rows) from the sphere's tile centre
    offset_px = int(round(15 / yolo.PIXEL_MM))
    assert sphere[1, centre + offset_px, centre + offset_px] < 0.3
    assert yolo.neighbour_mm(prepared) == 2.0


def test_score_candidates_returns_one_score_per_candidate_in_unit_interval():
    prepared = synthetic_prepared()
    model = yolo.LoadedYolo(yolo.build_network().eval(), {"architecture": yolo.ARCHITECTURE}, "", "cpu")
    centres = np.array([SPHERE_RAS, TUBE_RAS, BLANK_RAS, [500.0, 0.0, 0.0]])  # the last is outside the image
    timings = {}
    scores = yolo.score_candidates(model, prepared, centres, timings)
    assert scores.shape == (4,) and scores.dtype == np.float32
    assert ((scores >= 0) & (scores <= 1)).all()
    assert timings["yolo_network"] > 0
    assert yolo.score_candidates(model, prepared, np.zeros((0, 3))).shape == (0,)


def test_point_scores_take_the_best_box_containing_the_point():
    # two anchors: a confident box around (10, 10), a less confident one around (40, 40)
    predictions = np.array([[[10, 10, 6, 6, 0.9], [40, 40, 6, 6, 0.4]]], np.float32)
    assert yolo.point_scores(predictions, (10, 11))[0] == pytest.approx(0.9)
    assert yolo.point_scores(predictions, (41, 40))[0] == pytest.approx(0.4)
    assert yolo.point_scores(predictions, (25, 25))[0] == 0.0


def test_training_labels_follow_the_truth_geometry():
    from CMBDetectorLib.train.train_yolo import MIN_BOX_MM, tile_labels

    bleed = {"center_ras": [1.0, -2.0, 0.5], "apparent_diameter_mm": 3.0}
    rows = tile_labels(np.array([0.0, 0.0, 0.0]), [bleed], slice_mm=2.0)
    assert len(rows) == 1
    cls, x, y, w, h = rows[0]
    half = (yolo.TILE_PX - 1) / 2
    assert cls == 0
    assert x * yolo.TILE_PX == pytest.approx(half + 1.0 / yolo.PIXEL_MM, abs=0.01)
    assert y * yolo.TILE_PX == pytest.approx(half - 2.0 / yolo.PIXEL_MM, abs=0.01)
    assert w * yolo.TILE_PX * yolo.PIXEL_MM == pytest.approx(max(3.0 + 2.0, MIN_BOX_MM))
    assert tile_labels(np.array([0.0, 0.0, 6.0]), [bleed], slice_mm=2.0) == []  # another slice
    assert tile_labels(np.array([40.0, 0.0, 0.0]), [bleed], slice_mm=2.0) == []  # outside the tile


@pytest.mark.skipif(not yolo.DEFAULT_YOLO.is_file(), reason="shipped YOLO weights not present")
def test_shipped_weights_prefer_a_dot_to_a_vein_or_tissue():
    model = yolo.load_yolo()
    prepared = synthetic_prepared(spacing=(0.5, 0.5, 2.0), shape=(128, 128, 24))
    dot, tube, blank = yolo.score_candidates(model, prepared, np.array([SPHERE_RAS, TUBE_RAS, BLANK_RAS]))
    assert dot > tube and dot > blank and dot > 0.3
    assert set(model.fusion) >= {"rule", "lo", "hi", "weight"}


@pytest.mark.skipif(not yolo.DEFAULT_YOLO.is_file(), reason="shipped YOLO weights not present")
def test_shipped_fusion_was_tuned_against_the_shipped_cnn():
    # A fusion band tuned for another CNN's score distribution would silently move the operating point.
    from CMBDetectorLib.classify import DEFAULT_MODEL, load_model
    from CMBDetectorLib.weights import card_path

    cnn_card = json.loads(card_path(DEFAULT_MODEL).read_text())
    tuning = json.loads(card_path(yolo.DEFAULT_YOLO).read_text())["fusion_tuning"]
    assert tuning["cnn"]["sha256"] == cnn_card["sha256"] == load_model(DEFAULT_MODEL).sha256
    assert tuning["cnn"]["threshold"] == cnn_card["operating_threshold"]


# ----------------------------------------------------------------------------------------------------
# fusion
# ----------------------------------------------------------------------------------------------------

PARAMS = {"rule": "band-power", "lo": 0.2, "hi": 0.9, "weight": 2.0}


def test_fuse_keeps_scores_outside_the_band_and_is_continuous_at_its_edges():
    cnn = np.array([0.0, 0.1, 0.2, 0.9, 0.95, 1.0])
    for yolo_value in (0.0, 0.5, 1.0):
        fused = yolo.fuse(cnn, np.full(len(cnn), yolo_value), PARAMS)
        np.testing.assert_allclose(fused, cnn, atol=1e-12)
    inside = np.array([0.5])
    assert yolo.fuse(inside, [1.0], PARAMS)[0] > 0.5 > yolo.fuse(inside, [0.0], PARAMS)[0]
    assert yolo.fuse(inside, [0.5], PARAMS)[0] == pytest.approx(0.5)
    assert 0.2 <= yolo.fuse(inside, [0.0], PARAMS)[0] and yolo.fuse(inside, [1.0], PARAMS)[0] <= 0.9


def test_fuse_is_monotone_in_each_score():
    grid = np.linspace(0, 1, 101)
    for fixed in (0.0, 0.3, 0.7, 1.0):
        along_cnn = yolo.fuse(grid, np.full_like(grid, fixed), PARAMS)
        along_yolo = yolo.fuse(np.full_like(grid, fixed if 0 < fixed < 1 else 0.5), grid, PARAMS)
        assert (np.diff(along_cnn) >= -1e-12).all()
        assert (np.diff(along_yolo) >= -1e-12).all()


def test_fuse_with_zero_weight_is_the_cnn_and_bad_parameters_are_rejected():
    cnn = np.random.default_rng(0).random(50)
    np.testing.assert_allclose(yolo.fuse(cnn, np.random.default_rng(1).random(50), dict(PARAMS, weight=0.0)), cnn)
    with pytest.raises(ValueError):
        yolo.fuse(cnn, cnn, dict(PARAMS, lo=0.9, hi=0.2))
    with pytest.raises(ValueError):
        yolo.fuse(cnn, cnn, dict(PARAMS, weight=-1))


def _tuning_scan(scan_id, truth, candidates):
    """A held-out scan for tune_fusion: truth points, and (RAS, CNN score, YOLO score) per candidate."""
    from CMBDetectorLib.train.tuning import HeldOutScan

    centres = np.array([c[0] for c in candidates], float).reshape(-1, 3)
    return HeldOutScan(scan_id, np.array(truth, float).reshape(-1, 3), centres,
                       np.array([c[1] for c in candidates], float), np.array([c[2] for c in candidates], float))


def test_tune_fusion_finds_the_most_sensitive_point_within_the_fp_budget():
    from CMBDetectorLib.train.train_yolo import tune_fusion
    from CMBDetectorLib.train.tuning import lesion_counts

    # per scan: one clear lesion, one lesion the CNN doubts but YOLO sees, one vein the CNN likes but YOLO rejects
    scans = [_tuning_scan(f"s{i}", [[0, 0, 0], [30, 0, 0]],
                          [([0, 0, 0], 0.99, 0.9), ([30, 0, 0], 0.55, 0.95), ([0, 30, 0], 0.93, 0.02)])
             for i in range(4)]
    scans.append(_tuning_scan("free", [], [([0, 0, 0], 0.5, 0.1)]))  # a CMB-free scan
    params, baseline, table = tune_fusion(scans, cnn_threshold=0.9, fp_budget=0.3)
    assert baseline["sensitivity"] == 0.5 and baseline["fp_per_scan"] == 0.8  # the CNN alone at 0.9
    fused = lesion_counts(scans, [yolo.fuse(s.cnn, s.yolo, params) for s in scans], params["threshold"])
    assert fused["sensitivity"] == 1.0 and fused["fp_per_scan"] <= 0.3
    within = [row for row in table if row["fp_per_scan"] <= 0.3]
    assert max(row["sensitivity"] for row in within) == fused["sensitivity"]
    assert min(row["fp_per_scan"] for row in within if row["sensitivity"] == 1.0) == fused["fp_per_scan"]
    assert len(table) > 100  # thresholds x bands x weights were all tried


def test_tune_fusion_stays_neutral_when_nothing_fits_the_budget():
    from CMBDetectorLib.train.train_yolo import tune_fusion

    scans = [_tuning_scan("s", [], [([0, 0, 0], 0.99, 0.99), ([0, 20, 0], 0.99, 0.99)])]
    params, _, _ = tune_fusion(scans, cnn_threshold=0.9, fp_budget=0.5)
    assert params["weight"] == 0.0 and params["threshold"] == 0.9
