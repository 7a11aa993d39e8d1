"""Compare detector variants on the tuning scans (never the benchmark set) at several thresholds.

Usage: python tools/compare_on_tuning_scans.py DIR
DIR holds simulated scans, e.g. `cmbdetector synth --out DIR --n 12 --seed 3 --acquisition mixed
--cmb-free-fraction 0.25 --mimic-level 1.2` (the scans the YOLO fusion was tuned on).
Prints per-lesion sensitivity, FP/scan and scan balanced accuracy for the CNN with and without the
phase channel, each with and without the YOLO stage. Locations are skipped (not needed here).
"""

import argparse
import glob
import json
from pathlib import Path

from CMBDetectorLib.evaluate import evaluate_scans
from CMBDetectorLib.io import read_volume
from CMBDetectorLib.pipeline import detect

VARIANTS = {"cnn magnitude": (False, False), "cnn magnitude+phase": (True, False),
            "cnn magnitude + yolo": (False, True), "cnn magnitude+phase + yolo": (True, True)}


def main(folder: str) -> None:
    scans = []
    for truth_file in sorted(glob.glob(str(Path(folder) / "*.truth.json"))):
        truth = json.loads(Path(truth_file).read_text())
        magnitude = read_volume(Path(folder) / truth["files"]["magnitude"])
        phase = read_volume(Path(folder) / truth["files"]["phase"])
        scans.append((truth, magnitude, phase))
    for name, (cnn_phase, use_yolo) in VARIANTS.items():
        found = [(truth, detect(magnitude, phase, threshold=0.1, locate=False, cnn_phase=cnn_phase,
                                use_yolo=use_yolo).findings) for truth, magnitude, phase in scans]
        for threshold in (0.2, 0.3, 0.5, 0.7):
            result = evaluate_scans(found, threshold=threshold)
            print(f"{name:28s} threshold {threshold:.2f}: sensitivity {result['lesion']['sensitivity']:.3f} "
                  f"FP/scan {result['lesion']['fp_per_scan']:.3f} "
                  f"balanced accuracy {result['scan']['balanced_accuracy']:.3f}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="simulated scans with their .truth.json (never the benchmark's)")
    main(parser.parse_args().folder)
