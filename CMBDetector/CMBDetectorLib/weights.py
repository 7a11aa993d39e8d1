"""Checked weights: a weights file is loaded only after its SHA-256 matches the model card beside it.

Every network here (stage 2, the YOLO stage, the brain mask) is a plain state dict read with
torch.load(weights_only=True): tensors only, no pickled code runs, and only once the hash matched.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import WeightsError

MODELS_DIR = Path(__file__).resolve().parents[1] / "Resources" / "Models"  # the shipped weights and their cards


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def card_path(weights_path) -> Path:
    return Path(weights_path).with_suffix(".json")


def read_card(card_file: Path, what: str, missing: str) -> dict:
    if not card_file.is_file():
        raise WeightsError(f"{what} {missing}: {card_file}")
    try:
        return json.loads(card_file.read_text())
    except ValueError as error:
        raise WeightsError(f"{what} {card_file.name} is not valid JSON: {error}") from None


def verified_card(weights_path, what: str = "model") -> tuple:
    """(card dict, SHA-256) of a weights file whose hash matches its model card; WeightsError otherwise."""
    weights_path = Path(weights_path)
    card_file = card_path(weights_path)
    if not weights_path.is_file():
        raise WeightsError(f"{what} weights not found: {weights_path}")
    card = read_card(card_file, f"{what} card", "not found beside the weights")
    actual = sha256_of(weights_path)
    if actual != card.get("sha256"):
        raise WeightsError(f"{what} weights {weights_path.name} do not match their model card "
                           f"(SHA-256 {actual[:12]}..., expected {str(card.get('sha256'))[:12]}...): "
                           "the file is corrupt or was replaced")
    return card, actual


def load_state_dict(network, weights_path, what: str = "model", convert=None) -> None:
    """torch.load(weights_only=True): tensors only, no pickled code runs. convert maps each tensor."""
    import torch

    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        network.load_state_dict({k: convert(v) for k, v in state.items()} if convert else state)
    except Exception as error:  # noqa: BLE001 - any failure here means unusable weights
        raise WeightsError(f"cannot load {what} weights {Path(weights_path).name}: {error}") from None
