"""Helpers shared by several test modules (one owner, instead of importing across test files)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np

from CMBDetectorLib.findings import Finding
from CMBDetectorLib.image import Volume
from CMBDetectorLib.preprocess import Prepared

ROOT = Path(__file__).resolve().parents[1]  # the repository
# The Slicer module file: not in a package, so tests load it with load_source or read its source.
MODULE_FILE = ROOT / "CMBDetector" / "CMBDetector.py"

# (centre voxel, radius mm, intensity) of dark spheres in small_swi_crop: from clearly lesion-like to
# faint, so that a detection run scores some of them above and some below the operating point.
SMALL_CROP_BLOBS = (((30, 30, 20), 2.0, 200.0), ((60, 50, 15), 2.0, 200.0), ((40, 70, 25), 1.5, 400.0),
                    ((70, 25, 10), 1.2, 650.0), ((20, 60, 30), 1.0, 800.0), ((75, 75, 28), 1.0, 900.0))


def cli(*arguments, timeout: float = 900):
    """`cmbdetector ARGUMENTS` in a fresh interpreter: the completed process, output captured as text."""
    return subprocess.run([sys.executable, "-m", "CMBDetectorLib.cli", *map(str, arguments)],
                          capture_output=True, text=True, timeout=timeout)


def load_source(name: str, path: Path, register: bool = False):
    """Import the Python file `path` as a module called `name` (the Slicer module file and tools/ are not
    packages). register: put it in sys.modules first, for code that looks itself up there (Slicer's
    resourcePath finds the .ui beside the module file that way)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def small_swi_crop(seed: int = 0) -> Volume:
    """A 96 x 96 x 40 partial-brain crop (0.5 x 0.5 x 1 mm): bright noisy tissue with dark spheres.

    Small enough for `cmbdetector detect --crop` to finish in seconds on a CPU.
    """
    rng = np.random.default_rng(seed)
    shape = (96, 96, 40)
    spacing = np.array([0.5, 0.5, 1.0])
    array = 1000.0 + 30.0 * rng.standard_normal(shape)
    i, j, k = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    for centre, radius_mm, intensity in SMALL_CROP_BLOBS:
        distance = np.sqrt(sum(((axis - c) * s) ** 2 for axis, c, s in zip((i, j, k), centre, spacing)))
        array[distance < radius_mm] = intensity
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-24.0, -24.0, -20.0]
    return Volume(array.astype(np.float32), affine, {"source": "small_swi_crop"})


def write_crop_reviews(folder, seeds=(0, 1, 2)) -> list:
    """A tiny folder of complete reviews (issue #16) for fine-tuning tests: each small_swi_crop written as
    NIfTI beside a review JSON that accepts its two clearest spheres, rejects the third and adds the fourth
    (as the Slicer export writes them, a partial-brain crop). Returns the review paths."""
    import json
    from pathlib import Path

    import SimpleITK as sitk

    from CMBDetectorLib.findings import Finding
    from CMBDetectorLib.io import volume_to_sitk
    from CMBDetectorLib.review import review_document

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in seeds:
        volume = small_swi_crop(seed)
        name = f"crop{seed}"
        sitk.WriteImage(volume_to_sitk(volume), str(folder / f"{name}.nii.gz"))
        states = ("accepted", "accepted", "rejected", "added")
        findings = [Finding(f"CMB-{n + 1}", tuple(volume.ijk_to_ras(centre)[0]), 0.5, 3.0, status=state)
                    for n, ((centre, _, _), state) in enumerate(zip(SMALL_CROP_BLOBS, states))]
        document = review_document(findings, complete=True, reader="test", input_name=name,
                                   extra={"volume": f"{name}.nii.gz", "crop": True})
        paths.append(folder / f"{name}_review.json")
        paths[-1].write_text(json.dumps(document))
    return paths


def flip_a_byte(path) -> None:
    """Corrupt a weights file in place (one byte in the middle inverted): its SHA-256 no longer matches."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# where synthetic_prepared draws its sphere and its tube, and a place with neither
SPHERE_RAS = np.array([0.0, 0.0, 0.0])
TUBE_RAS = np.array([15.0, 15.0, 0.0])
BLANK_RAS = np.array([-15.0, 15.0, 0.0])


def synthetic_prepared(spacing=(0.8, 0.8, 2.0), shape=(80, 80, 24)) -> Prepared:
    """Tissue at 1.0 with a dark 3.6 mm sphere at the centre and a dark vertical tube (a vein seen end-on)."""
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -np.array(shape) * np.array(spacing) / 2
    volume = Volume(np.ones(shape, np.float32), affine, {})
    ras = volume.ijk_to_ras(np.argwhere(np.ones(shape, bool))).reshape(*shape, 3)
    image = np.ones(shape, np.float32)
    image[np.linalg.norm(ras - SPHERE_RAS, axis=-1) <= 1.8] = 0.15
    image[np.linalg.norm(ras[..., :2] - TUBE_RAS[:2], axis=-1) <= 1.2] = 0.2
    return Prepared(volume.with_array(image), image, np.ones(shape, bool), None, False)


# A hand-worked evaluation study: truth, detections and the answers (test_evaluate, test_bench)

def bleed(x, y, z, region="lobar", lobe=""):
    return {"id": 0, "center_ras": [x, y, z], "true_diameter_mm": 2.0, "apparent_diameter_mm": 3.0,
            "chi_ppm": 1.0, "region": region, "lobe": lobe}


def truth(scan_id, acquisition, bleeds):
    return {"scan_id": scan_id, "seed": 0, "acquisition": {"name": acquisition, "spacing_mm": [1, 1, 1]},
            "microbleeds": bleeds, "mimics": {}, "files": {"magnitude": f"{scan_id}.nii.gz"}}


def det(x, y, z, score, region="unknown", lobe="", status="pending"):
    return Finding(label="", position_ras=(x, y, z), score=score, diameter_mm=3.0, region=region,
                   lobe=lobe, status=status)


def study():
    """Four scans, worked by hand (tolerance 5 mm):

    A (swi3t): CMBs a1 (0,0,0) lobar/frontal, a2 (30,0,0) deep, a3 (0,40,0) infratentorial.
       d .9 at 4.9 mm from a1          -> TP (lobar, frontal: location agrees)
       d .8 at 5.1 mm from a2          -> FP (just outside)
       d .7 and d .6, both 1 mm from a3 -> one TP, one FP
       => TP 2, FP 2, FN 1 (a2)
    B (gre15t): CMB b1 (10,10,10) lobar/parietal; d .4 2 mm away, predicted "deep" -> TP, region disagrees
    C (gre15t): CMB-free; d .3 -> FP
    D (gre15t): CMB-free; no detections
    Pooled: TP 3, FP 3, FN 1 -> sensitivity 3/4, precision 3/6, F1 6/10, FP/scan 3/4 (over 4 scans).
    """
    return [
        (truth("A", "swi3t", [bleed(0, 0, 0, "lobar", "frontal"), bleed(30, 0, 0, "deep"),
                              bleed(0, 40, 0, "infratentorial")]),
         [det(4.9, 0, 0, 0.9, "lobar", "frontal"), det(30, 5.1, 0, 0.8, "deep"),
          det(0, 40, 1, 0.7, "infratentorial"), det(0, 41, 0, 0.6, "infratentorial")]),
        (truth("B", "gre15t", [bleed(10, 10, 10, "lobar", "parietal")]), [det(10, 10, 12, 0.4, "deep")]),
        (truth("C", "gre15t", []), [det(50, 50, 50, 0.3, "lobar", "frontal")]),
        (truth("D", "gre15t", []), []),
    ]
