"""The in-memory image every stage shares: a voxel array plus its voxel-to-RAS affine."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import permutations

import numpy as np

ANISOTROPY = 1.25  # thickest voxel side over the median one above which the thick axis is the slice axis


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

    def closest_ras_axes(self) -> tuple:
        """For each voxel axis, the RAS axis (0 R, 1 A, 2 S) it runs nearest to, and +1/-1 for its direction.

        A one-to-one assignment (the permutation with the largest summed |cosine|), so an oblique affine
        still maps to the nearest canonical orientation, as Slicer's and nibabel's 'closest canonical'."""
        direction = self.affine[:3, :3] / self.spacing
        best = max(permutations(range(3)), key=lambda p: sum(abs(direction[p[a], a]) for a in range(3)))
        signs = tuple(1 if direction[best[a], a] >= 0 else -1 for a in range(3))
        return best, signs

    @property
    def slice_axis(self) -> int:
        """The voxel axis across the acquired slices: the thickest one when the voxels are anisotropic
        (2D GRE, SWI slabs), else the one nearest the S axis (an axial reading of a 3D acquisition).
        Code that works slice by slice uses it, so the result does not depend on the order of the array axes."""
        spacing = self.spacing
        thickest = int(np.argmax(spacing))
        if spacing[thickest] > ANISOTROPY * float(np.median(spacing)):
            return thickest
        return self.closest_ras_axes()[0].index(2)

    def in_plane_axes(self) -> tuple:
        """The two voxel axes of the acquisition plane, ordered as their nearest RAS axes (R or A first)."""
        ras_axes = self.closest_ras_axes()[0]
        return tuple(sorted((a for a in range(3) if a != self.slice_axis), key=lambda a: ras_axes[a]))

    def with_array(self, array: np.ndarray, **meta) -> "Volume":
        """A new volume on the same grid holding another array."""
        return Volume(array, self.affine.copy(), {**self.meta, **meta})
