"""A sliding minimum-intensity projection is recognised in the image itself, and undone for dark spots."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from CMBDetectorLib.image import Volume
from CMBDetectorLib.preprocess import prepare
from CMBDetectorLib.projection import Projection, find_min_projection, undo

DOT = (20, 20, 15)  # a microbleed one slice thick, in the middle of the stack


def acquired(shape=(40, 40, 30), seed=0) -> np.ndarray:
    """Noisy tissue near 1000 with one dark dot, one slice thick (thick-slice SWI)."""
    image = np.random.default_rng(seed).normal(1000, 40, shape).astype(np.float32)
    i, j = np.indices(shape[:2])
    image[np.hypot(i - DOT[0], j - DOT[1]) <= 2, DOT[2]] = 150
    return image


@pytest.mark.parametrize("window, origin", [(3, 0), (4, 0), (4, -1), (6, 0), (6, 2)])
def test_a_sliding_projection_is_found_with_its_window(window, origin):
    """Where the window sat among the slices can hardly be told (a shifted erosion is an erosion too, but
    for the stack's ends): the window is what matters."""
    projected = ndimage.minimum_filter1d(acquired(), window, axis=2, origin=origin)
    assert find_min_projection(projected, slice_axis=2).window == window


def test_acquired_images_are_not_projections():
    assert find_min_projection(acquired(), slice_axis=2) is None
    quantised = np.round(acquired() / 8).astype(np.int16)  # integer DICOM values repeat by chance, rarely
    assert find_min_projection(quantised, slice_axis=2) is None
    assert find_min_projection(np.zeros((40, 40, 30), np.float32), slice_axis=2) is None
    phantom = np.zeros((40, 40, 30), np.float32)
    phantom[5:35, 5:35, 3:27] = 1000  # piecewise constant: every slice repeats, yet nothing was projected
    assert find_min_projection(phantom, slice_axis=2) is None


def test_the_projection_is_looked_for_along_the_slice_axis_only():
    projected = ndimage.minimum_filter1d(acquired(), 3, axis=0)
    assert find_min_projection(projected, slice_axis=0) == Projection(3, 0)
    assert find_min_projection(projected, slice_axis=2) is None


def test_undoing_gives_the_dark_dot_back_its_own_slice():
    image = acquired()
    projected = ndimage.minimum_filter1d(image, 4, axis=2)
    dark_slices = lambda array: np.nonzero(array[DOT[0], DOT[1]] < 500)[0].tolist()  # noqa: E731
    assert dark_slices(projected) == [DOT[2] - 1, DOT[2], DOT[2] + 1, DOT[2] + 2]
    opened = undo(projected, find_min_projection(projected, 2), 2)
    assert dark_slices(opened) == [DOT[2]]
    assert opened[DOT] == image[DOT]
    assert (opened <= image).all()  # an opening never brightens: nothing is invented


def test_prepare_undoes_a_projection_and_says_so():
    projected = ndimage.minimum_filter1d(acquired(), 3, axis=2)
    volume = Volume(projected, np.diag([0.7, 0.7, 2.5, 1.0]))
    mask = Volume(np.ones(projected.shape, np.float32), volume.affine.copy())
    prepared = prepare(volume, mask=mask, crop=True)
    assert any("minimum-intensity projection over 3 slices" in warning for warning in prepared.warnings)
    assert np.nonzero(prepared.image[DOT[0], DOT[1]] < 0.5)[0].tolist() == [DOT[2]]
    plain = prepare(Volume(acquired(), volume.affine.copy()), mask=mask, crop=True)
    assert not any("projection" in warning for warning in plain.warnings)
