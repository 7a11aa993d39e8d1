"""The detection pipeline and the `cmbdetector detect` command.

volume -> preprocess -> stage 1 candidates -> stage 2 CNN scores -> (stage 3 YOLO, when shipped)
       -> reading criteria (criteria.py) -> threshold + merge -> size -> location (registration to MNI)
       -> Finding list -> files.
Each stage is timed; the summary JSON records the timings, versions and the weights' SHA-256.
"""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from . import __version__
from .candidates import MAX_CANDIDATES, centres_ras, screen
from .brain_model import shared_brain_model
from .classify import choose_device, extract_patches, load_model, score_patches
from .criteria import meets_criteria
from .errors import InputError
from .findings import Finding, label_findings, write_csv, write_json, write_markups_json
from .image import Volume
from .io import read_volume, validate_brain_volume
from .outputs import backup_review, check_output_stem, prepare_output_folder, write_all
from .phase import reversed_sign, vendor_range
from .preprocess import Prepared, given_brain_mask, prepare
from .sysinfo import peak_rss_mb
from .vocabulary import run_stem

MERGE_MM = 3.0  # detections closer than this are one lesion
# Peak memory of a whole detect run, linear in the voxels (every full-size step works in slabs, see
# grids.py): the libraries and models take about 1.6 GB, each voxel about 12-16 bytes (the input, the mask,
# the normalised image and its unmasked copy, the image-type check's samples). Measured: `make bench`'s
# timing scan 1.8 GB; the 512 x 512 x 400 volume of Testing/test_memory.py 2.86 GB before the image-type
# check, 3.60 GB with it; since the image-type measures run beside registration (preprocess.prepare), 3.04 GB
# on a quiet machine and 3.89 GB once when they overlapped registration's peak on a busy one. The constants
# below leave a margin above those (3.99 GB for that volume).
BASE_MEMORY_BYTES = 2.0e9
BYTES_PER_VOXEL = 19


@dataclass
class Detection:
    findings: list
    summary: dict
    prepared: Prepared | None = None
    warnings: list = field(default_factory=list)
    screened_ras: np.ndarray | None = None  # (N, 3) every stage-1 candidate centre, strongest first


def _progress(callback, percent, message):
    if callback is not None:
        callback(percent, message)


def merge_nearby(centres: np.ndarray, scores: np.ndarray, radius_mm: float = MERGE_MM) -> np.ndarray:
    """Indices kept after greedy non-maximum suppression by distance (highest score first)."""
    order = np.argsort(-scores)
    kept = []
    for index in order:
        if all(np.linalg.norm(centres[index] - centres[k]) > radius_mm for k in kept):
            kept.append(index)
    return np.array(kept, dtype=int)


def estimated_peak_bytes(shape) -> float:
    """What a detect run on a volume of this shape needs at its peak (see BYTES_PER_VOXEL)."""
    return BASE_MEMORY_BYTES + BYTES_PER_VOXEL * float(np.prod(shape))


def check_fits_in_memory(shape, available_bytes: float | None = None) -> None:
    """InputError before any work when the run would not fit in the memory available now."""
    if available_bytes is None:
        try:
            import psutil
        except ImportError:
            return  # cannot tell: let it run
        available_bytes = psutil.virtual_memory().available
    needed = estimated_peak_bytes(shape)
    if needed > available_bytes:
        size = " x ".join(str(n) for n in shape)
        raise InputError(f"input: a {size} volume needs about {needed / 1e9:.1f} GB of memory and "
                         f"{available_bytes / 1e9:.1f} GB is available; close other programs, or crop or "
                         "downsample the volume")


def apparent_diameter_mm(prepared: Prepared, ijk) -> float:
    """Diameter of the dark spot (below half-way between its centre and tissue) on its own slice of the
    acquisition plane (Volume.slice_axis): the same for any order or direction of the array's axes."""
    spacing = prepared.spacing
    plane_axes = sorted(prepared.volume.in_plane_axes())
    centre = np.clip(np.round(ijk).astype(int), 0, np.array(prepared.image.shape) - 1)
    index = [int(centre[prepared.volume.slice_axis])] * 3
    offset = []
    for axis in plane_axes:
        reach = int(np.ceil(8 / spacing[axis]))
        low = max(centre[axis] - reach, 0)
        index[axis] = slice(low, centre[axis] + reach + 1)
        offset.append(centre[axis] - low)
    window = prepared.image[tuple(index)]
    centre_value = float(window[tuple(offset)])
    dark = window < (centre_value + 1.0) / 2
    labels, _ = ndimage.label(dark)
    label = labels[tuple(offset)]
    pixel_area = float(spacing[plane_axes[0]] * spacing[plane_axes[1]])
    if label == 0:
        return float(2 * np.sqrt(pixel_area / np.pi))
    area = np.count_nonzero(labels == label) * pixel_area
    return float(2 * np.sqrt(area / np.pi))


class Detector:
    """The detection models, loaded and verified (SHA-256) once, for many volumes.

    The `detect` command, `batch` workers, the benchmark and the Slicer module's process all hold one;
    building it costs the imports and the weights (seconds), each `detect` call only the scan's own work.

    model_path: None takes the active model version (models.py: the shipped model unless the user chose a
    site model). use_yolo: consult the YOLO stage for candidates in its uncertainty band when its weights
    ship (yolo_path, default Resources/Models/cmb_yolo.pt) and the model's card does not turn it off (a
    site model whose fine-tune measured the CNN alone better); False runs the 3D CNN alone. use_criteria:
    keep a candidate the networks score below the operating threshold when it meets the reading criteria
    (criteria.py), at that threshold; False gives the networks' scores alone.
    """

    def __init__(self, model_path=None, device: str = "auto", use_yolo: bool = True, yolo_path=None,
                 use_criteria: bool = True):
        from . import models

        started = time.perf_counter()
        self.model_path = Path(model_path) if model_path is not None else models.active_model_path()
        self.model_version = models.version_of(self.model_path)
        self.model = load_model(self.model_path, device)
        self.brain_model = shared_brain_model()  # checked now: a bad file is named before any scan runs
        self.yolo = None
        self.use_criteria = use_criteria
        self.warnings = []
        if use_yolo and self.model.card.get("stage3") == "off":
            use_yolo = False  # the fine-tune measured this CNN alone better than with the shipped fusion
        if use_yolo:
            from . import yolo

            yolo_path = Path(yolo_path or yolo.DEFAULT_YOLO)
            if yolo_path.is_file():
                self.yolo = yolo.load_yolo(yolo_path, device)
            else:
                self.warnings.append(f"YOLO stage skipped: no weights at {yolo_path}")
        fusion_threshold = self.yolo.fusion.get("threshold") if self.yolo is not None else None
        if self.yolo is not None:  # a site model recalibrates the fused threshold for its own CNN
            fusion_threshold = self.model.card.get("fusion_threshold", fusion_threshold)
        # the operating point tuned for the configuration that runs (model cards; never benchmarked scans)
        self.operating_threshold = float(fusion_threshold if fusion_threshold is not None
                                         else self.model.card.get("operating_threshold", 0.5))
        self.load_seconds = time.perf_counter() - started

    @property
    def model_hashes(self) -> dict:
        """SHA-256 of every model that runs: what a result depends on besides the scan and the code."""
        hashes = {"cnn": self.model.sha256, "brain_mask": self.brain_model.sha256}
        if self.yolo is not None:
            hashes["yolo"] = self.yolo.sha256
        return hashes

    def detect(self, volume: Volume, phase: Volume | None = None, mask: Volume | None = None,
               threshold: float | None = None, crop: bool = False, locate: bool = True,
               keep_outside: bool = False, cnn_phase: bool = True, progress=None) -> Detection:
        """Find microbleeds in one volume: findings (RAS mm, labelled CMB-1.. by score) and a summary.

        threshold: None takes the operating point. cnn_phase: give the CNN the phase channel when a phase
        is given (default). On the 12 seed-3 tuning scans (tools/compare_on_tuning_scans.py) the first
        ensemble member at threshold 0.5 has half the false positives with the phase (0.42 against 0.83
        FP/scan) at the same sensitivity (model card).
        """
        check_fits_in_memory(volume.shape)
        threshold = self.operating_threshold if threshold is None else float(threshold)
        if not 0.0 <= threshold <= 1.0:
            raise InputError(f"threshold must be between 0 and 1, got {threshold}")
        timings, warnings = {}, list(self.warnings)
        started = time.perf_counter()

        _progress(progress, 10, "preprocessing")
        tick = time.perf_counter()
        prepared = prepare(volume, phase, mask, crop=crop, brain_model=self.brain_model)
        warnings += prepared.warnings
        timings["preprocess"] = time.perf_counter() - tick

        _progress(progress, 30, "stage 1: candidate screening")
        tick = time.perf_counter()
        screening = screen(prepared)
        candidates = screening.candidates
        warnings += _screening_warnings(screening.report)
        timings["candidates"] = time.perf_counter() - tick

        _progress(progress, 50, f"stage 2: CNN on {len(candidates)} candidates")
        tick = time.perf_counter()
        centres = centres_ras(prepared, candidates)
        patches = extract_patches(prepared, centres, use_phase=cnn_phase)
        cnn_scores = score_patches(self.model, patches)
        timings["cnn"] = time.perf_counter() - tick
        spots = np.zeros(len(cnn_scores), bool)
        if self.use_criteria:  # read off the same patches now, so that they need not outlive stage 2
            tick = time.perf_counter()
            spots = meets_criteria(patches[:, 0])
            timings["criteria"] = time.perf_counter() - tick
        del patches
        scores, yolo_scores, yolo_info = cnn_scores, np.full(len(cnn_scores), np.nan), {"used": False}
        if self.yolo is not None:
            _progress(progress, 65, "stage 3: YOLO on the uncertain candidates")
            tick = time.perf_counter()
            scores, yolo_scores, yolo_info = self._consult_yolo(prepared, centres, cnn_scores)
            timings["yolo"] = time.perf_counter() - tick
        by_criteria = spots & (scores < self.operating_threshold)  # doubted by the networks, kept by the criteria
        # float64: a float32 0.7 is below 0.7, and the kept finding would miss its own threshold
        scores = np.where(by_criteria, self.operating_threshold, scores.astype(np.float64))

        passing = np.nonzero(scores >= threshold)[0]
        kept = passing[merge_nearby(centres[passing], scores[passing])] if len(passing) else passing
        findings = [Finding(label="", position_ras=tuple(float(v) for v in centres[index]),
                            score=float(scores[index]),
                            diameter_mm=apparent_diameter_mm(prepared, candidates[index].ijk),
                            stage_scores=_stage_scores(candidates[index], cnn_scores[index], yolo_scores[index]),
                            kept_by="criteria" if by_criteria[index] else "networks")
                    for index in kept]

        registration_info, dropped = {"done": False}, []
        if locate and not crop:
            _progress(progress, 75, "locating findings (registration to MNI152)")
            tick = time.perf_counter()
            findings, dropped, registration_info, located_warnings = _place(prepared, findings, mask, keep_outside)
            warnings += located_warnings
            timings["locate"] = time.perf_counter() - tick
        elif crop:
            warnings.append("partial-brain crop: locations not computed")

        findings = label_findings(findings)
        timings["total"] = time.perf_counter() - started
        _progress(progress, 95, "writing results")
        summary = {
            "cmbdetector_version": __version__,
            "input": volume.meta.get("source", ""),
            "shape": list(volume.shape),
            "spacing_mm": [round(float(s), 4) for s in volume.spacing],
            "phase_given": phase is not None,
            "phase_used_by_cnn": bool(cnn_phase and phase is not None),
            "phase_sign_reversed": bool(phase is not None and phase.meta.get("sign_reversed", False)),
            "mask": {"method": prepared.mask_method,
                     "volume_ml": round(float(prepared.mask.sum() * np.prod(volume.spacing) / 1000.0), 1)},
            "threshold": threshold,
            "operating_threshold": self.operating_threshold,  # the tuned one; differs when the caller chose its own
            "counts": _counts(findings),
            "scan_level": {"any_microbleed": bool(findings), "max_score": float(scores.max()) if len(scores) else 0.0},
            "candidates": len(candidates),
            "screening": screening.report,
            "dropped_outside_brain": len(dropped),
            "registration": registration_info,
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
            "peak_rss_mb": peak_rss_mb(),
            "model": {"version": self.model_version, "file": self.model_path.name, "sha256": self.model.sha256,
                      "device": self.model.device},
            "yolo": yolo_info,
            "criteria": {"used": self.use_criteria, "lifted": int(by_criteria.sum()),
                         "kept": sum(f.kept_by == "criteria" for f in findings)},
            "versions": _versions(),
            "warnings": warnings,
            "findings": [f.to_dict() for f in findings],
        }
        return Detection(findings, summary, prepared, warnings, centres)

    def _consult_yolo(self, prepared, centres, cnn_scores) -> tuple:
        """Fused scores, YOLO's own score (NaN where not consulted) and what the summary says of the stage."""
        from . import yolo

        fusion = self.yolo.fusion
        band = yolo.consulted(cnn_scores, fusion)
        yolo_scores = np.full(len(cnn_scores), np.nan)
        yolo_scores[band] = yolo.score_candidates(self.yolo, prepared, centres[band])
        scores = yolo.fuse(cnn_scores, np.nan_to_num(yolo_scores), fusion)
        info = {"used": True, "consulted": int(band.sum()), "sha256": self.yolo.sha256, "fusion": fusion}
        return scores, yolo_scores, info


def _screening_warnings(report: dict) -> list:
    if report["strong_dropped"]:
        return [f"stage 1 found {report['peaks']} dark blobs and could keep only the strongest "
                f"{report['kept']}: {report['strong_dropped']} lesion-strength blobs were dropped "
                "(an unusually noisy or vein-rich scan); microbleeds may be missed"]
    if report["widened"]:
        return [f"stage 1 kept {report['kept']} lesion-strength dark blobs (more than the usual "
                f"{MAX_CANDIDATES}); detection takes longer"]
    return []


def _place(prepared: Prepared, findings: list, mask, keep_outside: bool) -> tuple:
    """Atlas locations through the registration to MNI152 (the one the brain mask was made with, if any);
    findings outside the brain are dropped unless keep_outside. Returns findings, dropped, info, warnings."""
    from . import locate as locate_module

    volume = prepared.volume
    registration = prepared.registration or locate_module.register_to_mni(volume, mask)
    info = {"done": True, "ok": registration.ok, "message": registration.message,
            "seconds": round(registration.seconds, 2)}
    dropped = []
    if not keep_outside and registration.ok:
        findings, dropped = locate_module.drop_outside_brain(findings, registration)
    warnings = locate_module.locate_findings(volume, findings, registration=registration)
    return findings, dropped, info, warnings


def detect(volume: Volume, phase: Volume | None = None, mask: Volume | None = None,
           threshold: float | None = None, crop: bool = False, model_path=None,
           device: str = "auto", locate: bool = True, keep_outside: bool = False, use_yolo: bool = True,
           yolo_path=None, cnn_phase: bool = True, use_criteria: bool = True, progress=None) -> Detection:
    """One volume with freshly loaded models (see Detector; a cohort keeps one Detector instead)."""
    check_fits_in_memory(volume.shape)  # before the models load: a refusal costs no time
    _progress(progress, 5, "loading model")
    detector = Detector(model_path, device, use_yolo=use_yolo, yolo_path=yolo_path, use_criteria=use_criteria)
    detection = detector.detect(volume, phase, mask, threshold=threshold, crop=crop, locate=locate,
                                keep_outside=keep_outside, cnn_phase=cnn_phase, progress=progress)
    timings = detection.summary["timings_s"]
    timings["total"] = round(timings["total"] + detector.load_seconds, 3)
    detection.summary["timings_s"] = {"load_model": round(detector.load_seconds, 3), **timings}
    return detection


def _stage_scores(candidate, cnn_score, yolo_score) -> dict:
    scores = {"candidate": round(candidate.response, 4), "cnn": round(float(cnn_score), 4)}
    if np.isfinite(yolo_score):
        scores["yolo"] = round(float(yolo_score), 4)
    return scores


def _counts(findings) -> dict:
    by_region = {}
    for finding in findings:
        by_region[finding.region] = by_region.get(finding.region, 0) + 1
    return {"total": len(findings), "by_region": by_region}


def _versions() -> dict:
    import monai
    import SimpleITK
    import torch

    return {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
            "monai": monai.__version__, "SimpleITK": SimpleITK.Version_VersionString()}


def write_results(detection: Detection, out_dir, stem: str, input_path, force: bool = False,
                  png: bool = True) -> dict:
    """How `detect` and `batch` end a scan. Without force, refuse (OutputError) when a review, or another
    input's results, was saved at STEM while the detector worked; with force, a reviewed STEM.mrk.json is
    replaced but never lost: it is copied to a backup first, named in the warnings. Then write_outputs."""
    if not force:
        check_output_stem(out_dir, stem, input_path=input_path)
    else:
        backup = backup_review(Path(out_dir) / f"{stem}.mrk.json")
        if backup is not None:
            detection.warnings.append(f"--force: the reviewed {stem}.mrk.json it replaces is kept as {backup}")
    return write_outputs(detection, out_dir, stem, png=png)


def write_outputs(detection: Detection, out_dir, stem: str, png: bool = True) -> dict:
    """Write STEM.mrk.json, STEM.csv, STEM.png and, last, STEM.json (the summary that marks a complete
    result); each appears whole or not at all (outputs.write_all). Without a PNG, a previous run's
    STEM.png is removed: it would show other findings beside the new summary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    writers = {"markups": (out_dir / f"{stem}.mrk.json", lambda path: write_markups_json(detection.findings, path)),
               "csv": (out_dir / f"{stem}.csv", lambda path: write_csv(detection.findings, path))}
    if png and detection.prepared is not None:
        from .overview import write_overview

        writers["png"] = (out_dir / f"{stem}.png",
                          lambda path: write_overview(detection.prepared, detection.findings, path))
    writers["summary"] = (out_dir / f"{stem}.json", lambda path: write_json(detection.summary, path))
    stale = [] if "png" in writers else [out_dir / f"{stem}.png"]
    return write_all(writers, out_dir, summary_key="summary", remove=stale)


def add_detector_arguments(parser) -> None:
    """How the Detector runs and what it writes: one owner for `detect` and `batch`."""
    parser.add_argument("--threshold", type=float, help="score threshold (default: the tuned operating point, "
                        "with or without the YOLO stage)")
    parser.add_argument("--device", default="auto", help="auto (default: the CUDA GPU when there is one), cpu or "
                        "cuda (falls back to the CPU with a warning)")
    parser.add_argument("--model", default=None, help="stage-2 model: an ensemble card (.json) or one network's "
                        "weights (.pt with its .json card); default: the active version (`cmbdetector models`)")
    parser.add_argument("--no-yolo", action="store_true", help="skip the YOLO stage (3D CNN alone)")
    parser.add_argument("--no-criteria", action="store_true", help="the networks' scores alone: do not keep "
                        "doubted candidates that meet the reading criteria (round, isolated dark spots)")
    parser.add_argument("--no-locate", action="store_true", help="skip registration and atlas locations")
    parser.add_argument("--no-png", action="store_true", help="do not write the PNG overview")
    parser.add_argument("--flip-phase", action="store_true", help="the phase uses the opposite sign convention "
                        "to the CNN's: veins running along B0 (dots on axial slices) are bright on it, not dark "
                        "(docs/simulator.md); its sign is reversed before detection")


def add_arguments(parser) -> None:
    parser.add_argument("input", help="GRE/SWI magnitude: .nii/.nii.gz/.nrrd/.mha or a DICOM folder")
    parser.add_argument("--phase", help="phase image on the same grid (radians or vendor integers)")
    parser.add_argument("--mask", help="brain mask on the same grid (overrides the automatic mask)")
    parser.add_argument("--out", default=".", help="output folder (default: current)")
    parser.add_argument("--echo", default="combine", help="4D multi-echo input: 'combine' (RSS, default) or an echo index")
    parser.add_argument("--crop", action="store_true", help="the input is a partial-brain crop (no head-size check, no atlas)")
    parser.add_argument("--force", action="store_true", help="replace a reviewed STEM.mrk.json in --out")
    add_detector_arguments(parser)
    parser.add_argument("--keep-outside", action="store_true", help="keep findings that fall outside the brain")
    parser.add_argument("--no-cnn-phase", action="store_true",
                        help="do not feed a given phase to the CNN (magnitude alone)")


def echo_record(requested, volume: Volume) -> dict:
    """The summary's record of the echo asked for and the one read (io.read_volume's choice)."""
    return {"requested": requested, "used": volume.meta.get("echo"), "n_echoes": volume.meta.get("n_echoes", 1)}


def read_phase(path, echo="combine", flip: bool = False) -> Volume | None:
    """The phase image of the chosen echo, checked (None without a path); flip: the file uses the opposite
    sign convention to the CNN's (docs/simulator.md), so its sign is reversed on reading.

    Under echo="combine" a multi-echo phase gives its last (longest) echo's phase, with a warning: a root
    sum of squares of phases means nothing, and the longest echo holds the most susceptibility contrast."""
    if path is None:
        return None
    phase = read_volume(path, echo=echo)
    if phase.meta.get("echo") == "combine":
        count = int(phase.meta.get("n_echoes", 1))
        phase = read_volume(path, echo=count - 1)
        phase.meta.setdefault("warnings", []).append(
            f"phase: {count} echoes; using the phase of the last one (echo {count - 1}), since phases cannot be "
            "combined like the magnitude (--echo N takes the magnitude and phase of one echo)")
    validate_brain_volume(phase, "phase", allow_crop=True)
    if flip:
        phase = phase.with_array(reversed_sign(phase.array, vendor_range(phase.array)), sign_reversed=True)
    return phase


def _read(path, echo="combine"):
    return None if path is None else read_volume(path, echo=echo)


def run(args) -> int:
    echo = int(args.echo) if str(args.echo).isdigit() else args.echo
    if echo != "combine" and not isinstance(echo, int):
        raise InputError(f"--echo must be 'combine' or an echo index, got {args.echo}")
    # Everything that can refuse does so here, before any model loads: output folder, inputs, device.
    prepare_output_folder(args.out)
    volume = _read(args.input, echo)
    validate_brain_volume(volume, "input", allow_crop=args.crop)
    phase = read_phase(args.phase, echo, flip=args.flip_phase)
    mask = _read(args.mask)
    if mask is not None:
        given_brain_mask(volume, mask, crop=args.crop)
    used_echo = volume.meta.get("echo")
    stem = run_stem(args.input, used_echo)
    early_warnings = check_output_stem(args.out, stem, force=args.force, input_path=args.input)
    early_warnings += volume.meta.get("warnings", []) + (phase.meta.get("warnings", []) if phase else [])
    device, device_warning = choose_device(args.device)
    early_warnings += [device_warning] if device_warning else []
    for warning in early_warnings:  # said now, not after minutes of work; kept in the summary too
        print(f"warning: {warning}", file=sys.stderr, flush=True)

    def report(percent, message):
        print(f"PROGRESS {percent}% {message}", flush=True)

    detection = detect(volume, phase, mask, threshold=args.threshold, crop=args.crop, model_path=args.model,
                       device=device, locate=not args.no_locate, keep_outside=args.keep_outside,
                       use_yolo=not args.no_yolo, cnn_phase=not args.no_cnn_phase,
                       use_criteria=not args.no_criteria, progress=report)
    for warning in detection.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    detection.warnings[:0] = early_warnings  # the same list as the summary's
    detection.summary["echo"] = echo_record(echo, volume)
    said = len(detection.warnings)
    paths = write_results(detection, args.out, stem, args.input, force=args.force, png=not args.no_png)
    for warning in detection.warnings[said:]:
        print(f"warning: {warning}", file=sys.stderr)
    counts = detection.summary["counts"]
    regions = ", ".join(f"{k} {v}" for k, v in sorted(counts["by_region"].items())) or "none"
    print("PROGRESS 100% done")
    print(f"{stem}: {counts['total']} microbleed(s) ({regions}) in {detection.summary['timings_s']['total']:.1f} s")
    for key, path in paths.items():
        print(f"  {key}: {path}")
    return 0
