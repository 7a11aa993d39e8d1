"""Review autosave: a reader's decisions survive a crash or a closed scene (issue #17 item 7).

Beside the findings of a run (STEM.mrk.json, with its STEM.json summary) the review node is written, after
each change, to STEM.autosave.mrk.json: Slicer's own markups JSON (states, labels, measurements), written
atomically (outputs.write_all), so a crash loses at most the change being written. An autosave is
*restorable* when it is newer than the findings and holds something they do not (a decision, an added or
removed point); loading the results again then offers it.

MRML only, like review.py: the node is written with Slicer's markups JSON storage node.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np

from .errors import InputError
from .findings import read_markups_json
from .outputs import write_all
from .vocabulary import AUTOSAVE_SUFFIX, MARKUPS_SUFFIX, SUMMARY_SUFFIX

AUTOSAVE_ATTRIBUTE = "CMBDetector.AutosavePath"  # on a review node: where its autosave goes
DECLINED_INFIX = ".declined-"  # an autosave the reader chose not to restore: kept, never offered again


def autosave_path(markups_path) -> Path:
    """STEM.autosave.mrk.json beside STEM.mrk.json."""
    markups_path = Path(markups_path)
    return markups_path.with_name(markups_path.name[: -len(MARKUPS_SUFFIX)] + AUTOSAVE_SUFFIX)


def findings_path(autosave) -> Path:
    """STEM.mrk.json beside STEM.autosave.mrk.json."""
    autosave = Path(autosave)
    return autosave.with_name(autosave.name[: -len(AUTOSAVE_SUFFIX)] + MARKUPS_SUFFIX)


def write_autosave(node, path) -> Path:
    """Write the review node to `path` (Slicer markups JSON), atomically."""
    import slicer

    def write(temporary):
        storage = slicer.vtkMRMLMarkupsJsonStorageNode()
        storage.SetFileName(str(temporary))
        if not storage.WriteData(node):
            raise OSError(f"Slicer could not write {node.GetName()}")

    path = Path(path)
    write_all({"autosave": (path, write)}, path.parent, summary_key=None)
    return path


def _reviewed_content(path: Path) -> list:
    return [(f.label, f.status, tuple(np.round(f.position_ras, 2))) for f in read_markups_json(path)]


def is_restorable(autosave) -> bool:
    """True when the autosave is newer than its findings (and their summary) and differs from them."""
    autosave = Path(autosave)
    findings = findings_path(autosave)
    summary = findings.with_name(findings.name[: -len(MARKUPS_SUFFIX)] + SUMMARY_SUFFIX)
    try:
        if not summary.is_file() or autosave.stat().st_mtime < findings.stat().st_mtime:
            return False
        return _reviewed_content(autosave) != _reviewed_content(findings)
    except (OSError, InputError, KeyError, TypeError, ValueError):
        return False


def decline(autosave) -> Path:
    """Set an autosave aside (STEM.autosave.mrk.json.declined-YYYYMMDD-HHMMSS): kept, not offered again."""
    autosave = Path(autosave)
    target = autosave.with_name(f"{autosave.name}{DECLINED_INFIX}{time.strftime('%Y%m%d-%H%M%S')}")
    autosave.replace(target)
    return target


def restorable_autosaves(root) -> list:
    """Restorable autosaves in the folders under `root` (one per input), newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [path for path in root.glob("*/*" + AUTOSAVE_SUFFIX) if is_restorable(path)]
    return sorted(found, key=lambda path: path.stat().st_mtime, reverse=True)


def volume_fingerprint(array: np.ndarray, affine: np.ndarray) -> str:
    """A short name for one scan's voxels and geometry: the same scan loaded again gets the same one."""
    digest = hashlib.sha256()
    digest.update(str((array.shape, str(array.dtype))).encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    digest.update(np.round(np.asarray(affine, dtype=np.float64), 4).tobytes())
    return digest.hexdigest()[:20]

