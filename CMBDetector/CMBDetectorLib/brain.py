"""Brain extraction for any whole-head GRE or SWI magnitude.

Three kinds of evidence, combined:
- anatomy: the MNI152 2009 brain hull (atlas.load_mni_brain_hull), carried into the scan by the affine
  registration that also places findings in the atlas (locate.register_to_mni: mutual information, so no
  contrast is assumed). Bright scalp, marrow, eyes and neck lie outside it however they touch the brain.
- a learned mask (brain_model.py): a small U-Net on the registered MNI grid, trained on simulated heads with
  random contrasts, reads where this brain's edge is; it keeps a dark cortex (SWI's phase mask) that an
  intensity edge cuts off. It is trusted only while it agrees with the registered hull (MIN_AGREEMENT).
- intensity: the hull moved by the scan's own edge within BAND_MM (registered_mask), when no network is
  used or the network strays.
The hull is used whenever the registration's geometry is plausible (scale, shear, field of view, whole-head
mutual information), even where locate.py declines to name locations because the brain's interior carries
little information (an unusual contrast: seen on simulated 1.5 T SWI). Otherwise (a partial field of view,
noise, a failed registration) the mask falls back to intensity alone, and its volume must look like a brain.

Everything is computed on a grid of about COARSE_MM (the mask is smooth), then upsampled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .errors import InputError
from .grids import block_centres, block_mean, coarse_factors, sigma_voxels, upsample_blocks
from .image import Volume

COARSE_MM = 2.0
BAND_MM = 6.0  # how far the intensity edge may move the registered hull, in or out (elastic anatomy differences)
EDGE_FRACTION = 0.5  # brain and CSF are brighter than this fraction of the median inside the hull
CLOSE_MM = 3.0  # closing radius: a dark lesion or vein at the cortex never dents the mask
MIN_BRAIN_ML = 250.0  # less than this in a whole-head field of view is not a brain
MAX_BRAIN_ML = 3200.0  # more than this is not a brain either (noise, a phantom, a body scan)
MIN_AGREEMENT = 0.85  # Dice with the registered template hull below which the learned mask is not trusted


@dataclass
class BrainMask:
    """mask: bool (I, J, K) on the scan's grid. method: 'learned', 'registered', 'intensity' or 'crop'.
    registration: the locate.Registration tried (None for a crop), reused to place findings."""

    mask: np.ndarray
    method: str
    registration: object = None
    warnings: list = field(default_factory=list)

    def volume_ml(self, spacing) -> float:
        return float(self.mask.sum() * np.prod(spacing) / 1000.0)


BALL_MAX_VOXELS = 1000  # a larger ball costs more than one distance transform of the whole grid


def _ball(spacing, mm):
    """Voxel offsets within mm of the centre (bool, odd size per axis), or None when larger than BALL_MAX_VOXELS."""
    radius = np.floor(mm / np.asarray(spacing, float)).astype(int)
    if np.prod(2 * radius + 1) > BALL_MAX_VOXELS:
        return None
    offsets = np.indices(2 * radius + 1).reshape(3, -1).T - radius
    return (np.sqrt(((offsets * np.asarray(spacing, float)) ** 2).sum(axis=1)) <= mm).reshape(2 * radius + 1)


def erode_mm(mask, spacing, mm):
    """Voxels of mask farther than mm from any voxel outside it (the array's edge is not outside).
    A ball-shaped erosion: the same voxels as distance_transform_edt(mask) > mm, 5-15x faster on a 2 mm grid."""
    ball = _ball(spacing, mm)
    if ball is None:
        return ndimage.distance_transform_edt(mask, sampling=spacing) > mm
    return ndimage.binary_erosion(mask, ball, border_value=1)


def dilate_mm(mask, spacing, mm):
    """Voxels within mm of mask (as distance_transform_edt(~mask) <= mm)."""
    ball = _ball(spacing, mm)
    if ball is None:
        return ndimage.distance_transform_edt(~mask, sampling=spacing) <= mm
    return ndimage.binary_dilation(mask, ball)


def mask_dice(mask, other) -> float:
    """Dice overlap of two boolean masks (0.0 when both are empty)."""
    return 2.0 * np.count_nonzero(mask & other) / max(np.count_nonzero(mask) + np.count_nonzero(other), 1)


def largest_component(mask):
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == np.argmax(sizes)


def fill_holes_slicewise(mask, slice_axis: int):
    """3D hole filling, then 2D on each acquired slice (Volume.slice_axis): holes open to a neighbouring
    slice (a sinus, a thick slice's partial volume) close as well."""
    filled = ndimage.binary_fill_holes(mask)
    moved = np.moveaxis(filled, slice_axis, 0)  # a view: writing to it fills `filled`
    for index in range(moved.shape[0]):
        moved[index] = ndimage.binary_fill_holes(moved[index])
    return filled


def smooth_coarse(volume: Volume):
    factors = coarse_factors(volume.spacing, COARSE_MM)
    spacing = volume.spacing * np.array(factors)
    coarse = block_mean(np.asarray(volume.array, dtype=np.float32), factors)
    return ndimage.gaussian_filter(coarse, sigma_voxels(1.0, spacing)), factors, spacing


def coarse_intensity_mask(volume: Volume, crop: bool = False) -> tuple:
    """`intensity_mask` on its ~COARSE_MM grid: (bool mask, block factors, grid spacing)."""
    smooth, factors, spacing = smooth_coarse(volume)
    foreground = smooth > 0.2 * float(np.percentile(smooth, 99.0))
    if crop:
        mask = fill_holes_slicewise(ndimage.binary_closing(foreground, iterations=2), volume.slice_axis)
    else:
        core = largest_component(erode_mm(foreground, spacing, 5.0))
        mask = dilate_mm(core, spacing, 5.0) & foreground
        mask = fill_holes_slicewise(ndimage.binary_closing(mask, iterations=2), volume.slice_axis)
    return mask, factors, spacing


def intensity_mask(volume: Volume, crop: bool = False) -> np.ndarray:
    """Intensity-only mask: threshold, cut the scalp off by erosion, keep the largest piece, grow it back,
    fill holes. Good on a crop or a skull-stripped image; on a whole head it can take bright scalp too."""
    mask, factors, _ = coarse_intensity_mask(volume, crop)
    return upsample_blocks(mask, factors, volume.shape, nearest=True)


def hull_on_grid(volume: Volume, registration, factors) -> np.ndarray:
    """The template brain hull resampled onto the scan's coarse grid (bool), through the registration."""
    from . import atlas

    hull = atlas.load_mni_brain_hull()
    coarse_shape, native_ijk = block_centres(volume.shape, factors)
    hull_ijk = hull.ras_to_ijk(registration.to_mni(volume.ijk_to_ras(native_ijk)))
    inside = ndimage.map_coordinates(hull.array.astype(np.float32), hull_ijk.T, order=1, cval=0.0)
    return (inside > 0.5).reshape(coarse_shape)


def coarse_with_hull(volume: Volume, registration) -> tuple:
    """(smoothed scan on its ~COARSE_MM grid, block factors, grid spacing, registered hull on that grid)."""
    smooth, factors, spacing = smooth_coarse(volume)
    return smooth, factors, spacing, hull_on_grid(volume, registration, factors)


def registered_mask(volume: Volume, registration, coarse: tuple | None = None) -> np.ndarray:
    """Registered hull, moved by the scan's own edge within BAND_MM, closed, hole-filled (bool, scan grid).
    coarse: coarse_with_hull's answer when the caller has it already."""
    smooth, factors, spacing, prior = coarse or coarse_with_hull(volume, registration)
    if not prior.any():
        return np.zeros(volume.shape, bool)
    bright = smooth > EDGE_FRACTION * float(np.median(smooth[prior]))
    mask = erode_mm(prior, spacing, BAND_MM) | (dilate_mm(prior, spacing, BAND_MM) & bright)
    mask = largest_component(mask)
    mask = erode_mm(dilate_mm(mask, spacing, CLOSE_MM), spacing, CLOSE_MM)
    mask = fill_holes_slicewise(mask, volume.slice_axis)
    return upsample_blocks(mask, factors, volume.shape, nearest=True)


def learned_mask(volume: Volume, registration, model, coarse: tuple | None = None) -> tuple:
    """The brain-mask network's answer (brain_model.py) on the scan's grid, and its agreement (Dice) with the
    registered template hull. Its probability is carried back through the registration; like the intensity
    edge, it may move the hull's edge by at most BAND_MM (a bright slab of scalp or neck joined to the brain
    cannot draw it further out). Its largest piece is kept and holes filled on the coarse grid, then it is
    upsampled linearly before the 0.5 cut (a smooth edge, not COARSE_MM steps). coarse: as registered_mask."""
    from .brain_model import coarse_to_grid, grid_to_coarse

    smooth, factors, spacing, hull = coarse or coarse_with_hull(volume, registration)
    probability = grid_to_coarse(model.probability(coarse_to_grid(smooth, factors, volume, registration)),
                                 volume, registration, factors)
    probability[~dilate_mm(hull, spacing, BAND_MM)] = 0.0
    kept = fill_holes_slicewise(largest_component(probability > 0.5), volume.slice_axis)
    agreement = mask_dice(kept, hull)
    cleaned = np.where(kept, np.maximum(probability, 0.5 + 1e-3), np.minimum(probability, 0.5))
    return upsample_blocks(cleaned.astype(np.float32), factors, volume.shape) > 0.5, agreement


def extract_brain(volume: Volume, crop: bool = False, registration=None, model="shared") -> BrainMask:
    """Brain mask of a GRE/SWI magnitude; raises InputError when the image does not look like a brain.

    registration: a locate.Registration of this volume, computed here when None (and not a crop).
    model: the brain-mask network (brain_model.BrainModel); "shared": the shipped one, loaded once per process;
    None: the registered hull moved by the intensity edge alone (registered_mask).
    """
    if crop:
        return BrainMask(intensity_mask(volume, crop=True), "crop")
    if registration is None:
        from .locate import register_to_mni

        registration = register_to_mni(volume)
    if registration.plausible_geometry:
        result = _registered_brain(volume, registration, model)
        if not registration.ok:
            result.warnings.append(f"brain mask registered, but {registration.message}")
    else:
        result = BrainMask(intensity_mask(volume), "intensity", registration,
                           [f"brain mask from intensity alone ({registration.message})"])
    check_brain_volume(result.mask, volume.spacing, "the automatic brain mask",
                       "" if registration.ok else f"; {registration.message}")
    return result


def _registered_brain(volume: Volume, registration, model) -> BrainMask:
    """The learned mask, unless it strays from the registered hull by more than the anatomy can (then the
    hull moved by the intensity edge, with a warning): a safety net for images unlike any it learnt from."""
    if model is None:
        return BrainMask(registered_mask(volume, registration), "registered", registration)
    if model == "shared":
        from .brain_model import shared_brain_model

        model = shared_brain_model()
    coarse = coarse_with_hull(volume, registration)
    mask, agreement = learned_mask(volume, registration, model, coarse)
    if agreement < MIN_AGREEMENT:
        return BrainMask(registered_mask(volume, registration, coarse), "registered", registration,
                         [f"the learned brain mask disagreed with the registered template (Dice {agreement:.2f}); "
                          "the template moved by the image's own edges is used instead"])
    return BrainMask(mask, "learned", registration)


def check_brain_volume(mask: np.ndarray, spacing, what: str, why: str = "") -> None:
    """InputError unless `mask` holds MIN_BRAIN_ML-MAX_BRAIN_ML: a whole-head brain, automatic or given."""
    brain_ml = float(mask.sum() * np.prod(spacing) / 1000.0)
    if not MIN_BRAIN_ML <= brain_ml <= MAX_BRAIN_ML:
        raise InputError(f"input: does not look like a brain ({what} holds {brain_ml:.0f} mL, expected "
                         f"{MIN_BRAIN_ML:.0f}-{MAX_BRAIN_ML:.0f}{why}); is this a head GRE/SWI scan? "
                         "For a partial-brain crop use --crop, or give --mask")
