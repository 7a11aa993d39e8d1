"""PNG overview of a detection run: a mean projection of the brain across the acquired slices with every
finding marked, and a close-up of each finding on its own slice.

Drawn in the acquisition plane (Volume.slice_axis) and turned to the nearest RAS directions, so the picture
is the same whatever the order or direction of the array's axes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class _Plane:
    """Maps the acquisition plane of a volume to display axes: x along the plane's axis nearest R (or A),
    y along the other, both increasing towards R/A/S."""

    def __init__(self, volume):
        self.slice_axis = volume.slice_axis
        self.axes = volume.in_plane_axes()
        ras_axes, signs = volume.closest_ras_axes()
        self.flips = [signs[a] < 0 for a in self.axes]
        self.sizes = [volume.shape[a] for a in self.axes]
        self.spacing = [float(volume.spacing[a]) for a in self.axes]
        self.names = ["RAS"[ras_axes[a]] for a in self.axes]

    def image(self, plane: np.ndarray) -> np.ndarray:
        """A 2D array over the two in-plane axes (in array order) as (x, y)."""
        if self.axes[0] > self.axes[1]:
            plane = plane.T
        for dim, flip in enumerate(self.flips):
            if flip:
                plane = np.flip(plane, axis=dim)
        return plane

    def xy(self, ijk) -> tuple:
        values = []
        for axis, size, flip in zip(self.axes, self.sizes, self.flips):
            values.append(size - 1 - ijk[axis] if flip else ijk[axis])
        return tuple(values)


def write_overview(prepared, findings, path, max_tiles: int = 15) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    volume, image = prepared.volume, prepared.image
    plane = _Plane(volume)
    aspect = plane.spacing[1] / plane.spacing[0]
    tiles = min(len(findings), max_tiles)
    columns = 4
    rows = 1 + int(np.ceil(tiles / columns))
    figure = plt.figure(figsize=(columns * 2.6, rows * 2.7))
    overview = figure.add_subplot(rows, 1, 1)
    # Mean over the brain's slices: anatomy stays readable (a whole-volume minimum is all veins and noise).
    inside = prepared.mask.sum(axis=plane.slice_axis)
    projection = np.where(inside > 0, (image * prepared.mask).sum(axis=plane.slice_axis) / np.maximum(inside, 1), 0.0)
    overview.imshow(plane.image(projection).T, cmap="gray", origin="lower", vmin=0, vmax=1.3, aspect=aspect)
    for finding in findings:
        x, y = plane.xy(volume.ras_to_ijk(finding.position_ras)[0])
        overview.plot(x, y, "o", markersize=9, markerfacecolor="none", markeredgecolor="orange")
        overview.text(x + 6, y + 6, finding.label.replace("CMB-", ""), color="orange", fontsize=7)
    overview.set_title(f"{len(findings)} finding(s) on the mean projection across the slices "
                       f"({plane.names[0]}{plane.names[1]} plane)", fontsize=9)
    overview.axis("off")
    reach = [int(12 / s) for s in plane.spacing]
    for index, finding in enumerate(findings[:tiles]):
        axis = figure.add_subplot(rows, columns, columns + index + 1)
        ijk = np.clip(np.round(volume.ras_to_ijk(finding.position_ras)[0]).astype(int), 0, np.array(image.shape) - 1)
        slice_image = plane.image(np.take(image, ijk[plane.slice_axis], axis=plane.slice_axis))
        x, y = (int(v) for v in plane.xy(ijk))
        crop = slice_image[max(x - reach[0], 0): x + reach[0] + 1, max(y - reach[1], 0): y + reach[1] + 1]
        axis.imshow(crop.T, cmap="gray", origin="lower", vmin=0, vmax=1.3, aspect=aspect)
        axis.set_title(f"{finding.label} {finding.score:.2f} {finding.region}", fontsize=7)
        axis.axis("off")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path
