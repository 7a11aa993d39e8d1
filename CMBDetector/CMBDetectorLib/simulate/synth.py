"""One simulated scan end to end, its files, and the `cmbdetector synth` command.

Pipeline per scan (seeded, so a seed always gives the same scan):
  template head -> random pose + elastic deformation -> 1 mm working grid in the scanner frame
  -> susceptibility (tissue, iron nuclei, veins, skull, air) -> field by FFT dipole convolution
  -> complex GRE signal with intravoxel dephasing -> slice profile + resampling to the acquired grid
  -> microbleeds and calcifications (analytic dipoles on a fine grid inside each acquired voxel)
  -> coil bias, complex noise -> magnitude (GRE, or SWI with the negative phase mask) and phase.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..errors import CMBError
from ..grids import linear_along
from ..image import Volume
from . import anatomy
from .acquisition import PROTOCOLS, sample_acquisition, tissue_properties
from .domain import (HELD_OUT_PROTOCOLS, RANDOMISED_PROTOCOL, TISSUES, Variation, is_domain_protocol,
                     sample_domain_acquisition, sample_site, sample_variation)
from .deform import random_deformation
from ..phase import homodyne_phase
from .physics import field_from_susceptibility, gre_signal, swi_magnitude
from .structures import (CALCIFICATION_SITES, Sphere, measured_factors, rasterise_veins, sphere_voxel_factors,
                         vein_network)

TISSUE_CHI_PPM = {"gm": 0.02, "wm": -0.03, "csf": 0.0, "skull": -2.0}
WATER_VS_AIR_PPM = -9.4  # tissue is diamagnetic relative to air; air is the zero of this map
CMB_REGION_WEIGHTS = {"lobar": 0.55, "deep": 0.25, "infratentorial": 0.20}
# Fixed MNI points carried into every scan's truth, so location tests can ask "where is the thalamus here?"
ANATOMICAL_LANDMARKS_MNI = {"left thalamus": (-12, -18, 8), "right calcarine cortex": (10, -85, 8),
                            "right cerebellar hemisphere": (25, -65, -35)}
# Soft microbleeds (synth --soft-share): centre darkening (before voxel averaging), profile power, and a
# weaker susceptibility than the drawn one, so that the smooth dip, not the dipole's blooming, is what shows.
SOFT_DEPTH = (0.45, 0.97)
SOFT_POWER = (1.5, 4.0)
SOFT_CHI_SCALE = (0.1, 0.3)
APPARENT_RANGE_MM = (2.0, 10.0)  # the clinical definition of a microbleed's apparent size
# Edge microbleeds (--edge-share): centred this close to the brain's outer surface (the pial hull), so that
# they abut the dark extra-cerebral space, the dura or a sinus's signal void. Drawn uniformly, only about 1 in
# 10 microbleeds lies there, and stage 2 missed most of those (docs/simulator.md).
EDGE_MM = 4.0
EDGE_MIN_SHARE = 0.01  # a location class with less of its tissue at the edge keeps its usual placement


@dataclass
class SimulatedScan:
    scan_id: str
    magnitude: Volume
    phase: Volume
    truth: dict
    brain: np.ndarray | None = None  # bool (I, J, K) true brain mask on the acquired grid (pial hull)


def _scan_name(seed: int, protocol: str) -> str:
    """The name of a simulated scan (its files' stem): what simulate_scan writes and a set's helpers look for."""
    return f"sim{seed:06d}_{protocol}"


def simulate_scan(seed: int, acquisition: str = "swi3t", cmb_free: bool = False, n_cmb: int | None = None,
                  scan_id: str | None = None, mimic_level: float = 1.0, spacing_mm=None,
                  site_seed: int | None = None, edge_share: float = 0.0, soft_share: float = 0.0,
                  faint: bool = False) -> SimulatedScan:
    """Simulate one scan. mimic_level scales the number of veins and calcifications; spacing_mm
    overrides the protocol's random voxel size (e.g. the benchmark's nominal 0.5 x 0.5 x 2 mm SWI);
    site_seed fixes acquisition and variation to that site's (domain.sample_site) instead of the scan's own;
    edge_share: the share of microbleeds placed at the brain's edge (within EDGE_MM of its surface).
    soft_share: the share of microbleeds drawn soft (structures.soft_dip) instead of with a black core.
    faint: size microbleeds at half their own contrast (Sphere.half_contrast_size), which keeps the faint
    partial-volumed ones of thick slices; the truth then records each one's contrast."""
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    variation_rng = np.random.default_rng([seed, 7])  # its own stream: nominal scans stay as they were
    if site_seed is not None:
        acq, variation = sample_site(acquisition, site_seed)
    else:
        acq = (sample_domain_acquisition(acquisition, variation_rng) if is_domain_protocol(acquisition)
               else sample_acquisition(acquisition, rng))
        variation = sample_variation(acquisition, variation_rng)
    if spacing_mm is not None:
        acq = dataclasses.replace(acq, spacing_mm=tuple(float(v) for v in spacing_mm))
    head = anatomy.head_model()
    scan_id = scan_id or _scan_name(seed, acq.name)

    occupied = np.argwhere(head.labels != anatomy.AIR)
    bounds = head.points_mm(np.stack([occupied.min(axis=0), occupied.max(axis=0)]).astype(float))
    deformation = random_deformation(rng, bounds, elastic_mm=variation.elastic_mm,
                                     scale_range=variation.scale_range)
    grid_affine, shape = deformation.grid_affine, deformation.grid_shape
    template_ijk = head.to_ijk(np.moveaxis(deformation.grid_points_to_template(), 0, -1)).astype(np.float32)
    template_ijk = np.moveaxis(template_ijk, -1, 0)

    gm, wm, csf = (_warp(m, template_ijk, 1) for m in (head.gm, head.wm, head.csf))
    labels = _warp(head.labels, template_ijk, 0)
    del template_ijk

    veins = vein_network(rng, head, n_medullary=int(rng.integers(15, 40) * mimic_level * variation.medullary_count),
                         n_cortical=int(rng.integers(15, 35) * mimic_level * variation.cortical_count),
                         variation=variation)
    for vein in veins:
        vein.points = deformation.to_scanner(vein.points)
    vein_fraction, vein_chi = rasterise_veins(veins, grid_affine, shape)

    iron_scale = rng.uniform(0.7, 1.3)
    chi, relaxed = _tissue_maps(labels, gm, wm, csf, vein_fraction, vein_chi, acq, iron_scale, variation)
    del gm, wm, csf, vein_chi
    field = field_from_susceptibility(chi, np.diag(grid_affine)[:3])
    signal_working = gre_signal(relaxed, field, acq.b0_t, acq.te_ms / 1000, np.diag(grid_affine)[:3])
    del chi, relaxed, field

    acquired_affine, acquired_shape = _acquired_grid(grid_affine, shape, acq.spacing_mm, labels)
    signal = _resample_to_acquired(signal_working, grid_affine, acquired_affine, acquired_shape)
    brain_acquired = _resample_labels(labels, grid_affine, acquired_affine, acquired_shape)
    del signal_working

    drawn = []  # (sphere, its (box, factors) when measuring its apparent size made them, else None)
    if not cmb_free:
        count = n_cmb if n_cmb is not None else int(min(12, 1 + rng.geometric(0.35) - 1 + rng.integers(0, 2)))
        drawn += _sample_microbleeds(rng, head, deformation, veins, count, acquired_affine, acquired_shape, acq,
                                     variation, variation_rng, edge_share, soft_share, faint)
    drawn += _sample_calcifications(rng, head, deformation, acquired_affine, acquired_shape, acq,
                                    mean_count=1.2 * mimic_level)
    for sphere, voxel_factors in drawn:
        box, factors = voxel_factors or sphere_voxel_factors(sphere, acquired_affine, acquired_shape, acq.b0_t,
                                                             acq.te_ms / 1000)
        if box is not None:
            signal[box] *= factors
    spheres = [sphere for sphere, _ in drawn]

    signal *= _bias_field(rng, acquired_shape, variation.bias_sd)
    signal = _artefacts(signal, variation, variation_rng)
    wm_level = tissue_properties(acq.b0_t)["wm"][0] * np.exp(-acq.te_ms / 1000 * tissue_properties(acq.b0_t)["wm"][1])
    sigma = wm_level / acq.snr
    if variation.noise_variation > 0:  # parallel imaging: a smooth noise-level map (g-factor)
        level = np.log(_bias_field(variation_rng, acquired_shape, 0.5))
        sigma = sigma * (1 + variation.noise_variation * np.tanh(level))
    signal += (rng.normal(0, sigma, acquired_shape) + 1j * rng.normal(0, sigma, acquired_shape)).astype(np.complex64)

    magnitude = np.abs(signal)
    if acq.swi:
        magnitude = swi_magnitude(magnitude, homodyne_phase(signal, acq.spacing_mm, variation.homodyne_mm),
                                  variation.swi_power)
        if variation.minip_slices > 1:
            magnitude = ndimage.minimum_filter1d(magnitude, variation.minip_slices, axis=2)
    phase = (variation.phase_sign * np.angle(signal)).astype(np.float32)
    scale = 1000.0 / max(wm_level, 1e-6)
    magnitude_volume = Volume((magnitude * scale).astype(np.float32), acquired_affine,
                              {"scan_id": scan_id, "kind": "SWI" if acq.swi else "GRE magnitude"})
    phase_volume = Volume(phase, acquired_affine.copy(), {"scan_id": scan_id, "kind": "phase (rad)"})

    truth = _truth(scan_id, seed, acq, spheres, veins, deformation, brain_acquired, acquired_affine,
                   time.perf_counter() - started, mimic_level)
    truth["domain"] = variation.domain
    if site_seed is not None:
        truth["site_seed"] = int(site_seed)
    if edge_share > 0:
        truth["edge_share"] = float(edge_share)
    if soft_share > 0:
        truth["soft_share"] = float(soft_share)
    if faint:
        truth["faint"] = True
    if variation.domain != "nominal":
        truth["variation"] = variation.to_dict()
    return SimulatedScan(scan_id, magnitude_volume, phase_volume, truth, brain_acquired >= anatomy.BRAIN)


def _warp(array, template_ijk, order):
    """Template-space map sampled at the working grid's template coordinates (3, I, J, K)."""
    return ndimage.map_coordinates(array, template_ijk, order=order, mode="constant", cval=0, prefilter=False)


def _tissue_maps(labels, gm, wm, csf, vein_fraction, vein_chi, acq, iron_scale, variation):
    """Susceptibility (ppm, air = 0) and relaxed magnitude (sum of fraction * PD * exp(-TE R2*))."""
    te = acq.te_ms / 1000
    props = dict(tissue_properties(acq.b0_t))
    for name, pd_scale, r2_scale in zip(TISSUES, variation.proton_density, variation.r2star):
        props[name] = (props[name][0] * pd_scale, props[name][1] * r2_scale)
    inside_head = (labels != anatomy.AIR) & (labels != anatomy.SINUS_AIR)
    is_brain = labels >= anatomy.BRAIN
    tissue = 1.0 - vein_fraction
    extra_r2 = np.zeros(labels.shape, np.float32)
    nucleus_chi = np.zeros(labels.shape, np.float32)
    for index, (_, chi_ppm, r2_extra) in enumerate(anatomy.NUCLEI):
        where = labels == anatomy.NUCLEUS_BASE + index
        extra_r2[where] = r2_extra * iron_scale * acq.b0_t / 3.0
        nucleus_chi[where] = chi_ppm * iron_scale

    def relaxed(name, extra=0.0):
        pd, r2 = props[name]
        return pd * np.exp(-te * (r2 + extra))

    brain_signal = gm * relaxed("gm", extra_r2) + wm * relaxed("wm", extra_r2) + csf * relaxed("csf")
    magnitude = np.where(is_brain, brain_signal, 0.0)
    magnitude = np.where(labels == anatomy.EXTRA_CSF, relaxed("csf"), magnitude)
    magnitude = np.where(labels == anatomy.SKULL, relaxed("skull"), magnitude)
    magnitude = np.where(labels == anatomy.SCALP, relaxed("scalp"), magnitude)
    magnitude = magnitude * tissue + vein_fraction * relaxed("blood") * inside_head

    chi = np.where(inside_head, WATER_VS_AIR_PPM, 0.0)
    chi = chi + np.where(is_brain, gm * TISSUE_CHI_PPM["gm"] + wm * TISSUE_CHI_PPM["wm"] + nucleus_chi, 0.0)
    chi = chi + np.where(labels == anatomy.SKULL, TISSUE_CHI_PPM["skull"], 0.0)
    chi = chi + vein_fraction * vein_chi
    return chi.astype(np.float32), magnitude.astype(np.float32)


def _acquired_grid(grid_affine, shape, spacing_mm, labels, margin_mm: float = 6.0):
    """Axial acquisition grid: the whole head in-plane, the brain plus a margin from foot to head
    (a slab prescribed on the brain, as on a scanner)."""
    spacing = np.asarray(spacing_mm, float)
    working_spacing = np.diag(grid_affine)[:3]
    slices_with_brain = np.nonzero((labels >= anatomy.BRAIN).any(axis=(0, 1)))[0]
    z_first = max(0.0, slices_with_brain.min() * working_spacing[2] - margin_mm)
    z_last = min((shape[2] - 1) * working_spacing[2], slices_with_brain.max() * working_spacing[2] + margin_mm)
    extent = (np.asarray(shape) - 1) * working_spacing
    extent[2] = z_last - z_first
    acquired_shape = tuple(int(n) for n in np.floor(extent / spacing) + 1)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = grid_affine[:3, 3] + [0.0, 0.0, z_first]
    return affine, acquired_shape


def _slice_profile(width_samples: float) -> np.ndarray:
    """Trapezoid weights whose sum is the slice thickness in working-grid samples."""
    half = int(np.ceil(width_samples / 2))
    offsets = np.arange(-half, half + 1)
    weights = np.clip(width_samples / 2 + 0.5 - np.abs(offsets), 0, 1)
    return weights / weights.sum()


def _resample_to_acquired(signal, grid_affine, acquired_affine, acquired_shape):
    """Complex signal averaged over each acquired slice (slice profile) and voxel, then sampled."""
    working_spacing = np.diag(grid_affine)[:3]
    for axis in range(3):
        ratio = acquired_affine[axis, axis] / working_spacing[axis]
        if ratio > 1.2:
            profile = _slice_profile(ratio).astype(np.float32)
            signal = (ndimage.convolve1d(signal.real, profile, axis=axis, mode="nearest")
                      + 1j * ndimage.convolve1d(signal.imag, profile, axis=axis, mode="nearest")).astype(np.complex64)
        signal = linear_along(signal, _working_positions(grid_affine, acquired_affine, acquired_shape, axis), axis)
    return signal.astype(np.complex64)


def _working_positions(grid_affine, acquired_affine, acquired_shape, axis):
    """Fractional working-grid indices of the acquired voxel centres along one axis."""
    offset = (acquired_affine[axis, 3] - grid_affine[axis, 3]) / grid_affine[axis, axis]
    return offset + np.arange(acquired_shape[axis]) * acquired_affine[axis, axis] / grid_affine[axis, axis]


def _resample_labels(labels, grid_affine, acquired_affine, acquired_shape):
    indices = [np.clip(np.round(_working_positions(grid_affine, acquired_affine, acquired_shape, a)).astype(int), 0,
                       labels.shape[a] - 1) for a in range(3)]
    return labels[np.ix_(*indices)]


def _bias_field(rng, shape, sd: float = 0.08):
    """Smooth receive-coil sensitivity: exp of a random low-order polynomial, about +-20 % at sd 0.08."""
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    c = rng.normal(0, sd, 9)
    log_bias = c[0] * x + c[1] * y + c[2] * z + c[3] * x * x + c[4] * y * y + c[5] * z * z + c[6] * x * y + c[7] * y * z + c[8] * x * z
    return np.exp(log_bias).astype(np.float32)


def _artefacts(signal, variation, rng):
    """Gibbs ringing (in-plane k-space truncation) and a motion ghost along the phase-encoding axis (j)."""
    if variation.gibbs_keep < 1.0:
        for axis in (0, 1):
            n = signal.shape[axis]
            keep = np.abs(np.fft.fftfreq(n)) <= variation.gibbs_keep / 2
            shape = [1, 1, 1]
            shape[axis] = n
            signal = np.fft.ifft(np.fft.fft(signal, axis=axis) * keep.reshape(shape), axis=axis).astype(np.complex64)
    if variation.ghost > 0:
        shift = signal.shape[1] // int(rng.integers(2, 5))
        signal = signal + variation.ghost * np.exp(1j * rng.uniform(0, 2 * np.pi)) * np.roll(signal, shift, axis=1)
    return signal.astype(np.complex64)


def _region_map():
    """Region codes on the head-model grid, from the shipped MNI atlas (see atlas.py)."""
    from .. import atlas

    region_volume = atlas.load_region_atlas()
    head = anatomy.head_model()
    if region_volume.array.shape == head.labels.shape and np.allclose(region_volume.affine, head.affine):
        return region_volume.array, atlas
    ijk = np.indices(head.labels.shape, dtype=np.float32).reshape(3, -1).T
    points = head.points_mm(ijk)
    codes = ndimage.map_coordinates(region_volume.array, region_volume.ras_to_ijk(points).T, order=0)
    return codes.reshape(head.labels.shape), atlas


def _sample_microbleeds(rng, head, deformation, veins, count, acquired_affine, acquired_shape, acq,
                        variation=Variation(), variation_rng=None, edge_share: float = 0.0,
                        soft_share: float = 0.0, faint: bool = False):
    """Microbleeds in tissue of a randomly chosen location class; with variation.lesion_parts > 1 each is
    irregular: its main sphere (the truth centre) plus smaller overlapping "microbleed part" spheres.
    A share edge_share of them lie at the brain's edge (_edge_zone), in the classes that reach it; a share
    soft_share are soft (SOFT_DEPTH, SOFT_POWER, SOFT_CHI_SCALE; their parts too). faint: each is sized at half
    its own contrast (Sphere.half_contrast_size), and its contrast (darkest voxel) is kept in sphere.extra.
    Returns (sphere, voxel factors or None) pairs: the factors measured its apparent size and draw it too."""
    codes, atlas = _region_map()
    vein_points = np.concatenate([v.points for v in veins])
    tissue = (head.gm + head.wm > 0.6) & head.brain
    spheres = []
    attempts = 0
    while len(spheres) < count and attempts < 200 * max(count, 1):
        attempts += 1
        region = rng.choice(list(CMB_REGION_WEIGHTS), p=list(CMB_REGION_WEIGHTS.values()))
        allowed = tissue & np.isin(codes, [code for code, (name, _) in atlas.REGION_CODES.items() if name == region])
        if edge_share > 0 and rng.random() < edge_share:
            at_edge = allowed & _edge_zone()
            if at_edge.sum() >= EDGE_MIN_SHARE * allowed.sum():  # the deep class has next to none
                allowed = at_edge
        centre_mni = _random_point(rng, head, allowed)
        region_name, lobe = atlas.region_of_code(int(codes[tuple(np.round(head.to_ijk(centre_mni)[0]).astype(int))]))
        centre = deformation.to_scanner(centre_mni)[0]
        if np.min(np.linalg.norm(vein_points - centre, axis=1)) < variation.vein_clearance_mm:
            continue
        if any(np.linalg.norm(s.centre - centre) < variation.lesion_separation_mm for s, _ in spheres):
            continue
        chi_low, chi_high = variation.lesion_chi_ppm
        sphere = Sphere("microbleed", centre, rng.uniform(1.0, 5.0), float(np.exp(rng.uniform(np.log(chi_low), np.log(chi_high)))),
                        core_signal=rng.uniform(0.0, 0.1), region=region_name, lobe=lobe, half_contrast_size=faint)
        sphere.extra["centre_mni"] = centre_mni[0].tolist()
        if soft_share > 0 and rng.random() < soft_share:
            sphere.soft_depth, sphere.soft_power = rng.uniform(*SOFT_DEPTH), rng.uniform(*SOFT_POWER)
            sphere.chi_ppm *= rng.uniform(*SOFT_CHI_SCALE)
        voxel_factors = measured_factors(sphere, acquired_affine, acquired_shape, acq.b0_t, acq.te_ms / 1000)
        if faint and voxel_factors[0] is not None:
            sphere.extra["contrast"] = round(1.0 - float(np.abs(voxel_factors[1]).min()), 3)
        if APPARENT_RANGE_MM[0] <= sphere.apparent_diameter_mm <= APPARENT_RANGE_MM[1]:
            spheres.append((sphere, voxel_factors))
    parts = []
    for sphere, _ in spheres if variation.lesion_parts > 1 else []:
        radius = sphere.diameter_mm / 2
        for _ in range(variation.lesion_parts - 1):
            direction = variation_rng.normal(size=3)
            offset = direction / np.linalg.norm(direction) * radius * variation_rng.uniform(0.4, 0.9)
            parts.append(Sphere("microbleed part", sphere.centre + offset, sphere.diameter_mm * variation_rng.uniform(0.4, 0.8),
                                sphere.chi_ppm * variation_rng.uniform(0.5, 1.2), core_signal=sphere.core_signal,
                                soft_depth=sphere.soft_depth, soft_power=sphere.soft_power))
    return spheres + [(part, None) for part in parts]


@functools.lru_cache(maxsize=1)
def _edge_zone() -> np.ndarray:
    """Template voxels within EDGE_MM of the outside of the brain (the 1 mm template: voxels are mm)."""
    brain = anatomy.head_model().brain
    return brain & (ndimage.distance_transform_edt(brain) <= EDGE_MM)


def _random_point(rng, head, mask) -> np.ndarray:
    candidates = np.argwhere(mask)
    if len(candidates) == 0:
        raise CMBError("the region atlas and the template do not overlap")
    voxel = candidates[rng.integers(len(candidates))] + rng.uniform(-0.5, 0.5, 3)
    return head.points_mm(voxel[None, :])


def _sample_calcifications(rng, head, deformation, acquired_affine, acquired_shape, acq, mean_count):
    """(calcification, its voxel factors) pairs at the usual calcification sites."""
    spheres = []
    for _ in range(rng.poisson(mean_count)):
        names = [site[0] for site in CALCIFICATION_SITES]
        weights = np.array([site[2] for site in CALCIFICATION_SITES])
        index = rng.choice(len(names), p=weights / weights.sum())
        x, y, z = CALCIFICATION_SITES[index][1]
        centre_mni = np.array([[x * rng.choice([-1, 1]), y, z]]) + rng.normal(0, 1.5, 3)
        sphere = Sphere("calcification", deformation.to_scanner(centre_mni)[0], rng.uniform(1.0, 3.0),
                        -float(rng.uniform(0.1, 1.0)), core_signal=rng.uniform(0.1, 0.3), site=names[index])
        spheres.append((sphere, measured_factors(sphere, acquired_affine, acquired_shape, acq.b0_t,
                                                 acq.te_ms / 1000)))
    return spheres


def _truth(scan_id, seed, acq, spheres, veins, deformation, labels, affine, seconds, mimic_level) -> dict:
    def ras(point):
        return [round(float(v), 3) for v in point]

    microbleeds = [s for s in spheres if s.kind == "microbleed"]
    landmarks = {}
    for sinus in anatomy.SINUSES:
        landmarks[sinus.name] = ras(deformation.to_scanner(np.array([sinus.centre_mni]))[0])
    nuclei = []
    for nucleus, chi, _ in anatomy.NUCLEI:
        for copy in anatomy.mirrored(nucleus):
            nuclei.append({"name": copy.name, "center_ras": ras(deformation.to_scanner(np.array([copy.centre_mni]))[0])})
    return {
        "scan_id": scan_id,
        "seed": int(seed),
        "acquisition": acq.to_dict(),
        "shape": list(labels.shape),
        "microbleeds": [{"id": i + 1, "center_ras": ras(s.centre), "true_diameter_mm": round(s.diameter_mm, 3),
                         "apparent_diameter_mm": round(s.apparent_diameter_mm, 3), "chi_ppm": round(s.chi_ppm, 4),
                         "region": s.region, "lobe": s.lobe, "center_mni": ras(s.extra["centre_mni"]),
                         **({"soft_depth": round(s.soft_depth, 3), "soft_power": round(s.soft_power, 2)}
                            if s.soft_depth else {}),
                         **({"contrast": s.extra["contrast"]} if "contrast" in s.extra else {})}
                        for i, s in enumerate(microbleeds)],
        "mimics": {
            "calcifications": [{"center_ras": ras(s.centre), "diameter_mm": round(s.diameter_mm, 3),
                                "apparent_diameter_mm": round(s.apparent_diameter_mm, 3),
                                "chi_ppm": round(s.chi_ppm, 4), "site": s.site}
                               for s in spheres if s.kind == "calcification"],
            "veins": [{"kind": v.kind, "radius_mm": round(float(v.radius_mm), 3), "chi_ppm": round(float(v.chi_ppm), 4),
                       "points_ras": [ras(p) for p in v.points]} for v in veins],
            "iron_nuclei": nuclei,
            "air_bone": [{"name": name, "center_ras": centre} for name, centre in landmarks.items()],
        },
        "landmarks": {name: {"center_mni": list(point), "center_ras": ras(deformation.to_scanner(np.array([point]))[0])}
                      for name, point in ANATOMICAL_LANDMARKS_MNI.items()},
        "mimic_level": mimic_level,
        "simulation_seconds": round(seconds, 2),
        "template_to_scanner_note": "positions in RAS mm of the scanner frame; center_mni in MNI152 2009 space",
    }


# ---------------------------------------------------------------- files and command line


def write_scan(scan: SimulatedScan, out_dir) -> dict:
    """Write STEM.nii.gz (magnitude), STEM_phase.nii.gz, STEM_brain.nii.gz (the true brain mask, uint8) and
    STEM.truth.json; return the paths."""
    import nibabel as nib

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = scan.scan_id
    paths = {"magnitude": out_dir / f"{stem}.nii.gz", "phase": out_dir / f"{stem}_phase.nii.gz",
             "truth": out_dir / f"{stem}.truth.json"}
    volumes = {"magnitude": scan.magnitude, "phase": scan.phase}
    if scan.brain is not None:
        paths["brain"] = out_dir / f"{stem}_brain.nii.gz"
        volumes["brain"] = scan.magnitude.with_array(scan.brain.astype(np.uint8))
    for key, volume in volumes.items():
        image = nib.Nifti1Image(volume.array, volume.affine)
        image.header.set_xyzt_units("mm", "sec")
        image.header.set_qform(volume.affine, code=1)
        image.header.set_sform(volume.affine, code=1)
        nib.save(image, str(paths[key]))
    truth = dict(scan.truth, files={key: paths[key].name for key in volumes})
    paths["truth"].write_text(json.dumps(truth, indent=1))
    return paths


MIXES = {"mixed": PROTOCOLS, "ood": HELD_OUT_PROTOCOLS}  # set names whose scans cycle through several protocols
ACQUISITION_CHOICES = (*PROTOCOLS, "mixed", RANDOMISED_PROTOCOL, *HELD_OUT_PROTOCOLS, "ood")


def scan_plan(n: int, seed: int, acquisition: str, cmb_free_fraction: float) -> list:
    """(scan seed, acquisition, cmb_free) for each scan of a set: acquisitions and CMB-free scans spread evenly."""
    if n < 1:
        raise CMBError("--n must be at least 1")
    if acquisition not in ACQUISITION_CHOICES:
        raise CMBError(f"unknown acquisition '{acquisition}': choose one of {', '.join(ACQUISITION_CHOICES)}")
    if not 0.0 <= cmb_free_fraction <= 1.0:
        raise CMBError("--cmb-free-fraction must be between 0 and 1")
    n_free = int(round(n * cmb_free_fraction))
    free = set(np.linspace(0, n - 1, n_free).round().astype(int).tolist()) if n_free else set()
    plan = []
    for index in range(n):
        cycle = MIXES.get(acquisition, (acquisition,))
        protocol = cycle[index % len(cycle)]
        plan.append((seed * 10000 + index, protocol, index in free))
    return plan


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--n", type=int, default=3, help="number of scans (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the set; scan i uses seed*10000+i")
    parser.add_argument("--acquisition", default="mixed",
                        help="a nominal protocol (" + ", ".join(PROTOCOLS) + "), mixed (the three, default), "
                        f"{RANDOMISED_PROTOCOL} (domain-randomised, for training), a held-out protocol ("
                        + ", ".join(HELD_OUT_PROTOCOLS) + ") or ood (the held-out three; never train on them)")
    parser.add_argument("--cmb-free-fraction", type=float, default=0.3, help="share of scans without microbleeds")
    parser.add_argument("--mimic-level", type=float, default=1.0, help="scale on veins and calcifications")
    parser.add_argument("--jobs", type=int, default=1, help="scans simulated in parallel processes")
    parser.add_argument("--preview", action="store_true", help="also write a gallery PNG per scan")
    parser.add_argument("--limit", type=int, help="simulate only the first LIMIT scans of the N-scan plan")
    parser.add_argument("--site-seed", type=int, help="one site: every scan shares the acquisition and settings "
                        "drawn from this seed (one protocol, not mixed or ood)")
    parser.add_argument("--soft-share", type=float, default=0.0, help="share of microbleeds drawn soft: a smooth "
                        "dip 45-97 %% deep at its centre instead of a black core (training data for lesions drawn "
                        "unlike ours; default 0)")
    parser.add_argument("--faint", action="store_true", help="size microbleeds at half their own contrast, as a "
                        "reader sizes a faint dot, and keep them down to 0.3 contrast: keeps the faint partial-"
                        "volumed lesions of thick slices that the 50 %% darkness rule drops (default: that rule)")
    parser.add_argument("--edge-share", type=float, default=0.0, help="share of microbleeds placed at the brain's "
                        f"edge, within {EDGE_MM:g} mm of its surface (training data for lesions against dark "
                        "extra-cerebral space; default 0: anywhere in the tissue of their location class)")


@dataclass(frozen=True)
class SynthJob:
    """One scan to simulate and write (a process pool's unit of work)."""

    seed: int
    protocol: str
    cmb_free: bool
    out: str
    mimic_level: float = 1.0
    preview: bool = False
    site_seed: int | None = None
    edge_share: float = 0.0
    soft_share: float = 0.0
    faint: bool = False


def simulate_and_write(job: SynthJob):
    """Simulate and write one scan -> (scan_id, microbleeds, seconds, magnitude path)."""
    scan = simulate_scan(job.seed, job.protocol, cmb_free=job.cmb_free, mimic_level=job.mimic_level,
                         site_seed=job.site_seed, edge_share=job.edge_share, soft_share=job.soft_share,
                         faint=job.faint)
    paths = write_scan(scan, job.out)
    if job.preview:
        from .preview import write_gallery
        write_gallery(scan, Path(job.out) / f"{scan.scan_id}_preview.png")
    return scan.scan_id, len(scan.truth["microbleeds"]), scan.truth["simulation_seconds"], str(paths["magnitude"])


def _set_plan(spec: dict, limit: int | None = None) -> list:
    """scan_plan of a set {"n", "seed", "acquisition", "cmb_free_fraction"}: its first `limit` scans are the
    same scans as in the whole set."""
    return scan_plan(spec["n"], spec["seed"], spec["acquisition"], spec["cmb_free_fraction"])[:limit]


def set_names(spec: dict, limit: int | None = None) -> list:
    """The scan names of a set (_set_plan), in plan order."""
    return [_scan_name(seed, protocol) for seed, protocol, _ in _set_plan(spec, limit)]


def set_truth_files(folder, spec: dict, limit: int | None = None) -> list:
    """The truth files of exactly the set `spec` (a folder may hold more scans)."""
    return [Path(folder) / f"{name}.truth.json" for name in set_names(spec, limit)]


def simulate_set(folder, spec: dict, jobs: int = 1, limit: int | None = None, on_scan=None) -> list:
    """Simulate the scans of `spec` (set_names; "mimic_level", optional "site_seed"; the first `limit`) missing
    from `folder`; return every magnitude path of those. Seeded: a scan already there is the same scan, unless
    it was made for another site or CMB-free where this plan wants microbleeds (or the reverse): the name does
    not say, and a set with another n or CMB-free fraction spreads its CMB-free scans differently.
    on_scan(done, total), if given, is called as each missing scan is written (for a progress bar)."""
    from ..workers import process_pool

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plan = _set_plan(spec, limit)
    names = [_scan_name(seed, protocol) for seed, protocol, _ in plan]
    site_seed = spec.get("site_seed")

    def made(name, cmb_free):  # already simulated, for the same site (or none), CMB-free or not as planned
        truth = folder / f"{name}.truth.json"
        if not truth.is_file():
            return False
        record = json.loads(truth.read_text())
        return record.get("site_seed") == site_seed and (not record["microbleeds"]) == cmb_free

    todo = [SynthJob(seed, protocol, free, str(folder), spec["mimic_level"], site_seed=site_seed)
            for (seed, protocol, free), name in zip(plan, names) if not made(name, free)]
    magnitudes = [folder / f"{name}.nii.gz" for name in names]
    if not todo:
        return magnitudes
    print(f"simulating {len(todo)} scans into {folder} ...", flush=True)
    with contextlib.ExitStack() as stack:
        results = (stack.enter_context(process_pool(jobs)).map(simulate_and_write, todo) if jobs > 1
                   else map(simulate_and_write, todo))
        for done, result in enumerate(results, 1):
            print("  {} : {} microbleeds, {:.1f} s".format(*result[:3]), flush=True)
            if on_scan is not None:
                on_scan(done, len(todo))
    return magnitudes


def run(args) -> int:
    plan = scan_plan(args.n, args.seed, args.acquisition, args.cmb_free_fraction)[: args.limit]
    if args.mimic_level < 0:
        raise CMBError("--mimic-level must not be negative")
    if args.site_seed is not None and args.acquisition in MIXES:
        raise CMBError("--site-seed needs one protocol: a site scans with one acquisition, not a mix")
    for name in ("edge_share", "soft_share"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise CMBError(f"--{name.replace('_', '-')} must be between 0 and 1")
    jobs = [SynthJob(seed, protocol, free, args.out, args.mimic_level, args.preview, args.site_seed,
                     args.edge_share, args.soft_share, args.faint) for seed, protocol, free in plan]
    if args.jobs > 1:
        from ..workers import process_pool

        with process_pool(args.jobs) as pool:
            results = pool.map(simulate_and_write, jobs)
            for result in results:
                print("{} : {} microbleeds, {:.1f} s -> {}".format(*result), flush=True)
    else:
        for job in jobs:
            print("{} : {} microbleeds, {:.1f} s -> {}".format(*simulate_and_write(job)), flush=True)
    return 0
