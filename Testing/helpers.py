"""Helpers shared by several test modules (one owner, instead of importing across test files)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

from CMBDetectorLib.image import Volume

# The Slicer module file: not in a package, so tests load it with load_source or read its source.
MODULE_FILE = Path(__file__).resolve().parents[1] / "CMBDetector" / "CMBDetector.py"

# (centre voxel, radius mm, intensity) of dark spheres in small_swi_crop: from clearly lesion-like to
# faint, so that a detection run scores some of them above and some below the operating point.
SMALL_CROP_BLOBS = (((30, 30, 20), 2.0, 200.0), ((60, 50, 15), 2.0, 200.0), ((40, 70, 25), 1.5, 400.0),
                    ((70, 25, 10), 1.2, 650.0), ((20, 60, 30), 1.0, 800.0), ((75, 75, 28), 1.0, 900.0))


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
