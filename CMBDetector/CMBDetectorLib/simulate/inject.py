"""Synthetic microbleeds injected into a scan that already exists: a site's own reviewed scans.

A fine-tune on about 20 reviewed scans sees about 40 real microbleeds; its threshold is then checked on a
handful of held-out reviews, where one lesion moves sensitivity by 0.1. Microbleeds drawn with the
simulator's sphere model into the site's own scans (its noise, contrast, veins and slice thickness) give
many more positives to learn from and a steadier sensitivity to calibrate on.

The site's field strength, echo time, SWI processing and phase convention cannot be read from its image
files, so each lesion draws its own from wide ranges below. The sphere model works in the voxel frame
with B0 along the third voxel axis (the slice axis of an axial acquisition; an approximation for oblique
or sagittal scans).

Two other lesion models draw a microbleed as someone else's simulator might, by its look alone (no
physics, magnitude only): "gaussian", a Gaussian dip, and "flat", an ellipsoid of uniform darkening. Both
are averaged over each voxel (a 2 mm lesion in a 5 mm slice keeps a fraction of its contrast) and kept only
when their centre voxel is at least MIN_CONTRAST darker than the tissue. `inject-check --lesions` and
tools/lesion_model_probe.py ask whether the detector knows a microbleed or only the simulator's spheres.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..image import Volume
from ..phase import from_radians, to_radians, vendor_range
from ..projection import find_min_projection, project, undo
from .physics import swi_magnitude
from .structures import MIN_CONTRAST, Sphere, measured_factors
from .synth import APPARENT_RANGE_MM

B0_CHOICES_T = (1.5, 3.0)
TE_RANGE_MS = (15.0, 40.0)
SWI_CHANCE = 0.5  # share of lesions darkened as on an SWI magnitude (negative-phase mask, power SWI_POWER)
SWI_POWER = 4
CHI_RANGE_PPM = (0.3, 2.0)  # log-uniform, the nominal simulator's microbleed range
DIAMETER_RANGE_MM = (1.0, 5.0)  # the susceptibility sphere; its apparent (bloomed) size must be a microbleed's
CORE_SIGNAL_RANGE = (0.0, 0.1)
CLEARANCE_MM = 8.0  # from the site's known microbleeds (accepted and added points)
SEPARATION_MM = 10.0  # between injected lesions
TISSUE_RANGE = (0.6, 1.4)  # normalised intensity at an injected centre: brain tissue, not CSF, vessel or edge
EDGE_VOXELS = 3  # injected centres stay this many voxels inside the brain mask
LESION_MODELS = ("sphere", "gaussian", "flat")
LOOK_DEPTH = (0.3, 0.95)  # "gaussian" and "flat": darkening at the centre, before voxel averaging
LOOK_DIAMETER_MM = (2.0, 5.0)  # "gaussian": full width at half depth; "flat": the ellipsoid's mean diameter
FLAT_AXIS_RATIO = (0.7, 1.3)  # "flat": each semi-axis is the mean radius times this
LOOK_SUBSAMPLES_MM = 0.25  # voxel averaging: sample points this far apart inside each voxel


@dataclass
class Injected:
    magnitude: Volume
    phase: Volume | None
    centres_ras: np.ndarray  # (N, 3)
    contrast: np.ndarray  # (N,) 1 - the darkest voxel's factor: how dark each lesion is on this grid


def inject_microbleeds(magnitude: Volume, phase: Volume | None, mask: np.ndarray, normalised: np.ndarray,
                       rng: np.random.Generator, count: int, avoid_ras=None, lesion_model: str = "sphere") -> Injected:
    """Up to `count` microbleeds in brain tissue of `magnitude` (and `phase`, radians or vendor units).

    mask: bool brain mask on the scan grid; normalised: the scan divided by its tissue level (preprocess's
    `Prepared.context`), which picks tissue; avoid_ras: (M, 3) points the lesions keep CLEARANCE_MM from;
    lesion_model: one of LESION_MODELS (the look-only models leave the phase untouched).
    """
    if lesion_model not in LESION_MODELS:
        raise ValueError(f"lesion model must be one of {', '.join(LESION_MODELS)}, got {lesion_model!r}")
    spacing = magnitude.spacing
    grid = np.diag([*spacing, 1.0])  # the voxel frame in mm, as the sphere model needs (diagonal)
    inner = ndimage.binary_erosion(mask, iterations=EDGE_VOXELS)
    inner &= (normalised > TISSUE_RANGE[0]) & (normalised < TISSUE_RANGE[1])
    sites = np.argwhere(inner)
    avoid = np.zeros((0, 3)) if avoid_ras is None else np.asarray(avoid_ras, float).reshape(-1, 3)
    signal = np.asarray(magnitude.array, dtype=np.float32).copy()
    # A scan made into a minimum-intensity projection gets lesions as its scanner would draw them: into the
    # unprojected image, then projected with it. Drawn into the projection, a lesion thinner than the window
    # would be erased when preprocessing undoes it (projection.py), and never reach the detector.
    projection = find_min_projection(signal, magnitude.slice_axis)
    if projection is not None:
        signal = undo(signal, projection, magnitude.slice_axis)
    units = None if phase is None else vendor_range(phase.array)  # vendor integer phase stays in its units
    radians = None if phase is None else to_radians(phase.array, units)
    placed_ijk, contrasts = [], []
    for _ in range(50 * count if len(sites) else 0):
        if len(placed_ijk) == count:
            break
        ijk = sites[rng.integers(len(sites))].astype(float)
        centre_ras = magnitude.ijk_to_ras(ijk[None])[0]
        if len(avoid) and np.linalg.norm(avoid - centre_ras, axis=1).min() < CLEARANCE_MM:
            continue
        if placed_ijk and np.linalg.norm((np.array(placed_ijk) - ijk) * spacing, axis=1).min() < SEPARATION_MM:
            continue
        if lesion_model != "sphere":
            box, darkening = _look_factors(lesion_model, ijk, spacing, signal.shape, rng)
            contrast = 1.0 - float(darkening.min())
            if contrast < MIN_CONTRAST:
                continue
            signal[box] *= darkening
            placed_ijk.append(ijk)
            contrasts.append(contrast)
            continue
        b0, te_s = float(rng.choice(B0_CHOICES_T)), rng.uniform(*TE_RANGE_MS) / 1000
        sphere = Sphere("microbleed", ijk * spacing, rng.uniform(*DIAMETER_RANGE_MM),
                        float(np.exp(rng.uniform(*np.log(CHI_RANGE_PPM)))), rng.uniform(*CORE_SIGNAL_RANGE))
        swi, sign = rng.random() < SWI_CHANCE, float(rng.choice([-1.0, 1.0]))
        box, factors = measured_factors(sphere, grid, signal.shape, b0, te_s)
        if box is None or not APPARENT_RANGE_MM[0] <= sphere.apparent_diameter_mm <= APPARENT_RANGE_MM[1]:
            continue
        field_phase = np.angle(factors).astype(np.float32)
        darkening = np.abs(factors).astype(np.float32)
        if swi:  # the scanner's own SWI mask sees the physical phase, whatever sign its files use
            darkening = swi_magnitude(darkening, field_phase, SWI_POWER)
        signal[box] *= darkening
        if radians is not None:
            radians[box] = np.angle(np.exp(1j * (radians[box] + sign * field_phase)))
        placed_ijk.append(ijk)
        contrasts.append(1.0 - float(darkening.min()))
    if projection is not None:
        signal = project(signal, projection, magnitude.slice_axis)
    centres = magnitude.ijk_to_ras(np.array(placed_ijk).reshape(-1, 3)) if placed_ijk else np.zeros((0, 3))
    injected_phase = None if phase is None else phase.with_array(from_radians(radians, units))
    return Injected(magnitude.with_array(signal), injected_phase, centres, np.array(contrasts, float))


def _look_factors(model: str, centre_ijk: np.ndarray, spacing, shape, rng: np.random.Generator) -> tuple:
    """(box slices, float32 darkening averaged over each voxel) of a "gaussian" or "flat" lesion."""
    depth, diameter = rng.uniform(*LOOK_DEPTH), rng.uniform(*LOOK_DIAMETER_MM)
    radii = np.full(3, diameter / 2)
    if model == "flat":
        radii = radii * rng.uniform(*FLAT_AXIS_RATIO, size=3)
    half = np.ceil(2 * radii.max() / spacing).astype(int) + 1
    centre = np.round(centre_ijk).astype(int)
    lo, hi = np.maximum(centre - half, 0), np.minimum(centre + half + 1, shape)
    samples = np.maximum(1, np.ceil(spacing / LOOK_SUBSAMPLES_MM)).astype(int)
    # per axis: mm from the lesion centre of every sample point, grouped by voxel
    axes = [((np.arange(a, b)[:, None] - c) * s + ((np.arange(n) + 0.5) / n - 0.5)[None, :] * s).ravel()
            for a, b, c, s, n in zip(lo, hi, centre_ijk, spacing, samples)]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    if model == "gaussian":
        sigma = diameter / (2 * np.sqrt(2 * np.log(2)))
        fine = 1.0 - depth * np.exp(-(x ** 2 + y ** 2 + z ** 2) / (2 * sigma ** 2))
    else:
        fine = 1.0 - depth * ((x / radii[0]) ** 2 + (y / radii[1]) ** 2 + (z / radii[2]) ** 2 <= 1.0)
    size = hi - lo
    fine = np.broadcast_to(fine, tuple(size * samples)).reshape(size[0], samples[0], size[1], samples[1],
                                                                 size[2], samples[2])
    return tuple(slice(a, b) for a, b in zip(lo, hi)), fine.mean(axis=(1, 3, 5)).astype(np.float32)
