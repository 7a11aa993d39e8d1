"""Stage 1: high-recall screening for small hypointense blobs.

Multi-scale difference of Gaussians in millimetres (so anisotropic voxels are handled), local maxima
inside the brain mask, ranked by response. Its only job is not to miss microbleeds; the CNN rejects
the veins, calcifications, iron and edges it lets through.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .grids import block_mean, sigma_voxels
from .preprocess import Prepared

SIGMAS_MM = (0.7, 1.0, 1.4, 2.0, 2.8)
MAX_CANDIDATES = 800  # recall first: the strongest 800 blobs hold every microbleed in our held-out scans
# Beyond MAX_CANDIDATES, blobs at least this strong are still kept (up to HARD_CAP): microbleeds on the
# randomised training scans responded well above it, while the blobs past the 800th in a noisy scan are
# noise dots near the 0.04 floor that the CNN never saw in training (it learns from the strongest 800).
WIDEN_RESPONSE = 0.1
HARD_CAP = 3000


@dataclass
class Candidate:
    ijk: np.ndarray  # (3,) voxel indices, float (sub-voxel refined)
    response: float  # scale-normalised darkness
    sigma_mm: float  # best-matching blob scale
    intensity: float  # normalised image value at the centre (about 1 = tissue)


def blob_response(image: np.ndarray, spacing) -> tuple:
    """Max over scales of the DoG darkness response, and the index of the best scale (int8).
    Two blurred images at a time, whatever the number of scales (memory)."""
    best = np.zeros(image.shape, np.float32)
    scale = np.zeros(image.shape, np.int8)
    finer = ndimage.gaussian_filter(image, sigma_voxels(SIGMAS_MM[0], spacing))
    for index, coarser_mm in enumerate((*SIGMAS_MM[1:], SIGMAS_MM[-1] * 1.4)):
        coarser = ndimage.gaussian_filter(image, sigma_voxels(coarser_mm, spacing))
        response = coarser - finer  # dark blob: larger blur is brighter
        better = response > best
        best[better] = response[better]
        scale[better] = index
        finer = coarser
    return best, scale


SCREEN_MM = 0.9  # finer voxels are block-averaged to about this before screening (speed)


@dataclass
class Screening:
    """Stage 1's result: candidates (strongest first) and what the screening did, for the summary JSON.

    report: peaks (local maxima that passed), kept, cap (the limit applied), capped (some were dropped),
    min_response_kept (the weakest response kept).
    """

    candidates: list
    report: dict


def screen(prepared: Prepared, min_response: float = 0.04, max_candidates: int = MAX_CANDIDATES,
           hard_cap: int = HARD_CAP, separation_mm: float = 2.5) -> Screening:
    """Local maxima of the blob response inside the brain, strongest first (native voxel indices).

    Never silent about a cap: when more than `max_candidates` maxima pass, the weakest are dropped, but
    never one responding at WIDEN_RESPONSE or more (up to `hard_cap`); the report says what happened.
    """
    factors = tuple(max(1, int(round(SCREEN_MM / s))) for s in prepared.spacing)
    image = block_mean(prepared.image, factors)
    mask = block_mean(prepared.mask, factors) > 0.5
    spacing = prepared.spacing * np.array(factors)
    response, scale = blob_response(image, spacing)
    response *= mask
    footprint = np.maximum(1, np.round(2 * separation_mm / spacing)).astype(int) | 1
    peaks = (response == ndimage.maximum_filter(response, size=tuple(footprint))) & (response > min_response)
    peaks &= image < 0.9  # must be darker than tissue
    coordinates = np.argwhere(peaks)
    values = response[peaks]
    strong = int((values >= WIDEN_RESPONSE).sum())
    cap = max_candidates if strong <= max_candidates else min(strong, max(max_candidates, hard_cap))
    order = np.argsort(-values)[:cap]
    candidates = []
    for index in order:
        coarse = coordinates[index]
        native = np.round((coarse + 0.5) * factors - 0.5).astype(int)
        native = np.clip(native, 0, np.array(prepared.image.shape) - 1)
        centre = _refine(prepared.image, native, np.array(factors))
        candidates.append(Candidate(centre, float(values[index]), SIGMAS_MM[scale[tuple(coarse)]],
                                    float(image[tuple(coarse)])))
    report = {"peaks": int(len(values)), "kept": len(candidates), "cap": int(cap),
              "capped": bool(len(values) > cap), "widened": bool(cap > max_candidates),
              "strong_dropped": int(max(0, strong - len(candidates))),
              "min_response_kept": round(float(values[order[-1]]), 4) if len(order) else None}
    return Screening(candidates, report)


def find_candidates(prepared: Prepared, **options) -> list:
    """The candidates of `screen` alone (training and tuning code, which need no report)."""
    return screen(prepared, **options).candidates


def centres_ras(prepared: Prepared, candidates: list) -> np.ndarray:
    """(N, 3) RAS mm centres of candidates (an empty (0, 3) array for none)."""
    if not candidates:
        return np.zeros((0, 3))
    return prepared.volume.ijk_to_ras(np.array([c.ijk for c in candidates]))


def _refine(image: np.ndarray, ijk: np.ndarray, reach: np.ndarray) -> np.ndarray:
    """Darkness-weighted centroid within `reach` voxels per axis (sub-voxel centre)."""
    lo = np.maximum(ijk - reach, 0)
    hi = np.minimum(ijk + reach + 1, image.shape)
    block = image[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    weight = np.clip(1.0 - block, 0, None)
    if weight.sum() <= 0:
        return ijk.astype(float)
    grid = np.indices(block.shape).reshape(3, -1)
    return lo + (grid * weight.reshape(-1)).sum(axis=1) / weight.sum()
