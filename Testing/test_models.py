"""Model versions (issue #16): `cmbdetector models list | use | rollback`, site models in the user data
folder, the hash check on site models, and the version named in every detect summary.

Site models here are real folders in the format `finetune` writes: a copy of the shipped members under a
site card (so no training is needed to test the bookkeeping); the data folder is a temporary one
(CMBDETECTOR_DATA_DIR), never the user's."""

from __future__ import annotations

import json
import shutil

import pytest

from CMBDetectorLib import classify, models, weights
from CMBDetectorLib.cli import main
from CMBDetectorLib.errors import CMBError, WeightsError
from CMBDetectorLib.pipeline import Detector


@pytest.fixture()
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(models.DATA_DIR_ENV, str(tmp_path / "data"))
    return tmp_path / "data"


def make_site_model(name: str, allowed: bool = True):
    """A site model folder: the shipped members, their cards, and a site ensemble card naming them."""
    folder = models.version_dir(name)
    folder.mkdir(parents=True)
    card = json.loads(classify.DEFAULT_MODEL.read_text())
    for member in card["members"]:
        for path in (classify.MODELS_DIR / member["file"], weights.card_path(classify.MODELS_DIR / member["file"])):
            shutil.copy(path, folder / path.name)
    card["stage3"] = "off"
    card["operating_threshold"] = 0.55
    card["adaptation"] = {"base": {"version": "shipped"}, "created": "2026-01-01T00:00:00+00:00",
                          "activation": {"allowed": allowed, "reason": "" if allowed else "worse than its base"}}
    (folder / models.CARD_NAME).write_text(json.dumps(card))
    return folder


def test_the_data_folder_is_outside_the_extension_and_follows_the_override(data_dir, monkeypatch):
    assert models.data_dir() == data_dir
    monkeypatch.delenv(models.DATA_DIR_ENV)
    assert classify.MODELS_DIR.parent not in models.data_dir().parents  # never inside the installed extension
    assert models.data_dir() != classify.MODELS_DIR.parent


def test_use_and_rollback_change_what_detector_loads(data_dir, capsys):
    assert models.active_version() == models.SHIPPED and not (data_dir / models.ACTIVE_FILE).exists()
    assert Detector(device="cpu", use_yolo=False).model_version == models.SHIPPED
    make_site_model("site-a")
    make_site_model("site-b")
    assert main(["models", "use", "site-a"]) == 0
    assert main(["models", "use", "site-b"]) == 0
    record = json.loads((data_dir / models.ACTIVE_FILE).read_text())
    assert record["active"] == "site-b" and record["history"] == ["shipped", "site-a"]
    detector = Detector(device="cpu")
    assert detector.model_version == "site-b" and detector.model_path.parent == data_dir / "models" / "site-b"
    assert detector.yolo is None and detector.operating_threshold == pytest.approx(0.55)  # its card: stage 3 off

    capsys.readouterr()
    assert main(["models", "list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[0].startswith("  shipped") and listed[2].startswith("* site-b") and listed[1].startswith("  site-a")

    assert main(["models", "rollback"]) == 0
    assert models.active_version() == "site-a"
    assert main(["models", "rollback"]) == 0
    assert models.active_version() == models.SHIPPED
    assert Detector(device="cpu", use_yolo=False).model_version == models.SHIPPED
    assert main(["models", "rollback"]) == 0  # nothing before: stays on the shipped model
    assert models.active_version() == models.SHIPPED


def test_a_tampered_site_model_is_refused_everywhere(data_dir, capsys):
    folder = make_site_model("site-t")
    assert main(["models", "use", "site-t"]) == 0
    weights = folder / "cmb_cnn_2.pt"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(WeightsError, match="do not match their model card"):
        Detector(device="cpu")  # the active model is checked on loading, as the shipped one is
    assert main(["models", "use", "site-t"]) == 2
    assert "do not match their model card" in capsys.readouterr().err
    assert main(["models", "list"]) == 0
    assert "site-t: REFUSED" in capsys.readouterr().out
    # a member swapped for another valid network (with its own matching card) is refused too
    for suffix in (".pt", ".json"):
        shutil.copy(classify.MODELS_DIR / f"cmb_cnn{suffix}", folder / f"cmb_cnn_2{suffix}")
    card = json.loads((folder / "cmb_cnn_2.json").read_text())
    (folder / "cmb_cnn_2.json").write_text(json.dumps({**card, "file": "cmb_cnn_2.pt"}))
    with pytest.raises(WeightsError, match="not the network"):
        models.verify("site-t")


def test_a_version_its_fine_tune_refused_cannot_be_activated(data_dir):
    make_site_model("worse", allowed=False)
    with pytest.raises(CMBError, match="may not be activated: worse than its base"):
        models.use("worse")
    assert models.active_version() == models.SHIPPED
    with pytest.raises(CMBError, match="not found"):
        models.use("never-made")
    with pytest.raises(CMBError, match="model version name"):
        models.use("../escape")


def test_a_missing_active_model_says_how_to_go_back(data_dir):
    folder = make_site_model("gone")
    models.use("gone")
    shutil.rmtree(folder)
    with pytest.raises(WeightsError, match="models use shipped"):
        Detector(device="cpu")


def test_each_detect_summary_names_the_model_version(data_dir):
    from helpers import small_swi_crop

    from CMBDetectorLib.pipeline import detect

    make_site_model("site-s")
    models.use("site-s")
    summary = detect(small_swi_crop(), crop=True, locate=False, device="cpu").summary
    assert summary["model"]["version"] == "site-s"
    assert summary["model"]["sha256"] == classify.read_ensemble_card(classify.DEFAULT_MODEL)["sha256"]
    assert summary["yolo"] == {"used": False}
