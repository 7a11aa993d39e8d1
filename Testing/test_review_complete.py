"""A review that is explicitly complete (issue #16), on real MRML (slicer-core): only a complete review lets
the candidates nobody marked count as mimics; pending points are never labels."""

from __future__ import annotations

import json

import numpy as np
import pytest

from CMBDetectorLib.errors import CMBError
from CMBDetectorLib.findings import Finding

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("needs slicer-core", allow_module_level=True)

from CMBDetectorLib import review  # noqa: E402


def _node(mrml):
    findings = [Finding(f"CMB-{n + 1}", (10.0 * n, 5.0, 2.0), score, 3.0, "deep")
                for n, score in enumerate((0.9, 0.7, 0.4, 0.1))]
    node = review.findings_to_markups_node(mrml.scene, findings, "complete review")
    review.apply_threshold(node, 0.3)  # CMB-4 is below the threshold: not shown, not pending
    return node


def test_complete_is_refused_while_a_shown_finding_is_pending_and_undone_by_a_new_pending_one(mrml):
    node = _node(mrml)
    review.set_state(node, 0, "accepted")
    review.set_state(node, 1, "rejected")
    with pytest.raises(CMBError, match=r"1 shown finding\(s\) still pending \(CMB-3\)"):
        review.set_review_complete(node)
    assert not review.is_review_complete(node)
    review.set_state(node, 2, "rejected")
    review.set_review_complete(node)  # the hidden CMB-4 is below threshold, not pending
    assert review.is_review_complete(node)
    node.AddControlPoint([1.0, 2.0, 3.0])  # a missed lesion the reader adds: still complete
    assert review.is_review_complete(node) and review.get_state(node, 4) == "added"
    review.set_state(node, 1, "pending")  # a decision taken back: no longer complete
    assert not review.is_review_complete(node)
    review.set_state(node, 1, "rejected")
    assert review.is_review_complete(node)  # the reader's mark stands once nothing is pending
    review.set_review_complete(node, False)
    assert not review.is_review_complete(node)


def test_the_exported_review_records_completeness_and_gives_labels_only_from_decisions(mrml, tmp_path):
    node = _node(mrml)
    review.set_state(node, 0, "accepted")
    review.set_state(node, 1, "rejected")
    document = review.export_review(node, tmp_path / "a_review.csv", tmp_path / "a_review.json")
    assert document["complete"] is False  # CMB-3 is still pending
    labels = review.review_labels(json.loads((tmp_path / "a_review.json").read_text()))
    assert labels["complete"] is False
    np.testing.assert_allclose(labels["positive"], [[0.0, 5.0, 2.0]])
    np.testing.assert_allclose(labels["negative"], [[10.0, 5.0, 2.0]])  # the pending CMB-3 is no label

    review.set_state(node, 2, "rejected")
    node.AddControlPoint([1.0, 2.0, 3.0])
    review.set_review_complete(node)
    review.export_review(node, tmp_path / "b_review.csv", tmp_path / "b_review.json",
                         extra={"volume": "b.nii.gz"})
    saved = json.loads((tmp_path / "b_review.json").read_text())
    assert saved["complete"] is True and saved["volume"] == "b.nii.gz"
    labels = review.review_labels(saved)
    assert labels["complete"] is True
    np.testing.assert_allclose(labels["positive"], [[0.0, 5.0, 2.0], [1.0, 2.0, 3.0]])
    np.testing.assert_allclose(labels["negative"], [[10.0, 5.0, 2.0], [20.0, 5.0, 2.0]])
    # the below-threshold CMB-4 is reported as such, and is no label itself (an unmarked candidate)
    assert [f["status"] for f in saved["findings"]][3] == review.BELOW_THRESHOLD


def test_the_complete_mark_is_a_node_attribute_kept_in_the_scene(mrml, tmp_path):
    node = _node(mrml)
    for index in range(3):
        review.set_state(node, index, "rejected")
    review.set_review_complete(node)
    assert node.GetAttribute(review.REVIEW_COMPLETE_ATTRIBUTE) == "1"
    scene_file = tmp_path / "scene.mrml"
    mrml.scene.SetURL(str(scene_file))
    assert mrml.scene.Commit()
    assert review.REVIEW_COMPLETE_ATTRIBUTE in scene_file.read_text()
