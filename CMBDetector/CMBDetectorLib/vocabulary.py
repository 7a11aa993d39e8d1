"""The review vocabulary: the words, codes, labels, colours and file names shared by the detector's
files (findings.py), the review layer (review.py) and the Slicer module. One owner, so they cannot drift.

No imports beyond the standard library: every layer may import this module, and it imports none of them.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

# ---- review states (the control point description holds one of these words) --------------------
REVIEW_STATES = ("pending", "accepted", "rejected", "added")
PENDING, ACCEPTED, REJECTED, ADDED = REVIEW_STATES
CONFIRMED_STATES = (ACCEPTED, ADDED)  # count as a lesion in counts and in the labelmap
# Reported (never stored) for a pending finding that the review threshold hides: the reader chose not
# to look below that score, so it is neither still to read nor a lesion.
BELOW_THRESHOLD = "below_threshold"

# ---- locations: stored in markups measurements as codes (index into these tuples; NaN = unknown) ----
REGIONS = ("lobar", "deep", "infratentorial", "unknown")
LOBES = ("", "frontal", "parietal", "temporal", "occipital", "insula")
# What kept a detector finding: the networks' score, or the reading criteria (criteria.py) where the
# networks scored it lower; "" for a point the reader placed, or a file written before this code existed.
KEPT_BY = ("", "networks", "criteria")

# Fields stored as codes (a measurement holds numbers): field -> (its words, the word that a missing or
# invalid code reads as). The field's name is the same in Finding, in the measurements and in the CSV.
CODED_FIELDS = {
    "region": (REGIONS, "unknown"),
    "lobe": (LOBES, ""),
    "kept_by": (KEPT_BY, ""),
}

# ---- per-point measurements: name -> (units, print format); written to .mrk.json -------------------
MEASUREMENTS = {
    "score": ("", "%.3f"),
    "diameter": ("mm", "%.1f"),
    **{field: ("", "%.0f") for field in CODED_FIELDS},  # codes: index into the field's words
}

# ---- labels: "CMB-3"; in Slicer the decision is appended so it shows in the views -----------------
LABEL_FORMAT = "CMB-%d"   # numbered by decreasing score; also the markups node's label format
LABEL_SUFFIX = {PENDING: "", ACCEPTED: " [A]", REJECTED: " [R]", ADDED: " [+]"}
_LABEL_SUFFIX_PATTERN = re.compile(r"\s\[[AR+]\]$")

# ---- colours (a markups display node has only Color and SelectedColor) ----------------------------
PENDING_COLOR = (1.0, 0.75, 0.0)   # SelectedColor: amber, "still to read"
DECIDED_COLOR = (0.3, 0.85, 1.0)   # Color: cyan, "read"; the label suffix tells which decision

# ---- file names ---------------------------------------------------------------------------------
INPUT_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
MARKUPS_SUFFIX = ".mrk.json"        # detection: STEM.mrk.json
FINDINGS_CSV_SUFFIX = ".csv"        # detection: STEM.csv
SUMMARY_SUFFIX = ".json"            # detection: STEM.json (the run's summary, written last: marks a complete run)
AUTOSAVE_SUFFIX = ".autosave.mrk.json"  # Slicer module: STEM.autosave.mrk.json, the review in progress
REVIEW_CSV_SUFFIX = "_review.csv"   # export: NAME_review.csv
REVIEW_JSON_SUFFIX = "_review.json"
ACCEPTED_LABELMAP_SUFFIX = "_accepted.nii.gz"


def finding_label(number: int) -> str:
    """The label of the number-th finding (1-based), e.g. "CMB-3"."""
    return LABEL_FORMAT % number


def base_label(label: str) -> str:
    """A label without the review suffix: "CMB-3 [A]" -> "CMB-3"."""
    return _LABEL_SUFFIX_PATTERN.sub("", label)


def _without_suffix(path, suffixes: tuple) -> str:
    name = Path(path).name
    for suffix in suffixes:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def stem_of(path) -> str:
    """An input image's name without its suffix ("sub 1.nii.gz" -> "sub 1"). The CLI names its outputs
    STEM.mrk.json / STEM.csv / STEM.json after it, and the module finds them by the same rule."""
    return _without_suffix(path, INPUT_SUFFIXES)


def run_stem(input_path, echo=None) -> str:
    """The stem a detect run names its outputs after: stem_of(input), plus _echoN when one echo of a
    multi-echo input was chosen (runs on different echoes of one scan must not replace each other)."""
    stem = stem_of(input_path)
    return f"{stem}_echo{echo}" if isinstance(echo, int) else stem


def output_stem(path) -> str:
    """A findings file's name without its suffix ("sub 1.mrk.json" -> "sub 1")."""
    return _without_suffix(path, (MARKUPS_SUFFIX, SUMMARY_SUFFIX, FINDINGS_CSV_SUFFIX))


def safe_stem(name: str, default: str = "input") -> str:
    """A node name made safe as a file stem on every platform (anything but A-Z a-z 0-9 _ . - becomes _)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or default


def code_of(field: str, word: str) -> float:
    """The code of `word` in a coded field (CODED_FIELDS) as a measurement value; NaN when it is not one of
    the field's words."""
    words, _ = CODED_FIELDS[field]
    return float(words.index(word)) if word in words else math.nan


def word_of_code(field: str, code: float) -> str:
    """The word a coded field's stored code stands for; the field's unknown word when the code is missing
    or not valid."""
    words, unknown = CODED_FIELDS[field]
    return words[int(code)] if math.isfinite(code) and 0 <= int(code) < len(words) else unknown
