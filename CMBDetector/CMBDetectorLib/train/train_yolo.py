"""`cmbdetector train-yolo`: fit the stage-3 YOLO on 2.5D tiles of simulated scans, tune its fusion with
the stage-2 CNN on held-out scans, write weights (a float16 state_dict) plus a model card.

Data: each training scan is run through the real preprocessing and stage 1; tiles (see `yolo.make_tiles`)
are centred on jittered true microbleeds (positives, boxes from `center_ras` and `apparent_diameter_mm`),
on stage-1 candidates (the strongest and a random sample), on calcifications and on points along veins
(hard negatives: empty label files). Every microbleed that falls in a tile's plane is labelled in it.

Split: the scans the CNN held out (its card's `training_data.held_out`, else the same rule as
`cmbdetector train` with this seed) are held out here too, so the fusion is tuned on scans neither model
has seen. Reproducible: the seed drives the split, the tile sampling and ultralytics (deterministic=True,
single-process data loading by default).
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import __version__
from .. import yolo
from ..classify import DEFAULT_MODEL as DEFAULT_CNN
from ..classify import load_model, score_patches
from ..errors import CMBError
from ..weights import card_path, sha256_of
from . import dataset, tuning
from .tuning import FP_BUDGET, TOLERANCE_MM, lesion_counts, score_held_out

POSITIVE_MM = dataset.POSITIVE_MM
NEGATIVE_MM = dataset.NEGATIVE_MM
# Boxes are the lesion plus a rim, at least 5 mm (10 px): the stride-8 head assigns a box only to anchor
# centres inside it, and a box under 8 px may hold none (no loss, nothing learnt).
BOX_RIM_MM, MIN_BOX_MM, MAX_BOX_MM = 1.0, 5.0, 14.0


def add_arguments(parser) -> None:
    parser.add_argument("--data", required=True, help="folder of simulated scans (cmbdetector synth)")
    parser.add_argument("--out", default=str(yolo.DEFAULT_YOLO), help="weights file to write (.pt); card beside it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--val-fraction", type=float, default=0.15,
                        help="held-out fraction when no CNN card names the held-out scans")
    parser.add_argument("--cnn", default=str(DEFAULT_CNN), help="stage-2 model (ensemble card .json or weights .pt) whose held-out scans tune the fusion")
    parser.add_argument("--hold-out", default="", help="comma-separated scan names to hold out when the CNN card "
                        "names none (e.g. the CNN's split, predicted before its card exists)")
    parser.add_argument("--tune-data", action="append", default=[],
                        help="extra folder of simulated scans seen by neither model, added to the fusion tuning "
                             "set (repeatable; never the benchmark set)")
    parser.add_argument("--max-train-scans", type=int, default=0,
                        help="train on only the first N (sorted) non-held-out scans (0: all)")
    parser.add_argument("--work", default=None, help="folder for the tile dataset and ultralytics run "
                        "(default: a temporary folder, removed afterwards)")
    parser.add_argument("--workers", type=int, default=0, help="ultralytics data-loader processes")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--fp-budget", type=float, default=FP_BUDGET,
                        help="FP/scan the tuned operating point may reach on the tuning scans")
    parser.add_argument("--tune-only", action="store_true",
                        help="keep the weights at --out, only re-tune the fusion against --cnn and rewrite the card")


# ----------------------------------------------------------------------------------------------------
# Split
# ----------------------------------------------------------------------------------------------------

def _truth_name(name: str) -> str:
    name = name.strip()
    return name if name.endswith(".truth.json") else f"{name}.truth.json"


def split_scans(files: list, seed: int, val_fraction: float, cnn_card: dict | None, hold_out: str = "") -> tuple:
    """(train, held_out, rule) truth files: the CNN card's held-out list when it has one, else the names
    given in `hold_out`, else the split rule of `cmbdetector train` with this seed."""
    for held_names, rule in ((set((cnn_card or {}).get("training_data", {}).get("held_out", [])), "CNN card held_out"),
                             ({_truth_name(n) for n in hold_out.split(",") if n.strip()}, "--hold-out list")):
        held = [f for f in files if f.name in held_names]
        if held:
            return [f for f in files if f.name not in held_names], held, rule
    train, held = tuning.split_scans(files, np.random.default_rng(seed), val_fraction)
    return train, held, f"cmbdetector train split rule, seed {seed}"


def tuning_scans(files: list, yolo_training_names: list, cnn_card: dict | None) -> list:
    """Scans for tuning the fusion: never seen by the YOLO, and held out by the CNN when its card says."""
    unseen = [f for f in files if f.name not in set(yolo_training_names)]
    cnn_held = set((cnn_card or {}).get("training_data", {}).get("held_out", []))
    return [f for f in unseen if f.name in cnn_held] if cnn_held else unseen


# ----------------------------------------------------------------------------------------------------
# Tiles and labels
# ----------------------------------------------------------------------------------------------------

def _native_slice_mm(prepared) -> float:
    direction = np.abs(prepared.volume.affine[:3, :3]) / prepared.spacing
    return float(prepared.spacing[int(np.argmax(direction[2]))])


def tile_labels(tile_centre, microbleeds: list, slice_mm: float, tile_px: int = yolo.TILE_PX,
                pixel_mm: float = yolo.PIXEL_MM) -> list:
    """YOLO label rows (class, x, y, w, h normalised to the tile) for microbleeds in the tile's plane.

    A microbleed is in the plane when its centre is within max(radius, half a native slice) of the tile's
    z; its box is a square of its apparent diameter plus a rim (clipped to 5-14 mm) around its projected
    centre.
    """
    rows = []
    half = (tile_px - 1) / 2
    for bleed in microbleeds:
        centre = np.asarray(bleed["center_ras"], float)
        diameter = float(bleed.get("apparent_diameter_mm") or bleed.get("true_diameter_mm", 3.0))
        if abs(centre[2] - tile_centre[2]) > max(diameter / 2, slice_mm / 2):
            continue
        box_mm = float(np.clip(diameter + 2 * BOX_RIM_MM, MIN_BOX_MM, MAX_BOX_MM))
        column = (centre[0] - tile_centre[0]) / pixel_mm + half
        row = (centre[1] - tile_centre[1]) / pixel_mm + half
        if not (0 <= column < tile_px and 0 <= row < tile_px):
            continue
        side = box_mm / pixel_mm
        x0, x1 = max(column - side / 2, 0), min(column + side / 2, tile_px)
        y0, y1 = max(row - side / 2, 0), min(row + side / 2, tile_px)
        rows.append((0, (x0 + x1) / 2 / tile_px, (y0 + y1) / 2 / tile_px, (x1 - x0) / tile_px, (y1 - y0) / tile_px))
    return rows


def _vein_points(veins: list, rng, per_vein: int = 2) -> np.ndarray:
    points = []
    for vein in veins:
        polyline = np.asarray(vein.get("points_ras", []), float).reshape(-1, 3)
        if len(polyline) < 2:
            continue
        segment = rng.integers(len(polyline) - 1, size=per_vein)
        fraction = rng.random(per_vein)[:, None]
        points.append(polyline[segment] + fraction * (polyline[segment + 1] - polyline[segment]))
    return np.concatenate(points) if points else np.zeros((0, 3))


@dataclass
class ScanTiles:
    scan_id: str
    tiles: np.ndarray  # float32 (N, 3, S, S)
    labels: list  # N lists of label rows
    kinds: list  # N strings: why the tile was made


def scan_tiles(truth_file, rng: np.random.Generator, positive_copies: int = 10, top_negatives: int = 60,
               random_negatives: int = 30) -> ScanTiles:
    """Training tiles of one simulated scan (see the module docstring)."""
    truth, _, prepared = dataset.read_scan(truth_file, with_phase=False)
    microbleeds = truth["microbleeds"]
    slice_mm = _native_slice_mm(prepared)
    cmbs = dataset.truth_points(truth)
    candidates = dataset.candidate_centres(prepared)
    if len(cmbs) and len(candidates):
        distance = np.linalg.norm(candidates[:, None] - cmbs[None], axis=-1).min(axis=1)
    else:
        distance = np.full(len(candidates), np.inf)
    near, far = np.nonzero(distance <= POSITIVE_MM)[0], np.nonzero(distance > NEGATIVE_MM)[0]
    rest = far[top_negatives:]
    sampled = rng.choice(rest, size=min(random_negatives, len(rest)), replace=False) if len(rest) else rest
    reach_mm = yolo.TILE_PX * yolo.PIXEL_MM / 4  # positives anywhere in the middle half of the tile
    centres, kinds = [], []

    def add(points, kind, inplane_jitter_mm):
        points = np.asarray(points, float).reshape(-1, 3)
        jitter = np.zeros_like(points)
        jitter[:, :2] = rng.uniform(-inplane_jitter_mm, inplane_jitter_mm, (len(points), 2))
        centres.append(points + jitter)
        kinds.extend([kind] * len(points))

    add(np.repeat(cmbs, positive_copies, axis=0), "microbleed", reach_mm)
    add(candidates[near], "candidate-near-microbleed", yolo.PIXEL_MM)
    add(candidates[np.concatenate([far[:top_negatives], sampled]).astype(int)], "candidate", yolo.PIXEL_MM)
    calcifications = [c["center_ras"] for c in truth.get("mimics", {}).get("calcifications", [])]
    add(calcifications, "calcification", yolo.PIXEL_MM)
    add(_vein_points(truth.get("mimics", {}).get("veins", []), rng), "vein", yolo.PIXEL_MM)
    centres = np.concatenate(centres) if centres else np.zeros((0, 3))
    tiles = yolo.make_tiles(prepared, centres)
    labels = [tile_labels(centre, microbleeds, slice_mm) for centre in centres]
    return ScanTiles(truth["scan_id"], tiles, labels, kinds)


def _tiles_worker(job):
    truth_file, seed = job
    return scan_tiles(truth_file, np.random.default_rng(seed))


def write_yolo_dataset(items: list, folder: Path, val_scans: int = 3) -> Path:
    """images/ + labels/ (ultralytics layout) and data.yaml; the last `val_scans` scans form the
    ultralytics 'val' split (monitoring only, they are training scans, not the held-out ones)."""
    import cv2

    images, labels = folder / "images", folder / "labels"
    for sub in (images, labels):
        shutil.rmtree(sub, ignore_errors=True)
        sub.mkdir(parents=True)
    train_list, val_list = [], []
    val_scans = min(val_scans, len(items) // 5)
    for scan_index, item in enumerate(items):
        rgb = yolo.tiles_to_uint8_rgb(item.tiles)
        for index, (image, rows) in enumerate(zip(rgb, item.labels)):
            stem = f"{item.scan_id}_{index:04d}"
            cv2.imwrite(str(images / f"{stem}.png"), image[..., ::-1])  # cv2 writes BGR: file holds R,G,B = z-d,z,z+d
            (labels / f"{stem}.txt").write_text("".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in rows))
            (val_list if scan_index >= len(items) - val_scans else train_list).append(str(images / f"{stem}.png"))
    (folder / "train.txt").write_text("\n".join(train_list) + "\n")
    (folder / "val.txt").write_text("\n".join(val_list or train_list[:64]) + "\n")
    data_yaml = folder / "data.yaml"
    data_yaml.write_text(json.dumps({"path": str(folder), "train": "train.txt", "val": "val.txt",
                                     "names": {int(k): v for k, v in yolo.CLASS_NAMES.items()}}))
    return data_yaml


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------

TRAIN_SETTINGS = {
    # no pretrained weights (they would be downloaded), no AMP check (downloads yolo11n.pt), no plots
    "pretrained": False, "amp": False, "plots": False, "val": False, "deterministic": True,
    "optimizer": "AdamW", "lr0": 0.002, "cos_lr": True, "warmup_epochs": 1, "patience": 1000,
    # augmentation fit for grey 2.5D tiles: in-plane flips and small shifts/scales, no colour changes
    # (the channels are slices), no rotation (it inflates boxes), no mosaic at 64 px
    "hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.15, "degrees": 0.0, "translate": 0.1, "scale": 0.2,
    "fliplr": 0.5, "flipud": 0.5, "mosaic": 0.0, "mixup": 0.0, "erasing": 0.0, "close_mosaic": 0,
}


def train_network(data_yaml: Path, work: Path, args) -> Path:
    """Run ultralytics training (offline) and return the path of its last checkpoint."""
    import yaml as pyyaml

    yolo.configure_offline()
    from ultralytics import YOLO

    model_yaml = work / "cmb_yolo_model.yaml"
    model_yaml.write_text(pyyaml.safe_dump(yolo.model_config(nc=len(yolo.CLASS_NAMES)), sort_keys=False))
    model = YOLO(str(model_yaml), task="detect")
    model.train(data=str(data_yaml), epochs=args.epochs, imgsz=yolo.TILE_PX, batch=args.batch, device="cpu",
                workers=args.workers, seed=args.seed, project=str(work / "runs"), name="train", exist_ok=True,
                verbose=True, **TRAIN_SETTINGS)
    last = work / "runs" / "train" / "weights" / "last.pt"
    if not last.is_file():
        raise CMBError(f"ultralytics training wrote no checkpoint at {last}")
    return last


# ----------------------------------------------------------------------------------------------------
# Fusion tuning on held-out scans
# ----------------------------------------------------------------------------------------------------

THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)


def tune_fusion(scans: list, cnn_threshold: float, fp_budget: float = FP_BUDGET) -> tuple:
    """The full pipeline's operating point: score threshold, band and weight with the highest per-lesion
    sensitivity at <= fp_budget FP/scan on the tuning scans; ties go to fewer FP, then fewer YOLO calls.
    Returns (params incl. "threshold", CNN-alone result at its own threshold, table of every setting)."""
    baseline = lesion_counts(scans, [s.cnn for s in scans], cnn_threshold)
    best, best_key, table = None, None, []
    grid = itertools.product(THRESHOLDS, (0.05, 0.1, 0.2, 0.3, 0.4, 0.45), (0.8, 0.9, 0.95, 0.98, 0.99, 0.999, 1.0),
                             (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0))
    for threshold, lo, hi, weight in grid:
        if not lo < threshold < hi:  # the threshold must fall inside the band YOLO can move scores in
            continue
        params = {"rule": "band-power", "lo": lo, "hi": hi, "weight": weight, "threshold": threshold}
        result = lesion_counts(scans, [yolo.fuse(s.cnn, s.yolo, params) for s in scans], threshold)
        consulted = float(np.mean([yolo.consulted(s.cnn, params).sum() for s in scans]))
        table.append({**params, **result, "consulted_per_scan": round(consulted, 1)})
        if result["fp_per_scan"] > fp_budget:
            continue
        key = (-result["sensitivity"], result["fp_per_scan"], consulted)
        if best_key is None or key < best_key:
            best, best_key = params, key
    if best is None:  # nothing fits the budget: YOLO left neutral at the CNN's own threshold
        best = {"rule": "band-power", "lo": 0.2, "hi": 0.98, "weight": 0.0, "threshold": cnn_threshold}
    table.sort(key=lambda row: (-row["sensitivity"], row["fp_per_scan"], row["consulted_per_scan"]))
    return best, baseline, table


# ----------------------------------------------------------------------------------------------------
# Command
# ----------------------------------------------------------------------------------------------------

def _read_card(path) -> dict | None:
    card_file = card_path(path)
    return json.loads(card_file.read_text()) if card_file.is_file() else None


def _command(args) -> str:
    parts = ["cmbdetector train-yolo", f"--data {shlex.quote(str(args.data))}", f"--out {shlex.quote(str(args.out))}",
             f"--seed {args.seed}", f"--epochs {args.epochs}", f"--batch {args.batch}",
             f"--val-fraction {args.val_fraction}", f"--cnn {shlex.quote(str(args.cnn))}", f"--workers {args.workers}",
             f"--threads {args.threads}", f"--fp-budget {args.fp_budget}"]
    if args.hold_out:
        parts.append(f"--hold-out {shlex.quote(args.hold_out)}")
    if args.max_train_scans:
        parts.append(f"--max-train-scans {args.max_train_scans}")
    for folder in args.tune_data:
        parts.append(f"--tune-data {shlex.quote(str(folder))}")
    return " ".join(parts)


def run(args) -> int:
    import tempfile

    import torch

    started = time.time()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("YOLO_VERBOSE", "True")  # training progress in the log
    yolo.configure_offline()
    files = dataset.truth_files(args.data)
    if len(files) < 4:
        raise CMBError(f"need at least 4 simulated scans in {args.data}, found {len(files)}")
    cnn_card = _read_card(args.cnn)
    train_files, held_files, split_rule = split_scans(files, args.seed, args.val_fraction, cnn_card, args.hold_out)
    if args.max_train_scans:
        train_files = train_files[:args.max_train_scans]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous_card = _read_card(out) if args.tune_only else None

    if args.tune_only:
        if previous_card is None:
            raise CMBError(f"--tune-only needs existing weights and card at {out}")
        card = previous_card
    else:
        work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="cmb-yolo-"))
        work.mkdir(parents=True, exist_ok=True)
        print(f"building tiles: {len(train_files)} training scans ({split_rule}); work folder {work}", flush=True)
        jobs = [(f, args.seed + index) for index, f in enumerate(train_files)]
        items = [_tiles_worker(job) for job in jobs]
        n_tiles = sum(len(i.tiles) for i in items)
        n_positive = sum(sum(1 for rows in i.labels if rows) for i in items)
        print(f"{n_tiles} tiles, {n_positive} with a microbleed box ({time.time() - started:.0f} s)", flush=True)
        data_yaml = write_yolo_dataset(items, work / "dataset")
        del items
        checkpoint = train_network(data_yaml, work, args)
        state = yolo.state_dict_from_checkpoint(checkpoint)
        torch.save(state, out)
        card = {
            "name": "CMBDetector stage-3 YOLO (2.5D tiles)",
            "version": __version__,
            "file": out.name,
            "architecture": yolo.ARCHITECTURE,
            "framework": f"ultralytics YOLOv8 detect layout (yolov8.yaml) at depth/width/max "
                         f"{yolo.SCALE}, built from yaml, no pretrained weights",
            "class_names": yolo.CLASS_NAMES,
            "command": _command(args),
            "seed": args.seed,
            "epochs": args.epochs,
            "train_settings": {**TRAIN_SETTINGS, "imgsz": yolo.TILE_PX, "batch": args.batch, "workers": args.workers},
            "training_data": {
                "source": "simulated scans (cmbdetector synth), MNI152 2009 anatomy; no real labelled data",
                "split_rule": split_rule,
                "scans": [f.name for f in train_files],
                "held_out": [f.name for f in held_files],
                "tiles": n_tiles,
                "tiles_with_microbleed": n_positive,
            },
            "training_seconds": round(time.time() - started, 1),
        }
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    card["sha256"] = sha256_of(out)
    card_path(out).write_text(json.dumps(card, indent=2))  # loadable now; fusion added below

    tuning_files = tuning_scans(files, card["training_data"]["scans"], cnn_card)
    for folder in args.tune_data:
        tuning_files += dataset.truth_files(folder)
    if Path(args.cnn).is_file() and cnn_card is not None and tuning_files:
        print(f"tuning the fusion on {len(tuning_files)} held-out scans against {args.cnn}", flush=True)
        model = yolo.load_yolo(out)
        timings = []
        cnn_model = load_model(args.cnn)
        scans = score_held_out(tuning_files, lambda patches: score_patches(cnn_model, patches), model, timings)
        threshold = float(cnn_card.get("operating_threshold", 0.5))
        params, baseline, table = tune_fusion(scans, threshold, args.fp_budget)
        fused = lesion_counts(scans, [yolo.fuse(s.cnn, s.yolo, params) for s in scans], params["threshold"])
        yolo_alone = {f"{t:.2f}": lesion_counts(scans, [s.yolo for s in scans], t) for t in (0.3, 0.5, 0.7)}
        card["fusion"] = params
        card["fusion_tuning"] = {
            "command": _command(args) + (" --tune-only" if args.tune_only else ""),
            "cnn": {"file": Path(args.cnn).name, "sha256": cnn_card.get("sha256"), "threshold": threshold},
            "rule": f"highest sensitivity at <= {args.fp_budget} FP/scan over threshold x band x weight; "
                    "ties: fewer FP, then fewer YOLO calls",
            "held_out_scans": [s.scan_id for s in scans],
            "held_out_seeds": [json.loads(Path(f).read_text()).get("seed") for f in tuning_files],
            "matching": f"one-to-one, {TOLERANCE_MM} mm, after 3 mm merge (pipeline rule), all scans incl. CMB-free",
            "cnn_alone": baseline,
            "cnn_plus_yolo": fused,
            "yolo_alone": yolo_alone,
            "consulted_per_scan": round(float(np.mean([yolo.consulted(s.cnn, params).sum() for s in scans])), 1),
            "grid_best_10": table[:10],
            "grid_size": len(table),
            "timings_s": timings,
        }
        print(json.dumps({"fusion": params, "cnn_alone": baseline, "cnn_plus_yolo": fused}, indent=2))
    else:
        card["fusion"] = dict(yolo.DEFAULT_FUSION, weight=0.0)
        card["fusion_tuning"] = {"note": f"no CNN at {args.cnn}: fusion left neutral (weight 0)"}
        print(f"no CNN weights at {args.cnn}: fusion not tuned (neutral)")
    card["limits"] = [
        "trained only on simulated GRE/SWI; real-scan performance is unmeasured (no labelled real data here)",
        "fusion tuned on few held-out simulated scans: the gain is an estimate with wide uncertainty",
        "magnitude only: phase is not used by this stage",
    ]
    card_path(out).write_text(json.dumps(card, indent=2))
    print(f"wrote {out} and {card_path(out)} ({time.time() - started:.0f} s)")
    return 0
