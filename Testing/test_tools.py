"""The scripts in tools/ (measurements behind the docs) still run against today's library: nothing else
calls them, so a renamed argument would otherwise surface only when a doc is next refreshed."""

import subprocess
import sys

import pytest
from helpers import ROOT, load_source

TOOLS_DIR = ROOT / "tools"
TOOLS = sorted(TOOLS_DIR.glob("*.py"))


def load_tool(name: str):
    return load_source(name, TOOLS_DIR / f"{name}.py")


@pytest.mark.parametrize("tool", TOOLS, ids=lambda path: path.name)
def test_every_tool_imports_and_answers_help(tool):
    result = subprocess.run([sys.executable, str(tool), "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:"), result.stdout


def test_the_image_type_check_measures_an_image_as_detect_does():
    # docs/image-type-check.txt comes from this function; it once called register_to_mni with an argument
    # the library had dropped, and failed on every scan
    kind, name, expect, ratio, solidity, spread, warnings = load_tool("check_image_types").measure(
        ("phantom", "uniform sphere", True, "sphere-phantom"))
    assert expect and solidity > 0.9 and spread < 0.12
    assert any("does not look like a head" in warning for warning in warnings), warnings
