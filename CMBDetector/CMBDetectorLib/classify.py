"""Stage 2: a small MONAI 3D CNN that scores a patch around each candidate.

Patches are sampled on a RAS-aligned grid of PATCH_SIZE^3 points, PATCH_MM apart, whatever the scan's
orientation and voxel size (the dipole pattern of a lesion is tied to B0, i.e. to the scanner z axis).
Channel 0: normalised magnitude, anatomy outside the brain mask kept (Prepared.unmasked); channel 1:
high-pass phase / pi, or zeros when no phase was given (the network is trained with phase dropped at
random, so it works with magnitude alone).

Weights are a plain state_dict loaded with torch.load(weights_only=True) only after their SHA-256
matches the model card shipped beside them: no arbitrary pickle is ever executed. The shipped model is
an ensemble card (DEFAULT_MODEL, .json) naming member weights by file and SHA-256: a patch's score is the
mean of the members' probabilities, and the operating threshold in that card was chosen for the mean.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from .errors import InputError, WeightsError
from .preprocess import Prepared
from .weights import MODELS_DIR, load_state_dict, read_card, verified_card

PATCH_SIZE = 20
PATCH_MM = 0.8
DEFAULT_MODEL = MODELS_DIR / "cmb_cnn_ensemble.json"  # what the pipeline loads: the card of the members below
DEFAULT_WEIGHTS = MODELS_DIR / "cmb_cnn.pt"  # one trained network (what `cmbdetector train` writes by default)
ARCHITECTURE = {"in_shape": [2, PATCH_SIZE, PATCH_SIZE, PATCH_SIZE], "classes": 1,
                "channels": [16, 32, 64], "strides": [2, 2, 2], "num_res_units": 1, "norm": "BATCH"}


def patch_offsets_mm() -> np.ndarray:
    """(P, P, P, 3) RAS offsets of the patch grid around its centre."""
    axis = (np.arange(PATCH_SIZE) - (PATCH_SIZE - 1) / 2) * PATCH_MM
    return np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1)


def extract_patches(prepared: Prepared, centres_ras: np.ndarray, use_phase: bool = True) -> np.ndarray:
    """float32 (N, 2, P, P, P) patches around RAS centres (trilinear, zero outside the image).

    use_phase False leaves channel 1 at zero, as for a scan without phase."""
    centres_ras = np.atleast_2d(np.asarray(centres_ras, float))
    patches = np.zeros((len(centres_ras), 2, PATCH_SIZE, PATCH_SIZE, PATCH_SIZE), np.float32)
    if len(centres_ras) == 0:
        return patches
    inverse = np.linalg.inv(prepared.volume.affine)
    # voxel coordinates are affine in RAS: transform the centres and the patch grid once each, then add
    offsets_ijk = (patch_offsets_mm().reshape(-1, 3) @ inverse[:3, :3].T).T  # (3, P^3)
    centres_ijk = (centres_ras @ inverse[:3, :3].T + inverse[:3, 3]).T  # (3, N)
    shape = (PATCH_SIZE, PATCH_SIZE, PATCH_SIZE)
    for start in range(0, len(centres_ras), 256):
        chunk = centres_ijk[:, start:start + 256]
        ijk = (chunk[:, :, None] + offsets_ijk[:, None, :]).reshape(3, -1)
        patches[start:start + chunk.shape[1], 0] = ndimage.map_coordinates(
            prepared.unmasked, ijk, order=1, mode="constant", cval=0.0).reshape((-1,) + shape)
        if use_phase and prepared.phase is not None:
            patches[start:start + chunk.shape[1], 1] = ndimage.map_coordinates(
                prepared.phase, ijk, order=1, mode="constant", cval=0.0).reshape((-1,) + shape) / np.pi
    return patches


def build_model():
    from monai.networks.nets import Classifier

    return Classifier(in_shape=ARCHITECTURE["in_shape"], classes=ARCHITECTURE["classes"],
                      channels=ARCHITECTURE["channels"], strides=ARCHITECTURE["strides"],
                      num_res_units=ARCHITECTURE["num_res_units"], norm=ARCHITECTURE["norm"])


@dataclass
class LoadedModel:
    networks: list  # one network, or an ensemble's members (their probabilities are averaged)
    card: dict
    sha256: str  # of the weights file; of an ensemble, `ensemble_digest` of its members
    device: str


def ensemble_digest(member_sha256: list) -> str:
    """An ensemble's identity: SHA-256 over its members' SHA-256s in order (stable when its card is rewritten)."""
    return hashlib.sha256("\n".join(member_sha256).encode()).hexdigest()


def load_model(path=DEFAULT_MODEL, device: str = "cpu") -> LoadedModel:
    """Stage-2 weights (.pt) after checking them against the SHA-256 in the model card beside them, or an
    ensemble card (.json) whose members are each checked against both their own card and the ensemble's."""
    path = Path(path)
    if path.suffix == ".json":
        return _load_ensemble(path, device)
    card, actual = verified_card(path)
    if card.get("architecture") != ARCHITECTURE:
        raise WeightsError(f"weights {path.name} were trained for another architecture")
    network = build_model()
    load_state_dict(network, path)
    device = resolve_device(device)
    network.to(device).eval()
    return LoadedModel([network], card, actual, device)


def read_ensemble_card(card_file) -> dict:
    """An ensemble card whose recorded identity matches the member hashes it lists; WeightsError otherwise."""
    card_file = Path(card_file)
    card = read_card(card_file, "model ensemble card", "not found")
    members = card.get("members")
    if not isinstance(members, list) or not members or not all(
            isinstance(m, dict) and str(m.get("file", "")).endswith(".pt") and m.get("sha256") for m in members):
        raise WeightsError(f"ensemble card {card_file.name} must list member .pt files with their SHA-256")
    if card.get("sha256") != ensemble_digest([m["sha256"] for m in members]):
        raise WeightsError(f"ensemble card {card_file.name} does not match the member hashes it lists: "
                           "it was edited after its threshold was tuned")
    return card


def _load_ensemble(card_file: Path, device: str) -> LoadedModel:
    card = read_ensemble_card(card_file)
    networks = []
    for member in card["members"]:
        loaded = load_model(card_file.parent / member["file"], device)
        if loaded.sha256 != member["sha256"]:
            raise WeightsError(f"ensemble member {member['file']} is not the network {card_file.name} was tuned "
                               f"with (SHA-256 {loaded.sha256[:12]}..., expected {member['sha256'][:12]}...)")
        networks += loaded.networks
    return LoadedModel(networks, card, card["sha256"], resolve_device(device))


def choose_device(requested: str | None = "auto"):
    """(device to run on, warning or None) for a requested device name.

    auto: the CUDA GPU when torch sees one, else the CPU. cuda / cuda:N without that GPU: the CPU, with a
    warning that names it (the fallback the Slicer panel promises). Any other name: InputError.
    """
    import torch

    name = str(requested or "auto").strip().lower()
    if name == "auto":
        return ("cuda" if torch.cuda.is_available() else "cpu"), None
    if name == "cpu":
        return "cpu", None
    if re.fullmatch(r"cuda(:\d+)?", name):
        index = int(name.partition(":")[2] or 0)
        if torch.cuda.is_available() and index < torch.cuda.device_count():
            return name, None
        return "cpu", f"device {name} is not available (no such CUDA GPU); running on the CPU"
    raise InputError(f"unknown device {requested!r}: use auto, cpu or cuda")


def resolve_device(device: str) -> str:
    """The device a model is loaded onto (choose_device, without its warning)."""
    return choose_device(device)[0]


VIEWS = 8  # test-time augmentation: mean over the in-plane turns and flips (B0 stays along z)


def in_plane_views(patches: np.ndarray, count: int = VIEWS):
    """The first `count` of the 8 turns/flips about z of (N, C, X, Y, Z) patches, under which a
    microbleed's dipole pattern is unchanged (the training augmentation uses the same group)."""
    for index in range(count):
        view = np.rot90(patches, k=index // 2, axes=(2, 3))
        yield np.ascontiguousarray(view[:, :, ::-1] if index % 2 else view)


# Patches per forward pass. On CPU, small batches stay in cache: 64 ran 1.7x faster than 256 on 2 cores
# (same outputs; tools/profile_detector.py), and every view of a batch runs before the next batch.
BATCH_SIZE = 64


def probabilities(network, patches: np.ndarray, device: str = "cpu", views: int = VIEWS,
                  batch_size: int = BATCH_SIZE) -> np.ndarray:
    """Mean sigmoid output (float32, N) of an eval-mode network over `views` in-plane views."""
    return mean_probabilities([network], patches, device, views, batch_size)


def score_patches(model: LoadedModel, patches: np.ndarray, batch_size: int = BATCH_SIZE) -> np.ndarray:
    """Probability (float32, N) that each patch is centred on a microbleed: mean over the in-plane views
    the model card names (1 for cards without the entry) and over an ensemble's members."""
    return mean_probabilities(model.networks, patches, model.device, int(model.card.get("test_time_views", 1)),
                              batch_size)


def mean_probabilities(networks: list, patches: np.ndarray, device: str = "cpu", views: int = VIEWS,
                       batch_size: int = BATCH_SIZE) -> np.ndarray:
    """Mean sigmoid output (float32, N) over eval-mode networks (an ensemble's members) and `views` in-plane
    views; each view of a batch is built once for all members."""
    import torch

    views = max(views, 1)
    total = np.zeros(len(patches), np.float64)
    with torch.inference_mode():
        for start in range(0, len(patches), batch_size):
            stop = min(start + batch_size, len(patches))
            for view in in_plane_views(patches[start:stop], views):
                batch = torch.from_numpy(view.astype(np.float32, copy=False)).to(device)
                for network in networks:
                    total[start:stop] += torch.sigmoid(network(batch)[:, 0]).double().cpu().numpy()
    return (total / (views * max(len(networks), 1))).astype(np.float32)
