"""Patch datasets for stage 2, made by running the real stage 1 on simulated scans with known truth.

Every candidate stage 1 proposes near a true microbleed is a positive (plus jittered copies of the
true centres, so no microbleed is missing from training); everything else it proposes, which is
mostly veins, calcifications, iron and edges, is a negative.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..candidates import centres_ras, find_candidates
from ..classify import extract_patches
from ..errors import CMBError
from ..io import read_volume
from ..preprocess import prepare

POSITIVE_MM = 2.5  # a candidate this close to a true centre is that microbleed
NEGATIVE_MM = 4.0  # candidates between the two radii are ambiguous and left out


@dataclass
class ScanPatches:
    scan_id: str
    acquisition: str
    patches: np.ndarray  # float16 (N, 2, P, P, P)
    labels: np.ndarray  # uint8 (N,)
    from_candidates: np.ndarray  # bool (N,): False for the jittered truth copies
    n_microbleeds: int
    n_found_by_stage1: int


def truth_files(folder) -> list:
    files = sorted(Path(folder).glob("*.truth.json"))
    if not files:
        raise CMBError(f"no simulated scans (*.truth.json) in {folder}")
    return files


def read_scan(truth_file, with_phase: bool = True) -> tuple:
    """(truth dict, magnitude Volume, Prepared) of a simulated scan, through the pipeline's preprocessing."""
    truth = json.loads(Path(truth_file).read_text())
    folder = Path(truth_file).parent
    magnitude = read_volume(folder / truth["files"]["magnitude"])
    phase = read_volume(folder / truth["files"]["phase"]) if with_phase else None
    return truth, magnitude, prepare(magnitude, phase)


def truth_points(truth: dict) -> np.ndarray:
    """(T, 3) RAS centres of a simulated scan's microbleeds (an empty (0, 3) array for none)."""
    return np.array([m["center_ras"] for m in truth["microbleeds"]], float).reshape(-1, 3)


def candidate_centres(prepared) -> np.ndarray:
    """(N, 3) RAS centres of the pipeline's stage-1 candidates, strongest first."""
    return centres_ras(prepared, find_candidates(prepared))


JITTER_MM = 0.7  # SD of the jittered copies of a known lesion's centre, per axis


def jittered_copies(lesions: np.ndarray, rng: np.random.Generator, copies: int = 4) -> np.ndarray:
    """(L * copies, 3) RAS: each lesion centre `copies` times, moved by a normal JITTER_MM per axis (the
    positives a known lesion adds beside its own point, so the CNN does not learn an exact centre)."""
    lesions = np.asarray(lesions, float).reshape(-1, 3)
    return np.repeat(lesions, copies, axis=0) + rng.normal(0, JITTER_MM, (len(lesions) * copies, 3))


def label_points(centres: np.ndarray, lesions: np.ndarray, rng: np.random.Generator, keep_all: bool = False,
                 top_negatives: int = 250, random_negatives: int = 100, jitter_copies: int = 4,
                 mimics: np.ndarray | None = None, unmarked_are_negative: bool = True) -> tuple:
    """(points (M, 3) RAS, labels uint8 (M,), from_candidates bool (M,), lesions found by stage 1) for
    stage-1 candidate centres (strongest first) and known lesion centres: the one labelling rule of
    simulated truth (`train`) and of readers' reviews (`finetune`).

    A candidate within POSITIVE_MM of a lesion is positive; one beyond NEGATIVE_MM of every lesion is
    negative when unmarked candidates are known to be negatives (simulated truth, a complete review) or
    when it lies within POSITIVE_MM of a known mimic (a rejected point); others are left out. Known mimics
    are negatives themselves; each lesion adds `jitter_copies` jittered positives. Without keep_all only
    the strongest `top_negatives` and `random_negatives` more of the candidate negatives are kept."""
    lesions = np.asarray(lesions, float).reshape(-1, 3)
    mimics = np.zeros((0, 3)) if mimics is None else np.asarray(mimics, float).reshape(-1, 3)
    if len(lesions) and len(centres):
        distances = np.linalg.norm(centres[:, None] - lesions[None], axis=-1)
        distance, found = distances.min(axis=1), int((distances.min(axis=0) <= POSITIVE_MM).sum())
    else:
        distance, found = np.full(len(centres), np.inf), 0
    negative_ok = np.full(len(centres), unmarked_are_negative)
    if not unmarked_are_negative and len(mimics) and len(centres):
        negative_ok = np.linalg.norm(centres[:, None] - mimics[None], axis=-1).min(axis=1) <= POSITIVE_MM
    positive = np.nonzero(distance <= POSITIVE_MM)[0]
    negative = np.nonzero((distance > NEGATIVE_MM) & negative_ok)[0]  # already sorted strongest first
    if not keep_all:
        rest = negative[top_negatives:]
        extra = rng.choice(rest, size=min(random_negatives, len(rest)), replace=False) if len(rest) else rest
        negative = np.concatenate([negative[:top_negatives], extra])
    chosen = np.concatenate([positive, negative]).astype(int)
    points = [centres[chosen].reshape(-1, 3)]
    labels = [np.r_[np.ones(len(positive)), np.zeros(len(negative))]]
    from_candidates = [np.ones(len(chosen), bool)]
    if len(mimics):
        clear = (np.linalg.norm(mimics[:, None] - lesions[None], axis=-1).min(axis=1) > NEGATIVE_MM
                 if len(lesions) else np.ones(len(mimics), bool))
        points.append(mimics[clear])
        labels.append(np.zeros(int(clear.sum())))
        from_candidates.append(np.zeros(int(clear.sum()), bool))
    if jitter_copies and len(lesions):
        jittered = jittered_copies(lesions, rng, jitter_copies)
        points.append(jittered)
        labels.append(np.ones(len(jittered)))
        from_candidates.append(np.zeros(len(jittered), bool))
    return (np.concatenate(points), np.concatenate(labels).astype(np.uint8), np.concatenate(from_candidates),
            found)


def scan_patches(truth_file, rng: np.random.Generator, keep_all: bool = False, top_negatives: int = 250,
                 random_negatives: int = 100, jitter_copies: int = 4) -> ScanPatches:
    truth, _, prepared = read_scan(truth_file)
    cmbs = truth_points(truth)
    points, labels, from_candidates, found = label_points(
        candidate_centres(prepared), cmbs, rng, keep_all, top_negatives, random_negatives, jitter_copies)
    patches = extract_patches(prepared, points)
    return ScanPatches(truth["scan_id"], truth["acquisition"]["name"], patches.astype(np.float16),
                       labels, from_candidates, len(cmbs), found)


def _worker(job):
    truth_file, seed, keep_all = job
    return scan_patches(truth_file, np.random.default_rng(seed), keep_all=keep_all,
                        jitter_copies=0 if keep_all else 4)


def build(truth_list, seed: int, keep_all: bool, jobs: int = 2) -> list:
    work = [(f, seed + index, keep_all) for index, f in enumerate(truth_list)]
    if jobs > 1:
        from ..workers import process_pool

        with process_pool(jobs) as pool:
            return list(pool.map(_worker, work))
    return [_worker(job) for job in work]
