"""Worker processes for per-scan work (simulation, preprocessing, detection), one owner for how they start.

They are spawned, never forked. A forked child inherits the parent's OpenMP thread pool in whatever state
it is in, and once the parent has run a torch operation (the brain-mask network in preprocessing, stage 2),
the child's first torch operation waits for ever. Every pipeline run does both, so fork is never safe
here; a spawned worker costs a second or two of imports.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor


def process_pool(jobs: int, **options) -> ProcessPoolExecutor:
    """A pool of max(1, jobs) spawned worker processes; options go to ProcessPoolExecutor (initializer, ...)."""
    return ProcessPoolExecutor(max(1, int(jobs)), mp_context=multiprocessing.get_context("spawn"), **options)
