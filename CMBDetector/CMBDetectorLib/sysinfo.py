"""Facts about the running process that differ by platform, kept out of the modules that use them so
that nothing on the detection path imports a POSIX-only module (`resource` does not exist on Windows)."""

from __future__ import annotations

import sys


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process in MiB; None when the platform cannot say."""
    try:
        import resource
    except ImportError:  # Windows
        resource = None
    if resource is not None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(peak / (2 ** 20 if sys.platform == "darwin" else 1024), 1)  # macOS: bytes; Linux: KiB
    try:
        import psutil
    except ImportError:
        return None
    info = psutil.Process().memory_info()
    return round(getattr(info, "peak_wset", info.rss) / 2 ** 20, 1)  # peak_wset: Windows' peak working set
