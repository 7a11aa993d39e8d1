"""Stage 1 never caps silently: what it drops is reported, and lesion-strength blobs are never dropped."""

from __future__ import annotations

import numpy as np

from CMBDetectorLib import candidates
from CMBDetectorLib.image import Volume
from CMBDetectorLib.preprocess import Prepared


def dotted(shape=(120, 120, 40), spacing=(1.0, 1.0, 1.0), strong=30, weak=60, seed=0) -> Prepared:
    """Tissue at 1 with `strong` dark 3 mm dots (microbleed-like) and `weak` faint ones (noise-like)."""
    rng = np.random.default_rng(seed)
    image = np.ones(shape, np.float32)
    grid = np.indices(shape).reshape(3, -1).T.reshape(*shape, 3)
    centres = [rng.uniform(8, np.array(shape) - 8) for _ in range(strong + weak)]
    for index, centre in enumerate(centres):
        inside = np.linalg.norm((grid - centre) * spacing, axis=-1) <= 1.5
        image[inside] = 0.1 if index < strong else 0.8
    volume = Volume(image, np.diag([*spacing, 1.0]))
    return Prepared(volume, image, np.ones(shape, bool), None, False)


def test_every_blob_kept_when_under_the_cap():
    screening = candidates.screen(dotted())
    report = screening.report
    assert report["kept"] == report["peaks"] == len(screening.candidates) > 0
    assert not report["capped"] and not report["widened"] and report["strong_dropped"] == 0


def test_over_the_cap_weak_blobs_go_first_and_it_is_reported():
    prepared = dotted()
    full = candidates.screen(prepared).report
    strong = sum(c.response >= candidates.WIDEN_RESPONSE for c in candidates.screen(prepared).candidates)
    assert 0 < strong < full["peaks"]
    screening = candidates.screen(prepared, max_candidates=strong)
    assert screening.report["capped"] and screening.report["kept"] == strong
    assert min(c.response for c in screening.candidates) >= candidates.WIDEN_RESPONSE


def test_lesion_strength_blobs_widen_the_screening_up_to_the_hard_cap():
    prepared = dotted()
    strong = sum(c.response >= candidates.WIDEN_RESPONSE for c in candidates.screen(prepared).candidates)
    widened = candidates.screen(prepared, max_candidates=5)
    assert widened.report["widened"] and widened.report["kept"] == strong and widened.report["strong_dropped"] == 0
    capped = candidates.screen(prepared, max_candidates=5, hard_cap=10)
    assert capped.report["kept"] == 10 and capped.report["strong_dropped"] == strong - 10


SWI_SPACING = np.array([0.6, 0.6, 2.5])


def column(shape=(60, 60, 40), first=17, last=23, outside_from=None) -> tuple:
    """(image, mask) of tissue at 1 holding one microbleed as SWI with a minimum-intensity projection draws
    it: a dark column along B0 (the third axis), blackest at its ends (the dipole's poles), greyer in its
    middle. Voxels from `outside_from` on along the third axis are outside the brain and dark too."""
    image = np.ones(shape, np.float32)
    i, j = np.indices(shape[:2])
    disc = np.hypot((i - 30) * SWI_SPACING[0], (j - 30) * SWI_SPACING[1]) <= 1.5
    for k in range(first, last + 1):
        image[disc, k] = 0.0 if k in (first, first + 1, last - 1, last) else 0.3
    mask = np.ones(shape, bool)
    if outside_from is not None:
        image[:, :, outside_from:] = np.minimum(image[:, :, outside_from:], 0.05)
        mask[:, :, outside_from:] = False
    return image, mask


def test_a_candidate_at_the_end_of_a_dark_column_moves_to_its_middle():
    image, mask = column()
    moved = candidates.recentre_column(image, mask, np.array([30.0, 30.0, 17.5]), (2,), SWI_SPACING)
    assert moved[:2].tolist() == [30.0, 30.0]
    assert abs(moved[2] - 20.0) < 0.5


def test_a_column_open_within_reach_keeps_the_position():
    """A through-plane vein running on past the reach: any point on it is as good, so nothing moves."""
    image, mask = column(first=17, last=39)
    start = np.array([30.0, 30.0, 17.5])
    assert candidates.recentre_column(image, mask, start, (2,), SWI_SPACING).tolist() == start.tolist()


def test_a_column_that_leaves_the_brain_keeps_the_position():
    """Dark space beyond the brain's edge (air, bone) would pull the middle out of the brain."""
    image, mask = column(first=17, last=23, outside_from=22)
    start = np.array([30.0, 30.0, 17.5])
    assert candidates.recentre_column(image, mask, start, (2,), SWI_SPACING).tolist() == start.tolist()
    image, mask = column(first=17, last=23, outside_from=26)  # the same column, inside the brain: it moves
    assert abs(candidates.recentre_column(image, mask, start, (2,), SWI_SPACING)[2] - 20.0) < 0.5


def test_a_small_shift_is_not_made():
    """Within POSITIVE_MM the CNN has learned off-centre lesions: a round dot keeps its centroid."""
    image, mask = column(first=19, last=21)
    start = np.array([30.0, 30.0, 19.6])
    assert 0 < (20 - 19.6) * SWI_SPACING[2] < candidates.POSITIVE_MM  # the middle is slice 20
    assert candidates.recentre_column(image, mask, start, (2,), SWI_SPACING).tolist() == start.tolist()


def test_screening_centres_a_column_that_the_blob_filter_reaches_at_its_ends():
    image, mask = column()
    prepared = Prepared(Volume(image, np.diag([*SWI_SPACING, 1.0])), image * mask, mask, None, False, context=image)
    strongest = candidates.screen(prepared).candidates[0]  # the blob filter peaks at a black end
    assert np.linalg.norm((strongest.ijk - [30, 30, 20]) * SWI_SPACING) < 1.25


def test_elongation_axes_are_b0_and_the_slice_axis():
    axial = Volume(np.zeros((4, 4, 4), np.float32), np.diag([0.6, 0.6, 2.5, 1.0]))
    assert candidates.elongation_axes(axial) == (2,)
    # voxel axes: 0 -> S (thick slices), 1 -> A, 2 -> R: B0 and the slice axis are both axis 0
    sagittal_slices = Volume(np.zeros((4, 4, 4), np.float32),
                             np.array([[0, 0, 0.6, 0], [0, 0.6, 0, 0], [2.5, 0, 0, 0], [0, 0, 0, 1.0]]))
    assert candidates.elongation_axes(sagittal_slices) == (0,)
    # thick slices along A (coronal), S along axis 2: both are searched
    coronal = Volume(np.zeros((4, 4, 4), np.float32),
                     np.array([[0.6, 0, 0, 0], [0, 2.5, 0, 0], [0, 0, 0.6, 0], [0, 0, 0, 1.0]]))
    assert candidates.elongation_axes(coronal) == (1, 2)
