"""`cmbdetector bench` (`make bench`): the benchmark anyone can rerun with one command.

1. Simulates two fixed validation sets unless they are already in OUT: the in-distribution set (OUT/val:
   seed 2, 30 nominal scans, every acquisition, 30 % CMB-free, mimic-rich; detected with the phase) and the
   out-of-distribution set (OUT/ood: seed 3, 30 scans from the simulator's held-out domain, settings no
   training scan used; detected from the magnitude alone, as most users will, and once more with its phase
   read in the sign convention it was written with), plus one nominal 3 T SWI scan (0.5 x 0.5 x 2 mm) for
   timing.
2. Detects every scan once per configuration (the 3D CNN alone, and the full pipeline with the YOLO
   stage when its weights ship), in worker processes; the real scans in shared/data/real-gre (no
   microbleeds: every finding is presumed false) too; then runs `cmbdetector detect` on the timing scan
   alone in a fresh process for honest time and peak memory.
3. Evaluates with the field's metrics (5 mm one-to-one matching), the brain masks against the simulator's
   true masks (Dice), and writes a Markdown table and the raw JSON beside it. Numbers are as measured on
   this machine; nothing is edited by hand.

`cmbdetector bench --dev` runs the same on the development sets instead (DEV_VALIDATION and
DEV_OUT_OF_DISTRIBUTION; no real scans): where a change is chosen, with the pipeline it will ship in,
before `make bench` scores it once.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .classify import DEFAULT_MODEL
from .errors import CMBError
from .evaluate import DEFAULT_TOLERANCE_MM
from .simulate.synth import simulate_set
from .train.dataset import POSITIVE_MM
from .workers import process_pool

VALIDATION = {"n": 30, "seed": 2, "acquisition": "mixed", "cmb_free_fraction": 0.3, "mimic_level": 1.5}
OUT_OF_DISTRIBUTION = {"n": 30, "seed": 3, "acquisition": "ood", "cmb_free_fraction": 0.3, "mimic_level": 1.5}
# Development sets: the same recipes, other seeds. Never the benchmark's.
DEV_VALIDATION = {**VALIDATION, "seed": 31}
DEV_OUT_OF_DISTRIBUTION = {**OUT_OF_DISTRIBUTION, "seed": 71}
DEV_OUT, DEV_TABLE = "bench-dev", "bench-dev/benchmark-dev.md"
REAL_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "real-gre"
REAL_SCANS = (("philips-3t-dual-echo/mag_echo2.nii.gz", False), ("romeo_small/Mag.nii", True),
              ("romeo_small2/Mag.nii", True))  # (path under REAL_DIR, partial-brain crop)
TIMING_SCAN = {"seed": 99, "acquisition": "swi3t", "spacing_mm": (0.5, 0.5, 2.0), "scan_id": "timing_swi3t"}
# Validation scans are detected down to this score so that the FROC sweeps past the operating point;
# the operating-point metrics count only findings at or above each configuration's tuned threshold.
FROC_FLOOR = 0.05
FROC_TABLE_LEVELS = ("0.125", "0.25", "0.5", "1", "2")


class BenchSet(NamedTuple):
    """One detection of a validation set: its scans (folder under OUT, made from recipe), whether the phase is
    given, and where the predictions go. Two of them may share scans (the held-out set with and without its
    phase); the brain masks and stage 1's reach are reported once per folder."""
    name: str
    folder: str
    recipe: dict
    use_phase: bool
    predictions: str  # prefix of the prediction folders, one per configuration


# The held-out set once more with its phase, read in the convention it was written with (reversed where the
# simulator wrote it the other way, as `--flip-phase` does): what a reader who knows the vendor's sign gets.
OOD_WITH_PHASE = "out-of-distribution, with phase"


def _sets(dev: bool) -> tuple:
    """The benchmark's detections: the in-distribution set with its phase, the held-out set without and with."""
    validation, held_out = (DEV_VALIDATION, DEV_OUT_OF_DISTRIBUTION) if dev else (VALIDATION, OUT_OF_DISTRIBUTION)
    return (BenchSet("in-distribution", "val", validation, True, "pred"),  # the folders keep their old names
            BenchSet("out-of-distribution", "ood", held_out, False, "pred-ood"),
            BenchSet(OOD_WITH_PHASE, "ood", held_out, True, "pred-ood-phase"))


def add_arguments(parser) -> None:
    parser.add_argument("--out", help=f"work folder (validation scans, predictions); default bench-output, "
                                      f"with --dev {DEV_OUT}")
    parser.add_argument("--table", help=f"Markdown results table to write; default docs/benchmark.md, with --dev "
                                        f"{DEV_TABLE}")
    parser.add_argument("--dev", action="store_true",
                        help=f"the development sets instead (seeds {DEV_VALIDATION['seed']} and "
                             f"{DEV_OUT_OF_DISTRIBUTION['seed']}, no real scans): choose a change here, then let "
                             "`make bench` score it")
    parser.add_argument("--jobs", type=int, default=2, help="processes for simulating the validation set")
    parser.add_argument("--configs", default="auto", help="cnn, full or auto (both when YOLO weights ship)")
    parser.add_argument("--real", default=str(REAL_DIR), help="folder of the real GRE scans (skipped if absent)")
    parser.add_argument("--reuse", action="store_true",
                        help="evaluate the validation predictions already in OUT instead of detecting again "
                             "(the timing scan is always run again, alone)")


def _simulate_timing_scan(folder: Path) -> Path:
    from .simulate.synth import simulate_scan, write_scan

    path = folder / f"{TIMING_SCAN['scan_id']}.nii.gz"
    if not path.is_file():
        scan = simulate_scan(TIMING_SCAN["seed"], TIMING_SCAN["acquisition"], scan_id=TIMING_SCAN["scan_id"],
                             spacing_mm=TIMING_SCAN["spacing_mm"])
        write_scan(scan, folder)
    return path


def _truth_of(magnitude: Path) -> dict:
    return json.loads(magnitude.with_name(magnitude.name.replace(".nii.gz", ".truth.json")).read_text())


def phase_file(magnitude: Path) -> Path:
    """The phase image of a simulated scan, as its truth file names it."""
    return magnitude.with_name(_truth_of(magnitude)["files"]["phase"])


def _detect_scan(job) -> dict:
    """Detect one validation scan under every configuration, in this worker process; write predictions.

    A scan the pipeline refuses gets no prediction files (evaluated as no findings) and a summary that
    says why; the first configuration's brain mask is compared with the simulator's true one."""
    magnitude, pred_dirs, configs, use_phase = job
    from .errors import InputError
    from .io import read_volume
    from .pipeline import detect, read_phase, write_outputs

    truth = _truth_of(magnitude)
    volume = read_volume(magnitude)
    phase = (read_phase(magnitude.with_name(truth["files"]["phase"]), flip=_phase_written_reversed(truth))
             if use_phase else None)
    summaries = {}
    for config in configs:
        try:
            detection = detect(volume, phase, use_yolo=(config == "full"), threshold=FROC_FLOOR,
                               model_path=DEFAULT_MODEL)  # the shipped model, whichever the user made active
        except InputError as error:
            summaries[config] = {"refused": str(error)}
            continue
        write_outputs(detection, pred_dirs[config], truth["scan_id"], png=False)
        summaries[config] = detection.summary
        if "brain_check" not in summaries:
            summaries["brain_check"] = _brain_check(magnitude, truth, detection.prepared.mask,
                                                    detection.prepared.mask_method)
            summaries["screening_check"] = _screening_check(truth, detection.screened_ras)
            _screening_file(pred_dirs[config], truth["scan_id"]).write_text(json.dumps(summaries["screening_check"]))
    return summaries


def _phase_written_reversed(truth: dict) -> bool:
    """The simulator wrote this scan's phase in the opposite sign convention (the held-out domain does)."""
    return truth.get("variation", {}).get("phase_sign", 1) < 0


def _screening_file(pred_dir: Path, scan_id: str) -> Path:
    return pred_dir / f"{scan_id}.screening.json"


def _screening_check(truth: dict, screened_ras) -> dict:
    """How far each true microbleed lies from its nearest stage-1 candidate (None: no candidate at all):
    a lesion with none within the matching distance was lost before any network saw it."""
    centres = np.asarray(screened_ras if screened_ras is not None else [], float).reshape(-1, 3)
    distances = [round(float(np.linalg.norm(centres - np.asarray(m["center_ras"]), axis=1).min()), 2)
                 if len(centres) else None for m in truth["microbleeds"]]
    return {"acquisition": truth["acquisition"]["name"], "nearest_candidate_mm": distances}


def _brain_check(magnitude: Path, truth: dict, mask=None, method: str = "") -> dict | None:
    """Dice and volume of the automatic brain mask against the simulator's true one (None for scans made
    before true masks were written). Without a mask (reused predictions) it is extracted again by the same
    brain.extract_brain that detection ran; its registration is multi-threaded, so the Dice can differ from
    detection's mask in the third decimal."""
    from .brain import mask_dice
    from .io import read_volume

    if "brain" not in truth["files"]:
        return None
    if mask is None:
        from .brain import extract_brain

        extracted = extract_brain(read_volume(magnitude))
        mask, method = extracted.mask, extracted.method
    true_volume = read_volume(magnitude.with_name(truth["files"]["brain"]))
    true_mask = true_volume.array > 0.5
    voxel_ml = float(np.prod(true_volume.spacing)) / 1000.0
    return {"acquisition": truth["acquisition"]["name"], "method": method,
            "dice": round(mask_dice(mask, true_mask), 4),
            "volume_ml": round(float(mask.sum() * voxel_ml), 1), "true_volume_ml": round(float(true_mask.sum() * voxel_ml), 1)}


def _detect_real(real_dir: Path, configs: list) -> list:
    """Findings at each configuration's operating threshold on the real scans (none has a microbleed), then
    on the same scans with microbleeds injected (injection_check)."""
    from . import injection_check
    from .errors import InputError
    from .io import read_volume
    from .pipeline import Detector

    detectors = {config: Detector(DEFAULT_MODEL, use_yolo=(config == "full")) for config in configs}
    rows = []
    for relative, crop in REAL_SCANS:
        path = real_dir / relative
        if not path.is_file():
            continue
        volume = read_volume(path)
        row = {"scan": relative, "crop": crop, "shape": list(volume.shape),
               "spacing_mm": [round(float(v), 3) for v in volume.spacing]}
        prepared = None  # the scan as the detections prepared it, reused by the injection check
        for config, detector in detectors.items():
            try:
                detection = detector.detect(volume, crop=crop)
            except InputError as error:
                row[config] = {"refused": str(error)}
                continue
            prepared, summary = detection.prepared, detection.summary
            row[config] = {"findings": summary["counts"]["total"], "mask": summary["mask"],
                           "candidates": summary["candidates"],
                           "scores": [round(f["score"], 3) for f in summary["findings"]]}
        if all("refused" not in row[config] for config in configs):
            row["injected"] = injection_check.check(volume, detectors, crop, prepared=prepared)
        rows.append(row)
        print(f"real {relative}: " + ", ".join(f"{c} {row[c].get('findings', 'refused')}" for c in configs), flush=True)
    return rows


def _run_set(out: Path, bench_set: BenchSet, configs: list, args, check_masks: bool = True) -> tuple:
    """Simulate (if needed) and detect one validation set; returns (truth folder, magnitude paths, per-scan
    summaries in the same order, prediction folders by configuration). check_masks=False: reused predictions
    get no second brain extraction (another detection of the same scans reports their masks)."""
    truth_dir = out / bench_set.folder
    truth_dir.mkdir(parents=True, exist_ok=True)
    scans = simulate_set(truth_dir, bench_set.recipe, args.jobs)
    pred_dirs = {config: out / f"{bench_set.predictions}-{config}" for config in configs}
    for pred in pred_dirs.values():
        pred.mkdir(exist_ok=True)
    jobs = [(scan, pred_dirs, configs, bench_set.use_phase) for scan in scans]
    if args.reuse:
        per_scan = [{config: json.loads((pred_dirs[config] / scan.name.replace(".nii.gz", ".json")).read_text())
                     for config in configs} for scan in scans]
        if check_masks:
            for scan, summaries in zip(scans, per_scan):
                summaries["brain_check"] = _brain_check(scan, _truth_of(scan))
                screening = _screening_file(pred_dirs[configs[0]], _truth_of(scan)["scan_id"])
                if screening.is_file():
                    summaries["screening_check"] = json.loads(screening.read_text())
    elif args.jobs > 1:
        with process_pool(args.jobs) as pool:
            per_scan = list(pool.map(_detect_scan, jobs))
    else:
        per_scan = [_detect_scan(job) for job in jobs]
    for scan, summaries in zip(scans, per_scan):
        print(f"{scan.name}: " + ", ".join(
            f"{c} refused" if "refused" in summaries[c] else
            f"{c} {summaries[c]['counts']['total']} finding(s) {summaries[c]['timings_s']['total']:.1f} s" for c in configs),
            flush=True)
    return truth_dir, scans, per_scan, pred_dirs


def _brain_summary(per_scan: list) -> dict:
    """Dice and volumes of the automatic brain masks, by acquisition."""
    by_acquisition = {}
    for summaries in per_scan:
        check = summaries.get("brain_check")
        if check:
            by_acquisition.setdefault(check["acquisition"], []).append(check)
    return {name: {"scans": len(rows), "dice_min": min(r["dice"] for r in rows),
                   "dice_mean": round(float(np.mean([r["dice"] for r in rows])), 4),
                   "volume_ml": [min(r["volume_ml"] for r in rows), max(r["volume_ml"] for r in rows)],
                   "methods": sorted({r["method"] for r in rows})}
            for name, rows in sorted(by_acquisition.items())}


def _screening_summary(per_scan: list) -> dict:
    """Stage 1's reach, by acquisition: lesions with a candidate within the matching distance and within
    the CNN's training radius for a positive (a candidate farther off is an off-centre patch to the CNN)."""
    by_acquisition = {}
    for summaries in per_scan:
        check = summaries.get("screening_check")
        if check:
            by_acquisition.setdefault(check["acquisition"], []).extend(check["nearest_candidate_mm"])
    summary = {}
    for name, distances in sorted(by_acquisition.items()):
        known = np.array([d for d in distances if d is not None], float)
        summary[name] = {"lesions": len(distances),
                         "screened": int((known <= DEFAULT_TOLERANCE_MM).sum()),
                         "centred": int((known <= POSITIVE_MM).sum()),
                         "median_distance_mm": round(float(np.median(known)), 2) if len(known) else None}
    return summary


def _detect_alone(magnitude: Path, out: Path, config: str) -> dict:
    """Run detect in a fresh process, alone on the machine: honest time and peak memory for one scan."""
    phase = phase_file(magnitude)
    command = [sys.executable, "-m", "CMBDetectorLib.cli", "detect", str(magnitude), "--phase", str(phase),
               "--out", str(out), "--no-png", "--model", str(DEFAULT_MODEL)]
    if config == "cnn":
        command.append("--no-yolo")
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise CMBError(f"detect failed on {magnitude.name}: {result.stderr.strip().splitlines()[-1:]}")
    summary = json.loads((out / magnitude.name.replace(".nii.gz", ".json")).read_text())
    summary["process_wall_s"] = round(wall, 2)
    return summary


def _yolo_available() -> bool:
    try:
        from .yolo import DEFAULT_YOLO
    except ImportError:
        return False
    return Path(DEFAULT_YOLO).is_file()


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"


def _commit() -> str:
    try:
        # "-dirty" marks numbers measured with uncommitted changes (weights included)
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _subset(truth_dir: Path, pred_dir: Path, stems: list) -> list:
    from .evaluate import read_predictions

    scans = []
    for stem in stems:
        truth = json.loads((truth_dir / f"{stem}.truth.json").read_text())
        scans.append((truth, read_predictions(pred_dir, stem)))
    return scans


def _mimic_rich(truth_dir: Path) -> list:
    """The half of the validation scans with the most mimics (veins + calcifications)."""
    load = []
    for path in sorted(truth_dir.glob("*.truth.json")):
        truth = json.loads(path.read_text())
        load.append((len(truth["mimics"]["veins"]) + 3 * len(truth["mimics"]["calcifications"]), truth["scan_id"]))
    load.sort(reverse=True)
    return [stem for _, stem in load[: max(1, len(load) // 2)]]


def run(args) -> int:
    from .evaluate import evaluate_directories, evaluate_scans

    out = Path(args.out or (DEV_OUT if args.dev else "bench-output"))
    out.mkdir(parents=True, exist_ok=True)
    sets = _sets(args.dev)
    timing_scan = _simulate_timing_scan(out / "timing")
    configs = ["cnn", "full"] if args.configs == "auto" and _yolo_available() else (
        ["cnn"] if args.configs == "auto" else args.configs.split(","))
    report = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": _machine(),
              "commit": _commit(), "dev": args.dev, "validation": sets[0].recipe, "out_of_distribution": sets[1].recipe,
              "configs": {}, "sets": {}, "brain_mask": {}, "screening": {}}
    for bench_set in sets:
        set_name = bench_set.name
        first_of_its_scans = bench_set.folder not in {s.folder for s in sets[: sets.index(bench_set)]}
        truth_dir, scans, per_scan, pred_dirs = _run_set(out, bench_set, configs, args, first_of_its_scans)
        if first_of_its_scans:  # the same scans have the same masks and stage-1 reach: reported once
            report["brain_mask"][set_name] = _brain_summary(per_scan)
            report["screening"][set_name] = _screening_summary(per_scan)
        truths = [_truth_of(scan) for scan in scans]
        acquisitions = {scan.name[: -len(".nii.gz")]: truth["acquisition"]["name"]
                        for scan, truth in zip(scans, truths)}
        set_report = {"phase_given": bench_set.use_phase, "configs": {},
                      "phase_reversed": sum(map(_phase_written_reversed, truths)) if bench_set.use_phase else 0}
        for config in configs:
            summaries = [s[config] for s in per_scan]
            done = [s for s in summaries if "refused" not in s]
            operating = _operating_threshold(done)
            results = evaluate_directories(truth_dir, pred_dirs[config], threshold=operating, allow_missing=True)
            by_acquisition_froc = {}
            for acquisition in sorted(results.get("by_acquisition", {})):
                stems = [stem for stem, name in acquisitions.items() if name == acquisition]
                subset = evaluate_scans(_subset(truth_dir, pred_dirs[config], stems), threshold=operating)
                by_acquisition_froc[acquisition] = {"lesion": subset["lesion"],
                                                    "sensitivity_at_1fp": subset["froc"]["sensitivity_at"].get("1")}
            set_report["configs"][config] = {
                "operating_threshold": operating, "results": results, "by_acquisition": by_acquisition_froc,
                "refused": [{"scan": scan.name, "why": s["refused"]} for scan, s in zip(scans, summaries)
                            if "refused" in s],
                "time_per_scan_s": {"mean": round(float(np.mean([s["timings_s"]["total"] for s in done])), 2),
                                    "max": round(float(np.max([s["timings_s"]["total"] for s in done])), 2)},
                "registration_s": _registration_seconds(done),
            }
            if bench_set.folder == "val":
                set_report["configs"][config]["mimic_rich"] = evaluate_scans(
                    _subset(truth_dir, pred_dirs[config], _mimic_rich(truth_dir)), threshold=operating)
        if "cnn" in configs and "full" in configs:
            set_report["configs"]["full"]["matched"] = _matched_sensitivity(set_report["configs"])
        report["sets"][set_name] = set_report
    report["configs"] = report["sets"]["in-distribution"]["configs"]  # the sections below read the main set
    for config in configs:
        timing = _detect_alone(timing_scan, out / f"timing-{config}", config)
        report["configs"][config]["timing_scan"] = {
            "shape": timing["shape"], "spacing_mm": timing["spacing_mm"], "timings_s": timing["timings_s"],
            "peak_rss_mb": timing["peak_rss_mb"], "process_wall_s": timing["process_wall_s"]}
    real_dir = Path(args.real)
    report["real"] = _detect_real(real_dir, configs) if real_dir.is_dir() and not args.dev else []
    report["parallel_workers"] = args.jobs
    report["froc_floor"] = FROC_FLOOR
    if "cnn" in report["configs"] and "full" in report["configs"]:
        # The CNN alone cut at the full pipeline's threshold: what YOLO changes at the same score cut.
        same_cut = evaluate_directories(out / "val", out / "pred-cnn", threshold=report["configs"]["full"]["operating_threshold"],
                                        allow_missing=True)
        report["configs"]["cnn"]["at_full_threshold"] = {key: same_cut[key] for key in ("threshold", "lesion", "fp_causes")}
    table = Path(args.table or (DEV_TABLE if args.dev else "docs/benchmark.md"))
    table.parent.mkdir(parents=True, exist_ok=True)
    # "configs" is the in-distribution set's entry of "sets" under a second name: stored once
    stored = {key: value for key, value in report.items() if key != "configs"}
    table.with_suffix(".json").write_text(json.dumps(stored, indent=1, default=str))
    table.write_text(format_report(report))
    print(table.read_text())
    print(f"wrote {table} and {table.with_suffix('.json')}")
    return 0


def _registration_seconds(summaries: list) -> dict:
    seconds = [s["registration"].get("seconds") for s in summaries if s["registration"].get("done")]
    return {"mean": round(float(np.mean(seconds)), 2) if seconds else None,
            "max": round(float(np.max(seconds)), 2) if seconds else None}


def _operating_threshold(summaries: list) -> float:
    """The tuned threshold the configuration ran under (older predictions only record the one applied)."""
    values = {s.get("operating_threshold", s["threshold"]) for s in summaries}
    if len(values) != 1:
        raise CMBError(f"validation scans were detected under different operating thresholds: {sorted(values)}")
    return float(values.pop())


def _fmt(value, digits=3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _with_interval(lesion: dict, key: str, digits: int = 3) -> str:
    """A pooled metric with its 95 % interval (evaluate's scan bootstrap), e.g. "0.903 (0.83-0.97)"."""
    interval = (lesion.get("ci95") or {}).get(key)
    text = _fmt(lesion.get(key), digits)
    return text if interval is None else f"{text} ({interval[0]:.2f}-{interval[1]:.2f})"


def _fp_cause_lines(report: dict) -> list:
    """False positives by the simulated mimic they sit on, each configuration at its operating threshold."""
    from .evaluate import FP_CAUSES, MIMIC_REACH_MM

    rows = [(name, config["operating_threshold"], config["results"]) for name, config in report["configs"].items()]
    same_cut = report["configs"].get("cnn", {}).get("at_full_threshold")
    if same_cut:
        rows.insert(1, ("cnn at the full pipeline's threshold", same_cut["threshold"], same_cut))
    if not all(results.get("fp_causes") for _, _, results in rows):
        return []
    lines = ["", "## False positives by cause", "",
             "Each false positive is blamed on the simulated mimic whose surface is nearest within reach ("
             + ", ".join(f"{cause} {reach:g} mm" for cause, reach in MIMIC_REACH_MM.items())
             + "), else 'other'. Veins are what the YOLO stage is for.", "",
             "| configuration | threshold | sensitivity | " + " | ".join(FP_CAUSES) + " | total |",
             "|---|---|---|" + "---|" * (len(FP_CAUSES) + 1)]
    for name, threshold, results in rows:
        causes = results["fp_causes"]
        lines.append(f"| {name} | {_fmt(threshold, 2)} | {_fmt(results['lesion']['sensitivity'])} | "
                     + " | ".join(str(causes[cause]) for cause in FP_CAUSES) + f" | {sum(causes.values())} |")
    return lines


def _froc_lines(report: dict) -> list:
    """FROC table, and what the YOLO stage buys read off the curves at the CNN alone's sensitivity."""
    floor = report.get("froc_floor")
    if floor is None:
        return []
    lines = ["", f"## FROC (every finding scoring >= {floor:g} kept, threshold swept)", "",
             "Sensitivity at a given FP/scan is read off the upper envelope of the curve (linear in between); "
             "'best real point' is the most sensitive actual threshold within the budget.", "",
             "| configuration | " + " | ".join(f"sens. at {level} FP/scan" for level in FROC_TABLE_LEVELS)
             + " | best real point at <= 0.5 FP/scan | curve reaches FP/scan |",
             "|---|" + "---|" * (len(FROC_TABLE_LEVELS) + 2)]
    for name, config in report["configs"].items():
        froc = config["results"]["froc"]
        best = froc.get("best_within", {}).get("0.5", {})
        point = "n/a" if best.get("threshold") is None else "{} at {} FP/scan (threshold {})".format(
            _fmt(best["sensitivity"]), _fmt(best["fp_per_scan"], 2), _fmt(best["threshold"], 2))
        lines.append(f"| {name} | " + " | ".join(_fmt(froc["sensitivity_at"].get(level)) for level in FROC_TABLE_LEVELS)
                     + f" | {point} | {_fmt(froc.get('fp_reach'), 2)} |")
    matched = report["configs"].get("full", {}).get("matched")  # present when both configurations ran
    if matched is not None:
        lines += ["", "Full pipeline at the CNN alone's operating sensitivity "
                  f"({_fmt(matched['cnn_sensitivity'])}, {_fmt(matched['cnn_fp_per_scan'], 2)} FP/scan): "
                  + ("never reached within the FROC floor." if matched["full"] is None else
                     "{} FP/scan at threshold {} ({} FP/scan).".format(
                         _fmt(matched["full"]["fp_per_scan"], 2), _fmt(matched["full"]["threshold"], 2),
                         "n/a" if matched["fp_change"] is None else f"{matched['fp_change'] * 100:+.0f} %"))]
        if matched.get("cnn_curve") is not None:
            lines[-1] += " The CNN alone's own curve reaches that sensitivity at {} FP/scan (threshold {}).".format(
                _fmt(matched["cnn_curve"]["fp_per_scan"], 2), _fmt(matched["cnn_curve"]["threshold"], 2))
        at_full = matched.get("at_full_sensitivity")
        if at_full and at_full["full"] and at_full["cnn"]:
            lines[-1] += (" At the full pipeline's operating sensitivity ({}) the CNN alone's curve needs {} FP/scan "
                          "(threshold {}), the full pipeline's {} (threshold {}): {} FP/scan.").format(
                _fmt(at_full["sensitivity"]), _fmt(at_full["cnn"]["fp_per_scan"], 2), _fmt(at_full["cnn"]["threshold"], 2),
                _fmt(at_full["full"]["fp_per_scan"], 2), _fmt(at_full["full"]["threshold"], 2),
                "n/a" if at_full["fp_change"] is None else f"{at_full['fp_change'] * 100:+.0f} %")
    return lines


def _matched_sensitivity(configs: dict) -> dict:
    """The full pipeline's cheapest FROC point that is at least as sensitive as the CNN alone at its operating
    threshold, and the CNN alone's own cheapest such point: another CNN threshold alone could give
    that one, so only a gain over it is the YOLO stage's. Both curves are also read at the full pipeline's
    operating sensitivity, so that a gain above the CNN alone's sensitivity shows too."""
    from .evaluate import fp_to_reach

    cnn = configs["cnn"]["results"]["lesion"]
    cnn_points = configs["cnn"]["results"]["froc"]["points"]
    full_points = configs["full"]["results"]["froc"]["points"]
    sensitivity = cnn["sensitivity"] or 0.0
    full = fp_to_reach(full_points, sensitivity)
    cnn_curve = fp_to_reach(cnn_points, sensitivity)
    change = None
    if full is not None and cnn["fp_per_scan"]:
        change = full["fp_per_scan"] / cnn["fp_per_scan"] - 1
    # And the other way round: both curves at the full pipeline's operating sensitivity.
    full_sensitivity = configs["full"]["results"]["lesion"]["sensitivity"] or 0.0
    at_full = {"sensitivity": full_sensitivity, "full": fp_to_reach(full_points, full_sensitivity),
               "cnn": fp_to_reach(cnn_points, full_sensitivity)}
    at_full["fp_change"] = (at_full["full"]["fp_per_scan"] / at_full["cnn"]["fp_per_scan"] - 1
                            if at_full["full"] and at_full["cnn"] and at_full["cnn"]["fp_per_scan"] else None)
    return {"cnn_sensitivity": cnn["sensitivity"], "cnn_fp_per_scan": cnn["fp_per_scan"], "full": full,
            "fp_change": change, "cnn_curve": cnn_curve, "at_full_sensitivity": at_full}


def _generalisation_lines(report: dict) -> list:
    """Both validation sets side by side at the shipped operating thresholds, and the gap between them."""
    sets = report.get("sets", {})
    if "out-of-distribution" not in sets:
        return []
    ood = report["out_of_distribution"]
    lines = ["", "## Generalisation: in distribution and out of distribution", "",
             f"Out-of-distribution set: {ood['n']} scans (seed {ood['seed']}) from the simulator's held-out domain "
             "(docs/simulator.md): 1.5 T SWI, 3 T thick-slice 2D GRE, coarse 1.5 T GRE, with vein, lesion, "
             "contrast, artefact and SWI-processing settings no training scan used; "
             f"{int(ood['cmb_free_fraction'] * 100)} % CMB-free, detected from the magnitude alone. "
             "Same shipped operating thresholds on both sets; the gap is out minus in."
             + (f" The last line of each configuration ({OOD_WITH_PHASE}) detects the same held-out scans with "
                "their phase, read in the sign convention each was written with (the held-out domain writes it "
                f"the other way: {sets[OOD_WITH_PHASE].get('phase_reversed', 0)} of {ood['n']} phases reversed on "
                "reading, as `detect --flip-phase` does): what a reader who gives the phase and knows the "
                "vendor's sign gets." if OOD_WITH_PHASE in sets else ""), "",
             "| configuration | set | threshold | sensitivity | FP/scan | sens. at 1 FP/scan (FROC) | "
             "scan balanced accuracy | scans refused |", "|---|---|---|---|---|---|---|---|"]
    for config in sets["in-distribution"]["configs"]:
        rows = {}
        for set_name, set_report in sets.items():
            entry = set_report["configs"][config]
            results = entry["results"]
            rows[set_name] = (results["lesion"]["sensitivity"], results["lesion"]["fp_per_scan"],
                              results["froc"]["sensitivity_at"].get("1"), results["scan"]["balanced_accuracy"])
            row = (f"| {config} | {set_name} | {_fmt(entry['operating_threshold'], 2)} | "
                   f"{_with_interval(results['lesion'], 'sensitivity')} | "
                   f"{_with_interval(results['lesion'], 'fp_per_scan', 2)} | {_fmt(rows[set_name][2])} | "
                   f"{_fmt(rows[set_name][3])} | {len(entry['refused'])} |")
            if set_name == OOD_WITH_PHASE:
                with_phase = row  # after the gap, which compares the magnitude-alone lines
            else:
                lines.append(row)
        gap = [None if a is None or b is None else b - a
               for a, b in zip(rows["in-distribution"], rows["out-of-distribution"])]
        ratio = (rows["out-of-distribution"][1] / rows["in-distribution"][1]
                 if rows["in-distribution"][1] else None)
        lines.append(f"| {config} | **gap** | | {_signed(gap[0])} | {_signed(gap[1], 2)}"
                     f"{'' if ratio is None else f' (x{ratio:.1f})'} | {_signed(gap[2])} | {_signed(gap[3])} | |")
        if OOD_WITH_PHASE in sets:
            lines.append(with_phase)
    held_out = [name for name in ("out-of-distribution", OOD_WITH_PHASE) if name in sets]
    lines += ["", "### Out of distribution, by acquisition", "",
              "| configuration | acquisition | phase given | sensitivity | FP/scan | sens. at 1 FP/scan (FROC) |",
              "|---|---|---|---|---|---|"]
    for config in sets["out-of-distribution"]["configs"]:
        for acquisition in sets["out-of-distribution"]["configs"][config]["by_acquisition"]:
            for set_name in held_out:
                values = sets[set_name]["configs"][config]["by_acquisition"].get(acquisition)
                if values is None:
                    continue
                lesion = values["lesion"]
                lines.append(f"| {config} | {acquisition} | {'yes' if sets[set_name].get('phase_given') else 'no'} | "
                             f"{_with_interval(lesion, 'sensitivity')} | {_with_interval(lesion, 'fp_per_scan', 2)} | "
                             f"{_fmt(values['sensitivity_at_1fp'])} |")
    lines += ["", "### The YOLO stage at equal sensitivity, on each set", "",
              "Both FROC curves read at the full pipeline's operating sensitivity on each set: what the YOLO "
              "stage buys beyond a CNN threshold change.", "",
              "| set | sensitivity | CNN alone FP/scan (threshold) | CNN + YOLO FP/scan (threshold) | change |",
              "|---|---|---|---|---|"]
    for set_name, set_report in sets.items():
        at_full = set_report["configs"].get("full", {}).get("matched", {}).get("at_full_sensitivity")
        if not at_full or not at_full["full"] or not at_full["cnn"]:
            continue
        lines.append(f"| {set_name} | {_fmt(at_full['sensitivity'])} | {_fmt(at_full['cnn']['fp_per_scan'], 2)} "
                     f"({_fmt(at_full['cnn']['threshold'], 2)}) | {_fmt(at_full['full']['fp_per_scan'], 2)} "
                     f"({_fmt(at_full['full']['threshold'], 2)}) | "
                     + ("n/a" if at_full["fp_change"] is None else f"{at_full['fp_change'] * 100:+.0f} %") + " |")
    lines += _screening_lines(report)
    for config, entry in sets["out-of-distribution"]["configs"].items():
        for refused in entry["refused"]:
            lines.append(f"\nRefused ({config}): {refused['scan']}: {refused['why']}")
    return lines


def _screening_lines(report: dict) -> list:
    """Each set's lesions by acquisition: reached by stage 1, then found by each configuration."""
    screening, sets = report.get("screening", {}), report.get("sets", {})
    if not any(screening.values()):
        return []
    configs = list(sets["in-distribution"]["configs"])
    lines = ["", "### Where the missed lesions are lost", "",
             f"Stage 1 'reaches' a lesion when a candidate lies within the matching distance "
             f"({_fmt(DEFAULT_TOLERANCE_MM, 1)} mm); 'centred' when within {_fmt(POSITIVE_MM, 1)} mm, the radius "
             "inside which the CNN's training candidates were positives (a candidate farther off shows the CNN "
             "an off-centre blob). Found: true positives at each configuration's operating threshold; the rest of "
             "the reached lesions were rejected by stages 2-3.", "",
             "| set | acquisition | lesions | reached by stage 1 | centred | median distance to nearest candidate mm | "
             + " | ".join(f"found: {c}" for c in configs) + " |", "|---|---|---|---|---|---|" + "---|" * len(configs)]
    for set_name, by_acquisition in screening.items():
        for acquisition, row in by_acquisition.items():
            found = [sets[set_name]["configs"][c]["by_acquisition"].get(acquisition, {}).get("lesion", {}).get("tp")
                     for c in configs]
            lines.append(f"| {set_name} | {acquisition} | {row['lesions']} | {row['screened']} | {row['centred']} | "
                         f"{_fmt(row['median_distance_mm'], 1)} | " + " | ".join(_fmt(f, 0) for f in found) + " |")
    return lines


def _signed(value, digits=3) -> str:
    return "n/a" if value is None else f"{value:+.{digits}f}"


def _brain_lines(report: dict) -> list:
    masks = report.get("brain_mask", {})
    if not any(masks.values()):
        return []
    lines = ["", "## Brain masks (automatic, against the simulator's true mask)", "",
             "| set | acquisition | scans | Dice min | Dice mean | volume mL (min-max) | method |", "|---|---|---|---|---|---|---|"]
    for set_name, by_acquisition in masks.items():
        for acquisition, row in by_acquisition.items():
            lines.append(f"| {set_name} | {acquisition} | {row['scans']} | {_fmt(row['dice_min'])} | "
                         f"{_fmt(row['dice_mean'])} | {row['volume_ml'][0]:.0f}-{row['volume_ml'][1]:.0f} | "
                         f"{', '.join(row['methods'])} |")
    return lines


def _real_lines(report: dict) -> list:
    rows = report.get("real", [])
    if not rows:
        return []
    configs = [c for c in report["configs"]]
    lines = ["", "## Real scans (shared/data/real-gre; no microbleeds, so every finding is presumed false)", "",
             "| scan | voxels | " + " | ".join(f"{c}: findings (scores)" for c in configs) + " | brain mask |",
             "|---|---|" + "---|" * len(configs) + "---|"]
    for row in rows:
        cells = []
        for config in configs:
            entry = row.get(config, {})
            cells.append(f"refused: {entry['refused']}" if "refused" in entry else
                         f"{entry['findings']} ({', '.join(f'{v:.2f}' for v in entry['scores']) or '-'})")
        mask = next((row[c]["mask"] for c in configs if "mask" in row.get(c, {})), None)
        mask_text = "n/a" if mask is None else f"{mask['method']}, {mask['volume_ml']:.0f} mL"
        lines.append(f"| {row['scan']}{' (crop)' if row['crop'] else ''} | {' x '.join(map(str, row['shape']))} | "
                     + " | ".join(cells) + f" | {mask_text} |")
    injected = [row for row in rows if row.get("injected")]
    if injected:
        from .injection_check import COUNT
        from .simulate import inject

        # what each row's JSON records (a report written before "count" was recorded: the constant of its time)
        repeats = "/".join(str(r) for r in sorted({row["injected"]["repeats"] for row in injected}))
        counts = {crop: "/".join(str(c) for c in sorted({row["injected"].get("count", COUNT[crop])
                                                         for row in injected if row["crop"] == crop}))
                  for crop in (False, True)}
        lesions_each = (f"up to {counts[False] or counts[True]} microbleeds"
                        + (f" (a crop: {counts[True]})" if counts[False] and counts[True] else ""))

        physics = (f"diameter {inject.DIAMETER_RANGE_MM[0]:g}-{inject.DIAMETER_RANGE_MM[1]:g} mm, "
                   f"{inject.CHI_RANGE_PPM[0]:g}-{inject.CHI_RANGE_PPM[1]:g} ppm, "
                   f"{' or '.join(f'{b0:g}' for b0 in inject.B0_CHOICES_T)} T, "
                   f"TE {inject.TE_RANGE_MS[0]:g}-{inject.TE_RANGE_MS[1]:g} ms, {inject.SWI_CHANCE:.0%} SWI-darkened")
        lines += ["", "### The same real scans with injected microbleeds", "",
                  f"Each scan {repeats} times, with {lesions_each} "
                  "drawn into it by the simulator's sphere physics (simulate/inject.py: "
                  f"{physics}), in brain tissue {inject.SEPARATION_MM:g} mm apart; magnitude only, at each "
                  "configuration's operating threshold. Real anatomy, veins, noise and voxel size around simulated "
                  "lesions: the lesions themselves are in distribution. Other findings: per injected scan, those not "
                  "within the matching distance of a lesion.", "",
                  "| scan | voxel mm | lesions | " + " | ".join(f"{c}: found (sensitivity) | {c}: other findings "
                                                               "per scan" for c in configs) + " |",
                  "|---|---|---|" + "---|---|" * len(configs)]
        for row in injected:
            result = row["injected"]
            cells = [f"{result[c]['found']} ({result[c]['found'] / max(result['lesions'], 1):.2f}) | "
                     f"{result[c]['other_findings'] / result['repeats']:.2f}" for c in configs]
            lines.append(f"| {row['scan']}{' (crop)' if row['crop'] else ''} | "
                         f"{' x '.join(f'{v:g}' for v in row['spacing_mm'])} | {result['lesions']} | "
                         + " | ".join(cells) + " |")
    return lines


def format_report(report: dict) -> str:
    title, rerun = (("# CMBDetector development run (the development sets, not the benchmark)",
                     "Rerun with `cmbdetector bench --dev` (seeded).") if report.get("dev") else
                    ("# CMBDetector benchmark",
                     "Rerun with `make bench` (same validation set: the simulator is seeded)."))
    lines = [title, "", f"Measured {report['date']} on {report['machine']}, commit {report['commit']}.", rerun, "",
             f"Validation set: {report['validation']['n']} simulated scans (seed {report['validation']['seed']}, "
             "3 T SWI, 3 T 3D GRE and 1.5 T thick-slice 2D GRE in turn, "
             f"{int(report['validation']['cmb_free_fraction'] * 100)} % CMB-free, mimic level "
             f"{report['validation']['mimic_level']}), "
             + ("never used for training; development changes are chosen on it. " if report.get("dev") else
                "never used for training or tuning. ") +
             "Per-lesion matching: one-to-one, centre distance <= 5 mm. FP/scan averages over all scans, "
             "CMB-free ones included. In brackets: 95 % intervals, from resampling whole scans "
             "(evaluate.py's bootstrap, seeded).", "",
             "## Overall, at each configuration's operating threshold", "",
             "Operating thresholds were tuned on simulated scans never benchmarked (model cards). "
             f"Validation scans were processed {report.get('parallel_workers', 1)} at a time (per-scan times include "
             "that sharing of the cores); the timing scan below ran alone in a fresh process.", "",
             "| configuration | threshold | sensitivity | precision | F1 | FP/scan | scan balanced accuracy | "
             "location agreement | time/scan mean (max) s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, config in report["configs"].items():
        r = config["results"]
        pooled = r["lesion"]
        lines.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} ({}) |".format(
            name, _fmt(config.get("operating_threshold"), 2), _with_interval(pooled, "sensitivity"),
            _fmt(pooled["precision"]), _fmt(pooled["f1"]), _with_interval(pooled, "fp_per_scan", 2),
            _fmt(r["scan"]["balanced_accuracy"]),
            _fmt(r.get("location", {}).get("agreement")),
            config["time_per_scan_s"]["mean"], config["time_per_scan_s"]["max"]))
    lines += _generalisation_lines(report)
    lines += _froc_lines(report)
    lines += ["", "## Mimic-rich half of the scans (most veins and calcifications)", "",
              "| configuration | sensitivity | precision | FP/scan |", "|---|---|---|---|"]
    for name, config in report["configs"].items():
        pooled = config["mimic_rich"]["lesion"]
        lines.append(f"| {name} | {_fmt(pooled['sensitivity'])} | {_fmt(pooled['precision'])} | "
                     f"{_fmt(pooled['fp_per_scan'], 2)} |")
    lines += _fp_cause_lines(report)
    lines += ["", "## By acquisition", "", "| configuration | acquisition | sensitivity | precision | FP/scan |",
              "|---|---|---|---|---|"]
    for name, config in report["configs"].items():
        for acquisition, values in sorted(config["results"].get("by_acquisition", {}).items()):
            lesion = values.get("lesion", values)
            pooled = lesion.get("pooled", lesion)
            lines.append(f"| {name} | {acquisition} | {_with_interval(pooled, 'sensitivity')} | "
                         f"{_fmt(pooled.get('precision'))} | {_with_interval(pooled, 'fp_per_scan', 2)} |")
    lines += _brain_lines(report)
    lines += _real_lines(report)
    lines += ["", "## Timing scan (3 T SWI, nominal 0.5 x 0.5 x 2 mm)", "",
              "| configuration | shape | per-stage seconds | total s | process wall s | peak RSS MB | registration s (validation mean / max) |",
              "|---|---|---|---|---|---|---|"]
    for name, config in report["configs"].items():
        timing = config["timing_scan"]
        stages = ", ".join(f"{k} {v:.1f}" for k, v in timing["timings_s"].items() if k != "total")
        lines.append(f"| {name} | {' x '.join(map(str, timing['shape']))} | {stages} | {timing['timings_s']['total']:.1f} | "
                     f"{timing['process_wall_s']:.1f} | {timing['peak_rss_mb']} | "
                     f"{_fmt(config['registration_s']['mean'], 1)} / {_fmt(config['registration_s']['max'], 1)} |")
    lines.append("")
    return "\n".join(lines)
