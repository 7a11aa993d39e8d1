"""The review layer on real MRML (slicer-core): markups loading, states, save/reload, threshold, exports.

Volumes here are small synthetic ones built in the test (an oblique, anisotropic grid so that axis-order
and IJK->RAS mistakes show); the scene, logics, storage nodes and files are real.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from CMBDetectorLib.findings import (CSV_COLUMNS, Finding, read_csv, read_markups_json, write_csv,
                                     write_markups_json)
from CMBDetectorLib.image import Volume

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("needs slicer-core", allow_module_level=True)

from CMBDetectorLib import review  # noqa: E402  (imports slicer lazily, but keep the skip first)


def oblique_affine(spacing=(0.5, 0.6, 2.0), degrees=20.0, origin=(-30.0, 25.0, -10.0)) -> np.ndarray:
    """IJK->RAS with a rotation about S and unequal spacing, like an oblique axial SWI."""
    angle = math.radians(degrees)
    rotation = np.array([[math.cos(angle), -math.sin(angle), 0.0],
                         [math.sin(angle), math.cos(angle), 0.0],
                         [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def synthetic_volume(shape=(60, 50, 12)) -> Volume:
    """float32 (I, J, K) ramp, so every voxel value tells its own index: value = i + 100 j + 10000 k."""
    i, j, k = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return Volume((i + 100 * j + 10000 * k).astype(np.float32), oblique_affine())


def sample_findings(volume: Volume) -> list:
    """Four findings at known voxel centres, with regions, lobes, decreasing scores and what kept them."""
    voxels = [(10, 10, 3), (40, 20, 6), (25, 35, 9), (50, 40, 2)]
    regions = [("lobar", "frontal"), ("deep", ""), ("infratentorial", ""), ("lobar", "occipital")]
    scores = [0.95, 0.8, 0.55, 0.3]
    diameters = [4.0, 3.0, 6.0, 2.5]
    kept_by = ["networks", "networks", "criteria", "networks"]
    return [Finding(label=f"CMB-{n + 1}", position_ras=tuple(volume.ijk_to_ras(ijk)[0]), score=score,
                    diameter_mm=diameter, region=region, lobe=lobe, kept_by=kept)
            for n, (ijk, (region, lobe), score, diameter, kept) in enumerate(zip(voxels, regions, scores, diameters,
                                                                                   kept_by))]


def point_ras(node, index: int) -> np.ndarray:
    position = [0.0, 0.0, 0.0]
    node.GetNthControlPointPositionWorld(index, position)
    return np.asarray(position)


def save_and_reload(mrml, node, directory, name="reloaded"):
    """Write `node` with its own storage node (.mrk.json) and load it back with the markups logic."""
    path = directory / f"{name}.mrk.json"
    storage = node.CreateDefaultStorageNode()
    storage.SetFileName(str(path))
    assert storage.WriteData(node) == 1
    mrml.scene.AddNode(storage)  # keep it alive with the scene
    return review.load_findings_markups(mrml.markups_logic, mrml.scene, path, name=name), path


# ------------------------------------------------------------------------------------------------


def test_volume_node_matches_volume_geometry_and_voxel_order(mrml):
    volume = synthetic_volume()
    node = review.volume_node_from_volume(mrml.scene, volume, "swi")
    assert node.GetImageData().GetDimensions() == volume.shape
    matrix = slicer.util.arrayFromVTKMatrix(_ijk_to_ras(node))
    np.testing.assert_allclose(matrix, volume.affine, atol=1e-9)
    assert node.GetSpacing() == pytest.approx(tuple(volume.spacing))
    # VTK's scalar at (i, j, k) must be the Volume's array[i, j, k]
    image = node.GetImageData()
    for ijk in [(0, 0, 0), (59, 0, 0), (3, 49, 0), (7, 8, 11)]:
        assert image.GetScalarComponentAsDouble(*ijk, 0) == volume.array[ijk]
    back = review.volume_from_volume_node(node)
    np.testing.assert_array_equal(back.array, volume.array)
    np.testing.assert_allclose(back.affine, volume.affine)


def _ijk_to_ras(node):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return matrix


def test_findings_file_loads_at_the_right_ras_positions(mrml, tmp_path):
    volume = synthetic_volume()
    volume_node = review.volume_node_from_volume(mrml.scene, volume, "swi")
    findings = sample_findings(volume)
    write_markups_json(findings, tmp_path / "scan.mrk.json")
    write_csv(findings, tmp_path / "scan.csv")
    node = review.load_findings_markups(mrml.markups_logic, mrml.scene, tmp_path / "scan.mrk.json")
    assert node.GetNumberOfControlPoints() == len(findings)
    ras_to_ijk = np.linalg.inv(slicer.util.arrayFromVTKMatrix(_ijk_to_ras(volume_node)))
    for index, finding in enumerate(findings):
        ras = point_ras(node, index)
        np.testing.assert_allclose(ras, finding.position_ras, atol=1e-4)
        # and through the volume node's own geometry, the point lands on the voxel it was made from
        ijk = ras_to_ijk[:3, :3] @ ras + ras_to_ijk[:3, 3]
        np.testing.assert_allclose(ijk, volume.ras_to_ijk(finding.position_ras)[0], atol=1e-4)
    rows = review.review_table(node)
    assert [r["label"] for r in rows] == [f.label for f in findings]
    assert [r["score"] for r in rows] == pytest.approx([f.score for f in findings])
    assert [r["diameter_mm"] for r in rows] == pytest.approx([f.diameter_mm for f in findings])
    # region/lobe/kept_by: from the file's measurements, else from the STEM.csv beside it
    assert [(r["region"], r["lobe"], r["kept_by"]) for r in rows] == [(f.region, f.lobe, f.kept_by) for f in findings]
    assert {r["state"] for r in rows} == {"pending"}

    document = json.loads((tmp_path / "scan.mrk.json").read_text())  # a markups file without measurements
    document["markups"][0]["measurements"] = []
    (tmp_path / "bare.mrk.json").write_text(json.dumps(document))
    bare = review.load_findings_markups(mrml.markups_logic, mrml.scene, tmp_path / "bare.mrk.json",
                                        csv_path=tmp_path / "scan.csv")
    assert [(r["region"], r["lobe"], r["kept_by"]) for r in review.review_table(bare)] == \
        [(f.region, f.lobe, f.kept_by) for f in findings]


def test_states_change_label_and_flags(mrml):
    findings = sample_findings(synthetic_volume())
    node = review.findings_to_markups_node(mrml.scene, findings)
    review.set_state(node, 0, "accepted")
    review.set_state(node, 1, "rejected")
    assert [review.get_state(node, i) for i in range(4)] == ["accepted", "rejected", "pending", "pending"]
    assert node.GetNthControlPointLabel(0) == "CMB-1 [A]"
    assert node.GetNthControlPointLabel(1) == "CMB-2 [R]"
    assert node.GetNthControlPointLabel(2) == "CMB-3"
    assert [bool(node.GetNthControlPointSelected(i)) for i in range(4)] == [False, False, True, True]
    assert bool(node.GetNthControlPointLocked(1)) and not node.GetNthControlPointLocked(0)
    # changing one's mind replaces the suffix instead of stacking it
    review.set_state(node, 1, "accepted")
    review.set_state(node, 1, "pending")
    assert node.GetNthControlPointLabel(1) == "CMB-2"
    assert review.base_label(node, 0) == "CMB-1"
    with pytest.raises(Exception, match="unknown review state"):
        review.set_state(node, 0, "maybe")
    display = node.GetDisplayNode()
    assert display.GetSelectedColor() == pytest.approx(review.PENDING_COLOR)
    assert display.GetColor() == pytest.approx(review.DECIDED_COLOR)


def test_review_survives_save_and_reload(mrml, tmp_path):
    findings = sample_findings(synthetic_volume())
    node = review.findings_to_markups_node(mrml.scene, findings, "review")
    review.set_state(node, 0, "accepted")
    review.set_state(node, 2, "rejected")
    node.AddControlPoint([1.0, 2.0, 3.0])  # placed by the reader
    review.reconcile(node)
    review.set_point_values(node, 4, diameter_mm=3.5, region="deep")
    review.apply_threshold(node, 0.5)
    before_rows, before_counts = review.review_table(node), review.review_counts(node)

    reloaded, path = save_and_reload(mrml, node, tmp_path)
    document = json.loads(path.read_text())
    names = {m["name"] for m in document["markups"][0]["measurements"]}
    assert {"score", "diameter", "region", "lobe", "kept_by"} <= names
    after_rows = review.review_table(reloaded)
    assert len(after_rows) == len(before_rows) == 5
    assert [r["kept_by"] for r in after_rows] == ["networks", "networks", "criteria", "networks", ""]
    for before, after in zip(before_rows, after_rows):
        for key in ("label", "state", "region", "lobe", "kept_by", "visible"):
            assert after[key] == before[key], key
        for key in ("score", "diameter_mm"):
            assert (math.isnan(after[key]) and math.isnan(before[key])) or after[key] == pytest.approx(before[key])
        np.testing.assert_allclose(after["position_ras"], before["position_ras"], atol=1e-6)
    assert review.review_counts(reloaded) == before_counts
    assert before_counts["accepted"] == 1 and before_counts["rejected"] == 1 and before_counts["added"] == 1
    # findings' own reader understands the saved review
    states = [f.status for f in read_markups_json(path)]
    assert states == ["accepted", "pending", "rejected", "pending", "added"]
    assert [f.kept_by for f in read_markups_json(path)] == ["networks", "networks", "criteria", "networks", ""]


def test_threshold_hides_without_deleting(mrml):
    findings = sample_findings(synthetic_volume())
    node = review.findings_to_markups_node(mrml.scene, findings)
    review.set_state(node, 3, "accepted")  # score 0.3, but the reader said yes
    hidden = review.apply_threshold(node, 0.6)
    assert hidden == 1  # CMB-3 (0.55); CMB-4 is accepted and stays
    assert node.GetNumberOfControlPoints() == 4
    assert [bool(node.GetNthControlPointVisibility(i)) for i in range(4)] == [True, True, False, True]
    assert review.next_index(node, 1) == 3  # navigation skips the hidden point
    assert review.next_index(node, 0, step=-1) == 3
    assert review.apply_threshold(node, 0.0) == 0
    assert all(node.GetNthControlPointVisibility(i) for i in range(4))
    assert review.apply_threshold(node, 0.99) == 3


def test_reader_placed_point_counts_as_added(mrml):
    findings = sample_findings(synthetic_volume())
    node = review.findings_to_markups_node(mrml.scene, findings)
    new_index = node.AddControlPoint([5.0, -7.0, 12.0])
    assert node.GetNthControlPointDescription(new_index) == ""
    assert review.get_state(node, new_index) == "added"  # before adoption too
    counts = review.review_counts(node)  # adopts it
    assert counts["added"] == 1 and counts["pending"] == 4 and counts["total"] == 5
    assert node.GetNthControlPointDescription(new_index) == "added"
    assert node.GetNthControlPointLabel(new_index).endswith("[+]")
    assert math.isnan(review.point_values(node, new_index)["score"])
    assert review.point_values(node, new_index)["region"] == "unknown"
    # removing a point keeps the per-point values aligned
    review.remove_point(node, 1)
    rows = review.review_table(node)
    assert [r["label"] for r in rows] == ["CMB-1", "CMB-3", "CMB-4", "CMB-5"]
    assert [r["score"] for r in rows[:3]] == pytest.approx([0.95, 0.55, 0.3])
    assert [r["region"] for r in rows] == ["lobar", "infratentorial", "lobar", "unknown"]


def test_counts_by_region(mrml):
    findings = sample_findings(synthetic_volume())
    node = review.findings_to_markups_node(mrml.scene, findings)
    for index, state in enumerate(["accepted", "rejected", "accepted", "pending"]):
        review.set_state(node, index, state)
    counts = review.review_counts(node)
    assert (counts["accepted"], counts["rejected"], counts["pending"], counts["added"]) == (2, 1, 1, 0)
    assert counts["confirmed"] == 2
    assert counts["by_region"]["lobar"]["confirmed"] == 1
    assert counts["by_region"]["lobar"]["pending"] == 1
    assert counts["by_region"]["deep"]["rejected"] == 1 and counts["by_region"]["deep"]["confirmed"] == 0
    assert counts["by_region"]["infratentorial"]["confirmed"] == 1
    assert counts["lobar_by_lobe"]["frontal"] == 1 and counts["lobar_by_lobe"]["occipital"] == 0


def test_export_csv_and_json_field_by_field(mrml, tmp_path):
    findings = sample_findings(synthetic_volume())
    node = review.findings_to_markups_node(mrml.scene, findings)
    review.set_state(node, 0, "accepted")
    review.set_state(node, 1, "rejected")
    added = node.AddControlPoint([1.5, 2.5, -3.5])
    run = review.detection_run_provenance({"model": {"file": "m.json", "sha256": "ab12", "device": "cpu"},
                                           "findings": [], "timings_s": {}})
    assert run == {"model": {"file": "m.json", "sha256": "ab12", "device": "cpu"}}  # provenance only
    document = review.export_review(node, tmp_path / "review.csv", tmp_path / "review.json", reader="Dr R",
                                    input_name="sub-01_swi.nii.gz", detection_run=run,
                                    threshold=0.5)
    with (tmp_path / "review.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0].keys()) == CSV_COLUMNS
    assert len(rows) == 5
    for row, finding, state in zip(rows, findings, ["accepted", "rejected", "pending", "pending"]):
        assert row["label"] == finding.label
        assert [float(row[c]) for c in ("x_ras", "y_ras", "z_ras")] == pytest.approx(finding.position_ras, abs=0.01)
        assert float(row["score"]) == pytest.approx(finding.score, abs=1e-4)
        assert float(row["diameter_mm"]) == pytest.approx(finding.diameter_mm, abs=0.01)
        assert (row["region"], row["lobe"], row["status"]) == (finding.region, finding.lobe, state)
        assert row["kept_by"] == finding.kept_by
    assert rows[added]["status"] == "added" and rows[added]["kept_by"] == ""
    assert [float(rows[added][c]) for c in ("x_ras", "y_ras", "z_ras")] == pytest.approx([1.5, 2.5, -3.5])
    assert [f.status for f in read_csv(tmp_path / "review.csv")] == ["accepted", "rejected", "pending", "pending", "added"]
    assert [f.kept_by for f in read_csv(tmp_path / "review.csv")] == [*(f.kept_by for f in findings), ""]

    on_disk = json.loads((tmp_path / "review.json").read_text())
    assert on_disk == json.loads(json.dumps(document))
    assert on_disk["reader"] == "Dr R" and on_disk["input"] == "sub-01_swi.nii.gz"
    assert on_disk["detection_run"] == run and on_disk["threshold"] == 0.5
    assert on_disk["reviewed_at"].endswith("+00:00")
    assert on_disk["counts"]["accepted"] == 1 and on_disk["counts"]["added"] == 1
    assert on_disk["counts"]["by_region"]["lobar"]["confirmed"] == 1
    assert [f["status"] for f in on_disk["findings"]] == ["accepted", "rejected", "pending", "pending", "added"]
    assert on_disk["findings"][added]["score"] is None  # unknown, not NaN (JSON has no NaN)
    assert [f["kept_by"] for f in on_disk["findings"]] == ["networks", "networks", "criteria", "networks", ""]
    assert on_disk["findings"][0]["position_ras"] == pytest.approx(list(findings[0].position_ras), abs=1e-4)


def test_labelmap_holds_accepted_lesions_only(mrml):
    volume = synthetic_volume()
    volume_node = review.volume_node_from_volume(mrml.scene, volume, "swi")
    findings = sample_findings(volume)
    node = review.findings_to_markups_node(mrml.scene, findings)
    review.set_state(node, 0, "accepted")   # 4 mm diameter
    review.set_state(node, 1, "rejected")
    review.set_state(node, 2, "accepted")   # 6 mm diameter
    labelmap = review.export_accepted_labelmap(mrml.scene, node, volume_node, radius_mm=1.0)
    assert labelmap.IsA("vtkMRMLLabelMapVolumeNode")
    np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(_ijk_to_ras(labelmap)), volume.affine)
    labels = np.transpose(slicer.util.arrayFromVolume(labelmap), (2, 1, 0))  # -> (I, J, K)
    assert labels.shape == volume.shape
    assert set(np.unique(labels)) == {0, 1, 3}
    voxel_volume = float(np.prod(volume.spacing))
    for value, finding in ((1, findings[0]), (3, findings[2])):
        ijk = np.argwhere(labels == value)
        centre = volume.ijk_to_ras(ijk).mean(axis=0)
        assert np.linalg.norm(centre - np.asarray(finding.position_ras)) < 0.6
        sphere_mm3 = math.pi / 6 * finding.diameter_mm ** 3
        assert len(ijk) * voxel_volume == pytest.approx(sphere_mm3, rel=0.35)
        inside = np.linalg.norm(volume.ijk_to_ras(ijk) - np.asarray(finding.position_ras), axis=1)
        assert inside.max() <= finding.diameter_mm / 2 + 1e-6
    for finding in (findings[1], findings[3]):  # rejected and pending: nothing painted there
        ijk = np.rint(volume.ras_to_ijk(finding.position_ras)[0]).astype(int)
        assert labels[tuple(ijk)] == 0


# ---- per-point values stay with their own point, however points are removed ----------------------


def expected_by_label(findings: list) -> dict:
    return {f.label: (f.score, f.diameter_mm, f.region, f.lobe, f.kept_by) for f in findings}


def assert_values_follow_their_points(node, findings: list) -> None:
    """Every detector point's score, size, region, lobe and kept_by are its own Finding's, in the table
    and in the measurement arrays Slicer writes to .mrk.json."""
    expected = expected_by_label(findings)
    rows = review.review_table(node)
    for row in rows:
        if row["label"] in expected:
            score, diameter, region, lobe, kept_by = expected[row["label"]]
            assert (row["score"], row["diameter_mm"], row["region"], row["lobe"], row["kept_by"]) == \
                (pytest.approx(score), pytest.approx(diameter), region, lobe, kept_by), row["label"]
    scores = [node.GetMeasurement("score").GetControlPointValues().GetValue(i)
              for i in range(node.GetMeasurement("score").GetControlPointValues().GetNumberOfTuples())]
    assert len(scores) == node.GetNumberOfControlPoints()
    for row, score in zip(rows, scores):
        assert (math.isnan(score) and math.isnan(row["score"])) or score == pytest.approx(row["score"])


def remove_by_label(node, label: str) -> None:
    """Remove the point the way the Markups toolbar and scripts do: by index, nothing else."""
    index = next(i for i in range(node.GetNumberOfControlPoints()) if review.base_label(node, i) == label)
    node.RemoveNthControlPoint(index)


def test_values_follow_their_points_after_single_removals(mrml):
    findings = sample_findings(synthetic_volume())
    node = review.findings_to_markups_node(mrml.scene, findings)
    review.set_state(node, 3, "accepted")
    remove_by_label(node, "CMB-2")
    assert_values_follow_their_points(node, findings)
    remove_by_label(node, "CMB-1")
    assert [r["label"] for r in review.review_table(node)] == ["CMB-3", "CMB-4"]
    assert_values_follow_their_points(node, findings)
    assert review.get_state(node, 1) == "accepted"


def test_values_follow_their_points_when_removals_are_never_observed(mrml):
    """Several removals and an addition with no review call in between (the panel was closed)."""
    findings = sample_findings(synthetic_volume())
    node = review.findings_to_markups_node(mrml.scene, findings)
    remove_by_label(node, "CMB-1")
    remove_by_label(node, "CMB-3")
    node.AddControlPoint([3.0, 4.0, 5.0])
    rows = review.review_table(node)
    assert [r["label"] for r in rows[:2]] == ["CMB-2", "CMB-4"]
    assert rows[2]["state"] == "added" and math.isnan(rows[2]["score"]) and rows[2]["region"] == "unknown"
    assert_values_follow_their_points(node, findings)


def test_values_follow_their_points_in_a_modify_batch(mrml):
    """Removals between StartModify and EndModify arrive deferred, without an index."""
    findings = sample_findings(synthetic_volume())
    node = review.findings_to_markups_node(mrml.scene, findings)
    removed_events = []
    tag = node.AddObserver(slicer.vtkMRMLMarkupsNode.PointRemovedEvent, lambda caller, event: removed_events.append(1))
    was_modifying = node.StartModify()
    remove_by_label(node, "CMB-1")
    remove_by_label(node, "CMB-3")
    node.EndModify(was_modifying)
    node.RemoveObserver(tag)
    assert removed_events  # the batch did announce removals
    assert [r["label"] for r in review.review_table(node)] == ["CMB-2", "CMB-4"]
    assert_values_follow_their_points(node, findings)


def test_delete_all_then_new_points_inherit_nothing(mrml):
    """RemoveAllControlPoints restarts ID numbering: the reader's next point gets ID "1" again, which
    must not bring back CMB-1's score, size or region."""
    findings = sample_findings(synthetic_volume())
    node = review.findings_to_markups_node(mrml.scene, findings)
    reused_id = node.GetNthControlPointID(0)
    node.RemoveAllControlPoints()
    new_index = node.AddControlPoint([1.0, 1.0, 1.0])
    assert node.GetNthControlPointID(new_index) == reused_id
    rows = review.review_table(node)
    assert len(rows) == 1 and rows[0]["state"] == "added"
    assert math.isnan(rows[0]["score"]) and math.isnan(rows[0]["diameter_mm"])
    assert (rows[0]["region"], rows[0]["lobe"]) == ("unknown", "")
    assert review.review_counts(node)["total"] == 1


def test_a_review_saved_before_kept_by_existed_reads_it_as_unknown(mrml, tmp_path):
    """Scenes and files from before the "kept_by" code hold four values per point and no such measurement:
    they load with kept_by unknown (""), every other value in place, and the first save writes the code."""
    findings = sample_findings(synthetic_volume())
    node = review.findings_to_markups_node(mrml.scene, findings, "older")
    stored = json.loads(node.GetAttribute(review.POINT_VALUES_ATTRIBUTE))
    node.SetAttribute(review.POINT_VALUES_ATTRIBUTE, json.dumps({key: values[:4] for key, values in stored.items()}))
    node.RemoveNthMeasurement(next(i for i in range(node.GetNumberOfMeasurements())
                                   if node.GetNthMeasurement(i).GetName() == "kept_by"))
    assert node.GetMeasurement("kept_by") is None
    rows = review.review_table(node)
    assert [r["kept_by"] for r in rows] == ["", "", "", ""]
    assert [r["score"] for r in rows] == pytest.approx([0.95, 0.8, 0.55, 0.3])
    assert [(r["region"], r["lobe"]) for r in rows] == [(f.region, f.lobe) for f in findings]
    review.set_state(node, 0, "accepted")
    reloaded, path = save_and_reload(mrml, node, tmp_path, "resaved")
    assert [r["kept_by"] for r in review.review_table(reloaded)] == ["", "", "", ""]
    assert "kept_by" in {m["name"] for m in json.loads(path.read_text())["markups"][0]["measurements"]}

    older_csv = tmp_path / "older.csv"  # a findings CSV without the kept_by column
    write_csv(findings, older_csv)
    lines = older_csv.read_text().splitlines()
    older_csv.write_text("\n".join(line.rsplit(",", 1)[0] for line in lines) + "\n")
    assert [f.kept_by for f in read_csv(older_csv)] == ["", "", "", ""]


def test_saved_after_unobserved_removal_loads_without_misattribution(mrml, tmp_path):
    """A node saved right after a removal nobody reconciled has measurement arrays one value too long;
    on reload nobody can tell which value is whose, so they are unknown rather than wrong. Once
    reconciled, the saved file holds every value at its own point."""
    findings = sample_findings(synthetic_volume())
    node = review.findings_to_markups_node(mrml.scene, findings, "review")
    remove_by_label(node, "CMB-2")
    stale, _ = save_and_reload(mrml, node, tmp_path, "stale")
    stale_rows = review.review_table(stale)
    assert [r["label"] for r in stale_rows] == ["CMB-1", "CMB-3", "CMB-4"]
    assert all(math.isnan(r["score"]) for r in stale_rows)
    review.reconcile(node)
    reloaded, _ = save_and_reload(mrml, node, tmp_path, "reconciled")
    assert_values_follow_their_points(reloaded, findings)
    assert [r["score"] for r in review.review_table(reloaded)] == pytest.approx([0.95, 0.55, 0.3])


def test_a_node_not_from_the_detector_is_only_read_until_adopted(mrml):
    landmarks = mrml.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "landmarks")
    landmarks.AddControlPoint([0.0, 60.0, 0.0], "nasion")
    landmarks.AddControlPoint([0.0, -90.0, 0.0], "inion")

    def snapshot():
        return ([(landmarks.GetNthControlPointLabel(i), landmarks.GetNthControlPointDescription(i),
                  bool(landmarks.GetNthControlPointSelected(i)), bool(landmarks.GetNthControlPointLocked(i)))
                 for i in range(landmarks.GetNumberOfControlPoints())], landmarks.GetNumberOfMeasurements())

    before = snapshot()
    rows = review.review_table(landmarks)
    review.review_counts(landmarks)
    assert [r["label"] for r in rows] == ["nasion", "inion"]
    assert snapshot() == before
    assert not review.is_review_node(landmarks)
    for write in (lambda: review.set_state(landmarks, 0, "accepted"), lambda: review.apply_threshold(landmarks, 0.5),
                  lambda: review.set_point_values(landmarks, 0, score=0.5)):
        with pytest.raises(Exception, match="not a CMBDetector review node"):
            write()
    assert snapshot() == before

    review.adopt_node(landmarks)  # the reader's explicit choice
    assert review.is_review_node(landmarks)
    assert [r["state"] for r in review.review_table(landmarks)] == ["pending", "pending"]
    review.set_state(landmarks, 0, "accepted")
    assert landmarks.GetNthControlPointLabel(0) == "nasion [A]"


# ---- review flow: undo, back to pending, the threshold both ways, one labelmap -------------------


def test_undo_puts_back_the_previous_state_and_pending_is_reachable(mrml):
    findings = sample_findings(synthetic_volume())
    node = review.findings_to_markups_node(mrml.scene, findings)
    review.set_state(node, 0, "accepted")
    review.set_state(node, 1, "rejected")
    review.set_state(node, 0, "rejected")  # changed my mind
    assert review.undo_last_decision(node) == 0 and review.get_state(node, 0) == "accepted"
    assert review.undo_last_decision(node) == 1 and review.get_state(node, 1) == "pending"
    assert node.GetNthControlPointLabel(1) == "CMB-2" and node.GetNthControlPointSelected(1)
    assert not node.GetNthControlPointLocked(1)  # a rejected point is locked; undone, it is free again
    review.set_state(node, 2, "accepted")
    remove_by_label(node, "CMB-3")  # the decided point is gone: undo skips it
    assert review.undo_last_decision(node) == 0 and review.get_state(node, 0) == "pending"
    assert review.undo_last_decision(node) == -1
    review.set_state(node, 0, "accepted")
    review.set_state(node, 0, "pending")  # back to pending directly
    assert review.get_state(node, 0) == "pending" and node.GetNthControlPointLabel(0) == "CMB-1"


def test_threshold_reveals_as_well_as_hides_and_hidden_pending_counts_as_below_threshold(mrml, tmp_path):
    findings = sample_findings(synthetic_volume())  # scores 0.95, 0.8, 0.55, 0.3
    node = review.findings_to_markups_node(mrml.scene, findings)
    review.set_state(node, 2, "rejected")
    review.apply_threshold(node, 0.6)
    counts = review.review_counts(node)
    assert (counts["pending"], counts["below_threshold"], counts["rejected"]) == (2, 1, 1)
    review.apply_threshold(node, 0.2)  # lower: CMB-4 comes back as pending
    assert all(node.GetNthControlPointVisibility(i) for i in range(4))
    counts = review.review_counts(node)
    assert (counts["pending"], counts["below_threshold"]) == (3, 0)
    review.apply_threshold(node, 0.9)
    document = review.export_review(node, tmp_path / "r.csv", tmp_path / "r.json")
    assert [f["status"] for f in document["findings"]] == ["pending", "below_threshold", "rejected",
                                                            "below_threshold"]
    assert document["counts"]["below_threshold"] == 2 and document["counts"]["total"] == 4


def test_labelmap_export_updates_one_node_in_place(mrml):
    volume = synthetic_volume()
    volume_node = review.volume_node_from_volume(mrml.scene, volume, "swi")
    node = review.findings_to_markups_node(mrml.scene, sample_findings(volume))
    review.set_state(node, 0, "accepted")
    first = review.export_accepted_labelmap(mrml.scene, node, volume_node)
    count = mrml.scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode")
    review.set_state(node, 2, "accepted")
    second = review.export_accepted_labelmap(mrml.scene, node, volume_node)
    assert second.GetID() == first.GetID()
    assert mrml.scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == count
    assert set(np.unique(slicer.util.arrayFromVolume(second))) == {0, 1, 3}
