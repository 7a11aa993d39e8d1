"""How well does the detector see microbleeds on *my* scans? A check that needs no labels.

Microbleeds are drawn into the user's own scans with the simulator's physics (simulate/inject.py, as the
fine-tune injects them), several seeded times, and the Detector is asked to find them. What it measures is the
scan's part of generalisation: its anatomy, veins, noise, contrast and voxel size around lesions of known
position. The lesions themselves are the simulator's, so the result is an upper bound on what real lesions
would give on that protocol; the findings on the untouched scan are listed beside it (presumed false on a
scan without microbleeds).

    cmbdetector inject-check SCAN [SCAN ...] [--crop] [--repeats 6] [--count 6] [--lesions sphere] [--no-yolo]
                             [--json OUT]

`--lesions gaussian` or `flat` draws them by their look alone instead (simulate/inject.py): lesions unlike the
simulator's, of known contrast, for the question the sphere cannot answer.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from .evaluate import DEFAULT_TOLERANCE_MM, match

REPEATS = 6  # injections per scan, seeds 0..REPEATS-1 (each its own lesions)
COUNT = {False: 6, True: 3}  # microbleeds per injection: whole head, crop (a crop holds fewer, 10 mm apart)


def check(volume, detectors: dict, crop: bool = False, repeats: int = REPEATS, count: int | None = None,
          threshold: float | None = None, prepared=None, lesion_model: str = "sphere") -> dict:
    """Injected microbleeds found by each Detector in `detectors` (name -> Detector, at `threshold`; None:
    its operating point), over `repeats` seeded injections of up to `count` lesions. Other findings: per
    injected scan, those not within the matching distance of an injected lesion (what the scan itself
    gives, plus what the injection adds). prepared: `volume` as a detection already prepared it (its brain
    mask and tissue level choose where lesions may go), else prepared here. lesion_model: simulate/inject.py's.
    Per lesion, in injection order: "contrast" (its darkest voxel) and, per detector, "found_each" (bools)."""
    from .preprocess import prepare
    from .simulate.inject import inject_microbleeds

    count = COUNT[crop] if count is None else count
    prepared = prepare(volume, crop=crop) if prepared is None else prepared
    totals = {name: {"found": 0, "other_findings": 0, "found_each": []} for name in detectors}
    lesions, contrast = 0, []
    for seed in range(repeats):
        injected = inject_microbleeds(volume, None, prepared.mask, prepared.context, np.random.default_rng(seed),
                                      count, lesion_model=lesion_model)
        lesions += len(injected.centres_ras)
        contrast += [round(float(c), 3) for c in injected.contrast]
        for name, detector in detectors.items():
            findings = detector.detect(injected.magnitude, threshold=threshold, crop=crop).findings
            found = np.array([f.position_ras for f in findings], float).reshape(-1, 3)
            pairs = match(injected.centres_ras, found, DEFAULT_TOLERANCE_MM)
            matched = {truth_index for truth_index, *_ in pairs}
            totals[name]["found"] += len(pairs)
            totals[name]["other_findings"] += len(found) - len(pairs)
            totals[name]["found_each"] += [index in matched for index in range(len(injected.centres_ras))]
    return {"repeats": repeats, "count": count, "lesion_model": lesion_model, "lesions": lesions,
            "contrast": contrast, **totals}


def add_arguments(parser) -> None:
    from .pipeline import add_detector_arguments
    from .simulate.inject import LESION_MODELS

    parser.add_argument("inputs", nargs="+", help="GRE/SWI magnitudes (.nii/.nii.gz/.nrrd/.mha or DICOM folders), "
                        "ideally without microbleeds")
    parser.add_argument("--crop", action="store_true", help="the inputs are partial-brain crops")
    parser.add_argument("--repeats", type=int, default=REPEATS, help=f"injections per scan (default {REPEATS})")
    parser.add_argument("--count", type=int, default=None,
                        help=f"microbleeds per injection (default {COUNT[False]}, a crop {COUNT[True]})")
    parser.add_argument("--lesions", choices=LESION_MODELS, default="sphere", help="how the microbleeds are drawn: "
                        "the simulator's sphere physics (default), or by their look alone (gaussian, flat)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    add_detector_arguments(parser)


def run(args) -> int:
    from .classify import choose_device
    from .errors import InputError
    from .io import read_volume
    from .pipeline import Detector

    if args.repeats < 1 or (args.count is not None and args.count < 1):
        raise InputError("--repeats and --count must be at least 1")
    volumes = [(path, read_volume(path)) for path in args.inputs]  # every input read before the models load
    device, warning = choose_device(args.device)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    detector = Detector(args.model, device, use_yolo=not args.no_yolo, use_criteria=not args.no_criteria)
    rows = []
    for path, volume in volumes:
        clean = detector.detect(volume, threshold=args.threshold, crop=args.crop)
        result = check(volume, {"detector": detector}, args.crop, args.repeats, args.count, args.threshold,
                       clean.prepared, args.lesions)
        found, lesions = result["detector"]["found"], result["lesions"]
        rows.append({"input": str(path), "findings_without_injection": len(clean.findings), "repeats": args.repeats,
                     "count": result["count"], "lesion_model": args.lesions,
                     "lesions": lesions, "found": found,
                     "sensitivity": round(found / lesions, 3) if lesions else None,
                     "other_findings_per_scan": round(result["detector"]["other_findings"] / args.repeats, 2)})
        print(f"{path}: {found} of {lesions} injected microbleeds found"
              + (f" ({found / lesions:.2f})" if lesions else "")
              + f", {rows[-1]['other_findings_per_scan']:.2f} other findings per injected scan, "
              f"{len(clean.findings)} finding(s) on the scan as it is", flush=True)
    print(f"model {detector.model_version} ({'CNN + YOLO' if detector.yolo is not None else 'CNN alone'}); "
          "simulated lesions on your scans: an upper bound on what real microbleeds would give")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": detector.model_version, "scans": rows}, indent=1))
    return 0

