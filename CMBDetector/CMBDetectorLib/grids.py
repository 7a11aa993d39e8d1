"""Small resampling helpers for axis-aligned grids, shared by the simulator and preprocessing."""

from __future__ import annotations

import numpy as np


def linear_along(array: np.ndarray, positions: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of `array` at fractional indices `positions` along one axis (clamped)."""
    positions = np.clip(positions, 0, array.shape[axis] - 1)
    lower = np.floor(positions).astype(int)
    upper = np.minimum(lower + 1, array.shape[axis] - 1)
    weight_shape = [1] * array.ndim
    weight_shape[axis] = -1
    weight = (positions - lower).astype(np.float32).reshape(weight_shape)
    return np.take(array, lower, axis=axis) * (1 - weight) + np.take(array, upper, axis=axis) * weight


def upsample_blocks(coarse: np.ndarray, factors, shape, nearest: bool = False) -> np.ndarray:
    """From a grid of factor-sized block means back to `shape`, block centres aligned."""
    result = coarse
    for axis, (n, f) in enumerate(zip(shape, factors)):
        positions = (np.arange(n) + 0.5) / f - 0.5
        if nearest:
            indices = np.clip(np.round(positions).astype(int), 0, coarse.shape[axis] - 1)
            result = np.take(result, indices, axis=axis)
        else:
            result = linear_along(result, positions, axis)
    return result


def block_mean(array: np.ndarray, factors) -> np.ndarray:
    """Mean over factor-sized blocks (edges padded by repetition)."""
    pad = [(0, (-n) % f) for n, f in zip(array.shape, factors)]
    padded = np.pad(array, pad, mode="edge")
    shape = []
    for n, f in zip(padded.shape, factors):
        shape += [n // f, f]
    return padded.reshape(shape).mean(axis=tuple(range(1, 2 * array.ndim, 2)))


def sigma_voxels(sigma_mm: float, spacing) -> list:
    """A Gaussian width in millimetres as voxels along each axis."""
    return [sigma_mm / s for s in spacing]


def coarse_factors(spacing, target_mm: float) -> tuple:
    """Integer block sizes per axis that bring `spacing` close to `target_mm` (1 where already coarser)."""
    return tuple(max(1, int(round(target_mm / s))) for s in spacing)
