"""The module's real CMBDetectorWidget in a real Qt event loop (PySide6, offscreen), on slicer-core's MRML.

The real .ui is loaded through QUiLoader; CTK/qMRML widgets and the Slicer application are the small
stand-ins of Testing/slicer_qt_standins.py. The test clicks the real buttons, presses the real shortcut
keys, and lets the real `cmbdetector detect` run in the background on a small crop, as a reader's
session would: load, detect, review with keys, threshold down and up, export, Delete all, and closing
the scene while a run is going. The panel is drawn on the way; with CMBDETECTOR_SCREENSHOT=1 the drawing
replaces docs/images/slicer-panel.png.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
QtWidgets = pytest.importorskip("PySide6.QtWidgets", reason="the widget tests need PySide6")
from PySide6 import QtCore, QtTest  # noqa: E402

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("needs slicer-core", allow_module_level=True)

import slicer_qt_standins as standins  # noqa: E402
from helpers import MODULE_FILE, ROOT, load_source, small_swi_crop  # noqa: E402

from CMBDetectorLib import classify, review  # noqa: E402
from CMBDetectorLib.findings import Finding, read_markups_json, write_json, write_markups_json  # noqa: E402

SCREENSHOT = ROOT / "docs" / "images" / "slicer-panel.png"
Qt = QtCore.Qt


def wait_until(condition, timeout_s: float = 300.0, what: str = "") -> None:
    """Run the Qt event loop until condition() holds (the GUI's timers and signals keep working)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        QtWidgets.QApplication.processEvents()
        time.sleep(0.02)
    QtWidgets.QApplication.processEvents()


class Harness:
    def __init__(self, mrml, temp_root: Path):
        self.app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
        self.mrml = mrml
        self.temp_root = temp_root
        self.main_window = QtWidgets.QMainWindow()
        self.undo_standins, self.gui = standins.install(mrml, self.main_window, temp_root)
        try:
            self._start()
        except BaseException:
            self.undo_standins()
            raise

    def _start(self) -> None:
        self.module = load_source("CMBDetectorInQt", MODULE_FILE, register=True)
        self.widget = self.module.CMBDetectorWidget()
        self.widget.setup()
        self.ui = self.widget.ui
        self.main_window.setCentralWidget(self.widget.parent)
        self.main_window.resize(480, 980)
        self.main_window.show()
        self.main_window.activateWindow()
        QtTest.QTest.qWaitForWindowExposed(self.main_window)
        self.widget.enter()

    def click(self, button) -> None:
        assert button.isEnabled(), button.objectName()
        QtTest.QTest.mouseClick(button, Qt.LeftButton)
        QtWidgets.QApplication.processEvents()

    def key(self, key) -> None:
        """A key press as the reader makes it: into the focused panel, where the shortcut catches it."""
        QtTest.QTest.keyClick(self.widget.parent, key)
        QtWidgets.QApplication.processEvents()

    def findings(self):
        return self.widget._parameterNode.findings

    def table_column(self, key: str) -> list:
        """The text of the review table's column for `key` (one of the widget's TABLE_COLUMNS), row by row."""
        table, column = self.ui.reviewTable, self.widget.TABLE_COLUMNS.index(key)
        return [table.item(row, column).text() for row in range(table.rowCount())]

    def close(self) -> None:
        self.widget.exit()
        self.widget.cleanup()
        wait_until(lambda: self.widget._process is None, 60, "the last run to end")
        self.widget.parent.findChild(standins.qMRMLWidget).setMRMLScene(None)  # as when Slicer destroys the panel
        self.main_window.close()
        QtWidgets.QApplication.processEvents()
        sys.modules.pop("CMBDetectorInQt", None)
        self.undo_standins()


@pytest.fixture()
def harness(mrml, tmp_path, request):
    """The widget in a real Qt event loop; indirect parameter: a function given Slicer's temporary folder,
    run before the module starts (files a previous session left behind)."""
    errors = []
    previous_hook = sys.excepthook
    sys.excepthook = lambda kind, value, trace: errors.append(value)  # exceptions raised inside Qt slots
    (tmp_path / "slicer-temp").mkdir()
    if getattr(request, "param", None):
        request.param(tmp_path / "slicer-temp")
    harness = Harness(mrml, tmp_path / "slicer-temp")
    harness.errors = errors
    yield harness
    harness.close()
    sys.excepthook = previous_hook
    assert errors == [], errors


def add_small_crop(mrml, name="sub-01 swi"):
    return review.volume_node_from_volume(mrml.scene, small_swi_crop(), name)


def cmbdetector_temp_folders(harness) -> list:
    return sorted(harness.temp_root.glob("CMBDetector-*"))


def choose_the_small_crop_on_the_cpu(harness):
    """What a reader does before Detect: pick the scan (a small crop), the CPU and 'Partial-brain crop'."""
    ui = harness.ui
    volume = add_small_crop(harness.mrml)
    ui.inputVolumeSelector.setCurrentNode(volume)
    ui.deviceComboBox.setCurrentText("cpu")
    QtTest.QTest.mouseClick(ui.partialBrainCheckBox, Qt.LeftButton)
    QtWidgets.QApplication.processEvents()
    return volume


def test_a_reading_session_through_the_real_widget(harness, tmp_path):
    ui, mrml = harness.ui, harness.mrml

    # ---- load: the reader picks the scan, the CPU, a partial-brain crop -------------------------------
    volume = choose_the_small_crop_on_the_cpu(harness)
    parameters = harness.widget._parameterNode
    assert parameters.inputVolume is volume and parameters.device == "cpu" and parameters.partialBrain
    assert not ui.acceptButton.isEnabled()  # nothing to review yet

    # ---- detect: the real process, polled by the widget's timer ----------------------------------------
    harness.click(ui.detectButton)
    assert ui.cancelButton.isEnabled() and not ui.detectButton.isEnabled()
    wait_until(lambda: harness.widget._process is None, what="the detection run")
    node = harness.findings()
    assert node is not None and review.is_review_node(node), harness.ui.logTextEdit.toPlainText()
    assert cmbdetector_temp_folders(harness) == []  # the scan copy and the run's files are gone
    run = review.detection_run(node)
    assert parameters.threshold == pytest.approx(run["operating_threshold"])  # the review starts there
    rows = review.review_table(node)
    assert ui.reviewTable.rowCount() == len(rows) == node.GetNumberOfControlPoints()
    below = [r for r in rows if r["score"] < parameters.threshold]
    assert below, "the small crop is made to have a finding below the operating point"
    assert all(not r["visible"] for r in below) and all(r["visible"] for r in rows if r not in below)
    assert f"{len(below)} below threshold" in ui.countsLabel.text()
    assert ui.reviewTable.currentRow() == 0  # the first finding is shown
    header = ui.reviewTable.horizontalHeaderItem(harness.widget.TABLE_COLUMNS.index("kept_by"))
    assert header.text() == "Kept by" and "criteria" in header.toolTip()
    kept_by = harness.table_column("kept_by")
    assert kept_by == [r["kept_by"] for r in rows]
    assert "networks" in kept_by and set(kept_by) <= {"networks", "criteria"}

    # ---- review with the real shortcut keys --------------------------------------------------------------
    harness.key(Qt.Key_A)
    assert review.get_state(node, 0) == "accepted" and node.GetNthControlPointLabel(0).endswith("[A]")
    current = ui.reviewTable.currentRow()
    assert current == 1  # accepted, then on to the next pending finding
    harness.key(Qt.Key_X)
    assert review.get_state(node, 1) == "rejected"
    harness.key(Qt.Key_U)  # undo: back to pending, and shown again
    assert review.get_state(node, 1) == "pending" and ui.reviewTable.currentRow() == 1
    harness.key(Qt.Key_A)
    harness.key(Qt.Key_P)
    harness.key(Qt.Key_P)
    assert ui.reviewTable.currentRow() == 0
    harness.key(Qt.Key_Q)  # back to pending
    assert review.get_state(node, 0) == "pending"
    harness.key(Qt.Key_A)
    harness.key(Qt.Key_R)  # Slicer's reset-view key does nothing here
    assert [review.get_state(node, i) for i in range(2)] == ["accepted", "accepted"]
    assert "2 accepted" in ui.countsLabel.text()

    # ---- table and views stay in step: arrow keys in the table, a point clicked in a view ----------------
    ui.reviewTable.setFocus()
    QtTest.QTest.keyClick(ui.reviewTable, Qt.Key_Up)
    assert harness.widget._currentIndex == ui.reviewTable.currentRow()
    last = node.GetNumberOfControlPoints() - 1
    node.GetDisplayNode().SetActiveControlPoint(last)  # what a click on the point in a view does ...
    node.InvokeEvent(slicer.vtkMRMLMarkupsNode.PointStartInteractionEvent)  # ... and then announces
    QtWidgets.QApplication.processEvents()
    assert ui.reviewTable.currentRow() == last and harness.widget._currentIndex == last

    # ---- threshold down reveals, up hides ---------------------------------------------------------------
    ui.thresholdSlider.setValue(review.DETECTION_FLOOR)
    assert all(node.GetNthControlPointVisibility(i) for i in range(node.GetNumberOfControlPoints()))
    assert "0 below threshold" in ui.countsLabel.text()
    ui.thresholdSlider.setValue(0.999)
    hidden = [i for i in range(node.GetNumberOfControlPoints()) if not node.GetNthControlPointVisibility(i)]
    assert all(review.get_state(node, i) == "pending" for i in hidden)  # accepted findings always show
    ui.thresholdSlider.setValue(run["operating_threshold"])

    # ---- export: files with the run's provenance, one labelmap updated in place -----------------------
    ui.exportDirectoryButton.directory = str(tmp_path / "export")
    harness.click(ui.exportButton)
    report = json.loads(next((tmp_path / "export").glob("*_review.json")).read_text())
    assert report["detection_run"]["model"]["sha256"] == classify.read_ensemble_card(classify.DEFAULT_MODEL)["sha256"]
    assert report["counts"]["accepted"] == 2 and report["threshold"] == pytest.approx(run["operating_threshold"])
    labelmaps = mrml.scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode")
    harness.click(ui.exportLabelmapButton)
    harness.click(ui.exportLabelmapButton)
    assert mrml.scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == labelmaps  # reused
    assert harness.gui.slice_layers[-1]["label"] is node.GetNodeReference(review.ACCEPTED_LABELMAP_ROLE)

    # the panel as drawn here; CMBDETECTOR_SCREENSHOT=1 also writes it to docs/images (kept out of
    # ordinary runs: the log's temporary paths change every time)
    drawn = tmp_path / "slicer-panel.png"
    assert harness.widget.parent.grab().save(str(drawn)) and drawn.read_bytes()[:4] == b"\x89PNG"
    if os.environ.get("CMBDETECTOR_SCREENSHOT"):
        SCREENSHOT.write_bytes(drawn.read_bytes())

    # ---- Delete all control points (the Markups module's action), then a point the reader places -------
    node.RemoveAllControlPoints()
    wait_until(lambda: ui.reviewTable.rowCount() == 0, 10, "the table to empty")
    node.AddControlPoint([1.0, 2.0, 3.0])
    wait_until(lambda: ui.reviewTable.rowCount() == 1, 10, "the placed point's row")
    assert harness.table_column("state") == ["added"] and harness.table_column("score") == [""]  # inherits no score
    assert harness.table_column("kept_by") == [""]  # the reader put it there, not a detector stage


def test_closing_the_scene_cancels_a_run(harness):
    ui, mrml = harness.ui, harness.mrml
    ui.inputVolumeSelector.setCurrentNode(add_small_crop(mrml))
    ui.deviceComboBox.setCurrentText("cpu")
    QtTest.QTest.mouseClick(ui.partialBrainCheckBox, Qt.LeftButton)
    QtWidgets.QApplication.processEvents()
    harness.click(ui.detectButton)
    process = harness.widget._process
    assert process is not None and process.running
    mrml.scene.Clear(0)  # File > Close Scene
    wait_until(lambda: harness.widget._process is None, 60, "the cancelled run to end")
    assert process.cancelled and not process.running
    assert mrml.scene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode") == 0  # nothing loaded
    assert cmbdetector_temp_folders(harness) == []
    assert "Cancelled." in ui.logTextEdit.toPlainText()
    assert ui.detectButton.isEnabled() is False  # the new scene has no input yet
    assert ui.loadSampleButton.isEnabled()


def test_a_phase_marked_sign_reversed_is_reversed_and_the_review_remembers_it(harness):
    """The reader gives a phase and ticks 'Sign reversed': the run reverses it, and the review node's
    detection run says so (an export with the scan kept carries it to a site fine-tune)."""
    ui, mrml = harness.ui, harness.mrml
    choose_the_small_crop_on_the_cpu(harness)
    crop = small_swi_crop()  # the same grid as the chosen scan
    phase = np.random.default_rng(4).uniform(-np.pi, np.pi, crop.shape).astype(np.float32)
    phase_node = review.volume_node_from_volume(mrml.scene, crop.with_array(phase), "phase")
    ui.phaseVolumeSelector.setCurrentNode(phase_node)
    QtTest.QTest.mouseClick(ui.flipPhaseCheckBox, Qt.LeftButton)
    QtWidgets.QApplication.processEvents()
    assert harness.widget._parameterNode.flipPhase and harness.widget._parameterNode.phaseVolume is phase_node
    harness.click(ui.detectButton)
    wait_until(lambda: harness.widget._process is None, what="the detection run")
    run = review.detection_run(harness.findings())
    assert run["phase_given"] and run["phase_used_by_cnn"] and run["phase_sign_reversed"], run


def test_a_landmarks_node_is_shown_but_not_changed_until_adopted(harness):
    ui, mrml = harness.ui, harness.mrml
    landmarks = mrml.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "landmarks")
    landmarks.AddControlPoint([0.0, 60.0, 0.0], "nasion")
    ui.findingsSelector.setCurrentNode(landmarks)
    QtWidgets.QApplication.processEvents()
    assert harness.table_column("label") == ["nasion"]
    harness.key(Qt.Key_A)
    ui.thresholdSlider.setValue(0.9)
    assert landmarks.GetNthControlPointLabel(0) == "nasion" and landmarks.GetNthControlPointDescription(0) == ""
    assert not ui.acceptButton.isEnabled() and ui.adoptButton.isEnabled()
    harness.click(ui.adoptButton)
    assert review.is_review_node(landmarks) and not ui.adoptButton.isEnabled()
    harness.click(ui.nextButton)
    harness.click(ui.acceptButton)
    assert landmarks.GetNthControlPointLabel(0) == "nasion [A]"


def test_the_module_self_test_runs_its_fast_parts(harness):
    """The self-test Slicer's CMake registers (CMBDetectorTest), on the harness's scene: the review on
    synthetic findings and Cancel. (Its sample-scan part simulates a scan: test_module_ui covers that.)"""
    self_test = harness.module.CMBDetectorTest()
    for name in ("test_review_on_synthetic_findings", "test_detection_process_cancel"):
        self_test.setUp()
        getattr(self_test, name)()
    assert {"Review test passed", "Cancel test passed"} <= set(standins.DISPLAYED)


def test_the_self_test_skips_what_lacks_its_packages_and_says_so(harness, monkeypatch):
    """On a fresh Slicer (the extension build machine) the sample's packages are absent."""
    from CMBDetectorLib import dependencies

    monkeypatch.setitem(dependencies.PINS, "cmbdetector-absent-package", "1.0")
    monkeypatch.setitem(dependencies.GROUPS, "sample", ("cmbdetector-absent-package",))
    harness.module.CMBDetectorTest().test_sample_scan_review()  # returns at once instead of simulating
    assert any(line.startswith("Skipped (needs cmbdetector-absent-package==1.0)") for line in standins.DISPLAYED)


def test_load_sample_runs_in_the_background_and_cancel_stops_it(harness):
    ui = harness.ui
    harness.click(ui.loadSampleButton)
    process = harness.widget._process
    assert process is not None and process.command[3:5] == ["synth", "--out"]
    assert not ui.loadSampleButton.isEnabled() and ui.cancelButton.isEnabled()
    assert len(cmbdetector_temp_folders(harness)) == 1  # made by slicer.util.tempDirectory
    # the click returned while the simulation (tens of seconds) runs: the GUI is not blocked
    assert process.running
    QtTest.QTest.qWait(500)  # the event loop, with the widget's poll timer, keeps running meanwhile
    harness.click(ui.cancelButton)
    wait_until(lambda: harness.widget._process is None, 60, "the cancelled simulation to end")
    assert process.cancelled and cmbdetector_temp_folders(harness) == []
    assert harness.mrml.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0
    assert ui.loadSampleButton.isEnabled() and not ui.cancelButton.isEnabled()


# ---- review autosave: a closed scene or a crash loses at most the last decision ----------------------


def test_a_review_survives_a_closed_scene_and_is_offered_when_the_scan_is_selected_again(harness):
    ui, mrml = harness.ui, harness.mrml
    volume = choose_the_small_crop_on_the_cpu(harness)
    harness.click(ui.detectButton)
    wait_until(lambda: harness.widget._process is None, what="the detection run")
    node = harness.findings()
    assert node is not None, ui.logTextEdit.toPlainText()
    saved = harness.widget.logic.reviews_directory(volume) / "sub-01_swi.autosave.mrk.json"
    harness.key(Qt.Key_A)
    wait_until(lambda: saved.is_file() and read_markups_json(saved)[0].status == "accepted", 10, "the autosave")
    assert harness.gui.questions == []

    mrml.scene.Clear(0)  # File > Close Scene without saving
    wait_until(lambda: harness.findings() is None, 10, "the panel to forget the findings")
    harness.gui.answer = True
    again = add_small_crop(mrml, "sub-01 swi (loaded again)")
    ui.inputVolumeSelector.setCurrentNode(again)
    wait_until(lambda: harness.findings() is not None, 10, "the restored findings")
    assert len(harness.gui.questions) == 1 and "Restore it?" in harness.gui.questions[0]
    restored = harness.findings()
    assert review.get_state(restored, 0) == "accepted" and harness.table_column("state")[0] == "accepted"
    ui.inputVolumeSelector.setCurrentNode(volume)
    ui.inputVolumeSelector.setCurrentNode(again)
    QtWidgets.QApplication.processEvents()
    assert len(harness.gui.questions) == 1  # offered once per session


def _a_review_left_by_a_crash(slicer_temp: Path) -> None:
    """A module run's findings and a newer autosave with one decision, as a crashed session leaves them."""
    folder = slicer_temp / "CMBDetectorReviews" / "0123456789abcdef0123"
    folder.mkdir(parents=True)
    findings = [Finding(f"CMB-{n}", (5.0 * n, 0.0, 0.0), 0.9 - 0.1 * n) for n in (1, 2)]
    write_markups_json(findings, folder / "sub-07.mrk.json")
    write_json({"operating_threshold": 0.5, "threshold": 0.05}, folder / "sub-07.json")
    findings[1].status = "rejected"
    write_markups_json(findings, folder / "sub-07.autosave.mrk.json")
    os.utime(folder / "sub-07.mrk.json", (1, 1))


@pytest.mark.parametrize("harness", [_a_review_left_by_a_crash], indirect=True)
def test_the_module_offers_an_unfinished_review_when_it_starts(harness):
    assert len(harness.gui.questions) == 1 and "sub-07" in harness.gui.questions[0]
    node = harness.findings()
    assert [review.get_state(node, i) for i in range(2)] == ["pending", "rejected"]
    assert harness.ui.thresholdSlider.value() == pytest.approx(0.5)


def tick(box) -> None:
    """Click a check box on its indicator (a click right of its text would miss it)."""
    assert box.isEnabled(), box.objectName()
    QtTest.QTest.mouseClick(box, Qt.LeftButton, Qt.KeyboardModifier.NoModifier, QtCore.QPoint(6, box.height() // 2))
    QtWidgets.QApplication.processEvents()


def test_the_reader_marks_a_review_complete_and_the_export_records_it(harness, tmp_path):
    """Issue #16: the "Review complete" box is refused while a shown finding is pending, and the exported
    review (with the scan kept beside it, for `cmbdetector finetune`) says whether the review is complete."""
    from CMBDetectorLib.findings import Finding

    ui, mrml = harness.ui, harness.mrml
    volume = add_small_crop(mrml)
    ui.inputVolumeSelector.setCurrentNode(volume)
    findings = [Finding(f"CMB-{n + 1}", (2.0 * n, 0.0, 0.0), score, 3.0, "deep") for n, score in enumerate((0.9, 0.8))]
    node = review.findings_to_markups_node(mrml.scene, findings, "sub-01 review")
    ui.findingsSelector.setCurrentNode(node)
    wait_until(lambda: ui.reviewTable.rowCount() == 2, 10, "the findings' rows")
    assert ui.reviewCompleteCheckBox.isEnabled() and not ui.reviewCompleteCheckBox.isChecked()
    harness.click(ui.nextButton)
    harness.click(ui.acceptButton)
    tick(ui.reviewCompleteCheckBox)  # CMB-2 is still pending: refused, and the box says so
    assert not ui.reviewCompleteCheckBox.isChecked() and not review.is_review_complete(node)
    assert any("still pending (CMB-2)" in str(error) for error in harness.gui.errors), harness.gui.errors
    harness.click(ui.rejectButton)
    tick(ui.reviewCompleteCheckBox)
    assert ui.reviewCompleteCheckBox.isChecked() and review.is_review_complete(node)

    ui.exportDirectoryButton.directory = str(tmp_path / "export")
    tick(ui.keepScanCheckBox)
    harness.click(ui.exportButton)
    report = json.loads((tmp_path / "export" / "sub-01_review_review.json").read_text())
    assert report["complete"] is True and report["volume"] == "sub-01_review.nii.gz"
    assert (tmp_path / "export" / report["volume"]).is_file()
    assert [f["status"] for f in report["findings"]] == ["accepted", "rejected"]

    harness.click(ui.pendingButton)  # a decision taken back: the review is no longer complete
    wait_until(lambda: not ui.reviewCompleteCheckBox.isChecked(), 10, "the box to follow the node")
    harness.click(ui.exportButton)
    assert json.loads((tmp_path / "export" / "sub-01_review_review.json").read_text())["complete"] is False


def test_improve_the_model_from_my_reviews_runs_in_the_background_and_one_click_goes_back(harness, tmp_path,
                                                                                           monkeypatch,
                                                                                           small_reference):
    """Issue #16: the Model section runs `cmbdetector finetune` through the panel's process runner (progress,
    Cancel), shows the before/after numbers and the active model, and one click goes back to the shipped one."""
    from helpers import write_crop_reviews

    from CMBDetectorLib import models

    monkeypatch.setenv(models.DATA_DIR_ENV, str(tmp_path / "data"))  # the background process inherits it
    small_reference(tmp_path / "data")
    ui = harness.ui
    harness.widget.refreshModelSection()
    assert ui.activeModelLabel.text().startswith("Active model: shipped")
    write_crop_reviews(tmp_path / "reviews")
    ui.reviewsDirectoryButton.directory = str(tmp_path / "reviews")

    harness.click(ui.improveModelButton)  # started, then cancelled: nothing becomes a version
    process = harness.widget._process
    assert process.command[3:5] == ["finetune", "--reviews"] and "--steps" not in process.command
    assert process.command[-2] == "--out-version" and process.command[-1].startswith("site-")
    assert ui.modelCancelButton.isEnabled() and not ui.improveModelButton.isEnabled()
    harness.click(ui.modelCancelButton)
    wait_until(lambda: harness.widget._process is None, 60, "the cancelled fine-tune to end")
    assert process.cancelled and models.site_versions() == [] and models.active_version() == models.SHIPPED

    harness.click(ui.improveModelButton)
    wait_until(lambda: harness.widget._process is None, 600, "the fine-tune")
    text = ui.modelResultLabel.text()
    # cross-fitted: all 3 reviewed crops are held-out checks, each on a fine-tune that never saw it
    assert "Held-out reviews (3 scans, 9 microbleeds): sensitivity" in text, ui.logTextEdit.toPlainText()
    assert ui.modelProgressBar.value() == 100 and len(models.site_versions()) == 1
    version = models.site_versions()[0]
    # three crops cannot pin the outcome; the card, the result line and the active-model line agree on it
    allowed = models.verify(version)["adaptation"]["activation"]["allowed"]
    assert ("Now active: " + version if allowed else "Not activated: ") in text
    assert ui.activeModelLabel.text().startswith(f"Active model: {version if allowed else models.SHIPPED}")
    harness.click(ui.useShippedModelButton)
    assert models.active_version() == models.SHIPPED
    assert ui.activeModelLabel.text().startswith("Active model: shipped")
