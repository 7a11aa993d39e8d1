"""Gallery PNG of a simulated scan: whole axial slices, then close-ups of lesions and mimics."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _axial_crop(volume, centre_ras, half_mm=15.0):
    i, j, k = np.round(volume.ras_to_ijk(centre_ras)[0]).astype(int)
    spacing = volume.spacing
    hi, hj = int(half_mm / spacing[0]), int(half_mm / spacing[1])
    shape = volume.shape
    k = min(max(k, 0), shape[2] - 1)
    return volume.array[max(i - hi, 0): i + hi + 1, max(j - hj, 0): j + hj + 1, k], spacing


def _show(axis, image, spacing, title, vmax):
    # Array axes are (i = R, j = A); show radiological-style: anterior up.
    axis.imshow(image.T, cmap="gray", origin="lower", vmin=0, vmax=vmax,
                aspect=spacing[1] / spacing[0], interpolation="nearest")
    axis.set_title(title, fontsize=7)
    axis.axis("off")


def write_gallery(scan, path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    volume, truth = scan.magnitude, scan.truth
    vmax = float(np.percentile(volume.array, 99.5))
    tiles = []
    depth = volume.shape[2]
    for fraction in (0.35, 0.5, 0.65):
        k = int(depth * fraction)
        tiles.append((volume.array[:, :, k], volume.spacing, f"axial slice {k}"))
    for cmb in truth["microbleeds"][:6]:
        crop, spacing = _axial_crop(volume, cmb["center_ras"])
        tiles.append((crop, spacing, f"CMB {cmb['id']} {cmb['region']} {cmb['apparent_diameter_mm']:.1f} mm"))
    for calc in truth["mimics"]["calcifications"][:2]:
        crop, spacing = _axial_crop(volume, calc["center_ras"])
        tiles.append((crop, spacing, f"calcification ({calc['site']})"))
    medullary = [v for v in truth["mimics"]["veins"] if v["kind"] in ("medullary vein", "cortical vein")]
    for vein in medullary[:2]:
        middle = vein["points_ras"][len(vein["points_ras"]) // 2]
        crop, spacing = _axial_crop(volume, middle)
        tiles.append((crop, spacing, vein["kind"]))
    for nucleus in truth["mimics"]["iron_nuclei"][:1]:
        crop, spacing = _axial_crop(volume, nucleus["center_ras"], 30.0)
        tiles.append((crop, spacing, f"iron: {nucleus['name']}"))
    sinus = dict((a["name"], a["center_ras"]) for a in truth["mimics"]["air_bone"]).get("sphenoid sinus")
    if sinus:
        crop, spacing = _axial_crop(volume, np.array(sinus) + [0, 0, 15], 40.0)
        tiles.append((crop, spacing, "air-bone (above sphenoid)"))
    columns = 5
    rows = int(np.ceil(len(tiles) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 2.4, rows * 2.5))
    for axis in np.atleast_1d(axes).ravel():
        axis.axis("off")
    for axis, (image, spacing, title) in zip(np.atleast_1d(axes).ravel(), tiles):
        _show(axis, image, spacing, title, vmax)
    acq = truth["acquisition"]
    figure.suptitle(f"{truth['scan_id']}: {acq['name']} {acq['b0_t']} T, TE {acq['te_ms']:.0f} ms, "
                    f"voxel {' x '.join(f'{v:.2f}' for v in acq['spacing_mm'])} mm", fontsize=9)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
