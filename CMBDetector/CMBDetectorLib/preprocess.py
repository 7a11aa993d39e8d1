"""Preprocessing that real scans need: validation, brain mask, bias-robust normalisation, SWI phase.

Works in the image's own voxel grid (no reorientation or resampling of the whole volume: thick slices
stay thick and nothing is interpolated twice); every size is given in millimetres and converted per
axis with the voxel spacing, so the same settings serve 0.5x0.5x2 mm SWI and 1x1x5 mm 2D GRE.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .errors import InputError
from .grids import block_mean, upsample_blocks
from .image import Volume
from .io import validate_brain_volume
from .simulate.physics import homodyne_phase

logger = logging.getLogger(__name__)

MIN_BRAIN_ML = 250.0  # less than this in a whole-head field of view is not a brain
MAX_BRAIN_ML = 3200.0  # more than this is not a brain either (noise, a phantom, a body scan)
BIAS_SIGMA_MM = 12.0


@dataclass
class Prepared:
    """A scan ready for detection.

    image: float32 (I, J, K) magnitude divided by a smooth local tissue level (about 1 in brain tissue),
    zero outside the brain mask (what stage 1 screens and the YOLO stage sees).
    mask: bool (I, J, K) brain mask. phase: float32 high-pass phase in radians, or None.
    context: the same normalised magnitude without the mask (clipped to CONTEXT_MAX), for the CNN's
    patches: a lesion at the brain surface then sits in real anatomy, not next to an artificial black
    cut that looks like the edge artefacts the CNN learns to reject.
    """

    volume: Volume
    image: np.ndarray
    mask: np.ndarray
    phase: np.ndarray | None
    crop: bool
    warnings: list = field(default_factory=list)
    context: np.ndarray | None = None

    @property
    def unmasked(self) -> np.ndarray:
        return self.image if self.context is None else self.context

    @property
    def spacing(self) -> np.ndarray:
        return self.volume.spacing


def sigma_voxels(sigma_mm: float, spacing) -> list:
    return [sigma_mm / s for s in spacing]


def _erode_mm(mask, spacing, mm):
    return ndimage.distance_transform_edt(mask, sampling=spacing) > mm


def _dilate_mm(mask, spacing, mm):
    return ndimage.distance_transform_edt(~mask, sampling=spacing) <= mm


def _largest_component(mask):
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == np.argmax(sizes)


def _fill_holes_slicewise(mask):
    filled = ndimage.binary_fill_holes(mask)
    for k in range(mask.shape[2]):
        filled[:, :, k] = ndimage.binary_fill_holes(filled[:, :, k])
    return filled


COARSE_MM = 2.0  # mask and bias level are smooth: compute them on a ~2 mm grid, then upsample


def _coarse_factors(spacing) -> tuple:
    return tuple(max(1, int(round(COARSE_MM / s))) for s in spacing)


def brain_mask(volume: Volume, crop: bool = False) -> np.ndarray:
    """Automatic brain mask for a GRE/SWI magnitude: threshold, cut the scalp off by erosion, keep the
    largest piece, grow it back, fill holes (dark lesions and veins stay inside). Computed at ~2 mm."""
    factors = _coarse_factors(volume.spacing)
    spacing = volume.spacing * np.array(factors)
    coarse = block_mean(volume.array.astype(np.float32), factors)
    smooth = ndimage.gaussian_filter(coarse, sigma_voxels(1.0, spacing))
    high = float(np.percentile(smooth, 99.0))
    foreground = smooth > 0.2 * high
    if crop:
        mask = _fill_holes_slicewise(ndimage.binary_closing(foreground, iterations=2))
    else:
        core = _largest_component(_erode_mm(foreground, spacing, 5.0))
        mask = _dilate_mm(core, spacing, 5.0) & foreground
        mask = _fill_holes_slicewise(ndimage.binary_closing(mask, iterations=2))
    return upsample_blocks(mask, factors, volume.shape, nearest=True)


CONTEXT_MAX = 3.0  # scalp fat and vessels outside the brain can be far brighter than tissue


def normalise(array: np.ndarray, mask: np.ndarray, spacing) -> np.ndarray:
    """Divide by a smooth local tissue level (masked Gaussian average): removes coil bias, keeps dots.
    Not masked: outside the brain the level is the nearby brain's (extrapolated by the same average)."""
    factors = _coarse_factors(spacing)
    coarse_spacing = np.asarray(spacing) * np.array(factors)
    weights = mask.astype(np.float32)
    coarse_signal = block_mean(array * weights, factors)
    coarse_weight = block_mean(weights, factors)
    sigma = sigma_voxels(BIAS_SIGMA_MM, coarse_spacing)
    level = ndimage.gaussian_filter(coarse_signal, sigma) / np.maximum(ndimage.gaussian_filter(coarse_weight, sigma), 1e-3)
    level = upsample_blocks(level, factors, array.shape)
    median = float(np.median(array[mask])) if mask.any() else float(np.median(array))
    level = np.maximum(level, 0.2 * median)
    return (array / level).astype(np.float32)


def prepare(volume: Volume, phase: Volume | None = None, mask: Volume | None = None,
            crop: bool = False) -> Prepared:
    """Validate, mask, normalise; high-pass the phase when one is given (same grid required)."""
    validate_brain_volume(volume, "input", allow_crop=crop)
    warnings = []
    spacing = volume.spacing
    if mask is not None:
        if mask.shape != volume.shape or not np.allclose(mask.affine, volume.affine, atol=1e-3):
            raise InputError("mask: its grid (shape or affine) differs from the input volume's")
        brain = mask.array > 0.5
        if not brain.any():
            raise InputError("mask: the mask is empty")
    else:
        brain = brain_mask(volume, crop=crop)
    brain_ml = brain.sum() * float(np.prod(spacing)) / 1000.0
    if not crop and not MIN_BRAIN_ML <= brain_ml <= MAX_BRAIN_ML:
        raise InputError(f"input: does not look like a brain (the automatic brain mask holds {brain_ml:.0f} mL, "
                         f"expected {MIN_BRAIN_ML:.0f}-{MAX_BRAIN_ML:.0f}); is this a head GRE/SWI scan? "
                         "For a partial-brain crop use --crop, or give --mask")
    unmasked = normalise(volume.array.astype(np.float32), brain, spacing)
    image = unmasked * brain
    context = np.clip(unmasked, 0.0, CONTEXT_MAX, out=unmasked)
    phase_hp = None
    if phase is not None:
        validate_brain_volume(phase, "phase", allow_crop=True)
        if phase.shape != volume.shape or not np.allclose(phase.affine, volume.affine, atol=1e-3):
            raise InputError("phase: its grid (shape or affine) differs from the magnitude's")
        radians = phase.array.astype(np.float32)
        if np.abs(radians).max() > np.pi + 0.01:  # vendor integer scaling, e.g. -4096..4095
            radians = (radians - radians.min()) / max(np.ptp(radians), 1e-6) * 2 * np.pi - np.pi
            warnings.append("phase rescaled from integer units to radians")
        complex_signal = volume.array * np.exp(1j * radians)
        phase_hp = homodyne_phase(complex_signal, spacing) * brain
    return Prepared(volume, image, brain, phase_hp, crop, warnings, context)
