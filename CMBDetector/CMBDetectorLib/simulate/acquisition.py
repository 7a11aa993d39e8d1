"""Acquisition protocols and their per-scan random variation.

Ranges follow common clinical protocols (see docs/simulator.md): 3 T SWI 0.5x0.5x2 mm TE ~20 ms;
3 T 3D GRE ~1 mm; 1.5 T 2D GRE T2* 1x1x(3-5) mm TE 25-40 ms. Thick slices are the known failure mode
of published detectors, so they are in every training and validation set.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..errors import CMBError


@dataclass(frozen=True)
class Acquisition:
    name: str
    b0_t: float
    te_ms: float
    spacing_mm: tuple
    swi: bool
    snr: float  # white-matter SNR of the magnitude for this voxel size (before the SWI mask)

    def to_dict(self) -> dict:
        record = asdict(self)
        record["spacing_mm"] = [float(v) for v in self.spacing_mm]
        return record


PROTOCOLS = ("swi3t", "gre3t", "gre15t")


def sample_acquisition(name: str, rng: np.random.Generator) -> Acquisition:
    """A protocol with realistic jitter in TE, voxel size and noise."""
    if name == "swi3t":
        in_plane = rng.uniform(0.45, 0.6)
        return Acquisition(name, 3.0, rng.uniform(18, 24), (in_plane, in_plane, rng.choice([1.5, 2.0, 2.0, 2.5])),
                           True, rng.uniform(14, 24))
    if name == "gre3t":
        size = rng.uniform(0.9, 1.1)
        return Acquisition(name, 3.0, rng.uniform(15, 25), (size, size, size), False, rng.uniform(20, 35))
    if name == "gre15t":
        in_plane = rng.uniform(0.9, 1.0)
        return Acquisition(name, 1.5, rng.uniform(25, 40), (in_plane, in_plane, rng.choice([3.0, 4.0, 5.0])),
                           False, rng.uniform(18, 30))
    raise CMBError(f"unknown acquisition '{name}': choose one of {', '.join(PROTOCOLS)} or 'mixed'")


def tissue_properties(b0_t: float) -> dict:
    """Proton density (relative) and R2* (1/s) per tissue; R2* scales about linearly with B0."""
    scale = b0_t / 3.0
    return {
        "gm": (0.86, 18.0 * (0.4 + 0.6 * scale)),
        "wm": (0.77, 21.0 * (0.4 + 0.6 * scale)),
        "csf": (1.00, 4.0),
        "blood": (0.85, 60.0 * scale),
        "scalp": (0.90, 30.0 * scale),
        "skull": (0.05, 300.0),
        "air": (0.0, 0.0),
    }
