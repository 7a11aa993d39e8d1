"""The review vocabulary has one owner: findings.py, review.py and the module use its objects, and its
file-name rules match what the CLI writes."""

from __future__ import annotations

import ast
import math
from pathlib import Path

from helpers import MODULE_FILE

from CMBDetectorLib import findings, review, vocabulary

LIB = Path(vocabulary.__file__).resolve().parent


def test_findings_and_review_use_the_vocabulary_objects():
    for name in ("REVIEW_STATES", "CODED_FIELDS", "MEASUREMENTS"):
        assert getattr(findings, name) is getattr(vocabulary, name), name
    for name in ("REVIEW_STATES", "CODED_FIELDS", "REGIONS", "LOBES", "MEASUREMENTS", "LABEL_SUFFIX",
                 "PENDING_COLOR", "DECIDED_COLOR", "LABEL_FORMAT", "CONFIRMED_STATES"):
        assert getattr(review, name) is getattr(vocabulary, name), name


def test_no_other_file_defines_vocabulary_constants():
    owned = {"REVIEW_STATES", "REGIONS", "LOBES", "KEPT_BY", "CODED_FIELDS", "MEASUREMENTS", "LABEL_SUFFIX",
             "LABEL_FORMAT", "PENDING_COLOR", "DECIDED_COLOR", "CONFIRMED_STATES"}
    for path in [*LIB.rglob("*.py"), MODULE_FILE]:
        if path.name == "vocabulary.py":
            continue
        tree = ast.parse(path.read_text())
        assigned = {target.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
                    for target in node.targets if isinstance(target, ast.Name)}
        assert not (assigned & owned), (path.name, assigned & owned)


def test_every_coded_word_round_trips_and_anything_else_reads_as_the_fields_unknown_word():
    """One table owns the coded fields: their words, their unknown word, and their place among the stored
    values (score, diameter, then the codes: the order review.py's per-point records rely on)."""
    assert list(vocabulary.MEASUREMENTS) == ["score", "diameter", *vocabulary.CODED_FIELDS]
    for field, (words, unknown) in vocabulary.CODED_FIELDS.items():
        assert unknown in words
        for word in words:
            assert vocabulary.word_of_code(field, vocabulary.code_of(field, word)) == word
        assert math.isnan(vocabulary.code_of(field, "no such word"))
        for bad_code in (math.nan, -1.0, float(len(words))):
            assert vocabulary.word_of_code(field, bad_code) == unknown
    assert vocabulary.word_of_code("region", 1.0) == "deep" and vocabulary.word_of_code("kept_by", 2.0) == "criteria"


def test_a_word_outside_the_vocabulary_is_written_to_json_as_the_unknown_word(tmp_path):
    """JSON has no NaN: the detector's .mrk.json stores an unknown region as the code of "unknown"."""
    odd = findings.Finding("CMB-1", (1.0, 2.0, 3.0), 0.5, 2.0, region="cerebral", lobe="limbic",
                           kept_by="someone")
    path = findings.write_markups_json([odd], tmp_path / "odd.mrk.json")
    assert "NaN" not in path.read_text()
    (back,) = findings.read_markups_json(path)
    assert (back.region, back.lobe, back.kept_by) == ("unknown", "", "")


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
