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
from ..classify import ARCHITECTURE, DEFAULT_MODEL, build_model, card_path, sha256_of
from ..errors import CMBError
from . import dataset


def add_arguments(parser) -> None:
    parser.add_argument("--data", required=True, help="folder of simulated scans (cmbdetector synth)")
    parser.add_argument("--out", default=str(DEFAULT_MODEL), help="weights file to write (.pt); card beside it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=2500, help="optimiser steps (batch of 64)")
    parser.add_argument("--val-fraction", type=float, default=0.15, help="scans held out for the card's metrics")
    parser.add_argument("--hold-out", default="", help="comma-separated scan names to hold out instead of a "
                        "random --val-fraction (e.g. scans the YOLO stage never saw)")
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


def _stack(items, attribute):
    return np.concatenate([getattr(item, attribute) for item in items])


def operating_points(scores, labels, items) -> dict:
    """Per-lesion sensitivity and FP/scan over held-out scans, as if every candidate were reported."""
    results = {}
    n_scans = len(items)
    n_cmb = sum(item.n_microbleeds for item in items)
    for threshold in (0.3, 0.5, 0.7, 0.8, 0.9, 0.95):
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


def choose_threshold(points: dict) -> float:
    """The highest threshold whose held-out sensitivity equals the best one (fewest FP at full recall)."""
    best = max(point["sensitivity"] for point in points.values())
    return max(float(key) for key, point in points.items() if point["sensitivity"] == best)


def run(args) -> int:
    import torch

    started = time.time()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    files = dataset.truth_files(args.data)
    if len(files) < 4:
        raise CMBError(f"need at least 4 simulated scans in {args.data}, found {len(files)}")
    order = rng.permutation(len(files))
    if args.hold_out:
        names = {name.strip().replace(".truth.json", "") for name in args.hold_out.split(",") if name.strip()}
        val_files = [f for f in files if f.name.replace(".truth.json", "") in names]
        if len(val_files) != len(names):
            raise CMBError(f"--hold-out names scans that are not in {args.data}")
    else:
        n_val = max(1, int(round(len(files) * args.val_fraction)))
        val_files = [files[i] for i in sorted(order[:n_val])]
    train_files = [f for f in files if f not in val_files]
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

    network = build_model()
    optimiser = torch.optim.AdamW(network.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=2e-3, total_steps=args.steps)
    loss_function = torch.nn.BCEWithLogitsLoss()
    network.train()
    running = 0.0
    for step in range(1, args.steps + 1):
        batch_index = np.concatenate([rng.choice(positives, 24), rng.choice(negatives, 40)])
        batch = torch.from_numpy(augment(patches[batch_index], rng))
        target = torch.from_numpy(labels[batch_index].astype(np.float32))
        loss = loss_function(network(batch)[:, 0], target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        running = 0.98 * running + 0.02 * loss.item() if step > 1 else loss.item()
        if step % 100 == 0 or step == args.steps:
            print(f"step {step}/{args.steps} loss {running:.4f} ({time.time() - started:.0f} s)", flush=True)

    network.eval()
    val_patches, val_labels = _stack(val_items, "patches"), _stack(val_items, "labels")
    with torch.inference_mode():
        val_scores = np.concatenate([torch.sigmoid(network(torch.from_numpy(val_patches[i:i + 256].astype(np.float32)))[:, 0]).numpy()
                                     for i in range(0, len(val_patches), 256)])
    metrics = {
        "held_out_scans": len(val_items),
        "held_out_microbleeds": sum(i.n_microbleeds for i in val_items),
        "stage1_recall_held_out": round(sum(i.n_found_by_stage1 for i in val_items) / max(1, sum(i.n_microbleeds for i in val_items)), 4),
        "candidates_per_scan_held_out": round(len(val_labels) / len(val_items), 1),
        "operating_points_held_out": operating_points(val_scores, val_labels, val_items),
    }
    threshold = choose_threshold(metrics["operating_points_held_out"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), out)
    card = {
        "name": "CMBDetector stage-2 3D CNN",
        "version": __version__,
        "file": out.name,
        "sha256": sha256_of(out),
        "architecture": ARCHITECTURE,
        "framework": f"MONAI Classifier, torch {torch.__version__}",
        "command": (f"cmbdetector train --data {shlex.quote(str(args.data))} --out {shlex.quote(str(args.out))} "
                    f"--seed {args.seed} --steps {args.steps} --val-fraction {args.val_fraction}"
                    + (f" --hold-out {shlex.quote(args.hold_out)}" if args.hold_out else "")),
        "seed": args.seed,
        "steps": args.steps,
        "training_data": {
            "source": "simulated scans (cmbdetector synth), MNI152 2009 anatomy; no real labelled data",
            "scans": [f.name for f in train_files],
            "held_out": [f.name for f in val_files],
            "positive_patches": int(len(positives)),
            "negative_patches": int(len(negatives)),
        },
        "metrics": metrics,
        "operating_threshold": threshold,
        "operating_threshold_rule": "the highest score threshold at which held-out sensitivity is at its maximum",
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
