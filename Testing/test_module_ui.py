"""The Slicer module's files, and its Qt-free Logic on slicer-core.

The Widget itself runs in test_module_widget.py (PySide6). Here: the .ui parses and holds every widget
the Widget uses, the module compiles and imports on bare slicer-core, the background process runner
reports progress and Cancel kills the whole process tree, the Logic runs a real detection, and the
extension description files agree and carry the keys the Extensions Index needs.
"""

from __future__ import annotations

import ast
import json
import re
import sys
import textwrap
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
from helpers import MODULE_FILE, ROOT, load_source

UI_FILE = ROOT / "CMBDetector" / "Resources" / "UI" / "CMBDetector.ui"


def ui_widgets() -> dict:
    """name -> (class, {dynamic property: value}) for every widget in the .ui file."""
    tree = ElementTree.parse(UI_FILE)
    widgets = {}
    for widget in tree.iter("widget"):
        properties = {p.get("name"): "".join(p.itertext()).strip() for p in widget.findall("property")}
        widgets[widget.get("name")] = (widget.get("class"), properties)
    return widgets


def module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(), filename=str(MODULE_FILE))


def test_ui_parses_and_every_widget_the_module_uses_exists():
    widgets = ui_widgets()
    used = {node.attr for node in ast.walk(module_tree())
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}
    assert len(used) > 15  # the scan itself works
    assert sorted(used - set(widgets)) == []


def test_parameter_names_in_ui_match_the_parameter_node():
    tree = module_tree()
    parameter_class = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "CMBDetectorParameterNode")
    parameters = {n.target.id for n in parameter_class.body if isinstance(n, ast.AnnAssign)}
    bound = {props["SlicerParameterName"] for _, props in ui_widgets().values() if "SlicerParameterName" in props}
    assert bound and bound <= parameters
    assert {"inputVolume", "findings", "threshold"} <= bound


def test_module_compiles_and_has_slicer_structure():
    compile(MODULE_FILE.read_text(), str(MODULE_FILE), "exec")
    classes = {n.name: [ast.unparse(b) for b in n.bases] for n in ast.walk(module_tree()) if isinstance(n, ast.ClassDef)}
    assert "ScriptedLoadableModule" in classes["CMBDetector"]
    assert set(classes["CMBDetectorWidget"]) == {"ScriptedLoadableModuleWidget", "VTKObservationMixin"}
    assert "ScriptedLoadableModuleLogic" in classes["CMBDetectorLogic"]
    assert "ScriptedLoadableModuleTest" in classes["CMBDetectorTest"]
    source = MODULE_FILE.read_text()
    assert 'slicer.util.loadUI(self.resourcePath("UI/CMBDetector.ui"))' in source
    for key in ("A", "X", "N", "P", "Q", "U"):
        assert re.search(rf'\("{key}", "on\w+"\)', source), key
    # Slicer's slice views take r (reset zoom and pan): a single-key shortcut on it would steal it
    assert not re.search(r'\("R", "on\w+"\)', source)


# ---- the Logic without Qt ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def module():
    pytest.importorskip("slicer")
    return load_source("CMBDetector", MODULE_FILE)


def test_module_imports_without_qt(module):
    assert module.HAVE_SLICER_GUI is False
    assert "qt" not in sys.modules or module.qt is None


def test_detection_command_line(module, tmp_path):
    request = module.DetectionRequest(input_path=tmp_path / "sub 1.nii.gz", out_dir=tmp_path / "out",
                                      phase_path=tmp_path / "p.nii.gz", threshold=0.25, device="cuda")
    command = module.CMBDetectorLogic(scene=None).detection_command(request)
    assert command[1:4] == ["-m", "CMBDetectorLib.cli", "detect"]
    assert command[4:] == [str(tmp_path / "sub 1.nii.gz"), "--out", str(tmp_path / "out"),
                           "--phase", str(tmp_path / "p.nii.gz"), "--threshold", "0.25", "--device", "cuda"]
    assert request.stem == "sub 1"
    auto = module.DetectionRequest(input_path=Path("a.nii"), out_dir=Path("o"), crop=True, flip_phase=True)
    assert auto.arguments() == ["detect", "a.nii", "--out", "o", "--device", "auto", "--crop"]  # no phase to flip
    flipped = module.DetectionRequest(input_path=Path("a.nii"), out_dir=Path("o"), phase_path=Path("p.nii"),
                                      flip_phase=True)
    assert flipped.arguments()[4:7] == ["--phase", "p.nii", "--flip-phase"]


def test_progress_parsing(module):
    assert module.parse_progress("classify 42%") == pytest.approx(0.42)
    assert module.parse_progress("[3/6] candidates") == pytest.approx(0.5)
    assert module.parse_progress("stage 2 of 5: CNN") == pytest.approx(0.4)
    assert module.parse_progress("reading /data/scan_3/4.nii.gz") is None


def test_dependency_check_asks_before_installing(module, monkeypatch):
    logic = module.CMBDetectorLogic(scene=None)
    if not logic.install_plan().complete:
        pytest.skip(f"this environment differs from requirements.lock: {logic.install_plan().describe()}")
    questions = []
    assert logic.ensure_dependencies(ask=lambda text: questions.append(text) or True) is True
    assert questions == []  # nothing missing: no question
    # a feature whose package is absent here: the user is asked, with the exact version, and may refuse
    monkeypatch.setitem(module.dependencies.PINS, "cmbdetector-absent-package", "1.0")
    monkeypatch.setitem(module.dependencies.GROUPS, "cancel", ("cmbdetector-absent-package",))
    assert logic.ensure_dependencies(ask=lambda text: questions.append(text) or False, groups=("cancel",)) is False
    assert len(questions) == 1 and "cmbdetector-absent-package==1.0" in questions[0]
    assert logic.ensure_dependencies(ask=None, groups=("cancel",)) is False  # never installs without asking


def test_the_cli_runs_through_the_process_runner(module):
    """`python -m CMBDetectorLib.cli --version` through the same runner and environment as detection."""
    logic = module.CMBDetectorLogic(scene=None)
    command = [sys.executable, "-m", "CMBDetectorLib.cli", "--version"]
    process = module.BackgroundProcess(command, logic.detection_environment())
    assert process.wait(60) == 0
    assert any(line.startswith("cmbdetector ") for line in process.lines)


def test_cancel_kills_the_whole_process_tree(module, tmp_path):
    psutil = pytest.importorskip("psutil")
    child_pid_file = tmp_path / "child.pid"
    script = textwrap.dedent(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(child_pid_file)!r}, "w").write(str(child.pid))
        for step in range(1, 1000):
            print(f"[{{step}}/1000] working", flush=True)
            time.sleep(0.05)
    """)
    process = module.BackgroundProcess([sys.executable, "-c", script])
    deadline = time.time() + 30
    while (not child_pid_file.exists() or process.progress == 0) and time.time() < deadline:
        process.poll()
        time.sleep(0.05)
    assert process.progress > 0 and process.running
    child_pid = int(child_pid_file.read_text())
    assert psutil.pid_exists(child_pid)
    process.cancel()
    assert process.wait(10) != 0
    assert process.cancelled and not process.running
    gone = not psutil.pid_exists(child_pid) or psutil.Process(child_pid).status() == psutil.STATUS_ZOMBIE
    assert gone, "the worker's child survived Cancel"


def test_logic_writes_input_runs_detection_and_exports_provenance(module, mrml, tmp_path):
    """prepare_request writes the node as NIfTI that the core reads back with the same geometry; the real
    `cmbdetector detect` runs on it (a small crop: seconds); the review starts at the run's operating
    point with the findings below it kept (hidden), and the exported review names the models that ran."""
    import numpy as np

    from CMBDetectorLib import classify, review, yolo
    from CMBDetectorLib.io import read_volume
    from helpers import small_swi_crop

    volume = small_swi_crop()
    node = review.volume_node_from_volume(mrml.scene, volume, "sub-01 swi")
    logic = module.CMBDetectorLogic(scene=mrml.scene, markups_logic=mrml.markups_logic)
    request = logic.prepare_request(node, device="cpu", crop=True)  # in a temporary folder
    assert request.input_path.name == "sub-01_swi.nii.gz" and request.stem == "sub-01_swi"
    assert request.threshold == review.DETECTION_FLOOR and request.work_dir.is_dir()
    written = read_volume(request.input_path)
    np.testing.assert_allclose(written.affine, volume.affine, atol=1e-5)
    np.testing.assert_allclose(written.array, volume.array, rtol=1e-6)

    review_node = logic.run_detection(request, timeout_s=600)
    assert not request.work_dir.exists()  # the patient's volume and the run's files are gone once loaded
    assert review.is_review_node(review_node)
    run = review.detection_run(review_node)
    start = review.review_start_threshold(review_node)
    assert start == run["operating_threshold"] > run["threshold"] == review.DETECTION_FLOOR
    rows = review.review_table(review_node)
    scores = [r["score"] for r in rows]
    assert len(rows) >= 1 and scores == sorted(scores, reverse=True)
    assert all(review.DETECTION_FLOOR <= score <= 1.0 for score in scores)

    next_index = logic.accept(review_node, 0)
    assert review.get_state(review_node, 0) == "accepted" and next_index != 0
    assert "1 accepted" in logic.counts_text(review_node)
    exported = logic.export(review_node, tmp_path / "export", reader="R", input_node=node, threshold=start)
    report = json.loads(exported["json"].read_text())
    assert report["input"] == "sub-01 swi" and report["threshold"] == start
    run = report["detection_run"]
    assert run["model"]["sha256"] == classify.read_ensemble_card(classify.DEFAULT_MODEL)["sha256"]
    assert run["model"]["device"] == "cpu"
    assert run["yolo"]["used"] and run["yolo"]["sha256"] == json.loads(
        Path(yolo.DEFAULT_YOLO).with_suffix(".json").read_text())["sha256"]
    import torch

    assert run["versions"]["torch"] == torch.__version__ and run["operating_threshold"] == start
    labels = read_volume(exported["labelmap"])
    assert labels.array.max() >= 1 and labels.array.shape == volume.shape


def finished_run(folder: Path, stem: str = "sub-01", summary: bool = True) -> Path:
    """A detect run's files as pipeline.write_outputs leaves them (summary last; without it: a half-written run)."""
    from CMBDetectorLib.findings import Finding, write_json, write_markups_json

    folder.mkdir(parents=True, exist_ok=True)
    findings = [Finding(f"CMB-{n}", (10.0 * n, 5.0, -3.0), 0.9 - 0.1 * n, diameter_mm=3.0, region="lobar",
                        lobe="frontal") for n in (1, 2, 3)]
    markups = write_markups_json(findings, folder / f"{stem}.mrk.json")
    if summary:
        write_json({"input": f"{stem}.nii.gz", "threshold": 0.05, "operating_threshold": 0.5}, folder / f"{stem}.json")
    return markups


def test_a_half_written_run_is_never_loaded(module, mrml, tmp_path):
    """The summary-last rule: a .mrk.json without its STEM.json is a run that was stopped or is still writing."""
    finished_run(tmp_path / "out", summary=False)
    logic = module.CMBDetectorLogic(scene=mrml.scene, markups_logic=mrml.markups_logic)
    with pytest.raises(module.CMBError, match=r"not a finished run: its summary sub-01.json .* missing"):
        logic.load_results(tmp_path / "out", "sub-01")
    assert mrml.scene.GetNodesByClass("vtkMRMLMarkupsFiducialNode").GetNumberOfItems() == 0


def test_the_review_autosaves_and_loading_again_offers_to_restore_it(module, mrml, tmp_path):
    """Each decision is autosaved beside the findings (atomically, Slicer's markups JSON); after a crash or a
    closed scene, loading the same results again asks, and Yes brings every decision back."""
    from CMBDetectorLib import autosave, outputs, review
    from CMBDetectorLib.findings import read_markups_json

    out = tmp_path / "out"
    finished_run(out)
    logic = module.CMBDetectorLogic(scene=mrml.scene, markups_logic=mrml.markups_logic)
    questions = []
    node = logic.load_results(out, "sub-01", ask=questions.append)
    assert questions == []  # nothing to restore yet
    logic.accept(node, 0)
    logic.reject(node, 2)
    saved = logic.autosave(node)
    assert saved == out / "sub-01.autosave.mrk.json"
    assert [f.status for f in read_markups_json(saved)] == ["accepted", "pending", "rejected"]
    assert [p.name for p in out.iterdir() if outputs.is_temporary(p)] == []
    assert autosave.is_restorable(saved)

    mrml.scene.Clear(0)  # a closed scene (or a crash): only the files remain
    restored = logic.load_results(out, "sub-01", ask=lambda question: questions.append(question) or True)
    assert len(questions) == 1 and "Restore it?" in questions[0] and "sub-01" in questions[0]
    assert [review.get_state(restored, i) for i in range(3)] == ["accepted", "pending", "rejected"]
    assert [row["score"] for row in review.review_table(restored)] == pytest.approx([0.8, 0.7, 0.6])
    assert review.review_start_threshold(restored) == 0.5  # provenance still from the run's summary

    mrml.scene.Clear(0)  # No: the detector's findings, and the autosave is kept aside, never overwritten
    fresh = logic.load_results(out, "sub-01", ask=lambda question: False)
    assert [review.get_state(fresh, i) for i in range(3)] == ["pending"] * 3
    kept = [p for p in out.iterdir() if ".autosave.mrk.json.declined-" in p.name]
    assert len(kept) == 1 and [f.status for f in read_markups_json(kept[0])][0] == "accepted"


def test_an_autosave_that_adds_nothing_or_is_older_is_not_offered(module, mrml, tmp_path):
    import os

    out = tmp_path / "out"
    finished_run(out)
    logic = module.CMBDetectorLogic(scene=mrml.scene, markups_logic=mrml.markups_logic)
    node = logic.load_results(out, "sub-01")
    saved = logic.autosave(node)  # all pending: the same as the findings
    asked = []
    logic.load_results(out, "sub-01", ask=asked.append)
    logic.accept(node, 1)
    logic.autosave(node)
    os.utime(saved, (1, 1))  # older than the findings: a new run replaced them since
    logic.load_results(out, "sub-01", ask=asked.append)
    assert asked == []


def test_the_module_keeps_its_runs_review_per_scan_and_offers_it_for_that_scan(module, mrml, tmp_path):
    """The module's own runs live in a temporary folder: their findings are copied to a folder named by the
    scan's voxels, where the autosave goes; selecting that scan again (or starting the module) finds it."""
    from CMBDetectorLib import review
    from helpers import small_swi_crop

    logic = module.CMBDetectorLogic(scene=mrml.scene, markups_logic=mrml.markups_logic,
                                    reviews_root=tmp_path / "reviews")
    scan = review.volume_node_from_volume(mrml.scene, small_swi_crop(), "sub-01 swi")
    other = review.volume_node_from_volume(mrml.scene, small_swi_crop(seed=1), "sub-02 swi")
    folder = logic.reviews_directory(scan)
    assert folder.parent == tmp_path / "reviews" and folder != logic.reviews_directory(other)
    finished_run(tmp_path / "temporary run")
    node = logic.load_results(tmp_path / "temporary run", "sub-01", autosave_dir=folder)
    logic.accept(node, 0)
    logic.autosave(node)
    assert sorted(p.name for p in folder.iterdir()) == ["sub-01.autosave.mrk.json", "sub-01.json", "sub-01.mrk.json"]

    mrml.scene.Clear(0)
    again = review.volume_node_from_volume(mrml.scene, small_swi_crop(), "renamed on reload")
    other = review.volume_node_from_volume(mrml.scene, small_swi_crop(seed=1), "sub-02 swi")
    assert logic.restorable_review_for(other) is None
    saved = logic.restorable_review_for(again)
    assert saved == folder / "sub-01.autosave.mrk.json" and logic.restorable_reviews() == [saved]
    restored = logic.restore_review(saved, ask=lambda question: True)
    assert review.get_state(restored, 0) == "accepted"

    # a new run on the same scan: the earlier review is backed up before the new findings hide it
    finished_run(tmp_path / "second run")
    (tmp_path / "second run" / "sub-01.mrk.json").write_text(
        (tmp_path / "second run" / "sub-01.mrk.json").read_text().replace('"CMB-3"', '"CMB-3 "'))
    logic.load_results(tmp_path / "second run", "sub-01", autosave_dir=folder)
    assert len(list(folder.glob("sub-01.autosave.mrk.json.bak-*"))) == 1


# ---- extension description files -----------------------------------------------------------------


def test_s4ext_has_the_required_keys():
    text = (ROOT / "CMBDetector.s4ext").read_text()
    entries = dict(line.split(" ", 1) for line in text.splitlines() if line.strip() and not line.startswith("#")
                   and " " in line)
    for key in ("scm", "scmurl", "scmrevision", "depends", "homepage", "contributors", "category", "iconurl",
                "description", "screenshoturls", "enabled", "status"):
        assert key in entries, key
    assert "PyTorch" in entries["depends"]


def test_catalog_entry_has_the_required_keys():
    entry = json.loads((ROOT / "CMBDetector.json").read_text())
    for key in ("$schema", "category", "scm_url", "scm_revision", "build_dependencies", "tier"):
        assert key in entry, key
    assert entry["build_dependencies"] == ["PyTorch"]
    # schema v1.0.2 has additionalProperties: false
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies", "dicom_support_rule",
               "build_subdirectory", "enabled", "tier"}
    assert set(entry) <= allowed
    assert isinstance(entry["tier"], int) and 1 <= entry["tier"] <= 5
    assert entry["scm_url"].startswith("https://")


def test_cmake_files_name_the_module_and_its_scripts():
    top = (ROOT / "CMakeLists.txt").read_text()
    for token in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_DEPENDS PyTorch", "find_package(Slicer REQUIRED)",
                  "include(${Slicer_USE_FILE})", "add_subdirectory(CMBDetector)",
                  "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert token in top, token
    module_cmake = (ROOT / "CMBDetector" / "CMakeLists.txt").read_text()
    for token in ("slicerMacroBuildScriptedModule", "GLOB_RECURSE", "CMBDetectorLib", "Resources/UI/${MODULE_NAME}.ui",
                  "Resources/Icons/${MODULE_NAME}.png", "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)"):
        assert token in module_cmake, token
    for icon in (ROOT / "CMBDetector" / "Resources" / "Icons" / "CMBDetector.png", ROOT / "Resources" / "CMBDetector.png"):
        assert icon.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_sample_scan_lesions_are_dark_where_the_truth_points_sit(module, mrml):
    """load_sample_scan end to end (about 45 s: one simulated SWI scan in a `cmbdetector synth` process, read
    back with Slicer's volumes logic): the magnitude node, the truth
    markups and a labelmap of the truth lesions must agree, i.e. voxel order and IJK->RAS are right."""
    import numpy as np
    import slicer

    from CMBDetectorLib import review

    pytest.importorskip("CMBDetectorLib.simulate.synth")
    logic = module.CMBDetectorLogic(scene=mrml.scene, markups_logic=mrml.markups_logic,
                                    volumes_logic=mrml.volumes_logic)
    magnitude = logic.load_sample_scan(seed=7)  # `cmbdetector synth` in a background process, files removed
    phase = mrml.scene.GetNodeByID(magnitude.GetAttribute("CMBDetector.phaseNodeID"))
    truth = mrml.scene.GetNodeByID(magnitude.GetAttribute("CMBDetector.truthNodeID"))
    assert phase is not None and truth.GetNumberOfControlPoints() > 0
    assert not truth.GetDisplayNode().GetVisibility()
    labelmap = logic.export_labelmap(truth, magnitude)
    image = slicer.util.arrayFromVolume(magnitude)  # (K, J, I)
    lesions = slicer.util.arrayFromVolume(labelmap)
    assert lesions.shape == image.shape
    brain = image > np.percentile(image, 60)  # bright tissue, roughly the brain
    darker = 0
    for row in review.review_table(truth):
        inside = lesions == row["index"] + 1
        assert inside.any(), row["label"]
        darker += np.median(image[inside]) < np.median(image[brain])
    # microbleeds are hypointense on SWI: most lesions must be darker than brain tissue at their spot
    assert darker >= 0.8 * truth.GetNumberOfControlPoints()


def test_extension_metadata_agrees_everywhere_and_screenshots_exist():
    """CMakeLists.txt, CMBDetector.s4ext, CMBDetector.json and the module name the same category (one the
    Extensions Index uses), homepage and contributors; every screenshot URL names a file in this repo."""
    cmake = (ROOT / "CMakeLists.txt").read_text()
    s4ext = dict(line.split(" ", 1) for line in (ROOT / "CMBDetector.s4ext").read_text().splitlines()
                 if line.strip() and not line.startswith("#") and " " in line)
    catalog = json.loads((ROOT / "CMBDetector.json").read_text())

    def cmake_value(key):
        return re.search(rf'set\({key} "([^"]*)"\)', cmake).group(1)

    category = cmake_value("EXTENSION_CATEGORY")
    assert category in ("Segmentation", "Quantification", "Neuroimaging")  # used by extensions in the index
    assert s4ext["category"] == catalog["category"] == category
    assert f'"{category}")]' in MODULE_FILE.read_text()
    assert s4ext["homepage"] == cmake_value("EXTENSION_HOMEPAGE")
    assert s4ext["contributors"] == cmake_value("EXTENSION_CONTRIBUTORS") == "CMBDetector developers"
    assert s4ext["scmurl"] == catalog["scm_url"]
    screenshots = cmake_value("EXTENSION_SCREENSHOTURLS").split()
    assert screenshots == s4ext["screenshoturls"].split() and screenshots
    for url in screenshots + [cmake_value("EXTENSION_ICONURL"), s4ext["iconurl"]]:
        relative = url.split("/main/", 1)[1]
        assert (ROOT / relative).is_file(), url
