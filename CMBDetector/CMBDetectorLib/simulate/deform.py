"""A per-scan random head pose and smooth elastic deformation between scanner and template space.

The mapping is defined backwards, as resampling needs it: for a scanner point p (RAS mm),
template point = A p + u(p), with A a random affine (pose and size) and u a smooth displacement field
sampled on the scanner working grid. Points (lesion centres, vein polylines) go forwards by inverting
that relation with a few fixed-point steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..grids import spline_zoom


def random_affine(rng: np.random.Generator, max_rotation_deg=(12.0, 5.0, 6.0), scale_range=(0.92, 1.08),
                  max_shift_mm: float = 6.0) -> np.ndarray:
    """4x4 scanner->template affine: rotation about x (pitch), y (roll), z (yaw), per-axis scale, shift."""
    angles = np.deg2rad([rng.uniform(-m, m) for m in max_rotation_deg])
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    matrix = np.eye(4)
    matrix[:3, :3] = rz @ ry @ rx @ np.diag(rng.uniform(*scale_range, size=3))
    matrix[:3, 3] = rng.uniform(-max_shift_mm, max_shift_mm, size=3)
    return matrix


@dataclass
class Deformation:
    """scanner -> template mapping on a scanner working grid.

    affine: (4, 4) scanner -> template; grid_affine: working-grid voxel -> scanner RAS;
    displacement: float32 (3, I, J, K) in mm, template-space offsets added after the affine.
    """

    affine: np.ndarray
    grid_affine: np.ndarray
    displacement: np.ndarray

    @property
    def grid_shape(self) -> tuple:
        return self.displacement.shape[1:]

    def grid_points_to_template(self) -> np.ndarray:
        """Template coordinates (3, I, J, K) float32 of every working-grid voxel centre."""
        ijk = np.indices(self.grid_shape, dtype=np.float32)
        matrix = (self.affine @ self.grid_affine).astype(np.float32)
        points = np.einsum("ij,j...->i...", matrix[:3, :3], ijk) + matrix[:3, 3, None, None, None]
        return points + self.displacement

    def _displacement_at(self, scanner_points: np.ndarray) -> np.ndarray:
        inverse = np.linalg.inv(self.grid_affine)
        ijk = scanner_points @ inverse[:3, :3].T + inverse[:3, 3]
        return np.stack([ndimage.map_coordinates(component, ijk.T, order=1, mode="nearest")
                         for component in self.displacement], axis=-1)

    def to_template(self, scanner_points) -> np.ndarray:
        points = np.atleast_2d(np.asarray(scanner_points, dtype=float))
        return points @ self.affine[:3, :3].T + self.affine[:3, 3] + self._displacement_at(points)

    def to_scanner(self, template_points, iterations: int = 6) -> np.ndarray:
        """Invert template = A p + u(p) for points (N, 3) by fixed-point iteration."""
        template_points = np.atleast_2d(np.asarray(template_points, dtype=float))
        inverse = np.linalg.inv(self.affine)
        points = template_points @ inverse[:3, :3].T + inverse[:3, 3]
        for _ in range(iterations):
            corrected = template_points - self._displacement_at(points)
            points = corrected @ inverse[:3, :3].T + inverse[:3, 3]
        return points


def random_deformation(rng: np.random.Generator, template_bounds_mm: np.ndarray, spacing_mm: float = 1.0,
                       elastic_mm: float = 2.0, control_spacing_mm: float = 30.0,
                       margin_mm: float = 4.0, scale_range=(0.92, 1.08)) -> Deformation:
    """A random pose and elastic field, with a working grid that holds the whole template box.

    template_bounds_mm: (2, 3) min and max corner of the template region to keep (the head).
    """
    affine = random_affine(rng, scale_range=scale_range)
    lo, hi = template_bounds_mm
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    inverse = np.linalg.inv(affine)
    scanner_corners = corners @ inverse[:3, :3].T + inverse[:3, 3]
    origin = np.floor(scanner_corners.min(axis=0) - margin_mm)
    extent = np.ceil(scanner_corners.max(axis=0) + margin_mm) - origin
    shape = tuple(int(n) for n in np.ceil(extent / spacing_mm) + 1)
    grid_affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    grid_affine[:3, 3] = origin
    control_shape = [max(3, int(round(n * spacing_mm / control_spacing_mm)) + 1) for n in shape]
    control = rng.normal(0.0, elastic_mm, size=[3, *control_shape]).astype(np.float32)
    displacement = np.stack([spline_zoom(c, shape) for c in control])
    return Deformation(affine, grid_affine, displacement)
