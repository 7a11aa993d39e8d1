"""Shared pytest fixtures.

`mrml` gives the real MRML of 3D Slicer (PyPI `slicer-core`): ONE scene for the whole session with an
application logic and the colors, markups and volumes module logics attached. Every VTK object is kept
alive together for the session, and the scene is cleared between tests instead of creating new scenes:
creating and dropping scenes with their logics in a loop has crashed the interpreter.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest


@dataclass
class MRMLContext:
    scene: object
    application_logic: object
    colors_logic: object
    markups_logic: object
    volumes_logic: object


@pytest.fixture(scope="session")
def _mrml_session():
    slicer = pytest.importorskip("slicer", reason="real MRML needs the slicer-core package")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the installed `slicer` package has no MRML (is it slicer-core?)")
    scene = slicer.vtkMRMLScene()
    application_logic = slicer.vtkSlicerApplicationLogic()
    application_logic.SetMRMLScene(scene)
    colors_logic = slicer.vtkSlicerColorLogic()
    markups_logic = slicer.vtkSlicerMarkupsLogic()
    volumes_logic = slicer.vtkSlicerVolumesLogic()
    for logic in (colors_logic, markups_logic, volumes_logic):
        logic.SetMRMLApplicationLogic(application_logic)
        logic.SetMRMLScene(scene)
    # module logics find each other through the application logic, as in the desktop application
    for module_name, logic in (("Colors", colors_logic), ("Markups", markups_logic), ("Volumes", volumes_logic)):
        application_logic.SetModuleLogic(module_name, logic)
    context = MRMLContext(scene, application_logic, colors_logic, markups_logic, volumes_logic)
    yield context
    scene.Clear(1)


@pytest.fixture()
def mrml(_mrml_session):
    """The session's MRMLContext with an empty scene (cleared before and after the test)."""
    _mrml_session.scene.Clear(0)
    yield _mrml_session
    _mrml_session.scene.Clear(0)


@pytest.fixture(autouse=True, scope="session")
def _private_model_versions(tmp_path_factory):
    """Tests never read or change the user's own active model version (models.py, issue #16): the session
    gets an empty data folder, inherited by the processes tests start."""
    import os

    previous = os.environ.get("CMBDETECTOR_DATA_DIR")
    os.environ["CMBDETECTOR_DATA_DIR"] = str(tmp_path_factory.mktemp("cmbdetector-data"))
    yield
    if previous is None:
        os.environ.pop("CMBDETECTOR_DATA_DIR", None)
    else:
        os.environ["CMBDETECTOR_DATA_DIR"] = previous


@pytest.fixture(scope="session")
def small_reference(tmp_path_factory):
    """Stand-in for the 20-scan in-distribution reference a default `finetune` replays (simulating it takes
    about 5 minutes on 2 cores): the real labelled patches of its first 2 scans (finetune.reference_patches), made once.
    `install(data_dir)` puts them where a default fine-tune (seed 0) looks for the whole reference, so a test
    runs the default path on a smaller reference."""
    import shutil

    from CMBDetectorLib import models
    from CMBDetectorLib.train import finetune

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(models.DATA_DIR_ENV, str(tmp_path_factory.mktemp("small-reference")))
        finetune.reference_patches(2, 0)
        made = finetune.reference_cache(2, 0)

    def install(data_dir) -> None:
        target = data_dir / "reference" / finetune.reference_cache(finetune.REPLAY_SCANS, 0).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(made, target)

    return install
