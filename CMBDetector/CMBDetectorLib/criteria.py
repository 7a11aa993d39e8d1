"""The reading criteria: a dark spot a rater would count is kept even when the networks doubt it.

The rating scales (BOMBS, MARS; Greenberg et al. 2009, ../shared/docs/cmb-domain.md) define a microbleed
by its look: small, round or ovoid, dark on T2*-weighted images, surrounded by brain parenchyma, and not
the course of a vessel. Stage 2 learnt our simulator's microbleed, a black core whose dipole blooms, and
scores a microbleed drawn another way (a Gaussian dip, a uniformly dark ellipsoid) near zero even at full
contrast (docs/lesion-probe.md). Those are what other simulators, and other scanners, draw.

This rule reads the criteria off the magnitude patch that stage 2 already sampled around each candidate
(classify.extract_patches: 20^3 points 0.8 mm apart, B0 along the last axis). The spot is the connected
region darker than half-way between the candidate's darkest central voxel and the patch's tissue level:
- deep: its centre at least MIN_DEPTH darker than tissue;
- small and round: MIN_WIDTH_MM to MAX_WIDTH_MM across each in-plane axis, at most MAX_LENGTH_MM along B0,
  in-plane elongation at most MAX_ELONGATION, at least MIN_VOLUME_MM3 (a lone dark voxel is noise);
- isolated: it does not reach the patch's faces (a vessel runs on, a void spreads), and the ring
  RING_VOXELS around it stays at least RING_LEVEL of tissue (parenchyma all round: not a vein's end
  fading into its course, not a spot on a dark edge).
Each bound was chosen on development scans only (Models README, "The reading criteria"): nominal seed 31
and held-out-domain seed 71, with look-only lesions drawn into their microbleed-free scans. A candidate
that meets every criterion is lifted to the operating threshold: as likely as the networks' weakest kept
finding, never above it.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .classify import PATCH_MM, PATCH_SIZE

MIN_DEPTH = 0.35  # 1 - centre / tissue (0.45 until 2026-12-07: Models README, "The reading criteria")
MIN_WIDTH_MM = 3.2
MAX_WIDTH_MM = 6.0
MAX_LENGTH_MM = 8.0  # along B0: a through-plane vessel runs the patch's whole 16 mm
MAX_ELONGATION = 1.5  # square root of the in-plane covariance's eigenvalue ratio
MIN_VOLUME_MM3 = 4.0
RING_VOXELS = (1, 4)  # the ring lies between these dilations of the spot (face-connected steps)
RING_LEVEL = 0.65  # darkest ring voxel, relative to tissue (0.7 until 2026-12-07)
TISSUE_FLOOR = 0.05  # patch points below this are outside the image (zero padding), not tissue

_CENTRE = slice(PATCH_SIZE // 2 - 1, PATCH_SIZE // 2 + 1)  # the 2 x 2 x 2 voxels around the candidate
_STEP = ndimage.generate_binary_structure(3, 1)


def meets_criteria(magnitude_patches: np.ndarray) -> np.ndarray:
    """bool (N,): which (N, P, P, P) magnitude patches hold a spot that meets every criterion."""
    patches = np.asarray(magnitude_patches, np.float32).reshape(-1, PATCH_SIZE, PATCH_SIZE, PATCH_SIZE)
    result = np.zeros(len(patches), bool)
    if not len(patches):
        return result
    values = patches.reshape(len(patches), -1)
    inside = values > TISSUE_FLOOR
    tissue = np.zeros(len(patches), np.float32)
    some = inside.any(axis=1)
    tissue[some] = np.nanmedian(np.where(inside[some], values[some], np.nan), axis=1)
    centre = patches[:, _CENTRE, _CENTRE, _CENTRE].reshape(len(patches), -1).min(axis=1)
    deep = (tissue > TISSUE_FLOOR) & (1.0 - centre / np.maximum(tissue, TISSUE_FLOOR) >= MIN_DEPTH)
    for index in np.nonzero(deep)[0]:  # the cheap test first: most candidates stop here
        result[index] = _compact_isolated_spot(patches[index], float(tissue[index]), float(centre[index]))
    return result


def _compact_isolated_spot(patch: np.ndarray, tissue: float, centre_value: float) -> bool:
    labels, _ = ndimage.label(patch < (centre_value + tissue) / 2)
    block = patch[_CENTRE, _CENTRE, _CENTRE]
    darkest = np.unravel_index(np.argmin(block), block.shape)
    label = labels[tuple(_CENTRE.start + np.array(darkest))]
    spot = labels == label
    voxels = np.argwhere(spot)
    low, high = voxels.min(axis=0), voxels.max(axis=0)
    if low.min() == 0 or high.max() == PATCH_SIZE - 1:
        return False
    width_mm = (high - low + 1) * PATCH_MM
    if (width_mm[:2].min() < MIN_WIDTH_MM or width_mm[:2].max() > MAX_WIDTH_MM or width_mm[2] > MAX_LENGTH_MM
            or len(voxels) * PATCH_MM ** 3 < MIN_VOLUME_MM3):
        return False
    in_plane = voxels[:, :2] - voxels[:, :2].mean(axis=0)
    spread = np.linalg.eigvalsh(np.cov(in_plane.T) + 1e-3 * np.eye(2))
    if np.sqrt(spread[1] / max(spread[0], 1e-3)) > MAX_ELONGATION:
        return False
    inner = ndimage.binary_dilation(spot, _STEP, iterations=RING_VOXELS[0])
    outer = ndimage.binary_dilation(spot, _STEP, iterations=RING_VOXELS[1])
    return bool(patch[outer & ~inner].min() >= RING_LEVEL * tissue)
