"""PNG overview of a detection run: a mean axial projection of the brain with every finding marked, and
a close-up of each finding on its own slice."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_overview(prepared, findings, path, max_tiles: int = 15) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    volume, image = prepared.volume, prepared.image
    spacing = volume.spacing
    tiles = min(len(findings), max_tiles)
    columns = 4
    rows = 1 + int(np.ceil(tiles / columns))
    figure = plt.figure(figsize=(columns * 2.6, rows * 2.7))
    overview = figure.add_subplot(rows, 1, 1)
    # Mean over the brain's slices: anatomy stays readable (a whole-volume minimum is all veins and noise).
    inside = prepared.mask.sum(axis=2)
    projection = np.where(inside > 0, (image * prepared.mask).sum(axis=2) / np.maximum(inside, 1), 0.0)
    overview.imshow(projection.T, cmap="gray", origin="lower", vmin=0, vmax=1.3, aspect=spacing[1] / spacing[0])
    for finding in findings:
        i, j, _ = volume.ras_to_ijk(finding.position_ras)[0]
        overview.plot(i, j, "o", markersize=9, markerfacecolor="none", markeredgecolor="orange")
        overview.text(i + 6, j + 6, finding.label.replace("CMB-", ""), color="orange", fontsize=7)
    overview.set_title(f"{len(findings)} finding(s) on the mean axial projection of the brain", fontsize=9)
    overview.axis("off")
    for index, finding in enumerate(findings[:tiles]):
        axis = figure.add_subplot(rows, columns, columns + index + 1)
        i, j, k = np.round(volume.ras_to_ijk(finding.position_ras)[0]).astype(int)
        ri, rj = int(12 / spacing[0]), int(12 / spacing[1])
        k = int(np.clip(k, 0, image.shape[2] - 1))
        crop = image[max(i - ri, 0): i + ri + 1, max(j - rj, 0): j + rj + 1, k]
        axis.imshow(crop.T, cmap="gray", origin="lower", vmin=0, vmax=1.3, aspect=spacing[1] / spacing[0])
        axis.set_title(f"{finding.label} {finding.score:.2f} {finding.region}", fontsize=7)
        axis.axis("off")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path
