"""The install plan: what installing into Slicer's Python would do, checked against the rules and against
the real metadata of the packages this environment installed from requirements.lock."""

from __future__ import annotations

import importlib.metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from CMBDetectorLib import dependencies
from CMBDetectorLib.dependencies import GROUPS, PINS, PROTECTED, plan_install
from helpers import ROOT

LOCK = ROOT / "requirements.lock"
# What Slicer's own Python holds, as far as checked (docs: slicer-notes, SuperBuild/External_python*.cmake)
SLICER_5_10 = {"numpy": "2.0.2"}
SLICER_5_12 = {"numpy": "2.4.6", "requests": "2.34.2"}
# The python environment markers of Slicer 5.10/5.12 (Python 3.12) on Linux
MARKERS = {"python_version": "3.12", "python_full_version": "3.12.10", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}


def locked_versions() -> dict:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.strip().split("==")
            pins[canonicalize_name(name)] = version
    return pins


@pytest.mark.parametrize("slicer_python", [SLICER_5_10, SLICER_5_12], ids=["5.10", "5.12"])
def test_a_fresh_slicer_gets_every_pinned_package_and_nothing_protected(slicer_python):
    plan = plan_install(slicer_python, groups=("detect",))
    names = [package.name for package in plan.install]
    assert not set(names) & {canonicalize_name(p) for p in PROTECTED}
    assert set(names) == set(PINS)
    assert "opencv-python" not in names  # only the headless build: no second cv2 against Slicer's Qt
    locked = locked_versions()
    for package in plan.install:
        assert package.requirement == f"{package.name}=={locked[package.name]}"  # pinned to the lock
    arguments = plan.pip_arguments("constraints.txt")
    assert arguments[:3] == ["--no-deps", "--constraint", "constraints.txt"]
    assert all("==" in argument for argument in arguments[3:])
    assert f"numpy=={slicer_python['numpy']}" in plan.constraints
    assert not any(line.startswith("numpy") for line in plan.wrong_versions)  # both numpy builds suit
    # protected packages this test does not list count as missing: reported, never installed
    assert all("missing" in problem for problem in plan.protected_problems) and not plan.complete


def test_a_package_at_another_version_is_reported_and_replaced_but_a_protected_one_only_reported():
    present = {**SLICER_5_12, "scipy": "1.17.1", "pillow": "13.0.0", "torch": "2.14.1", "torchvision": "0.29.1",
               **PINS}
    present["nibabel"] = "5.1.0"
    present["requests"] = "2.31.0"  # older than nilearn 0.14 accepts
    present["torch"] = "2.4.1"      # older than monai 1.6 accepts
    plan = plan_install(present)
    assert [p.requirement for p in plan.install] == [f"nibabel=={PINS['nibabel']}"]
    assert plan.install[0].present == "5.1.0"
    assert "nibabel: present 5.1.0, needs 5.4.2" in plan.wrong_versions
    assert any(line.startswith("requests: present 2.31.0") for line in plan.wrong_versions)
    assert "torch: present 2.4.1, needs >=2.8.0 (not replaced)" in plan.wrong_versions
    assert "torch" in plan.describe() and "requests" in plan.describe()
    assert plan.protected_problems == [] and not plan.complete


def test_everything_present_at_its_pin_means_nothing_to_do():
    plan = plan_install({**SLICER_5_12, "scipy": "1.17.1", "pillow": "13.0.0", "torch": "2.14.1",
                         "torchvision": "0.29.1", **PINS})
    assert plan.install == [] and plan.wrong_versions == [] and plan.complete
    assert plan.pip_arguments() == []


def test_a_first_run_without_the_heavy_packages_installs_only_what_the_sample_needs():
    plan = plan_install(SLICER_5_10, groups=("sample", "cancel"))
    names = {package.name for package in plan.install}
    assert {"nibabel", "nilearn", "psutil"} <= names
    assert not names & {"monai", "ultralytics", "torch"}
    assert plan.protected_problems == []  # torch is not needed for the sample


def test_groups_cover_the_runtime_requirements_of_their_packages():
    """The pinned groups are closed under the packages' own requirements (from their installed metadata),
    so installing with --no-deps leaves nothing missing; and what they ask of protected packages is
    what PROTECTED_REQUIREMENTS says (checked on the versions Slicer 5.10 and 5.12 ship)."""
    protected = {canonicalize_name(p) for p in PROTECTED}
    for group, names in GROUPS.items():
        members = {canonicalize_name(n) for n in names}
        for name in members:
            for line in importlib.metadata.requires(name) or []:
                requirement = Requirement(line)
                if requirement.marker and not requirement.marker.evaluate(MARKERS):
                    continue
                dependency = canonicalize_name(requirement.name)
                if dependency in protected:
                    for slicer_python in (SLICER_5_10, SLICER_5_12):
                        version = slicer_python.get(dependency)
                        if version is None:
                            continue
                        ours = dependencies.PROTECTED_REQUIREMENTS.get(dependency)
                        if ours and Requirement(f"x{ours}").specifier.contains(version, prereleases=True):
                            assert requirement.specifier.contains(version, prereleases=True), (name, line, version)
                elif dependency != "opencv-python":
                    assert dependency in members, f"{group}: {name} needs {dependency}"


def test_installed_versions_reads_real_metadata():
    versions = dependencies.installed_versions(["numpy", "cmbdetector-absent-package"])
    assert versions["numpy"] == importlib.metadata.version("numpy")
    assert versions["cmbdetector-absent-package"] is None
