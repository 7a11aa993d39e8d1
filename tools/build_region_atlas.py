#!/usr/bin/env python3
"""Rebuild CMBDetector's coarse microbleed-location map in MNI152 2009c (sym, 09a) space.

Output: a uint8 NIfTI on the 197x233x189, 1 mm grid of the MNI ICBM152 2009a symmetric templates that
ship inside the nilearn wheel (affine origin (-98, -134, -72), RAS). Each voxel holds one of the codes in
CMBDetectorLib.atlas.REGION_CODES (lobar per lobe, deep structures, brainstem, cerebellum, CSF, outside).

Inputs (read from disk, nothing is downloaded):
- nilearn's MNI152 2009 grey / white matter probability maps: the brain mask and the GM/WM decision.
- Debian package `mricron-data` (`apt-get install mricron-data`), /usr/share/mricron/templates/:
  `aal.nii.gz` (AAL, 116 labels: cortex per gyrus, deep grey nuclei, cerebellum) and
  `JHU-WhiteMatter-labels-1mm.nii.gz` (ICBM-DTI-81 white matter labels: capsules, corpus callosum,
  brainstem tracts). Both are in MNI space; they are resampled by nearest neighbour, no registration.
The Colin27 (`ch2*`) images in the same package are never read: they are kept for independent evaluation.

Rules, per brain voxel (brain = GM + WM probability >= 0.5):
1. brainstem box (|x| <= 16, -48 <= y <= -5, z <= -6 mm) with no AAL label, or a JHU brainstem tract -> 30;
   JHU cerebellar peduncles (in white matter) -> 31.
2. grey matter (GM >= WM) with an AAL label within 3 mm -> the class of the nearest AAL label.
3. white matter: JHU corpus callosum / tapetum -> 23, JHU internal / external capsule -> 22; cerebellar WM
   (nearest AAL label cerebellar) -> 31; within JUXTACORTICAL_MM of lobar cortex -> that lobe
   (juxtacortical); otherwise -> 24 deep / periventricular white matter.
Enclosed non-brain voxels (ventricles, sulcal and cisternal CSF inside the closed brain hull) -> 1.

Usage:  python tools/build_region_atlas.py [--mricron DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "CMBDetector" / "CMBDetectorLib" / "data" / "mni152_2009_cmb_regions_1mm.nii.gz"
MRICRON_TEMPLATES = Path("/usr/share/mricron/templates")
JUXTACORTICAL_MM = 3.0   # white matter this close to cortex counts as lobar (juxtacortical)
AAL_SNAP_MM = 3.0        # GM voxels farther than this from any AAL label are treated like white matter

# AAL label index -> class code (see CMBDetectorLib.atlas.REGION_CODES). Lobe choices that are a
# convention: cingulate anterior/middle -> frontal, posterior -> parietal (its lobe); paracentral lobule
# -> parietal (AAL's own grouping); fusiform, hippocampus, parahippocampal, amygdala -> temporal.
FRONTAL, PARIETAL, TEMPORAL, OCCIPITAL, INSULA = 10, 11, 12, 13, 14
BASAL_GANGLIA, THALAMUS, CAPSULE, CORPUS_CALLOSUM, DEEP_WM = 20, 21, 22, 23, 24
BRAINSTEM, CEREBELLUM, CSF = 30, 31, 1


def aal_class_table() -> np.ndarray:
    """uint8 array indexed by AAL label (0..116) giving the class code (0 for label 0)."""
    table = np.zeros(117, dtype=np.uint8)
    groups = {
        FRONTAL: list(range(1, 29)) + [31, 32, 33, 34],      # frontal gyri, SMA, olfactory, rectus, ACC, MCC
        INSULA: [29, 30],
        PARIETAL: [35, 36] + list(range(57, 71)),            # PCC, postcentral ... paracentral
        TEMPORAL: list(range(37, 43)) + [55, 56] + list(range(79, 91)),
        OCCIPITAL: list(range(43, 55)),
        BASAL_GANGLIA: list(range(71, 77)),                  # caudate, putamen, pallidum
        THALAMUS: [77, 78],
        CEREBELLUM: list(range(91, 117)),
    }
    for code, labels in groups.items():
        table[labels] = code
    return table


def jhu_class_table() -> np.ndarray:
    """uint8 array indexed by JHU ICBM-DTI-81 label (0..48): class code, 0 = 'decide from tissue'."""
    table = np.zeros(49, dtype=np.uint8)
    table[[2, 7, 8, 9, 10, 15, 16]] = BRAINSTEM          # pontine crossing, corticospinal, lemniscus, peduncle
    table[[1, 11, 12, 13, 14]] = CEREBELLUM              # middle / inferior / superior cerebellar peduncles
    table[[3, 4, 5, 47, 48]] = CORPUS_CALLOSUM           # genu, body, splenium, tapetum
    table[list(range(17, 23)) + [33, 34]] = CAPSULE      # internal capsule limbs, external capsule
    return table


def nilearn_data_dir() -> Path:
    import nilearn

    return Path(nilearn.__file__).parent / "datasets" / "data"


def resample_nearest(image: nib.Nifti1Image, shape: tuple, affine: np.ndarray) -> np.ndarray:
    """Labels of `image` sampled (nearest neighbour) at every voxel of the target grid; 0 outside."""
    labels = np.asanyarray(image.dataobj)
    target_to_source = np.linalg.inv(image.affine) @ affine
    ijk = np.indices(shape).reshape(3, -1)
    source = np.rint(target_to_source[:3, :3] @ ijk + target_to_source[:3, 3:4]).astype(int)
    inside = np.all((source >= 0) & (source < np.array(labels.shape)[:, None]), axis=0)
    out = np.zeros(ijk.shape[1], dtype=labels.dtype)
    out[inside] = labels[source[0, inside], source[1, inside], source[2, inside]]
    return out.reshape(shape)


def nearest_label(labels: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every voxel: the value of the nearest voxel where `mask` is true, and the distance (voxels)."""
    distance, indices = ndimage.distance_transform_edt(~mask, return_indices=True)
    return labels[tuple(indices)], distance


def build(mricron_dir: Path = MRICRON_TEMPLATES) -> nib.Nifti1Image:
    """The region-class map as a NIfTI image (uint8, 1 mm, MNI152 2009 grid)."""
    data = nilearn_data_dir()
    gm_image = nib.load(data / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")
    affine, shape = gm_image.affine, gm_image.shape
    if not np.allclose(np.abs(np.diag(affine)[:3]), 1.0):
        raise SystemExit("expected a 1 mm template grid")
    gm = gm_image.get_fdata(dtype=np.float32) / 255.0
    wm = nib.load(data / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz").get_fdata(dtype=np.float32) / 255.0
    aal = resample_nearest(nib.load(mricron_dir / "aal.nii.gz"), shape, affine).astype(np.int32)
    jhu = resample_nearest(nib.load(mricron_dir / "JHU-WhiteMatter-labels-1mm.nii.gz"), shape, affine).astype(np.int32)

    brain = (gm + wm) >= 0.5
    brain = ndimage.binary_opening(brain, iterations=1)
    labels, _ = ndimage.label(brain)
    brain = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)  # largest component

    mni = np.stack(np.indices(shape), axis=-1) @ affine[:3, :3].T + affine[:3, 3]
    x, y, z = mni[..., 0], mni[..., 1], mni[..., 2]

    aal_class = aal_class_table()[np.clip(aal, 0, 116)]
    jhu_class = jhu_class_table()[np.clip(jhu, 0, 48)]
    nearest_aal_class, aal_distance = nearest_label(aal_class, aal_class > 0)

    codes = np.zeros(shape, dtype=np.uint8)
    # Brainstem first: AAL has no brainstem label; take unlabeled brain inside a generous box around it
    # (the box stops short of the thalamus) plus JHU's brainstem tracts.
    brainstem_box = (np.abs(x) <= 16) & (y >= -48) & (y <= -5) & (z <= -6)
    brainstem = brain & ((brainstem_box & (aal_class == 0) & (jhu_class != CEREBELLUM)) | (jhu_class == BRAINSTEM))
    codes[brainstem] = BRAINSTEM

    is_grey = brain & ~brainstem & (gm >= wm) & (aal_distance <= AAL_SNAP_MM)
    codes[is_grey] = nearest_aal_class[is_grey]

    # White matter (and grey matter far from any AAL label): capsules, callosum, peduncles from JHU.
    rest = brain & (codes == 0)
    from_jhu = rest & (jhu_class > 0)
    codes[from_jhu] = jhu_class[from_jhu]
    cerebellar_wm = rest & ~from_jhu & (nearest_aal_class == CEREBELLUM) & (z < -10)
    codes[cerebellar_wm] = CEREBELLUM

    # Remaining white matter: juxtacortical (lobar) if near lobar cortex, else deep.
    unassigned = brain & (codes == 0)
    cortex = np.isin(codes, [FRONTAL, PARIETAL, TEMPORAL, OCCIPITAL, INSULA])
    lobe_of_nearest_cortex, cortex_distance = nearest_label(codes, cortex)
    juxtacortical = unassigned & (cortex_distance <= JUXTACORTICAL_MM)
    codes[juxtacortical] = lobe_of_nearest_cortex[juxtacortical]
    codes[unassigned & ~juxtacortical] = DEEP_WM

    # CSF: non-brain voxels enclosed by the closed brain hull (ventricles, sulci, cisterns).
    hull = ndimage.binary_fill_holes(ndimage.binary_closing(brain, iterations=4))
    codes[hull & ~brain] = CSF

    header = nib.Nifti1Header()
    header.set_data_dtype(np.uint8)
    image = nib.Nifti1Image(codes, affine, header)
    image.set_qform(affine, code=4)  # 4 = MNI152
    image.set_sform(affine, code=4)
    image.header["descrip"] = b"CMBDetector region classes, MNI152 2009 sym; AAL+JHU (mricron-data)"
    return image


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mricron", type=Path, default=MRICRON_TEMPLATES, help="mricron-data templates folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output .nii.gz")
    args = parser.parse_args(argv)
    for name in ("aal.nii.gz", "JHU-WhiteMatter-labels-1mm.nii.gz"):
        if not (args.mricron / name).exists():
            print(f"missing {args.mricron / name}: install the Debian package mricron-data", file=sys.stderr)
            return 2
    image = build(args.mricron)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, args.out)
    codes, counts = np.unique(np.asanyarray(image.dataobj), return_counts=True)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")
    for code, count in zip(codes, counts):
        print(f"  code {int(code):3d}: {int(count):8d} voxels ({count / 1000:.1f} ml)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
