"""The detector end to end: simulated scans, real MRML round trip, real GRE crops, weights, bad input."""

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from CMBDetectorLib import classify, review, yolo
from CMBDetectorLib.bench import REAL_DIR
from CMBDetectorLib.errors import WeightsError
from CMBDetectorLib.evaluate import match
from CMBDetectorLib.image import Volume
from CMBDetectorLib.io import write_volume
from CMBDetectorLib.phase import reversed_sign, to_radians, vendor_range
from CMBDetectorLib.pipeline import detect, merge_nearby, read_phase, write_outputs
from CMBDetectorLib.simulate.synth import simulate_scan, write_scan
from CMBDetectorLib.weights import card_path
from helpers import SPHERE_RAS, TUBE_RAS, cli, flip_a_byte, small_swi_crop, synthetic_prepared

TEST_SEED = 777  # not among the training (1xxxx) or validation (2xxxx) seeds


@pytest.fixture(scope="module")
def detected(tmp_path_factory):
    out = tmp_path_factory.mktemp("detect")
    scan = simulate_scan(TEST_SEED, "gre3t", n_cmb=4)
    files = write_scan(scan, out / "scan")
    detection = detect(scan.magnitude, scan.phase)
    paths = write_outputs(detection, out / "result", scan.scan_id)
    return scan, files, detection, paths


def test_detection_finds_the_simulated_microbleeds(detected):
    scan, _, detection, _ = detected
    truth = np.array([m["center_ras"] for m in scan.truth["microbleeds"]])
    found = np.array([f.position_ras for f in detection.findings]).reshape(-1, 3)
    matched = match(truth, found, 5.0)
    assert len(matched) >= 3, (truth, found)
    assert len(found) - len(matched) <= 3
    assert all(0.0 <= f.score <= 1.0 for f in detection.findings)
    assert [f.label for f in detection.findings] == [f"CMB-{i + 1}" for i in range(len(found))]


def test_every_finding_is_a_stage_one_candidate_and_every_candidate_is_kept(detected):
    _, _, detection, _ = detected
    screened = detection.screened_ras
    assert screened.shape == (detection.summary["candidates"], 3)
    for finding in detection.findings:
        assert np.linalg.norm(screened - np.array(finding.position_ras), axis=1).min() < 1e-6


def test_outputs_hold_every_finding_with_its_score(detected):
    _, _, detection, paths = detected
    document = json.loads(paths["markups"].read_text())
    points = document["markups"][0]["controlPoints"]
    assert document["@schema"].endswith("markups-schema-v1.0.3.json#")
    assert len(points) == len(detection.findings)
    assert all(p["description"] == "pending" for p in points)
    rows = paths["csv"].read_text().splitlines()
    assert rows[0].split(",")[:5] == ["id", "label", "x_ras", "y_ras", "z_ras"]
    assert len(rows) == 1 + len(detection.findings)
    summary = json.loads(paths["summary"].read_text())
    assert summary["counts"]["total"] == len(detection.findings)
    assert summary["model"]["sha256"] == classify.read_ensemble_card(classify.DEFAULT_MODEL)["sha256"]
    assert set(summary["timings_s"]) >= {"preprocess", "candidates", "cnn", "total"}
    assert summary["mask"]["method"] == "learned" and 1000 < summary["mask"]["volume_ml"] < 3200
    screening = summary["screening"]  # stage 1 says what it kept and what it dropped
    assert screening["kept"] == summary["candidates"] <= screening["peaks"] and screening["strong_dropped"] == 0
    assert screening["capped"] == (screening["peaks"] > screening["kept"])
    fusion = json.loads(Path(yolo.DEFAULT_YOLO).with_suffix(".json").read_text())["fusion"]
    assert summary["threshold"] == summary["operating_threshold"] == fusion["threshold"]
    assert paths["png"].stat().st_size > 1000


@pytest.mark.parametrize("seed", range(3))
def test_a_lower_threshold_only_adds_findings_below_the_higher_one(seed):
    # The benchmark detects once down to a floor and reads the operating point off the same findings:
    # that is exact only if merging nearby candidates never lets a weaker one remove a stronger one.
    rng = np.random.default_rng(seed)
    centres, scores = rng.uniform(0, 20, (200, 3)), rng.uniform(0, 1, 200)
    def kept_at(threshold):
        passing = np.nonzero(scores >= threshold)[0]
        return set(passing[merge_nearby(centres[passing], scores[passing])])
    loose, strict = kept_at(0.05), kept_at(0.5)
    assert strict == {i for i in loose if scores[i] >= 0.5}


def test_markups_file_lands_on_the_lesions_in_a_real_mrml_scene(detected, mrml):
    scan, _, detection, paths = detected
    node = review.load_findings_markups(mrml.markups_logic, mrml.scene, paths["markups"])
    assert node.GetNumberOfControlPoints() == len(detection.findings)
    truth = np.array([m["center_ras"] for m in scan.truth["microbleeds"]])
    positions = []
    for index, finding in enumerate(detection.findings):
        world = np.zeros(3)
        node.GetNthControlPointPositionWorld(index, world)
        np.testing.assert_allclose(world, finding.position_ras, atol=1e-3)
        positions.append(world)
    assert len(match(truth, np.array(positions), 5.0)) >= 3


@pytest.mark.parametrize("name", ["romeo_small", "romeo_small2"])
def test_real_gre_crops_run_without_a_flood_of_detections(name, tmp_path):
    folder = REAL_DIR / name
    if not folder.is_dir():
        pytest.skip(f"real GRE crops not found at {folder}")
    result = cli("detect", folder / "Mag.nii", "--phase", folder / "Phase.nii", "--crop", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "Mag.json").read_text())
    volume_ml = np.prod(summary["shape"]) * np.prod(summary["spacing_mm"]) / 1000
    assert summary["counts"]["total"] <= max(2, volume_ml / 10), summary["counts"]


def _copy_shipped_ensemble(folder):
    for member in classify.read_ensemble_card(classify.DEFAULT_MODEL)["members"]:
        weights = classify.MODELS_DIR / member["file"]
        shutil.copy(weights, folder / weights.name)
        shutil.copy(card_path(weights), card_path(folder / weights.name))
    shutil.copy(classify.DEFAULT_MODEL, folder / classify.DEFAULT_MODEL.name)
    return folder / classify.DEFAULT_MODEL.name


def test_corrupt_weights_are_refused_by_hash(tmp_path):
    weights = tmp_path / "cmb_cnn.pt"
    shutil.copy(classify.DEFAULT_WEIGHTS, weights)
    shutil.copy(card_path(classify.DEFAULT_WEIGHTS), card_path(weights))
    classify.load_model(weights)  # an intact copy loads
    flip_a_byte(weights)
    with pytest.raises(WeightsError, match="do not match their model card"):
        classify.load_model(weights)


def test_the_shipped_ensemble_averages_its_members_and_refuses_a_swapped_one(tmp_path):
    card_file = _copy_shipped_ensemble(tmp_path)
    ensemble = classify.load_model(card_file)
    members = [classify.load_model(tmp_path / m["file"]) for m in ensemble.card["members"]]
    assert len(ensemble.networks) == len(members) >= 2
    patches = classify.extract_patches(synthetic_prepared(), np.array([SPHERE_RAS, TUBE_RAS]))
    mean = np.mean([classify.score_patches(m, patches) for m in members], axis=0)
    assert np.allclose(classify.score_patches(ensemble, patches), mean, atol=1e-6)
    # Batching is a speed choice only: one patch per pass gives the same scores.
    assert np.allclose(classify.score_patches(ensemble, patches, batch_size=1), mean, atol=1e-6)
    # A member replaced by another valid network (its own card matches) is still refused: the ensemble's
    # threshold was tuned for the listed members.
    first, second = (tmp_path / m["file"] for m in ensemble.card["members"][:2])
    for suffix in (".pt", ".json"):
        shutil.copy(second.with_suffix(suffix), first.with_suffix(suffix))
    with pytest.raises(WeightsError, match="is not the network"):
        classify.load_model(card_file)
    # Editing the member list by hand breaks the card's identity.
    card = json.loads(card_file.read_text())
    card["members"] = card["members"][1:]
    card_file.write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="does not match the member hashes"):
        classify.load_model(card_file)


def _write(tmp_path, name, array, affine=None):
    """Write through nibabel (the common writer), or SimpleITK for NaN (nibabel's writer zeroes NaN)."""
    path = tmp_path / name
    array = np.asarray(array)
    if array.ndim == 3 and np.isnan(array).any():
        write_volume(Volume(array, np.eye(4)), path)
    else:
        nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


@pytest.mark.parametrize("make, words", [
    (lambda tmp: tmp / "missing.nii.gz", "file not found"),
    (lambda tmp: _write(tmp, "flat.nii.gz", np.random.default_rng(0).random((64, 64)).astype(np.float32)), "2D"),
    (lambda tmp: _write(tmp, "empty.nii.gz", np.zeros((64, 64, 64), np.float32)), "empty"),
    (lambda tmp: _write(tmp, "nan.nii.gz", np.where(np.random.default_rng(0).random((64, 64, 64)) > 0.5, np.nan, 1.0).astype(np.float32)), "NaN"),
    (lambda tmp: _write(tmp, "labels.nii.gz", np.random.default_rng(0).integers(0, 4, (80, 80, 80)).astype(np.int16)), "label map"),
    (lambda tmp: _write(tmp, "noise.nii.gz", np.random.default_rng(0).random((200, 220, 180)).astype(np.float32)), "does not look like a brain"),
])
def test_bad_input_gives_one_clear_line(tmp_path, make, words):
    result = cli("detect", make(tmp_path), "--out", tmp_path / "out", "--no-png")
    assert result.returncode == 2
    assert words in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_corrupt_weights_through_the_command_line(tmp_path, detected):
    _, files, _, _ = detected
    weights = tmp_path / "bad.pt"
    weights.write_bytes(b"not a model")
    shutil.copy(card_path(classify.DEFAULT_WEIGHTS), card_path(weights))
    result = cli("detect", files["magnitude"], "--model", weights, "--out", tmp_path, "--no-png")
    assert result.returncode == 2 and "do not match their model card" in result.stderr


def test_a_multi_echo_phase_under_combine_gives_its_last_echo_with_a_warning(tmp_path):
    phases = (np.random.default_rng(1).random((24, 24, 16, 3)) - 0.5).astype(np.float32)
    path = _write(tmp_path, "phase.nii.gz", phases)
    phase = read_phase(path, "combine")
    assert np.allclose(phase.array, phases[..., 2], atol=1e-6)  # the last echo, not a sum of squares
    assert any("3 echoes; using the phase of the last one" in w for w in phase.meta["warnings"])
    assert np.allclose(read_phase(path, 1).array, phases[..., 1], atol=1e-6)


def test_a_phase_of_the_other_sign_convention_read_with_flip_gives_the_same_findings(tmp_path, detected):
    """A vendor whose phase runs the other way (veins bright, not dark): `--flip-phase` reverses its sign on
    reading, so the detector sees the phase it was trained on and finds what it finds with the right one
    (docs/experiments.md: fed unreversed, such a phase costs microbleeds)."""
    scan, files, detection, _ = detected
    other = _write(tmp_path, "other_sign_phase.nii.gz", -np.asarray(scan.phase.array), scan.phase.affine)
    reversed_phase = read_phase(other, flip=True)
    np.testing.assert_array_equal(reversed_phase.array, read_phase(files["phase"]).array)
    again = detect(scan.magnitude, reversed_phase)
    assert [f.position_ras for f in again.findings] == [f.position_ras for f in detection.findings]
    np.testing.assert_allclose([f.score for f in again.findings], [f.score for f in detection.findings], atol=1e-6)
    assert again.summary["phase_sign_reversed"] and not detection.summary["phase_sign_reversed"]


def test_the_command_line_reverses_the_phase_and_says_so(tmp_path):
    crop = small_swi_crop()
    phase = np.round(np.random.default_rng(3).uniform(-4096, 4095, crop.shape)).astype(np.int16)  # vendor units
    magnitude_file = _write(tmp_path, "crop.nii.gz", crop.array, crop.affine)
    phase_file = _write(tmp_path, "crop_phase.nii.gz", phase, crop.affine)
    result = cli("detect", magnitude_file, "--phase", phase_file, "--flip-phase", "--crop", "--no-png",
                 "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "out" / "crop.json").read_text())
    assert summary["phase_given"] and summary["phase_sign_reversed"]


def test_a_vendor_integer_phase_is_reversed_in_its_own_units():
    """Mirrored about the middle of the vendor's range, which to_radians maps to the negated radians."""
    vendor = np.array([[[-4096, -1000, 0, 2047, 4095]]], np.int16)
    units = vendor_range(vendor)
    flipped = reversed_sign(vendor, units)
    assert flipped.min() >= -4096 and flipped.max() <= 4095
    np.testing.assert_allclose(to_radians(flipped, units), -to_radians(vendor, units), atol=1e-6)
    np.testing.assert_array_equal(reversed_sign(np.float32([0.5, -3.0]), None), np.float32([-0.5, 3.0]))


def test_patches_are_sampled_on_the_ras_grid_of_an_oblique_scan():
    """Each patch point is the image interpolated at (centre + offset) in RAS, carried into voxels by the
    scan's own affine (oblique here), for magnitude and phase, and zero outside the image."""
    from scipy import ndimage
    from scipy.spatial.transform import Rotation

    from CMBDetectorLib.image import Volume
    from CMBDetectorLib.preprocess import Prepared

    rng = np.random.default_rng(3)
    shape = (30, 28, 12)
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("xyz", [12, -7, 25], degrees=True).as_matrix() @ np.diag([0.9, 0.9, 2.5])
    affine[:3, 3] = [-12.0, -10.0, -14.0]
    image, phase = rng.random(shape).astype(np.float32), rng.uniform(-np.pi, np.pi, shape).astype(np.float32)
    volume = Volume(image, affine, {})
    prepared = Prepared(volume, image, np.ones(shape, bool), phase, False, context=image)
    centres = np.array([[0.0, 0.0, 0.0], [3.5, -2.0, 1.0], [40.0, 40.0, 40.0]])
    patches = classify.extract_patches(prepared, centres)
    for centre, patch in zip(centres, patches):
        points = centre + classify.patch_offsets_mm().reshape(-1, 3)
        ijk = volume.ras_to_ijk(points).T
        shape3 = patch.shape[1:]
        np.testing.assert_allclose(patch[0], ndimage.map_coordinates(image, ijk, order=1, cval=0.0).reshape(shape3),
                                   atol=1e-5)
        np.testing.assert_allclose(patch[1], ndimage.map_coordinates(phase, ijk, order=1, cval=0.0).reshape(shape3)
                                   / np.pi, atol=1e-5)
    assert not patches[2].any()  # far outside the image
    assert not classify.extract_patches(prepared, centres, use_phase=False)[:, 1].any()
