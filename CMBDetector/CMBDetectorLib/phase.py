"""GRE phase processing shared by the detector's preprocessing and the simulator's SWI reconstruction."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


RADIANS_LIMIT = np.pi + 0.01  # a phase beyond +-pi (and rounding) is in vendor integer units, e.g. -4096..4095


def vendor_range(array) -> tuple | None:
    """(low, high) of a phase stored in vendor integer units; None for a phase in radians."""
    low, high = float(np.min(array)), float(np.max(array))
    return (low, high) if max(abs(low), abs(high)) > RADIANS_LIMIT else None


def to_radians(array, units: tuple | None) -> np.ndarray:
    """A float32 copy of a phase in radians; `units`: its vendor_range (None: already radians). The vendor's
    range is mapped linearly onto -pi..pi."""
    radians = np.array(array, dtype=np.float32)
    if units is None:
        return radians
    return (radians - units[0]) / max(units[1] - units[0], 1e-6) * np.float32(2 * np.pi) - np.float32(np.pi)


def from_radians(radians: np.ndarray, units: tuple | None) -> np.ndarray:
    """A phase in radians back to the vendor's units (to_radians undone)."""
    if units is None:
        return radians
    return ((radians + np.pi) / (2 * np.pi) * (units[1] - units[0]) + units[0]).astype(np.float32)


def reversed_sign(array, units: tuple | None) -> np.ndarray:
    """A float32 phase of the opposite sign convention, in its own units (`units`: its vendor_range): the
    radians negated, or the vendor's range mirrored about its middle, which to_radians maps to the negation."""
    phase = np.asarray(array, dtype=np.float32)
    return -phase if units is None else np.float32(units[0] + units[1]) - phase


def homodyne_phase(signal: np.ndarray, spacing_mm, sigma_mm: float = 4.0, slice_axis: int = 2) -> np.ndarray:
    """High-pass filtered phase: angle of S * conj(lowpass(S)), the low-pass a Gaussian within each slice
    (slice_axis: the axis across the acquired slices, Volume.slice_axis; the simulator's is always 2)."""
    sigma = [0.0 if axis == slice_axis else sigma_mm / spacing_mm[axis] for axis in range(3)]
    lowpass = ndimage.gaussian_filter(signal.real, sigma) + 1j * ndimage.gaussian_filter(signal.imag, sigma)
    return np.angle(signal * np.conj(lowpass)).astype(np.float32)
