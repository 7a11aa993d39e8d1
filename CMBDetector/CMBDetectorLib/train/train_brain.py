"""`cmbdetector train-brain`: fit the brain-mask U-Net (brain_model.py) on simulated heads.

Each scan (a `cmbdetector synth` folder: STEM.nii.gz with its true mask STEM_brain.nii.gz) is registered
to MNI as the pipeline registers any scan, and carried onto the model's grid once (a cache of small .npz
files). Training then sees each head under random contrast, bias, noise, blur, signal voids and pose, so that the
network learns the brain's shape and edges rather than one simulator's intensities; the pose moves the
image and its mask together but never the template-hull channel, which is how a registration error looks.

Reproducible: one seed drives the split, the sampling, the augmentation and torch's initialisation. The
card records the exact command, the seed, the scans, and Dice on held-out scans.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from .. import __version__
from ..brain import mask_dice
from ..brain_model import (ARCHITECTURE, DEFAULT_BRAIN_MODEL, GRID_MM, GRID_SHAPE, build_network, coarse_to_grid,
                           hull_on_mni_grid)
from ..errors import CMBError
from ..weights import card_path, sha256_of
from ..workers import process_pool

BRAIN_SUFFIX = "_brain.nii.gz"


def add_arguments(parser) -> None:
    parser.add_argument("--data", action="append", required=True,
                        help="folder of simulated scans with their true masks (cmbdetector synth; repeatable)")
    parser.add_argument("--out", default=str(DEFAULT_BRAIN_MODEL), help="weights file to write (.pt); card beside it")
    parser.add_argument("--cache", default="", help="folder for the scans carried onto the grid (default: "
                        "beside --out); reused when present")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1500, help="optimiser steps (batch of 2 heads)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the one-cycle schedule")
    parser.add_argument("--val-fraction", type=float, default=0.15, help="scans held out for the card's Dice")
    parser.add_argument("--jobs", type=int, default=2, help="processes for registering the scans")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")


def scan_stems(folders) -> list:
    """(folder, stem) of every simulated scan with a true mask, sorted."""
    stems = []
    for folder in folders:
        for mask in sorted(Path(folder).glob("*" + BRAIN_SUFFIX)):
            stem = mask.name[:-len(BRAIN_SUFFIX)]
            if (Path(folder) / f"{stem}.nii.gz").is_file():
                stems.append((str(folder), stem))
    if not stems:
        raise CMBError(f"no simulated scans with a true brain mask ({BRAIN_SUFFIX}) in {', '.join(map(str, folders))}")
    return stems


def carry_to_grid(folder: str, stem: str, cache: Path) -> str:
    """Register one scan and write its magnitude and true-mask fraction on the grid (float16 .npz)."""
    from ..brain import smooth_coarse
    from ..grids import block_mean
    from ..io import read_volume
    from ..locate import register_to_mni

    out = cache / f"{stem}.npz"
    if out.is_file():
        return str(out)
    volume = read_volume(Path(folder) / f"{stem}.nii.gz")
    truth = read_volume(Path(folder) / f"{stem}{BRAIN_SUFFIX}")
    registration = register_to_mni(volume)
    if not registration.plausible_geometry:
        return ""  # the pipeline would not use the model on this scan either
    smooth, factors, _ = smooth_coarse(volume)
    image = coarse_to_grid(smooth, factors, volume, registration)
    # scaled to its median in the hull before the float16 cache (raw magnitudes can pass float16's 65504);
    # network_input rescales each posed copy the same way at training time
    image /= max(float(np.median(image[(hull_on_mni_grid() > 0.5) & (image > 0)])), 1e-6)
    target = coarse_to_grid(block_mean((truth.array > 0.5).astype(np.float32), factors), factors, volume, registration)
    np.savez_compressed(out, image=image.astype(np.float16), target=target.astype(np.float16))
    return str(out)


def build_cache(stems: list, cache: Path, jobs: int) -> list:
    cache.mkdir(parents=True, exist_ok=True)
    with process_pool(jobs) as pool:
        done = list(pool.map(carry_to_grid, [f for f, _ in stems], [s for _, s in stems], [cache] * len(stems)))
    return [path for path in done if path]


def random_pose(rng: np.random.Generator) -> np.ndarray:
    """(3, 4) affine in normalised grid coordinates: rotation +-8 deg, scale 0.92-1.08, shift +-6 mm per axis."""
    angles = np.radians(rng.uniform(-8, 8, 3))
    rotation = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = np.cos(angle), np.sin(angle)
        a, b = [i for i in range(3) if i != axis]
        turn = np.eye(3)
        turn[a, a], turn[a, b], turn[b, a], turn[b, b] = c, -s, s, c
        rotation = rotation @ turn
    matrix = rotation * rng.uniform(0.92, 1.08, 3)
    shift = rng.uniform(-6, 6, 3) * 2.0 / (np.array(GRID_SHAPE[::-1]) * GRID_MM)  # mm -> [-1, 1] (x: last axis)
    return np.hstack([matrix, shift[:, None]]).astype(np.float32)


def random_contrast(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gamma, a smooth multiplicative bias, sometimes a random intensity curve, blur along one axis, noise."""
    image = np.clip(image, 0, 6) ** np.exp(rng.normal(0, 0.3))
    low = rng.normal(0, rng.uniform(0.05, 0.3), (4, 4, 4)).astype(np.float32)
    image = image * np.exp(ndimage.zoom(low, np.array(image.shape) / 4, order=3, mode="nearest"))
    if rng.random() < 0.3:  # contrast-agnostic: any tissue may be brighter or darker than any other
        knots = np.linspace(0, 4, 7)
        image = np.interp(image, knots, np.sort(rng.uniform(0, 3, 7)) if rng.random() < 0.5
                          else rng.uniform(0, 3, 7)).astype(np.float32)
    if rng.random() < 0.4:  # a thick-slice 2D acquisition, along any axis
        sigma = [0.0, 0.0, 0.0]
        sigma[rng.integers(3)] = rng.uniform(0.5, 1.5)
        image = ndimage.gaussian_filter(image, sigma)
    image = image + rng.normal(0, rng.uniform(0, 0.1), image.shape).astype(np.float32)
    return np.clip(image, 0, None).astype(np.float32)


def random_voids(image: np.ndarray, target: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brain that gives no signal is still brain. Sometimes a territory at the brain's surface goes dark
    (susceptibility dropout above the sinuses at long TE, an SWI phase mask over a lobe: 5-30 % of the brain,
    with whatever lies outside it there), sometimes smooth patches anywhere, sometimes the outer rim (cortical
    veins under a phase mask); each by 30-100 %. The true mask does not change."""
    inside = target > 0.5
    if not inside.any():
        return image
    depth_mm = ndimage.distance_transform_edt(inside) * GRID_MM
    shape = np.array(image.shape)
    if rng.random() < 0.5:
        field = ndimage.zoom(rng.normal(0, 1, (6, 7, 6)).astype(np.float32), shape / (6, 7, 6), order=3, mode="nearest")
        score = field + rng.uniform(1.0, 3.0) * np.exp(-depth_mm / rng.uniform(5.0, 20.0))
        cut = np.quantile(score[inside], 1.0 - rng.uniform(0.05, 0.3))
        image = image * (1.0 - rng.uniform(0.6, 1.0) / (1.0 + np.exp(-6.0 * (score - cut))))
    if rng.random() < 0.3:
        field = ndimage.zoom(rng.normal(0, 1, (6, 7, 6)).astype(np.float32), shape / (6, 7, 6), order=3, mode="nearest")
        image = image * (1.0 - rng.uniform(0.3, 1.0) / (1.0 + np.exp(-4.0 * (field - rng.uniform(0.8, 1.8)))))
    if rng.random() < 0.3:
        image = image * (1.0 - rng.uniform(0.3, 1.0) * np.exp(-depth_mm / rng.uniform(2.0, 12.0)) * inside)
    return image.astype(np.float32)


def soft_dice_loss(logits, target):
    import torch

    probability = torch.sigmoid(logits)
    overlap = (probability * target).sum(dim=(1, 2, 3, 4))
    return (1 - (2 * overlap + 1) / (probability.sum(dim=(1, 2, 3, 4)) + target.sum(dim=(1, 2, 3, 4)) + 1)).mean()


def batch(items: list, rng: np.random.Generator, augment: bool):
    """(inputs (B, 2, *GRID), targets (B, 1, *GRID)) torch tensors, posed and recontrasted when augment."""
    import torch
    import torch.nn.functional as F

    from ..brain_model import network_input

    images, targets = [], []
    for item in items:
        image, target = item["image"].astype(np.float32), item["target"].astype(np.float32)
        if augment:
            pair = torch.from_numpy(np.stack([image, target]))[None]
            grid = F.affine_grid(torch.from_numpy(random_pose(rng))[None], list(pair.shape), align_corners=False)
            image, target = F.grid_sample(pair, grid, align_corners=False)[0].numpy()
            image = random_contrast(random_voids(image, target, rng), rng)
        images.append(network_input(image))
        targets.append(target[None])
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.clip(np.stack(targets), 0, 1))


def grid_dice(network, items: list) -> list:
    """Dice of the network's mask (> 0.5) against the true mask (> 0.5) on the grid, per scan."""
    import torch

    scores = []
    network.eval()
    with torch.inference_mode():
        for item in items:
            inputs, target = batch([item], None, augment=False)
            mask = torch.sigmoid(network(inputs))[0, 0].numpy() > 0.5
            truth = target[0, 0].numpy() > 0.5
            scores.append(mask_dice(mask, truth))
    network.train()
    return scores


def _command(args) -> str:
    return ("cmbdetector train-brain" + "".join(f" --data {shlex.quote(str(d))}" for d in args.data)
            + f" --out {shlex.quote(str(args.out))} --seed {args.seed} --steps {args.steps} --lr {args.lr}"
            + f" --val-fraction {args.val_fraction} --threads {args.threads}")


def run(args) -> int:
    import torch

    started = time.time()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stems = scan_stems(args.data)
    cache = Path(args.cache) if args.cache else out.parent / f"{out.stem}_grid_cache"
    paths = build_cache(stems, cache, args.jobs)
    print(f"{len(paths)} of {len(stems)} scans on the grid ({time.time() - started:.0f} s)", flush=True)
    order = rng.permutation(len(paths))
    n_val = max(1, int(round(args.val_fraction * len(paths)))) if args.val_fraction > 0 else 0
    held_out = sorted(paths[i] for i in order[:n_val])
    training = [paths[i] for i in order[n_val:]]
    if not training:
        raise CMBError("no training scans left after the held-out split")
    load = [dict(np.load(path)) for path in training]
    val_items = [dict(np.load(path)) for path in held_out]

    network = build_network()
    optimiser = torch.optim.AdamW(network.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=args.lr, total_steps=max(args.steps, 1))
    network.train()
    for step in range(1, args.steps + 1):
        inputs, targets = batch([load[i] for i in rng.integers(len(load), size=2)], rng, augment=True)
        logits = network(inputs)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets) + soft_dice_loss(logits, targets)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 100 == 0 or step == args.steps:
            print(f"step {step}/{args.steps} loss {loss.item():.4f} ({time.time() - started:.0f} s)", flush=True)

    torch.save(network.state_dict(), out)
    dice = grid_dice(network, val_items)
    card = {
        "model": "brain mask U-Net (brain_model.py)",
        "version": __version__,
        "architecture": ARCHITECTURE,
        "sha256": sha256_of(out),
        "command": _command(args),
        "seed": args.seed,
        "steps": args.steps,
        "training_scans": [Path(p).stem for p in training],
        "held_out_scans": [Path(p).stem for p in held_out],
        "held_out_grid_dice": {"min": round(min(dice), 4), "mean": round(float(np.mean(dice)), 4)} if dice else None,
        "training_seconds": round(time.time() - started, 1),
        "torch": torch.__version__,
    }
    card_path(out).write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps({k: card[k] for k in ("sha256", "held_out_grid_dice", "training_seconds")}))
    return 0
