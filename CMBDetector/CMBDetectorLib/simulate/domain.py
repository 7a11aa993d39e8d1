"""Where simulated scans vary, in three domains.

- nominal: the simulator as it always was (the in-distribution benchmark and older training sets).
- randomised: domain randomisation for training. Acquisition, anatomy, veins, lesions, image artefacts
  and SWI processing are each drawn from a wide range, so the models learn what a microbleed is rather
  than what one simulator setting draws.
- held-out: settings that no training scan uses (beyond the randomised ranges, or combinations training
  never saw), for the out-of-distribution benchmark. Never train or tune on it.

Every range is listed in docs/simulator.md. A scan's Variation is drawn from its own random stream
(seeded from the scan seed), so nominal scans stay bit-identical to the ones made before domains existed.

A site (sample_site) is one draw of acquisition and Variation shared by all its scans, as one scanner and
protocol are at a real hospital; its scans still differ in anatomy, veins, lesions, bias and noise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..errors import CMBError
from .acquisition import Acquisition, sample_acquisition

DOMAINS = ("nominal", "randomised", "held-out")
RANDOMISED_PROTOCOL = "random"
HELD_OUT_PROTOCOLS = ("ood-swi15t", "ood-gre3t-thick", "ood-gre15t-coarse")
TISSUES = ("gm", "wm", "csf", "scalp")


@dataclass(frozen=True)
class Variation:
    """Per-scan settings beyond the acquisition. Defaults are the nominal simulator."""

    domain: str = "nominal"
    # anatomy and contrast
    elastic_mm: float = 2.0
    scale_range: tuple = (0.92, 1.08)
    proton_density: tuple = (1.0, 1.0, 1.0, 1.0)  # multipliers for TISSUES
    r2star: tuple = (1.0, 1.0, 1.0, 1.0)
    # veins
    medullary_count: float = 1.0  # multiplier on the nominal counts
    cortical_count: float = 1.0
    medullary_radius_mm: tuple = (0.35, 0.7)
    cortical_radius_mm: tuple = (0.5, 1.5)
    vein_chi_scale: float = 1.0
    vein_turn: float = 1.0  # tortuosity multiplier of the random walks
    # microbleeds
    lesion_chi_ppm: tuple = (0.3, 2.0)
    lesion_parts: int = 1  # >1: an irregular lesion made of overlapping spheres
    vein_clearance_mm: float = 3.0
    lesion_separation_mm: float = 8.0
    # image
    bias_sd: float = 0.08
    noise_variation: float = 0.0  # relative amplitude of a smooth noise-level map (parallel imaging)
    gibbs_keep: float = 1.0  # fraction of in-plane k-space kept (< 1: truncation ringing)
    ghost: float = 0.0  # amplitude of a motion ghost along the phase-encoding axis
    # SWI processing
    homodyne_mm: float = 4.0
    swi_power: int = 4
    minip_slices: int = 1
    phase_sign: int = 1  # -1: the vendor writes phase with the opposite sign

    def to_dict(self) -> dict:
        return {key: (list(value) if isinstance(value, tuple) else value) for key, value in asdict(self).items()}


def domain_of(protocol: str) -> str:
    if protocol == RANDOMISED_PROTOCOL:
        return "randomised"
    if protocol in HELD_OUT_PROTOCOLS:
        return "held-out"
    return "nominal"


def _either(rng, ranges) -> float:
    """A value drawn uniformly from one of several (low, high) ranges, chosen with equal odds."""
    low, high = ranges[rng.integers(len(ranges))]
    return float(rng.uniform(low, high))


def sample_variation(protocol: str, rng: np.random.Generator) -> Variation:
    domain = domain_of(protocol)
    if domain == "nominal":
        return Variation()
    if domain == "randomised":
        return Variation(
            domain=domain,
            elastic_mm=rng.uniform(1.0, 3.5), scale_range=(0.9, 1.1),
            proton_density=tuple(rng.uniform(0.85, 1.15, 4)), r2star=tuple(rng.uniform(0.8, 1.25, 4)),
            medullary_count=rng.uniform(0.5, 2.0), cortical_count=rng.uniform(0.5, 2.0),
            medullary_radius_mm=(0.3, float(rng.uniform(0.5, 0.8))),
            cortical_radius_mm=(0.4, float(rng.uniform(1.0, 1.8))),
            vein_chi_scale=rng.uniform(0.8, 1.4), vein_turn=rng.uniform(0.5, 2.0),
            lesion_chi_ppm=(0.2, 2.5), lesion_parts=int(rng.integers(1, 3)),
            vein_clearance_mm=rng.uniform(2.0, 4.0), lesion_separation_mm=rng.uniform(5.0, 8.0),
            bias_sd=rng.uniform(0.03, 0.11), noise_variation=rng.uniform(0.0, 0.35),
            gibbs_keep=1.0 if rng.random() < 0.5 else rng.uniform(0.7, 0.95),
            ghost=0.0 if rng.random() < 0.5 else rng.uniform(0.01, 0.05),
            homodyne_mm=rng.uniform(2.5, 5.5), swi_power=int(rng.integers(2, 5)),
            minip_slices=int(rng.integers(1, 3)), phase_sign=1,
        )
    return Variation(  # held-out: every knob beyond the randomised range, or a combination training never saw
        domain=domain,
        elastic_mm=rng.uniform(4.0, 5.0), scale_range=(0.85, 1.15),
        proton_density=tuple(_either(rng, [(0.7, 0.85), (1.15, 1.3)]) for _ in TISSUES),
        r2star=tuple(_either(rng, [(0.65, 0.8), (1.25, 1.45)]) for _ in TISSUES),
        medullary_count=rng.uniform(2.2, 3.0), cortical_count=rng.uniform(2.2, 3.0),
        medullary_radius_mm=(0.5, 1.0), cortical_radius_mm=(0.8, 2.2),
        vein_chi_scale=rng.uniform(1.45, 1.7), vein_turn=rng.uniform(2.2, 3.0),
        lesion_chi_ppm=(0.2, 2.5), lesion_parts=int(rng.integers(3, 5)),
        vein_clearance_mm=rng.uniform(1.0, 2.0), lesion_separation_mm=rng.uniform(5.0, 6.0),
        bias_sd=rng.uniform(0.12, 0.16), noise_variation=rng.uniform(0.4, 0.6),
        gibbs_keep=rng.uniform(0.55, 0.65), ghost=rng.uniform(0.06, 0.1),
        homodyne_mm=rng.uniform(6.0, 8.0), swi_power=int(rng.integers(5, 7)),
        minip_slices=int(rng.integers(3, 5)), phase_sign=-1,
    )


def sample_domain_acquisition(protocol: str, rng: np.random.Generator) -> Acquisition:
    """Acquisitions of the randomised and held-out domains (nominal ones: acquisition.sample_acquisition).

    Randomised: SWI only at 3 T, 3 T slices <= 2.5 mm, TE <= 30 ms at 3 T and <= 40 ms at 1.5 T, in-plane
    <= 1 mm, SNR >= 10. Held-out protocols each step outside those ranges.
    """
    if protocol == RANDOMISED_PROTOCOL:
        if rng.random() < 0.6:
            swi = rng.random() < 0.5
            in_plane = rng.uniform(0.45, 0.75) if swi else rng.uniform(0.5, 1.0)
            slices = rng.uniform(1.2, 2.5) if swi else rng.uniform(max(in_plane, 0.8), 2.5)
            return Acquisition(protocol, 3.0, rng.uniform(12, 30), (in_plane, in_plane, slices), swi,
                               rng.uniform(10, 40))
        in_plane = rng.uniform(0.6, 1.0)
        return Acquisition(protocol, 1.5, rng.uniform(20, 40), (in_plane, in_plane, rng.uniform(2.0, 5.0)), False,
                           rng.uniform(10, 35))
    if protocol == "ood-swi15t":  # SWI at 1.5 T, long TE
        in_plane = rng.uniform(0.6, 0.8)
        return Acquisition(protocol, 1.5, rng.uniform(40, 50), (in_plane, in_plane, rng.uniform(2.0, 3.0)), True,
                           rng.uniform(12, 20))
    if protocol == "ood-gre3t-thick":  # 3 T 2D GRE with thick slices and a long TE
        in_plane = rng.uniform(0.6, 0.8)
        return Acquisition(protocol, 3.0, rng.uniform(32, 40), (in_plane, in_plane, rng.uniform(3.0, 4.0)), False,
                           rng.uniform(15, 25))
    if protocol == "ood-gre15t-coarse":  # 1.5 T GRE, coarse in-plane, 4-5 mm slices, long TE, low SNR
        in_plane = rng.uniform(1.05, 1.2)
        return Acquisition(protocol, 1.5, rng.uniform(42, 50), (in_plane, in_plane, rng.uniform(4.0, 5.0)), False,
                           rng.uniform(9, 14))
    raise CMBError(f"not a domain protocol: {protocol}")


def sample_site(protocol: str, site_seed: int) -> tuple:
    """(Acquisition, Variation) of one site: drawn once from the site seed, the same for every scan of it."""
    rng = np.random.default_rng([site_seed, 11])
    acquisition = (sample_domain_acquisition(protocol, rng) if is_domain_protocol(protocol)
                   else sample_acquisition(protocol, rng))
    return acquisition, sample_variation(protocol, rng)  # a nominal protocol's Variation() draws nothing


def is_domain_protocol(protocol: str) -> bool:
    return protocol == RANDOMISED_PROTOCOL or protocol in HELD_OUT_PROTOCOLS
