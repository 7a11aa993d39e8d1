"""Helpers shared by several test modules (one owner, instead of importing across test files)."""

from __future__ import annotations

import numpy as np

from CMBDetectorLib.image import Volume

# (centre voxel, radius mm, intensity) of dark spheres in small_swi_crop: from clearly lesion-like to
# faint, so that a detection run scores some of them above and some below the operating point.
SMALL_CROP_BLOBS = (((30, 30, 20), 2.0, 200.0), ((60, 50, 15), 2.0, 200.0), ((40, 70, 25), 1.5, 400.0),
                    ((70, 25, 10), 1.2, 650.0), ((20, 60, 30), 1.0, 800.0), ((75, 75, 28), 1.0, 900.0))


def small_swi_crop(seed: int = 0) -> Volume:
    """A 96 x 96 x 40 partial-brain crop (0.5 x 0.5 x 1 mm): bright noisy tissue with dark spheres.

    Small enough for `cmbdetector detect --crop` to finish in seconds on a CPU.
    """
    rng = np.random.default_rng(seed)
    shape = (96, 96, 40)
    spacing = np.array([0.5, 0.5, 1.0])
    array = 1000.0 + 30.0 * rng.standard_normal(shape)
    i, j, k = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    for centre, radius_mm, intensity in SMALL_CROP_BLOBS:
        distance = np.sqrt(sum(((axis - c) * s) ** 2 for axis, c, s in zip((i, j, k), centre, spacing)))
        array[distance < radius_mm] = intensity
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-24.0, -24.0, -20.0]
    return Volume(array.astype(np.float32), affine, {"source": "small_swi_crop"})
