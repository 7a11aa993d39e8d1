"""The label-free check on a user's own scans: simulated microbleeds drawn into a real scan, found or not."""

import json

import pytest

from CMBDetectorLib import injection_check
from CMBDetectorLib.bench import REAL_DIR
from CMBDetectorLib.classify import DEFAULT_MODEL
from CMBDetectorLib.io import read_volume
from CMBDetectorLib.pipeline import Detector
from helpers import cli

CROP = REAL_DIR / "romeo_small" / "Mag.nii"  # a real 3-echo GRE crop, 0.47 x 0.47 x 1 mm, no microbleeds
needs_crop = pytest.mark.skipif(not CROP.is_file(), reason="no shared real GRE crop")


@needs_crop
def test_microbleeds_injected_into_a_real_crop_are_found():
    volume = read_volume(CROP)
    detectors = {config: Detector(DEFAULT_MODEL, "cpu", use_yolo=(config == "full")) for config in ("cnn", "full")}
    result = injection_check.check(volume, detectors, crop=True)
    repeats = injection_check.REPEATS
    assert result["repeats"] == repeats
    assert repeats <= result["lesions"] <= repeats * injection_check.COUNT[True]
    assert len(result["contrast"]) == result["lesions"] and result["lesion_model"] == "sphere"
    for config in detectors:
        assert sum(result[config]["found_each"]) == result[config]["found"]  # real veins and noise around them: most are still found, few other findings
        assert result[config]["found"] >= 0.6 * result["lesions"], result
        assert result[config]["other_findings"] <= repeats, result
    assert injection_check.check(volume, detectors, crop=True) == result  # seeded: the same lesions every run
    lenient = injection_check.check(volume, {"cnn": detectors["cnn"]}, crop=True, threshold=0.05)
    assert lenient["lesions"] == result["lesions"]  # the threshold is applied, to the same lesions
    assert lenient["cnn"]["found"] >= result["cnn"]["found"]
    assert lenient["cnn"]["other_findings"] > result["cnn"]["other_findings"]


@needs_crop
def test_the_command_reports_each_scan_and_writes_json(tmp_path):
    out = tmp_path / "check.json"
    done = cli("inject-check", CROP, "--crop", "--repeats", 2, "--no-yolo", "--device", "cpu", "--json", out)
    assert done.returncode == 0, done.stderr
    assert "injected microbleeds found" in done.stdout and "upper bound" in done.stdout
    row = json.loads(out.read_text())["scans"][0]
    assert row["repeats"] == 2 and row["count"] == injection_check.COUNT[True]
    assert 2 <= row["lesions"] <= 2 * row["count"] and 0 <= row["found"] <= row["lesions"]
    assert row["findings_without_injection"] == 0
    done = cli("inject-check", CROP, "--crop", "--repeats", 1, "--lesions", "flat", "--no-yolo", "--json", out)
    assert done.returncode == 0, done.stderr
    row = json.loads(out.read_text())["scans"][0]
    assert row["lesion_model"] == "flat" and 1 <= row["lesions"] <= row["count"]


def test_bad_arguments_and_missing_scans_are_refused_in_one_line(tmp_path):
    done = cli("inject-check", tmp_path / "missing.nii.gz")
    assert done.returncode == 2 and "missing.nii.gz" in done.stderr and "Traceback" not in done.stderr
    done = cli("inject-check", tmp_path / "missing.nii.gz", "--repeats", 0)
    assert done.returncode == 2 and "--repeats and --count must be at least 1" in done.stderr
