#!/usr/bin/env python3
"""Compare stage-2 weights on the benchmark's scans in minutes: stage 1 runs once, its patches are cached.

    python tools/compare_stage2.py cache --cache DIR [--val bench-output/val] [--ood bench-output/ood]
                                         [--inject sphere|gaussian|flat] [--repeats 2]
    python tools/compare_stage2.py score --cache DIR WEIGHTS.pt [WEIGHTS.pt ...] [--views 8]

`cache` runs the pipeline's preprocessing and stage 1 on every scan of both bench sets (the validation set
with its phase, the out-of-distribution set from the magnitude alone, as `make bench` runs them) and keeps
each scan's candidate centres, patches and true centres. With --inject, only the microbleed-free scans are
cached, each --repeats times with microbleeds of that lesion model drawn into the magnitude (seeded, as
inject-check and tools/lesion_model_probe.py draw them), from the magnitude alone: the probe's question, CNN
alone. `score` averages the given networks over the in-plane views, as the pipeline does, and prints how
many microbleeds stage 1 reached, then per-lesion sensitivity and FP/scan at several thresholds, per set and
per acquisition: the pipeline's threshold and merge, one-to-one matching within 5 mm (evaluate.match). No
YOLO stage and no atlas step, so these are the CNN-alone numbers; `make bench` stays the judge. Choosing
weights by these numbers on the bench sets tunes on the benchmark: point --val / --ood at dev sets for that.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "CMBDetector"))

DEFAULT_VAL, DEFAULT_OOD = "bench-output/val", "bench-output/ood"
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)


def cache_one(job: tuple) -> str:
    from CMBDetectorLib.train import dataset

    truth_file, use_phase, out = job
    truth, _, prepared = dataset.read_scan(truth_file, with_phase=use_phase)  # as training and tuning read scans
    _save(out, prepared, dataset.truth_points(truth), truth["acquisition"]["name"], use_phase)
    return out


def cache_injected(job: tuple) -> str:
    """One microbleed-free scan with `lesion_model` lesions drawn in (seed `repeat`), magnitude alone."""
    from CMBDetectorLib.injection_check import COUNT
    from CMBDetectorLib.preprocess import prepare
    from CMBDetectorLib.simulate.inject import inject_microbleeds
    from CMBDetectorLib.train import dataset

    truth_file, lesion_model, repeat, out = job
    truth, magnitude, prepared = dataset.read_scan(truth_file, with_phase=False)
    injected = inject_microbleeds(magnitude, None, prepared.mask, prepared.context, np.random.default_rng(repeat),
                                  COUNT[False], lesion_model=lesion_model)
    _save(out, prepare(injected.magnitude), injected.centres_ras, truth["acquisition"]["name"], False)
    return out


def _save(out, prepared, truths, acquisition: str, use_phase: bool) -> None:
    from CMBDetectorLib import classify
    from CMBDetectorLib.train import dataset

    centres = dataset.candidate_centres(prepared)
    patches = classify.extract_patches(prepared, centres, use_phase=use_phase)
    np.savez_compressed(out, patches=patches.astype(np.float16), centres=centres, truths=truths,
                        acquisition=acquisition)


def cache(args) -> None:
    folder = Path(args.cache)
    folder.mkdir(parents=True, exist_ok=True)
    jobs = []
    for name, scans, use_phase in (("val", args.val, True), ("ood", args.ood, False)):
        for truth_file in sorted(Path(scans).glob("*.truth.json")):
            stem = f"{name}_{truth_file.name.replace('.truth.json', '')}"
            if not args.inject:
                out = folder / f"{stem}.npz"
                if not out.exists():
                    jobs.append((cache_one, (str(truth_file), use_phase, str(out))))
                continue
            if json.loads(truth_file.read_text())["microbleeds"]:
                continue
            for repeat in range(args.repeats):
                out = folder / f"{stem}_{args.inject}{repeat}.npz"
                if not out.exists():
                    jobs.append((cache_injected, (str(truth_file), args.inject, repeat, str(out))))
    from CMBDetectorLib.workers import process_pool

    with process_pool(args.jobs) as pool:
        for done in pool.map(_run, jobs):
            print(done, flush=True)


def _run(job: tuple) -> str:
    function, arguments = job
    return function(arguments)


def score(args) -> None:
    import torch

    from CMBDetectorLib import classify, weights
    from CMBDetectorLib.evaluate import match
    from CMBDetectorLib.pipeline import merge_nearby
    from CMBDetectorLib.train import dataset

    torch.set_num_threads(args.threads)
    networks = []
    for path in args.weights:  # checked against its card, then read as tensors only (as `train --init`)
        weights.verified_card(path, "stage-2 weights")
        network = classify.build_model()
        weights.load_state_dict(network, path, "stage-2 weights")
        networks.append(network.eval())
    scans = []
    for path in sorted(Path(args.cache).glob("*.npz")):
        data = np.load(path)
        patches = data["patches"]
        scores = (classify.mean_probabilities(networks, patches, "cpu", args.views)
                  if len(patches) else np.zeros(0, np.float32))
        scans.append((path.name.split("_")[0], str(data["acquisition"]), scores, data["centres"], data["truths"]))
    for set_name in ("val", "ood"):
        if not any(name == set_name for name, *_ in scans):
            continue
        reach_mm = dataset.POSITIVE_MM  # as training counts stage 1's recall
        reached = np.zeros(2, int)
        for name, _, _, centres, truths in scans:
            if name == set_name and len(truths):
                nearest = [np.linalg.norm(centres - t, axis=1).min() if len(centres) else np.inf for t in truths]
                reached += [sum(d <= reach_mm for d in nearest), len(truths)]
        print(f"{set_name} stage 1: a candidate within {reach_mm:g} mm of {reached[0]}/{reached[1]} microbleeds")
        for threshold in THRESHOLDS:
            totals, by_acquisition = np.zeros(4), {}
            for name, acquisition, scores, centres, truths in scans:
                if name != set_name:
                    continue
                kept = np.nonzero(scores >= threshold)[0]
                kept = kept[merge_nearby(centres[kept], scores[kept])] if len(kept) else kept
                found = len(match(truths, centres[kept]))
                row = np.array([found, len(truths), len(kept) - found, 1])
                totals += row
                by_acquisition[acquisition] = by_acquisition.get(acquisition, 0) + row
            detail = " ".join(f"{a}: {int(r[0])}/{int(r[1])} {r[2] / r[3]:.2f}" for a, r in sorted(by_acquisition.items()))
            print(f"{set_name} threshold {threshold}: sensitivity {totals[0] / totals[1]:.3f} "
                  f"({int(totals[0])}/{int(totals[1])}) FP/scan {totals[2] / totals[3]:.2f} | {detail}", flush=True)


def main() -> None:
    from CMBDetectorLib.simulate.inject import LESION_MODELS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("cache", help="stage 1 on both bench sets, patches kept in --cache")
    build.add_argument("--cache", required=True)
    build.add_argument("--val", default=DEFAULT_VAL)
    build.add_argument("--ood", default=DEFAULT_OOD)
    build.add_argument("--jobs", type=int, default=2)
    build.add_argument("--inject", choices=LESION_MODELS, default="",
                       help="cache the microbleed-free scans with lesions of this model drawn in")
    build.add_argument("--repeats", type=int, default=2, help="injections per scan (with --inject)")
    scoring = commands.add_parser("score", help="per-lesion numbers of these weights on the cached patches")
    scoring.add_argument("--cache", required=True)
    scoring.add_argument("weights", nargs="+", help="stage-2 state dicts (.pt); several are averaged")
    scoring.add_argument("--views", type=int, default=8)
    scoring.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.command == "cache":
        cache(args)
    else:
        score(args)


if __name__ == "__main__":
    main()
