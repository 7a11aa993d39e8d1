"""Is this a T2*-weighted head scan? Warnings (never refusals) for images the detector was not made for.

- T1-like contrast: the scan's median intensity in the lateral ventricles (CSF) against deep white matter,
  both sampled through the registration to MNI152 (the one brain extraction made). In T2*-weighted
  GRE/SWI and in proton-density-like short-TE GRE, CSF is brighter than white matter or close to it; in a
  T1-weighted image it is much darker. Measured by tools/check_image_types.py (numbers in
  docs/reliability.md).
- Not a head: the intensity mask is one convex blob with a flat interior (no tissue, CSF or vessel
  structure), as a phantom is. Measured on the image alone: a registration to MNI can land a sphere at a
  plausible scale, and whether it passes its metric check is a coin toss (-0.119 against -0.12 once).

Both are warnings: a false warning costs a reader a second look, a false refusal costs a scan.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

from . import atlas, brain
from .image import Volume

# CSF/WM median ratio below which the contrast is called T1-like (tools/check_image_types.py, quoted in
# docs/reliability.md): simulated GRE/SWI 0.93-2.35 (164 scans), the real short-TE Philips GRE 0.78-0.98;
# the MNI152 T1 0.34 (0.37 at 3 mm), inverted simulated scans 0.05-0.21. 0.55 sits between 0.37 and 0.78.
T1_RATIO = 0.55
CORE_MM = 2.0        # sample only voxels this far inside their structure (registration error, partial volume)
VENTRICLE_DEPTH_MM = 12.0  # CSF this deep inside the brain hull is ventricular, not sulcal
MIN_SAMPLES = 50     # fewer sampled voxels in the scan's field of view: no contrast verdict
# A phantom: its mask fills its convex hull, and its interior intensity is flat.
BLOB_SOLIDITY = 0.9       # mask volume / convex hull volume above this is "convex-ish"
FLAT_INTERIOR_SPREAD = 0.12  # (95th - 5th pct) / median inside the eroded mask: phantoms 0.02-0.07, heads >= 0.24


@dataclass
class ImageTypeCheck:
    """What the checks measured (None where not measured) and the warnings they give."""

    csf_wm_ratio: float | None = None
    solidity: float | None = None
    interior_spread: float | None = None
    warnings: tuple = ()


def _core(mask: np.ndarray, spacing, mm: float = CORE_MM) -> np.ndarray:
    return brain.erode_mm(mask, spacing, mm)


@lru_cache(maxsize=1)
def mni_contrast_masks() -> tuple:
    """(ventricles, white matter): bool arrays on the region atlas's MNI grid (cached; do not modify).

    Ventricles: atlas CSF (code 1) deeper than VENTRICLE_DEPTH_MM inside the brain hull; white matter: the
    deep/periventricular white matter class (code 24). Both cut to their core (CORE_MM)."""
    regions = atlas.load_region_atlas()
    spacing = regions.spacing
    inside = regions.array > 0
    depth = ndimage.distance_transform_edt(inside, sampling=spacing)
    ventricles = _core((regions.array == 1) & (depth > VENTRICLE_DEPTH_MM), spacing)
    white = _core(regions.array == 24, spacing)
    return ventricles, white


def _median_in_scan(volume: Volume, registration, mni_mask: np.ndarray) -> tuple:
    """Median scan intensity at the MNI mask's voxels (every 2nd per axis) carried into the scan; and how
    many landed inside the scan's field of view."""
    regions = atlas.load_region_atlas()
    ijk = np.argwhere(mni_mask[::2, ::2, ::2]) * 2
    scan_ijk = volume.ras_to_ijk(registration.to_scan(regions.ijk_to_ras(ijk)))
    inside = np.all((scan_ijk >= 0) & (scan_ijk <= np.array(volume.shape) - 1), axis=1)
    if inside.sum() < MIN_SAMPLES:
        return float("nan"), int(inside.sum())
    # on the array as it is (no float copy of a large volume); float output keeps interpolated integers
    values = ndimage.map_coordinates(volume.array, scan_ijk[inside].T, order=1, output=np.float64)
    return float(np.median(values)), int(inside.sum())


def csf_wm_ratio(volume: Volume, registration) -> float | None:
    """Median ventricular CSF / median white matter intensity; None without a usable registration."""
    if registration is None or not registration.plausible_geometry:
        return None
    ventricles, white = mni_contrast_masks()
    csf, _ = _median_in_scan(volume, registration, ventricles)
    wm, _ = _median_in_scan(volume, registration, white)
    if not (np.isfinite(csf) and np.isfinite(wm)) or wm <= 0:
        return None
    return csf / wm


def blob_measures(volume: Volume) -> tuple:
    """(solidity, interior spread) of the image's intensity mask, on its ~2 mm grid (see BLOB_SOLIDITY)."""
    from scipy.spatial import ConvexHull, QhullError

    from .grids import block_mean

    coarse, factors, spacing = brain.coarse_intensity_mask(volume)
    if coarse.sum() < 10:
        return float("nan"), float("nan")
    surface = np.argwhere(coarse & ~ndimage.binary_erosion(coarse)) * spacing
    try:
        hull_volume = ConvexHull(surface).volume
    except QhullError:
        return float("nan"), float("nan")
    solidity = float(coarse.sum() * np.prod(spacing) / hull_volume) if hull_volume > 0 else float("nan")
    image = block_mean(np.asarray(volume.array, dtype=np.float32), factors)
    interior = _core(coarse, spacing, 5.0)
    values = image[interior] if interior.sum() >= 10 else image[coarse]
    median = float(np.median(values))
    spread = float((np.percentile(values, 95) - np.percentile(values, 5)) / median) if median > 0 else float("nan")
    return solidity, spread


def check_image_type(volume: Volume, registration, blob: tuple | None = None) -> ImageTypeCheck:
    """The checks above for a whole-head scan, with the registration brain extraction made (or None).

    The not-a-head check uses the image's own intensity mask, whatever mask brain extraction settled on.
    blob: `blob_measures(volume)` when already computed (prepare runs it while the scan registers)."""
    result = ImageTypeCheck()
    warnings = []
    result.solidity, result.interior_spread = blob if blob is not None else blob_measures(volume)
    if result.solidity > BLOB_SOLIDITY and result.interior_spread < FLAT_INTERIOR_SPREAD:
        warnings.append(f"does not look like a head scan (the image is one convex blob (solidity "
                        f"{result.solidity:.2f}) with a flat interior (spread {result.interior_spread:.2f})): "
                        "CMBDetector expects a T2*-weighted GRE/SWI magnitude of a head")
    result.csf_wm_ratio = csf_wm_ratio(volume, registration)
    if result.csf_wm_ratio is not None and result.csf_wm_ratio < T1_RATIO:
        warnings.append(f"T1-like contrast (CSF darker than white matter, ratio {result.csf_wm_ratio:.2f}): "
                        "CMBDetector expects a T2*-weighted GRE/SWI magnitude")
    result.warnings = tuple(warnings)
    return result
