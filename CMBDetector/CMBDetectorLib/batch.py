"""`cmbdetector batch INPUT --out DIR`: a cohort of scans on Dask distributed.

INPUT: a folder, a glob, a CSV manifest or a BIDS dataset (cohort_inputs.py). Each scan runs on a Dask
worker that keeps one warm `Detector` (models loaded and verified once per worker process) and writes
the same files as `detect` (pipeline.write_outputs) into DIR/<subject>[/<session>] or DIR/<stem>. Its
summary STEM.json gains a "batch" block: the SHA-256 of the input file(s), the model hashes, the settings
that change a result, the read time and the worker.

The cohort: DIR/cohort.csv and DIR/cohort.parquet (one row per scan, `status` ok or failed with a
one-line `reason`) and DIR/findings.parquet (one row per finding), each written atomically at the end.

Resuming: a scan whose STEM.json records the same input content hash, model hashes, settings and reading of
its phase (`phase_sign_reversed`) is skipped (its row is rebuilt from that summary); so is a scan the previous
run refused as input (unreadable, not a brain: `failure` = input) when its bytes have not changed. Other
failures (out of memory, a dead worker, an unexpected error, an output that cannot be written) are retried.
`--force` redoes everything. A killed run loses at most the scans in flight: each scan's files are atomic.

Exit status: 0 every scan ok; 3 (EXIT_SOME_FAILED) one or more failed rows; 2 a usage error (nothing ran).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .brain_model import DEFAULT_BRAIN_MODEL
from .classify import DEFAULT_MODEL, read_ensemble_card
from .cohort_inputs import ECHO_CHOICES, Scan, find_scans
from .errors import CMBError, InputError
from .outputs import check_output_stem, prepare_output_folder, write_all
from .vocabulary import LOBES, REGIONS, SUMMARY_SUFFIX
from .weights import sha256_of, verified_card

EXIT_SOME_FAILED = 3  # not 1: Python exits 1 on a crash, and a cohort with failed rows did not crash
COHORT_CSV, COHORT_PARQUET, FINDINGS_PARQUET = "cohort.csv", "cohort.parquet", "findings.parquet"
# Memory a worker is given room for: pipeline.estimated_peak_bytes of a 512 x 512 x 160 SWI (2.5 GB),
# rounded up for the worker's own overhead.
WORKER_MEMORY_BYTES = 3.0e9
# A failed row's `failure`: the stage that failed. Only KEPT_FAILURE (the input refused: unreadable, not a
# brain) depends on the input's bytes alone, so only it is kept by a rerun; resources, model, output, error
# and worker failures run again.
KEPT_FAILURE = "input"


@dataclass(frozen=True)
class Settings:
    """How every scan of the run is detected (what `detect`'s options say)."""

    model_path: str = str(DEFAULT_MODEL)
    device: str = "auto"
    use_yolo: bool = True
    use_criteria: bool = True
    yolo_path: str | None = None
    threshold: float | None = None
    locate: bool = True
    png: bool = True
    flip_phase: bool = False  # a given phase uses the opposite sign convention, unless its scan says (manifest)

    def result_key(self) -> dict:
        """What must match for an earlier result to stand (the model hashes and the phase's reading are
        compared apart; the device and the PNG do not change the findings)."""
        return {"threshold": self.threshold, "use_yolo": self.use_yolo, "use_criteria": self.use_criteria,
                "locate": self.locate}

    def reverses_phase(self, scan: Scan) -> bool:
        """Whether this scan's phase is read with its sign reversed: its manifest's say, else the run's."""
        return bool(scan.phase) and (self.flip_phase if scan.flip_phase is None else scan.flip_phase)


# ----------------------------------------------------------------------------------------------------
# Identity of inputs and models
# ----------------------------------------------------------------------------------------------------

def input_content_hash(scan: Scan) -> str:
    """The SHA-256 of a scan's one input file (what `sha256sum` prints); for several files (a phase, a mask,
    a DICOM folder, the data file beside a detached .mhd/.nhdr header) the SHA-256 of the lines
    "role:name:sha256" of each, in order."""
    import hashlib

    lines = []
    for role, path in scan.files.items():
        path = Path(path)
        for file in _content_files(path):
            name = file.relative_to(path).as_posix() if path.is_dir() else file.name
            lines.append((role, name, sha256_of(file)))
    if len(lines) == 1:
        return lines[0][2]
    return hashlib.sha256("".join(f"{role}:{name}:{sha}\n" for role, name, sha in lines).encode()).hexdigest()


def _content_files(path: Path) -> list:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    if path.suffix.lower() in (".mhd", ".nhdr"):
        return [path] + sorted(p for p in path.parent.glob(f"{path.stem}.*") if p != path and p.is_file())
    return [path]


def expected_model_hashes(settings: Settings) -> dict:
    """The hashes `pipeline.Detector.model_hashes` reports for these settings, from the files alone (no
    torch, no weights loaded): the client compares them with finished summaries before any worker starts.
    WeightsError (a usage error) when the weights do not match their cards."""
    model_path = Path(settings.model_path)
    if model_path.suffix == ".json":
        card = read_ensemble_card(model_path)
        for member in card["members"]:
            verified_card(model_path.parent / member["file"])
        hashes = {"cnn": card["sha256"]}
    else:
        card, sha256 = verified_card(model_path)
        hashes = {"cnn": sha256}
    hashes["brain_mask"] = verified_card(DEFAULT_BRAIN_MODEL, "brain mask model")[1]
    if settings.use_yolo and card.get("stage3") != "off":  # as Detector decides: a site model may turn it off
        from .yolo import DEFAULT_YOLO

        yolo_path = Path(settings.yolo_path or DEFAULT_YOLO)
        if yolo_path.is_file():
            hashes["yolo"] = verified_card(yolo_path, what="YOLO model")[1]
    return hashes


# ----------------------------------------------------------------------------------------------------
# On a worker
# ----------------------------------------------------------------------------------------------------

_detectors = {}  # one warm Detector per worker process and settings
_detectors_lock = threading.Lock()


def warm_detector(settings: Settings):
    """This process's Detector for `settings` (built on first use) and the seconds building it took now."""
    from .pipeline import Detector

    key = (settings.model_path, settings.device, settings.use_yolo, settings.use_criteria, settings.yolo_path)
    with _detectors_lock:
        if key in _detectors:
            return _detectors[key], 0.0
        detector = Detector(settings.model_path, settings.device, use_yolo=settings.use_yolo,
                            yolo_path=settings.yolo_path, use_criteria=settings.use_criteria)
        _detectors[key] = detector
        return detector, detector.load_seconds


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if isinstance(error, CMBError) else f"{type(error).__name__}: {text}"


def process_scan(scan: Scan, settings: Settings, out_root: str, force: bool = False) -> dict:
    """Read, check, detect and write one scan (runs on a worker). Never raises: a failure is returned as
    {"status": "failed", "failure": stage, "reason": one line}; success carries the summary written."""
    from .io import read_volume, validate_brain_volume
    from .pipeline import check_fits_in_memory, echo_record, read_phase, write_results

    out_dir = Path(out_root) / scan.folder
    result = {"status": "failed", "failure": "input", "reason": "", "summary": None, "input_sha256": ""}
    stage, volume = "input", None
    try:
        started = time.perf_counter()
        result["input_sha256"] = input_content_hash(scan)
        volume = read_volume(scan.magnitude, echo=scan.echo)
        validate_brain_volume(volume, "input")
        phase = read_phase(scan.phase, echo=scan.echo, flip=settings.reverses_phase(scan)) if scan.phase else None
        mask = read_volume(scan.mask) if scan.mask else None
        read_seconds = time.perf_counter() - started
        stage = "resources"
        check_fits_in_memory(volume.shape)
        stage = "output"
        out_dir.mkdir(parents=True, exist_ok=True)
        warnings = check_output_stem(out_dir, scan.stem, force=force, input_path=scan.magnitude)
        stage = "model"
        detector, load_seconds = warm_detector(settings)
        stage = "input"  # what the detector refuses (not a brain) is a property of the scan
        detection = detector.detect(volume, phase, mask, threshold=settings.threshold, locate=settings.locate)
        stage = "output"
        summary = detection.summary
        summary["warnings"][:0] = warnings + volume.meta.get("warnings", []) + (
            phase.meta.get("warnings", []) if phase is not None else [])
        summary["echo"] = echo_record(scan.echo, volume)
        summary["batch"] = {
            "input_sha256": result["input_sha256"], "inputs": scan.files, "model_hashes": detector.model_hashes,
            "settings": settings.result_key(), "echo": scan.echo, "subject": scan.subject,
            "session": scan.session, "read_s": round(read_seconds, 3), "detector_load_s": round(load_seconds, 3),
            "scan_s": round(time.perf_counter() - started, 3), "worker": _worker_name(),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        write_results(detection, out_dir, scan.stem, scan.magnitude, force=force, png=settings.png)
        result.update(status="ok", failure="", summary=summary)
    except MemoryError:
        result.update(failure="resources", reason="out of memory while detecting")
    except Exception as error:  # noqa: BLE001 - one scan's failure must not stop the cohort
        failure = stage if isinstance(error, CMBError) else "error"
        if failure == "input" and volume is not None and _short_of_memory(volume.shape):
            failure = "resources"  # the detector's own memory check refused it: not a property of the scan
        result.update(failure=failure, reason=one_line(error))
    return result


def _short_of_memory(shape) -> bool:
    from .pipeline import check_fits_in_memory

    try:
        check_fits_in_memory(shape)
    except InputError:
        return True
    return False


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return get_worker().name if isinstance(get_worker().name, str) else str(get_worker().address)
    except (ImportError, ValueError):
        return f"pid {os.getpid()}"


# ----------------------------------------------------------------------------------------------------
# The cohort tables
# ----------------------------------------------------------------------------------------------------

LOBAR_COLUMNS = tuple(f"n_lobar_{lobe}" for lobe in LOBES if lobe)
REGION_COLUMNS = tuple(f"n_{region}" for region in REGIONS)
TIMING_COLUMNS = ("read_s", "preprocess_s", "candidates_s", "cnn_s", "yolo_s", "locate_s", "detect_s",
                  "detector_load_s", "scan_s")
MODEL_COLUMNS = ("cnn_sha256", "yolo_sha256")


def cohort_schema() -> dict:
    import polars as pl

    schema = {name: pl.String for name in ("subject", "session", "input", "phase", "mask", "summary",
                                           "status", "reason", "failure")}
    schema["skipped"] = pl.Boolean
    schema["phase_sign_reversed"] = pl.Boolean  # how the phase was read (`--flip-phase`, the manifest's cell)
    schema["n_total"] = pl.Int64
    schema.update({name: pl.Int64 for name in REGION_COLUMNS + LOBAR_COLUMNS})
    schema.update({"any_microbleed": pl.Boolean, "max_score": pl.Float64, "threshold": pl.Float64,
                   "candidates": pl.Int64})
    schema.update({name: pl.Float64 for name in TIMING_COLUMNS})
    schema.update({"peak_rss_mb": pl.Float64, "worker": pl.String, "finished_at": pl.String,
                   "input_sha256": pl.String})
    schema.update({name: pl.String for name in MODEL_COLUMNS})
    return schema


def findings_schema() -> dict:
    import polars as pl

    return {"subject": pl.String, "session": pl.String, "input": pl.String, "summary": pl.String,
            "label": pl.String, "x_ras": pl.Float64, "y_ras": pl.Float64, "z_ras": pl.Float64,
            "score": pl.Float64, "diameter_mm": pl.Float64, "region": pl.String, "lobe": pl.String,
            "status": pl.String, "candidate_score": pl.Float64, "cnn_score": pl.Float64, "yolo_score": pl.Float64,
            "kept_by": pl.String}


def summary_path(out_root, scan: Scan) -> Path:
    return Path(out_root) / scan.folder / f"{scan.stem}{SUMMARY_SUFFIX}"


def cohort_row(scan: Scan, out_root, status: str, summary: dict | None = None, reason: str = "",
               failure: str = "", skipped: bool = False, input_sha256: str = "") -> dict:
    """One row of cohort.csv / cohort.parquet; every count and timing is read from the scan's summary."""
    row = dict.fromkeys(cohort_schema())
    row.update(subject=scan.subject, session=scan.session, input=scan.magnitude, phase=scan.phase or "",
               mask=scan.mask or "", status=status, reason=reason, failure=failure, skipped=skipped,
               input_sha256=input_sha256, summary="")
    if summary is None:
        return row
    batch = summary.get("batch", {})
    timings = summary.get("timings_s", {})
    by_region = summary["counts"]["by_region"]
    lobes = [f.get("lobe", "") for f in summary["findings"] if f.get("region") == "lobar"]
    row.update({
        "summary": str(summary_path(out_root, scan)), "n_total": summary["counts"]["total"],
        "phase_sign_reversed": summary.get("phase_sign_reversed", False),
        **{f"n_{region}": int(by_region.get(region, 0)) for region in REGIONS},
        **{f"n_lobar_{lobe}": lobes.count(lobe) for lobe in LOBES if lobe},
        "any_microbleed": summary["scan_level"]["any_microbleed"], "max_score": summary["scan_level"]["max_score"],
        "threshold": summary["threshold"], "candidates": summary["candidates"],
        "read_s": batch.get("read_s"), "detect_s": timings.get("total"),
        "detector_load_s": batch.get("detector_load_s"), "scan_s": batch.get("scan_s"),
        **{f"{stage}_s": timings.get(stage) for stage in ("preprocess", "candidates", "cnn", "yolo", "locate")},
        "peak_rss_mb": summary.get("peak_rss_mb"), "worker": batch.get("worker"),
        "finished_at": batch.get("finished_at"), "input_sha256": batch.get("input_sha256", input_sha256),
        **{f"{key}_sha256": value for key, value in batch.get("model_hashes", {}).items()
           if f"{key}_sha256" in MODEL_COLUMNS},
    })
    return row


def finding_rows(scan: Scan, out_root, summary: dict) -> list:
    rows = []
    for finding in summary["findings"]:
        x, y, z = finding["position_ras"]
        stages = finding.get("stage_scores", {})
        rows.append({"subject": scan.subject, "session": scan.session, "input": scan.magnitude,
                     "summary": str(summary_path(out_root, scan)), "label": finding["label"],
                     "x_ras": x, "y_ras": y, "z_ras": z, "score": finding["score"],
                     "diameter_mm": _finite_or_none(finding.get("diameter_mm")), "region": finding["region"],
                     "lobe": finding.get("lobe", ""), "status": finding["status"],
                     "candidate_score": stages.get("candidate"), "cnn_score": stages.get("cnn"),
                     "yolo_score": stages.get("yolo"), "kept_by": finding.get("kept_by", "")})
    return rows


def _finite_or_none(value):
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def write_cohort_tables(out_root, rows: list, findings: list) -> dict:
    """cohort.csv, cohort.parquet and findings.parquet, each appearing whole (outputs.write_all)."""
    import polars as pl

    cohort = pl.DataFrame(rows, schema=cohort_schema(), orient="row")
    found = pl.DataFrame(findings, schema=findings_schema(), orient="row")
    out_root = Path(out_root)
    writers = {"cohort_csv": (out_root / COHORT_CSV, lambda path: cohort.write_csv(path)),
               "cohort_parquet": (out_root / COHORT_PARQUET, lambda path: cohort.write_parquet(path)),
               "findings_parquet": (out_root / FINDINGS_PARQUET, lambda path: found.write_parquet(path))}
    return write_all(writers, out_root, summary_key="cohort_csv")


def _previous_input_failures(out_root) -> dict:
    """The previous run's input failures by input, from its cohort.parquet ({} when there is none)."""
    path = Path(out_root) / COHORT_PARQUET
    if not path.is_file():
        return {}
    import polars as pl

    try:
        table = pl.read_parquet(path)
        failed = table.filter((pl.col("status") == "failed") & (pl.col("failure") == KEPT_FAILURE)
                              & (pl.col("input_sha256") != ""))
        return {(r["input"], r["phase"], r["mask"]): r for r in failed.iter_rows(named=True)}
    except Exception:  # noqa: BLE001 - an unreadable old table only means those scans run again
        return {}


def finished_summary(out_root, scan: Scan, input_sha256: str, model_hashes: dict, settings: Settings):
    """The summary of a finished result for exactly this input, models and settings, else None."""
    try:
        summary = json.loads(summary_path(out_root, scan).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    batch = summary.get("batch") if isinstance(summary, dict) else None
    if not isinstance(batch, dict):
        return None  # a `detect` run's result, or another program's file: run again
    same = (batch.get("input_sha256") == input_sha256 and batch.get("model_hashes") == model_hashes
            and batch.get("settings") == settings.result_key() and batch.get("echo") == scan.echo
            and summary.get("phase_sign_reversed", False) == settings.reverses_phase(scan))
    return summary if same else None


# ----------------------------------------------------------------------------------------------------
# The cluster
# ----------------------------------------------------------------------------------------------------

def default_worker_count(cores: int, available_bytes: float) -> int:
    """One single-threaded worker per core, as many as the memory holds: the Python parts of a scan run on
    one core, so one scan per core keeps every core busy (on 2 cores, see docs/benchmark-cohort.md)."""
    return max(1, min(cores, int(available_bytes // WORKER_MEMORY_BYTES)))


@contextmanager
def dask_client(scheduler: str | None, workers: int | None):
    """A distributed Client on the cluster at `scheduler`, or on an embedded LocalCluster of processes."""
    import dask
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout="30s")
        except (OSError, TimeoutError, ValueError) as error:
            raise CMBError(f"cannot reach the Dask scheduler at {scheduler}: {one_line(error)}") from None
        with client:
            yield client
        return
    import psutil

    cores = os.cpu_count() or 1
    count = workers or default_worker_count(cores, psutil.virtual_memory().available)
    threads = str(max(1, cores // count))  # torch, ITK and BLAS threads inside each worker's one scan
    thread_env = {name: threads for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                              "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")}
    # A task that kills its worker (memory) is tried on one other worker, not three, before it is a failed row.
    # Dask's nanny sets MALLOC_TRIM_THRESHOLD_ in its workers, which pins glibc's mmap threshold at 128 KiB:
    # every CNN batch buffer is then mapped and unmapped anew, and the CNN ran 2x slower (4.8 s against 2.4 s
    # per scan, 11 million page faults). None unsets it (Dask's documented override).
    with dask.config.set({"distributed.scheduler.allowed-failures": 1,
                          "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        # silence_logs: Dask's own log lines (heartbeats, comm tracebacks while the cluster shuts down) are
        # not the user's business; a scan's failure reaches its row and the progress line instead
        cluster = LocalCluster(n_workers=count, threads_per_worker=1, processes=True, env=thread_env,
                               dashboard_address=":0" if _has_bokeh() else None, silence_logs=logging.CRITICAL)
        try:
            with Client(cluster) as client:
                yield client
        finally:
            # a worker inside torch may take longer than the nanny's 4 s to stop; killing it is what we want
            logging.getLogger("distributed.nanny").setLevel(logging.ERROR)
            cluster.close()


def _has_bokeh() -> bool:
    import importlib.util

    return importlib.util.find_spec("bokeh") is not None  # the dashboard needs it; not in the lock


class Progress:
    """One line on stderr after every scan: done / failed, ETA and scans per hour, the dashboard."""

    def __init__(self, total: int, already: int, dashboard: str | None, stream=None):
        self.total, self.done, self.failed, self.already = total, 0, 0, already
        self.dashboard, self.stream = dashboard, stream or sys.stderr
        self.started = time.perf_counter()

    def update(self, ok: bool) -> None:
        self.done += 1
        self.failed += 0 if ok else 1
        self.print()

    def line(self) -> str:
        elapsed = time.perf_counter() - self.started
        remaining = self.total - self.done
        rate = self.done / elapsed if self.done and elapsed > 0 else None
        eta = f"ETA {_duration(remaining / rate)}" if rate else "ETA -"
        speed = f"{rate * 3600:.0f} scans/h" if rate else "- scans/h"
        text = (f"batch: {self.done}/{self.total} done, {self.failed} failed, {eta}, {speed}"
                f"{f', {self.already} done before' if self.already else ''}")
        return text + (f", dashboard {self.dashboard}" if self.dashboard else "")

    def print(self) -> None:
        print(self.line(), file=self.stream, flush=True)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _run_on_cluster(client, scans: list, settings: Settings, out_root: str, force: bool, already: int) -> dict:
    """{scan: worker result} for every scan, as they finish; a worker that dies fails its scan only."""
    from distributed import as_completed

    progress = Progress(len(scans), already, _dashboard_link(client))
    progress.print()
    futures = {client.submit(process_scan, scan, settings, out_root, force, pure=False,
                             key=f"cmbdetector-{scan.folder}/{scan.stem}-{index}"): scan
               for index, scan in enumerate(scans)}
    results = {}
    for future in as_completed(futures):
        scan = futures[future]
        try:
            result = future.result()
        except Exception as error:  # noqa: BLE001 - its worker died (killed, out of memory) or cannot run it
            result = {"status": "failed", "failure": "worker", "summary": None, "input_sha256": "",
                      "reason": f"the task failed on its worker ({one_line(error)})"}
        future.release()
        results[scan] = result
        progress.update(result["status"] == "ok")
    return results


def _dashboard_link(client) -> str | None:
    """The dashboard's address when the scheduler serves one (an embedded cluster needs bokeh for it)."""
    try:
        if client.cluster is not None and not _has_bokeh():
            return None
        return client.dashboard_link
    except (AttributeError, KeyError):
        return None


# ----------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("input", help="a folder of images, a glob, a CSV manifest (path, phase, mask, subject, "
                        "session) or a BIDS dataset")
    parser.add_argument("--out", required=True, help="output folder: per-scan results and the cohort tables")
    parser.add_argument("--scheduler", help="address of an existing Dask scheduler (default: an embedded "
                        "cluster on this machine)")
    parser.add_argument("--workers", type=int, help="workers of the embedded cluster (default: one per core, "
                        f"as many as the memory holds at {WORKER_MEMORY_BYTES / 1e9:.0f} GB each)")
    parser.add_argument("--force", action="store_true", help="redo scans already done; replace reviewed files")
    parser.add_argument("--echoes", default="last", choices=ECHO_CHOICES,
                        help="BIDS echo-N files: the longest echo of each acquisition (default) or every echo")
    from .pipeline import add_detector_arguments  # the same options, help and defaults as `detect`

    add_detector_arguments(parser)


def run(args) -> int:
    if args.workers is not None and (args.workers < 1 or args.scheduler):
        raise InputError("--workers must be at least 1, and sizes only the embedded cluster "
                         "(an existing cluster is sized where it is made)")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise InputError(f"threshold must be between 0 and 1, got {args.threshold}")
    try:
        import distributed  # noqa: F401
        import polars  # noqa: F401
    except ImportError as error:
        raise CMBError(f"cmbdetector batch needs dask, distributed and polars ({error.name} is missing): "
                       "pip install 'cmbdetector[batch]'") from None
    # Everything that can refuse does so before any worker starts: output folder, inputs, weights.
    out_root = str(prepare_output_folder(args.out))
    scans = find_scans(args.input, echoes=args.echoes)
    from .models import active_model_path

    # resolved here, once: every worker loads the same model even if the active version changes meanwhile
    model_path = args.model if args.model is not None else active_model_path()
    settings = Settings(model_path=str(model_path), device=args.device, use_yolo=not args.no_yolo,
                        use_criteria=not args.no_criteria, threshold=args.threshold, locate=not args.no_locate,
                        png=not args.no_png, flip_phase=args.flip_phase)
    model_hashes = expected_model_hashes(settings)
    started = time.perf_counter()

    rows, todo = {}, []
    previous_failures = {} if args.force else _previous_input_failures(out_root)
    for scan in scans:
        missing = [path for path in scan.files.values() if not Path(path).exists()]
        if missing:
            rows[scan] = (cohort_row(scan, out_root, "failed", reason=f"file not found: {missing[0]}",
                                     failure="input"), None)
            continue
        if not args.force:
            kept = _earlier_outcome(scan, out_root, model_hashes, settings, previous_failures)
            if kept is not None:
                rows[scan] = kept
                continue
        todo.append(scan)
    already = len(rows)
    if todo:
        with dask_client(args.scheduler, args.workers) as client:
            results = _run_on_cluster(client, todo, settings, out_root, args.force, already)
        for scan, result in results.items():
            rows[scan] = (cohort_row(scan, out_root, result["status"], result["summary"], result["reason"],
                                     result["failure"], input_sha256=result["input_sha256"]), result["summary"])

    table = [rows[scan][0] for scan in scans]  # in INPUT's order
    findings = [finding for scan in scans if rows[scan][1] is not None
                for finding in finding_rows(scan, out_root, rows[scan][1])]
    paths = write_cohort_tables(out_root, table, findings)
    failed = [row for row in table if row["status"] == "failed"]
    skipped = sum(1 for row in table if row["skipped"])
    print(f"{len(scans)} scans: {len(scans) - len(failed)} ok, {len(failed)} failed, {skipped} skipped "
          f"(done before), {len(todo)} run now, {time.perf_counter() - started:.1f} s")
    for row in failed:
        print(f"  failed: {row['input']}: {row['reason']}")
    for key, path in paths.items():
        print(f"  {key}: {path}")
    return EXIT_SOME_FAILED if failed else 0


def _earlier_outcome(scan: Scan, out_root, model_hashes: dict, settings: Settings, previous_failures: dict):
    """(row, summary) of this scan's earlier result or input failure that still stands, else None."""
    summary_exists = summary_path(out_root, scan).is_file()
    failure = previous_failures.get((scan.magnitude, scan.phase or "", scan.mask or ""))
    if not summary_exists and failure is None:
        return None  # nothing to compare: no need to hash the input here
    input_sha256 = input_content_hash(scan)
    if summary_exists:
        summary = finished_summary(out_root, scan, input_sha256, model_hashes, settings)
        if summary is not None:
            return cohort_row(scan, out_root, "ok", summary, skipped=True), summary
    if failure is not None and failure["input_sha256"] == input_sha256:
        return cohort_row(scan, out_root, "failed", reason=failure["reason"], failure=KEPT_FAILURE, skipped=True,
                          input_sha256=input_sha256), None
    return None
