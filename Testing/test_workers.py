"""Worker pools start cleanly after the parent has used torch (workers.process_pool).

The learned brain mask runs a network in preprocessing, so any process that has detected one scan has used
torch's OpenMP thread pool; a forked worker then hangs on its first torch operation. `bench-adapt` hung that
way (its simulated reader detects in the parent, then `finetune` reads the reviews in a pool).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import torch
    from CMBDetectorLib.workers import process_pool

    def convolve(seed):
        generator = torch.Generator().manual_seed(seed)
        volume = torch.randn(1, 2, 48, 48, 48, generator=generator)
        return float(torch.nn.functional.conv3d(volume, torch.ones(4, 2, 3, 3, 3)).abs().sum())

    if __name__ == "__main__":
        torch.set_num_threads(2)
        parent = convolve(0)  # the parent runs torch first, as a Detector does before any pool
        with process_pool(2) as pool:
            children = list(pool.map(convolve, [0, 1]))
        print("same" if abs(children[0] - parent) < 1e-3 * parent else "different", len(children))
''')


def test_pool_workers_run_torch_after_the_parent_did(tmp_path):
    script = tmp_path / "pool_after_torch.py"
    script.write_text(SCRIPT)
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=environment, start_new_session=True)
    try:
        out, err = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the hung workers too
        process.communicate()
        raise AssertionError("the pool's workers hung on their first torch operation") from None
    assert process.returncode == 0, err[-2000:]
    assert out.split() == ["same", "2"]
