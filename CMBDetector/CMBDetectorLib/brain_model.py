"""A learned brain mask on the MNI152 grid (issue: robust brain extraction).

The registration that places findings in the atlas (locate.register_to_mni) also carries the scan onto a
fixed 2 mm box in MNI space. There a small MONAI U-Net sees two channels: the scan's magnitude (divided by
its median inside the registered template hull, so no scale is assumed) and that hull itself (where a brain
should be). It answers where the brain is in this scan: the template's shape moved by the scan's own edges
where the anatomy differs, and kept where the contrast gives no edge (SWI's dark cortical rim, a 2D GRE's
faint top slices). It is trained on simulated heads with random contrasts, poses and artefacts
(train/train_brain.py), and its probability is carried back to the scan through the same registration.

Weights are checked against their card's SHA-256 before loading (weights.verified_card).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from .errors import WeightsError
from .grids import block_centres
from .image import Volume
from .weights import MODELS_DIR, load_state_dict, verified_card

DEFAULT_BRAIN_MODEL = MODELS_DIR / "brain_mask.pt"

GRID_MM = 2.0
GRID_SHAPE = (88, 104, 88)  # R, A, S; divisible by 8 for the U-Net's three halvings
GRID_ORIGIN_MNI = np.array([-87.0, -119.0, -79.0])  # centre of voxel (0, 0, 0): the template brain +-10 mm
INTENSITY_CLIP = 4.0  # scalp fat and marrow can be far brighter than the brain's median
ARCHITECTURE = {"in_channels": 2, "out_channels": 1, "channels": [16, 32, 64, 96], "strides": [2, 2, 2],
                "num_res_units": 1, "norm": "INSTANCE", "grid_mm": GRID_MM, "grid_shape": list(GRID_SHAPE)}


def build_network():
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, in_channels=ARCHITECTURE["in_channels"], out_channels=ARCHITECTURE["out_channels"],
                channels=ARCHITECTURE["channels"], strides=ARCHITECTURE["strides"],
                num_res_units=ARCHITECTURE["num_res_units"], norm=ARCHITECTURE["norm"])


def grid_points_mni() -> np.ndarray:
    """(N, 3) MNI RAS mm of the grid's voxel centres, in C order of GRID_SHAPE."""
    ijk = np.indices(GRID_SHAPE, dtype=np.float32).reshape(3, -1).T
    return ijk * GRID_MM + GRID_ORIGIN_MNI


def mni_to_grid_ijk(points_mni) -> np.ndarray:
    return (np.asarray(points_mni, dtype=float) - GRID_ORIGIN_MNI) / GRID_MM


@functools.lru_cache(maxsize=1)
def hull_on_mni_grid() -> np.ndarray:
    """The template brain hull (atlas.load_mni_brain_hull) on the grid, as a float32 fraction in [0, 1]."""
    from . import atlas

    hull = atlas.load_mni_brain_hull()
    smooth = ndimage.uniform_filter(hull.array.astype(np.float32), size=2)  # 1 mm -> 2 mm without aliasing
    ijk = hull.ras_to_ijk(grid_points_mni())
    values = ndimage.map_coordinates(smooth, ijk.T, order=1, cval=0.0)
    return values.reshape(GRID_SHAPE).astype(np.float32)


def coarse_to_grid(coarse: np.ndarray, factors, volume: Volume, registration) -> np.ndarray:
    """Values of a block-mean grid of `volume` (block sizes `factors`) at the MNI grid's voxels (0 off the scan)."""
    native_ijk = volume.ras_to_ijk(registration.to_scan(grid_points_mni()))
    coarse_ijk = (native_ijk + 0.5) / np.asarray(factors, float) - 0.5
    values = ndimage.map_coordinates(coarse.astype(np.float32), coarse_ijk.T, order=1, mode="constant", cval=0.0)
    return values.reshape(GRID_SHAPE)


def grid_to_coarse(grid_values: np.ndarray, volume: Volume, registration, factors) -> np.ndarray:
    """Values on the MNI grid sampled at the centres of the scan's factor-sized blocks (0 off the grid)."""
    coarse_shape, native_ijk = block_centres(volume.shape, factors)
    grid_ijk = mni_to_grid_ijk(registration.to_mni(volume.ijk_to_ras(native_ijk)))
    values = ndimage.map_coordinates(grid_values.astype(np.float32), grid_ijk.T, order=1, cval=0.0)
    return values.reshape(coarse_shape)


def network_input(scan_on_grid: np.ndarray) -> np.ndarray:
    """(2, *GRID_SHAPE) float32: the scan over its median inside the template hull, clipped; the hull."""
    hull = hull_on_mni_grid()
    inside = scan_on_grid[(hull > 0.5) & (scan_on_grid > 0)]
    level = float(np.median(inside)) if inside.size else 0.0
    scaled = np.clip(scan_on_grid / level, 0.0, INTENSITY_CLIP) if level > 0 else np.zeros_like(scan_on_grid)
    return np.stack([scaled, hull]).astype(np.float32)


@dataclass
class BrainModel:
    network: object
    card: dict
    sha256: str

    def probability(self, scan_on_grid: np.ndarray) -> np.ndarray:
        """Brain probability on the grid (float32, GRID_SHAPE) for a scan already carried onto it."""
        import torch

        with torch.inference_mode():
            logits = self.network(torch.from_numpy(network_input(scan_on_grid))[None])
        return torch.sigmoid(logits)[0, 0].numpy().astype(np.float32)


def load_brain_model(path=DEFAULT_BRAIN_MODEL) -> BrainModel:
    """The brain-mask network after its SHA-256 matched its card; WeightsError otherwise."""
    card, sha256 = verified_card(path, "brain mask model")
    if card.get("architecture") != ARCHITECTURE:
        raise WeightsError(f"brain mask weights {Path(path).name} were trained for another architecture")
    network = build_network()
    load_state_dict(network, path, "brain mask model")
    return BrainModel(network.eval(), card, sha256)


@functools.lru_cache(maxsize=2)
def shared_brain_model(path=DEFAULT_BRAIN_MODEL) -> BrainModel:
    """load_brain_model, once per process and path: every scan of a cohort or a Slicer session reuses it."""
    return load_brain_model(path)
