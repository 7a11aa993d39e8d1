"""The cohort benchmark's table: scans per hour, the warm Detector alone, and the dense ratio read from one
report (the timings themselves come from `make bench-cohort`; tests never assert a speed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from CMBDetectorLib.bench_cohort import format_table
from CMBDetectorLib.errors import CMBError


def report(**changes) -> dict:
    base = {"n": 4, "workers": 2, "shape": [383, 467, 81], "load_before": 0.2, "load_after": 1.9,
            "loop": {"wall_s": 80.0, "per_scan_s": [15.0, 15.0, 15.0, 15.0], "peak_rss_mb": 1700.0},
            "batch": {"wall_s": 40.0, "warm_detect_s": [12.0, 11.0], "warm_scan_s": [13.0, 12.0],
                      "load_s": [4.0, 4.0], "peak_rss_mb_per_worker": [1710.0, 1720.0]},
            "alone_s": [7.0, 8.0, 6.0], "alone_phase_s": [9.0, 9.5, 9.2], "unet_s": 84.0}
    base.update(changes)
    return base


ARGS = SimpleNamespace(out="bench-output/cohort", n=4, workers=2, table="docs/benchmark-cohort.md", no_unet=False)


def test_the_table_reads_throughput_the_warm_detector_alone_and_the_dense_ratio(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    table = format_table(report(), ARGS)
    assert "| scans per hour | 180 | 360 (x2.00) |" in table
    # steady state: 2 workers, each 12.5 s per warm scan with reading -> 576 per hour, x3.20 the loop's 180
    assert "| 180 | 576 (x3.20; 2 workers / the warm scan time with reading) |" in table
    assert "warm Detector: 11.5 s detect, 12.5 s with reading (median of 2 warm scans)" in table
    assert "One warm Detector alone, 2 threads" in table
    assert "**7.0 s per scan** from the magnitude alone, **9.2 s** with the phase (medians of 3" in table
    # the dense reference runs on the same threads as the Detector alone: that is the ratio to quote first
    assert "**84.0 s**: 12.0x the warm Detector alone on the same 2 threads, 7.3x a batch worker's" in table
    assert "8.4x batch's wall time per scan" in table
    assert "Taken under load" not in table


def test_a_loaded_machine_is_said_and_a_cohort_without_warm_scans_is_refused(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert "**Taken under load: Load average 3.0" in format_table(report(load_before=3.0), ARGS)
    no_warm = report()
    no_warm["batch"] = {**no_warm["batch"], "warm_detect_s": [], "warm_scan_s": []}
    with pytest.raises(CMBError, match="no warm scan to time"):
        format_table(no_warm, ARGS)
