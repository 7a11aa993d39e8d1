"""GRE phase processing shared by the detector's preprocessing and the simulator's SWI reconstruction."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def homodyne_phase(signal: np.ndarray, spacing_mm, sigma_mm: float = 4.0, slice_axis: int = 2) -> np.ndarray:
    """High-pass filtered phase: angle of S * conj(lowpass(S)), the low-pass a Gaussian within each slice
    (slice_axis: the axis across the acquired slices, Volume.slice_axis; the simulator's is always 2)."""
    sigma = [0.0 if axis == slice_axis else sigma_mm / spacing_mm[axis] for axis in range(3)]
    lowpass = ndimage.gaussian_filter(signal.real, sigma) + 1j * ndimage.gaussian_filter(signal.imag, sigma)
    return np.angle(signal * np.conj(lowpass)).astype(np.float32)
