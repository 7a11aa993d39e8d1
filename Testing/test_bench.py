"""The benchmark report: FROC table and the full pipeline read off its curve at the CNN alone's
sensitivity (the detection itself is exercised by `make bench`, too slow for the tests)."""

from __future__ import annotations

import numpy as np
import pytest

from CMBDetectorLib import bench, evaluate
from helpers import det, study


def configuration(scans, threshold):
    results = evaluate.evaluate_scans(scans, threshold=threshold)
    return {"operating_threshold": threshold, "results": results, "mimic_rich": results,
            "time_per_scan_s": {"mean": 1.0, "max": 2.0}, "registration_s": {"mean": 0.5, "max": 0.6},
            "timing_scan": {"shape": [10, 10, 10], "timings_s": {"cnn": 0.5, "total": 1.0},
                            "process_wall_s": 2.0, "peak_rss_mb": 100.0}}


def report_for(full_scans):
    report = {"date": "today", "machine": "test", "commit": "abc", "validation": bench.VALIDATION,
              "parallel_workers": 1, "froc_floor": 0.05,
              "configs": {"cnn": configuration(study(), 0.6), "full": configuration(full_scans, 0.6)}}
    report["configs"]["full"]["matched"] = bench._matched_sensitivity(report["configs"])
    return report


def test_full_pipeline_is_read_at_the_cnn_alone_sensitivity():
    # CNN alone at 0.6 on the hand-worked study: A gives TP .9, FP .8, TP .7, FP .6 -> sensitivity 2/4,
    # 2 FP over 4 scans. The "full" pipeline scores A's duplicate 0.1 instead of 0.6: it reaches 2/4 at
    # threshold 0.7 with only the 0.8 FP left, 0.25 FP/scan, half the CNN alone's.
    full = study()
    full[0] = (full[0][0], full[0][1][:3] + [det(0, 41, 0, 0.1, "infratentorial")])
    report = report_for(full)
    matched = report["configs"]["full"]["matched"]
    assert matched["cnn_sensitivity"] == 0.5 and matched["cnn_fp_per_scan"] == 0.5
    assert matched["full"]["threshold"] == pytest.approx(0.7) and matched["full"]["fp_per_scan"] == 0.25
    assert matched["fp_change"] == pytest.approx(-0.5)
    # The CNN alone's own curve is read at the same sensitivity, so a gain a threshold change alone gives shows.
    own = evaluate.fp_to_reach(report["configs"]["cnn"]["results"]["froc"]["points"], 0.5)
    assert matched["cnn_curve"] == own and own["sensitivity"] >= 0.5
    text = bench.format_report(report)
    assert "0.25 FP/scan at threshold 0.70 (-50 % FP/scan)" in text
    assert "own curve reaches that sensitivity at {:.2f} FP/scan (threshold {:.2f})".format(
        own["fp_per_scan"], own["threshold"]) in text
    # Both configurations in the FROC table, with their best real point at <= 0.5 FP/scan.
    rows = [line for line in text.splitlines() if line.startswith("| cnn |") or line.startswith("| full |")]
    assert len(rows) == 2 * 7  # overall, FROC, mimic-rich, false-positive causes, two acquisitions, timing
    # study() lists no mimics, so its 2 FP at 0.6 (A's 5.1 mm miss and duplicate) are "other".
    assert "| cnn | 0.60 | 0.500 | 0 | 0 | 0 | 0 | 2 | 2 |" in text
    assert "| cnn | 0.60 | 0.500 |" in text  # threshold column, then sensitivity
    assert "0.750 at 0.50 FP/scan (threshold 0.40)" in text


def test_operating_thresholds_must_agree_across_scans():
    assert bench._operating_threshold([{"threshold": 0.05, "operating_threshold": 0.3}] * 3) == 0.3
    assert bench._operating_threshold([{"threshold": 0.3}]) == 0.3  # predictions from before the FROC floor
    with pytest.raises(Exception, match="different operating thresholds"):
        bench._operating_threshold([{"threshold": 0.05, "operating_threshold": 0.3},
                                    {"threshold": 0.05, "operating_threshold": 0.5}])


def test_cause_table_adds_the_cnn_alone_at_the_full_pipelines_threshold():
    report = report_for(study())
    same_cut = evaluate.evaluate_scans(study(), threshold=0.35)  # B's 0.4 TP counts, C's 0.3 FP not
    report["configs"]["cnn"]["at_full_threshold"] = {key: same_cut[key] for key in ("threshold", "lesion", "fp_causes")}
    lines = bench.format_report(report).splitlines()
    start = lines.index("## False positives by cause")
    rows = [line for line in lines[start:] if line.startswith("| cnn") or line.startswith("| full")][:3]
    assert rows[1] == "| cnn at the full pipeline's threshold | 0.35 | 0.750 | 0 | 0 | 0 | 0 | 2 | 2 |"
    assert rows[0].startswith("| cnn | 0.60 |") and rows[2].startswith("| full | 0.60 |")


def test_curves_are_also_read_at_the_full_pipelines_sensitivity():
    # The full pipeline also scores B's microbleed 0.65 (CNN alone 0.4), so at 0.6 it finds 3 of 4 with
    # A's 0.8 as its only FP (0.25 FP/scan); the CNN alone's curve reaches 3 of 4 only at threshold 0.4,
    # with A's 0.8 and 0.6 as FPs (0.5 FP/scan): -50 % at the full pipeline's sensitivity.
    full = study()
    full[0] = (full[0][0], full[0][1][:3] + [det(0, 41, 0, 0.1, "infratentorial")])
    full[1] = (full[1][0], [det(10, 10, 12, 0.65, "deep")])
    at_full = report_for(full)["configs"]["full"]["matched"]["at_full_sensitivity"]
    assert at_full["sensitivity"] == 0.75
    assert at_full["cnn"]["fp_per_scan"] == 0.5 and at_full["cnn"]["threshold"] == pytest.approx(0.4)
    assert at_full["full"]["fp_per_scan"] == 0.25 and at_full["full"]["threshold"] == pytest.approx(0.65)
    assert at_full["fp_change"] == pytest.approx(-0.5)
    assert ("At the full pipeline's operating sensitivity (0.750) the CNN alone's curve needs 0.50 FP/scan "
            "(threshold 0.40), the full pipeline's 0.25 (threshold 0.65): -50 % FP/scan.") in bench.format_report(report_for(full))


def test_both_validation_sets_are_reported_side_by_side_with_their_gap():
    full = study()
    full[0] = (full[0][0], full[0][1][:3] + [det(0, 41, 0, 0.1, "infratentorial")])
    in_distribution = report_for(full)["configs"]
    worse = study()  # out of distribution: the CNN alone loses a true positive to a miss
    worse[0] = (worse[0][0], worse[0][1][1:])
    out_of_distribution = {"cnn": configuration(worse, 0.6), "full": configuration(full, 0.6)}
    worse_lesion = out_of_distribution["cnn"]["results"]["lesion"]
    for configs in (in_distribution, out_of_distribution):
        for entry in configs.values():
            entry.update(by_acquisition={}, refused=[])
        configs["full"]["matched"] = bench._matched_sensitivity(configs)
    out_of_distribution["cnn"]["refused"] = [{"scan": "x.truth.json", "why": "input: does not look like a brain"}]
    report = report_for(full)
    report.update(out_of_distribution=bench.OUT_OF_DISTRIBUTION,
                  sets={"in-distribution": {"configs": in_distribution},
                        "out-of-distribution": {"configs": out_of_distribution}})
    text = bench.format_report(report)
    ours = in_distribution["cnn"]["results"]["lesion"]["sensitivity"]
    theirs = out_of_distribution["cnn"]["results"]["lesion"]["sensitivity"]
    assert theirs < ours
    assert f"| cnn | **gap** | | {theirs - ours:+.3f} |" in text
    interval = in_distribution["cnn"]["results"]["lesion"]["ci95"]["sensitivity"]
    assert f"| cnn | in-distribution | 0.60 | {ours:.3f} ({interval[0]:.2f}-{interval[1]:.2f}) |" in text
    row = next(line for line in text.splitlines() if line.startswith("| cnn | out-of-distribution | 0.60 |"))
    assert row.endswith("| 1 |")  # the refused scan is counted
    assert "Refused (cnn): x.truth.json: input: does not look like a brain" in text
    assert "### The YOLO stage at equal sensitivity, on each set" in text
    assert sum(line.startswith("| in-distribution |") or line.startswith("| out-of-distribution |")
               for line in text.splitlines()) == 2
    assert bench.OOD_WITH_PHASE not in text  # a report of two sets (one written before the third) reads as before

    # The held-out set once more with its phase: its own line after the gap, which still compares the
    # magnitude-alone lines, and its own rows by acquisition.
    with_phase = {"cnn": configuration(study(), 0.6), "full": configuration(full, 0.6)}
    with_phase["cnn"].update(by_acquisition={"ood-swi15t": {"lesion": with_phase["cnn"]["results"]["lesion"],
                                                            "sensitivity_at_1fp": 0.5}}, refused=[])
    with_phase["full"].update(by_acquisition={}, refused=[])
    with_phase["full"]["matched"] = bench._matched_sensitivity(with_phase)
    out_of_distribution["cnn"]["by_acquisition"] = {"ood-swi15t": {"lesion": worse_lesion, "sensitivity_at_1fp": 0.25}}
    report["sets"][bench.OOD_WITH_PHASE] = {"phase_given": True, "phase_reversed": 30, "configs": with_phase}
    lines = bench.format_report(report).splitlines()
    cnn_rows = [line for line in lines if line.startswith("| cnn | ")]
    gap = cnn_rows.index(next(line for line in cnn_rows if line.startswith("| cnn | **gap** |")))
    assert cnn_rows[gap - 1].startswith("| cnn | out-of-distribution | 0.60 |")
    assert cnn_rows[gap + 1].startswith(f"| cnn | {bench.OOD_WITH_PHASE} | 0.60 | 0.500 ")
    assert cnn_rows[gap].startswith(f"| cnn | **gap** | | {theirs - ours:+.3f} |")  # unchanged by the third line
    assert any("30 of 30 phases reversed on reading" in line for line in lines)
    assert [line.split(" | ")[:3] for line in lines if line.startswith("| cnn | ood-swi15t |")] == [
        ["| cnn", "ood-swi15t", "no"], ["| cnn", "ood-swi15t", "yes"]]


def test_each_lesion_is_traced_to_the_stage_that_lost_it():
    truth = {"acquisition": {"name": "ood-swi15t"},
             "microbleeds": [{"center_ras": [0, 0, 0]}, {"center_ras": [20, 0, 0]}, {"center_ras": [40, 0, 0]}]}
    screened = np.array([[0, 0, 1.0], [20, 0, 4.0], [90, 0, 0]])  # centred, off-centre in z, none near
    check = bench._screening_check(truth, screened)
    assert check["nearest_candidate_mm"] == [1.0, 4.0, 20.4]
    assert bench._screening_check(truth, None)["nearest_candidate_mm"] == [None] * 3  # a refused scan
    summary = bench._screening_summary([{"screening_check": check}, {"brain_check": None}])
    assert summary == {"ood-swi15t": {"lesions": 3, "screened": 2, "centred": 1, "median_distance_mm": 4.0}}
    found = {"lesion": {"tp": 1}}
    sets = {name: {"configs": {"cnn": {"by_acquisition": {"ood-swi15t": found}},
                               "full": {"by_acquisition": {}}}} for name in ("in-distribution", "out-of-distribution")}
    lines = bench._screening_lines({"screening": {"out-of-distribution": summary}, "sets": sets})
    assert "| out-of-distribution | ood-swi15t | 3 | 2 | 1 | 4.0 | 1 | n/a |" in lines
    assert bench._screening_lines({"screening": {"in-distribution": {}}, "sets": sets}) == []


def test_injected_real_scans_get_their_own_table():
    row = {"scan": "romeo_small/Mag.nii", "crop": True, "shape": [51, 51, 41], "spacing_mm": [0.469, 0.469, 1.0],
           "cnn": {"findings": 0, "scores": [], "mask": {"method": "crop", "volume_ml": 10.0}},
           "injected": {"repeats": 6, "lesions": 18, "cnn": {"found": 15, "other_findings": 3}}}
    lines = bench._real_lines({"real": [row], "configs": {"cnn": {}}})
    assert "### The same real scans with injected microbleeds" in lines
    assert "| romeo_small/Mag.nii (crop) | 0.469 x 0.469 x 1 | 18 | 15 (0.83) | 0.50 |" in lines
    assert any(line.startswith("Each scan 6 times, with up to 3 microbleeds ") for line in lines)
    # what the table says about the injections comes from the report, not from today's constants
    whole = {**row, "scan": "head.nii.gz", "crop": False,
             "injected": {"repeats": 2, "count": 5, "lesions": 10, "cnn": {"found": 9, "other_findings": 1}}}
    row["injected"] = {**row["injected"], "repeats": 2, "count": 4}
    lines = bench._real_lines({"real": [row, whole], "configs": {"cnn": {}}})
    assert any(line.startswith("Each scan 2 times, with up to 5 microbleeds (a crop: 4) ") for line in lines)
    del row["injected"]  # a refused scan has no injection run
    assert not any("injected" in line for line in bench._real_lines({"real": [row], "configs": {"cnn": {}}}))


def test_the_development_sets_are_not_the_benchmarks_and_the_report_says_so():
    benchmark_sets, dev_sets = bench._sets(dev=False), bench._sets(dev=True)
    # the same detections (names, folders, phase use, prediction folders) of the same recipes, other seeds
    assert [s._replace(recipe=None) for s in dev_sets] == [s._replace(recipe=None) for s in benchmark_sets]
    assert {s.recipe["seed"] for s in dev_sets}.isdisjoint(s.recipe["seed"] for s in benchmark_sets)
    assert all(d.recipe == {**b.recipe, "seed": d.recipe["seed"]} for d, b in zip(dev_sets, benchmark_sets))
    report = report_for(study())
    assert report.get("dev") is None and bench.format_report(report).startswith("# CMBDetector benchmark\n")
    report.update(dev=True, validation=bench.DEV_VALIDATION)
    text = bench.format_report(report)
    assert text.startswith("# CMBDetector development run") and "`cmbdetector bench --dev`" in text
    assert f"(seed {bench.DEV_VALIDATION['seed']}," in text and "never used for training or tuning" not in text


def test_the_held_out_set_is_detected_again_with_its_phase_read_in_its_own_convention():
    validation, held_out, with_phase = bench._sets(dev=False)
    assert (validation.use_phase, held_out.use_phase, with_phase.use_phase) == (True, False, True)
    assert with_phase.folder == held_out.folder and with_phase.recipe == held_out.recipe  # the same scans
    assert len({s.predictions for s in (validation, held_out, with_phase)}) == 3  # predictions kept apart
    # The simulator records the convention it wrote each phase in; the held-out domain writes it reversed.
    assert bench._phase_written_reversed({"variation": {"phase_sign": -1}})
    assert not bench._phase_written_reversed({"variation": {"phase_sign": 1}})
    assert not bench._phase_written_reversed({})  # a scan simulated before the convention was recorded
