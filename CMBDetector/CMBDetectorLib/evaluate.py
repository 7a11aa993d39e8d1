"""Scoring detections against reference microbleeds with the field's standard metrics.

Matching: each detection is paired with at most one reference CMB and vice versa (Hungarian algorithm
on centre distances, RAS mm); a pair counts only when the centres are within the tolerance (5 mm by
default, distance <= tolerance). The assignment first maximises the number of pairs, then minimises
their total distance.

Reported (see /work/shared/docs/cmb-domain.md, "How the field measures a detector"):
- per lesion: sensitivity = TP / reference, precision = TP / detections, F1 = 2TP / (2TP + FP + FN),
  FP per scan averaged over ALL scans (CMB-free included); pooled and as per-scan means; 95 % intervals
  of the pooled sensitivity and FP/scan by a bootstrap over whole scans (`ci95`);
- per scan ("any CMB"): sensitivity, specificity, balanced accuracy, and AUC with the scan score =
  the highest detection score (0 when none);
- count agreement: Pearson r and mean absolute difference of per-scan counts;
- FROC: sensitivity against FP/scan as the score threshold moves, sensitivity at 1/8 ... 8 FP/scan
  (linear interpolation of the curve), their mean (the CPM score), the best sensitivity at <= 1 FP/scan
  and the threshold that reaches it;
- breakdowns by acquisition name and by reference region, and location agreement (fraction of matched
  detections whose predicted region equals the reference region);
- for simulated scans (truth files that list the mimics), the false positives at the operating threshold
  by cause: the mimic whose surface is nearest within its reach (`MIMIC_REACH_MM`), else "other".

Detections whose review status is "rejected" are never counted. A detection without a score (a point a
reviewer added by hand) counts as certain (score 1). Undefined ratios (nothing to divide by) are None.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment

from . import findings as findings_io
from .errors import InputError

DEFAULT_TOLERANCE_MM = 5.0
FROC_LEVELS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
FP_BUDGETS = (0.5, 1.0)  # FP/scan budgets for the best real operating point (the product target is <= 0.5)
REGION_ORDER = ("lobar", "deep", "infratentorial", "unknown")
# How far (mm) outside a simulated mimic a false positive may lie and still be blamed on it: the matching
# tolerance, except for air-bone interfaces, whose field disturbance reaches well into the brain.
MIMIC_REACH_MM = {"vein": DEFAULT_TOLERANCE_MM, "calcification": DEFAULT_TOLERANCE_MM,
                  "iron-rich nucleus": DEFAULT_TOLERANCE_MM, "air-bone": 15.0}
FP_CAUSES = (*MIMIC_REACH_MM, "other")
TRUTH_SUFFIX = ".truth.json"
# The intervals resample whole scans: a scan's lesions and false positives share its acquisition, noise and
# anatomy, so counting lesions as independent would draw the intervals too narrow. Seeded: the same
# predictions give the same report.
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


# ----------------------------------------------------------------------------------------------------
# Matching
# ----------------------------------------------------------------------------------------------------

def match(truth_points, pred_points, tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> list:
    """One-to-one pairs of reference and detected centres within `tolerance_mm`.

    truth_points: (N, 3) RAS mm; pred_points: (M, 3) RAS mm.
    Returns [(truth_index, pred_index, distance_mm), ...] sorted by truth index. The number of pairs is
    the largest possible; among such assignments the total distance is the smallest.
    """
    truth = np.asarray(truth_points, dtype=float).reshape(-1, 3)
    pred = np.asarray(pred_points, dtype=float).reshape(-1, 3)
    if len(truth) == 0 or len(pred) == 0:
        return []
    distances = np.linalg.norm(truth[:, None, :] - pred[None, :, :], axis=-1)
    allowed = distances <= tolerance_mm
    if not allowed.any():
        return []
    # A forbidden pair costs more than any complete set of allowed pairs, so the solver never trades
    # an extra match for a shorter total distance.
    forbidden_cost = (tolerance_mm + 1.0) * (min(distances.shape) + 1)
    cost = np.where(allowed, distances, forbidden_cost)
    rows, cols = linear_sum_assignment(cost)
    pairs = [(int(r), int(c), float(distances[r, c])) for r, c in zip(rows, cols) if allowed[r, c]]
    return sorted(pairs)


# ----------------------------------------------------------------------------------------------------
# Per-scan preparation
# ----------------------------------------------------------------------------------------------------

def _score(finding) -> float:
    score = float(finding.score)
    return score if math.isfinite(score) else 1.0


def _kept_detections(findings: list) -> list:
    """Detections that count: not rejected by a reviewer. Sorted by decreasing score."""
    return sorted((f for f in findings if f.status != "rejected"), key=lambda f: -_score(f))


def _truth_points(truth: dict) -> np.ndarray:
    points = [bleed["center_ras"] for bleed in truth.get("microbleeds", [])]
    return np.asarray(points, dtype=float).reshape(-1, 3)


def _truth_regions(truth: dict) -> list:
    return [bleed.get("region") or "unknown" for bleed in truth.get("microbleeds", [])]


def _scan_row(truth: dict, detections: list, threshold, tolerance_mm: float, index: int) -> dict:
    """Counts for one scan at the operating threshold, plus what the FROC and breakdowns need."""
    truth_points = _truth_points(truth)
    operating = [f for f in detections if threshold is None or _score(f) >= threshold]
    pred_points = np.asarray([f.position_ras for f in operating], dtype=float).reshape(-1, 3)
    pairs = match(truth_points, pred_points, tolerance_mm)
    n_reference, n_detections, tp = len(truth_points), len(operating), len(pairs)
    bleeds = truth.get("microbleeds", [])
    matched_pred = {p for _, p, _ in pairs}
    false_positives = [f for p, f in enumerate(operating) if p not in matched_pred]
    return {
        "scan_id": str(truth.get("scan_id", f"scan-{index}")),
        "acquisition": str((truth.get("acquisition") or {}).get("name", "unknown")),
        "n_reference": n_reference,
        "n_detections": n_detections,
        "tp": tp,
        "fp": n_detections - tp,
        "fn": n_reference - tp,
        "max_score": max((_score(f) for f in detections), default=0.0),
        "sensitivity": _ratio(tp, n_reference),
        "precision": _ratio(tp, n_detections),
        "_truth_regions": _truth_regions(truth),
        "_matched_truth": sorted(t for t, _, _ in pairs),
        "_pairs": [{"truth_region": bleeds[t].get("region") or "unknown",
                    "truth_lobe": bleeds[t].get("lobe") or "",
                    "pred_region": operating[p].region or "unknown",
                    "pred_lobe": operating[p].lobe or "",
                    "distance_mm": d} for t, p, d in pairs],
        "_fp_regions": [f.region or "unknown" for f in false_positives],
        "_froc": _scan_froc_steps(truth_points, detections, tolerance_mm),
        "_fp_causes": None if "mimics" not in truth else [fp_cause(truth["mimics"], f.position_ras)
                                                          for f in false_positives],
    }


def _polyline_distance(point: np.ndarray, polyline: np.ndarray) -> float:
    """Shortest distance from `point` to a polyline (K, 3)."""
    if len(polyline) == 1:
        return float(np.linalg.norm(point - polyline[0]))
    start, end = polyline[:-1], polyline[1:]
    direction = end - start
    length2 = np.maximum(np.sum(direction ** 2, axis=1), 1e-12)
    along = np.clip(np.sum((point - start) * direction, axis=1) / length2, 0.0, 1.0)
    return float(np.min(np.linalg.norm(start + along[:, None] * direction - point, axis=1)))


@functools.lru_cache(maxsize=1)
def _structure_half_axes() -> dict:
    """Largest half-axis (mm) of each simulated iron-rich nucleus and air space, by the name truth files use."""
    from .simulate import anatomy

    structures = [copy for nucleus, _, _ in anatomy.NUCLEI for copy in anatomy.mirrored(nucleus)]
    structures += list(anatomy.SINUSES)  # listed per side already, named as the simulator writes them
    return {s.name: max(s.radii_mm) for s in structures}


def fp_cause(mimics: dict, position_ras) -> str:
    """The simulated mimic a false positive at `position_ras` is blamed on (one of FP_CAUSES).

    Surface distances: to a vein's centre line minus its radius, to a calcification's centre minus half its
    diameter, to a nucleus' or air space's centre minus its largest half-axis (the truth file keeps centres
    only; the simulator deforms the template, so this is approximate). The nearest surface within its
    MIMIC_REACH_MM wins; none within reach is "other" (noise, tissue texture, partial volume).
    """
    point = np.asarray(position_ras, dtype=float)
    half_axes = _structure_half_axes()
    near = []
    for vein in mimics.get("veins", []):
        distance = _polyline_distance(point, np.asarray(vein["points_ras"], dtype=float).reshape(-1, 3))
        near.append((distance - float(vein["radius_mm"]), "vein"))
    for calcification in mimics.get("calcifications", []):
        distance = float(np.linalg.norm(point - np.asarray(calcification["center_ras"], dtype=float)))
        near.append((distance - 0.5 * float(calcification["diameter_mm"]), "calcification"))
    for key, cause in (("iron_nuclei", "iron-rich nucleus"), ("air_bone", "air-bone")):
        for structure in mimics.get(key, []):
            distance = float(np.linalg.norm(point - np.asarray(structure["center_ras"], dtype=float)))
            near.append((distance - half_axes.get(structure["name"], 0.0), cause))
    within = [(distance, cause) for distance, cause in near if distance <= MIMIC_REACH_MM[cause]]
    return min(within)[1] if within else "other"


def _scan_froc_steps(truth_points: np.ndarray, detections: list, tolerance_mm: float):
    """(thresholds descending, TP count, detection count) at each distinct score of this scan."""
    scores = np.array([_score(f) for f in detections])
    points = np.asarray([f.position_ras for f in detections], dtype=float).reshape(-1, 3)
    thresholds = np.unique(scores)[::-1]
    tps, counts = [], []
    for threshold in thresholds:
        keep = scores >= threshold
        tps.append(len(match(truth_points, points[keep], tolerance_mm)))
        counts.append(int(keep.sum()))
    return thresholds, np.array(tps, dtype=int), np.array(counts, dtype=int)


# ----------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------

def _ratio(numerator, denominator):
    return float(numerator) / float(denominator) if denominator else None


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _lesion_metrics(rows: list) -> dict:
    tp = sum(r["tp"] for r in rows)
    fp = sum(r["fp"] for r in rows)
    fn = sum(r["fn"] for r in rows)
    per_scan_f1 = [_ratio(2 * r["tp"], 2 * r["tp"] + r["fp"] + r["fn"]) for r in rows]
    return {
        "tp": tp, "fp": fp, "fn": fn,
        "sensitivity": _ratio(tp, tp + fn),
        "precision": _ratio(tp, tp + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "fp_per_scan": _ratio(fp, len(rows)),
        "ci95": _bootstrap_intervals(rows),
        # Per-scan means: each over the scans where the ratio is defined (sensitivity over scans with
        # CMBs, precision over scans with detections); FP/scan over all scans.
        "per_scan_mean": {
            "sensitivity": _mean(r["sensitivity"] for r in rows),
            "precision": _mean(r["precision"] for r in rows),
            "f1": _mean(per_scan_f1),
            "fp": _mean(r["fp"] for r in rows),
        },
    }


def _bootstrap_intervals(rows: list) -> dict:
    """95 % percentile intervals of the pooled sensitivity and FP/scan over BOOTSTRAP_RESAMPLES resamples
    of the scans, [low, high]; None where undefined (no reference lesion in any scan)."""
    tp, fn, fp = (np.array([row[key] for row in rows], dtype=float) for key in ("tp", "fn", "fp"))
    draws = np.random.default_rng(BOOTSTRAP_SEED).integers(0, len(rows), size=(BOOTSTRAP_RESAMPLES, len(rows)))
    lesions = (tp + fn)[draws].sum(axis=1)
    sensitivity = tp[draws].sum(axis=1)[lesions > 0] / lesions[lesions > 0]  # resamples that hold a lesion

    def interval(values):
        return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if len(values) else None

    return {"sensitivity": interval(sensitivity), "fp_per_scan": interval(fp[draws].mean(axis=1))}


def _scan_metrics(rows: list) -> dict:
    truth_positive = np.array([r["n_reference"] > 0 for r in rows], dtype=bool)
    pred_positive = np.array([r["n_detections"] > 0 for r in rows], dtype=bool)
    tp = int((truth_positive & pred_positive).sum())
    fn = int((truth_positive & ~pred_positive).sum())
    tn = int((~truth_positive & ~pred_positive).sum())
    fp = int((~truth_positive & pred_positive).sum())
    sensitivity, specificity = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    balanced = None if sensitivity is None or specificity is None else (sensitivity + specificity) / 2
    return {
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "sensitivity": sensitivity, "specificity": specificity, "balanced_accuracy": balanced,
        "auc": _auc([r["max_score"] for r in rows], truth_positive),
    }


def _auc(scores, labels) -> float | None:
    """Area under the ROC curve (Mann-Whitney U; ties count one half). None without both classes."""
    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    positives, negatives = scores[labels], scores[~labels]
    if len(positives) == 0 or len(negatives) == 0:
        return None
    greater = (positives[:, None] > negatives[None, :]).sum()
    ties = (positives[:, None] == negatives[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(positives) * len(negatives)))


def _count_metrics(rows: list) -> dict:
    truth = np.array([r["n_reference"] for r in rows], dtype=float)
    pred = np.array([r["n_detections"] for r in rows], dtype=float)
    pearson = None
    if len(rows) >= 2 and truth.std() > 0 and pred.std() > 0:
        pearson = float(np.corrcoef(truth, pred)[0, 1])
    return {
        "pearson_r": pearson,
        "mean_abs_difference": float(np.abs(pred - truth).mean()) if len(rows) else None,
        "mean_difference": float((pred - truth).mean()) if len(rows) else None,
    }


def _froc(rows: list) -> dict:
    """FROC over all scans: one point per distinct score threshold, from strictest to loosest."""
    n_scans = len(rows)
    n_reference = sum(r["n_reference"] for r in rows)
    all_thresholds = np.unique(np.concatenate([r["_froc"][0] for r in rows] + [np.zeros(0)]))[::-1]
    points = []
    for threshold in all_thresholds:
        tp = fp = 0
        for row in rows:
            own_thresholds, tps, counts = row["_froc"]
            # own_thresholds is descending: the number of them >= threshold picks the step.
            steps = int(np.sum(own_thresholds >= threshold))
            if steps:
                tp += int(tps[steps - 1])
                fp += int(counts[steps - 1] - tps[steps - 1])
        points.append({"threshold": float(threshold), "fp_per_scan": fp / n_scans,
                       "sensitivity": _ratio(tp, n_reference)})
    result = {"points": points, "sensitivity_at": {}, "cpm": None,
              "sensitivity_at_1fp": None, "best_threshold_1fp": None}
    if n_reference == 0 or n_scans == 0:
        return result
    fps = np.array([0.0] + [p["fp_per_scan"] for p in points])
    sens = np.array([0.0] + [p["sensitivity"] for p in points])
    curve_fp = np.unique(fps)
    curve_sens = np.array([sens[fps == value].max() for value in curve_fp])  # upper envelope
    at_levels = np.interp(FROC_LEVELS, curve_fp, curve_sens)
    result["sensitivity_at"] = {f"{level:g}": float(value) for level, value in zip(FROC_LEVELS, at_levels)}
    result["cpm"] = float(np.mean(at_levels))
    result["fp_reach"] = float(fps.max())  # levels beyond it read the loosest point (a lower bound)
    result["best_within"] = {f"{budget:g}": best_within(points, budget) for budget in FP_BUDGETS}
    best = result["best_within"]["1"]
    result["sensitivity_at_1fp"] = best["sensitivity"]
    result["best_threshold_1fp"] = best["threshold"]
    return result


def best_within(points: list, fp_per_scan: float) -> dict:
    """The most sensitive FROC point (a real threshold, no interpolation) at <= fp_per_scan FP/scan;
    ties go to fewer FP, then to the higher threshold."""
    within = [p for p in points if p["fp_per_scan"] <= fp_per_scan]
    if not within:
        return {"threshold": None, "sensitivity": 0.0, "fp_per_scan": 0.0}
    return dict(max(within, key=lambda p: (p["sensitivity"], -p["fp_per_scan"], p["threshold"])))


def fp_to_reach(points: list, sensitivity: float) -> dict | None:
    """The FROC point with the fewest FP/scan whose sensitivity is >= `sensitivity` (None if none is)."""
    reaching = [p for p in points if p["sensitivity"] is not None and p["sensitivity"] >= sensitivity - 1e-12]
    if not reaching:
        return None
    return dict(min(reaching, key=lambda p: (p["fp_per_scan"], -p["threshold"])))


def _region_metrics(rows: list) -> dict:
    by_region = {}
    for row in rows:
        matched = set(row["_matched_truth"])
        for index, region in enumerate(row["_truth_regions"]):
            entry = by_region.setdefault(region, {"n_reference": 0, "tp": 0, "fp": 0})
            entry["n_reference"] += 1
            entry["tp"] += int(index in matched)
        for region in row["_fp_regions"]:
            by_region.setdefault(region, {"n_reference": 0, "tp": 0, "fp": 0})["fp"] += 1
    ordered = sorted(by_region, key=lambda r: (REGION_ORDER.index(r) if r in REGION_ORDER else 99, r))
    return {region: {**by_region[region],
                     "sensitivity": _ratio(by_region[region]["tp"], by_region[region]["n_reference"])}
            for region in ordered}


def _fp_cause_counts(rows: list) -> dict | None:
    """False positives by cause over all scans; None unless every truth file lists its mimics."""
    if any(row["_fp_causes"] is None for row in rows):
        return None
    return {cause: sum(row["_fp_causes"].count(cause) for row in rows) for cause in FP_CAUSES}


def _location_metrics(rows: list) -> dict:
    pairs = [pair for row in rows for pair in row["_pairs"]]
    same_region = sum(p["pred_region"] == p["truth_region"] for p in pairs)
    lobar = [p for p in pairs if p["truth_region"] == "lobar" and p["truth_lobe"]]
    return {
        "n_matched": len(pairs),
        "agreement": _ratio(same_region, len(pairs)),
        "n_predicted_unknown": sum(p["pred_region"] == "unknown" for p in pairs),
        "n_lobar_matched": len(lobar),
        "lobe_agreement": _ratio(sum(p["pred_lobe"] == p["truth_lobe"] for p in lobar), len(lobar)),
        "mean_distance_mm": _mean(p["distance_mm"] for p in pairs),
    }


def _operating_point(rows: list) -> dict:
    return {
        "n_scans": len(rows),
        "n_scans_with_cmb": sum(r["n_reference"] > 0 for r in rows),
        "n_reference": sum(r["n_reference"] for r in rows),
        "n_detections": sum(r["n_detections"] for r in rows),
        "lesion": _lesion_metrics(rows),
        "scan": _scan_metrics(rows),
        "count": _count_metrics(rows),
    }


def evaluate_scans(scans: list, threshold: float | None = None,
                   tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> dict:
    """Metrics over `scans`, a list of (truth dict, list of Finding) pairs.

    threshold: detections scoring below it are dropped for the operating-point metrics (None keeps
    all); the FROC and the scan AUC sweep over every score regardless.
    Returns a JSON-ready dict (see the module docstring for what each part means).
    """
    if not scans:
        raise InputError("nothing to evaluate: no scans")
    if tolerance_mm <= 0:
        raise InputError(f"matching tolerance must be positive, got {tolerance_mm} mm")
    rows = [_scan_row(truth, _kept_detections(found), threshold, tolerance_mm, index)
            for index, (truth, found) in enumerate(scans)]
    acquisitions = sorted({r["acquisition"] for r in rows})
    results = {
        "tolerance_mm": float(tolerance_mm),
        "threshold": None if threshold is None else float(threshold),
        **_operating_point(rows),
        "froc": _froc(rows),
        "by_acquisition": {name: {**_operating_point([r for r in rows if r["acquisition"] == name]),
                                  "froc_sensitivity_at_1fp":
                                      _froc([r for r in rows if r["acquisition"] == name])
                                      ["sensitivity_at_1fp"]}
                           for name in acquisitions},
        "by_region": _region_metrics(rows),
        "fp_causes": _fp_cause_counts(rows),
        "location": _location_metrics(rows),
        "scans": [{key: value for key, value in row.items() if not key.startswith("_")} for row in rows],
    }
    return results


# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------

def read_truth(path) -> dict:
    """A STEM.truth.json document (see the simulator) as a dict."""
    path = Path(path)
    try:
        truth = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"file not found: {path}") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise InputError(f"not a JSON truth file: {path} ({error})") from None
    if not isinstance(truth, dict) or not isinstance(truth.get("microbleeds", []), list):
        raise InputError(f"truth file {path} has no 'microbleeds' list")
    for index, bleed in enumerate(truth.get("microbleeds", [])):
        centre = bleed.get("center_ras") if isinstance(bleed, dict) else None
        if centre is None or len(centre) != 3:
            raise InputError(f"truth file {path}: microbleed {index} has no 3-value 'center_ras'")
    return truth


def read_predictions(pred_dir, stem: str):
    """Findings for scan `stem` from STEM.mrk.json (preferred: it holds the review outcome) or
    STEM.csv; when both exist, region and lobe come from the CSV row with the same label.
    Returns None when neither file exists."""
    pred_dir = Path(pred_dir)
    markups, table = pred_dir / f"{stem}.mrk.json", pred_dir / f"{stem}.csv"
    if markups.is_file():
        found = findings_io.read_markups_json(markups)
        if table.is_file():
            by_label = {f.label: f for f in _read_csv(table)}
            for finding in found:
                if finding.label in by_label:
                    finding.region = by_label[finding.label].region
                    finding.lobe = by_label[finding.label].lobe
        return found
    if table.is_file():
        return _read_csv(table)
    return None


def _read_csv(path: Path) -> list:
    try:
        return findings_io.read_csv(path)
    except (KeyError, ValueError) as error:
        raise InputError(f"not a CMBDetector findings CSV: {path} ({error})") from None


def evaluate_directories(truth_dir, pred_dir, threshold: float | None = None,
                         tolerance_mm: float = DEFAULT_TOLERANCE_MM, allow_missing: bool = False) -> dict:
    """Evaluate every STEM.truth.json in `truth_dir` against STEM.mrk.json / STEM.csv in `pred_dir`.

    A truth scan without a prediction file is an InputError unless `allow_missing` (then it counts as
    a scan with no detections and is listed under "missing_predictions").
    """
    truth_dir, pred_dir = Path(truth_dir), Path(pred_dir)
    for folder, role in ((truth_dir, "truth"), (pred_dir, "prediction")):
        if not folder.is_dir():
            raise InputError(f"{role} folder not found: {folder}")
    truth_files = sorted(truth_dir.glob(f"*{TRUTH_SUFFIX}"))
    if not truth_files:
        raise InputError(f"no *{TRUTH_SUFFIX} files in {truth_dir}")
    scans, missing = [], []
    for truth_file in truth_files:
        stem = truth_file.name[: -len(TRUTH_SUFFIX)]
        truth = read_truth(truth_file)
        truth.setdefault("scan_id", stem)
        found = read_predictions(pred_dir, stem)
        if found is None:
            missing.append(stem)
            found = []
        scans.append((truth, found))
    if missing and not allow_missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise InputError(f"no predictions (STEM.mrk.json or STEM.csv) in {pred_dir} for: {shown}")
    results = evaluate_scans(scans, threshold=threshold, tolerance_mm=tolerance_mm)
    results.update(truth_dir=str(truth_dir), pred_dir=str(pred_dir), missing_predictions=missing)
    return results


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------

def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{value:.{digits}f}"


def _table(header: list, rows: list) -> list:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines + [""]


def format_markdown(results: dict) -> str:
    """A readable Markdown report of `evaluate_scans` / `evaluate_directories` results."""
    lesion, scan, count, froc = results["lesion"], results["scan"], results["count"], results["froc"]
    threshold = "all detections" if results["threshold"] is None else f"score >= {results['threshold']:g}"
    lines = [
        "## CMB detection evaluation", "",
        f"{results['n_scans']} scans ({results['n_scans_with_cmb']} with CMBs), "
        f"{results['n_reference']} reference CMBs, {results['n_detections']} detections "
        f"({threshold}); matching: one-to-one, centre distance <= {results['tolerance_mm']:g} mm.", "",
        "### Per lesion", "",
    ]
    per_scan = lesion["per_scan_mean"]
    lines += _table(["", "sensitivity", "precision", "F1", "FP/scan", "TP", "FP", "FN"], [
        ["pooled", _fmt(lesion["sensitivity"]), _fmt(lesion["precision"]), _fmt(lesion["f1"]),
         _fmt(lesion["fp_per_scan"], 2), lesion["tp"], lesion["fp"], lesion["fn"]],
        ["per-scan mean", _fmt(per_scan["sensitivity"]), _fmt(per_scan["precision"]), _fmt(per_scan["f1"]),
         _fmt(per_scan["fp"], 2), "", "", ""],
    ])
    lines += ["### Per scan (any CMB)", ""]
    lines += _table(["sensitivity", "specificity", "balanced accuracy", "AUC", "count r",
                     "mean abs count diff"], [
        [_fmt(scan["sensitivity"]), _fmt(scan["specificity"]), _fmt(scan["balanced_accuracy"]),
         _fmt(scan["auc"]), _fmt(count["pearson_r"]), _fmt(count["mean_abs_difference"], 2)],
    ])
    lines += ["### FROC", ""]
    if froc["sensitivity_at"]:
        levels = list(froc["sensitivity_at"])
        lines += _table([f"{level} FP/scan" for level in levels] + ["CPM"],
                        [[_fmt(froc["sensitivity_at"][level]) for level in levels] + [_fmt(froc["cpm"])]])
        best = froc["best_threshold_1fp"]
        lines += [f"Sensitivity at <= 1 FP/scan: {_fmt(froc['sensitivity_at_1fp'])}"
                  + ("" if best is None else f" (score threshold {best:.3f})"), ""]
    else:
        lines += ["No reference CMBs: FROC undefined.", ""]
    lines += ["### By acquisition", ""]
    lines += _table(["acquisition", "scans", "CMBs", "sensitivity", "precision", "F1", "FP/scan",
                     "scan bal. acc.", "sens. @<=1 FP/scan"], [
        [name, part["n_scans"], part["n_reference"], _fmt(part["lesion"]["sensitivity"]),
         _fmt(part["lesion"]["precision"]), _fmt(part["lesion"]["f1"]), _fmt(part["lesion"]["fp_per_scan"], 2),
         _fmt(part["scan"]["balanced_accuracy"]), _fmt(part["froc_sensitivity_at_1fp"])]
        for name, part in results["by_acquisition"].items()])
    lines += ["### By region (reference region for sensitivity, predicted region for FP)", ""]
    lines += _table(["region", "CMBs", "TP", "sensitivity", "FP"], [
        [region, part["n_reference"], part["tp"], _fmt(part["sensitivity"]), part["fp"]]
        for region, part in results["by_region"].items()])
    if results.get("fp_causes"):
        lines += ["### False positives by cause (nearest simulated mimic)", ""]
        lines += _table(list(FP_CAUSES), [[results["fp_causes"][cause] for cause in FP_CAUSES]])
    location = results["location"]
    lines += [f"Location agreement (matched detections in the reference region): "
              f"{_fmt(location['agreement'])} of {location['n_matched']}"
              f" ({location['n_predicted_unknown']} without a predicted region); lobe agreement "
              f"{_fmt(location['lobe_agreement'])} of {location['n_lobar_matched']} lobar.", ""]
    if results.get("missing_predictions"):
        lines += [f"Scans without a prediction file (counted as no detections): "
                  f"{', '.join(results['missing_predictions'])}", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Command line: cmbdetector evaluate
# ----------------------------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("--truth", required=True, metavar="DIR", help="folder of STEM.truth.json files")
    parser.add_argument("--pred", required=True, metavar="DIR",
                        help="folder of STEM.mrk.json or STEM.csv detections")
    parser.add_argument("--threshold", type=float, default=None,
                        help="keep detections scoring at least this (default: all)")
    parser.add_argument("--tolerance-mm", type=float, default=DEFAULT_TOLERANCE_MM,
                        help="largest centre distance for a match, mm (default: %(default)s)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="count a scan without a prediction file as having no detections")
    parser.add_argument("--out", metavar="JSON", default=None, help="also write all results here")


def run(args) -> int:
    results = evaluate_directories(args.truth, args.pred, threshold=args.threshold,
                                   tolerance_mm=args.tolerance_mm, allow_missing=args.allow_missing)
    print(format_markdown(results))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        findings_io.write_json(results, out)
        print(f"results written to {out}")
    return 0
