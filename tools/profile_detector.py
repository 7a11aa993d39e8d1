"""Where a warm Detector spends its time on one scan: per-stage seconds and the top functions (cProfile).

    .venv/bin/python tools/profile_detector.py SCAN.nii.gz [--phase PHASE.nii.gz] [--runs 3] [--top 25]

The models are loaded once (as in `cmbdetector batch`); the first run warms caches (the MNI templates),
the later ones are what a cohort pays per scan. Issue #15 asked for this profile to be committed.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

from CMBDetectorLib.io import read_volume
from CMBDetectorLib.pipeline import Detector


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scan")
    parser.add_argument("--phase")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--no-yolo", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    detector = Detector(use_yolo=not args.no_yolo)
    print(f"models loaded in {time.perf_counter() - started:.1f} s")
    volume = read_volume(args.scan)
    phase = read_volume(args.phase) if args.phase else None
    profiler = cProfile.Profile()
    for run in range(args.runs):
        if run == args.runs - 1:
            profiler.enable()
        started = time.perf_counter()
        detection = detector.detect(volume, phase)
        wall = time.perf_counter() - started
        profiler.disable()
        stages = ", ".join(f"{k} {v:.2f}" for k, v in detection.summary["timings_s"].items())
        print(f"run {run + 1}: {wall:.2f} s ({stages}); {len(detection.findings)} finding(s)")
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
