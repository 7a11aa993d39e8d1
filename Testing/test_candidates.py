"""Stage 1 never caps silently: what it drops is reported, and lesion-strength blobs are never dropped."""

from __future__ import annotations

import numpy as np

from CMBDetectorLib import candidates
from CMBDetectorLib.image import Volume
from CMBDetectorLib.preprocess import Prepared


def dotted(shape=(120, 120, 40), spacing=(1.0, 1.0, 1.0), strong=30, weak=60, seed=0) -> Prepared:
    """Tissue at 1 with `strong` dark 3 mm dots (microbleed-like) and `weak` faint ones (noise-like)."""
    rng = np.random.default_rng(seed)
    image = np.ones(shape, np.float32)
    grid = np.indices(shape).reshape(3, -1).T.reshape(*shape, 3)
    centres = [rng.uniform(8, np.array(shape) - 8) for _ in range(strong + weak)]
    for index, centre in enumerate(centres):
        inside = np.linalg.norm((grid - centre) * spacing, axis=-1) <= 1.5
        image[inside] = 0.1 if index < strong else 0.8
    volume = Volume(image, np.diag([*spacing, 1.0]))
    return Prepared(volume, image, np.ones(shape, bool), None, False)


def test_every_blob_kept_when_under_the_cap():
    screening = candidates.screen(dotted())
    report = screening.report
    assert report["kept"] == report["peaks"] == len(screening.candidates) > 0
    assert not report["capped"] and not report["widened"] and report["strong_dropped"] == 0


def test_over_the_cap_weak_blobs_go_first_and_it_is_reported():
    prepared = dotted()
    full = candidates.screen(prepared).report
    strong = sum(c.response >= candidates.WIDEN_RESPONSE for c in candidates.screen(prepared).candidates)
    assert 0 < strong < full["peaks"]
    screening = candidates.screen(prepared, max_candidates=strong)
    assert screening.report["capped"] and screening.report["kept"] == strong
    assert min(c.response for c in screening.candidates) >= candidates.WIDEN_RESPONSE


def test_lesion_strength_blobs_widen_the_screening_up_to_the_hard_cap():
    prepared = dotted()
    strong = sum(c.response >= candidates.WIDEN_RESPONSE for c in candidates.screen(prepared).candidates)
    widened = candidates.screen(prepared, max_candidates=5)
    assert widened.report["widened"] and widened.report["kept"] == strong and widened.report["strong_dropped"] == 0
    capped = candidates.screen(prepared, max_candidates=5, hard_cap=10)
    assert capped.report["kept"] == 10 and capped.report["strong_dropped"] == strong - 10
