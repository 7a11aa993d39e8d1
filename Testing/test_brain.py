"""Brain extraction on whole heads: simulated heads against their true masks, the real whole-head scan,
and images that are not brains."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from CMBDetectorLib import brain, preprocess
from CMBDetectorLib.errors import InputError
from CMBDetectorLib.image import Volume
from CMBDetectorLib.io import read_volume
from CMBDetectorLib.simulate.synth import simulate_scan

REAL_HEAD = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-gre" / "philips-3t-dual-echo" / "mag_echo2.nii.gz"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


@pytest.mark.parametrize("protocol,seed", [("gre15t", 861), ("ood-gre3t-thick", 862)])
def test_mask_of_a_simulated_whole_head_matches_the_true_brain(protocol, seed):
    scan = simulate_scan(seed, protocol)
    extracted = brain.extract_brain(scan.magnitude)
    assert extracted.method == "registered" and extracted.registration.ok
    assert dice(extracted.mask, scan.brain) >= 0.95


def test_a_bright_scalp_joined_to_the_brain_stays_outside_the_mask():
    """Whole-head GRE where scalp, marrow and neck touch the brain: the intensity-only mask swallows them."""
    scan = simulate_scan(863, "gre3t")
    head = scan.magnitude.array.copy()
    outside = ~scan.brain
    bridge = outside & (np.abs(np.indices(head.shape)[2] - head.shape[2] // 3) < 8)  # a slab of bright tissue
    head[bridge & (head > 0.1 * head.max())] = np.percentile(head[scan.brain], 90)
    head[bridge & (head <= 0.1 * head.max())] = np.percentile(head[scan.brain], 60)
    volume = scan.magnitude.with_array(head)
    voxel_ml = float(np.prod(volume.spacing)) / 1000
    extracted = brain.extract_brain(volume)
    assert dice(extracted.mask, scan.brain) >= 0.93
    assert extracted.mask.sum() * voxel_ml < 1.1 * scan.brain.sum() * voxel_ml
    assert brain.intensity_mask(volume).sum() > 1.3 * scan.brain.sum()


@pytest.mark.skipif(not REAL_HEAD.is_file(), reason="the shared real scans are not beside this checkout")
def test_the_real_whole_head_scan_is_accepted_with_a_brain_sized_mask():
    volume = read_volume(REAL_HEAD)
    prepared = preprocess.prepare(volume)
    volume_ml = prepared.mask.sum() * float(np.prod(volume.spacing)) / 1000
    assert prepared.mask_method == "registered" and prepared.registration.ok
    assert 1000 <= volume_ml <= 1800


def test_a_sphere_phantom_is_refused_by_name():
    rng = np.random.default_rng(2)
    i, j, k = np.indices((200, 240, 48))
    inside = (i - 100) ** 2 + (j - 120) ** 2 + ((k - 24) * 4) ** 2 < 70 ** 2
    affine = np.diag([1.0, 1.0, 4.0, 1.0])
    affine[:3, 3] = [-100.0, -120.0, -96.0]
    phantom = Volume(inside.astype(np.float32) + rng.normal(0, 0.05, inside.shape).astype(np.float32), affine)
    with pytest.raises(InputError, match="does not look like a brain.*interior mutual information"):
        brain.extract_brain(phantom)


def test_a_crop_keeps_the_intensity_mask_and_needs_no_registration():
    scan = simulate_scan(864, "gre15t")
    crop = Volume(scan.magnitude.array[60:140, 80:160, 10:30].copy(), scan.magnitude.affine.copy())
    extracted = brain.extract_brain(crop, crop=True)
    assert extracted.method == "crop" and extracted.registration is None and extracted.mask.any()
