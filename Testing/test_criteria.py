"""The reading criteria (criteria.py): which dark spots a rater would count, measured on stage 2's patches,
and what the detector does with them."""

import numpy as np
import pytest

from CMBDetectorLib import criteria
from CMBDetectorLib.classify import PATCH_MM, PATCH_SIZE, patch_offsets_mm
from CMBDetectorLib.evaluate import match
from CMBDetectorLib.pipeline import Detector
from helpers import small_swi_crop

OFFSETS = patch_offsets_mm()  # (P, P, P, 3) mm from the patch centre; the last axis is B0


def tissue(seed=0, noise=0.03):
    return 1.0 + noise * np.random.default_rng(seed).standard_normal((PATCH_SIZE,) * 3)


def gaussian_dip(depth=0.8, fwhm_mm=4.0, centre_mm=(0.0, 0.0, 0.0), scale=(1.0, 1.0, 1.0)):
    """Multiplicative darkening: a microbleed drawn by its look alone (as simulate/inject.py's "gaussian")."""
    sigma = fwhm_mm / 2.3548
    r2 = sum(((OFFSETS[..., axis] - centre_mm[axis]) / (sigma * scale[axis])) ** 2 for axis in range(3))
    return 1.0 - depth * np.exp(-r2 / 2)


def tube(radius_mm=1.0, axis=2, depth=0.8, offset_mm=(0.0, 0.0)):
    """A straight vessel through the patch along `axis`, blurred a little."""
    others = [a for a in range(3) if a != axis]
    r = np.sqrt(sum((OFFSETS[..., a] - o) ** 2 for a, o in zip(others, offset_mm)))
    return 1.0 - depth / (1.0 + np.exp((r - radius_mm) / 0.3))


def test_a_round_dark_spot_in_tissue_meets_the_criteria():
    patches = np.stack([tissue(0) * gaussian_dip(), tissue(1) * gaussian_dip(depth=0.6, fwhm_mm=5.0),
                        tissue(2) * gaussian_dip(centre_mm=(0.4, -0.4, 0.4))])
    assert criteria.meets_criteria(patches).tolist() == [True, True, True]


def test_a_faint_spot_a_thick_slice_leaves_still_counts():
    # 35-45 % deep: what partial volume in a thick slice leaves of a small microbleed; the first bounds (0.45)
    # found almost none of the lesions under 0.5 contrast in docs/lesion-probe.md
    patches = np.stack([tissue(3) * gaussian_dip(depth=0.42), tissue(4) * gaussian_dip(depth=0.38, fwhm_mm=4.5)])
    assert criteria.meets_criteria(patches).tolist() == [True, True]


@pytest.mark.parametrize("make, why", [
    (lambda: tissue() * tube(axis=2), "a through-plane vessel runs along B0 through the whole patch"),
    (lambda: tissue() * tube(axis=0), "an in-plane vessel runs across the patch"),
    (lambda: tissue() * gaussian_dip(depth=0.3), "too faint"),
    (lambda: tissue() * gaussian_dip(fwhm_mm=1.5), "a dark voxel or two: noise, not a spot"),
    (lambda: tissue() * gaussian_dip(fwhm_mm=9.0), "wider than a microbleed at half depth"),
    (lambda: tissue() * gaussian_dip(scale=(2.2, 1.0, 1.0)), "an elongated streak, not round"),
    (lambda: tissue() * gaussian_dip(scale=(1.0, 1.0, 3.0)), "a column along B0"),
    (lambda: tissue() * gaussian_dip() * tube(axis=2, offset_mm=(4.0, 0.0), depth=0.6),
     "a vessel beside it: not surrounded by tissue"),
])
def test_vessels_faint_tiny_large_or_crowded_spots_do_not(make, why):
    assert not criteria.meets_criteria(make()[None])[0], why


def test_zero_padding_outside_the_image_is_not_tissue_and_empty_input_is_fine():
    patch = tissue() * gaussian_dip()
    patch[:, :, :2] = 0.0  # the scan's edge: extract_patches pads with zeros
    assert criteria.meets_criteria(patch[None])[0]
    patch[:, :, :5] = 0.0  # an edge within the ring is not parenchyma all round: not counted
    assert not criteria.meets_criteria(patch[None])[0]
    assert criteria.meets_criteria(np.zeros((0, PATCH_SIZE, PATCH_SIZE, PATCH_SIZE))).shape == (0,)
    assert not criteria.meets_criteria(np.zeros((1, PATCH_SIZE, PATCH_SIZE, PATCH_SIZE)))[0]


def test_the_width_bounds_are_in_millimetres_of_the_patch_grid():
    # the patch grid is fixed (0.8 mm), so the bounds hold whatever the scan's voxel size
    assert criteria.MIN_WIDTH_MM / PATCH_MM >= 3 and criteria.MAX_LENGTH_MM < PATCH_SIZE * PATCH_MM


LOOK_ONLY_VOXELS = ((50, 25, 30), (25, 45, 12))  # away from small_swi_crop's own spheres


def crop_with_look_only_lesions():
    """small_swi_crop with two microbleeds drawn by their look alone: Gaussian dips 5 mm across, 50 % deep,
    which the shipped networks score near zero (they learnt the simulator's blooming sphere)."""
    volume = small_swi_crop(0)
    grid = np.meshgrid(*(np.arange(n) for n in volume.shape), indexing="ij")
    sigma = 5.0 / 2.3548
    for centre in LOOK_ONLY_VOXELS:
        r2 = sum(((axis - c) * s) ** 2 for axis, c, s in zip(grid, centre, volume.spacing))
        volume.array *= (1 - 0.5 * np.exp(-r2 / (2 * sigma ** 2))).astype(np.float32)
    return volume


@pytest.mark.parametrize("use_yolo", [True, False])  # operating thresholds 0.4 and 0.7 (0.7 is not a float32)
def test_the_detector_keeps_doubted_spots_that_meet_the_criteria_at_its_operating_threshold(use_yolo):
    volume = crop_with_look_only_lesions()
    centres = volume.ijk_to_ras(np.array(LOOK_ONLY_VOXELS, float))
    detector = Detector(device="cpu", use_yolo=use_yolo)
    found = detector.detect(volume, crop=True)
    lifted = [f for f in found.findings if f.kept_by == "criteria"]
    assert len(lifted) == 2 and len(match(centres, np.array([f.position_ras for f in lifted]), 2.5)) == 2
    for finding in lifted:  # the CNN doubted it; the criteria keep it at the operating point
        assert finding.score == detector.operating_threshold  # exactly: it must pass that threshold
        assert finding.stage_scores["cnn"] < 0.1
    assert found.summary["criteria"] == {"used": True, "lifted": 2, "kept": 2}

    alone = Detector(device="cpu", use_yolo=use_yolo, use_criteria=False).detect(volume, crop=True)
    assert alone.summary["criteria"]["used"] is False
    assert {f.kept_by for f in alone.findings} == {"networks"}
    assert sorted(f.position_ras for f in alone.findings) == sorted(
        f.position_ras for f in found.findings if f.kept_by == "networks")
