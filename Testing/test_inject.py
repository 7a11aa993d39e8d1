"""Synthetic microbleeds injected into an existing scan (simulate/inject.py), the fine-tune's extra positives
and its steadier held-out sensitivity check: placed in brain tissue away from known lesions and from each other,
dark where they are, nothing changed far from them, the phase kept in its own units, and repeatable."""

from __future__ import annotations

import numpy as np
import pytest

from CMBDetectorLib import preprocess
from CMBDetectorLib.simulate import inject
from CMBDetectorLib.simulate.synth import simulate_scan


@pytest.fixture(scope="module")
def head():
    scan = simulate_scan(871, "gre15t", cmb_free=True)
    return scan, preprocess.prepare(scan.magnitude, scan.phase)


def _inject(head, seed=5, count=6, phase=None):
    scan, prepared = head
    known = scan.magnitude.ijk_to_ras(np.argwhere(prepared.mask)[::5000][:3].astype(float))  # "accepted" points
    result = inject.inject_microbleeds(scan.magnitude, scan.phase if phase is None else phase, prepared.mask,
                                       prepared.context, np.random.default_rng(seed), count, avoid_ras=known)
    return result, known


def test_injected_microbleeds_are_dark_in_brain_tissue_and_keep_their_distances(head):
    scan, prepared = head
    result, known = _inject(head)
    centres = result.centres_ras
    assert len(centres) == 6
    ijk = np.round(scan.magnitude.ras_to_ijk(centres)).astype(int)
    assert prepared.mask[tuple(ijk.T)].all()
    assert np.linalg.norm(centres[:, None] - known[None], axis=-1).min() >= inject.CLEARANCE_MM
    gaps = np.linalg.norm(centres[:, None] - centres[None], axis=-1)[np.triu_indices(len(centres), 1)]
    assert gaps.min() >= inject.SEPARATION_MM
    before, after = scan.magnitude.array, result.magnitude.array
    assert np.all(after[tuple(ijk.T)] < 0.6 * before[tuple(ijk.T)])  # a microbleed is dark where it is
    far = np.ones(before.shape, bool)
    for point in ijk:  # beyond a dipole's reach (< 25 mm at 3 T, TE 40 ms, 2 ppm) nothing changes
        box = tuple(slice(max(c - int(np.ceil(30 / s)), 0), c + int(np.ceil(30 / s)) + 1)
                    for c, s in zip(point, scan.magnitude.spacing))
        far[box] = False
    assert far.any() and np.array_equal(after[far], before[far].astype(np.float32))
    assert np.array_equal(result.phase.array[far], scan.phase.array[far].astype(np.float32))
    assert not np.array_equal(result.phase.array[~far], scan.phase.array[~far].astype(np.float32))


def test_injection_is_repeatable_and_keeps_vendor_phase_units(head):
    scan, _ = head
    first, _ = _inject(head, seed=9, count=3)
    again, _ = _inject(head, seed=9, count=3)
    assert np.array_equal(first.centres_ras, again.centres_ras)
    assert np.array_equal(first.magnitude.array, again.magnitude.array)
    vendor = scan.phase.with_array(np.round(scan.phase.array / np.pi * 4095).astype(np.int16))  # -4095..4095
    result, _ = _inject(head, seed=9, count=3, phase=vendor)
    assert result.phase.array.min() >= vendor.array.min() - 0.5 and result.phase.array.max() <= vendor.array.max() + 0.5
    assert np.abs(result.phase.array - vendor.array).max() > 100  # changed, in vendor units, not radians


@pytest.mark.parametrize("model", ["gaussian", "flat"])
def test_look_only_lesions_are_dips_of_their_measured_contrast_and_leave_the_phase(head, model):
    scan, prepared = head
    result = inject.inject_microbleeds(scan.magnitude, scan.phase, prepared.mask, prepared.context,
                                       np.random.default_rng(3), 5, lesion_model=model)
    assert len(result.centres_ras) == 5 and len(result.contrast) == 5
    assert (result.contrast >= inject.MIN_CONTRAST).all() and (result.contrast <= inject.LOOK_DEPTH[1]).all()
    ijk = np.round(scan.magnitude.ras_to_ijk(result.centres_ras)).astype(int)
    before, after = scan.magnitude.array.astype(np.float32), result.magnitude.array
    for point, contrast in zip(ijk, result.contrast):  # the darkest voxel near the centre has that contrast
        box = tuple(slice(max(c - 2, 0), c + 3) for c in point)
        assert np.isclose((after[box] / before[box]).min(), 1 - contrast, atol=1e-3)
    assert np.array_equal(result.phase.array, scan.phase.array.astype(np.float32))
    with pytest.raises(ValueError, match="lesion model"):
        inject.inject_microbleeds(scan.magnitude, None, prepared.mask, prepared.context,
                                  np.random.default_rng(3), 1, lesion_model="cube")


def test_a_projected_scan_gets_its_lesions_projected_so_that_undoing_the_projection_keeps_them(head):
    # Drawn into a 3-slice minimum-intensity projection as it stands, a lesion on one or two slices would be
    # erased by preprocessing's undo (a dilation along the slices) before stage 1 saw it.
    from scipy import ndimage

    from CMBDetectorLib.projection import find_min_projection, undo

    scan, prepared = head
    axis = scan.magnitude.slice_axis
    projected = scan.magnitude.with_array(ndimage.minimum_filter1d(scan.magnitude.array.astype(np.float32), 3,
                                                                   axis=axis))
    result = inject.inject_microbleeds(projected, None, prepared.mask, prepared.context,
                                       np.random.default_rng(4), 5, lesion_model="gaussian")
    projection = find_min_projection(result.magnitude.array, axis)
    assert projection is not None and projection.window == 3  # still the scanner's projection
    ijk = tuple(np.round(scan.magnitude.ras_to_ijk(result.centres_ras)).astype(int).T)
    before = undo(projected.array, projection, axis)[ijk]
    after = undo(result.magnitude.array, projection, axis)[ijk]
    assert len(result.centres_ras) == 5 and np.all(after <= (1 - 0.8 * result.contrast) * before)
