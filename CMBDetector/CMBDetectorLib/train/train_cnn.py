"""`cmbdetector train`: fit the stage-2 CNN on simulated scans and write weights plus model card.

Reproducible: a fixed seed drives the scan split, the patch sampling, the augmentation and torch's
initialisation; torch runs single-process-deterministic on the CPU. The model card records the exact
command, the seed, the data and the metrics on scans never used for fitting.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

import numpy as np

from .. import __version__
from ..classify import (ARCHITECTURE, DEFAULT_WEIGHTS, VIEWS, build_model, ensemble_digest, load_model,
                        mean_probabilities, probabilities)
from ..errors import CMBError
from ..weights import card_path, load_state_dict, sha256_of, verified_card
from . import dataset, tuning
from .tuning import FP_BUDGET


def add_arguments(parser) -> None:
    parser.add_argument("--data", required=True, help="folder of simulated scans (cmbdetector synth)")
    parser.add_argument("--out", default=str(DEFAULT_WEIGHTS), help="weights file to write (.pt); card beside it "
                        "(with --ensemble: the ensemble card, .json)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=2500, help="optimiser steps (batch of 64)")
    parser.add_argument("--val-fraction", type=float, default=0.15, help="scans held out for the card's metrics")
    parser.add_argument("--hold-out", default="", help="comma-separated scan names to hold out instead of a "
                        "random --val-fraction (e.g. scans the YOLO stage never saw)")
    parser.add_argument("--mine-every", type=int, default=1000, help="re-score the training patches every this "
                        "many steps and draw the hard ones more often (0: uniform sampling)")
    parser.add_argument("--card-only", action="store_true", help="keep the weights at --out; recompute the "
                        "held-out metrics and operating threshold with the pipeline's scoring and rewrite the card")
    parser.add_argument("--tune-data", action="append", default=[], help="folder of extra simulated scans, never "
                        "trained on, for choosing the operating threshold with the held-out ones (repeatable; "
                        "never the benchmark set)")
    parser.add_argument("--ensemble", default="", help="comma-separated trained weights (.pt, cards beside them, "
                        "in the folder of --out): train nothing; write the ensemble card --out that averages them, "
                        "its threshold chosen as --card-only does, on scans none of them trained on")
    parser.add_argument("--init", default="", help="start from these trained weights (.pt, checked against its "
                        "card) instead of a random initialisation: fine-tuning, e.g. on domain-randomised scans")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the one-cycle schedule")
    parser.add_argument("--data-extra", action="append", default=[],
                        help="another folder of training scans (repeatable); --hold-out and --val-fraction "
                             "apply to --data only")
    parser.add_argument("--jobs", type=int, default=2, help="processes for building patches")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")


def augment(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flips in x and y, 90-degree turns about z (B0 stays along z), intensity scale, phase dropout."""
    out = batch.astype(np.float32).copy()
    for index in range(len(out)):
        patch = out[index]
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
        if rng.random() < 0.5:
            patch = patch[:, :, ::-1]
        patch = np.rot90(patch, k=int(rng.integers(4)), axes=(1, 2))
        patch = patch.copy()
        patch[0] *= rng.uniform(0.85, 1.15)
        patch[0] += rng.normal(0, 0.03, patch[0].shape)
        if rng.random() < 0.35:
            patch[1] = 0.0
        out[index] = patch
    return out


def score_all(network, patches: np.ndarray, views: int = 1) -> np.ndarray:
    """Probabilities for float16 patches, in eval mode (leaves the network there); views > 1 averages
    the in-plane test-time views exactly as the pipeline does."""
    network.eval()
    return probabilities(network, patches, "cpu", views)


HARD_FLOOR = 0.2  # every patch keeps this share of the uniform sampling weight


def hard_weights(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Sampling weights that favour the patches the network gets wrong: a positive with a low score,
    a negative with a high one (small lobar lesions at the brain edge, veins that look like dots).
    Normalised within each class; the floor keeps the easy ones in play."""
    error = np.where(labels == 1, 1.0 - scores, scores).astype(np.float64)
    weights = np.zeros(len(scores))
    for value in (0, 1):
        members = labels == value
        total = error[members].sum()
        if total > 0:
            weights[members] = (1 - HARD_FLOOR) * error[members] / total + HARD_FLOOR / members.sum()
        elif members.any():
            weights[members] = 1.0 / members.sum()
    return weights


def fit(network, patches: np.ndarray, labels: np.ndarray, steps: int, lr: float, rng: np.random.Generator,
        mine_every: int = 0, started: float | None = None, positives_per_batch: int = 24,
        negatives_per_batch: int = 40, should_stop=None, freeze_batchnorm: bool = False) -> None:
    """Train `network` in place on (N, 2, P, P, P) patches with 0/1 labels: AdamW, one-cycle LR, batches of
    positives and negatives (drawn with replacement), the augmentation above, hard-example mining every
    `mine_every` steps. `train` and `finetune` both train through here. Leaves the network in eval mode.
    should_stop: called each step; True ends training early (a cancelled fine-tune).
    freeze_batchnorm: keep the BatchNorm running statistics as they are (a fine-tune: batches a third
    positive from one site would otherwise replace statistics learnt on the whole training domain)."""
    import torch

    started = time.time() if started is None else started
    positives, negatives = np.nonzero(labels == 1)[0], np.nonzero(labels == 0)[0]
    if len(positives) == 0 or len(negatives) == 0:
        raise CMBError("training needs positive and negative patches")
    optimiser = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=max(steps, 1))
    loss_function = torch.nn.BCEWithLogitsLoss()

    def training_mode():
        network.train()
        if freeze_batchnorm:
            for module in network.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.eval()

    training_mode()
    running = 0.0
    positive_weights = negative_weights = None  # uniform until the first mining pass
    for step in range(1, steps + 1):
        if should_stop is not None and should_stop():
            break
        if mine_every and step > 1 and (step - 1) % mine_every == 0:
            weights = hard_weights(score_all(network, patches), labels)
            positive_weights, negative_weights = weights[positives], weights[negatives]
            training_mode()
        batch_index = np.concatenate([rng.choice(positives, positives_per_batch, p=positive_weights),
                                      rng.choice(negatives, negatives_per_batch, p=negative_weights)])
        batch = torch.from_numpy(augment(patches[batch_index], rng))
        target = torch.from_numpy(labels[batch_index].astype(np.float32))
        loss = loss_function(network(batch)[:, 0], target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        running = 0.98 * running + 0.02 * loss.item() if step > 1 else loss.item()
        if step % 100 == 0 or step == steps:
            print(f"step {step}/{steps} loss {running:.4f} ({time.time() - started:.0f} s)", flush=True)
    network.eval()


def _stack(items, attribute):
    return np.concatenate([getattr(item, attribute) for item in items])


THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def operating_points(scores, labels, items) -> dict:
    """Per-lesion sensitivity and FP/scan over held-out scans, as if every candidate were reported."""
    results = {}
    n_scans = len(items)
    n_cmb = sum(item.n_microbleeds for item in items)
    for threshold in THRESHOLDS:
        fp = int(((scores >= threshold) & (labels == 0)).sum())
        offset = 0
        detected = 0
        for item in items:
            n = len(item.labels)
            item_scores, item_labels = scores[offset:offset + n], labels[offset:offset + n]
            offset += n
            # positives are candidates near a true CMB; count lesions, not candidates (upper bound: found)
            detected += min(item.n_found_by_stage1, int(((item_scores >= threshold) & (item_labels == 1)).sum()))
        results[f"{threshold:.2f}"] = {"sensitivity": round(detected / max(n_cmb, 1), 4),
                                       "fp_per_scan": round(fp / max(n_scans, 1), 3)}
    return results


def lesion_operating_points(networks: list, files: list) -> dict:
    """Per-lesion sensitivity and FP/scan of the CNN alone (the mean over `networks`), pipeline rules (merge,
    one-to-one 5 mm matching, CMB-free scans included), at each threshold, on whole scans never trained on."""
    for network in networks:
        network.eval()
    scans = tuning.score_held_out(files, lambda patches: mean_probabilities(networks, patches, "cpu", VIEWS))
    return {f"{t:.2f}": tuning.lesion_counts(scans, [s.cnn for s in scans], t) for t in THRESHOLDS}


def held_out_metrics(network, val_items: list) -> dict:
    """Stage-1 recall, candidates per scan and operating points on the held-out scans, scored as the
    pipeline scores (VIEWS in-plane views)."""
    val_patches, val_labels = _stack(val_items, "patches"), _stack(val_items, "labels")
    val_scores = score_all(network, val_patches, VIEWS)
    n_cmb = max(1, sum(i.n_microbleeds for i in val_items))
    return {
        "held_out_scans": len(val_items),
        "held_out_microbleeds": sum(i.n_microbleeds for i in val_items),
        "stage1_recall_held_out": round(sum(i.n_found_by_stage1 for i in val_items) / n_cmb, 4),
        "candidates_per_scan_held_out": round(len(val_labels) / len(val_items), 1),
        "test_time_views": VIEWS,
        "operating_points_held_out": operating_points(val_scores, val_labels, val_items),
    }


def _command(args, card_only: bool = False) -> str:
    return (f"cmbdetector train --data {shlex.quote(str(args.data))} --out {shlex.quote(str(args.out))} "
            f"--seed {args.seed} --steps {args.steps} --mine-every {args.mine_every} "
            f"--val-fraction {args.val_fraction}"
            + "".join(f" --data-extra {shlex.quote(str(folder))}" for folder in args.data_extra)
            + (f" --init {shlex.quote(str(args.init))}" if args.init else "") + f" --lr {args.lr}"
            + (f" --hold-out {shlex.quote(args.hold_out)}" if args.hold_out else "")
            + "".join(f" --tune-data {shlex.quote(str(folder))}" for folder in args.tune_data)
            + (f" --ensemble {shlex.quote(args.ensemble)}" if args.ensemble else "")
            + (" --card-only" if card_only else ""))


def run(args) -> int:
    import torch

    started = time.time()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    files = dataset.truth_files(args.data)
    if len(files) < 4:
        raise CMBError(f"need at least 4 simulated scans in {args.data}, found {len(files)}")
    train_files, val_files = tuning.split_scans(files, rng, args.val_fraction, args.hold_out, args.data)
    out = Path(args.out)
    if args.ensemble:
        return _write_ensemble_card(args, out, val_files, started)
    if args.card_only:
        return _rewrite_card(args, out, val_files, started)
    initialised_from = None
    if args.init:  # checked before any work: a fine-tune must start from the weights its card names
        _, init_sha256 = verified_card(args.init, "initial weights (--init)")
        initialised_from = {"file": Path(args.init).name, "sha256": init_sha256}
    for folder in args.data_extra:
        train_files += dataset.truth_files(folder)
    print(f"building patches: {len(train_files)} training scans, {len(val_files)} held-out scans", flush=True)
    train_items = dataset.build(train_files, args.seed, keep_all=False, jobs=args.jobs)
    val_items = dataset.build(val_files, args.seed + 100000, keep_all=True, jobs=args.jobs)
    patches, labels = _stack(train_items, "patches"), _stack(train_items, "labels")
    positives, negatives = np.nonzero(labels == 1)[0], np.nonzero(labels == 0)[0]
    if len(positives) == 0 or len(negatives) == 0:
        raise CMBError("the training scans gave no positive or no negative patches")
    stage1_recall = sum(i.n_found_by_stage1 for i in train_items) / max(1, sum(i.n_microbleeds for i in train_items))
    print(f"{len(positives)} positive and {len(negatives)} negative patches; stage-1 recall on training "
          f"scans {stage1_recall:.3f} ({time.time() - started:.0f} s)", flush=True)

    torch.manual_seed(args.seed)  # again: building patches may load the brain-mask network, which draws from it
    network = build_model()
    if args.init:
        load_state_dict(network, args.init, "initial weights (--init)")
    fit(network, patches, labels, args.steps, args.lr, rng, args.mine_every, started)

    metrics = held_out_metrics(network, val_items)
    threshold, tuning_record = _operating_threshold([network], val_files, args)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), out)
    card = {
        "name": "CMBDetector stage-2 3D CNN",
        "version": __version__,
        "file": out.name,
        "sha256": sha256_of(out),
        "architecture": ARCHITECTURE,
        "framework": f"MONAI Classifier, torch {torch.__version__}",
        "command": _command(args),
        "seed": args.seed,
        "steps": args.steps,
        "initialised_from": initialised_from,
        "training_data": {
            "source": "simulated scans (cmbdetector synth), MNI152 2009 anatomy; no real labelled data",
            "scans": [f.name for f in train_files],
            "held_out": [f.name for f in val_files],
            "positive_patches": int(len(positives)),
            "negative_patches": int(len(negatives)),
        },
        "metrics": metrics,
        "test_time_views": VIEWS,
        "operating_threshold": threshold,
        "operating_threshold_rule": OPERATING_RULE,
        "operating_threshold_tuning": tuning_record,
        "training_seconds": round(time.time() - started, 1),
        "limits": [
            "trained only on simulated GRE/SWI; real-scan performance is unmeasured (no labelled real data here)",
            "patch-level scores; final per-lesion numbers come from `make bench`",
        ],
    }
    card_path(out).write_text(json.dumps(card, indent=2))
    print(json.dumps(metrics, indent=2))
    print(f"wrote {out} and {card_path(out)}")
    return 0


OPERATING_RULE = (f"per-lesion, pipeline matching, on the held-out scans plus --tune-data: the highest "
                  f"sensitivity at <= {FP_BUDGET} FP/scan; among equals the highest threshold")


def _tuning_files(val_files: list, args) -> list:
    files = list(val_files)
    for folder in args.tune_data:
        files += dataset.truth_files(folder)
    return files


def _operating_threshold(networks: list, val_files: list, args) -> tuple:
    files = _tuning_files(val_files, args)
    print(f"choosing the operating threshold on {len(files)} scans never trained on", flush=True)
    points = lesion_operating_points(networks, files)
    record = {"scans": [Path(f).name.replace(".truth.json", "") for f in files],
              "tune_data": [str(folder) for folder in args.tune_data], "points": points}
    return tuning.choose_threshold(points), record


def _rewrite_card(args, out: Path, val_files: list, started: float) -> int:
    """--card-only: the weights stay byte-identical (same SHA-256); metrics, views and threshold are redone."""
    card_file = card_path(out)
    if not out.is_file() or not card_file.is_file():
        raise CMBError(f"--card-only needs existing weights and card at {out}")
    card = json.loads(card_file.read_text())
    if card.get("sha256") != sha256_of(out):
        raise CMBError(f"--card-only: {out.name} does not match its card; retrain instead")
    network = build_model()
    load_state_dict(network, out)
    val_items = dataset.build(val_files, args.seed + 100000, keep_all=True, jobs=args.jobs)
    metrics = held_out_metrics(network, val_items)
    threshold, tuning_record = _operating_threshold([network], val_files, args)
    card.update(metrics=metrics, test_time_views=VIEWS, operating_threshold=threshold, operating_threshold_rule=OPERATING_RULE,
                operating_threshold_tuning=tuning_record, card_command=_command(args, card_only=True))
    card_file.write_text(json.dumps(card, indent=2))
    print(json.dumps(metrics, indent=2))
    print(f"rewrote {card_file} ({time.time() - started:.0f} s)")
    return 0


def _write_ensemble_card(args, out: Path, val_files: list, started: float) -> int:
    """--ensemble: the card of several trained networks whose mean probability is the stage-2 score."""
    members = [Path(p.strip()) for p in args.ensemble.split(",") if p.strip()]
    if len(members) < 2:
        raise CMBError("--ensemble needs at least two weights files")
    if out.suffix != ".json" or any(m.parent.resolve() != out.parent.resolve() for m in members):
        raise CMBError("--ensemble writes a .json card (--out) in the folder of its member weights")
    loaded = [load_model(member) for member in members]  # each checked against its own card
    tuning_names = {Path(f).name for f in _tuning_files(val_files, args)}
    for member, model in zip(members, loaded):
        seen = tuning_names & set(model.card.get("training_data", {}).get("scans", []))
        if seen:
            raise CMBError(f"{member.name} was trained on {len(seen)} of the tuning scans (e.g. {sorted(seen)[0]}): "
                           "the threshold would be chosen on data it has seen")
    threshold, tuning_record = _operating_threshold([n for m in loaded for n in m.networks], val_files, args)
    hashes = [m.sha256 for m in loaded]
    card = {
        "name": "CMBDetector stage-2 3D CNN ensemble",
        "version": __version__,
        "members": [{"file": member.name, "sha256": digest} for member, digest in zip(members, hashes)],
        "sha256": ensemble_digest(hashes),
        "combine": "mean of the members' probabilities, each over the test-time views",
        "architecture": ARCHITECTURE,
        "command": _command(args),
        "training_data": {"held_out": [f.name for f in val_files],
                          "note": "each member's card lists its training scans; none is a tuning scan"},
        "test_time_views": VIEWS,
        "operating_threshold": threshold,
        "operating_threshold_rule": OPERATING_RULE,
        "operating_threshold_tuning": tuning_record,
        "limits": [
            "members trained only on simulated GRE/SWI; real-scan performance is unmeasured",
            "scores cost one network pass per member",
        ],
    }
    out.write_text(json.dumps(card, indent=2))
    print(json.dumps({"operating_threshold": threshold, "points": tuning_record["points"]}, indent=2))
    print(f"wrote {out} ({time.time() - started:.0f} s)")
    return 0
