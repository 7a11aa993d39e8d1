"""Small resampling helpers for axis-aligned grids, shared by the simulator and preprocessing.

The whole-volume helpers work in slabs along the first axis, so a large scan (512 x 512 x 400) never holds
more than its result and one slab of temporaries: memory grows with the volume, not with the steps.
Slabs hold whole blocks, so the results are the same, bit for bit, as computed at once.
"""

from __future__ import annotations

import numpy as np

SLAB_ROWS = 32  # rows of the first axis per slab: small temporaries, few Python iterations


def linear_along(array: np.ndarray, positions: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of `array` at fractional indices `positions` along one axis (clamped)."""
    positions = np.clip(positions, 0, array.shape[axis] - 1)
    lower = np.floor(positions).astype(int)
    upper = np.minimum(lower + 1, array.shape[axis] - 1)
    weight_shape = [1] * array.ndim
    weight_shape[axis] = -1
    weight = (positions - lower).astype(np.float32).reshape(weight_shape)
    return np.take(array, lower, axis=axis) * (1 - weight) + np.take(array, upper, axis=axis) * weight


def _block_centres(size: int, factor: int) -> np.ndarray:
    """Fractional coarse indices of the fine voxels 0..size-1 (block centres aligned)."""
    return (np.arange(size) + 0.5) / factor - 0.5


def _resample_axis(array, positions, axis, nearest):
    if nearest:
        indices = np.clip(np.round(positions).astype(int), 0, array.shape[axis] - 1)
        return np.take(array, indices, axis=axis)
    return linear_along(array, positions, axis)


def upsample_slabs(coarse: np.ndarray, factors, shape, nearest: bool = False, rows: int = SLAB_ROWS):
    """The result of `upsample_blocks` as (start, stop, slab) pieces along the first axis."""
    first = _block_centres(shape[0], factors[0])
    for start in range(0, shape[0], rows):
        slab = _resample_axis(coarse, first[start:start + rows], 0, nearest)
        for axis in range(1, len(shape)):
            slab = _resample_axis(slab, _block_centres(shape[axis], factors[axis]), axis, nearest)
        yield start, start + slab.shape[0], slab


def upsample_blocks(coarse: np.ndarray, factors, shape, nearest: bool = False) -> np.ndarray:
    """From a grid of factor-sized block means back to `shape`, block centres aligned."""
    output = None
    for start, stop, slab in upsample_slabs(coarse, factors, shape, nearest):
        if output is None:
            output = np.empty(tuple(shape), slab.dtype)
        output[start:stop] = slab
    return output


def block_mean(array: np.ndarray, factors, weights: np.ndarray | None = None) -> np.ndarray:
    """Mean over factor-sized blocks (edges padded by repetition) of `array`, or of `array * weights`.

    Float arrays keep their dtype; bool and integer arrays (a mask) are averaged as float32."""
    dtype = array.dtype if np.issubdtype(array.dtype, np.floating) else np.float32
    step = factors[0] * max(1, SLAB_ROWS // factors[0])  # whole blocks per slab
    pieces = []
    for start in range(0, array.shape[0], step):
        slab = np.asarray(array[start:start + step], dtype=dtype)
        if weights is not None:
            slab = slab * np.asarray(weights[start:start + step], dtype=dtype)
        pad = [(0, (-n) % f) for n, f in zip(slab.shape, factors)]
        padded = np.pad(slab, pad, mode="edge")
        blocks = []
        for n, f in zip(padded.shape, factors):
            blocks += [n // f, f]
        pieces.append(padded.reshape(blocks).mean(axis=tuple(range(1, 2 * slab.ndim, 2))))
    return np.concatenate(pieces, axis=0)


def sigma_voxels(sigma_mm: float, spacing) -> list:
    """A Gaussian width in millimetres as voxels along each axis."""
    return [sigma_mm / s for s in spacing]


def block_centres(shape, factors) -> tuple:
    """(coarse shape, (N, 3) fine-grid indices of each factor-sized block's centre, C order): where a block-mean
    grid's values lie in the original voxel grid."""
    coarse_shape = tuple(-(-n // f) for n, f in zip(shape, factors))
    coarse_ijk = np.indices(coarse_shape, dtype=np.float32).reshape(3, -1).T
    return coarse_shape, (coarse_ijk + 0.5) * np.array(factors, np.float32) - 0.5


def coarse_factors(spacing, target_mm: float) -> tuple:
    """Integer block sizes per axis that bring `spacing` close to `target_mm` (1 where already coarser)."""
    return tuple(max(1, int(round(target_mm / s))) for s in spacing)


def spline_zoom(coarse: np.ndarray, shape) -> np.ndarray:
    """`coarse` zoomed to `shape` by cubic B-spline, float32: the values of
    `ndimage.zoom(coarse, zoom, order=3, mode="nearest", grid_mode=True)` cropped to `shape`, zoom = shape /
    coarse shape, to float rounding. The 3D zoom is a product of 1D ones, so it is applied one axis at a time as
    a small matrix: 64 spline taps per voxel become a few, about 20 times faster on a whole head."""
    from scipy import ndimage

    result = np.asarray(coarse, np.float64)
    for axis, (n_in, n_out) in enumerate(zip(coarse.shape, shape)):
        # column k: the 1D zoom of the k-th unit vector, i.e. the axis's linear map (spline prefilter included)
        matrix = np.stack([ndimage.zoom(np.eye(n_in)[k], n_out / n_in, order=3, mode="nearest", grid_mode=True)
                           for k in range(n_in)], axis=1)[:n_out]
        result = np.moveaxis(np.tensordot(matrix, result, axes=(1, axis)), 0, axis)
    return result.astype(np.float32)
