"""Does the pipeline give the same findings on a CUDA GPU as on the CPU, and how fast is it there?

    .venv/bin/python tools/check_cuda.py [--out cuda-check] [--scans 1] [--runs 2] [--gpu cuda]

`--device auto` (the default of detect, batch and the Slicer module) picks CUDA whenever PyTorch sees a GPU,
but CI has none: this check is run by hand on a machine that has one. It simulates --scans scans of every
acquisition (seeds 90000+: it compares devices, not accuracy, so any scans do), runs one Detector per device
on each (models loaded once, as `batch` does), and compares per scan: the findings (matched one-to-one
within 1 mm), their largest score and position differences, and the warm time of each device (the last of
--runs runs). Writes OUT/cuda-check.md and OUT/cuda-check.json; exits 1 when a device's findings differ
beyond the tolerance.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from CMBDetectorLib.evaluate import match
from CMBDetectorLib.pipeline import Detector
from CMBDetectorLib.simulate.domain import HELD_OUT_PROTOCOLS
from CMBDetectorLib.simulate.synth import PROTOCOLS, simulate_scan

SCORE_TOLERANCE = 0.01  # GPU kernels sum in another order: scores may differ in the last digits, not more
POSITION_MM = 1.0


def _findings(detection) -> tuple:
    positions = np.array([f.position_ras for f in detection.findings], float).reshape(-1, 3)
    scores = np.array([f.score for f in detection.findings], float)
    return positions, scores


def compare(cpu, gpu) -> dict:
    """Findings of the two devices matched one-to-one within POSITION_MM; what differs."""
    (p_cpu, s_cpu), (p_gpu, s_gpu) = _findings(cpu), _findings(gpu)
    pairs = match(p_cpu, p_gpu, POSITION_MM)
    score_diff = max((abs(s_cpu[i] - s_gpu[j]) for i, j, _ in pairs), default=0.0)
    position_diff = max((float(np.linalg.norm(p_cpu[i] - p_gpu[j])) for i, j, _ in pairs), default=0.0)
    return {"findings_cpu": len(s_cpu), "findings_gpu": len(s_gpu), "matched": len(pairs),
            "max_score_difference": round(float(score_diff), 5),
            "max_position_difference_mm": round(position_diff, 3),
            "same": bool(len(pairs) == len(s_cpu) == len(s_gpu) and score_diff <= SCORE_TOLERANCE)}


def _timed(detector, scan, runs: int) -> tuple:
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        detection = detector.detect(scan.magnitude, scan.phase)
        seconds.append(time.perf_counter() - started)
    return detection, seconds[-1]


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="cuda-check")
    parser.add_argument("--scans", type=int, default=1, help="scans per acquisition")
    parser.add_argument("--runs", type=int, default=2, help="runs per scan and device; the last is timed")
    parser.add_argument("--gpu", default="cuda", help="the device compared with the CPU (`cpu` dry-runs this check)")
    args = parser.parse_args()
    on_cuda = args.gpu == "cuda"
    if on_cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible to PyTorch: run this on a machine that has one")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    detectors = {"cpu": Detector(device="cpu"), "cuda": Detector(device=args.gpu)}
    rows = []
    for index, protocol in enumerate(p for p in PROTOCOLS + HELD_OUT_PROTOCOLS for _ in range(args.scans)):
        seed = 90000 + index
        scan = simulate_scan(seed, protocol, scan_id=f"cuda{seed}_{protocol}")
        if on_cuda:
            torch.cuda.reset_peak_memory_stats()
        results = {device: _timed(detector, scan, args.runs) for device, detector in detectors.items()}
        row = {"scan": scan.scan_id, "shape": list(scan.magnitude.array.shape),
               "seconds_cpu": round(results["cpu"][1], 2), "seconds_cuda": round(results["cuda"][1], 2),
               "cuda_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20) if on_cuda else 0,
               **compare(results["cpu"][0], results["cuda"][0])}
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {"gpu": torch.cuda.get_device_name(0) if on_cuda else args.gpu, "torch": torch.__version__,
              "cpu_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "runs": args.runs, "rows": rows}
    (out / "cuda-check.json").write_text(json.dumps(report, indent=2))
    command = f"tools/check_cuda.py --scans {args.scans} --runs {args.runs} --gpu {args.gpu}"
    lines = [f"# CPU against CUDA: `{command}`", "",
             f"GPU: {report['gpu']}; PyTorch {report['torch']}; CPU side: {report['cpu_threads']} torch threads. "
             f"Warm seconds per scan (the last of {args.runs} runs, models loaded once); findings matched within "
             f"{POSITION_MM} mm; 'same' needs every finding matched and scores within {SCORE_TOLERANCE}.", "",
             "| scan | shape | findings CPU / CUDA | matched | max score diff | max position diff (mm) | CPU s "
             "| CUDA s | CUDA peak MB | same |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['scan']} | {'x'.join(map(str, r['shape']))} | {r['findings_cpu']} / {r['findings_gpu']} | "
              f"{r['matched']} | {r['max_score_difference']} | {r['max_position_difference_mm']} | "
              f"{r['seconds_cpu']} | {r['seconds_cuda']} | {r['cuda_peak_mb']} | {'yes' if r['same'] else '**no**'} |"
              for r in rows]
    (out / "cuda-check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["same"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
