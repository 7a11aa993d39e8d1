"""Microbleed location classes in MNI space: the shipped region map and the MNI152 2009 template.

Frames: every coordinate here is MNI152 2009 millimetres in RAS (x left->right, y posterior->anterior,
z inferior->superior), the frame of the nilearn templates and of the shipped map.

The region map (`data/mni152_2009_cmb_regions_1mm.nii.gz`, rebuilt by `tools/build_region_atlas.py`
from AAL + JHU labels in Debian's mricron-data) holds one class code per 1 mm voxel, see REGION_CODES.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import CMBError
from .image import Volume

DATA_DIR = Path(__file__).resolve().parent / "data"
REGION_ATLAS_PATH = DATA_DIR / "mni152_2009_cmb_regions_1mm.nii.gz"
TEMPLATE_NAMES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}

# code -> (region, lobe). region: lobar/deep/infratentorial (MARS classes) or csf/outside.
REGION_CODES = {
    0: ("outside", ""),
    1: ("csf", ""),            # ventricles, sulcal and cisternal CSF inside the brain hull
    10: ("lobar", "frontal"),  # lobar = cortex + juxtacortical white matter (<= 3 mm from cortex)
    11: ("lobar", "parietal"),
    12: ("lobar", "temporal"),
    13: ("lobar", "occipital"),
    14: ("lobar", "insula"),
    20: ("deep", ""),          # basal ganglia: caudate, putamen, pallidum
    21: ("deep", ""),          # thalamus
    22: ("deep", ""),          # internal / external capsule
    23: ("deep", ""),          # corpus callosum
    24: ("deep", ""),          # deep / periventricular white matter
    30: ("infratentorial", ""),  # brainstem
    31: ("infratentorial", ""),  # cerebellum
}
CODE_NAMES = {
    0: "outside brain", 1: "CSF / ventricles", 10: "frontal", 11: "parietal", 12: "temporal",
    13: "occipital", 14: "insula", 20: "basal ganglia", 21: "thalamus", 22: "internal/external capsule",
    23: "corpus callosum", 24: "deep/periventricular white matter", 30: "brainstem", 31: "cerebellum",
}
BRAIN_CODE_MIN = 10  # codes >= 10 are brain tissue
DEFAULT_SNAP_MM = 3.0


def region_of_code(code: int) -> tuple:
    """(region, lobe) for a class code; unknown codes give ("unknown", "")."""
    return REGION_CODES.get(int(code), ("unknown", ""))


def _load_nifti(path: Path, dtype) -> Volume:
    import nibabel as nib

    if not path.exists():
        raise CMBError(f"atlas file missing: {path}")
    image = nib.load(str(path))
    array = np.asarray(image.dataobj).astype(dtype, copy=False)
    return Volume(array, image.affine.astype(np.float64), {"source": str(path), "space": "MNI152NLin2009aSym"})


@lru_cache(maxsize=1)
def load_region_atlas() -> Volume:
    """The shipped class map: array uint8 (197, 233, 189) of REGION_CODES keys, affine voxel -> MNI RAS mm.

    Cached and shared: do not modify the returned array.
    """
    return _load_nifti(REGION_ATLAS_PATH, np.uint8)


def nilearn_template_path(kind: str) -> Path:
    """Path of an MNI152 2009 template shipped inside the nilearn wheel (kind: t1, gm or wm)."""
    try:
        import nilearn
    except ImportError as error:  # the templates come with nilearn; nothing is downloaded
        raise CMBError("nilearn is not installed: the MNI152 template ships inside it") from error
    return Path(nilearn.__file__).resolve().parent / "datasets" / "data" / TEMPLATE_NAMES[kind]


@lru_cache(maxsize=1)
def load_mni_template() -> Volume:
    """MNI152 2009 T1 (skull-stripped): array float32 (197, 233, 189) in [0, 255], affine voxel -> MNI RAS mm.

    Cached and shared: do not modify the returned array.
    """
    return _load_nifti(nilearn_template_path("t1"), np.float32)


@lru_cache(maxsize=1)
def load_mni_brain_mask() -> Volume:
    """Brain mask of the template: array uint8 (197, 233, 189), 1 where GM + WM probability >= 0.5."""
    grey = _load_nifti(nilearn_template_path("gm"), np.float32)
    white = _load_nifti(nilearn_template_path("wm"), np.float32)
    mask = ((grey.array + white.array) >= 0.5 * 255).astype(np.uint8)
    return grey.with_array(mask, kind="brain mask")


@lru_cache(maxsize=1)
def load_mni_brain_hull() -> Volume:
    """The template brain inside its pial hull (tissue plus sulcal and ventricular CSF): array uint8
    (197, 233, 189), 1 where the skull-stripped T1 is above 2 % of its range, closed and hole-filled.

    The one definition of "brain" shared by brain extraction (its anatomical prior) and the simulator
    (its heads and their true masks). Cached and shared: do not modify the returned array.
    """
    from scipy import ndimage

    t1 = load_mni_template()
    hull = ndimage.binary_fill_holes(ndimage.binary_closing(t1.array > 0.02 * 255, iterations=2))
    return t1.with_array(hull.astype(np.uint8), kind="brain hull")


def codes_at_mni(points_mni, snap_mm: float = DEFAULT_SNAP_MM) -> np.ndarray:
    """Class codes (N,) int at (N, 3) MNI RAS mm points.

    A point whose voxel is not brain (outside or CSF) takes the code of the nearest brain voxel within
    `snap_mm`, so lesions a registration error away from the cortex keep their lobe; otherwise it keeps
    its own code (0 outside / 1 CSF). Points off the grid are 0.
    """
    atlas = load_region_atlas()
    points = np.atleast_2d(np.asarray(points_mni, dtype=float))
    if points.size == 0:
        return np.zeros(0, dtype=int)
    ijk = np.rint(atlas.ras_to_ijk(points)).astype(int)
    shape = np.array(atlas.shape)
    codes = np.zeros(len(points), dtype=int)
    on_grid = np.all((ijk >= 0) & (ijk < shape), axis=1)
    codes[on_grid] = atlas.array[tuple(ijk[on_grid].T)]
    if snap_mm > 0:
        for index in np.flatnonzero(codes < BRAIN_CODE_MIN):
            snapped = _nearest_brain_code(atlas, points[index], snap_mm)
            if snapped is not None:
                codes[index] = snapped
    return codes


def _nearest_brain_code(atlas: Volume, point_mni: np.ndarray, radius_mm: float):
    """Code of the brain voxel nearest to the point within radius_mm, or None."""
    centre = atlas.ras_to_ijk(point_mni)[0]
    reach = np.ceil(radius_mm / atlas.spacing).astype(int) + 1
    low = np.maximum(np.floor(centre).astype(int) - reach, 0)
    high = np.minimum(np.ceil(centre).astype(int) + reach + 1, np.array(atlas.shape))
    if np.any(high <= low):
        return None
    block = atlas.array[low[0]:high[0], low[1]:high[1], low[2]:high[2]]
    brain_ijk = np.argwhere(block >= BRAIN_CODE_MIN) + low
    if len(brain_ijk) == 0:
        return None
    distances = np.linalg.norm((brain_ijk - centre) * atlas.spacing, axis=1)
    nearest = int(np.argmin(distances))
    if distances[nearest] > radius_mm:
        return None
    return int(atlas.array[tuple(brain_ijk[nearest])])


def classify_mni(points_mni, snap_mm: float = DEFAULT_SNAP_MM) -> list:
    """(N, 3) MNI RAS mm points -> list of N (region, lobe) tuples (see REGION_CODES, codes_at_mni)."""
    return [region_of_code(code) for code in codes_at_mni(points_mni, snap_mm)]
