"""What both training commands share: the held-out split, per-lesion scoring of whole scans never trained
on, and the operating-point rule. Both trainers import this module; it imports neither of them."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .. import yolo
from ..errors import CMBError
from . import dataset

FP_BUDGET = 0.3  # false positives per scan an operating point may spend (the product target is <= 0.5)
TOLERANCE_MM = 5.0  # one-to-one matching distance, as the benchmark


def split_scans(files: list, rng: np.random.Generator, val_fraction: float, hold_out: str = "",
                folder="the data folder") -> tuple:
    """(train, held_out) truth files: the scans named in `hold_out` (comma-separated), else a random
    `val_fraction` of them. The permutation is drawn either way, so `rng` moves on identically."""
    order = rng.permutation(len(files))
    names = {name.strip().replace(".truth.json", "") for name in hold_out.split(",") if name.strip()}
    if names:
        held = [f for f in files if f.name.replace(".truth.json", "") in names]
        if len(held) != len(names):
            raise CMBError(f"--hold-out names scans that are not in {folder}")
    else:
        n_val = max(1, int(round(len(files) * val_fraction)))
        held = [files[i] for i in sorted(order[:n_val])]
    return [f for f in files if f not in held], held


def choose_threshold(points: dict, fp_budget: float = FP_BUDGET, lowest_on_ties: bool = False) -> float:
    """The threshold with the highest sensitivity at <= fp_budget FP/scan; among equals the highest
    threshold (fewest FP), or with lowest_on_ties the lowest (a margin for lesions the points do not hold)."""
    within = {key: point for key, point in points.items() if point["fp_per_scan"] <= fp_budget} or points
    best = max(point["sensitivity"] for point in within.values())
    pick = min if lowest_on_ties else max
    return pick(float(key) for key, point in within.items() if point["sensitivity"] == best)


@dataclass
class HeldOutScan:
    scan_id: str
    truth_points: np.ndarray  # (T, 3) RAS
    centres: np.ndarray  # (N, 3) RAS candidates
    cnn: np.ndarray  # (N,)
    yolo: np.ndarray  # (N,)


def score_held_out(files: list, cnn_scores, yolo_model=None, timings: list | None = None) -> list:
    """CNN (and YOLO) scores of every stage-1 candidate of each held-out scan (pipeline preprocessing).

    cnn_scores: patches -> probabilities (the pipeline's scoring); yolo_model None leaves YOLO at 0."""
    from ..classify import extract_patches

    scans = []
    for truth_file in files:
        truth, _, prepared = dataset.read_scan(truth_file, with_phase=True)
        centres = dataset.candidate_centres(prepared)
        tick = time.perf_counter()
        cnn = cnn_scores(extract_patches(prepared, centres))
        cnn_seconds = time.perf_counter() - tick
        tick = time.perf_counter()
        yolo_scores = (yolo.score_candidates(yolo_model, prepared, centres) if yolo_model is not None
                       else np.zeros(len(centres)))
        yolo_seconds = time.perf_counter() - tick
        points = dataset.truth_points(truth)
        scans.append(HeldOutScan(truth["scan_id"], points, centres, cnn, yolo_scores))
        if timings is not None:
            timings.append({"scan": truth["scan_id"], "candidates": len(centres), "cnn_s": round(cnn_seconds, 3),
                            "yolo_all_candidates_s": round(yolo_seconds, 3)})
        print(f"  held-out {truth['scan_id']}: {len(points)} CMB, {len(centres)} candidates", flush=True)
    return scans


def lesion_counts(scans: list, scores: list, threshold: float) -> dict:
    """Per-lesion TP/FP (one-to-one matching, 5 mm) of the pipeline's decision: score >= threshold, then
    merge detections closer than 3 mm (highest score kept)."""
    from ..evaluate import match
    from ..pipeline import merge_nearby

    tp = fp = total = 0
    for scan, scan_scores in zip(scans, scores):
        passing = np.nonzero(scan_scores >= threshold)[0]
        kept = passing[merge_nearby(scan.centres[passing], scan_scores[passing])] if len(passing) else passing
        pairs = match(scan.truth_points, scan.centres[kept], TOLERANCE_MM)
        tp += len(pairs)
        fp += len(kept) - len(pairs)
        total += len(scan.truth_points)
    return counts_with_rates(tp, fp, total, len(scans))


def counts_with_rates(tp: int, fp: int, microbleeds: int, scans: int) -> dict:
    """Lesion counts as lesion_counts reports them: sensitivity and FP per scan beside the counts."""
    return {"sensitivity": round(tp / max(microbleeds, 1), 4), "fp_per_scan": round(fp / max(scans, 1), 3),
            "tp": tp, "fp": fp, "microbleeds": microbleeds, "scans": scans}


def pooled_counts(counts: list) -> dict:
    """Several lesion_counts results (disjoint scans) as one: counts summed, rates recomputed."""
    return counts_with_rates(*(sum(c[key] for c in counts) for key in ("tp", "fp", "microbleeds", "scans")))


