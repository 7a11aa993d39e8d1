"""The review layer: review states, counts and exports over a Slicer markups fiducial node.

MRML only: this module uses `slicer` MRML classes (from the desktop application or from the
`slicer-core` wheel) and `vtk`, never Qt, so the module widget, the module logic, the self-test and
pytest all call the same functions.

How a finding lives in a markups node (one control point per finding):
- position: the control point position, RAS millimetres (world frame).
- review state: the control point *description*, one word of vocabulary.REVIEW_STATES. A point the reader
  places has an empty description; it counts as "added" (reconcile writes the word).
- score, diameter, region, lobe, kept_by: keyed by control point ID in a node attribute (see "Per-point
  values" below), and copied in control point order into static measurements
  (vtkMRMLStaticMeasurement), which Slicer shows and writes to `.mrk.json`. Region, lobe and kept_by
  are stored as codes: vocabulary.CODED_FIELDS, code_of and word_of_code (NaN = unknown).
- only review nodes (made by the detector, loaded from its files, or adopted by the reader) are
  ever written; see is_review_node.

What the reader sees at a glance (a markups display node has only Color and SelectedColor):
- pending points are *selected*: drawn in SelectedColor (amber), label "CMB-3".
- decided points are *unselected*: drawn in Color (cyan), and the label carries the decision:
  "CMB-3 [A]" accepted, "CMB-3 [R]" rejected, "CMB-7 [+]" added by the reader.
- rejected points are also locked, so they cannot be dragged by accident.
"""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path

import numpy as np

from . import __version__
from .errors import CMBError, InputError
from .findings import Finding, read_csv, write_csv
from .vocabulary import (BELOW_THRESHOLD, CODED_FIELDS, CONFIRMED_STATES, DECIDED_COLOR, FINDINGS_CSV_SUFFIX,
                         LABEL_FORMAT, LABEL_SUFFIX, LOBES, MEASUREMENTS, PENDING, PENDING_COLOR, REGIONS, REJECTED,
                         REVIEW_STATES, code_of, output_stem, word_of_code)
from .vocabulary import base_label as _base_label

# Detection from the module keeps findings down to this score (the benchmark's FROC floor) while the
# review starts at the tuned operating point: lowering the slider then reveals what the run scored lower.
DETECTION_FLOOR = 0.05
# Node attributes this layer owns
REVIEW_NODE_ATTRIBUTE = "CMBDetector.ReviewNode"    # "1" on nodes this layer may write
# JSON {control point ID: [one value per MEASUREMENTS: score, diameter, then the codes of CODED_FIELDS]}
POINT_VALUES_ATTRIBUTE = "CMBDetector.PointValues"
DETECTION_RUN_ATTRIBUTE = "CMBDetector.DetectionRun"  # JSON: the run's models, hashes, versions, thresholds
DECISION_HISTORY_ATTRIBUTE = "CMBDetector.DecisionHistory"  # JSON [[control point ID, state before]], for undo
DECISION_HISTORY_LENGTH = 200
ACCEPTED_LABELMAP_ROLE = "CMBDetectorAcceptedLabelmap"  # node reference: the one labelmap of a review node
REVIEW_COMPLETE_ATTRIBUTE = "CMBDetector.ReviewComplete"  # "1": the reader read the whole scan (see set_review_complete)


# ---------------------------------------------------------------------------------------------
# Which nodes are reviews
# ---------------------------------------------------------------------------------------------

def is_review_node(node) -> bool:
    """True for nodes made by the detector (or loaded from its files) and nodes the reader adopted.

    Only these are ever written to: choosing some other fiducial node (landmarks, say) shows it
    read-only until the reader adopts it.
    """
    return node is not None and node.GetAttribute(REVIEW_NODE_ATTRIBUTE) == "1"


def adopt_node(node, unset_state: str = "pending"):
    """Make `node` a review node (no-op when it is one): mark it, key its per-point values by control
    point ID, give points without a review word `unset_state`, and style every point.

    Values come from the node's measurement arrays only when each holds exactly one value per point
    (a freshly loaded file); otherwise nobody can tell which value belongs to which point, so they are
    unknown (NaN) rather than attached to the wrong finding.
    """
    if is_review_node(node):
        return node
    node.SetAttribute(REVIEW_NODE_ATTRIBUTE, "1")
    node.SetMarkupLabelFormat(LABEL_FORMAT)
    _store_values(node, _values_from_measurements(node))
    was_modifying = node.StartModify()
    for index in range(node.GetNumberOfControlPoints()):
        if node.GetNthControlPointDescription(index).strip().lower() not in REVIEW_STATES:
            node.SetNthControlPointDescription(index, unset_state)
    node.EndModify(was_modifying)
    style_node(node)
    return node


def _require_review_node(node) -> None:
    if not is_review_node(node):
        name = node.GetName() if node is not None else "None"
        raise CMBError(f"{name} is not a CMBDetector review node; adopt it for review first")


# ---------------------------------------------------------------------------------------------
# Building a node
# ---------------------------------------------------------------------------------------------

def findings_to_markups_node(scene, findings: list, name: str = "CMB detections"):
    """A new review node (vtkMRMLMarkupsFiducialNode) in `scene`, one control point per Finding."""
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    node.CreateDefaultDisplayNodes()
    node.SetMarkupLabelFormat(LABEL_FORMAT)
    node.SetAttribute(REVIEW_NODE_ATTRIBUTE, "1")
    values = {}
    was_modifying = node.StartModify()
    for finding in findings:
        index = node.AddControlPoint([float(v) for v in finding.position_ras], finding.label)
        node.SetNthControlPointDescription(index, finding.status if finding.status in REVIEW_STATES else "pending")
        values[node.GetNthControlPointID(index)] = [float(finding.score), float(finding.diameter_mm),
                                                    *(code_of(name, getattr(finding, name)) for name in CODED_FIELDS)]
    node.EndModify(was_modifying)
    _store_values(node, values)
    style_node(node)
    return node


def load_findings_markups(markups_logic, scene, mrk_path, name: str | None = None, csv_path=None):
    """Load a STEM.mrk.json (from `cmbdetector detect` or a saved review) as a review node.

    Region, lobe and kept_by come from the file's measurements when present; otherwise from the STEM.csv
    beside it (or `csv_path`), matched by label. Points without a review word (placed by a
    reader and saved before the module saw them) are "added". Returns the styled markups node.
    """
    mrk_path = Path(mrk_path)
    if not mrk_path.is_file():
        raise InputError(f"markups file not found: {mrk_path}")
    node_id = markups_logic.LoadMarkups(str(mrk_path), name or output_stem(mrk_path))
    node = scene.GetNodeByID(node_id) if node_id else None
    if node is None:
        raise InputError(f"Slicer could not load the markups file {mrk_path}")
    csv_path = Path(csv_path) if csv_path else mrk_path.with_name(output_stem(mrk_path) + FINDINGS_CSV_SUFFIX)
    if node.GetMeasurement("region") is None and csv_path.is_file():
        _codes_from_csv(node, csv_path)
    return adopt_node(node, unset_state="added")


def _codes_from_csv(node, csv_path: Path) -> None:
    """The coded measurements (region, lobe, kept_by) from the findings CSV, matched by label."""
    by_label = {f.label: f for f in read_csv(csv_path)}
    rows = [by_label.get(base_label(node, i)) for i in range(node.GetNumberOfControlPoints())]
    for name in CODED_FIELDS:
        _set_measurement_values(node, name, [code_of(name, getattr(r, name)) if r else math.nan for r in rows])


# ---------------------------------------------------------------------------------------------
# Per-point values: keyed by control point ID, mirrored into measurements
# ---------------------------------------------------------------------------------------------
# The truth is the node attribute POINT_VALUES_ATTRIBUTE, {control point ID: [score, diameter,
# region code, lobe code, kept_by code]}: an ID stays with its point whatever removes points (the
# Markups toolbar, "Delete all", scripts, StartModify/EndModify batches, edits while no panel observes
# the node).
# The static measurements are a copy in control point order, rewritten by reconcile(), because they
# are what Slicer shows and writes to .mrk.json.

def _values_by_id(node) -> dict:
    """{ID: values}; a scene saved before a measurement existed has shorter lists: unknown (NaN) there."""
    text = node.GetAttribute(POINT_VALUES_ATTRIBUTE)
    stored = json.loads(text) if text else {}
    return {point_id: values + _unknown_values()[len(values):] for point_id, values in stored.items()}


def _point_ids(node) -> list:
    return [node.GetNthControlPointID(i) for i in range(node.GetNumberOfControlPoints())]


def _unknown_values() -> list:
    return [math.nan] * len(MEASUREMENTS)


def _values_from_measurements(node) -> dict:
    """{ID: values} read from the measurement arrays; a column not one-per-point is unknown (NaN)."""
    ids = _point_ids(node)
    columns = []
    for measurement_name in MEASUREMENTS:
        column = _measurement_values(node, measurement_name)
        columns.append(column if len(column) == len(ids) else [math.nan] * len(ids))
    return {point_id: [float(column[i]) for column in columns] for i, point_id in enumerate(ids)}


def _values_of(node) -> dict:
    """{ID: values} of any node: the keyed values of a review node, else its measurements (read-only)."""
    return _values_by_id(node) if is_review_node(node) else _values_from_measurements(node)


def _store_values(node, values: dict) -> None:
    """Keep the values of the node's present points and mirror them into the measurements."""
    ids = _point_ids(node)
    kept = {point_id: values.get(point_id, _unknown_values()) for point_id in ids}
    text = json.dumps(kept)
    if node.GetAttribute(POINT_VALUES_ATTRIBUTE) != text:
        node.SetAttribute(POINT_VALUES_ATTRIBUTE, text)
    for column, measurement_name in enumerate(MEASUREMENTS):
        wanted = [kept[point_id][column] for point_id in ids]
        if not _same_values(_measurement_values(node, measurement_name), wanted) or \
                node.GetMeasurement(measurement_name) is None:
            _set_measurement_values(node, measurement_name, wanted)


def _same_values(first: list, second: list) -> bool:
    return len(first) == len(second) and all(
        a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(first, second))


def _set_measurement_values(node, measurement_name: str, values) -> None:
    """Replace (or create) the static measurement `measurement_name` with one value per point."""
    import slicer
    import vtk

    array = vtk.vtkDoubleArray()
    array.SetName(measurement_name)
    for value in values:
        array.InsertNextValue(float(value) if value is not None else math.nan)
    measurement = node.GetMeasurement(measurement_name)
    if measurement is None:
        measurement = slicer.vtkMRMLStaticMeasurement()
        measurement.SetName(measurement_name)
        units, print_format = MEASUREMENTS[measurement_name]
        measurement.SetUnits(units)
        measurement.SetPrintFormat(print_format)
        measurement.SetEnabled(True)
        measurement.SetControlPointValues(array)
        node.AddMeasurement(measurement)
    else:
        measurement.SetControlPointValues(array)


def _measurement_values(node, measurement_name: str) -> list:
    """The measurement's values as a list of floats (any length: Slicer does not keep it aligned)."""
    measurement = node.GetMeasurement(measurement_name)
    array = measurement.GetControlPointValues() if measurement is not None else None
    if array is None:
        return []
    return [array.GetValue(i) for i in range(array.GetNumberOfTuples())]


def point_values(node, index: int, values: dict | None = None) -> dict:
    """score, diameter_mm (NaN when unknown), region, lobe, kept_by ("unknown"/""/"" when unknown) of point
    `index`.

    values: {ID: values} from _values_of, to avoid re-reading per point.
    """
    values = _values_of(node) if values is None else values
    record = dict(zip(MEASUREMENTS, values.get(node.GetNthControlPointID(index), _unknown_values())))
    return {"score": float(record["score"]), "diameter_mm": float(record["diameter"]),
            **{name: word_of_code(name, record[name]) for name in CODED_FIELDS}}


def set_point_values(node, index: int, score=None, diameter_mm=None, region=None, lobe=None) -> None:
    """Change some per-point values of point `index` (None leaves a value as it is)."""
    _require_review_node(node)
    reconcile(node)
    values = _values_by_id(node)
    record = values[node.GetNthControlPointID(index)]
    updates = {"score": score, "diameter": diameter_mm,
               "region": None if region is None else code_of("region", region),
               "lobe": None if lobe is None else code_of("lobe", lobe)}
    for column, name in enumerate(MEASUREMENTS):
        if updates.get(name) is not None:
            record[column] = float(updates[name])
    _store_values(node, values)


def reconcile(node) -> list:
    """Bring a review node up to date after anyone added or removed points (no-op on other nodes).

    Points without a values record (placed by the reader) get unknown values and, when they have no
    review word, the state "added"; records of removed points are dropped; the measurement copies are
    rewritten in the current point order. Returns the indices of the newly adopted points.
    """
    if not is_review_node(node):
        return []
    values = _values_by_id(node)
    adopted = [i for i in range(node.GetNumberOfControlPoints())
               if node.GetNthControlPointDescription(i).strip().lower() not in REVIEW_STATES]
    for index in adopted:
        # RemoveAllControlPoints restarts ID numbering: a new point may carry a deleted point's ID,
        # but never its review word, so a point without one never inherits a record
        values[node.GetNthControlPointID(index)] = _unknown_values()
    _store_values(node, values)
    for index in adopted:
        set_state(node, index, "added")
    return adopted


def remove_point(node, index: int) -> None:
    """Delete point `index` (its values go with it: they are keyed by its ID)."""
    _require_review_node(node)
    node.RemoveNthControlPoint(index)
    reconcile(node)


# ---------------------------------------------------------------------------------------------
# Review states and their look
# ---------------------------------------------------------------------------------------------

def get_state(node, index: int) -> str:
    """Review state of point `index`; an empty or unknown description is a reader-placed point: "added"."""
    word = node.GetNthControlPointDescription(index).strip().lower()
    return word if word in REVIEW_STATES else "added"


def set_state(node, index: int, state: str) -> None:
    """Set the review state word and the visible cues (label suffix, selected and locked flags)."""
    _require_review_node(node)
    if state not in REVIEW_STATES:
        raise CMBError(f"unknown review state {state!r}; expected one of {', '.join(REVIEW_STATES)}")
    if not 0 <= index < node.GetNumberOfControlPoints():
        raise CMBError(f"no control point {index} in {node.GetName()} ({node.GetNumberOfControlPoints()} points)")
    previous = get_state(node, index)
    was_modifying = node.StartModify()
    node.SetNthControlPointDescription(index, state)
    _style_point(node, index, state)
    node.EndModify(was_modifying)
    if previous != state:
        history = _decision_history(node)[-(DECISION_HISTORY_LENGTH - 1):]
        node.SetAttribute(DECISION_HISTORY_ATTRIBUTE, json.dumps(history + [[node.GetNthControlPointID(index), previous]]))


def undo_last_decision(node) -> int:
    """Put back the state the last decision replaced; returns that point's index, or -1 when there is
    nothing to undo. Decisions on points deleted since are skipped (their point is gone)."""
    _require_review_node(node)
    history = _decision_history(node)
    while history:
        point_id, previous = history.pop()
        index = node.GetNthControlPointIndexByID(point_id)
        if index >= 0:
            set_state(node, index, previous)
            node.SetAttribute(DECISION_HISTORY_ATTRIBUTE, json.dumps(history))  # the undo itself is not undoable
            return index
    node.SetAttribute(DECISION_HISTORY_ATTRIBUTE, "[]")
    return -1


def _decision_history(node) -> list:
    return json.loads(node.GetAttribute(DECISION_HISTORY_ATTRIBUTE) or "[]")


def base_label(node, index: int) -> str:
    """The point's label without the review suffix, e.g. "CMB-3"."""
    return _base_label(node.GetNthControlPointLabel(index))


def _style_point(node, index: int, state: str) -> None:
    node.SetNthControlPointLabel(index, base_label(node, index) + LABEL_SUFFIX[state])
    node.SetNthControlPointSelected(index, state == "pending")
    node.SetNthControlPointLocked(index, state == "rejected")


def style_node(node) -> None:
    """Colours and label cues for every point of a review node (see the module docstring)."""
    _require_review_node(node)
    display = node.GetDisplayNode()
    if display is None:
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
    if display is not None:
        display.SetSelectedColor(*PENDING_COLOR)
        display.SetColor(*DECIDED_COLOR)
        display.SetPointLabelsVisibility(True)
    was_modifying = node.StartModify()
    for index in range(node.GetNumberOfControlPoints()):
        _style_point(node, index, get_state(node, index))
    node.EndModify(was_modifying)


# ---------------------------------------------------------------------------------------------
# Threshold, navigation, table, counts
# ---------------------------------------------------------------------------------------------

def is_shown_at(state: str, score: float, threshold: float) -> bool:
    """Reader decisions (accepted, added) always show; detector findings show when score >= threshold."""
    if state in CONFIRMED_STATES:
        return True
    return not (math.isfinite(score) and score < threshold)


def apply_threshold(node, threshold: float) -> int:
    """Hide (visibility off, never delete) pending/rejected points scoring below `threshold`.

    Returns the number of hidden points.
    """
    _require_review_node(node)
    values = _values_by_id(node)
    hidden = 0
    was_modifying = node.StartModify()
    for index in range(node.GetNumberOfControlPoints()):
        score = values.get(node.GetNthControlPointID(index), _unknown_values())[0]
        shown = is_shown_at(get_state(node, index), score, threshold)
        node.SetNthControlPointVisibility(index, shown)
        hidden += not shown
    node.EndModify(was_modifying)
    return hidden


def next_index(node, current: int, step: int = 1, pending_first: bool = False) -> int:
    """The next (step=+1) or previous (step=-1) visible point after `current`, wrapping around.

    With pending_first, a pending point is preferred when one is visible. -1 when nothing is visible.
    """
    count = node.GetNumberOfControlPoints()
    order = [(current + step * offset) % count for offset in range(1, count + 1)] if count else []
    visible = [i for i in order if node.GetNthControlPointVisibility(i)]
    if pending_first:
        pending = [i for i in visible if get_state(node, i) == "pending"]
        visible = pending or visible
    return visible[0] if visible else -1


def review_table(node) -> list:
    """One dict per point, in control point order: index, id, label, score, diameter_mm, region, lobe,
    kept_by, state, visible, position_ras (tuple of 3 floats, RAS mm). Reconciles a review node first;
    any other node is only read."""
    reconcile(node)
    values = _values_of(node)
    rows = []
    for index in range(node.GetNumberOfControlPoints()):
        position = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(index, position)
        rows.append({"index": index, "id": node.GetNthControlPointID(index), "label": base_label(node, index),
                     **point_values(node, index, values),
                     "state": get_state(node, index), "visible": bool(node.GetNthControlPointVisibility(index)),
                     "position_ras": tuple(float(v) for v in position)})
    return rows


def reported_state(row: dict) -> str:
    """The state a count or an export reports: the stored one, except that a pending finding the
    threshold hides is BELOW_THRESHOLD. The reader chose not to read below that score, so it is neither
    waiting to be read nor a lesion; lowering the threshold makes it pending again."""
    if row["state"] == PENDING and not row["visible"]:
        return BELOW_THRESHOLD
    return row["state"]


def review_counts(node) -> dict:
    """Counts per reported state (see reported_state), and per region: {"accepted", "rejected", "added",
    "pending", "below_threshold", "total", "confirmed" (accepted + added), "by_region": {region: {state: n,
    "confirmed": n}}, "lobar_by_lobe": {lobe: confirmed n}}."""
    rows = review_table(node)
    states = (*REVIEW_STATES, BELOW_THRESHOLD)
    counts = {state: 0 for state in states}
    by_region = {region: {**{state: 0 for state in states}, "confirmed": 0} for region in REGIONS}
    by_lobe = {lobe: 0 for lobe in LOBES if lobe}
    for row in rows:
        counts[reported_state(row)] += 1
        by_region[row["region"]][reported_state(row)] += 1
        if row["state"] in CONFIRMED_STATES:
            by_region[row["region"]]["confirmed"] += 1
            if row["region"] == "lobar" and row["lobe"]:
                by_lobe[row["lobe"]] += 1
    counts["total"] = len(rows)
    counts["confirmed"] = counts["accepted"] + counts["added"]
    counts["by_region"] = by_region
    counts["lobar_by_lobe"] = by_lobe
    return counts


def node_findings(node) -> list:
    """The node's points as Finding records (base labels, RAS positions, reported_state as status)."""
    return [Finding(label=row["label"], position_ras=row["position_ras"], score=row["score"],
                    diameter_mm=row["diameter_mm"], region=row["region"], lobe=row["lobe"],
                    status=reported_state(row), kept_by=row["kept_by"])
            for row in review_table(node)]


# ---------------------------------------------------------------------------------------------
# A complete review: what makes the unmarked candidates of a scan usable as negatives
# ---------------------------------------------------------------------------------------------

def set_review_complete(node, complete: bool = True) -> None:
    """The reader's statement that the whole scan was read: every shown finding decided and every missed
    lesion added. Refused while a shown finding is still pending (it would be neither lesion nor mimic)."""
    _require_review_node(node)
    if complete:
        pending = [row["label"] for row in review_table(node) if reported_state(row) == PENDING]
        if pending:
            raise CMBError(f"{len(pending)} shown finding(s) still pending ({', '.join(pending[:5])}): accept or "
                           "reject them before marking the review complete")
    node.SetAttribute(REVIEW_COMPLETE_ATTRIBUTE, "1" if complete else "0")


def is_review_complete(node) -> bool:
    """Marked complete and still so: a point set back to pending (or a new pending one) undoes it."""
    return (is_review_node(node) and node.GetAttribute(REVIEW_COMPLETE_ATTRIBUTE) == "1"
            and not any(reported_state(row) == PENDING for row in review_table(node)))


def review_labels(document: dict) -> dict:
    """What an exported review (export_review's JSON) may teach a model, as RAS point arrays (M, 3):
    "positive" (accepted, added), "negative" (rejected), "complete" (bool). Pending and below-threshold
    points are never labels; in a complete review they are unmarked candidates like any other."""
    groups = {"positive": [], "negative": []}
    for finding in document.get("findings", []):
        state = finding.get("status")
        group = "positive" if state in CONFIRMED_STATES else "negative" if state == REJECTED else None
        if group:
            groups[group].append([float(v) for v in finding["position_ras"]])
    return {key: np.array(points, float).reshape(-1, 3) for key, points in groups.items()} | {
        "complete": document.get("complete") is True}


# ---------------------------------------------------------------------------------------------
# Exports
# ---------------------------------------------------------------------------------------------

def export_review(node, csv_path, json_path, reader: str = "", input_name: str = "",
                  detection_run: dict | None = None, threshold: float | None = None,
                  extra: dict | None = None) -> dict:
    """Write the reviewed findings.

    csv_path: findings.CSV_COLUMNS, one row per point (every state), readable by findings.read_csv.
    json_path: {"software", "reviewed_at" (UTC ISO 8601), "reader", "input", "complete" (is_review_complete),
    "detection_run" (provenance from the run's summary, see detection_run_provenance), "threshold", "counts"
    (review_counts), "findings" (Finding.to_dict per point)} plus `extra` (e.g. the scan's file names).
    Returns the JSON document.
    """
    findings = node_findings(node)
    write_csv(findings, csv_path)
    document = review_document(findings, complete=is_review_complete(node), reader=reader, input_name=input_name,
                               detection_run=detection_run, threshold=threshold, counts=review_counts(node),
                               extra=extra)
    Path(json_path).write_text(json.dumps(document, indent=2, allow_nan=False))
    return document


def review_document(findings: list, complete: bool, reader: str = "", input_name: str = "",
                    detection_run: dict | None = None, threshold: float | None = None, counts: dict | None = None,
                    extra: dict | None = None) -> dict:
    """The exported review JSON (see export_review) of Finding records whose status is the reported state;
    also what a simulated reader writes (no MRML needed). counts: review_counts, else a tally by status."""
    if counts is None:
        counts = {state: sum(f.status == state for f in findings) for state in (*REVIEW_STATES, BELOW_THRESHOLD)}
        counts.update(total=len(findings), confirmed=counts[CONFIRMED_STATES[0]] + counts[CONFIRMED_STATES[1]])
    return {
        "software": f"CMBDetector {__version__}",
        "reviewed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "reader": reader,
        "input": input_name,
        "complete": bool(complete),
        "detection_run": dict(detection_run or {}),
        "threshold": threshold,
        "counts": counts,
        "findings": [_json_safe(f.to_dict()) for f in findings],
        **(extra or {}),
    }


# What identifies the models, software and phase handling of a detection run, as pipeline.detect writes them
# to STEM.json (a site fine-tune reads a kept phase as the run did: phase_sign_reversed).
PROVENANCE_KEYS = ("cmbdetector_version", "model", "yolo", "versions", "threshold", "operating_threshold",
                   "phase_given", "phase_used_by_cnn", "phase_sign_reversed")


def detection_run_provenance(summary: dict) -> dict:
    """The part of a run's summary (STEM.json) that says which models and versions produced the findings:
    model {file, sha256, device}, yolo {used, sha256, ...}, versions {python, numpy, torch, ...}, the
    threshold the run kept findings down to and its tuned operating point, and how it used a phase."""
    return {key: summary[key] for key in PROVENANCE_KEYS if key in summary}


def record_detection_run(node, summary: dict) -> None:
    """Keep the run's provenance on its review node, so the export needs no file of the run."""
    _require_review_node(node)
    node.SetAttribute(DETECTION_RUN_ATTRIBUTE, json.dumps(detection_run_provenance(summary)))


def detection_run(node) -> dict:
    """The provenance recorded by record_detection_run ({} for nodes from elsewhere)."""
    return json.loads(node.GetAttribute(DETECTION_RUN_ATTRIBUTE) or "{}")


def review_start_threshold(node) -> float | None:
    """Where the review's slider starts: the run's tuned operating point, else the threshold it kept
    findings down to; None when unknown. Findings between the floor and the operating point start
    hidden, one slider move away."""
    run = detection_run(node)
    for key in ("operating_threshold", "threshold"):
        value = run.get(key)
        if isinstance(value, (int, float)) and 0.0 <= value <= 1.0:
            return float(value)
    return None


def _json_safe(record: dict) -> dict:
    """NaN (unknown score/diameter of reader-added points) becomes null: JSON has no NaN."""
    return {key: (None if isinstance(value, float) and not math.isfinite(value) else value)
            for key, value in record.items()}


def export_accepted_labelmap(scene, node, reference_volume_node, radius_mm: float = 1.5,
                             name: str | None = None):
    """A vtkMRMLLabelMapVolumeNode on the reference volume's grid marking confirmed lesions: for a review
    node, its one labelmap (made on the first call, overwritten in place on later ones).

    Each accepted or reader-added point becomes a sphere of its diameter (or of `radius_mm` when the
    diameter is unknown) with label value = control point index + 1. Pending and rejected points are
    left out. Voxels are in the reference volume's IJK grid; sphere membership is tested in RAS mm, so
    anisotropic and oblique grids are handled.
    """
    import slicer
    import vtk

    reference_image = reference_volume_node.GetImageData() if reference_volume_node else None
    if reference_image is None:
        raise InputError("export_accepted_labelmap needs a reference volume with image data")
    dims_ijk = reference_image.GetDimensions()
    ijk_to_ras = vtk.vtkMatrix4x4()
    reference_volume_node.GetIJKToRASMatrix(ijk_to_ras)
    affine = slicer.util.arrayFromVTKMatrix(ijk_to_ras)
    ras_to_ijk = np.linalg.inv(affine)
    labels_kji = np.zeros(dims_ijk[::-1], dtype=np.uint16)
    for row in review_table(node):
        if row["state"] not in CONFIRMED_STATES:
            continue
        radius = row["diameter_mm"] / 2 if math.isfinite(row["diameter_mm"]) and row["diameter_mm"] > 0 else radius_mm
        _paint_sphere(labels_kji, affine, ras_to_ijk, np.asarray(row["position_ras"]), radius, row["index"] + 1)
    labelmap = node.GetNodeReference(ACCEPTED_LABELMAP_ROLE) if is_review_node(node) else None
    if labelmap is None:
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name or f"{node.GetName()} accepted")
        if is_review_node(node):  # one labelmap per review node, updated in place by later exports
            node.SetNodeReferenceID(ACCEPTED_LABELMAP_ROLE, labelmap.GetID())
    labelmap.SetIJKToRASMatrix(ijk_to_ras)
    slicer.util.updateVolumeFromArray(labelmap, labels_kji)
    labelmap.CreateDefaultDisplayNodes()
    return labelmap


def _paint_sphere(labels_kji: np.ndarray, affine: np.ndarray, ras_to_ijk: np.ndarray,
                  centre_ras: np.ndarray, radius_mm: float, value: int) -> None:
    """Set voxels whose centre lies within radius_mm (RAS) of centre_ras; at least the nearest voxel."""
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    centre_ijk = ras_to_ijk[:3, :3] @ centre_ras + ras_to_ijk[:3, 3]
    reach = np.ceil(radius_mm / spacing).astype(int) + 1
    shape_ijk = labels_kji.shape[::-1]
    low = np.maximum(np.floor(centre_ijk).astype(int) - reach, 0)
    high = np.minimum(np.ceil(centre_ijk).astype(int) + reach + 1, shape_ijk)
    if np.any(high <= low):
        return  # the lesion lies outside the reference grid
    i, j, k = np.meshgrid(*(np.arange(lo, hi) for lo, hi in zip(low, high)), indexing="ij")
    ijk = np.stack([i, j, k], axis=-1).reshape(-1, 3)
    ras = ijk @ affine[:3, :3].T + affine[:3, 3]
    inside = np.linalg.norm(ras - centre_ras, axis=1) <= radius_mm
    if not inside.any():
        nearest = np.clip(np.rint(centre_ijk).astype(int), 0, np.asarray(shape_ijk) - 1)
        ijk, inside = nearest[None, :], np.array([True])
    hits = ijk[inside]
    labels_kji[hits[:, 2], hits[:, 1], hits[:, 0]] = value


# ---------------------------------------------------------------------------------------------
# Volumes: CMBDetectorLib.image.Volume <-> vtkMRMLScalarVolumeNode
# ---------------------------------------------------------------------------------------------

def volume_node_from_volume(scene, volume, name: str = "CMB input", labelmap: bool = False):
    """A scalar (or labelmap) volume node holding `volume`.

    Volume.array is (I, J, K) in voxel order; VTK image scalars are laid out with i fastest, which
    slicer.util sees as a (K, J, I) array, hence the transpose. Volume.affine is the IJK->RAS matrix.
    """
    import slicer

    node_class = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(node_class, name)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(np.asarray(volume.affine, dtype=float)))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(np.transpose(volume.array, (2, 1, 0))))
    node.CreateDefaultDisplayNodes()
    return node


def volume_from_volume_node(node):
    """The node's voxels as a Volume (float32 (I, J, K) array, IJK->RAS affine)."""
    import slicer
    import vtk

    from .image import Volume

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    array_ijk = np.transpose(slicer.util.arrayFromVolume(node), (2, 1, 0)).astype(np.float32)
    return Volume(np.ascontiguousarray(array_ijk), slicer.util.arrayFromVTKMatrix(matrix),
                  {"source": f"Slicer node {node.GetName()}"})
