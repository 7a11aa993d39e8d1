"""The Finding record shared by every stage, writer and the review layer, and its file formats.

Files written here:
- STEM.mrk.json  Slicer markups (schema v1.0.3), one Fiducial control point per finding. Positions are
                 written in LPS, Slicer's default for files. The review state is the control point
                 description (one word, see REVIEW_STATES); score and diameter are per-point
                 measurements, so Slicer shows them and they survive a scene save.
- STEM.csv       one row per finding.
- STEM.json      a summary; built by the pipeline, written with write_json.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import InputError
from .vocabulary import (CODED_FIELDS, DECIDED_COLOR, LABEL_FORMAT, MEASUREMENTS, PENDING_COLOR, REVIEW_STATES,
                         base_label, code_of, finding_label, word_of_code)

MARKUPS_SCHEMA = (
    "https://raw.githubusercontent.com/slicer/slicer/main/Modules/Loadable/Markups/Resources/Schema/"
    "markups-schema-v1.0.3.json#"
)
CSV_COLUMNS = ("id", "label", "x_ras", "y_ras", "z_ras", "score", "diameter_mm", "region", "lobe", "status", "kept_by")


@dataclass
class Finding:
    """One candidate microbleed.

    position_ras: centre in RAS millimetres (Slicer's world frame).
    score: final confidence in [0, 1].
    diameter_mm: apparent (bloomed) diameter as seen on this scan.
    region: one of REGIONS; lobe: frontal/parietal/temporal/occipital/insula or "" when not lobar.
    status: one of REVIEW_STATES.
    stage_scores: per-stage confidences, e.g. {"candidate": .., "cnn": .., "yolo": ..}.
    kept_by: one of KEPT_BY for a detector finding ("criteria": the networks scored it below the threshold
    and the reading criteria kept it at the threshold); "" for a point the reader placed, or unknown.
    """

    label: str
    position_ras: tuple
    score: float
    diameter_mm: float = float("nan")
    region: str = "unknown"
    lobe: str = ""
    status: str = "pending"
    stage_scores: dict = field(default_factory=dict)
    kept_by: str = ""

    def to_dict(self) -> dict:
        record = asdict(self)
        record["position_ras"] = [float(v) for v in self.position_ras]
        return record


def label_findings(findings: list) -> list:
    """Sort by decreasing score and label CMB-1, CMB-2, ... in that order."""
    ordered = sorted(findings, key=lambda f: -f.score)
    for index, finding in enumerate(ordered, start=1):
        finding.label = finding_label(index)
    return ordered


def write_markups_json(findings: list, path, node_name: str = "CMB detections") -> Path:
    path = Path(path)
    points = []
    for index, finding in enumerate(findings):
        x, y, z = (float(v) for v in finding.position_ras)
        points.append({
            "id": str(index + 1),
            "label": finding.label,
            "description": finding.status,
            "associatedNodeID": "",
            "position": [-x, -y, z],  # RAS -> LPS
            "orientation": [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0],
            "selected": True,
            "locked": False,
            "visibility": True,
            "positionStatus": "defined",
        })
    measurements = []
    columns = {
        "score": [_finite_or_zero(f.score) for f in findings],
        "diameter": [_finite_or_zero(f.diameter_mm) for f in findings],
        # codes (vocabulary.CODED_FIELDS): they survive a Slicer scene save this way
        **{name: [_json_code(name, getattr(f, name)) for f in findings] for name in CODED_FIELDS},
    }
    for name, (units, print_format) in MEASUREMENTS.items():
        measurements.append({
            "name": name,
            "enabled": True,
            "units": units,
            "printFormat": print_format,
            "controlPointValues": columns[name],
        })
    document = {
        "@schema": MARKUPS_SCHEMA,
        "markups": [{
            "type": "Fiducial",
            "coordinateSystem": "LPS",
            "coordinateUnits": "mm",
            "locked": False,
            "fixedNumberOfControlPoints": False,
            "labelFormat": LABEL_FORMAT,
            "lastUsedControlPointNumber": len(findings),
            "controlPoints": points,
            "measurements": measurements,
            "display": {"visibility": True, "glyphType": "Sphere3D", "glyphScale": 2.0,
                        "textScale": 2.5, "color": list(DECIDED_COLOR), "selectedColor": list(PENDING_COLOR)},
        }],
    }
    path.write_text(json.dumps(document, indent=2))
    return path


def read_markups_json(path) -> list:
    """Findings from a .mrk.json written by CMBDetector or saved by Slicer after review."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"markups file not found: {path}")
    try:
        document = json.loads(path.read_text())
        markup = document["markups"][0]
    except (ValueError, KeyError, IndexError) as error:
        raise InputError(f"not a Slicer markups file: {path} ({error})") from None
    flip = markup.get("coordinateSystem", "LPS") == "LPS"
    values = {m.get("name"): m.get("controlPointValues", []) for m in markup.get("measurements", [])}
    findings = []
    for index, point in enumerate(markup.get("controlPoints", [])):
        x, y, z = point["position"]
        state = point.get("description", "") or "added"
        findings.append(Finding(
            label=base_label(point.get("label", finding_label(index + 1))),
            position_ras=(-x, -y, z) if flip else (x, y, z),
            score=_value_at(values.get("score"), index),
            diameter_mm=_value_at(values.get("diameter"), index),
            status=state if state in REVIEW_STATES else "added",
            **{name: word_of_code(name, _value_at(values.get(name), index)) for name in CODED_FIELDS},
        ))
    return findings


def write_csv(findings: list, path) -> Path:
    path = Path(path)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for index, f in enumerate(findings, start=1):
            x, y, z = f.position_ras
            writer.writerow([index, f.label, f"{x:.2f}", f"{y:.2f}", f"{z:.2f}", f"{f.score:.4f}",
                             f"{f.diameter_mm:.2f}", f.region, f.lobe, f.status, f.kept_by])
    return path


def read_csv(path) -> list:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"findings CSV not found: {path}")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [Finding(label=row["label"],
                    position_ras=(float(row["x_ras"]), float(row["y_ras"]), float(row["z_ras"])),
                    score=float(row["score"]), diameter_mm=float(row["diameter_mm"]),
                    region=row.get("region", "unknown"), lobe=row.get("lobe", ""),
                    status=row.get("status", "pending"), kept_by=row.get("kept_by", "")) for row in rows]


def write_json(document: dict, path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(document, indent=2, default=_json_default))
    return path


def _finite_or_zero(value: float) -> float:
    return float(value) if math.isfinite(value) else 0.0


def _value_at(values, index: int) -> float:
    if values is None or index >= len(values):
        return float("nan")
    return float(values[index])


def _json_code(field_name: str, word: str) -> float:
    """code_of, but JSON has no NaN: a word outside the field's vocabulary is written as its unknown word."""
    code = code_of(field_name, word)
    return code if math.isfinite(code) else code_of(field_name, CODED_FIELDS[field_name][1])


def _json_default(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "to_dict"):
        return value.to_dict()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
