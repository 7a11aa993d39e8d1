#!/usr/bin/env python3
"""Measure the image-type warnings (CMBDetectorLib/imagetype.py) on every scan we have: how many false
warnings on real and simulated T2*-weighted scans, and whether T1-like and non-head images are warned.

For each magnitude: register to MNI (as detect does), build the intensity mask, run check_image_type;
print one line per scan (CSF/WM ratio, blob solidity and interior spread, warnings) and a summary.

Usage:  python tools/check_image_types.py [--folders DIR ...] [--ood DIR] [--real DIR] [--inverted N]
        [--workers 2]
Nothing is written next to the inputs. The inverted scans are built in memory (max - magnitude inside
the head), the T1 is nilearn's MNI152 2009 template as is, the phantom a noisy uniform sphere.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "CMBDetector"))

DEFAULT_FOLDERS = [f"/work/data/{name}" for name in ("train_nom", "train_rand", "tune_nom", "tune_rand")]
DEFAULT_REAL = "/work/shared/data/real-gre"


def magnitudes(folder: Path) -> list:
    """The magnitude images of a simulated folder (not phase, brain mask or truth)."""
    return sorted(p for p in folder.glob("*.nii.gz")
                  if not p.name.endswith(("_phase.nii.gz", "_brain.nii.gz")) and ".truth" not in p.name)


def measure(case: tuple) -> tuple:
    """(kind, name, expected_warning, ratio, solidity, spread, warnings) of one image."""
    from CMBDetectorLib import atlas, imagetype, io, locate

    kind, name, expect, source = case
    if source == "t1-template":
        volume = atlas.load_mni_template()
    elif source == "sphere-phantom":
        volume = sphere_phantom()
    elif isinstance(source, tuple) and source[0] == "inverted":
        volume = inverted(io.read_volume(source[1]))
    else:
        volume = io.read_volume(source)
    crop = kind == "real crop"
    if crop:  # detect --crop: no registration, so no image-type check (reported as measured nothing)
        return kind, name, expect, None, None, None, ()
    registration = locate.register_to_mni(volume)  # one thread, always (locate.py)
    check = imagetype.check_image_type(volume, registration)  # as detect runs it
    return kind, name, expect, check.csf_wm_ratio, check.solidity, check.interior_spread, check.warnings


def inverted(volume):
    """A T1-like version of a T2*-weighted scan: max - magnitude inside the head, 0 outside."""
    from CMBDetectorLib import brain

    head = brain.dilate_mm(brain.intensity_mask(volume), volume.spacing, 10.0)
    array = np.asarray(volume.array, dtype=np.float32)
    top = float(np.percentile(array[head], 99.5))
    return volume.with_array(np.where(head, np.clip(top - array, 0, None), 0).astype(np.float32))


def sphere_phantom():
    """A 90 mm noisy uniform sphere in a 1 mm 180^3 grid."""
    from CMBDetectorLib.image import Volume

    grid = np.indices((160, 160, 160)).astype(np.float32) - 80
    inside = np.sqrt((grid ** 2).sum(0)) < 45
    array = np.where(inside, 1000.0, 5.0) + 20 * np.random.default_rng(0).standard_normal(inside.shape)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = -80
    return Volume(array.astype(np.float32), affine, {"source": "sphere phantom"})


def cases(args) -> list:
    found = []
    for folder in args.folders:
        for path in magnitudes(Path(folder)):
            found.append(("simulated", path.name, False, str(path)))
    if args.ood:
        for path in magnitudes(Path(args.ood)):
            found.append(("simulated OOD", path.name, False, str(path)))
    real = Path(args.real)
    if (real / "philips-3t-dual-echo").is_dir():
        for echo in (1, 2):
            found.append(("real whole head", f"philips mag_echo{echo}", False,
                          str(real / "philips-3t-dual-echo" / f"mag_echo{echo}.nii.gz")))
        for crop in ("romeo_small", "romeo_small2"):
            found.append(("real crop", crop, False, str(real / crop / "Mag.nii")))
    simulated = [c for c in found if c[0] == "simulated"]
    for kind, name, _, path in simulated[:: max(1, len(simulated) // max(args.inverted, 1))][: args.inverted]:
        found.append(("inverted (T1-like)", name, True, ("inverted", path)))
    found.append(("T1", "MNI152 2009 T1 template", True, "t1-template"))
    found.append(("phantom", "uniform sphere", True, "sphere-phantom"))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folders", nargs="*", default=DEFAULT_FOLDERS)
    parser.add_argument("--ood", help="a folder of `cmbdetector synth --acquisition ood` scans")
    parser.add_argument("--real", default=DEFAULT_REAL)
    parser.add_argument("--inverted", type=int, default=12, help="how many simulated scans to also invert")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    todo = cases(args)
    rows = []
    from CMBDetectorLib.workers import process_pool

    with process_pool(args.workers) as pool:
        for row in pool.map(measure, todo):
            kind, name, expect, ratio, solidity, spread, warnings = row
            text = lambda v: "-" if v is None or not np.isfinite(v) else f"{v:.2f}"  # noqa: E731
            print(f"{kind:20s} {name:34s} ratio {text(ratio):>5s} solidity {text(solidity):>5s} "
                  f"spread {text(spread):>5s} {'WARN ' + ' | '.join(warnings) if warnings else 'ok'}", flush=True)
            rows.append(row)
    print("\nsummary (kind: warned / scans; expected warned?)")
    for kind in dict.fromkeys(row[0] for row in rows):
        group = [row for row in rows if row[0] == kind]
        warned = sum(1 for row in group if row[6])
        ratios = [row[3] for row in group if row[3] is not None]
        spread = f", CSF/WM ratio {min(ratios):.2f}-{max(ratios):.2f}" if ratios else ""
        print(f"  {kind}: {warned} / {len(group)} warned (expected: {'all' if group[0][2] else 'none'}){spread}")
    false_warnings = sum(1 for row in rows if row[6] and not row[2])
    missed = sum(1 for row in rows if row[2] and not row[6])
    print(f"false warnings: {false_warnings}; expected warnings missed: {missed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
