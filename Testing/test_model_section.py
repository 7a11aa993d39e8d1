"""The module's Model section (issue #16) on slicer-core, without Qt: the active model's line, a real
`cmbdetector finetune` run in the background through the detection's process runner on a tiny folder of
crop reviews (a few steps), its before/after numbers, and one call back to the shipped model.
The widget itself is exercised in test_module_widget.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from helpers import write_crop_reviews

from CMBDetectorLib import models

MODULE_FILE = Path(__file__).resolve().parents[1] / "CMBDetector" / "CMBDetector.py"


@pytest.fixture(scope="module")
def module():
    pytest.importorskip("slicer")
    spec = importlib.util.spec_from_file_location("CMBDetectorModelSection", MODULE_FILE)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


@pytest.fixture()
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(models.DATA_DIR_ENV, str(tmp_path / "data"))  # inherited by the background process
    return tmp_path / "data"


def test_improve_the_model_from_reviews_then_go_back_to_the_shipped_one(module, data_dir, tmp_path):
    logic = module.CMBDetectorLogic(scene=None)
    assert logic.active_model_text().startswith("Active model: shipped (SHA-256 ")
    write_crop_reviews(tmp_path / "reviews")
    process = logic.start_finetune(tmp_path / "reviews", "site-test", steps=3)
    assert process.command[3:] == ["finetune", "--reviews", str(tmp_path / "reviews"), "--out-version", "site-test",
                                   "--steps", "3"]
    assert process.wait(600) == 0, "\n".join(process.lines[-10:])
    assert process.progress == 1.0  # PROGRESS lines reached the runner
    result = logic.finetune_result(process)
    # cross-fitted: each of the 3 crops (3 microbleeds each) checked by a fine-tune on the other two
    assert result["version"] == "site-test" and result["before"]["microbleeds"] == 9
    summary = logic.finetune_summary(result)
    assert "sensitivity" in summary and "false positives per scan" in summary
    card = models.verify("site-test")
    assert card["adaptation"]["scans"]["held_out"] and card["adaptation"]["points"]["rejected"] == 3
    if result["refused"]:
        assert "Not activated" in summary and models.active_version() == models.SHIPPED
    else:
        assert "Now active: site-test" in summary and models.active_version() == "site-test"
        assert logic.active_model_text().startswith("Active model: site-test")
        assert "fine-tuned from shipped" in logic.active_model_text()
    assert logic.use_shipped_model() == models.SHIPPED
    assert logic.active_model_text().startswith("Active model: shipped")


def test_a_missing_reviews_folder_is_refused_before_anything_runs(module, data_dir, tmp_path):
    from CMBDetectorLib.errors import InputError

    with pytest.raises(InputError, match="folder of exported reviews"):
        module.CMBDetectorLogic(scene=None).start_finetune(tmp_path / "nowhere", "x")
