"""CMBDetector: find cerebral microbleeds on GRE/SWI and review each finding in 3D Slicer.

The module holds only Slicer glue. Review decisions (states, threshold, counts, exports) live in
CMBDetectorLib/review.py; detection runs as a separate process (`PythonSlicer -m CMBDetectorLib.cli
detect ...`) so the GUI stays responsive and a crash or Cancel cannot take Slicer down.

The Qt layer (Widget, shortcuts, timers) needs `qt` and the application's `slicer` parts: Slicer's
PythonQt, or PySide6 with the stand-ins of Testing/slicer_qt_standins.py. It uses idioms both accept
(signal attributes, setters). Everything else (DetectionRequest, BackgroundProcess, CMBDetectorLogic)
also imports with the bare `slicer-core` wheel, where `qt`, `slicer.ScriptedLoadableModule` and
`slicer.parameterNodeWrapper` do not exist: those imports are guarded below, so batch scripts and
the tests can use the Logic on real MRML without the application.
"""

import datetime
import json
import logging
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import slicer

try:  # the Slicer desktop application
    import qt
    from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode
    from slicer.i18n import tr as _
    from slicer.i18n import translate
    from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
    from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                               ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
    from slicer.util import VTKObservationMixin

    HAVE_SLICER_GUI = True
except ImportError:  # slicer-core (pytest, batch scripts): MRML without Qt; only the Logic is usable
    HAVE_SLICER_GUI = False
    qt = None
    vtkMRMLLabelMapVolumeNode = vtkMRMLMarkupsFiducialNode = vtkMRMLScalarVolumeNode = object

    def _(text):
        return text

    def translate(context, text):
        return text

    def parameterNodeWrapper(cls):
        return cls

    def WithinRange(low, high):
        return (low, high)

    def Choice(values):
        return tuple(values)

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=None):
            logging.info(message)

    class VTKObservationMixin:
        def __init__(self):
            pass

MODULE_DIR = Path(__file__).resolve().parent
if str(MODULE_DIR) not in sys.path:  # CMBDetectorLib sits beside this file in the installed extension
    sys.path.insert(0, str(MODULE_DIR))

from CMBDetectorLib import __version__, autosave, dependencies, outputs, review, vocabulary  # noqa: E402
from CMBDetectorLib.errors import CMBError, InputError  # noqa: E402

TORCH_REQUIREMENT = dependencies.PROTECTED_REQUIREMENTS["torch"]  # what the PyTorch extension must provide
DEVICES = ("auto", "cpu", "cuda")


# =============================================================================================
# Module
# =============================================================================================

class CMBDetector(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("CMB Detector")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Quantification")]
        self.parent.dependencies = ["Markups", "Volumes"]
        self.parent.contributors = ["CMBDetector developers"]
        self.parent.helpText = _(
            "Finds cerebral microbleeds on GRE/SWI brain MRI and lets you review every finding: "
            "N / P next and previous finding, A accept, X reject, Q back to pending, U undo; place a point "
            "to add a missed lesion. "
            "Exports counts by location (lobar / deep / infratentorial), a CSV, a JSON report and a "
            "labelmap of accepted lesions. Not a medical device: research use only. "
            "Version {version}.").format(version=__version__)
        self.parent.acknowledgementText = _(
            "Two-stage design after Dou et al. 2016 and Al-Masni et al. 2020; built on MONAI and PyTorch.")
        if HAVE_SLICER_GUI:
            slicer.app.startupCompleted.connect(registerSampleData)


def registerSampleData() -> None:
    """List the simulated sample scan in the Sample Data module. Nothing is downloaded: choosing it opens
    this module and simulates the scan in the background, as *Load sample scan* does."""
    try:
        import SampleData
    except ImportError:  # the Sample Data module is disabled
        return

    def simulateInTheBackground(source=None):
        slicer.util.selectModule("CMBDetector")
        slicer.modules.CMBDetectorWidget.onLoadSample()

    try:
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category="CMBDetector", sampleName="CMBSimulatedSWI", uris=["cmbdetector://simulated-swi"],
            fileNames=["CMBSimulatedSWI.nii.gz"], nodeNames=["CMBSimulatedSWI"], loadFiles=[False],
            thumbnailFileName=str(MODULE_DIR / "Resources" / "Icons" / "CMBDetector.png"),
            customDownloader=simulateInTheBackground)
    except TypeError as error:  # an older Sample Data module without customDownloader
        logging.info("CMBDetector: sample scan not registered with Sample Data (%s)", error)


# =============================================================================================
# Parameter node
# =============================================================================================

@parameterNodeWrapper
class CMBDetectorParameterNode:
    """inputVolume: GRE magnitude or SWI; phaseVolume, maskVolume optional; findings: the review node."""

    inputVolume: vtkMRMLScalarVolumeNode
    phaseVolume: vtkMRMLScalarVolumeNode
    maskVolume: vtkMRMLLabelMapVolumeNode
    findings: vtkMRMLMarkupsFiducialNode
    threshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    device: Annotated[str, Choice(DEVICES)] = "auto"
    partialBrain: bool = False
    flipPhase: bool = False  # the phase uses the opposite sign convention (`detect --flip-phase`)
    sampleSeed: Annotated[int, WithinRange(0, 999999)] = 7
    reader: str = ""


# =============================================================================================
# Background detection process (no Qt: the widget polls it with a QTimer, tests call wait())
# =============================================================================================

@dataclass
class DetectionRequest:
    """One `cmbdetector detect` run. Paths are files on disk (NIfTI or anything io.read_volume reads)."""

    input_path: Path
    out_dir: Path
    phase_path: Optional[Path] = None
    mask_path: Optional[Path] = None
    threshold: Optional[float] = None
    device: str = "auto"
    crop: bool = False  # a partial-brain crop: no head-size check, no atlas locations
    flip_phase: bool = False  # the phase's sign convention is the opposite of the CNN's
    work_dir: Optional[Path] = None  # a temporary folder holding the inputs and outputs, removed after loading

    def arguments(self) -> list:
        """The `detect` subcommand's arguments (after `-m CMBDetectorLib.cli`)."""
        arguments = ["detect", str(self.input_path), "--out", str(self.out_dir)]
        if self.phase_path:
            arguments += ["--phase", str(self.phase_path)] + (["--flip-phase"] if self.flip_phase else [])
        if self.mask_path:
            arguments += ["--mask", str(self.mask_path)]
        if self.threshold is not None:
            arguments += ["--threshold", f"{float(self.threshold):g}"]
        if self.device:
            arguments += ["--device", self.device]  # the reader's choice, "auto" included
        if self.crop:
            arguments.append("--crop")
        return arguments

    @property
    def stem(self) -> str:
        """The stem the CLI names its outputs after (the same rule: vocabulary.stem_of)."""
        return vocabulary.stem_of(self.input_path)


_PERCENT = re.compile(r"(\d{1,3}(?:\.\d+)?)\s*%")
_STEP = re.compile(r"\[\s*(\d+)\s*/\s*(\d+)\s*\]|\b(?:step|stage)\s+(\d+)\s*(?:/|of)\s*(\d+)", re.IGNORECASE)


def parse_progress(line: str) -> Optional[float]:
    """Progress in [0, 1] announced by a line such as "42%", "[3/6] classify" or "stage 2 of 5"."""
    match = _PERCENT.search(line)
    if match:
        return min(float(match.group(1)) / 100.0, 1.0)
    match = _STEP.search(line)
    if match:
        done, total = (int(g) for g in match.groups() if g is not None)
        return min(done / total, 1.0) if total else None
    return None


class BackgroundProcess:
    """A running command whose merged stdout/stderr is read by a thread into a queue.

    poll() returns the lines printed since the last call (never blocks); cancel() kills the whole process
    tree (PythonSlicer may start children: killing the launcher alone would leave the worker running).
    """

    def __init__(self, command: list, env: Optional[dict] = None, launcher=None):
        self.command = [str(c) for c in command]
        self.progress = 0.0
        self.lines: list = []
        self.cancelled = False
        self._queue: queue.Queue = queue.Queue()
        launcher = launcher or _popen
        self.process = launcher(self.command, env)
        self._reader = threading.Thread(target=self._read_output, daemon=True)
        self._reader.start()

    def _read_output(self) -> None:
        for line in iter(self.process.stdout.readline, ""):
            self._queue.put(line.rstrip("\n"))
        self.process.stdout.close()

    def poll(self) -> list:
        new_lines = []
        while True:
            try:
                new_lines.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for line in new_lines:
            progress = parse_progress(line)
            if progress is not None:
                self.progress = max(self.progress, progress)
        self.lines.extend(new_lines)
        return new_lines

    @property
    def returncode(self) -> Optional[int]:
        """None while running (or while output is still being read)."""
        if self.process.poll() is None or self._reader.is_alive():
            return None
        return self.process.returncode

    @property
    def running(self) -> bool:
        return self.returncode is None

    def wait(self, timeout_s: Optional[float] = None) -> int:
        """Block until the process ends (tests, batch use). Cancels and raises CMBError on timeout."""
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.cancel()
            raise CMBError(f"detection did not finish within {timeout_s:.0f} s and was cancelled") from None
        self._reader.join(timeout=10)
        self.poll()
        return self.process.returncode

    def cancel(self) -> None:
        """Kill the process and all its descendants (children first, so none is re-parented and missed)."""
        import psutil

        self.cancelled = True
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        for process in children:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        self.process.kill()  # through Popen, so that Popen (not psutil) reaps it and keeps its exit code
        self.process.wait(timeout=10)
        psutil.wait_procs(children, timeout=5)


def _check_finished(process, returncode: int, what: str) -> None:
    if returncode != 0:
        tail = "\n".join(process.lines[-5:])
        raise CMBError(f"{what} failed (exit code {returncode}):\n{tail}")


def _popen(command: list, env: Optional[dict]):
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=env)


# =============================================================================================
# Logic (no Qt)
# =============================================================================================

class CMBDetectorLogic(ScriptedLoadableModuleLogic):
    """Detection runs and review actions. Usable from the Python console, the self-test and pytest.

    scene / markups_logic: default to Slicer's (slicer.mrmlScene, the Markups module logic); pass them
    explicitly when running on slicer-core.
    """

    def __init__(self, scene=None, markups_logic=None, volumes_logic=None, reviews_root=None):
        ScriptedLoadableModuleLogic.__init__(self)
        self.scene = scene if scene is not None else getattr(slicer, "mrmlScene", None)
        self._markups_logic = markups_logic
        self._volumes_logic = volumes_logic
        self._reviews_root = Path(reviews_root) if reviews_root else None

    def getParameterNode(self):
        return CMBDetectorParameterNode(super().getParameterNode())

    @property
    def markups_logic(self):
        if self._markups_logic is None:
            self._markups_logic = slicer.modules.markups.logic()
        return self._markups_logic

    @property
    def volumes_logic(self):
        if self._volumes_logic is None:
            self._volumes_logic = slicer.modules.volumes.logic()
        return self._volumes_logic

    # ---- dependencies ---------------------------------------------------------------------

    @staticmethod
    def install_plan(groups=("detect",)) -> dependencies.InstallPlan:
        """What installing the packages for `groups` ("detect", "sample", "cancel") would do here."""
        return dependencies.plan_for_this_python(groups)

    def ensure_dependencies(self, ask=None, groups=("detect",)) -> bool:
        """Install what the features in `groups` need, after asking. True when nothing is missing.

        ask(message) -> bool asks the user; without it nothing is installed. PyTorch comes from the
        PyTorch extension (it picks a CUDA or CPU build); the rest is pip-installed pinned and with
        --no-deps (see CMBDetectorLib/dependencies.py), never touching what Slicer ships.
        """
        plan = self.install_plan(groups)
        if plan.complete:
            return True
        torch_missing = "detect" in groups and dependencies.installed_versions(["torch"])["torch"] is None
        question = _("CMB Detector needs these Python packages (exact versions, installed without touching "
                     "Slicer's own packages):\n{plan}{torch}\nDownload and install them now?").format(
            plan=plan.describe(), torch=_("\nPyTorch, through the PyTorch extension") if torch_missing else "")
        if ask is None or not ask(question):
            return False
        if torch_missing:
            self._install_torch()
            plan = self.install_plan(groups)
        if plan.protected_problems:
            raise CMBError("\n".join(plan.protected_problems))
        self._pip_install(plan)
        return self.install_plan(groups).complete

    @staticmethod
    def _install_torch() -> None:
        try:
            import PyTorchUtils
        except ImportError:
            raise CMBError("PyTorch is missing: install the 'PyTorch' extension from the Extensions Manager, "
                           "restart Slicer and try again") from None
        torch_logic = PyTorchUtils.PyTorchUtilsLogic()
        if not torch_logic.torchInstalled():
            if torch_logic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT) is None:
                raise CMBError("PyTorch installation did not complete")

    @staticmethod
    def _pip_install(plan: dependencies.InstallPlan) -> None:
        """pip install the plan with Slicer's pip (5.10 and 5.12 both have slicer.util.pip_install;
        slicer.packaging.pip_ensure on 5.12 resolves dependencies, which is what must not happen)."""
        import importlib

        with tempfile.TemporaryDirectory(prefix="CMBDetector-pip-") as folder:
            constraints = Path(folder) / "slicer-constraints.txt"
            constraints.write_text("\n".join(plan.constraints) + "\n")
            slicer.util.pip_install(plan.pip_arguments(str(constraints)))
        importlib.invalidate_caches()

    # ---- detection --------------------------------------------------------------------------

    @staticmethod
    def python_executable() -> str:
        """PythonSlicer inside Slicer (same packages as the application), else this interpreter."""
        return shutil.which("PythonSlicer") or sys.executable

    def detection_command(self, request: DetectionRequest) -> list:
        return [self.python_executable(), "-m", "CMBDetectorLib.cli", *request.arguments()]

    @staticmethod
    def detection_environment() -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(MODULE_DIR), env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"  # progress lines arrive as they are printed
        return env

    def write_volume(self, volume_node, path) -> Path:
        """Write a volume node to `path` (e.g. .nii.gz) with its default storage node (LPS on disk)."""
        path = Path(path)
        storage = volume_node.CreateDefaultStorageNode()
        storage.SetFileName(str(path))
        if not storage.WriteData(volume_node):
            raise CMBError(f"could not write {volume_node.GetName()} to {path}")
        return path

    @staticmethod
    def new_work_directory() -> Path:
        """A fresh folder for one run's files: Slicer's own temp folder in the application (so Slicer's
        temp cleanup covers it), the system's elsewhere (slicer-core batch use)."""
        if HAVE_SLICER_GUI:
            return Path(slicer.util.tempDirectory(key="CMBDetector-"))
        return Path(tempfile.mkdtemp(prefix="CMBDetector-"))

    def prepare_request(self, input_node, phase_node=None, mask_node=None, threshold=review.DETECTION_FLOOR,
                        device="auto", work_dir=None, crop=False, flip_phase=False) -> DetectionRequest:
        """Write the selected nodes to a work folder and describe the run. Without `work_dir` the folder is
        a new temporary one, removed by remove_work_directory once the findings are loaded."""
        if input_node is None or input_node.GetImageData() is None:
            raise InputError("select a GRE or SWI volume first")
        temporary = work_dir is None
        work_dir = Path(work_dir) if work_dir else self.new_work_directory()
        work_dir.mkdir(parents=True, exist_ok=True)
        stem = vocabulary.safe_stem(input_node.GetName())
        return DetectionRequest(
            input_path=self.write_volume(input_node, work_dir / f"{stem}.nii.gz"),
            out_dir=work_dir / "output",
            phase_path=self.write_volume(phase_node, work_dir / f"{stem}_phase.nii.gz") if phase_node else None,
            mask_path=self.write_volume(mask_node, work_dir / f"{stem}_mask.nii.gz") if mask_node else None,
            threshold=threshold, device=device, crop=crop, flip_phase=flip_phase,
            work_dir=work_dir if temporary else None)

    @staticmethod
    def remove_work_directory(request) -> None:
        """Delete the request's temporary folder (patient data: nothing is left behind once loaded)."""
        if request is not None and request.work_dir is not None:
            shutil.rmtree(request.work_dir, ignore_errors=True)

    def start_cli(self, arguments: list) -> BackgroundProcess:
        """Start `python -m CMBDetectorLib.cli ARGUMENTS` in the background; poll the returned process."""
        command = [self.python_executable(), "-m", "CMBDetectorLib.cli", *arguments]
        environment = self.detection_environment()
        launcher = None
        if HAVE_SLICER_GUI:  # PythonSlicer needs Slicer's launcher environment
            def launcher(command, env):
                return slicer.util.launchConsoleProcess(command, updateEnvironment={
                    "PYTHONPATH": env["PYTHONPATH"], "PYTHONUNBUFFERED": "1"})
        logging.info("CMBDetector: %s", " ".join(command))
        return BackgroundProcess(command, environment, launcher)

    def start_detection(self, request: DetectionRequest) -> BackgroundProcess:
        """Start `cmbdetector detect` in the background; poll the returned process."""
        request.out_dir.mkdir(parents=True, exist_ok=True)
        return self.start_cli(request.arguments())

    def run_detection(self, request: DetectionRequest, timeout_s: float = 1800.0):
        """Blocking path (tests, batch): run, then load the findings. Returns the markups node."""
        process = self.start_detection(request)
        _check_finished(process, process.wait(timeout_s), "detection")
        node = self.load_results(request.out_dir, request.stem)
        self.remove_work_directory(request)
        return node

    def load_results(self, out_dir, stem: Optional[str] = None, name: Optional[str] = None, ask=None,
                     autosave_dir=None):
        """Load OUT_DIR/STEM.mrk.json (regions from STEM.csv when needed) as a styled review node, with the
        run's provenance and review start threshold (from STEM.json) kept on the node, so that nothing
        needs the run's folder afterwards.

        Only a finished run is loaded: one whose STEM.json summary (written last) exists.
        Review autosave (autosave.py): the node autosaves to STEM.autosave.mrk.json in `autosave_dir`
        (default: OUT_DIR; another folder gets a copy of the findings and summary first). When a
        restorable autosave is there, ask(question) -> True loads it instead of the detector's findings.
        """
        out_dir = Path(out_dir)
        candidates = [out_dir / (stem + vocabulary.MARKUPS_SUFFIX)] if stem else []
        candidates += outputs.findings_files(out_dir)
        existing = [path for path in candidates if path.is_file()]
        if not existing:
            raise CMBError(f"detection wrote no .mrk.json file in {out_dir}")
        run_stem = vocabulary.output_stem(existing[0])
        if not outputs.result_is_complete(out_dir, run_stem):
            raise CMBError(f"{existing[0]} is not a finished run: its summary {run_stem}{vocabulary.SUMMARY_SUFFIX} "
                           "(written last) is missing, so the run was stopped or is still writing; not loaded")
        summary = self.run_summary(out_dir, run_stem)
        findings = existing[0]
        if autosave_dir is not None and Path(autosave_dir).resolve() != out_dir.resolve():
            findings = self._keep_findings(out_dir, run_stem, Path(autosave_dir))
        saved = autosave.autosave_path(findings)
        source = findings
        if autosave.is_restorable(saved) and ask is not None:
            if ask(self.restore_question(saved)):
                source = saved
            else:  # kept aside: this node's own autosave must not overwrite it
                autosave.decline(saved)
        node = review.load_findings_markups(self.markups_logic, self.scene, source, name=name or f"CMB {run_stem}")
        node.SetAndObserveStorageNodeID(None)  # the file lives in a temporary folder: Save must ask where to write
        review.record_detection_run(node, summary)
        node.SetAttribute(autosave.AUTOSAVE_ATTRIBUTE, str(saved))
        return node

    # ---- review autosave (autosave.py) ------------------------------------------------------

    @property
    def reviews_root(self) -> Path:
        """Where the module's own runs keep their findings and review autosaves, one folder per input scan:
        beside Slicer's temporary folders (not removed when a run's temporary folder is)."""
        if self._reviews_root is None:
            base = getattr(getattr(slicer, "app", None), "temporaryPath", None) or tempfile.gettempdir()
            self._reviews_root = Path(base) / "CMBDetectorReviews"
        return self._reviews_root

    def reviews_directory(self, input_node) -> Path:
        """The folder of one input scan's findings and autosave, named by its voxels and geometry, so the
        same scan loaded again (any node name) finds its review."""
        volume = review.volume_from_volume_node(input_node)
        return self.reviews_root / autosave.volume_fingerprint(volume.array, volume.affine)

    @staticmethod
    def _keep_findings(out_dir: Path, stem: str, folder: Path) -> Path:
        """Copy a run's findings and summary (summary last) into `folder`; a restorable autosave there
        from an earlier run on the same scan is backed up first (the new findings would hide it)."""
        folder.mkdir(parents=True, exist_ok=True)
        findings = folder / (stem + vocabulary.MARKUPS_SUFFIX)
        previous = autosave.autosave_path(findings)
        if autosave.is_restorable(previous) and (out_dir / (stem + vocabulary.MARKUPS_SUFFIX)).read_bytes() != findings.read_bytes():
            outputs.backup_review(previous)
        writers = {suffix: (folder / (stem + suffix), lambda path, suffix=suffix: shutil.copyfile(out_dir / (stem + suffix), path))
                   for suffix in (vocabulary.MARKUPS_SUFFIX, vocabulary.SUMMARY_SUFFIX)}
        outputs.write_all(writers, folder, summary_key=vocabulary.SUMMARY_SUFFIX)
        return findings

    @staticmethod
    def restore_question(saved) -> str:
        saved = Path(saved)
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(saved.stat().st_mtime))
        return _("An unfinished review of {name} was saved automatically at {when}. Restore it? "
                 "(No keeps it aside and starts from the detector's findings.)").format(
            name=vocabulary.output_stem(saved.name[: -len(vocabulary.AUTOSAVE_SUFFIX)] + vocabulary.MARKUPS_SUFFIX),
            when=when)

    @staticmethod
    def autosave(node) -> Optional[Path]:
        """Write the review node's autosave (see load_results); None for nodes without one."""
        path = node.GetAttribute(autosave.AUTOSAVE_ATTRIBUTE) if node is not None else None
        if not path or not review.is_review_node(node) or not Path(path).parent.is_dir():
            return None  # not a loaded run's node, or its folder is gone (a temporary run folder, removed)
        return autosave.write_autosave(node, path)

    def restorable_reviews(self) -> list:
        """Restorable autosaves of the module's own runs, newest first (offered when the module starts)."""
        return autosave.restorable_autosaves(self.reviews_root)

    def restorable_review_for(self, input_node) -> Optional[Path]:
        """The restorable autosave of this input scan, if any."""
        if input_node is None or input_node.GetImageData() is None:
            return None
        folder = self.reviews_directory(input_node)
        found = autosave.restorable_autosaves(folder.parent) if folder.is_dir() else []
        return next((path for path in found if path.parent == folder), None)

    def restore_review(self, saved, ask):
        """Offer a restorable autosave: ask -> True loads it (returns the node); False sets it aside."""
        saved = Path(saved)
        if not ask(self.restore_question(saved)):
            autosave.decline(saved)
            return None
        return self.load_results(saved.parent, saved.name[: -len(vocabulary.AUTOSAVE_SUFFIX)], ask=lambda question: True)

    @staticmethod
    def run_summary(out_dir, stem: str) -> dict:
        """The run's summary (OUT_DIR/STEM.json, written by `cmbdetector detect`); {} when absent."""
        import json

        try:
            summary = json.loads((Path(out_dir) / (stem + vocabulary.SUMMARY_SUFFIX)).read_text())
        except (OSError, ValueError):
            return {}
        return summary if isinstance(summary, dict) else {}

    # ---- sample data (simulated: no download) ---------------------------------------------

    SAMPLE_ACQUISITION = "swi3t"

    @classmethod
    def sample_arguments(cls, seed: int, out_dir) -> list:
        """`cmbdetector synth` arguments for one sample scan with microbleeds (the same seed, the same scan)."""
        return ["synth", "--out", str(out_dir), "--n", "1", "--seed", str(int(seed)),
                "--acquisition", cls.SAMPLE_ACQUISITION, "--cmb-free-fraction", "0"]

    def start_sample(self, seed: int, out_dir) -> BackgroundProcess:
        """Simulate the sample scan in the background (about 45 s): the GUI stays responsive."""
        return self.start_cli(self.sample_arguments(seed, out_dir))

    def load_sample_files(self, out_dir):
        """Add the simulated magnitude (returned), phase and hidden ground-truth points from OUT_DIR."""
        import json

        from CMBDetectorLib.findings import Finding

        truth_files = sorted(Path(out_dir).glob("*.truth.json"))
        if not truth_files:
            raise CMBError(f"the simulator wrote no scan in {out_dir}")
        truth_document = json.loads(truth_files[0].read_text())
        scan_id = truth_files[0].name[: -len(".truth.json")]
        files = {key: Path(out_dir) / name for key, name in truth_document["files"].items()}
        magnitude = self.volumes_logic.AddArchetypeVolume(str(files["magnitude"]), scan_id)
        phase = self.volumes_logic.AddArchetypeVolume(str(files["phase"]), f"{scan_id}_phase")
        if magnitude is None or phase is None:
            raise CMBError(f"Slicer could not read the simulated scan in {out_dir}")
        for node in (magnitude, phase):
            node.SetAndObserveStorageNodeID(None)  # the files are temporary: they are removed after loading
        truth_findings = [Finding(label=f"truth-{cmb['id']}", position_ras=tuple(cmb["center_ras"]), score=1.0,
                                  diameter_mm=cmb.get("apparent_diameter_mm", float("nan")),
                                  region=cmb.get("region", "unknown"), lobe=cmb.get("lobe", ""),
                                  status=vocabulary.ACCEPTED)
                          for cmb in truth_document.get("microbleeds", [])]
        truth = review.findings_to_markups_node(self.scene, truth_findings, f"{scan_id} truth")
        truth.GetDisplayNode().SetVisibility(False)  # reveal it after reviewing, to check yourself
        magnitude.SetAttribute("CMBDetector.phaseNodeID", phase.GetID())
        magnitude.SetAttribute("CMBDetector.truthNodeID", truth.GetID())
        return magnitude

    def load_sample_scan(self, seed: int = 7, timeout_s: float = 600.0):
        """Blocking path (self-test, batch): simulate in a process, load, remove the files."""
        out_dir = self.new_work_directory()
        try:
            process = self.start_sample(seed, out_dir)
            _check_finished(process, process.wait(timeout_s), "the sample simulation")
            return self.load_sample_files(out_dir)
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)

    # ---- review (all decisions in review.py) ------------------------------------------------

    def set_state(self, node, index: int, state: str) -> int:
        """Record a decision; returns the index to show next: the next visible pending point, else the
        next visible point, else -1."""
        review.set_state(node, index, state)
        return review.next_index(node, index, +1, pending_first=True)

    def accept(self, node, index: int) -> int:
        return self.set_state(node, index, vocabulary.ACCEPTED)

    def reject(self, node, index: int) -> int:
        return self.set_state(node, index, vocabulary.REJECTED)

    @staticmethod
    def step(node, index: int, step: int) -> int:
        return review.next_index(node, index, step)

    @staticmethod
    def apply_threshold(node, threshold: float) -> int:
        """Hide findings below `threshold` in a review node; any other node is left as it is."""
        return review.apply_threshold(node, threshold) if review.is_review_node(node) else 0

    @staticmethod
    def adopt(node):
        """The reader's explicit choice to review a node the detector did not make."""
        return review.adopt_node(node)

    @staticmethod
    def review_table(node) -> list:
        return review.review_table(node)

    @staticmethod
    def counts_text(node) -> str:
        """One line for the panel, e.g. "3 accepted, 1 rejected, 0 added, 2 pending, 4 below threshold |
        confirmed: lobar 2, deep 1, ..."."""
        counts = review.review_counts(node)
        states = ", ".join(f"{counts[s]} {s}" for s in (vocabulary.ACCEPTED, vocabulary.REJECTED, vocabulary.ADDED,
                                                         vocabulary.PENDING))
        states += f", {counts[vocabulary.BELOW_THRESHOLD]} below threshold"
        regions = ", ".join(f"{region} {counts['by_region'][region]['confirmed']}"
                            for region in ("lobar", "deep", "infratentorial"))
        return f"{states} | confirmed: {regions}"

    def jump_to(self, node, index: int) -> None:
        """Centre the slice views on point `index`."""
        if 0 <= index < node.GetNumberOfControlPoints():
            self.markups_logic.JumpSlicesToNthPointInMarkup(node.GetID(), index, True)

    def export(self, node, out_dir, reader: str = "", input_node=None, threshold=None, keep_scan: bool = False,
               phase_node=None, crop: bool = False) -> dict:
        """Write STEM_review.csv / STEM_review.json (+ STEM_accepted.nii.gz when input_node is given).

        keep_scan: also write the scan beside its review (STEM.nii.gz, STEM_phase.nii.gz), named in the
        review JSON, so that the folder can teach a site model (`cmbdetector finetune --reviews`), which reads
        the phase as the detection run did (its provenance says whether the phase's sign was reversed)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = vocabulary.safe_stem(node.GetName(), default="findings")
        written = {"csv": out_dir / (stem + vocabulary.REVIEW_CSV_SUFFIX),
                   "json": out_dir / (stem + vocabulary.REVIEW_JSON_SUFFIX)}
        scan_files = {"crop": True} if crop and keep_scan else {}
        if keep_scan and input_node is not None:
            written["volume"] = self.write_volume(input_node, out_dir / f"{stem}.nii.gz")
            scan_files["volume"] = written["volume"].name
            if phase_node is not None:
                written["phase"] = self.write_volume(phase_node, out_dir / f"{stem}_phase.nii.gz")
                scan_files["phase"] = written["phase"].name
        review.export_review(node, written["csv"], written["json"], reader=reader,
                             input_name=input_node.GetName() if input_node else "",
                             detection_run=review.detection_run(node), threshold=threshold, extra=scan_files)
        if input_node is not None:
            labelmap = self.export_labelmap(node, input_node)
            written["labelmap"] = self.write_volume(labelmap, out_dir / (stem + vocabulary.ACCEPTED_LABELMAP_SUFFIX))
        return written

    def export_labelmap(self, node, reference_volume_node, radius_mm: float = 1.5):
        return review.export_accepted_labelmap(self.scene, node, reference_volume_node, radius_mm)

    @staticmethod
    def set_review_complete(node, complete: bool = True) -> None:
        """The reader read the whole scan (refused while a shown finding is pending); see review.py."""
        review.set_review_complete(node, complete)

    # ---- site models (issue #16): the Model section; all bookkeeping in CMBDetectorLib/models.py --------

    @staticmethod
    def active_model_text() -> str:
        """One line on the model detection uses now: its version, hash and, for a site model, its base."""
        from CMBDetectorLib import models

        row = models.describe(models.active_version())
        if not row["ok"]:
            return _("Active model: {name} (cannot be used: {problem})").format(name=row["name"],
                                                                             problem=row["problem"])
        text = _("Active model: {name} (SHA-256 {sha}...)").format(name=row["name"], sha=row["sha256"][:12])
        return text + (_(", fine-tuned from {base}").format(base=row["base"]) if row.get("base") else "")

    @staticmethod
    def new_version_name() -> str:
        return datetime.datetime.now().strftime("site-%Y%m%d-%H%M%S")

    @staticmethod
    def finetune_arguments(reviews_dir, version: str) -> list:
        """The fine-tune's defaults (finetune --layers head: the last layer of each network refitted)."""
        return ["finetune", "--reviews", str(reviews_dir), "--out-version", version]

    def start_finetune(self, reviews_dir, version: str) -> BackgroundProcess:
        """`cmbdetector finetune` in the background, through the same runner as detection; poll it."""
        if not Path(reviews_dir).is_dir():
            raise InputError(f"choose the folder of exported reviews first (not found: {reviews_dir})")
        return self.start_cli(self.finetune_arguments(reviews_dir, version))

    @staticmethod
    def finetune_result(process) -> dict:
        """The RESULT line of a finished fine-tune: version, before/after held-out numbers, refusal."""
        for line in reversed(process.lines):
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT "):])
        raise CMBError("the fine-tune reported no result:\n" + "\n".join(process.lines[-5:]))

    @staticmethod
    def finetune_summary(result: dict) -> str:
        before, after = result["before"], result["after"]
        text = _("Held-out reviews ({scans} scans, {lesions} microbleeds): sensitivity {sb:.2f} -> {sa:.2f}, "
                 "false positives per scan {fb:.2f} -> {fa:.2f}.").format(
            scans=before["scans"], lesions=before["microbleeds"], sb=before["sensitivity"], sa=after["sensitivity"],
            fb=before["fp_per_scan"], fa=after["fp_per_scan"])
        if result.get("refused"):
            return text + " " + _("Not activated: {why}").format(why=result["refused"])
        return text + " " + _("Now active: {name}").format(name=result["version"])

    def run_finetune(self, reviews_dir, version: str, timeout_s: float = 3600.0) -> dict:
        """Blocking path (tests, scripts): run the fine-tune and return its result."""
        process = self.start_finetune(reviews_dir, version)
        _check_finished(process, process.wait(timeout_s), "fine-tuning")
        return self.finetune_result(process)

    @staticmethod
    def use_shipped_model() -> str:
        from CMBDetectorLib import models

        return models.use(models.SHIPPED)


# =============================================================================================
# Widget (Qt; thin: every decision is a Logic/review.py call)
# =============================================================================================

class CMBDetectorWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. Qt idioms here are those PythonQt (Slicer) and PySide6 (the test harness) share:
    signal attributes (`button.clicked.connect`), setters (`setEnabled`, `setText`) rather than PythonQt's
    property assignment, and `qt.QTimer.singleShot` for polling."""

    POLL_MS = 200
    # Single keys no Slicer view uses (Slicer's own: r resets the view; arrows, b/f move slices).
    SHORTCUTS = (("A", "onAccept"), ("X", "onReject"), ("N", "onNext"), ("P", "onPrevious"),
                 ("Q", "onPending"), ("U", "onUndo"))
    TABLE_COLUMNS = ("label", "score", "diameter_mm", "region", "lobe", "kept_by", "state")
    FINDINGS_EVENTS = ("PointModifiedEvent", "PointAddedEvent", "PointRemovedEvent", "PointPositionDefinedEvent")

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._observedFindings = None
        self._process = None      # the running background process (detection or sample), if any
        self._onProcessDone = None  # what to do with its output when it succeeds
        self._workDir = None      # its temporary folder, removed when it ends
        self._currentIndex = -1
        self._shortcuts = []
        self._refreshPending = False
        self._fillingTable = False
        self._offeredAutosaves = set()  # offered once per session, whichever way the reader answered

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CMBDetector.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CMBDetectorLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        for button, slot in ((self.ui.detectButton, self.onDetect), (self.ui.cancelButton, self.onCancel),
                             (self.ui.loadSampleButton, self.onLoadSample),
                             (self.ui.checkDependenciesButton, self.onCheckDependencies),
                             (self.ui.previousButton, self.onPrevious), (self.ui.nextButton, self.onNext),
                             (self.ui.acceptButton, self.onAccept), (self.ui.rejectButton, self.onReject),
                             (self.ui.pendingButton, self.onPending), (self.ui.undoButton, self.onUndo),
                             (self.ui.addPointButton, self.onAddPoint), (self.ui.adoptButton, self.onAdopt),
                             (self.ui.exportButton, self.onExport),
                             (self.ui.exportLabelmapButton, self.onExportLabelmap)):
            button.clicked.connect(slot)
        # currentCellChanged follows clicks and arrow keys alike
        self.ui.reviewTable.currentCellChanged.connect(self.onTableCurrentCellChanged)
        self.ui.reviewCompleteCheckBox.clicked.connect(self.onReviewComplete)  # the reader's clicks only
        self.setupModelSection()
        self.ui.thresholdSlider.valueChanged.connect(self.onThresholdChanged)
        self.ui.findingsSelector.currentNodeChanged.connect(self.onFindingsChanged)
        self.ui.inputVolumeSelector.currentNodeChanged.connect(self._refreshSoon)
        self.ui.inputVolumeSelector.currentNodeChanged.connect(self.onInputChanged)
        self.ui.exportDirectoryButton.directory = str(Path.home())

        self.ui.reviewTable.setColumnCount(len(self.TABLE_COLUMNS))
        self.ui.reviewTable.setHorizontalHeaderLabels([_("Label"), _("Score"), _("Size (mm)"), _("Region"),
                                                       _("Lobe"), _("Kept by"), _("State")])
        self.ui.reviewTable.horizontalHeaderItem(self.TABLE_COLUMNS.index("kept_by")).setToolTip(_(
            "networks: scored at or above the threshold by the detector's networks. criteria: the networks "
            "scored it lower, but its patch shows a round, isolated dark spot 3.2-6 mm across, as the rating "
            "scales define a microbleed; it is kept at the threshold for you to judge."))
        self.ui.reviewTable.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)
        self.ui.reviewTable.setSelectionBehavior(qt.QAbstractItemView.SelectRows)
        self.ui.reviewTable.setSelectionMode(qt.QAbstractItemView.SingleSelection)
        self.ui.progressBar.setValue(0)
        self.initializeParameterNode()
        self.offerRestorableReviews()

    # ---- lifecycle ------------------------------------------------------------------------

    def cleanup(self) -> None:
        self.removeObservers()
        self._removeShortcuts()
        self._cancelProcess()

    def enter(self) -> None:
        self.initializeParameterNode()
        self._installShortcuts()

    def exit(self) -> None:
        self._removeShortcuts()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        # a run's result belongs to the scene being closed: never load it into the next one
        self._cancelProcess()
        self.setParameterNode(None)
        self._observeFindings(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self._observeFindings(self._parameterNode.findings)
        self.updateButtons()

    def _installShortcuts(self) -> None:
        self._removeShortcuts()
        for key, slotName in self.SHORTCUTS:
            shortcut = qt.QShortcut(qt.QKeySequence(key), slicer.util.mainWindow())
            shortcut.activated.connect(getattr(self, slotName))
            self._shortcuts.append(shortcut)

    def _removeShortcuts(self) -> None:
        for shortcut in self._shortcuts:
            shortcut.setEnabled(False)  # the main window owns it until deleteLater runs
            shortcut.deleteLater()
        self._shortcuts = []

    # ---- background processes (detection, sample scan) ------------------------------------

    def _startProcess(self, process, workDir, onDone) -> None:
        self._process, self._workDir, self._onProcessDone = process, workDir, onDone
        self.ui.logTextEdit.clear()
        self.appendLog(" ".join(process.command))
        self.ui.progressBar.setValue(0)
        self.updateButtons()
        qt.QTimer.singleShot(self.POLL_MS, self._pollProcess)

    def _pollProcess(self) -> None:
        process = self._process
        if process is None:
            return
        for line in process.poll():
            self.appendLog(line)
        self.ui.progressBar.setValue(int(round(100 * process.progress)))
        self.ui.modelProgressBar.setValue(int(round(100 * process.progress)))
        if process.running:
            qt.QTimer.singleShot(self.POLL_MS, self._pollProcess)
            return
        onDone, workDir = self._onProcessDone, self._workDir
        self._process = self._onProcessDone = self._workDir = None
        try:
            if process.cancelled:
                self.appendLog(_("Cancelled."))
            elif process.returncode != 0:
                slicer.util.errorDisplay(_("The background process failed (exit code {code}). See the log.").format(
                    code=process.returncode))
            else:
                with slicer.util.tryWithErrorDisplay(_("Could not load the results.")):
                    onDone()
                    self.ui.progressBar.setValue(100)
        finally:
            if workDir is not None:
                shutil.rmtree(workDir, ignore_errors=True)  # patient data: nothing stays behind
            self.updateButtons()

    def _cancelProcess(self) -> None:
        if self._process is not None and self._process.running:
            self._process.cancel()

    def onCancel(self) -> None:
        self._cancelProcess()

    def appendLog(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)

    def _ensure(self, groups) -> bool:
        return self.logic.ensure_dependencies(ask=slicer.util.confirmOkCancelDisplay, groups=groups)

    # ---- detection ------------------------------------------------------------------------

    def onCheckDependencies(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Installing dependencies failed."), waitCursor=True):
            if self._ensure(("detect", "sample", "cancel")):
                self.appendLog(_("All dependencies are installed."))

    def onDetect(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Could not start detection."), waitCursor=True):
            if not self._ensure(("detect", "cancel")):
                self.appendLog(_("Detection needs the packages listed above; nothing was installed."))
                return
            request = self.logic.prepare_request(p.inputVolume, p.phaseVolume, p.maskVolume, device=p.device,
                                                 crop=p.partialBrain, flip_phase=p.flipPhase)
            reviewsDir = self.logic.reviews_directory(p.inputVolume)
            self._startProcess(self.logic.start_detection(request), request.work_dir,
                               lambda: self._loadFindings(request, reviewsDir))

    def _loadFindings(self, request, reviewsDir=None) -> None:
        self._showLoaded(self.logic.load_results(request.out_dir, request.stem, ask=self._askRestore,
                                                 autosave_dir=reviewsDir))

    def _showLoaded(self, node) -> None:
        self._parameterNode.findings = node
        start = review.review_start_threshold(node)
        if start is not None:
            self._parameterNode.threshold = start  # the slider is bound to it
        self.onThresholdChanged(self._parameterNode.threshold)
        self.onNext()

    # ---- review autosave: offered back after a crash or a closed scene ------------------------

    def _askRestore(self, question: str) -> bool:
        return bool(slicer.util.confirmYesNoDisplay(question, windowTitle=_("Restore review")))

    def _offerRestore(self, saved) -> None:
        if saved is None or str(saved) in self._offeredAutosaves:
            return
        self._offeredAutosaves.add(str(saved))
        with slicer.util.tryWithErrorDisplay(_("Could not restore the review.")):
            node = self.logic.restore_review(saved, ask=self._askRestore)
            if node is not None:
                self._showLoaded(node)
                self.appendLog(_("Review restored from ") + str(saved))

    def offerRestorableReviews(self) -> None:
        """At module start: offer the newest unfinished review autosave of the module's runs."""
        found = self.logic.restorable_reviews()
        self._offerRestore(found[0] if found else None)

    def onInputChanged(self, node) -> None:
        """The reader selected (or loaded again) a scan: offer its unfinished review, if one was autosaved.
        Later, not now: a selector picks a node as it is added, before the volume's voxels are read in."""
        qt.QTimer.singleShot(0, self._offerRestoreForInput)

    def _offerRestoreForInput(self) -> None:
        node = self.ui.inputVolumeSelector.currentNode()
        if node is not None and self._process is None and self._parameterNode is not None:
            self._offerRestore(self.logic.restorable_review_for(node))

    def _autosave(self, node) -> None:
        try:
            self.logic.autosave(node)
        except (OSError, CMBError) as error:  # keep reviewing; say why the safety net is off
            self.appendLog(_("Review autosave failed: ") + str(error))

    def onLoadSample(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not simulate the sample scan."), waitCursor=True):
            if not self._ensure(("sample", "cancel")):
                self.appendLog(_("The sample scan needs the packages listed above; nothing was installed."))
                return
            workDir = self.logic.new_work_directory()
            self._startProcess(self.logic.start_sample(self._parameterNode.sampleSeed, workDir), workDir,
                               lambda: self._loadSample(workDir))

    def _loadSample(self, workDir) -> None:
        node = self.logic.load_sample_files(workDir)
        self._parameterNode.inputVolume = node
        self._parameterNode.phaseVolume = slicer.mrmlScene.GetNodeByID(node.GetAttribute("CMBDetector.phaseNodeID"))
        slicer.util.setSliceViewerLayers(background=node, fit=True)

    # ---- review -----------------------------------------------------------------------------

    def _findings(self):
        return self._parameterNode.findings if self._parameterNode else None

    def onFindingsChanged(self, node) -> None:
        self._observeFindings(node)
        self._currentIndex = -1
        self._refreshSoon()  # the parameter node learns of the new selection from the same signal

    def _observeFindings(self, node) -> None:
        if self._observedFindings is not None:
            for event in self.FINDINGS_EVENTS:
                self.removeObserver(self._observedFindings, getattr(slicer.vtkMRMLMarkupsNode, event),
                                    self.onFindingsModified)
            self.removeObserver(self._observedFindings, slicer.vtkMRMLMarkupsNode.PointStartInteractionEvent,
                                self.onPointInteraction)
        self._observedFindings = node
        if node is not None:
            for event in self.FINDINGS_EVENTS:
                self.addObserver(node, getattr(slicer.vtkMRMLMarkupsNode, event), self.onFindingsModified)
            self.addObserver(node, slicer.vtkMRMLMarkupsNode.PointStartInteractionEvent, self.onPointInteraction)

    def onFindingsModified(self, caller, event) -> None:
        self._refreshSoon()

    def _refreshSoon(self, *args) -> None:
        # many events arrive per edit, and a selector's signal reaches this widget before the parameter
        # node: refresh once, after the event loop settles
        if not self._refreshPending:
            self._refreshPending = True
            qt.QTimer.singleShot(0, self.refreshTable)

    def onPointInteraction(self, caller, event) -> None:
        """A point was clicked or dragged in a view: make its row the current one (N/P go on from it)."""
        display = caller.GetDisplayNode()
        index = display.GetActiveControlPoint() if display is not None else -1
        if 0 <= index < caller.GetNumberOfControlPoints():
            self._currentIndex = index
            self._selectRow(index)

    def refreshTable(self) -> None:
        self._refreshPending = False
        node = self._findings()
        table = self.ui.reviewTable
        rows = self.logic.review_table(node) if node else []  # reconciles a review node first
        self._fillingTable = True
        try:
            table.setRowCount(len(rows))
            for rowIndex, row in enumerate(rows):
                for column, key in enumerate(self.TABLE_COLUMNS):
                    value = review.reported_state(row) if key == "state" else row[key]
                    text = f"{value:.2f}" if isinstance(value, float) and value == value else (
                        "" if isinstance(value, float) else str(value))
                    item = qt.QTableWidgetItem(text)
                    if not row["visible"]:
                        item.setForeground(qt.QBrush(qt.QColor("gray")))
                    table.setItem(rowIndex, column, item)
            table.resizeColumnsToContents()  # seven narrow columns fit the panel's width
            if not 0 <= self._currentIndex < len(rows):
                self._currentIndex = -1
            if self._currentIndex >= 0:
                table.selectRow(self._currentIndex)
        finally:
            self._fillingTable = False
        self.ui.countsLabel.setText(self.logic.counts_text(node) if node else "")
        self.ui.reviewCompleteCheckBox.setChecked(bool(node) and review.is_review_complete(node))
        self.updateButtons()
        if node is not None:
            self._autosave(node)  # after every change (decisions, points added or deleted), once it settles

    def _selectRow(self, index: int) -> None:
        self._fillingTable = True  # selecting from code must not jump the views a second time
        try:
            self.ui.reviewTable.selectRow(index)
        finally:
            self._fillingTable = False

    def _show(self, index: int) -> None:
        self._currentIndex = index
        node = self._findings()
        if node is not None and index >= 0:
            self.logic.jump_to(node, index)
            self._selectRow(index)

    def onTableCurrentCellChanged(self, row: int, column: int, previousRow: int, previousColumn: int) -> None:
        if not self._fillingTable and row >= 0 and row != self._currentIndex:
            self._show(row)

    def onNext(self) -> None:
        if self._findings():
            self._show(self.logic.step(self._findings(), self._currentIndex, +1))

    def onPrevious(self) -> None:
        if self._findings():
            self._show(self.logic.step(self._findings(), max(self._currentIndex, 0), -1))

    def _decide(self, state: str) -> None:
        node = self._findings()
        if not review.is_review_node(node) or not 0 <= self._currentIndex < node.GetNumberOfControlPoints():
            return
        with slicer.util.tryWithErrorDisplay(_("Could not record the decision.")):
            self._show(self.logic.set_state(node, self._currentIndex, state))

    def onAccept(self) -> None:
        self._decide(vocabulary.ACCEPTED)

    def onReject(self) -> None:
        self._decide(vocabulary.REJECTED)

    def onPending(self) -> None:
        """Back to pending, and stay on it (it is still to be read)."""
        node = self._findings()
        if review.is_review_node(node) and 0 <= self._currentIndex < node.GetNumberOfControlPoints():
            review.set_state(node, self._currentIndex, vocabulary.PENDING)
            self._show(self._currentIndex)

    def onUndo(self) -> None:
        node = self._findings()
        if review.is_review_node(node):
            index = review.undo_last_decision(node)
            if index >= 0:
                self._show(index)

    def onAddPoint(self) -> None:
        """Place one point with the mouse; it becomes an "added" finding when placed."""
        node = self._findings()
        if node is None:
            return
        self.logic.markups_logic.SetActiveList(node)
        interaction = slicer.app.applicationLogic().GetInteractionNode()
        interaction.SetPlaceModePersistence(0)
        interaction.SetCurrentInteractionMode(interaction.Place)

    def onAdopt(self) -> None:
        node = self._findings()
        if node is not None:
            self.logic.adopt(node)
            self.onThresholdChanged(self._parameterNode.threshold)

    def onThresholdChanged(self, value: float) -> None:
        node = self._findings()
        if node is not None:
            self.logic.apply_threshold(node, float(value))
            self.refreshTable()

    def onExport(self) -> None:
        node, p = self._findings(), self._parameterNode
        if node is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Export failed."), waitCursor=True):
            written = self.logic.export(node, self.ui.exportDirectoryButton.directory, reader=p.reader,
                                        input_node=p.inputVolume, threshold=p.threshold,
                                        keep_scan=self.ui.keepScanCheckBox.isChecked(), phase_node=p.phaseVolume,
                                        crop=p.partialBrain)
            self.appendLog(_("Exported: ") + ", ".join(str(path) for path in written.values()))

    def onReviewComplete(self, *args) -> None:
        node = self._findings()
        if not review.is_review_node(node):
            return
        try:
            self.logic.set_review_complete(node, self.ui.reviewCompleteCheckBox.isChecked())
        except CMBError as error:  # a refusal the reader can act on (a pending finding): said, not raised
            slicer.util.errorDisplay(_("Could not mark the review complete.") + f"\n\n{error}")
        self.refreshTable()  # the box shows what the node holds, a refusal included

    def onExportLabelmap(self) -> None:
        node, p = self._findings(), self._parameterNode
        if node is None or p.inputVolume is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Labelmap export failed.")):
            labelmap = self.logic.export_labelmap(node, p.inputVolume)
            slicer.util.setSliceViewerLayers(label=labelmap)

    # ---- Model section (issue #16): site models from the reader's reviews ------------------------

    def setupModelSection(self) -> None:
        self.ui.improveModelButton.clicked.connect(self.onImproveModel)
        self.ui.useShippedModelButton.clicked.connect(self.onUseShippedModel)
        self.ui.modelCancelButton.clicked.connect(self.onCancel)
        self.ui.reviewsDirectoryButton.directory = str(Path.home())
        self.refreshModelSection()

    def refreshModelSection(self) -> None:
        try:
            text = self.logic.active_model_text()
        except CMBError as error:
            text = str(error)
        self.ui.activeModelLabel.setText(text)

    def onImproveModel(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not start improving the model."), waitCursor=True):
            if not self._ensure(("detect", "cancel")):
                self.appendLog(_("Fine-tuning needs the packages listed above; nothing was installed."))
                return
            version = self.logic.new_version_name()
            process = self.logic.start_finetune(self.ui.reviewsDirectoryButton.directory, version)
            self.ui.modelResultLabel.setText(_("Improving the model from your reviews (on this computer)..."))
            self.ui.modelProgressBar.setValue(0)
            self._startProcess(process, None, lambda: self._finetuneDone(process))

    def _finetuneDone(self, process) -> None:
        self.ui.modelResultLabel.setText(self.logic.finetune_summary(self.logic.finetune_result(process)))
        self.refreshModelSection()

    def onUseShippedModel(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not switch to the shipped model.")):
            self.logic.use_shipped_model()
            self.ui.modelResultLabel.setText(_("Detection now uses the shipped model."))
        self.refreshModelSection()

    def updateButtons(self, *args) -> None:
        running = self._process is not None
        p = self._parameterNode
        hasFindings = bool(p and p.findings)
        reviewable = hasFindings and review.is_review_node(p.findings)
        self.ui.detectButton.setEnabled(bool(p and p.inputVolume) and not running)
        self.ui.cancelButton.setEnabled(running)
        self.ui.loadSampleButton.setEnabled(not running)
        self.ui.adoptButton.setEnabled(hasFindings and not reviewable)
        for button in (self.ui.previousButton, self.ui.nextButton, self.ui.acceptButton, self.ui.rejectButton,
                       self.ui.pendingButton, self.ui.undoButton, self.ui.addPointButton, self.ui.exportButton,
                       self.ui.exportLabelmapButton, self.ui.reviewCompleteCheckBox):
            button.setEnabled(reviewable)
        self.ui.improveModelButton.setEnabled(not running)
        self.ui.modelCancelButton.setEnabled(running)


# =============================================================================================
# Self-test (real Slicer: Developer mode -> Reload and Test)
# =============================================================================================

class CMBDetectorTest(ScriptedLoadableModuleTest):
    """The review on synthetic findings (needs nothing beyond Slicer), Cancel (needs psutil) and the
    simulated sample scan (needs nibabel and nilearn). What lacks its packages is skipped, and says so:
    a fresh Slicer (the extension build machine) has none of them."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        for test in (self.test_review_on_synthetic_findings, self.test_detection_process_cancel,
                     self.test_sample_scan_review):
            self.setUp()
            test()

    def _skipUnlessInstalled(self, groups) -> bool:
        plan = CMBDetectorLogic.install_plan(groups)
        if not plan.install:
            return False
        self.delayDisplay("Skipped (needs {}): install them with the module's Dependencies button".format(
            ", ".join(package.requirement for package in plan.install)))
        return True

    def test_review_on_synthetic_findings(self):
        import numpy as np

        from CMBDetectorLib.findings import Finding
        from CMBDetectorLib.image import Volume

        self.delayDisplay("Reviewing synthetic findings")
        logic = CMBDetectorLogic()
        volume = review.volume_node_from_volume(slicer.mrmlScene, Volume(np.zeros((40, 40, 20), np.float32),
                                                                         np.diag([1.0, 1.0, 2.0, 1.0])), "self-test")
        findings = [Finding(vocabulary.finding_label(n + 1), (10.0 + 5 * n, 20.0, 10.0), score, 3.0, "deep")
                    for n, score in enumerate((0.9, 0.6, 0.2))]
        node = review.findings_to_markups_node(slicer.mrmlScene, findings, "CMB self-test")
        logic.accept(node, 0)
        logic.reject(node, 1)
        node.RemoveNthControlPoint(1)  # values stay with their own points
        self.assertAlmostEqual(review.review_table(node)[1]["score"], 0.2)
        counts = review.review_counts(node)
        self.assertEqual((counts["accepted"], counts["pending"], counts["total"]), (1, 1, 2))
        labelmap = logic.export_labelmap(node, volume)
        self.assertEqual(int(slicer.util.arrayFromVolume(labelmap).max()), 1)
        with tempfile.TemporaryDirectory(prefix="CMBDetectorTest-") as out_dir:
            written = logic.export(node, out_dir, reader="self-test", input_node=volume)
            self.assertTrue(all(Path(path).is_file() for path in written.values()))
        self.delayDisplay("Review test passed")

    def test_detection_process_cancel(self):
        if self._skipUnlessInstalled(("cancel",)):
            return
        command = [sys.executable, "-c", "import time\nfor i in range(100):\n print(f'[{i}/100]', flush=True)\n"
                   " time.sleep(0.1)"]
        process = BackgroundProcess(command)
        time.sleep(1.0)
        process.poll()
        self.assertGreater(process.progress, 0.0)
        process.cancel()
        process.wait(10)
        self.assertTrue(process.cancelled)
        self.delayDisplay("Cancel test passed")

    def test_sample_scan_review(self):
        if self._skipUnlessInstalled(("sample",)):
            return
        self.delayDisplay("Simulating a sample scan (in a background process)")
        magnitude = CMBDetectorLogic().load_sample_scan(seed=3)
        truth = slicer.mrmlScene.GetNodeByID(magnitude.GetAttribute("CMBDetector.truthNodeID"))
        self.assertGreater(truth.GetNumberOfControlPoints(), 0)
        self.assertEqual(review.review_counts(truth)["accepted"], truth.GetNumberOfControlPoints())
        self.delayDisplay("Sample scan test passed")
