"""The in-memory image every stage shares: a voxel array plus its voxel-to-RAS affine."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Volume:
    """A 3D scalar image.

    array: float32, shape (I, J, K), indexed in voxel order (i fastest in the file).
    affine: (4, 4) float64 mapping homogeneous voxel indices (i, j, k, 1) to RAS millimetres.
    meta: free-form notes about where the image came from (file, echo choice, ...).
    """

    array: np.ndarray
    affine: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along i, j, k."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    @property
    def shape(self) -> tuple:
        return self.array.shape

    def ijk_to_ras(self, ijk) -> np.ndarray:
        """(N, 3) voxel indices (fractional allowed) to (N, 3) RAS mm."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=float))
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def ras_to_ijk(self, ras) -> np.ndarray:
        """(N, 3) RAS mm to (N, 3) fractional voxel indices."""
        ras = np.atleast_2d(np.asarray(ras, dtype=float))
        inverse = np.linalg.inv(self.affine)
        return ras @ inverse[:3, :3].T + inverse[:3, 3]

    def with_array(self, array: np.ndarray, **meta) -> "Volume":
        """A new volume on the same grid holding another array."""
        return Volume(array, self.affine.copy(), {**self.meta, **meta})
