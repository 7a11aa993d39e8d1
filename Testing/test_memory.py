"""Memory bounded by design: a 512 x 512 x 400 volume runs under 4 GB, and a volume that would not fit is
refused before any work with a message that says so."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from CMBDetectorLib.errors import InputError
from CMBDetectorLib.grids import linear_along
from CMBDetectorLib.image import Volume
from CMBDetectorLib.io import write_volume
from CMBDetectorLib.pipeline import check_fits_in_memory, estimated_peak_bytes
from CMBDetectorLib.simulate.synth import simulate_scan

LARGE_SHAPE = (512, 512, 400)
LIMIT_BYTES = 4e9


def test_the_estimate_of_a_large_volume_is_under_the_limit_and_grows_with_the_volume():
    assert estimated_peak_bytes(LARGE_SHAPE) < LIMIT_BYTES
    small, double = estimated_peak_bytes((256, 256, 200)), estimated_peak_bytes((512, 256, 200))
    assert small < double < 2 * small  # linear in the voxels, with a fixed part


def test_a_volume_that_would_not_fit_is_refused_with_its_size_and_the_memory_available():
    check_fits_in_memory(LARGE_SHAPE, available_bytes=8e9)
    with pytest.raises(InputError, match=r"512 x 512 x 400 volume needs about 4\.0 GB .* 2\.0 GB is available"):
        check_fits_in_memory(LARGE_SHAPE, available_bytes=2e9)


def resampled(volume: Volume, shape) -> Volume:
    """The same head on a finer grid of `shape` voxels (linear interpolation, same field of view)."""
    array = volume.array
    for axis, size in enumerate(shape):
        positions = (np.arange(size) + 0.5) * volume.shape[axis] / size - 0.5
        array = linear_along(array, positions, axis).astype(np.float32)
    affine = volume.affine.copy()
    affine[:3, :3] = volume.affine[:3, :3] * (np.array(volume.shape) / np.array(shape))
    return Volume(array, affine)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the peak of a process image as Linux reports it")
def test_a_512_x_512_x_400_volume_runs_under_4_gb(tmp_path):
    scan = simulate_scan(778, "gre3t", n_cmb=4)
    path = write_volume(resampled(scan.magnitude, LARGE_SHAPE), tmp_path / "large.nii")
    # the whole command in a fresh process, which then reports its own peak resident memory (sysinfo: the
    # high-water mark of this process image, not the test runner's, which ru_maxrss would carry over exec)
    program = ("import sys; from CMBDetectorLib.cli import main; from CMBDetectorLib.sysinfo import peak_rss_mb; "
               f"code = main(['detect', {str(path)!r}, '--out', {str(tmp_path / 'out')!r}]); "
               "print('PEAK_MIB', peak_rss_mb()); sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    peak_bytes = 2 ** 20 * float(result.stdout.split("PEAK_MIB")[-1].split()[0])
    assert peak_bytes < LIMIT_BYTES
    assert peak_bytes < estimated_peak_bytes(LARGE_SHAPE)  # the refusal's estimate is not optimistic
    assert (tmp_path / "out" / "large.json").is_file()
