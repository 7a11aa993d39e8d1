"""Anatomy for the simulator: MNI152 2009 templates from the nilearn wheel and a head built around them.

Everything here lives in template (MNI) space, 1 mm, and is computed once per process.
The templates are read from the files shipped inside the installed nilearn package (atlas.py finds
them): no download.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..atlas import load_mni_brain_hull, nilearn_template_path
from ..errors import CMBError
from ..image import Volume

# Head labels (uint8) in template space. Values >= NUCLEUS_BASE are iron-rich nuclei (see NUCLEI).
AIR, SCALP, SKULL, EXTRA_CSF, BRAIN, SINUS_AIR = 0, 1, 2, 3, 4, 5
NUCLEUS_BASE = 10


@dataclass(frozen=True)
class Ellipsoid:
    name: str
    centre_mni: tuple
    radii_mm: tuple


# Iron-rich deep nuclei, bilateral (x mirrored); approximate MNI centres and half-axes.
# chi (ppm) and extra R2* (1/s at 3 T) follow the QSM / R2* literature (see docs/simulator.md).
NUCLEI = (
    (Ellipsoid("globus pallidus", (19, -3, -1), (4, 8, 4)), 0.12, 25.0),
    (Ellipsoid("putamen", (26, 2, 2), (5, 13, 8)), 0.04, 10.0),
    (Ellipsoid("caudate", (13, 13, 9), (4, 8, 7)), 0.04, 8.0),
    (Ellipsoid("substantia nigra", (11, -18, -12), (3, 7, 2.5)), 0.12, 25.0),
    (Ellipsoid("red nucleus", (5, -20, -9), (3, 3.5, 3)), 0.10, 22.0),
    (Ellipsoid("dentate nucleus", (15, -57, -35), (6, 8, 5)), 0.10, 20.0),
)

# Air spaces that drive the air-bone susceptibility artefacts (frontal lobe base, temporal lobes).
SINUSES = (
    Ellipsoid("frontal sinus", (0, 70, 8), (13, 6, 10)),
    Ellipsoid("ethmoid cells", (0, 48, -28), (10, 15, 9)),
    Ellipsoid("sphenoid sinus", (0, 16, -40), (11, 10, 8)),
    Ellipsoid("left mastoid", (-55, -30, -45), (7, 9, 7)),
    Ellipsoid("right mastoid", (55, -30, -45), (7, 9, 7)),
)


@functools.lru_cache(maxsize=None)
def load_template(name: str) -> Volume:
    """One MNI152 2009 template (t1, gm or wm) as a Volume scaled to [0, 1]."""
    import nibabel as nib

    path = nilearn_template_path(name)
    if not path.is_file():
        raise CMBError(f"MNI152 template not found in the nilearn package: {path}")
    image = nib.load(str(path))
    return Volume(np.asarray(image.dataobj, dtype=np.float32) / 255.0, image.affine.astype(float),
                  {"source": str(path)})


def mirrored(ellipsoid: Ellipsoid) -> tuple:
    """The left and right copies of a bilateral structure (one copy if it sits on the midline)."""
    x, y, z = ellipsoid.centre_mni
    if x == 0:
        return (ellipsoid,)
    return (Ellipsoid(f"right {ellipsoid.name}", (abs(x), y, z), ellipsoid.radii_mm),
            Ellipsoid(f"left {ellipsoid.name}", (-abs(x), y, z), ellipsoid.radii_mm))


def ellipsoid_mask(ellipsoid: Ellipsoid, points_mm: np.ndarray) -> np.ndarray:
    """Boolean mask of points (..., 3) inside the ellipsoid."""
    offset = (points_mm - np.asarray(ellipsoid.centre_mni)) / np.asarray(ellipsoid.radii_mm)
    return np.sum(offset ** 2, axis=-1) <= 1.0


@dataclass
class HeadModel:
    """Template-space maps, all (197, 233, 189) on the MNI152 1 mm grid.

    gm, wm, csf: float32 tissue fractions in [0, 1]; labels: uint8 head labels (module constants);
    brain: bool brain mask (parenchyma and CSF inside the pial surface); affine: voxel -> MNI mm.
    """

    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    labels: np.ndarray
    brain: np.ndarray
    affine: np.ndarray

    def points_mm(self, ijk: np.ndarray) -> np.ndarray:
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def to_ijk(self, points_mm: np.ndarray) -> np.ndarray:
        inverse = np.linalg.inv(self.affine)
        return np.asarray(points_mm) @ inverse[:3, :3].T + inverse[:3, 3]


@functools.lru_cache(maxsize=1)
def head_model() -> HeadModel:
    """Brain tissue from the templates, then extra-cerebral CSF, skull and scalp as shells around it."""
    t1, gm, wm = (load_template(name) for name in ("t1", "gm", "wm"))
    brain = load_mni_brain_hull().array > 0
    tissue = np.clip(gm.array + wm.array, 0.0, 1.0)
    scale = np.where(tissue > 1e-6, np.minimum(1.0, 1.0 / np.maximum(gm.array + wm.array, 1e-6)), 1.0)
    gm_fraction = np.where(brain, gm.array * scale, 0.0).astype(np.float32)
    wm_fraction = np.where(brain, wm.array * scale, 0.0).astype(np.float32)
    csf_fraction = np.where(brain, 1.0 - gm_fraction - wm_fraction, 0.0).astype(np.float32)

    distance_outside = ndimage.distance_transform_edt(~brain)
    labels = np.full(brain.shape, AIR, np.uint8)
    labels[distance_outside <= 14] = SCALP
    labels[distance_outside <= 8] = SKULL
    labels[distance_outside <= 2] = EXTRA_CSF
    labels[brain] = BRAIN

    ijk = np.indices(brain.shape, dtype=np.float32).reshape(3, -1).T
    points = (ijk @ t1.affine[:3, :3].T.astype(np.float32) + t1.affine[:3, 3].astype(np.float32)).reshape(
        *brain.shape, 3)
    for sinus in SINUSES:
        box = _box_of(sinus, t1.affine, brain.shape)
        labels[box][ellipsoid_mask(sinus, points[box]) & (labels[box] != BRAIN)] = SINUS_AIR
    for index, (nucleus, _, _) in enumerate(NUCLEI):
        for copy in mirrored(nucleus):
            box = _box_of(copy, t1.affine, brain.shape)
            labels[box][ellipsoid_mask(copy, points[box]) & (labels[box] == BRAIN)] = NUCLEUS_BASE + index
    return HeadModel(gm_fraction, wm_fraction, csf_fraction, labels, brain, t1.affine.copy())


def _box_of(ellipsoid: Ellipsoid, affine: np.ndarray, shape) -> tuple:
    """Slices of the voxel grid that hold the ellipsoid (its millimetre bounding box, a voxel to spare): the
    masks are drawn inside it only, a few per cent of the grid."""
    centre, radii = np.asarray(ellipsoid.centre_mni, float), np.asarray(ellipsoid.radii_mm, float)
    corners = centre + radii * (np.indices((2, 2, 2)).reshape(3, -1).T * 2 - 1)
    inverse = np.linalg.inv(affine)
    ijk = corners @ inverse[:3, :3].T + inverse[:3, 3]
    low = np.clip(np.floor(ijk.min(axis=0)).astype(int) - 1, 0, shape)
    high = np.clip(np.ceil(ijk.max(axis=0)).astype(int) + 2, 0, shape)
    return tuple(slice(lo, hi) for lo, hi in zip(low, high))
