"""Preprocessing that real scans need: validation, brain mask, bias-robust normalisation, SWI phase.

Works in the image's own voxel grid (no reorientation or resampling of the whole volume: thick slices
stay thick and nothing is interpolated twice); every size is given in millimetres and converted per
axis with the voxel spacing, so the same settings serve 0.5x0.5x2 mm SWI and 1x1x5 mm 2D GRE.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .brain import check_brain_volume, extract_brain
from .errors import InputError
from .grids import block_mean, coarse_factors, sigma_voxels, upsample_slabs
from .image import Volume
from .imagetype import blob_measures, check_image_type
from .io import validate_brain_volume
from .phase import homodyne_phase, to_radians, vendor_range
from .projection import find_min_projection, undo

logger = logging.getLogger(__name__)

BIAS_SIGMA_MM = 12.0


@dataclass
class Prepared:
    """A scan ready for detection.

    image: float32 (I, J, K) magnitude divided by a smooth local tissue level (about 1 in brain tissue),
    zero outside the brain mask (what stage 1 screens and the YOLO stage sees).
    mask: bool (I, J, K) brain mask (brain.extract_brain unless one is provided).
    phase: float32 high-pass phase in radians, or None.
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
    mask_method: str = "provided"  # how the brain mask was made: provided, registered, intensity or crop
    registration: object = None  # the locate.Registration the mask was made with, if any

    @property
    def unmasked(self) -> np.ndarray:
        return self.image if self.context is None else self.context

    @property
    def spacing(self) -> np.ndarray:
        return self.volume.spacing


COARSE_MM = 2.0  # the bias level is smooth: compute it on a ~2 mm grid, then upsample
CONTEXT_MAX = 3.0  # scalp fat and vessels outside the brain can be far brighter than tissue


def normalise(array: np.ndarray, mask: np.ndarray, spacing) -> np.ndarray:
    """Divide by a smooth local tissue level (masked Gaussian average): removes coil bias, keeps dots.
    Not masked: outside the brain the level is the nearby brain's (extrapolated by the same average).
    The full-size level is never held: it is upsampled and divided out slab by slab (memory)."""
    factors = coarse_factors(spacing, COARSE_MM)
    coarse_spacing = np.asarray(spacing) * np.array(factors)
    coarse_signal = block_mean(array, factors, weights=mask)
    coarse_weight = block_mean(mask, factors)
    sigma = sigma_voxels(BIAS_SIGMA_MM, coarse_spacing)
    level = ndimage.gaussian_filter(coarse_signal, sigma) / np.maximum(ndimage.gaussian_filter(coarse_weight, sigma), 1e-3)
    median = float(np.median(array[mask])) if mask.any() else float(np.median(array))
    normalised = np.empty(array.shape, np.float32)
    for start, stop, level_slab in upsample_slabs(level, factors, array.shape):
        np.divide(array[start:stop], np.maximum(level_slab, 0.2 * median), out=normalised[start:stop])
    return normalised


def given_brain_mask(volume: Volume, mask: Volume, crop: bool = False) -> np.ndarray:
    """A brain mask the user gave, as bool on the volume's grid; InputError when it cannot be one (other
    grid, empty, or not a whole brain's volume unless a crop). The command line calls it before any model
    loads, and prepare() for every caller."""
    if mask.shape != volume.shape or not np.allclose(mask.affine, volume.affine, atol=1e-3):
        raise InputError("mask: its grid (shape or affine) differs from the input volume's")
    brain = mask.array > 0.5
    if not brain.any():
        raise InputError("mask: the mask is empty")
    if not crop:
        check_brain_volume(brain, volume.spacing, "the given brain mask")
    return brain


def prepare(volume: Volume, phase: Volume | None = None, mask: Volume | None = None,
            crop: bool = False, brain_model="shared") -> Prepared:
    """Validate, mask, normalise; high-pass the phase when one is given (same grid required).

    brain_model: the brain-mask network for brain.extract_brain ("shared": the shipped one, loaded once).

    The registration the automatic brain mask was made with is kept on the result, so findings are placed
    with the same transform; it also serves the image-type checks (imagetype.py: T1-like contrast, not a
    head), which therefore run on whole-head scans without --mask.
    """
    validate_brain_volume(volume, "input", allow_crop=crop)
    if phase is not None:
        validate_brain_volume(phase, "phase", allow_crop=True)
        if phase.shape != volume.shape or not np.allclose(phase.affine, volume.affine, atol=1e-3):
            raise InputError("phase: its grid (shape or affine) differs from the magnitude's")
    warnings = []
    projection = find_min_projection(volume.array, volume.slice_axis)
    if projection is not None:  # every step below, brain mask included, sees the unprojected extent
        volume = volume.with_array(undo(volume.array, projection, volume.slice_axis))
        warnings.append(f"minimum-intensity projection over {projection.window} slices: undone for detection "
                        "(each dark spot back to its own extent across the slices)")
    mask_method, registration = "provided", None
    # Registration holds one core (one ITK thread, so that it is repeatable: locate.register_to_mni); the
    # other core meanwhile computes what needs no brain mask: the high-passed phase and the not-a-head
    # measures. Both release the GIL (scipy.ndimage), and the results are the same as in sequence.
    side = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cmb-prepare")
    try:
        phase_job = side.submit(high_passed_phase, volume, phase) if phase is not None else None
        if mask is not None:
            brain = given_brain_mask(volume, mask, crop)
        else:
            blob_job = None if crop else side.submit(blob_measures, volume)
            extracted = extract_brain(volume, crop=crop, model=brain_model)
            brain, mask_method, registration = extracted.mask, extracted.method, extracted.registration
            warnings += extracted.warnings
            if not crop:  # a whole head registered to MNI: is it a T2*-weighted head scan at all?
                warnings += check_image_type(volume, registration, blob_job.result()).warnings
        unmasked = normalise(np.asarray(volume.array, dtype=np.float32), brain, volume.spacing)
        image = unmasked * brain
        context = np.clip(unmasked, 0.0, CONTEXT_MAX, out=unmasked)
        phase_hp = None
        if phase_job is not None:
            phase_hp, phase_warnings = phase_job.result()
            phase_hp *= brain
            warnings += phase_warnings
    finally:
        side.shutdown(wait=True, cancel_futures=True)  # an InputError above still leaves no thread behind
    return Prepared(volume, image, brain, phase_hp, crop, warnings, context, mask_method, registration)


def high_passed_phase(volume: Volume, phase: Volume) -> tuple:
    """(homodyne high-passed phase on the whole grid, float32; warnings) of a magnitude and its phase."""
    warnings = []
    units = vendor_range(phase.array)
    radians = to_radians(phase.array, units)
    if units is not None:
        warnings.append("phase rescaled from integer units to radians")
    # magnitude * exp(i phase), built from float32 cos and sin: 4x faster than a complex exp here
    magnitude = np.asarray(volume.array, dtype=np.float32)
    complex_signal = np.empty(volume.shape, np.complex64)
    complex_signal.real = magnitude * np.cos(radians)
    complex_signal.imag = magnitude * np.sin(radians)
    return homodyne_phase(complex_signal, volume.spacing, slice_axis=volume.slice_axis), warnings
