"""What the detector needs beyond Slicer's own Python, and a plan to install it without touching Slicer.

Pure: nothing here imports Slicer or installs anything. The module's Logic asks installed_versions()
what is present, shows plan_install()'s result to the user, and runs plan.pip_arguments() through
slicer.util.pip_install only after the user agrees.

Rules (Slicer 5.10 and 5.12, Python 3.12; numpy 2.0.2 and 2.4.6):
- Packages Slicer ships, and torch/torchvision from the PyTorch extension, are PROTECTED: never named
  in an install, never replaced. When one is missing or at a version a planned package rejects, the
  plan reports it (the user fixes it through Slicer or the PyTorch extension).
- Everything installed is pinned to the version requirements.lock tests, and installed with
  `--no-deps` (the SlicerTotalSegmentator pattern): pip's resolver would otherwise pull a PyPI torch,
  opencv-python beside opencv-python-headless, or a newer numpy/requests into Slicer's Python. The
  present protected versions are passed as constraints as well, as a second guard.
- Versions are checked, not just presence (importlib.metadata).
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field

from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

# Shipped by Slicer (SuperBuild) or installed by the PyTorch extension: never installed or replaced.
PROTECTED = ("numpy", "scipy", "simpleitk", "vtk", "requests", "pillow", "pydicom", "packaging", "torch",
             "torchvision")

# What the planned packages (at PINS) require of protected ones, from their metadata (Requires-Dist).
# Testing/test_dependencies.py checks this table against the installed metadata.
PROTECTED_REQUIREMENTS = {
    "numpy": ">=2.0,<3",         # opencv-python-headless 5 needs numpy>=2; monai <3; pandas >=2.0.2
    "scipy": ">=1.11.1",         # nilearn
    "requests": ">=2.33.0",      # nilearn 0.14
    "pillow": ">=9",             # matplotlib
    "torch": ">=2.8.0",          # monai 1.6
    "torchvision": ">=0.9.0",    # ultralytics
}

# Exact versions from requirements.lock. Each group is the runtime closure (without protected
# packages) of what a feature imports; opencv-python is left out on purpose: ultralytics asks for it,
# but opencv-python-headless provides the same cv2 without a GUI library clashing with Slicer's Qt.
PINS = {
    "anyio": "4.16.0", "certifi": "2026.10.18", "cloudpickle": "3.1.2", "contourpy": "1.3.3", "cycler": "0.12.1",
    "fonttools": "4.68.0", "h11": "0.16.0", "httpcore": "1.0.9", "httpx": "0.28.1", "idna": "3.20",
    "jinja2": "3.1.6", "joblib": "1.6.0", "kiwisolver": "1.5.1", "markupsafe": "3.0.4", "matplotlib": "3.11.2",
    "monai": "1.6.1", "narwhals": "2.29.0", "nibabel": "5.4.2", "nilearn": "0.14.1", "nvidia-ml-py": "13.615.71",
    "opencv-python-headless": "5.0.0.93", "pandas": "3.1.1", "polars": "2.1.0", "polars-runtime-32": "2.1.0",
    "psutil": "7.2.2", "pyparsing": "3.3.3", "python-dateutil": "4.0.0", "pyyaml": "6.0.3",
    "scikit-learn": "1.9.1", "threadpoolctl": "3.8.0", "typing-extensions": "4.16.0", "tzdata": "2026.6",
    "ultralytics": "8.4.190", "ultralytics-platform": "0.1.99", "ultralytics-thop": "2.2.3",
}
_SAMPLE = ("nibabel", "nilearn", "cloudpickle", "jinja2", "joblib", "markupsafe", "narwhals", "pandas",
           "python-dateutil", "scikit-learn", "threadpoolctl", "typing-extensions", "tzdata")
GROUPS = {
    # Cancel kills the detection's process tree
    "cancel": ("psutil",),
    # Load sample scan and the self-test: the simulator writes NIfTI and reads the atlas
    "sample": _SAMPLE,
    # Detect: everything the pipeline imports
    "detect": tuple(PINS),
}


@dataclass(frozen=True)
class PlannedPackage:
    name: str          # canonical distribution name
    version: str       # the exact version to install
    present: str | None = None  # the version found, when one was (then it is replaced)

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


@dataclass
class InstallPlan:
    """install: what to pip-install (pinned, --no-deps); wrong_versions: present packages at another
    version than tested ("name: present X, needs Y"; those not protected are in `install`, protected
    ones are only reported); protected_problems: protected packages that are missing (never installed:
    Slicer or the PyTorch extension must provide them); constraints: present protected versions, pinned."""

    install: list = field(default_factory=list)
    wrong_versions: list = field(default_factory=list)
    protected_problems: list = field(default_factory=list)
    constraints: list = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when nothing needs installing and no protected package is in the way."""
        return not self.install and not self.protected_problems

    def pip_arguments(self, constraints_file: str | None = None) -> list:
        """Arguments after `pip install` (empty when there is nothing to install)."""
        if not self.install:
            return []
        arguments = ["--no-deps"]
        if constraints_file:
            arguments += ["--constraint", str(constraints_file)]
        return arguments + [package.requirement for package in self.install]

    def describe(self) -> str:
        lines = [f"install {p.requirement}" + (f" (replaces {p.present})" if p.present else "") for p in self.install]
        protected_reports = [line for line in self.wrong_versions if line.endswith("(not replaced)")]
        return "\n".join(lines + protected_reports + self.protected_problems)


def installed_versions(names) -> dict:
    """{canonical name: installed version or None} for the given distributions."""
    versions = {}
    for name in names:
        try:
            versions[canonicalize_name(name)] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[canonicalize_name(name)] = None
    return versions


def plan_install(present: dict, groups=("detect",)) -> InstallPlan:
    """What would be installed for the features in `groups`, given `present` ({name: version or None}).

    Never names a PROTECTED package; every entry is pinned to PINS.
    """
    present = {canonicalize_name(name): version for name, version in present.items()}
    wanted = sorted({canonicalize_name(name) for group in groups for name in GROUPS[group]})
    plan = InstallPlan()
    for name in wanted:
        version = present.get(name)
        if version == PINS[name]:
            continue
        if version is not None:
            plan.wrong_versions.append(f"{name}: present {version}, needs {PINS[name]}")
        plan.install.append(PlannedPackage(name, PINS[name], version))
    for name in PROTECTED:
        version = present.get(name)
        if version is None:
            if name in PROTECTED_REQUIREMENTS and "detect" in groups:
                plan.protected_problems.append(f"{name} is missing: it must come from Slicer or the PyTorch extension")
            continue
        plan.constraints.append(f"{name}=={version}")
        wanted_spec = PROTECTED_REQUIREMENTS.get(name)
        if wanted_spec and "detect" in groups and not SpecifierSet(wanted_spec).contains(version, prereleases=True):
            # reported, not replaced: with --no-deps the pinned packages still install, and the user
            # learns which of Slicer's (or the PyTorch extension's) packages they declare too old or new
            plan.wrong_versions.append(f"{name}: present {version}, needs {wanted_spec} (not replaced)")
    return plan


def plan_for_this_python(groups=("detect",)) -> InstallPlan:
    names = {name for group in groups for name in GROUPS[group]} | set(PROTECTED)
    return plan_install(installed_versions(names), groups)
