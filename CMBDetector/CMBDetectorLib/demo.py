"""`cmbdetector demo`: simulate a sample scan, detect, write every output, and say where they are.

Needs no data of the user's own and nothing from the network: the scan comes from the simulator.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="demo-output", help="output folder (default demo-output)")
    parser.add_argument("--seed", type=int, default=2024, help="seed of the sample scan")
    parser.add_argument("--acquisition", default="gre3t", help="swi3t, gre3t (default) or gre15t")
    parser.add_argument("--microbleeds", type=int, default=4, help="microbleeds to simulate")


def run(args) -> int:
    from .evaluate import match
    from .pipeline import detect, write_outputs
    from .simulate.synth import simulate_scan, write_scan

    out = Path(args.out)
    print(f"simulating a {args.acquisition} sample scan (seed {args.seed}) ...", flush=True)
    scan = simulate_scan(args.seed, args.acquisition, n_cmb=args.microbleeds, scan_id=f"sample_{args.acquisition}")
    files = write_scan(scan, out)
    print(f"  scan: {files['magnitude']}  phase: {files['phase']}  truth: {files['truth']}", flush=True)
    print("detecting ...", flush=True)
    detection = detect(scan.magnitude, scan.phase)
    paths = write_outputs(detection, out, scan.scan_id)
    truth = np.array([m["center_ras"] for m in scan.truth["microbleeds"]]).reshape(-1, 3)
    found = np.array([f.position_ras for f in detection.findings]).reshape(-1, 3)
    matched = len(match(truth, found, 5.0))
    print(f"found {matched} of {len(truth)} simulated microbleeds, {len(found) - matched} other finding(s), "
          f"in {detection.summary['timings_s']['total']:.1f} s")
    for key, path in paths.items():
        print(f"  {key}: {path}")
    print(f"open {paths['markups']} over {files['magnitude']} in 3D Slicer to review the findings")
    return 0
