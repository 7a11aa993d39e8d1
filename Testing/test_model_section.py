"""The module's Model section (issue #16) on slicer-core, without Qt: the active model's line, a real
`cmbdetector finetune` run in the background through the detection's process runner on a tiny folder of
crop reviews, its before/after numbers, and one call back to the shipped model.
The widget itself is exercised in test_module_widget.py."""

from __future__ import annotations

import pytest
from helpers import MODULE_FILE, load_source, write_crop_reviews

from CMBDetectorLib import models
from CMBDetectorLib.train import finetune


@pytest.fixture(scope="module")
def module():
    pytest.importorskip("slicer")
    return load_source("CMBDetectorModelSection", MODULE_FILE)


@pytest.fixture()
def data_dir(tmp_path, monkeypatch, small_reference):
    monkeypatch.setenv(models.DATA_DIR_ENV, str(tmp_path / "data"))  # inherited by the background process
    small_reference(tmp_path / "data")
    return tmp_path / "data"


def test_improve_the_model_from_reviews_then_go_back_to_the_shipped_one(module, data_dir, tmp_path):
    logic = module.CMBDetectorLogic(scene=None)
    assert logic.active_model_text().startswith("Active model: shipped (SHA-256 ")
    write_crop_reviews(tmp_path / "reviews")
    process = logic.start_finetune(tmp_path / "reviews", "site-test")
    assert process.command[3:] == ["finetune", "--reviews", str(tmp_path / "reviews"), "--out-version", "site-test"]
    assert process.wait(600) == 0, "\n".join(process.lines[-10:])
    assert process.progress == 1.0  # PROGRESS lines reached the runner
    result = logic.finetune_result(process)
    # cross-fitted: each of the 3 crops (3 microbleeds each) checked by a fine-tune on the other two
    assert result["version"] == "site-test" and result["before"]["microbleeds"] == 9
    summary = logic.finetune_summary(result)
    assert "sensitivity" in summary and "false positives per scan" in summary
    card = models.verify("site-test")
    assert card["adaptation"]["scans"]["held_out"] and card["adaptation"]["points"]["rejected"] == 3
    assert card["adaptation"]["replay"]["scans"] == finetune.REPLAY_SCANS  # the default replay, from its kept patches
    # three crops cannot pin the outcome; the RESULT line, the card, the active model and the panel agree on it
    allowed = card["adaptation"]["activation"]["allowed"]
    assert bool(result["refused"]) is not allowed and result["refused"] == models.activation_refusal(card)
    assert models.active_version() == ("site-test" if allowed else models.SHIPPED)
    assert ("Now active: site-test" if allowed else "Not activated: ") in summary
    assert ("fine-tuned from shipped" in logic.active_model_text()) is allowed
    assert logic.use_shipped_model() == models.SHIPPED
    assert logic.active_model_text().startswith("Active model: shipped")


def test_the_panel_says_whether_the_new_model_was_activated_and_why_not(module):
    counts = {"scans": 20, "microbleeds": 46, "sensitivity": 0.674, "fp_per_scan": 1.1}
    result = {"version": "site-1", "before": counts, "after": {**counts, "sensitivity": 0.652, "fp_per_scan": 0.45}}
    summary = module.CMBDetectorLogic.finetune_summary
    refused = summary({**result, "refused": "worse than its base shipped on the 20 held-out reviews"})
    assert refused.startswith("Held-out reviews (20 scans, 46 microbleeds): sensitivity 0.67 -> 0.65, "
                              "false positives per scan 1.10 -> 0.45.")
    assert refused.endswith("Not activated: worse than its base shipped on the 20 held-out reviews")
    assert summary({**result, "refused": None}).endswith("Now active: site-1")


def test_a_missing_reviews_folder_is_refused_before_anything_runs(module, data_dir, tmp_path):
    from CMBDetectorLib.errors import InputError

    with pytest.raises(InputError, match="folder of exported reviews"):
        module.CMBDetectorLogic(scene=None).start_finetune(tmp_path / "nowhere", "x")
