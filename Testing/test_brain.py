"""Brain extraction on whole heads: simulated heads against their true masks, the real whole-head scan,
and images that are not brains."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from CMBDetectorLib import brain, imagetype, locate, preprocess
from CMBDetectorLib.bench import REAL_DIR
from CMBDetectorLib.errors import InputError
from CMBDetectorLib.image import Volume
from CMBDetectorLib.io import read_volume
from CMBDetectorLib.phase import from_radians, homodyne_phase, to_radians, vendor_range
from CMBDetectorLib.simulate.synth import simulate_scan

REAL_HEAD = REAL_DIR / "philips-3t-dual-echo" / "mag_echo2.nii.gz"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


@pytest.mark.parametrize("protocol,seed", [("gre15t", 861), ("ood-gre3t-thick", 862)])
def test_mask_of_a_simulated_whole_head_matches_the_true_brain(protocol, seed):
    scan = simulate_scan(seed, protocol)
    extracted = brain.extract_brain(scan.magnitude)
    assert extracted.method == "learned" and extracted.registration.ok
    assert dice(extracted.mask, scan.brain) >= 0.95


def test_a_bright_scalp_joined_to_the_brain_stays_outside_the_mask():
    """Whole-head GRE where scalp, marrow and neck touch the brain: the intensity-only mask swallows them."""
    scan = simulate_scan(863, "gre3t")
    head = scan.magnitude.array.copy()
    outside = ~scan.brain
    bridge = outside & (np.abs(np.indices(head.shape)[2] - head.shape[2] // 3) < 8)  # a slab of bright tissue
    head[bridge & (head > 0.1 * head.max())] = np.percentile(head[scan.brain], 90)
    head[bridge & (head <= 0.1 * head.max())] = np.percentile(head[scan.brain], 60)
    volume = scan.magnitude.with_array(head)
    voxel_ml = float(np.prod(volume.spacing)) / 1000
    extracted = brain.extract_brain(volume)
    assert dice(extracted.mask, scan.brain) >= 0.93
    assert extracted.mask.sum() * voxel_ml < 1.1 * scan.brain.sum() * voxel_ml
    assert brain.intensity_mask(volume).sum() > 1.3 * scan.brain.sum()


@pytest.mark.skipif(not REAL_HEAD.is_file(), reason="the shared real scans are not beside this checkout")
def test_the_real_whole_head_scan_is_accepted_with_a_brain_sized_mask():
    volume = read_volume(REAL_HEAD)
    prepared = preprocess.prepare(volume)
    volume_ml = prepared.mask.sum() * float(np.prod(volume.spacing)) / 1000
    assert prepared.mask_method == "learned" and prepared.registration.ok
    assert 1000 <= volume_ml <= 1800


def test_noise_is_refused_by_name():
    noise = Volume(np.random.default_rng(1).random((160, 200, 40)).astype(np.float32), np.diag([1.2, 1.2, 4.0, 1.0]))
    with pytest.raises(InputError, match="does not look like a brain.*registration to MNI rejected"):
        brain.extract_brain(noise)


def test_a_plausible_registration_carries_the_hull_even_when_locations_are_withheld():
    """Unusual contrasts can leave the brain's interior with little shared information: locate.py then names no
    locations, but the registration's geometry still places the brain better than intensity alone."""
    scan = simulate_scan(865, "gre15t")
    registration = locate.register_to_mni(scan.magnitude)
    assert registration.ok
    passed, text = registration.checks["interior"]
    registration.checks["interior"] = (False, text)  # as on a flat-contrast scan
    withheld = locate.Registration(False, "registration to MNI rejected: " + text, registration.seconds,
                                   registration.metric, registration.mni_to_scan, registration.checks)
    extracted = brain.extract_brain(scan.magnitude, registration=withheld)
    assert extracted.method == "learned" and dice(extracted.mask, scan.brain) >= 0.95
    assert any("interior mutual information" in warning for warning in extracted.warnings)
    partial = dict(registration.checks, field_of_view=(False, "40% of the template brain inside the scan"))
    cut = locate.Registration(False, "rejected: field of view", 0.0, registration.metric, registration.mni_to_scan, partial)
    assert brain.extract_brain(scan.magnitude, registration=cut).method == "intensity"


@pytest.fixture(scope="module")
def thick_slice_head():
    return simulate_scan(864, "gre15t")


def test_a_given_mask_must_hold_a_brain_too(thick_slice_head):
    scan = thick_slice_head
    everything = scan.magnitude.with_array(np.ones(scan.magnitude.shape, np.float32))
    with pytest.raises(InputError, match="the given brain mask holds .* mL, expected 250-3200"):
        preprocess.prepare(scan.magnitude, mask=everything)
    given = preprocess.prepare(scan.magnitude, mask=scan.magnitude.with_array(scan.brain.astype(np.float32)))
    assert given.mask_method == "provided" and given.registration is None


def test_a_crop_keeps_the_intensity_mask_and_needs_no_registration(thick_slice_head):
    scan = thick_slice_head
    crop = Volume(scan.magnitude.array[60:140, 80:160, 10:30].copy(), scan.magnitude.affine.copy())
    extracted = brain.extract_brain(crop, crop=True)
    assert extracted.method == "crop" and extracted.registration is None and extracted.mask.any()


@pytest.mark.parametrize("spacing", [(2.0, 2.0, 2.0), (1.0, 1.0, 4.0), (2.136, 2.136, 2.855)])
def test_erode_and_dilate_by_millimetres_are_the_distance_transform_definitions(spacing):
    """The fast ball-shaped morphology gives exactly the voxels the distance transform defines, edges included."""
    from scipy import ndimage

    rng = np.random.default_rng(5)
    mask = ndimage.gaussian_filter(rng.random((40, 36, 20)), 2.0) > 0.5
    mask[:, :, 0] |= mask[:, :, 1]  # touches the array's edge
    for mm in (2.0, 3.0, 5.0, 6.0):
        assert brain._ball(spacing, mm) is not None
        np.testing.assert_array_equal(brain.erode_mm(mask, spacing, mm),
                                      ndimage.distance_transform_edt(mask, sampling=spacing) > mm)
        np.testing.assert_array_equal(brain.dilate_mm(mask, spacing, mm),
                                      ndimage.distance_transform_edt(~mask, sampling=spacing) <= mm)
    assert brain._ball((0.5, 0.5, 0.5), 10.0) is None  # too large a ball: the distance transform is used
    np.testing.assert_array_equal(brain.dilate_mm(mask, (0.5, 0.5, 0.5), 10.0),
                                  ndimage.distance_transform_edt(~mask, sampling=(0.5, 0.5, 0.5)) <= 10.0)


def _prepare_threads() -> list:
    return [thread for thread in threading.enumerate() if thread.name.startswith("cmb-prepare")]


def test_prepare_gives_what_the_steps_give_in_sequence(thick_slice_head):
    """prepare works on the phase and the not-a-head measures while the scan registers: the result must be
    what the same steps give one after another, and no worker thread may outlive the call."""
    scan = thick_slice_head
    prepared = preprocess.prepare(scan.magnitude, scan.phase)
    assert not _prepare_threads()
    magnitude, radians = scan.magnitude.array.astype(np.float32), scan.phase.array.astype(np.float32)
    signal = (magnitude * np.cos(radians) + 1j * magnitude * np.sin(radians)).astype(np.complex64)
    sequential = homodyne_phase(signal, scan.magnitude.spacing, slice_axis=scan.magnitude.slice_axis) * prepared.mask
    np.testing.assert_array_equal(prepared.phase, sequential)
    check = imagetype.check_image_type(scan.magnitude, prepared.registration)
    assert (check.solidity, check.interior_spread) == imagetype.blob_measures(scan.magnitude)
    assert all(warning in prepared.warnings for warning in check.warnings)


def test_a_bad_phase_is_named_before_any_brain_extraction():
    """A phase on another grid is refused first, by name, even on an image that brain extraction would
    refuse too; the refusal leaves no worker thread behind."""
    noise = Volume(np.random.default_rng(2).random((160, 200, 40)).astype(np.float32), np.diag([1.2, 1.2, 4.0, 1.0]))
    shifted_affine = noise.affine.copy()
    shifted_affine[0, 3] += 5.0
    shifted = Volume(noise.array.copy(), shifted_affine)
    with pytest.raises(InputError, match="phase: its grid"):
        preprocess.prepare(noise, shifted)
    with pytest.raises(InputError, match="does not look like a brain"):
        preprocess.prepare(noise)
    assert not _prepare_threads()


def test_vendor_integer_phase_has_one_rule_for_detection_and_injection():
    """Detection (preprocess) and lesion injection read vendor phase by phase.py's one rule: its range onto
    -pi..pi, and back to the vendor's units unchanged."""
    rng = np.random.default_rng(5)
    radians = rng.uniform(-np.pi, np.pi, (24, 24, 6)).astype(np.float32)
    radians[0, 0, 0], radians[-1, -1, -1] = -np.pi, np.pi  # the full range, as a scanner writes it
    vendor = np.round((radians + np.pi) / (2 * np.pi) * 8191 - 4096).astype(np.int16)  # -4096..4095
    units = vendor_range(vendor)
    assert units == (-4096.0, 4095.0) and vendor_range(radians) is None
    assert np.abs(to_radians(vendor, units) - radians).max() < 2 * np.pi / 8191
    np.testing.assert_array_equal(np.round(from_radians(to_radians(vendor, units), units)), vendor)
    magnitude = Volume(rng.uniform(50, 100, radians.shape).astype(np.float32), np.diag([1.0, 1.0, 2.0, 1.0]))
    from_vendor, warnings = preprocess.high_passed_phase(magnitude, magnitude.with_array(vendor))
    from_radians_file, no_warnings = preprocess.high_passed_phase(magnitude, magnitude.with_array(radians))
    assert warnings == ["phase rescaled from integer units to radians"] and no_warnings == []
    assert np.abs(np.angle(np.exp(1j * (from_vendor - from_radians_file)))).max() < 0.02  # quantisation


def test_mask_dice_is_twice_the_overlap_over_the_sizes():
    mask_dice = brain.mask_dice
    first, second = np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4), bool)
    first[:2], second[1:3] = True, True  # 32 voxels each, 16 shared
    assert mask_dice(first, second) == 0.5 and mask_dice(first, first) == 1.0
    assert mask_dice(first, ~first) == 0.0 and mask_dice(second & ~second, first & ~first) == 0.0
