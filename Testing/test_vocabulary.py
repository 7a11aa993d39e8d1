"""The review vocabulary has one owner: findings.py, review.py and the module use its objects, and its
file-name rules match what the CLI writes."""

from __future__ import annotations

import ast
from pathlib import Path

from CMBDetectorLib import findings, review, vocabulary

LIB = Path(vocabulary.__file__).resolve().parent
MODULE_FILE = LIB.parent / "CMBDetector.py"


def test_findings_and_review_use_the_vocabulary_objects():
    for name in ("REVIEW_STATES", "REGIONS", "LOBES", "MEASUREMENTS"):
        assert getattr(findings, name) is getattr(vocabulary, name), name
    for name in ("REVIEW_STATES", "REGIONS", "LOBES", "MEASUREMENTS", "LABEL_SUFFIX", "PENDING_COLOR",
                 "DECIDED_COLOR", "LABEL_FORMAT", "CONFIRMED_STATES"):
        assert getattr(review, name) is getattr(vocabulary, name), name


def test_no_other_file_defines_vocabulary_constants():
    owned = {"REVIEW_STATES", "REGIONS", "LOBES", "MEASUREMENTS", "LABEL_SUFFIX", "LABEL_FORMAT", "PENDING_COLOR",
             "DECIDED_COLOR", "CONFIRMED_STATES"}
    for path in [*LIB.rglob("*.py"), MODULE_FILE]:
        if path.name == "vocabulary.py":
            continue
        tree = ast.parse(path.read_text())
        assigned = {target.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
                    for target in node.targets if isinstance(target, ast.Name)}
        assert not (assigned & owned), (path.name, assigned & owned)


def test_labels_round_trip_through_the_suffixes():
    for state, suffix in vocabulary.LABEL_SUFFIX.items():
        assert state in vocabulary.REVIEW_STATES
        assert vocabulary.base_label(vocabulary.finding_label(3) + suffix) == "CMB-3"
    assert [f.label for f in findings.label_findings(
        [findings.Finding("", (0, 0, 0), s) for s in (0.2, 0.9)])] == ["CMB-1", "CMB-2"]


def test_stems_match_the_cli_and_survive_odd_names():
    assert vocabulary.stem_of("/data/sub 1/é scan.nii.gz") == "é scan"
    assert vocabulary.stem_of("SCAN.NII.GZ") == "SCAN"
    assert vocabulary.stem_of("dicom_folder") == "dicom_folder"
    assert vocabulary.output_stem("sub 1.mrk.json") == "sub 1"
    assert vocabulary.safe_stem("sub-01 swi (é)") == "sub-01_swi_"
    assert vocabulary.safe_stem("") == "input"
