"""The `cmbdetector` command: a thin layer over the library.

Each subcommand lives beside the code it drives (a `add_arguments(parser)` and a `run(args)` in the
named module), so this file only wires them up and turns CMBError into one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import CMBError
from .sysinfo import use_private_config_dirs_if_home_unusable

# name -> (module implementing add_arguments/run, one-line help)
COMMANDS = {
    "synth": ("CMBDetectorLib.simulate.synth", "simulate GRE/SWI scans with microbleeds and mimics"),
    "detect": ("CMBDetectorLib.pipeline", "find microbleeds in one GRE/SWI volume"),
    "batch": ("CMBDetectorLib.batch", "find microbleeds in a cohort (folder, glob, CSV manifest, BIDS) on Dask"),
    "evaluate": ("CMBDetectorLib.evaluate", "score detections against ground truth"),
    "train": ("CMBDetectorLib.train.train_cnn", "train the stage-2 3D CNN on simulated scans"),
    "train-brain": ("CMBDetectorLib.train.train_brain", "train the brain-mask U-Net on simulated heads"),
    "train-yolo": ("CMBDetectorLib.train.train_yolo", "train the stage-3 YOLO on simulated scans, tune its fusion"),
    "demo": ("CMBDetectorLib.demo", "simulate a sample scan, detect, and write every output"),
    "inject-check": ("CMBDetectorLib.injection_check",
                     "how many simulated microbleeds drawn into your own scans the detector finds (no labels)"),
    "bench": ("CMBDetectorLib.bench", "simulate the validation set, detect, evaluate, time"),
    "bench-cohort": ("CMBDetectorLib.bench_cohort", "time a cohort: a detect loop against batch, and a dense U-Net"),
    "models": ("CMBDetectorLib.models", "list the model versions, choose the active one, roll back"),
    "finetune": ("CMBDetectorLib.train.finetune", "improve the model from exported reviews, on this computer"),
    "bench-adapt": ("CMBDetectorLib.train.bench_adapt", "measure fine-tuning on a simulated site"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmbdetector", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"cmbdetector {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(module_name=module_name)
        try:
            importlib.import_module(module_name).add_arguments(sub)
        except ModuleNotFoundError as error:
            if not module_name.startswith(error.name or "?"):
                raise  # a missing third-party package is a real error
            sub.set_defaults(unavailable=True)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "unavailable", False):
        print(f"cmbdetector {args.command}: not available in this build", file=sys.stderr)
        return 2
    use_private_config_dirs_if_home_unusable()
    try:
        return int(importlib.import_module(args.module_name).run(args) or 0)
    except CMBError as error:
        print(f"cmbdetector {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cmbdetector {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
