"""The reading criteria (criteria.py): which dark spots a rater would count, measured on stage 2's patches,
and what the detector does with them."""

import numpy as np
import pytest

from CMBDetectorLib import criteria
from CMBDetectorLib.classify import PATCH_MM, PATCH_SIZE, patch_offsets_mm

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
