"""The structures a detector must tell apart: microbleeds and their mimics.

Veins, calcifications and microbleeds are generated in template (MNI) space, where anatomy is known,
and carried into the scanner frame by the scan's deformation. Veins are rasterised as partial-volume
tubes onto the 1 mm working grid (their field is computed with the rest of the head by FFT);
microbleeds and calcifications are spheres whose analytic dipole field is evaluated on a fine grid
inside each acquired voxel, so their blooming follows B0, TE and voxel size (see physics.sphere_field).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from . import anatomy
from .domain import Variation
from .physics import phase_per_ppm, sphere_field


@dataclass
class Vein:
    points: np.ndarray  # (N, 3) mm, template space until moved to the scanner frame
    radius_mm: float
    chi_ppm: float
    kind: str


@dataclass
class Sphere:
    """A microbleed or a calcification. centre in mm (template or scanner frame, as stated by use)."""

    kind: str  # "microbleed" or "calcification"
    centre: np.ndarray
    diameter_mm: float
    chi_ppm: float
    core_signal: float  # signal left inside the sphere, relative to the tissue it replaces
    region: str = ""
    lobe: str = ""
    site: str = ""
    apparent_diameter_mm: float = float("nan")
    extra: dict = field(default_factory=dict)
    # A soft microbleed (soft_depth > 0): its magnitude is a smooth dip, 1 - depth exp(-(r/s)^p / 2), half as
    # dark at the sphere's radius, instead of a black core with a sharp edge; the dipole phase is kept. Another
    # simulator may well draw lesions like this, and models trained on black cores alone miss them
    # (docs/lesion-probe.md).
    soft_depth: float = 0.0
    soft_power: float = 2.0
    # Sized as a reader sizes a faint dot: at half its own acquired contrast, and kept down to MIN_CONTRAST
    # (soft spheres always are). Else at 50 % darkness, which drops the faint partial-volumed lesions of thick
    # slices: about half of those drawn at 1.5 T with 5 mm slices, most of them plainly visible grey dots.
    half_contrast_size: bool = False


# Deep veins and sinuses as template-space polylines (right side; mirrored), with radius in mm.
DEEP_VEINS = (
    ("internal cerebral vein", ((3, 5, 14), (3, -15, 14), (2, -35, 8), (0.5, -48, 4)), 1.0),
    ("basal vein of Rosenthal", ((22, 2, -12), (20, -20, -6), (10, -38, 0), (1, -48, 4)), 1.0),
    ("thalamostriate vein", ((15, -8, 18), (9, 0, 16), (4, 4, 14)), 0.7),
    ("transverse sinus", ((1, -102, -6), (30, -99, -16), (50, -80, -28), (55, -60, -38)), 2.5),
)
STRAIGHT_SINUS = ((0, -48, 4), (0, -70, 2), (0, -95, -4))
VENOUS_CHI_PPM = 0.45
CALCIFICATION_SITES = (
    ("globus pallidus", (19, -3, -1), 0.45),
    ("choroid plexus", (27, -42, 14), 0.35),
    ("pineal gland", (0, -32, 3), 0.25),
)


def _polyline(points, rng, jitter_mm=1.0) -> np.ndarray:
    points = np.asarray(points, dtype=float)
    return points + rng.normal(0, jitter_mm, points.shape)


def _mirror(points: np.ndarray) -> np.ndarray:
    flipped = points.copy()
    flipped[:, 0] *= -1
    return flipped


def _surface_band(head: anatomy.HeadModel) -> np.ndarray:
    return head.brain & ~ndimage.binary_erosion(head.brain, iterations=4)


def _inside(mask: np.ndarray, head: anatomy.HeadModel, point) -> bool:
    i, j, k = np.round(head.to_ijk(point)).astype(int)
    shape = mask.shape
    return 0 <= i < shape[0] and 0 <= j < shape[1] and 0 <= k < shape[2] and bool(mask[i, j, k])


def _random_voxel_points(mask: np.ndarray, head: anatomy.HeadModel, rng, count: int) -> np.ndarray:
    candidates = np.argwhere(mask)
    chosen = candidates[rng.choice(len(candidates), size=count, replace=len(candidates) < count)]
    return head.points_mm(chosen + rng.uniform(-0.5, 0.5, chosen.shape))


def _walk(start, direction, rng, mask, head, step_mm, max_steps, turn=0.35) -> np.ndarray:
    """A smooth random walk that stays inside `mask`."""
    points = [np.asarray(start, float)]
    direction = np.asarray(direction, float) / np.linalg.norm(direction)
    for _ in range(max_steps):
        for _attempt in range(6):
            trial = direction + rng.normal(0, turn, 3)
            trial /= np.linalg.norm(trial)
            candidate = points[-1] + step_mm * trial
            if _inside(mask, head, candidate):
                points.append(candidate)
                direction = trial
                break
        else:
            break
    return np.array(points)


def vein_network(rng: np.random.Generator, head: anatomy.HeadModel, n_medullary: int, n_cortical: int,
                 variation: Variation = Variation()) -> list:
    """Sinuses, deep veins, medullary veins (radial from the ventricles) and cortical veins, template mm.
    variation: radii, susceptibility scale and tortuosity of the small veins (domain.py)."""
    veins = []
    for name, points, radius in DEEP_VEINS:
        right = _polyline(points, rng)
        veins += [Vein(right, radius, VENOUS_CHI_PPM * rng.uniform(0.85, 1.25), name),
                  Vein(_mirror(right), radius, VENOUS_CHI_PPM * rng.uniform(0.85, 1.25), name)]
    veins.append(Vein(_polyline(STRAIGHT_SINUS, rng), 2.0, VENOUS_CHI_PPM, "straight sinus"))
    veins.append(Vein(_superior_sagittal_sinus(head, rng), 3.0, VENOUS_CHI_PPM, "superior sagittal sinus"))

    ijk_x = np.arange(head.brain.shape[0]) * head.affine[0, 0] + head.affine[0, 3]
    ventricle = (head.csf > 0.7) & head.brain & (np.abs(ijk_x)[:, None, None] > 3)
    ventricle &= _box_mask(head, x=(-25, 25), y=(-35, 25), z=(5, 30))
    white = head.brain & (head.wm > 0.5)
    for start in _random_voxel_points(ventricle, head, rng, n_medullary):
        direction = np.array([np.sign(start[0]), rng.uniform(-0.4, 0.4), rng.uniform(0.0, 1.2)])
        path = _walk(start, direction, rng, white | ventricle, head, 1.5, int(rng.integers(10, 26)),
                     turn=0.15 * variation.vein_turn)
        if len(path) > 4:
            veins.append(Vein(path, rng.uniform(*variation.medullary_radius_mm),
                              VENOUS_CHI_PPM * rng.uniform(0.9, 1.3) * variation.vein_chi_scale, "medullary vein"))

    band = _surface_band(head)
    for start in _random_voxel_points(band & (head.gm > 0.4), head, rng, n_cortical):
        path = _walk(start, rng.normal(size=3), rng, band, head, 2.0, int(rng.integers(8, 22)),
                     turn=0.35 * variation.vein_turn)
        if len(path) > 3:
            veins.append(Vein(path, rng.uniform(*variation.cortical_radius_mm),
                              VENOUS_CHI_PPM * rng.uniform(0.85, 1.3) * variation.vein_chi_scale, "cortical vein"))
    return veins


def _box_mask(head, x, y, z) -> np.ndarray:
    axes = [np.arange(n) * head.affine[d, d] + head.affine[d, 3] for d, n in enumerate(head.brain.shape)]
    inside = [(a >= lo) & (a <= hi) for a, (lo, hi) in zip(axes, (x, y, z))]
    return inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]


def _superior_sagittal_sinus(head: anatomy.HeadModel, rng) -> np.ndarray:
    midline = int(round(head.to_ijk([[0, 0, 0]])[0, 0]))
    column_tops = []
    for y_mm in np.linspace(62, -98, 17):
        j = int(round(head.to_ijk([[0, y_mm, 0]])[0, 1]))
        k_inside = np.nonzero(head.brain[midline - 2: midline + 3, j].any(axis=0))[0]
        if len(k_inside):
            column_tops.append(head.points_mm(np.array([[midline, j, k_inside.max()]]))[0] + [0, 0, 4.0])
    return _polyline(column_tops, rng, 0.5)


def rasterise_veins(veins: list, grid_affine: np.ndarray, shape) -> tuple:
    """(venous blood fraction, venous chi in ppm), float32 arrays of `shape` on an axis-aligned grid.

    Thick veins: clipped distance (r + 0.5 - d). Veins thinner than a voxel: a Gaussian profile that
    keeps the cross-section area, so a 0.3 mm vein adds the right amount of susceptibility.
    """
    fraction = np.zeros(shape, np.float32)
    chi = np.zeros(shape, np.float32)
    spacing = np.diag(grid_affine)[:3]
    inverse = np.linalg.inv(grid_affine)
    for vein in veins:
        reach = vein.radius_mm + 1.5
        for p0, p1 in zip(vein.points[:-1], vein.points[1:]):
            lo = np.floor((np.minimum(p0, p1) - reach) @ inverse[:3, :3].T + inverse[:3, 3]).astype(int)
            hi = np.ceil((np.maximum(p0, p1) + reach) @ inverse[:3, :3].T + inverse[:3, 3]).astype(int) + 1
            lo, hi = np.maximum(lo, 0), np.minimum(hi, shape)
            if np.any(hi <= lo):
                continue
            axes = [np.arange(lo[d], hi[d]) * spacing[d] + grid_affine[d, 3] for d in range(3)]
            points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
            segment = p1 - p0
            t = np.clip(((points - p0) @ segment) / max(segment @ segment, 1e-9), 0, 1)
            distance = np.linalg.norm(points - (p0 + t[..., None] * segment), axis=-1)
            if vein.radius_mm >= 0.7:
                local = np.clip(vein.radius_mm + 0.5 - distance, 0, 1)
            else:
                sigma = 0.5
                local = np.minimum(1.0, np.pi * vein.radius_mm ** 2 / (2 * np.pi * sigma ** 2)
                                   * np.exp(-distance ** 2 / (2 * sigma ** 2)))
            box = tuple(slice(a, b) for a, b in zip(lo, hi))
            update = local > fraction[box]
            fraction[box] = np.where(update, local, fraction[box])
            chi[box] = np.where(update, vein.chi_ppm, chi[box])
    return fraction, chi


def sphere_voxel_factors(sphere: Sphere, grid_affine: np.ndarray, shape, b0_tesla: float, te_s: float,
                         fine_mm: float = 0.2):
    """Complex factor (mean over each acquired voxel) a sphere multiplies into the signal.

    Returns (box slices, complex64 factors) for an axis-aligned grid (diagonal grid_affine). Inside the
    sphere the factor is core_signal; outside it is exp(i phase) of the analytic dipole field.
    """
    spacing = np.abs(np.diag(grid_affine)[:3])
    radius = sphere.diameter_mm / 2
    phase_scale = phase_per_ppm(b0_tesla, te_s)
    # Reach where the peak dipole phase falls below 0.05 rad, at least radius + 2 mm.
    peak = abs(phase_scale * sphere.chi_ppm * 2 / 3)
    reach = max(radius * max(1.0, (peak / 0.05)) ** (1 / 3), radius + 2.0, 2.5 * radius if sphere.soft_depth else 0)
    centre_ijk = (sphere.centre - grid_affine[:3, 3]) / np.diag(grid_affine)[:3]
    half = np.ceil(reach / spacing).astype(int) + 1
    lo = np.maximum(np.round(centre_ijk).astype(int) - half, 0)
    hi = np.minimum(np.round(centre_ijk).astype(int) + half + 1, shape)
    if np.any(hi <= lo):
        return None, None
    sub = np.maximum(1, np.ceil(spacing / fine_mm)).astype(int)
    offsets = [((np.arange(n) + 0.5) / n - 0.5) * s for n, s in zip(sub, spacing)]
    result = np.empty(tuple(hi - lo), np.complex64)
    centres = [np.arange(lo[d], hi[d]) * grid_affine[d, d] + grid_affine[d, 3] - sphere.centre[d] for d in range(3)]
    for index_k, z in enumerate(centres[2]):
        xs = (centres[0][:, None] + offsets[0][None, :]).reshape(-1)
        ys = (centres[1][:, None] + offsets[1][None, :]).reshape(-1)
        zs = z + offsets[2]
        grid = np.stack(np.meshgrid(xs, ys, zs, indexing="ij"), axis=-1).astype(np.float32)
        squared = np.sum(grid ** 2, axis=-1)
        values = np.exp(1j * phase_scale * sphere_field(grid, radius, sphere.chi_ppm))
        if sphere.soft_depth:
            values *= soft_dip(squared, radius, sphere.soft_depth, sphere.soft_power)
        else:
            values = np.where(squared <= radius ** 2, np.complex64(sphere.core_signal), values)
        values = values.reshape(len(centres[0]), sub[0], len(centres[1]), sub[1], sub[2])
        result[:, :, index_k] = values.mean(axis=(1, 3, 4))
    return tuple(slice(a, b) for a, b in zip(lo, hi)), result


def soft_dip(squared_distance, radius: float, depth: float, power: float) -> np.ndarray:
    """Magnitude of a soft microbleed at squared distances (mm^2): 1 - depth at the centre, 1 - depth / 2 at
    `radius`, a Gaussian for power 2 (flatter-topped above, more peaked below)."""
    scale = radius / (2 * np.log(2)) ** (1 / power)
    return (1.0 - depth * np.exp(-0.5 * (squared_distance / scale ** 2) ** (power / 2))).astype(np.float32)


MIN_CONTRAST = 0.3  # a lesion sized at half contrast must darken its centre voxel by this much on its grid


def measured_factors(sphere: Sphere, grid_affine, shape, b0_tesla, te_s) -> tuple:
    """sphere_voxel_factors' (box, factors), with sphere.apparent_diameter_mm measured from them: one
    computation both to size a sphere and to draw it."""
    voxel_factors = sphere_voxel_factors(sphere, grid_affine, shape, b0_tesla, te_s)
    sphere.apparent_diameter_mm = apparent_diameter(sphere, grid_affine, shape, b0_tesla, te_s,
                                                    voxel_factors=voxel_factors)
    return voxel_factors


def apparent_diameter(sphere: Sphere, grid_affine, shape, b0_tesla, te_s, darkness: float = 0.5,
                      voxel_factors: tuple | None = None) -> float:
    """In-plane diameter (mm) of the region the sphere darkens below `darkness` on its central slice;
    voxel_factors: sphere_voxel_factors' (box, factors) when the caller has them already. A soft sphere is
    measured at half its acquired contrast (full width at half depth), and is 0 when that contrast is below
    MIN_CONTRAST; so is a sphere with half_contrast_size."""
    box, factors = voxel_factors or sphere_voxel_factors(sphere, grid_affine, shape, b0_tesla, te_s)
    if box is None:
        return 0.0
    k = int(round((sphere.centre[2] - grid_affine[2, 3]) / grid_affine[2, 2])) - box[2].start
    k = min(max(k, 0), factors.shape[2] - 1)
    if sphere.soft_depth or sphere.half_contrast_size:
        contrast = 1.0 - float(np.abs(factors[:, :, k]).min())
        if contrast < MIN_CONTRAST:
            return 0.0
        darkness = 1.0 - contrast / 2
    dark = np.abs(factors[:, :, k]) < darkness
    labels, _ = ndimage.label(dark)
    centre = np.round((sphere.centre[:2] - grid_affine[:2, 3]) / np.diag(grid_affine)[:2]).astype(int)
    centre -= [box[0].start, box[1].start]
    centre = np.clip(centre, 0, np.array(dark.shape) - 1)
    label = labels[centre[0], centre[1]]
    if label == 0:
        return 0.0
    area = np.count_nonzero(labels == label) * abs(grid_affine[0, 0] * grid_affine[1, 1])
    return float(2 * np.sqrt(area / np.pi))
