"""The running process where it differs by platform or environment, kept out of the modules that use it:
nothing on the detection path imports a POSIX-only module (`resource` does not exist on Windows), and a
run works with HOME unset or read-only."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile


def use_private_config_dirs_if_home_unusable() -> None:
    """Give matplotlib a temporary config folder of this process when its default one (under HOME) cannot
    be written; otherwise it prints a warning block on stderr at import. ultralytics has its own
    (yolo.configure_offline)."""
    if os.environ.get("MPLCONFIGDIR"):
        return
    if sys.platform.startswith("linux"):
        base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
        default = os.path.join(base, "matplotlib")
    else:
        default = os.path.join(os.path.expanduser("~"), ".matplotlib")
    try:
        os.makedirs(default, exist_ok=True)
        with tempfile.TemporaryFile(dir=default):
            return
    except OSError:
        private = tempfile.mkdtemp(prefix="cmbdetector-matplotlib-")
        atexit.register(shutil.rmtree, private, ignore_errors=True)
        os.environ["MPLCONFIGDIR"] = private


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process in MiB; None when the platform cannot say.

    On Linux the high-water mark of this process image (/proc/self/status, VmHWM): getrusage's ru_maxrss
    is carried over exec from the process that started this one, so a detect started by Slicer, a batch
    worker or a test runner would report that parent's peak when it is larger."""
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/self/status", encoding="ascii") as status:
                return round(next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024, 1)
        except (OSError, StopIteration, ValueError, IndexError):
            pass  # a /proc that does not say: getrusage below
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
