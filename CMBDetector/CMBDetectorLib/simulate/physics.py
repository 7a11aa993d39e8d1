"""MRI physics for the simulator: susceptibility -> field -> complex GRE signal -> SWI.

Conventions: B0 along +z of the scanner frame (RAS z, superior); susceptibility in ppm (SI);
field as dB/B0 in ppm; phase = -gamma * dB * TE, so paramagnetic tissue inside a vein parallel to B0
gets negative phase, as on the "left-handed" (Siemens-like) systems the SWI negative phase mask assumes.
"""

from __future__ import annotations

import numpy as np
import scipy.fft

GAMMA_HZ_PER_T = 42.577478e6  # proton gyromagnetic ratio / 2 pi


def dipole_kernel(shape, spacing_mm) -> np.ndarray:
    """D(k) = 1/3 - kz^2/|k|^2 on the rfft grid of `shape`, B0 along the last axis; D(0) = 0.

    Returns float32 of shape (n0, n1, n2 // 2 + 1).
    """
    k = [np.fft.fftfreq(n, d) for n, d in zip(shape[:2], spacing_mm[:2])]
    k.append(np.fft.rfftfreq(shape[2], spacing_mm[2]))
    kx, ky, kz = np.meshgrid(*k, indexing="ij", sparse=True)
    k2 = kx ** 2 + ky ** 2 + kz ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        kernel = 1.0 / 3.0 - kz ** 2 / k2
    kernel[0, 0, 0] = 0.0
    return kernel.astype(np.float32)


def field_from_susceptibility(chi_ppm: np.ndarray, spacing_mm, pad_fraction: float = 0.5) -> np.ndarray:
    """dB/B0 (ppm) of a susceptibility map (ppm), by the dipole kernel in k-space.

    chi_ppm: float array (I, J, K) in a frame whose third axis is parallel to B0. The map is
    zero-padded by `pad_fraction` of its size on each axis so the periodic FFT does not wrap.
    """
    shape = np.array(chi_ppm.shape)
    padded = [scipy.fft.next_fast_len(int(n + 2 * round(n * pad_fraction / 2)), real=True) for n in shape]
    spectrum = scipy.fft.rfftn(chi_ppm.astype(np.float32), s=padded, workers=-1)
    spectrum *= dipole_kernel(padded, spacing_mm)
    field = scipy.fft.irfftn(spectrum, s=padded, workers=-1)
    return field[: shape[0], : shape[1], : shape[2]].astype(np.float32)


def sphere_field(offset_mm: np.ndarray, radius_mm: float, delta_chi_ppm: float) -> np.ndarray:
    """Analytic dB/B0 (ppm) of a uniformly magnetised sphere, B0 along z, Lorentz-corrected.

    offset_mm: (..., 3) positions relative to the sphere centre. Outside:
    (dchi/3) (a/r)^3 (3 cos^2 theta - 1); inside: 0.
    """
    r2 = np.sum(offset_mm ** 2, axis=-1)
    r2 = np.maximum(r2, 1e-12)
    cos2 = offset_mm[..., 2] ** 2 / r2
    field = (delta_chi_ppm / 3.0) * (radius_mm ** 2 / r2) ** 1.5 * (3.0 * cos2 - 1.0)
    return np.where(r2 > radius_mm ** 2, field, 0.0)


def phase_per_ppm(b0_tesla: float, te_s: float) -> float:
    """Radians of phase accrued at echo time te_s per ppm of field offset (sign: see module doc)."""
    return -2.0 * np.pi * GAMMA_HZ_PER_T * b0_tesla * 1e-6 * te_s


def gre_signal(relaxed_magnitude: np.ndarray, field_ppm: np.ndarray, b0_tesla: float, te_s: float,
               voxel_mm) -> np.ndarray:
    """Complex GRE signal (complex64) at echo time te_s, with intravoxel dephasing from the field gradient.

    relaxed_magnitude: sum over tissues of fraction * proton density * exp(-TE R2*).
    Within a voxel of width d the phase is taken as linear with gradient g (rad/mm); averaging
    exp(i g x) over the voxel gives sinc(g d / 2 pi) per axis (np.sinc convention).
    """
    phase = phase_per_ppm(b0_tesla, te_s) * field_ppm
    dephasing = np.ones_like(phase)
    for axis, width in enumerate(voxel_mm):
        gradient = np.gradient(phase, width, axis=axis)
        dephasing *= np.abs(np.sinc(gradient * width / (2.0 * np.pi)))
    return (relaxed_magnitude * dephasing * np.exp(1j * phase)).astype(np.complex64)


def swi_magnitude(magnitude: np.ndarray, hp_phase: np.ndarray, power: int = 4) -> np.ndarray:
    """SWI: magnitude times the negative phase mask (1 for phase >= 0, (pi + phase)/pi below) ** power."""
    mask = np.where(hp_phase < 0, (np.pi + hp_phase) / np.pi, 1.0)
    return (magnitude * np.clip(mask, 0.0, 1.0) ** power).astype(np.float32)
