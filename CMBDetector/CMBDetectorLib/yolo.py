"""Stage 3: an ultralytics YOLO detector on 2.5D axial tiles, consulted to cut hard false positives.

A tile is TILE_PX x TILE_PX pixels of PIXEL_MM, on a RAS-aligned axial grid centred on a candidate, with
three channels = the normalised magnitude at z - d, z, z + d (d = max(slice spacing, MIN_NEIGHBOUR_MM)):
a microbleed is a dot on the middle channel that fades on its neighbours, a vein seen end-on stays a dot
on all three, and one running in-plane is a line. Resampling every scan to the same pixel size makes
0.5 mm SWI, 1 mm 3D GRE and 1x1x4 mm 1.5 T GRE look alike. Phase is not used (the model must work
without it).

The YOLO score of a candidate is the highest microbleed confidence over the predicted boxes that contain
the candidate's centre (0 when none does). `fuse` consults it only inside a band of uncertain CNN scores.

Offline by construction: `configure_offline()` must run before ultralytics is imported. The ultralytics
network touch points it closes (ultralytics 8.4):
- `utils.is_online()` / `ONLINE` (DNS probes at import): YOLO_OFFLINE=1.
- `checks.check_requirements` pip auto-install: YOLO_AUTOINSTALL=0 (and ONLINE False).
- `checks.check_font("Arial.ttf")`, called by `check_det_dataset` on every training run, downloads the
  font unless USER_CONFIG_DIR holds it: we copy the shipped DejaVuSans.ttf there under that name.
- `events` telemetry and sentry: settings sync=False (and ONLINE False); integrations (comet, clearml,
  mlflow, dvc, raytune, tensorboard, wandb) off in the settings file.
- `check_amp()` downloads yolo11n.pt: train with amp=False (CPU training never runs it anyway).
- model names such as "yolov8n.pt" download weights: we build from the packaged yaml, pretrained=False,
  and load our own weights as a plain state_dict into a DetectionModel built from that yaml.
- the platform/hub callbacks need an API key: none is set.
USER_CONFIG_DIR (settings.json, font) goes to YOLO_CONFIG_DIR, a fresh temp folder of this process
(removed at exit) unless the caller already set one: ultralytics rewrites settings.json in place, so runs at
once must not share it, and HOME may be unset or read-only.

Weights: a plain state_dict (float16) loaded with torch.load(weights_only=True) after its SHA-256 matches
the model card beside it; no pickle from the file is executed.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from .classify import resolve_device
from .weights import MODELS_DIR, load_state_dict, verified_card
from .errors import WeightsError
from .preprocess import Prepared

TILE_PX = 64
PIXEL_MM = 0.5
MIN_NEIGHBOUR_MM = 2.0
INTENSITY_MAX = 1.5  # normalised magnitude mapped to [0, 1] by v / INTENSITY_MAX (tissue ~ 0.67)
CLASS_NAMES = {0: "microbleed"}
BASE_YAML = "yolov8.yaml"  # ultralytics' packaged YOLOv8 detect layout
SCALE = [0.33, 0.125, 1024]  # depth, width, max channels: half the width of "n" (0.9 M parameters), CPU-cheap
FONTS_DIR = Path(__file__).resolve().parents[1] / "Resources" / "Fonts"
DEFAULT_YOLO = MODELS_DIR / "cmb_yolo.pt"
ARCHITECTURE = {"yaml": BASE_YAML, "scale": SCALE, "nc": 1, "tile_px": TILE_PX, "pixel_mm": PIXEL_MM,
                "min_neighbour_mm": MIN_NEIGHBOUR_MM, "intensity_max": INTENSITY_MAX, "channels": "z-d,z,z+d"}
# Used when a card has no tuned fusion: consult YOLO for CNN scores in [lo, hi], weight w.
DEFAULT_FUSION = {"rule": "band-power", "lo": 0.2, "hi": 0.98, "weight": 1.0}

_OFFLINE_SETTINGS = {"sync": False, "api_key": "", "clearml": False, "comet": False, "dvc": False,
                     "mlflow": False, "raytune": False, "tensorboard": False, "wandb": False,
                     "vscode_msg": False, "openvino_msg": False}


# ----------------------------------------------------------------------------------------------------
# Offline ultralytics
# ----------------------------------------------------------------------------------------------------

def configure_offline(config_dir=None) -> Path:
    """Make ultralytics run with no network access; call before the first `import ultralytics`.

    Returns the ultralytics user config folder (settings.json and the local font live there).
    Safe to call more than once; if ultralytics is already imported its online flags are forced off.
    """
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "0"
    os.environ.setdefault("YOLO_VERBOSE", "False")
    if config_dir is not None:
        os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
    elif not os.environ.get("YOLO_CONFIG_DIR"):
        private = tempfile.mkdtemp(prefix="cmbdetector-ultralytics-")
        atexit.register(shutil.rmtree, private, ignore_errors=True)
        os.environ["YOLO_CONFIG_DIR"] = private
    user_dir = Path(os.environ["YOLO_CONFIG_DIR"]) / "Ultralytics"  # ultralytics appends this sub-folder
    user_dir.mkdir(parents=True, exist_ok=True)
    _write_offline_settings(user_dir / "settings.json")
    _install_font(user_dir)
    if "ultralytics" in sys.modules:  # imported before us: switch its import-time flags off as well
        _force_offline_flags()
    return user_dir


def _write_offline_settings(settings_file: Path) -> None:
    settings = {}
    if settings_file.is_file():
        try:
            settings = json.loads(settings_file.read_text())
        except ValueError:
            settings = {}
    if all(settings.get(k) == v for k, v in _OFFLINE_SETTINGS.items()):
        return
    settings.update(_OFFLINE_SETTINGS)
    settings_file.write_text(json.dumps(settings, indent=2))


def _install_font(user_dir: Path) -> None:
    """ultralytics asks for Arial.ttf (labels on plots) and downloads it when absent: give it DejaVu Sans."""
    source = FONTS_DIR / "DejaVuSans.ttf"
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        target = user_dir / name
        if not target.exists() and source.is_file():
            shutil.copyfile(source, target)


def _force_offline_flags() -> None:
    import importlib

    for module_name in ("ultralytics.utils", "ultralytics.utils.checks", "ultralytics.utils.events"):
        module = sys.modules.get(module_name) or importlib.import_module(module_name)
        for flag in ("ONLINE", "AUTOINSTALL"):
            if hasattr(module, flag):
                setattr(module, flag, False)
    from ultralytics.utils import SETTINGS

    SETTINGS.update(_OFFLINE_SETTINGS)


# ----------------------------------------------------------------------------------------------------
# 2.5D tiles
# ----------------------------------------------------------------------------------------------------

def neighbour_mm(prepared: Prepared) -> float:
    """Distance (mm) between the tile's channels: the slice spacing along the axis nearest RAS z, >= 2 mm."""
    direction = np.abs(prepared.volume.affine[:3, :3]) / prepared.spacing
    slice_axis = int(np.argmax(direction[2]))
    return float(max(prepared.spacing[slice_axis], MIN_NEIGHBOUR_MM))


def tile_offsets_mm(tile_px: int = TILE_PX, pixel_mm: float = PIXEL_MM) -> np.ndarray:
    """(S, S, 2) in-plane RAS (x, y) offsets of the tile pixels: row <-> y, column <-> x."""
    axis = (np.arange(tile_px) - (tile_px - 1) / 2) * pixel_mm
    y, x = np.meshgrid(axis, axis, indexing="ij")
    return np.stack([x, y], axis=-1)


def make_tiles(prepared: Prepared, centres_ras: np.ndarray, tile_px: int = TILE_PX,
               pixel_mm: float = PIXEL_MM) -> np.ndarray:
    """float32 (N, 3, S, S) tiles in [0, 1] centred on RAS centres (N, 3), channels z-d, z, z+d.

    Trilinear sampling of `prepared.image` (zero outside the image), values divided by INTENSITY_MAX.
    Pixel (row r, column c) of tile n sits at RAS (x_n + (c - (S-1)/2) p, y_n + (r - (S-1)/2) p, z_n + dz).
    """
    centres_ras = np.asarray(centres_ras, float).reshape(-1, 3)
    tiles = np.zeros((len(centres_ras), 3, tile_px, tile_px), np.float32)
    if len(centres_ras) == 0:
        return tiles
    step = neighbour_mm(prepared)
    plane = tile_offsets_mm(tile_px, pixel_mm).reshape(-1, 2)
    offsets = np.concatenate([np.c_[plane, np.full(len(plane), dz)] for dz in (-step, 0.0, step)])  # (3*S*S, 3)
    inverse = np.linalg.inv(prepared.volume.affine)
    chunk_size = 128
    for start in range(0, len(centres_ras), chunk_size):
        chunk = centres_ras[start:start + chunk_size]
        points = (chunk[:, None, :] + offsets[None]).reshape(-1, 3)
        ijk = (points @ inverse[:3, :3].T + inverse[:3, 3]).T
        values = ndimage.map_coordinates(prepared.image, ijk, order=1, mode="constant", cval=0.0)
        tiles[start:start + len(chunk)] = values.reshape(len(chunk), 3, tile_px, tile_px)
    return np.clip(tiles / INTENSITY_MAX, 0.0, 1.0)


def tiles_to_uint8_rgb(tiles: np.ndarray) -> np.ndarray:
    """uint8 (N, S, S, 3) images (channel order z-d, z, z+d as R, G, B) for writing training files."""
    return np.round(np.transpose(tiles, (0, 2, 3, 1)) * 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------

@dataclass
class LoadedYolo:
    network: object  # ultralytics DetectionModel, eval mode, fused
    card: dict
    sha256: str
    device: str

    @property
    def fusion(self) -> dict:
        return dict(self.card.get("fusion") or DEFAULT_FUSION)


def model_config(nc: int = 1) -> dict:
    """The ultralytics model definition: the packaged yolov8.yaml at our own scale "t"."""
    import copy

    configure_offline()
    from ultralytics.nn.tasks import yaml_model_load

    config = copy.deepcopy(yaml_model_load(BASE_YAML))
    config.update({"scales": {"t": list(SCALE)}, "scale": "t", "nc": nc})
    config.pop("yaml_file", None)
    return config


def build_network(nc: int = 1):
    """An untrained ultralytics DetectionModel built from `model_config` (no weights are fetched)."""
    configure_offline()
    from ultralytics.nn.tasks import DetectionModel

    return DetectionModel(model_config(nc), ch=3, nc=nc, verbose=False)


def load_yolo(path=DEFAULT_YOLO, device: str = "cpu") -> LoadedYolo:
    """Load stage-3 weights from a local file after checking their SHA-256 against the model card."""
    card, actual = verified_card(path, what="YOLO model")
    architecture = card.get("architecture") or {}
    if {k: architecture.get(k) for k in ARCHITECTURE} != ARCHITECTURE:
        raise WeightsError(f"YOLO weights {Path(path).name} were trained for another tile/architecture: {architecture}")
    network = build_network(nc=int(architecture["nc"]))
    load_state_dict(network, path, what="YOLO", convert=lambda tensor: tensor.float())
    network = network.fuse(verbose=False) if _fuse_takes_verbose(network) else network.fuse()
    device = resolve_device(device)
    network.to(device).eval()
    return LoadedYolo(network, card, actual, device)


def _fuse_takes_verbose(network) -> bool:
    import inspect

    return "verbose" in inspect.signature(network.fuse).parameters


def state_dict_from_checkpoint(checkpoint_path) -> dict:
    """float16 state_dict of the EMA (else raw) model in an ultralytics training checkpoint we wrote."""
    import torch

    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)  # our own training output
    model = checkpoint.get("ema") or checkpoint["model"]
    return {k: v.detach().half() if v.is_floating_point() else v.detach() for k, v in model.float().state_dict().items()}


# ----------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------

def predict_tiles(model: LoadedYolo, tiles: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Raw decoded predictions float32 (N, A, 4 + nc): box centre x, y, width, height in tile pixels and
    per-class confidences, for every anchor A (no NMS)."""
    import torch

    outputs = []
    with torch.inference_mode():
        for start in range(0, len(tiles), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(tiles[start:start + batch_size])).to(model.device)
            prediction = model.network(batch)
            prediction = prediction[0] if isinstance(prediction, (tuple, list)) else prediction
            outputs.append(prediction.permute(0, 2, 1).float().cpu().numpy())
    if not outputs:
        return np.zeros((0, 0, 4 + int(model.card["architecture"]["nc"])), np.float32)
    return np.concatenate(outputs)


def point_scores(predictions: np.ndarray, point_xy, margin_px: float = 1.0, class_index: int = 0) -> np.ndarray:
    """(N,) highest class confidence over the boxes that contain `point_xy` (tile pixels), 0 if none."""
    if len(predictions) == 0:
        return np.zeros(0, np.float32)
    x, y, w, h = (predictions[..., i] for i in range(4))
    px, py = point_xy
    inside = (np.abs(px - x) <= w / 2 + margin_px) & (np.abs(py - y) <= h / 2 + margin_px)
    confidence = np.where(inside, predictions[..., 4 + class_index], 0.0)
    return confidence.max(axis=1).astype(np.float32)


def score_candidates(model: LoadedYolo, prepared: Prepared, centres_ras: np.ndarray,
                     timings: dict | None = None) -> np.ndarray:
    """float32 (N,) in [0, 1]: YOLO's confidence that a microbleed box holds each RAS centre (N, 3).

    One tile per candidate, centred on it, batched. If `timings` is given, "yolo_tiles" and
    "yolo_network" seconds are added to it.
    """
    centres_ras = np.asarray(centres_ras, float).reshape(-1, 3)
    if len(centres_ras) == 0:
        return np.zeros(0, np.float32)
    architecture = model.card["architecture"]
    tick = time.perf_counter()
    tiles = make_tiles(prepared, centres_ras, architecture["tile_px"], architecture["pixel_mm"])
    tock = time.perf_counter()
    scores = score_tiles(model, tiles)
    if timings is not None:
        timings["yolo_tiles"] = timings.get("yolo_tiles", 0.0) + tock - tick
        timings["yolo_network"] = timings.get("yolo_network", 0.0) + time.perf_counter() - tock
    return scores


def score_tiles(model: LoadedYolo, tiles) -> np.ndarray:
    """float32 (N,) in [0, 1]: YOLO's confidence that a microbleed box holds the centre of each of `make_tiles`'
    tiles (made apart from the network, e.g. in a worker process that must not run torch)."""
    if len(tiles) == 0:
        return np.zeros(0, np.float32)
    centre_px = (model.card["architecture"]["tile_px"] - 1) / 2
    return np.clip(point_scores(predict_tiles(model, tiles), (centre_px, centre_px)), 0.0, 1.0)


# ----------------------------------------------------------------------------------------------------
# Fusion
# ----------------------------------------------------------------------------------------------------

def consulted(cnn_scores: np.ndarray, params: dict | None = None) -> np.ndarray:
    """bool (N,): the candidates whose CNN score lies in the band where YOLO is consulted."""
    params = params or DEFAULT_FUSION
    cnn_scores = np.asarray(cnn_scores, float)
    return (cnn_scores >= params["lo"]) & (cnn_scores <= params["hi"])


def fuse(cnn_scores, yolo_scores, params: dict | None = None) -> np.ndarray:
    """Fused float (N,) scores. Rule "band-power" with params lo < hi, weight w >= 0:

    outside [lo, hi] the CNN score is kept; inside, with t = (cnn - lo) / (hi - lo) in [0, 1],
        fused = lo + (hi - lo) * t ** exp(-2 w (yolo - 0.5)).
    So YOLO confidence above 0.5 pulls the score up towards hi, below 0.5 down towards lo, never across
    the band's edges. The result is continuous, non-decreasing in both scores and equals the CNN
    score at the band edges; w = 0 leaves every score unchanged. Entries of `yolo_scores` outside the band
    are ignored (YOLO need not be run there).
    """
    params = params or DEFAULT_FUSION
    lo, hi, weight = float(params["lo"]), float(params["hi"]), float(params["weight"])
    if not 0.0 <= lo < hi <= 1.0 or weight < 0:
        raise ValueError(f"fusion parameters need 0 <= lo < hi <= 1 and weight >= 0, got {params}")
    cnn = np.asarray(cnn_scores, float)
    yolo = np.clip(np.asarray(yolo_scores, float), 0.0, 1.0)
    fused = cnn.copy()
    band = consulted(cnn, params)
    t = (cnn[band] - lo) / (hi - lo)
    fused[band] = lo + (hi - lo) * np.power(t, np.exp(-2.0 * weight * (yolo[band] - 0.5)))
    return fused
