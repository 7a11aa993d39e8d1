"""`cmbdetector bench-cohort` (`make bench-cohort`): what a cohort costs, three ways, in one run.

1. N simulated scans of the benchmark's timing kind (bench.TIMING_SCAN: 3 T SWI, 0.5 x 0.5 x 2 mm; seeds
   TIMING_SCAN["seed"] + i), magnitude only.
2. A loop of `cmbdetector detect` processes, one per scan (what a study did before `batch`), against one
   `cmbdetector batch` on the embedded cluster (--workers, default 2): wall time, scans per hour, the warm
   per-scan time, the peak memory per process / worker.
3. One warm Detector in this process on every core, scans one after another, from the magnitude alone and
   with the phase (what the issue's per-scan targets are stated for, and the same threads as the dense
   reference below).
4. A dense MONAI BasicUNet sliding window (roi 96 x 96 x 64, overlap 0.25, default features, random
   weights: a cost reference, as SHIVA-CMB and nnU-Net-style segmenters run) over one volume of the same
   size, every core; the ratio to our per-scan time.
The table goes to --table with the command at its top, the machine, and the load average (others' work
on the machine slows every number; the header says so when it was high).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from .batch import COHORT_PARQUET
from .bench import TIMING_SCAN, _commit, _machine, phase_file
from .errors import CMBError
from .vocabulary import SUMMARY_SUFFIX, run_stem

UNET_ROI = (96, 96, 64)
UNET_OVERLAP = 0.25


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="bench-output/cohort", help="work folder (scans, detect and batch outputs)")
    parser.add_argument("--n", type=int, default=16, help="scans in the cohort")
    parser.add_argument("--workers", type=int, default=2, help="workers of batch's embedded cluster")
    parser.add_argument("--jobs", type=int, default=2, help="processes simulating the scans")
    parser.add_argument("--table", default="docs/benchmark-cohort.md", help="Markdown table to write")
    parser.add_argument("--no-unet", action="store_true", help="skip the dense U-Net reference")


def _simulate_one(job) -> str:
    from .simulate.synth import simulate_scan, write_scan

    seed, folder = job
    scan_id = f"cohort_{TIMING_SCAN['acquisition']}_{seed}"
    path = Path(folder) / f"{scan_id}.nii.gz"
    if not path.is_file():
        scan = simulate_scan(seed, TIMING_SCAN["acquisition"], scan_id=scan_id, spacing_mm=TIMING_SCAN["spacing_mm"])
        write_scan(scan, folder)
    return str(path)


def simulate_cohort(folder: Path, n: int, jobs: int) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    work = [(TIMING_SCAN["seed"] + index, str(folder)) for index in range(n)]
    if jobs > 1:
        from .workers import process_pool

        with process_pool(jobs) as pool:
            return [Path(p) for p in pool.map(_simulate_one, work)]
    return [Path(_simulate_one(job)) for job in work]


def _cli(*arguments) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "CMBDetectorLib.cli", *map(str, arguments)],
                          capture_output=True, text=True)


def time_detect_loop(scans: list, out: Path) -> dict:
    started = time.perf_counter()
    for scan in scans:
        result = _cli("detect", scan, "--out", out, "--force")
        if result.returncode != 0:
            raise RuntimeError(f"detect {scan} failed: {result.stderr.strip()}")
    wall = time.perf_counter() - started
    summaries = [json.loads((out / f"{run_stem(scan)}{SUMMARY_SUFFIX}").read_text()) for scan in scans]
    return {"wall_s": wall, "per_scan_s": [s["timings_s"]["total"] for s in summaries],
            "peak_rss_mb": max(s["peak_rss_mb"] for s in summaries)}


def time_batch(manifest: Path, out: Path, workers: int) -> dict:
    import polars as pl

    started = time.perf_counter()
    result = _cli("batch", manifest, "--out", out, "--workers", workers, "--force")
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"batch failed: {result.stdout.strip()} {result.stderr.strip()}")
    table = pl.read_parquet(out / COHORT_PARQUET)
    warm = table.filter(pl.col("detector_load_s") == 0)
    peaks = table.group_by("worker").agg(pl.col("peak_rss_mb").max()).sort("worker")
    return {"wall_s": wall, "warm_detect_s": warm["detect_s"].to_list(), "warm_scan_s": warm["scan_s"].to_list(),
            "load_s": table.filter(pl.col("detector_load_s") > 0)["detector_load_s"].to_list(),
            "peak_rss_mb_per_worker": peaks["peak_rss_mb"].to_list()}


def time_warm_detector(scans: list, runs: int = 3) -> dict:
    """Detect seconds of one Detector on every core, magnitude only ("magnitude") and with the phase ("phase"),
    for `runs` scans after a first one that warms it (the MNI templates and atlas are read on first use),
    nothing written."""
    import torch

    from .io import read_volume
    from .pipeline import Detector

    torch.set_num_threads(os.cpu_count() or 1)
    detector = Detector(device="cpu")
    seconds = {"magnitude": [], "phase": []}
    for index, scan in enumerate(scans[:runs + 1]):
        volume = read_volume(scan)
        for kind, phase in (("magnitude", None), ("phase", read_volume(phase_file(Path(scan))))):
            started = time.perf_counter()
            detector.detect(volume, phase)
            if index:
                seconds[kind].append(time.perf_counter() - started)
    return seconds


def time_dense_unet(shape) -> float:
    """Seconds of a dense BasicUNet sliding window over a random volume of `shape`, on every core."""
    import torch
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import BasicUNet

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    network = BasicUNet(spatial_dims=3, in_channels=1, out_channels=2).eval()
    volume = torch.randn(1, 1, *shape)
    started = time.perf_counter()
    with torch.no_grad():
        sliding_window_inference(volume, UNET_ROI, sw_batch_size=1, predictor=network, overlap=UNET_OVERLAP)
    return time.perf_counter() - started


def run(args) -> int:
    if args.n <= args.workers:
        raise CMBError(f"--n ({args.n}) must be larger than --workers ({args.workers}): the warm time needs "
                       "scans after each worker's first")
    out = Path(args.out)
    load_before = _load_average()
    scans = simulate_cohort(out / "scans", args.n, args.jobs)
    manifest = out / "manifest.csv"
    manifest.write_text("path\n" + "".join(f"{scan.resolve()}\n" for scan in scans))
    print(f"{len(scans)} scans in {out / 'scans'}; timing a detect loop ...", flush=True)
    loop = time_detect_loop(scans, out / "detect-loop")
    print(f"  {loop['wall_s']:.1f} s; timing batch on {args.workers} workers ...", flush=True)
    cohort = time_batch(manifest, out / "batch", args.workers)
    print(f"  {cohort['wall_s']:.1f} s", flush=True)
    print("timing one warm Detector on every core ...", flush=True)
    alone = time_warm_detector(scans)
    print(f"  {statistics.median(alone['magnitude']):.1f} s per scan, {statistics.median(alone['phase']):.1f} s "
          "with the phase", flush=True)
    shape = read_volume_shape(scans[0])
    unet_s = None
    if not args.no_unet:
        print(f"timing a dense BasicUNet sliding window on {shape} ...", flush=True)
        unet_s = time_dense_unet(shape)
        print(f"  {unet_s:.1f} s", flush=True)
    report = {"n": len(scans), "workers": args.workers, "loop": loop, "batch": cohort, "alone_s": alone["magnitude"],
              "alone_phase_s": alone["phase"], "unet_s": unet_s,
              "shape": list(shape), "load_before": load_before, "load_after": _load_average()}
    table = format_table(report, args)
    Path(args.table).parent.mkdir(parents=True, exist_ok=True)
    Path(args.table).write_text(table)
    print(table)
    return 0


def _load_average() -> float | None:
    """The 1-minute load average (None where the platform has none, as Windows)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def read_volume_shape(path) -> tuple:
    from .io import read_volume

    return read_volume(path).shape


def format_table(report: dict, args) -> str:
    n, loop, cohort = report["n"], report["loop"], report["batch"]
    loop_rate, batch_rate = n / loop["wall_s"] * 3600, n / cohort["wall_s"] * 3600
    if not cohort["warm_detect_s"]:  # every scan was its worker's first: raise --n above --workers
        raise CMBError(f"no warm scan to time: --n ({n}) must be larger than --workers ({report['workers']})")
    warm = statistics.median(cohort["warm_detect_s"])
    warm_scan = statistics.median(cohort["warm_scan_s"])
    alone = statistics.median(report["alone_s"])
    alone_phase = statistics.median(report["alone_phase_s"])
    # cluster start, model loading and each worker's first (cold) scan are paid once per run, not per scan
    steady_rate = report["workers"] * 3600 / warm_scan
    cores = os.cpu_count() or 1
    before, after = report["load_before"], report["load_after"]
    # only the load before the run is others' alone: during it this benchmark keeps every core busy itself
    busy = before is not None and before > 0.5 * cores
    load = (f"Load average {before:.1f} before the run on {cores} cores ({after:.1f} after it, its own work "
            "included)" if before is not None else "Load average not available")
    lines = [
        "# CMBDetector cohort benchmark",
        "",
        f"Command: `cmbdetector bench-cohort --out {args.out} --n {args.n} --workers {args.workers} --table {args.table}"
        f"{' --no-unet' if args.no_unet else ''}` (`make bench-cohort` runs it with --n 16 --workers 2).",
        "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {_machine()}, commit {_commit()}. "
        + (f"**Taken under load: {load}; other programs shared the cores, so every time is slower than on a "
           "quiet machine.**" if busy else f"{load}."),
        "",
        f"Cohort: {n} simulated 3 T SWI scans of the benchmark's timing kind (0.5 x 0.5 x 2 mm, "
        f"{' x '.join(map(str, report['shape']))} voxels, seeds {TIMING_SCAN['seed']}..{TIMING_SCAN['seed'] + n - 1}), "
        "magnitude only, every output written (PNG included).",
        "",
        "| | `detect` loop (one process per scan) | `batch`, embedded cluster |",
        "|---|---|---|",
        f"| processes | 1 at a time | {report['workers']} workers, 1 thread each |",
        f"| wall time, {n} scans | {loop['wall_s']:.1f} s | {cohort['wall_s']:.1f} s (cluster start and model "
        "loading included) |",
        f"| scans per hour | {loop_rate:.0f} | {batch_rate:.0f} (x{batch_rate / loop_rate:.2f}) |",
        f"| scans per hour once started (a large cohort: every scan pays what it pays here) | {loop_rate:.0f} | "
        f"{steady_rate:.0f} (x{steady_rate / loop_rate:.2f}; {report['workers']} workers / the warm scan time "
        "with reading) |",
        f"| per scan | {loop['wall_s'] / n:.1f} s wall (detect {statistics.mean(loop['per_scan_s']):.1f} s inside) | "
        f"warm Detector: {warm:.1f} s detect, {warm_scan:.1f} s with reading (median of "
        f"{len(cohort['warm_detect_s'])} warm scans); model loading {_mean(cohort['load_s'])} s once per worker |",
        f"| peak memory | {loop['peak_rss_mb']:.0f} MB per process | "
        + ", ".join(f"{peak:.0f} MB" for peak in cohort["peak_rss_mb_per_worker"]) + " per worker |",
        "",
        f"One warm Detector alone, {cores} threads, scans one after another (nothing written): **{alone:.1f} s per "
        f"scan** from the magnitude alone, **{alone_phase:.1f} s** with the phase (medians of {len(report['alone_s'])}, "
        "after a first scan that warms it). The batch workers above share the cores two ways, so their per-scan "
        "time is longer; their throughput is higher.",
    ]
    if report["unet_s"] is not None:
        lines += [
            "",
            f"Dense reference: MONAI BasicUNet (default features), sliding window roi {' x '.join(map(str, UNET_ROI))}, "
            f"overlap {UNET_OVERLAP}, random weights, {cores} threads, one volume of the same size: "
            f"**{report['unet_s']:.1f} s**: {report['unet_s'] / alone:.1f}x the warm Detector alone on the same "
            f"{cores} threads, {report['unet_s'] / warm:.1f}x a batch worker's per-scan time and "
            f"{report['unet_s'] / (cohort['wall_s'] / n):.1f}x batch's wall time per scan.",
        ]
    return "\n".join(lines) + "\n"


def _mean(values) -> str:
    return f"{statistics.mean(values):.1f}" if values else "-"
