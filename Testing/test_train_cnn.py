"""`cmbdetector train` (stage-2 CNN): hard-example sampling, a short real run, its card and reproducibility."""

from __future__ import annotations

import shutil
from argparse import Namespace

import numpy as np
import pytest

from CMBDetectorLib import classify, weights
from CMBDetectorLib.simulate.synth import simulate_scan, write_scan
from CMBDetectorLib.train import train_cnn, tuning

TRAIN_TEST_SEEDS = (881, 882, 883, 884)  # not training (1-, 4-, 5-, 6xxxx), tuning (3-, 7xxxx) or bench (2xxxx)


def test_hard_weights_favour_what_the_network_gets_wrong():
    labels = np.array([1, 1, 1, 0, 0, 0])
    scores = np.array([0.99, 0.5, 0.01, 0.01, 0.5, 0.99])
    weights = train_cnn.hard_weights(scores, labels)
    assert weights[labels == 1].sum() == pytest.approx(1.0)
    assert weights[labels == 0].sum() == pytest.approx(1.0)
    assert weights[2] > weights[1] > weights[0] > 0  # a missed positive is drawn most, an easy one still drawn
    assert weights[5] > weights[4] > weights[3] > 0  # a confident false positive is drawn most


def test_hard_weights_fall_back_to_uniform_when_nothing_is_wrong():
    labels = np.array([1, 1, 0, 0])
    weights = train_cnn.hard_weights(np.array([1.0, 1.0, 0.0, 0.0]), labels)
    assert np.allclose(weights, 0.5)


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train-scans")
    for seed in TRAIN_TEST_SEEDS:
        write_scan(simulate_scan(seed, "gre15t", n_cmb=3), folder)
    return folder


def _args(data, out, **extra):
    values = dict(data=str(data), out=str(out), seed=5, steps=12, mine_every=5, val_fraction=0.25, hold_out="",
                  jobs=1, threads=1, card_only=False, tune_data=[], ensemble="", init="", lr=2e-3,
                  data_extra=[])
    values.update(extra)
    return Namespace(**values)


def _held_out(scans) -> str:
    return sorted(scans.glob("*.truth.json"))[0].name.replace(".truth.json", "")


@pytest.fixture(scope="module")
def member(scans, tmp_path_factory):
    """One short real run (seed 5, 12 steps, the first scan held out), shared by the tests below, each of which
    works on its own copy: a run costs about a minute here, mostly the pipeline's preprocessing of 4 scans."""
    out = tmp_path_factory.mktemp("member") / "cnn_a.pt"
    assert train_cnn.run(_args(scans, out, hold_out=_held_out(scans))) == 0
    return out


def _copy(weights, folder):
    """The weights and their card, copied into `folder` under the same names."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in (weights, weights.with_suffix(".json")):
        shutil.copyfile(path, folder / path.name)
    return folder / weights.name


def test_train_writes_verified_weights_with_card_and_is_reproducible(scans, member, tmp_path):
    first, second = _copy(member, tmp_path / "a"), tmp_path / "b" / "cnn_a.pt"
    assert train_cnn.run(_args(scans, second, hold_out=_held_out(scans))) == 0
    model = classify.load_model(first)  # the hash in the card matches: loadable by the pipeline
    card = model.card
    assert card["seed"] == 5 and "--mine-every 5" in card["command"]
    assert len(card["training_data"]["held_out"]) == 1 and len(card["training_data"]["scans"]) == 3
    assert card["training_data"]["positive_patches"] > 0
    assert 0.0 <= card["operating_threshold"] <= 1.0
    assert card["metrics"]["held_out_scans"] == 1
    assert card["test_time_views"] == classify.VIEWS == card["metrics"]["test_time_views"]
    assert weights.sha256_of(first) == weights.sha256_of(second)  # same seed, same weights

    # --card-only redoes the card's metrics for the same bytes and records how
    card_file = first.with_suffix(".json")
    card_file.write_text(card_file.read_text().replace('"test_time_views": 8', '"test_time_views": 1'))
    assert train_cnn.run(_args(scans, first, hold_out=_held_out(scans), card_only=True)) == 0
    rewritten = classify.load_model(first).card
    assert rewritten["test_time_views"] == classify.VIEWS and "--card-only" in rewritten["card_command"]
    assert rewritten["sha256"] == card["sha256"] and rewritten["training_data"] == card["training_data"]


def test_fine_tuning_starts_from_verified_weights_and_records_them(scans, member, tmp_path):
    from CMBDetectorLib.errors import WeightsError

    base, tuned = _copy(member, tmp_path / "base"), tmp_path / "tuned" / "cnn.pt"
    assert train_cnn.run(_args(scans, tuned, steps=4, init=str(base), lr=1e-4)) == 0
    card = classify.load_model(tuned).card
    assert card["initialised_from"] == {"file": "cnn_a.pt", "sha256": weights.sha256_of(base)}
    assert f"--init {base} --lr 0.0001" in card["command"]
    assert weights.sha256_of(tuned) != weights.sha256_of(base)
    base.write_bytes(base.read_bytes()[:-8] + b"\0" * 8)  # a tampered start is refused before any training
    with pytest.raises(WeightsError, match="do not match their model card"):
        train_cnn.run(_args(scans, tmp_path / "again.pt", steps=4, init=str(base)))


def test_ensemble_card_averages_members_tuned_on_scans_none_trained_on(scans, member, tmp_path):
    from CMBDetectorLib.errors import CMBError

    held_out = _held_out(scans)
    members = [_copy(member, tmp_path), tmp_path / "cnn_b.pt"]  # two seeds, one held-out scan, as the shipped
    assert train_cnn.run(_args(scans, members[1], seed=6, hold_out=held_out)) == 0
    ensemble_file = tmp_path / "ensemble.json"
    members_arg = ",".join(str(m) for m in members)
    assert train_cnn.run(_args(scans, ensemble_file, hold_out=held_out, ensemble=members_arg)) == 0
    ensemble = classify.load_model(ensemble_file)
    assert [m["file"] for m in ensemble.card["members"]] == ["cnn_a.pt", "cnn_b.pt"]
    assert len(ensemble.networks) == 2 and 0.0 <= ensemble.card["operating_threshold"] <= 1.0
    assert ensemble.card["operating_threshold_tuning"]["scans"] == [held_out]
    assert f"--ensemble {members_arg}" in ensemble.card["command"]
    # Tuning on scans a member trained on is refused.
    with pytest.raises(CMBError, match="trained on 3 of the tuning scans"):
        train_cnn.run(_args(scans, ensemble_file, hold_out=held_out, ensemble=members_arg, tune_data=[str(scans)]))


def test_in_plane_views_are_the_eight_turns_and_flips_about_z():
    patches = np.random.default_rng(0).random((2, 2, 5, 5, 3))
    views = list(classify.in_plane_views(patches))
    assert len({view.tobytes() for view in views}) == 8
    for view in views:
        np.testing.assert_allclose(view.sum(axis=(2, 3)), patches.sum(axis=(2, 3)))  # z and channels untouched


def test_hold_out_must_name_scans_in_the_folder(scans, tmp_path):
    from CMBDetectorLib.errors import CMBError

    with pytest.raises(CMBError, match="--hold-out"):
        train_cnn.run(_args(scans, tmp_path / "cnn.pt", hold_out="not_a_scan"))


def test_operating_threshold_is_the_most_sensitive_within_the_fp_budget():
    points = {"0.10": {"sensitivity": 0.97, "fp_per_scan": 1.2}, "0.30": {"sensitivity": 0.93, "fp_per_scan": 0.25},
              "0.50": {"sensitivity": 0.93, "fp_per_scan": 0.1}, "0.90": {"sensitivity": 0.8, "fp_per_scan": 0.0}}
    assert tuning.choose_threshold(points, fp_budget=0.3) == 0.5  # 0.10 is over budget; 0.5 ties 0.3 with fewer FP
    assert tuning.choose_threshold(points, fp_budget=2.0) == 0.1
