"""Evaluation metrics on hand-made cases whose answers are worked out in the comments."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching

from CMBDetectorLib import cli, evaluate, findings
from CMBDetectorLib.errors import InputError
from helpers import bleed, det, study, truth


# ----------------------------------------------------------------------------------------------------
# Matching
# ----------------------------------------------------------------------------------------------------

def test_match_respects_the_tolerance_boundary():
    assert evaluate.match([[0, 0, 0]], [[4.9, 0, 0]], 5.0) == [(0, 0, pytest.approx(4.9))]
    assert evaluate.match([[0, 0, 0]], [[0, 5.1, 0]], 5.0) == []
    assert evaluate.match([[0, 0, 0]], [[0, 5.1, 0]], 6.0) != []
    assert evaluate.match([], [[0, 0, 0]]) == [] and evaluate.match([[0, 0, 0]], []) == []


def test_match_is_one_to_one_and_prefers_the_closer_detection():
    pairs = evaluate.match([[0, 0, 0]], [[0, 0, 3], [0, 0, 1]], 5.0)
    assert pairs == [(0, 1, pytest.approx(1.0))]


def test_match_prefers_more_pairs_over_shorter_distances():
    # d0 is 0.1 mm from t1; pairing them leaves t0 and d1 9.7 mm apart. Matching d0-t0 (4.9 mm) and
    # d1-t1 (4.9 mm) gives two true positives: the count of pairs comes before their total distance.
    truth_points = [[0, 0, 0], [4.8, 0, 0]]
    pred_points = [[4.9, 0, 0], [9.7, 0, 0]]
    pairs = evaluate.match(truth_points, pred_points, 5.0)
    assert [(t, p) for t, p, _ in pairs] == [(0, 0), (1, 1)]


@pytest.mark.parametrize("seed", range(20))
def test_match_has_maximum_cardinality_on_random_clusters(seed):
    rng = np.random.default_rng(seed)
    truth_points = rng.uniform(0, 12, size=(rng.integers(1, 9), 3))
    pred_points = rng.uniform(0, 12, size=(rng.integers(1, 9), 3))
    pairs = evaluate.match(truth_points, pred_points, 5.0)
    distances = np.linalg.norm(truth_points[:, None] - pred_points[None], axis=-1)
    best = maximum_bipartite_matching(csr_matrix(distances <= 5.0), perm_type="column")
    assert len(pairs) == int((best >= 0).sum())
    assert len({t for t, _, _ in pairs}) == len(pairs) == len({p for _, p, _ in pairs})
    assert all(d <= 5.0 for _, _, d in pairs)


# ----------------------------------------------------------------------------------------------------
# Metrics at the operating point
# ----------------------------------------------------------------------------------------------------

def test_lesion_metrics_count_cmb_free_scans_in_fp_per_scan():
    results = evaluate.evaluate_scans(study())
    lesion = results["lesion"]
    assert (lesion["tp"], lesion["fp"], lesion["fn"]) == (3, 3, 1)
    assert lesion["sensitivity"] == pytest.approx(3 / 4)
    assert lesion["precision"] == pytest.approx(3 / 6)
    assert lesion["f1"] == pytest.approx(6 / 10)
    assert lesion["fp_per_scan"] == pytest.approx(3 / 4)  # 3 FP over 4 scans, not over the 2 with CMBs
    per_scan = lesion["per_scan_mean"]
    assert per_scan["sensitivity"] == pytest.approx((2 / 3 + 1) / 2)   # scans with CMBs: A, B
    assert per_scan["precision"] == pytest.approx((2 / 4 + 1 + 0) / 3)  # scans with detections: A, B, C
    assert per_scan["fp"] == pytest.approx((2 + 0 + 1 + 0) / 4)
    rows = {row["scan_id"]: row for row in results["scans"]}
    assert (rows["A"]["tp"], rows["A"]["fp"], rows["A"]["fn"]) == (2, 2, 1)
    assert rows["D"]["n_detections"] == 0


def test_intervals_resample_whole_scans_and_narrow_as_scans_are_added():
    """Scan bootstrap: A holds 2 of its 3 lesions and 2 FP, B 1 of 1, C 1 FP, D nothing. A resample of A
    alone has sensitivity 2/3 and of B alone 1, so the interval lies within [2/3, 1]; FP/scan within [0, 2]."""
    few = evaluate.evaluate_scans(study())["lesion"]["ci95"]
    low, high = few["sensitivity"]
    assert 2 / 3 <= low < 3 / 4 < high <= 1.0
    assert 0.0 <= few["fp_per_scan"][0] < 3 / 4 < few["fp_per_scan"][1] <= 2.0
    assert evaluate.evaluate_scans(study())["lesion"]["ci95"] == few  # seeded: the same report again
    many = evaluate.evaluate_scans(study() * 10)["lesion"]["ci95"]
    for key in ("sensitivity", "fp_per_scan"):
        assert many[key][1] - many[key][0] < few[key][1] - few[key][0]
    alike = [(truth(f"S{i}", "gre3t", [bleed(0, 0, 0)]), [det(0, 0, 0, 0.9), det(50, 0, 0, 0.9)]) for i in range(5)]
    assert evaluate.evaluate_scans(alike)["lesion"]["ci95"] == {"sensitivity": [1.0, 1.0], "fp_per_scan": [1.0, 1.0]}
    clean = [(truth("E", "gre3t", []), [det(0, 0, 0, 0.9)])]
    assert evaluate.evaluate_scans(clean)["lesion"]["ci95"] == {"sensitivity": None, "fp_per_scan": [1.0, 1.0]}


def test_scan_level_metrics_and_auc():
    scan = evaluate.evaluate_scans(study())["scan"]
    # Truth positive A, B; detected positive A, B, C; D negative on both.
    assert (scan["tp"], scan["fn"], scan["fp"], scan["tn"]) == (2, 0, 1, 1)
    assert scan["sensitivity"] == 1.0 and scan["specificity"] == 0.5
    assert scan["balanced_accuracy"] == pytest.approx(0.75)
    # Scan scores: A .9, B .4 (positives) vs C .3, D 0 (negatives): every positive ranks higher.
    assert scan["auc"] == pytest.approx(1.0)
    scans = study()
    scans[2] = (scans[2][0], [det(50, 50, 50, 0.5)])  # now C (.5) outranks B (.4): 3 of 4 pairs right
    assert evaluate.evaluate_scans(scans)["scan"]["auc"] == pytest.approx(3 / 4)


def test_count_agreement():
    count = evaluate.evaluate_scans(study())["count"]
    reference, detected = np.array([3, 1, 0, 0.0]), np.array([4, 1, 1, 0.0])
    deviations_r, deviations_d = reference - reference.mean(), detected - detected.mean()
    pearson = (deviations_r @ deviations_d) / math.sqrt((deviations_r @ deviations_r) * (deviations_d @ deviations_d))
    assert count["pearson_r"] == pytest.approx(pearson)  # 7 / sqrt(54)
    assert count["mean_abs_difference"] == pytest.approx(2 / 4)
    assert count["mean_difference"] == pytest.approx(2 / 4)


def test_threshold_drops_low_scores_from_the_operating_point():
    results = evaluate.evaluate_scans(study(), threshold=0.5)
    # Left: A's four detections only. TP 2, FP 2, FN 2 (a2 and b1).
    lesion, scan = results["lesion"], results["scan"]
    assert (lesion["tp"], lesion["fp"], lesion["fn"]) == (2, 2, 2)
    assert lesion["fp_per_scan"] == pytest.approx(0.5)
    assert (scan["sensitivity"], scan["specificity"]) == (0.5, 1.0)
    assert results["scan"]["auc"] == pytest.approx(1.0)  # AUC ignores the threshold


def test_rejected_detections_are_not_counted():
    scans = study()
    scans[2] = (scans[2][0], [det(50, 50, 50, 0.3, status="rejected")])
    results = evaluate.evaluate_scans(scans)
    assert results["lesion"]["fp"] == 2
    assert results["scan"]["specificity"] == 1.0


def test_breakdown_by_acquisition_and_region():
    results = evaluate.evaluate_scans(study())
    swi, gre = results["by_acquisition"]["swi3t"], results["by_acquisition"]["gre15t"]
    assert swi["n_scans"] == 1 and swi["lesion"]["sensitivity"] == pytest.approx(2 / 3)
    assert gre["n_scans"] == 3 and gre["lesion"]["fp_per_scan"] == pytest.approx(1 / 3)
    regions = results["by_region"]
    assert list(regions) == ["lobar", "deep", "infratentorial"]
    assert (regions["lobar"]["n_reference"], regions["lobar"]["tp"]) == (2, 2)
    assert regions["deep"]["sensitivity"] == 0.0
    assert regions["infratentorial"]["sensitivity"] == 1.0
    # FPs by predicted region: A's 5.1 mm miss is "deep", A's duplicate "infratentorial", C's "lobar".
    assert (regions["deep"]["fp"], regions["infratentorial"]["fp"], regions["lobar"]["fp"]) == (1, 1, 1)
    location = results["location"]
    # Matched: a1 lobar->lobar, a3 infratentorial->infratentorial, b1 lobar->deep.
    assert location["n_matched"] == 3 and location["agreement"] == pytest.approx(2 / 3)
    assert location["n_lobar_matched"] == 2 and location["lobe_agreement"] == pytest.approx(1 / 2)


MIMICS = {"veins": [{"kind": "medullary vein", "radius_mm": 1.0, "chi_ppm": 0.4, "points_ras": [[0, 0, 0], [0, 20, 0]]}],
          "calcifications": [{"center_ras": [20, 0, 0], "diameter_mm": 2.0}, {"center_ras": [4, 10, 0], "diameter_mm": 2.0}],
          "iron_nuclei": [{"name": "right globus pallidus", "center_ras": [40, 0, 0]}],  # largest half-axis 8 mm
          "air_bone": [{"name": "sphenoid sinus", "center_ras": [0, 0, -60]}]}  # largest half-axis 11 mm


@pytest.mark.parametrize("point, cause", [
    ((-5.9, 10, 0), "vein"),  # 4.9 mm outside the vein wall
    ((-6.1, 10, 0), "other"),  # 5.1 mm: out of reach
    ((0, 23, 0), "vein"),  # past the polyline's end: 3 mm from its last point, 2 mm from the wall
    ((16, 0, 0), "calcification"),
    ((1.5, 10, 0), "vein"),  # vein wall 0.5 mm, calcification surface 1.5 mm: the nearer wins
    ((2.5, 10, 0), "calcification"),  # 1.5 against 0.5
    ((40, 12, 0), "iron-rich nucleus"),  # 12 mm from the centre, 4 mm outside the half-axis
    ((0, 0, -35), "air-bone"),  # 14 mm outside the sinus: air-bone reaches 15 mm
    ((0, 0, -33), "other"),
])
def test_false_positives_are_blamed_on_the_nearest_mimic(point, cause):
    assert evaluate.fp_cause(MIMICS, point) == cause


def test_false_positive_causes_are_counted_only_when_the_truth_lists_mimics():
    with_mimics = truth("M", "swi3t", [bleed(60, 60, 60)])
    with_mimics["mimics"] = MIMICS
    found = [det(60, 60, 61, 0.9), det(-5, 10, 0, 0.8), det(16, 0, 0, 0.7), det(90, 90, 90, 0.6), det(0, 5, 0, 0.1)]
    results = evaluate.evaluate_scans([(with_mimics, found)], threshold=0.5)
    assert results["lesion"]["fp"] == 3  # the 0.1 on the vein is below the threshold
    assert results["fp_causes"] == {"vein": 1, "calcification": 1, "iron-rich nucleus": 0, "air-bone": 0, "other": 1}
    assert "### False positives by cause" in evaluate.format_markdown(results)
    real = truth("R", "gre3t", [])
    del real["mimics"]  # a reader's reference standard: no mimic list, so no attribution
    results = evaluate.evaluate_scans([(with_mimics, found), (real, [det(0, 0, 0, 0.9)])], threshold=0.5)
    assert results["fp_causes"] is None and results["lesion"]["fp"] == 4
    assert "False positives by cause" not in evaluate.format_markdown(results)


# ----------------------------------------------------------------------------------------------------
# FROC
# ----------------------------------------------------------------------------------------------------

def test_froc_points_by_hand():
    froc = evaluate.evaluate_scans(study())["froc"]
    # threshold: cumulative TP, FP over 4 scans, 4 reference CMBs
    expected = [(0.9, 0.0, 0.25), (0.8, 0.25, 0.25), (0.7, 0.25, 0.5), (0.6, 0.5, 0.5),
                (0.4, 0.5, 0.75), (0.3, 0.75, 0.75)]
    got = [(p["threshold"], p["fp_per_scan"], p["sensitivity"]) for p in froc["points"]]
    assert got == [pytest.approx(e) for e in expected]
    # Upper envelope: (0, .25), (.25, .5), (.5, .75), (.75, .75); linear in between, flat after.
    assert froc["sensitivity_at"]["0.125"] == pytest.approx(0.375)
    assert froc["sensitivity_at"]["0.25"] == pytest.approx(0.5)
    assert froc["sensitivity_at"]["0.5"] == pytest.approx(0.75)
    assert froc["sensitivity_at"]["8"] == pytest.approx(0.75)
    assert froc["cpm"] == pytest.approx((0.375 + 0.5 + 0.75 * 5) / 7)
    assert froc["sensitivity_at_1fp"] == pytest.approx(0.75)
    assert froc["best_threshold_1fp"] == pytest.approx(0.4)  # fewest FP among the best
    assert froc["best_within"]["0.5"] == {"threshold": pytest.approx(0.4), "fp_per_scan": 0.5,
                                          "sensitivity": 0.75}
    assert froc["fp_reach"] == pytest.approx(0.75)


def test_fp_to_reach_picks_the_cheapest_point_at_that_sensitivity():
    points = evaluate.evaluate_scans(study())["froc"]["points"]
    assert evaluate.fp_to_reach(points, 0.5) == {"threshold": pytest.approx(0.7), "fp_per_scan": 0.25,
                                                 "sensitivity": 0.5}
    assert evaluate.fp_to_reach(points, 0.75)["threshold"] == pytest.approx(0.4)
    assert evaluate.fp_to_reach(points, 1.0) is None  # the curve never gets there


def test_best_threshold_respects_the_fp_budget():
    scans = [(truth("S", "gre3t", [bleed(0, 0, 0)]),
              [det(0, 0, 1, 0.2)] + [det(100 + 10 * i, 0, 0, 0.9 - 0.1 * i) for i in range(3)])]
    froc = evaluate.evaluate_scans(scans)["froc"]
    # With 1 scan, <= 1 FP/scan allows only the top detection (an FP): sensitivity 0.
    assert froc["sensitivity_at_1fp"] == 0.0 and froc["best_threshold_1fp"] == pytest.approx(0.9)
    assert froc["sensitivity_at"]["4"] == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(5))
def test_froc_is_monotone(seed):
    rng = np.random.default_rng(seed)
    scans = []
    for index in range(6):
        bleeds = [bleed(*rng.uniform(0, 60, 3)) for _ in range(rng.integers(0, 5))]
        detections = [det(*rng.uniform(0, 60, 3), score=float(rng.uniform())) for _ in range(rng.integers(0, 8))]
        detections += [det(*(np.array(b["center_ras"]) + rng.normal(0, 2, 3)), score=float(rng.uniform()))
                       for b in bleeds]
        scans.append((truth(f"S{index}", "gre3t", bleeds), detections))
    points = evaluate.evaluate_scans(scans)["froc"]["points"]
    thresholds = [p["threshold"] for p in points]
    assert thresholds == sorted(thresholds, reverse=True)
    fps = [p["fp_per_scan"] for p in points]
    sens = [p["sensitivity"] for p in points]
    assert all(b >= a for a, b in zip(fps, fps[1:]))
    assert all(b >= a for a, b in zip(sens, sens[1:]))
    # The loosest point is the operating point with every detection kept.
    everything = evaluate.evaluate_scans(scans)["lesion"]
    assert sens[-1] == pytest.approx(everything["sensitivity"])
    assert fps[-1] == pytest.approx(everything["fp_per_scan"])


def test_no_reference_cmbs_leaves_sensitivity_undefined():
    results = evaluate.evaluate_scans([(truth("C", "gre3t", []), [det(0, 0, 0, 0.5)])])
    assert results["lesion"]["sensitivity"] is None and results["froc"]["cpm"] is None
    assert results["scan"]["auc"] is None and results["lesion"]["fp_per_scan"] == 1.0
    assert "n/a" in evaluate.format_markdown(results)


# ----------------------------------------------------------------------------------------------------
# Files and command line
# ----------------------------------------------------------------------------------------------------

def write_study(tmp_path, skip_prediction_for=()):
    truth_dir, pred_dir = tmp_path / "truth", tmp_path / "pred"
    truth_dir.mkdir()
    pred_dir.mkdir()
    for index, (reference, detected) in enumerate(study()):
        stem = reference["scan_id"]
        (truth_dir / f"{stem}.truth.json").write_text(json.dumps(reference))
        if stem in skip_prediction_for:
            continue
        labelled = findings.label_findings(detected)
        if index % 2:
            findings.write_markups_json(labelled, pred_dir / f"{stem}.mrk.json")
        else:
            findings.write_csv(labelled, pred_dir / f"{stem}.csv")
    return truth_dir, pred_dir


def test_evaluate_directories_reads_csv_and_markups(tmp_path):
    truth_dir, pred_dir = write_study(tmp_path)
    from_files = evaluate.evaluate_directories(truth_dir, pred_dir)
    in_memory = evaluate.evaluate_scans(study())
    for key in ("lesion", "scan", "count", "by_region", "scans"):
        assert from_files[key] == in_memory[key]
    assert from_files["froc"]["points"] == in_memory["froc"]["points"]


def test_markups_review_state_and_csv_regions_are_combined(tmp_path):
    truth_dir, pred_dir = write_study(tmp_path)
    labelled = findings.label_findings(study()[0][1])  # scan A
    findings.write_csv(labelled, pred_dir / "A.csv")
    labelled[1].status = "rejected"  # the reviewer rejects the 5.1 mm miss
    findings.write_markups_json(labelled, pred_dir / "A.mrk.json")
    results = evaluate.evaluate_directories(truth_dir, pred_dir)
    assert results["lesion"]["fp"] == 2
    assert results["location"]["agreement"] == pytest.approx(2 / 3)  # regions came from A.csv


def test_missing_prediction_is_an_error_unless_allowed(tmp_path):
    truth_dir, pred_dir = write_study(tmp_path, skip_prediction_for=("B",))
    with pytest.raises(InputError, match="no predictions .* for: B"):
        evaluate.evaluate_directories(truth_dir, pred_dir)
    results = evaluate.evaluate_directories(truth_dir, pred_dir, allow_missing=True)
    assert results["missing_predictions"] == ["B"]
    assert results["lesion"]["fn"] == 2 and results["lesion"]["tp"] == 2


def test_bad_folders_and_files(tmp_path):
    with pytest.raises(InputError, match="truth folder not found"):
        evaluate.evaluate_directories(tmp_path / "nope", tmp_path)
    with pytest.raises(InputError, match="no \\*.truth.json files"):
        evaluate.evaluate_directories(tmp_path, tmp_path)
    (tmp_path / "X.truth.json").write_text("{not json")
    with pytest.raises(InputError, match="not a JSON truth file"):
        evaluate.evaluate_directories(tmp_path, tmp_path)


def test_cli_evaluate_prints_table_and_writes_json(tmp_path, capsys):
    truth_dir, pred_dir = write_study(tmp_path)
    out = tmp_path / "results" / "results.json"
    code = cli.main(["evaluate", "--truth", str(truth_dir), "--pred", str(pred_dir), "--tolerance-mm", "5",
                     "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "| pooled | 0.750 | 0.500 | 0.600 | 0.75 | 3 | 3 | 1 |" in printed
    assert "### FROC" in printed and "swi3t" in printed
    saved = json.loads(out.read_text())
    assert saved["lesion"]["f1"] == pytest.approx(0.6)
    assert saved["scan"]["balanced_accuracy"] == pytest.approx(0.75)

    code = cli.main(["evaluate", "--truth", str(truth_dir), "--pred", str(pred_dir), "--threshold", "0.5",
                     "--tolerance-mm", "6"])
    assert code == 0
    # At 6 mm the 5.1 mm detection matches a2: A has TP 3, FP 1; B and C are below the threshold.
    assert "| pooled | 0.750 | 0.750 | 0.750 | 0.25 | 3 | 1 | 1 |" in capsys.readouterr().out


def test_cli_reports_missing_predictions_as_one_line(tmp_path, capsys):
    truth_dir, pred_dir = write_study(tmp_path, skip_prediction_for=("C", "D"))
    code = cli.main(["evaluate", "--truth", str(truth_dir), "--pred", str(pred_dir)])
    error = capsys.readouterr().err
    assert code == 2 and "for: C, D" in error and error.count("\n") == 1
    assert cli.main(["evaluate", "--truth", str(truth_dir), "--pred", str(pred_dir), "--allow-missing"]) == 0
