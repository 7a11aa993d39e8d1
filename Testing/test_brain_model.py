"""The learned brain mask: its training command, its checked weights, its safety net, and the shipped
network on simulated heads of acquisitions it never trained on."""

from __future__ import annotations

import json
import shutil
from argparse import Namespace

import numpy as np
import pytest

from CMBDetectorLib import brain, brain_model
from CMBDetectorLib.errors import WeightsError
from CMBDetectorLib.simulate.synth import simulate_scan, write_scan
from CMBDetectorLib.train import train_brain
from CMBDetectorLib.weights import card_path, sha256_of
from helpers import flip_a_byte

TRAIN_SEEDS = (891, 892)  # not training (1-, 4-, 5-, 6xxxx), tuning (3-, 7xxxx) or bench (2xxxx) seeds


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    folder = tmp_path_factory.mktemp("brain-heads")
    for seed in TRAIN_SEEDS:
        write_scan(simulate_scan(seed, "gre15t", n_cmb=0), folder)
    return folder


def _args(data, out, **extra):
    values = dict(data=[str(data)], out=str(out), cache="", seed=3, steps=2, lr=1e-3, val_fraction=0.5, jobs=1,
                  threads=1)
    values.update(extra)
    return Namespace(**values)


def test_train_brain_writes_checked_reproducible_weights_with_card(heads, tmp_path):
    first, second = tmp_path / "a" / "brain.pt", tmp_path / "b" / "brain.pt"
    assert train_brain.run(_args(heads, first)) == 0
    assert train_brain.run(_args(heads, second, cache=str(first.parent / "brain_grid_cache"))) == 0  # cache reused
    assert sha256_of(first) == sha256_of(second)  # same seed, same weights
    model = brain_model.load_brain_model(first)
    card = model.card
    assert card["seed"] == 3 and card["command"].startswith("cmbdetector train-brain")
    assert "--steps 2" in card["command"]
    assert len(card["training_scans"]) == 1 and len(card["held_out_scans"]) == 1
    assert 0.0 <= card["held_out_grid_dice"]["min"] <= 1.0
    probability = model.probability(np.zeros(brain_model.GRID_SHAPE, np.float32))
    assert probability.shape == brain_model.GRID_SHAPE and np.all((probability >= 0) & (probability <= 1))


def test_corrupt_or_foreign_brain_weights_are_refused(tmp_path):
    weights = tmp_path / "brain_mask.pt"
    shutil.copy(brain_model.DEFAULT_BRAIN_MODEL, weights)
    shutil.copy(card_path(brain_model.DEFAULT_BRAIN_MODEL), card_path(weights))
    brain_model.load_brain_model(weights)  # an intact copy loads
    flip_a_byte(weights)
    with pytest.raises(WeightsError, match="do not match their model card"):
        brain_model.load_brain_model(weights)
    shutil.copy(brain_model.DEFAULT_BRAIN_MODEL, weights)
    card = json.loads(card_path(weights).read_text())
    card["architecture"] = dict(card["architecture"], channels=[8, 16, 32, 64])
    card_path(weights).write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="another architecture"):
        brain_model.load_brain_model(weights)


@pytest.fixture(scope="module")
def swi_head():
    return simulate_scan(893, "ood-swi15t")


@pytest.mark.parametrize("protocol,seed", [("ood-gre15t-coarse", 894), ("ood-swi15t", 893)])
def test_the_shipped_network_beats_the_intensity_edge_on_held_out_acquisitions(protocol, seed, swi_head):
    """Acquisitions no training head had: coarse 1.5 T GRE at TE 42-50 ms, and 1.5 T SWI with a strong phase
    mask whose dark cortex the intensity edge cuts off. The learned mask is closer to the true brain on
    both; on SWI it is still short of 0.95 (docs/benchmark.md)."""
    scan = swi_head if protocol == "ood-swi15t" else simulate_scan(seed, protocol)
    learned = brain.extract_brain(scan.magnitude)
    assert learned.method == "learned" and not any("disagreed" in warning for warning in learned.warnings)
    edge = brain.extract_brain(scan.magnitude, registration=learned.registration, model=None)
    assert edge.method == "registered"
    assert dice(learned.mask, scan.brain) > dice(edge.mask, scan.brain) + 0.004
    assert dice(learned.mask, scan.brain) >= (0.95 if protocol == "ood-gre15t-coarse" else 0.92)


def test_a_network_that_strays_from_the_template_is_not_trusted(swi_head):
    """The safety net: a network that sees no brain (here: a real U-Net whose last layer says 'outside'
    everywhere) is overruled by the registered template, with a warning that says so."""
    import torch

    network = brain_model.build_network().eval()
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.zero_()
        last_bias = [p for name, p in network.named_parameters() if name.endswith("bias")][-1]
        last_bias.fill_(-5.0)
    blind = brain_model.BrainModel(network, {}, "none")
    scan = swi_head
    extracted = brain.extract_brain(scan.magnitude, model=blind)
    assert extracted.method == "registered" and extracted.mask.sum() > 0
    assert any("learned brain mask disagreed" in warning for warning in extracted.warnings)
