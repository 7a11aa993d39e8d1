"""Minimum-intensity projections (mIP): recognised in the image itself and undone for dark objects.

Scanners and readers often make SWI into a sliding mIP: each slice holds the minimum over `window`
neighbouring slices. A microbleed then spans `window - 1` more slices than it does, a short dark column
that stage 2 reads as a through-plane vein (docs/benchmark.md: held-out 1.5 T SWI). A sliding mIP is an
erosion along the slice axis, so the image proves it is one: eroding its dilation gives it back exactly
(erosion of an opening, with the reflected window), which no acquired image does. Its dilation is the
opening of the unprojected image: every dark object regains its own extent across slices, and only bright
details thinner than the window are lost, which no stage needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

WINDOWS = range(2, 9)  # slices per projection tried, the largest that holds wins
# Share of the bright voxels that a projection's dilation-then-erosion must give back exactly. An acquired
# image gives back a few (quantised noise); a sliding mIP all but its first and last slices.
EXACT_SHARE = 0.97
# Before the search: share of bright voxels equal to the next slice's (a projection repeats each slab's
# minimum; noise almost never repeats): measured 0.35-0.38 on 3-slice mIPs, 0.000-0.008 on acquired scans.
# Above the upper bound the image is piecewise constant (a label map, a mask, a phantom), not a projection.
REPEAT_SHARE = (0.1, 0.9)


@dataclass(frozen=True)
class Projection:
    window: int  # slices per minimum
    origin: int  # scipy origin of the erosion that made it (the window's position around each slice)

    @property
    def dilation_origin(self) -> int:
        """scipy origin of the reflected window (the dilation that undoes this erosion)."""
        return -self.origin - (1 - self.window % 2)


def find_min_projection(array: np.ndarray, slice_axis: int) -> Projection | None:
    """The sliding mIP that made `array` along `slice_axis`, or None for an image that is not one."""
    data = np.asarray(array, np.float32)
    bright = data > 0.1 * float(np.percentile(data.reshape(-1)[::7], 99))  # a sample: no full-size copy
    if bright.sum() < 1000 or data.shape[slice_axis] < 3:
        return None
    ahead = [slice(None)] * data.ndim
    behind = [slice(None)] * data.ndim
    ahead[slice_axis], behind[slice_axis] = slice(1, None), slice(None, -1)
    both = bright[tuple(ahead)] & bright[tuple(behind)]
    repeats = (data[tuple(ahead)] == data[tuple(behind)]) & both
    share = repeats.sum() / max(int(both.sum()), 1)
    if not REPEAT_SHARE[0] <= share <= REPEAT_SHARE[1]:
        return None
    found = None
    for window in WINDOWS:  # an erosion by a window is one by every smaller window: stop at the first miss
        if window > data.shape[slice_axis]:
            break
        # A window shifted along the slices makes the same image shifted (an erosion still): which one a
        # scanner used cannot be told, so the centred one is taken first (off by at most a slice when not).
        origins = sorted(range(-(window // 2), (window - 1) // 2 + 1), key=abs)
        tried = (Projection(window, origin) for origin in origins)
        holding = next((projection for projection in tried if _gives_back(data, bright, projection, slice_axis)), None)
        if holding is None:
            break
        found = holding
    return found


def _gives_back(data, bright, projection: Projection, slice_axis: int) -> bool:
    """Whether eroding the projection's dilation gives `data` back on (nearly) every bright voxel."""
    again = project(undo(data, projection, slice_axis), projection, slice_axis)
    return float((again == data)[bright].mean()) >= EXACT_SHARE


def project(array: np.ndarray, projection: Projection, slice_axis: int) -> np.ndarray:
    """The sliding mIP itself (an erosion along the slice axis), as the scanner made it (float32)."""
    return ndimage.minimum_filter1d(np.asarray(array, np.float32), projection.window, axis=slice_axis,
                                    origin=projection.origin)


def undo(array: np.ndarray, projection: Projection, slice_axis: int) -> np.ndarray:
    """The projection's dilation along the slice axis: the opening of the unprojected image (float32)."""
    return ndimage.maximum_filter1d(np.asarray(array, np.float32), projection.window, axis=slice_axis,
                                    origin=projection.dilation_origin)
