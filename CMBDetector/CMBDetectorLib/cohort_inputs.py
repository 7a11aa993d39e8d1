"""Which scans a `cmbdetector batch` INPUT names, and where each one's results go.

INPUT is one of:
- a CSV manifest (`.csv`): a `path` column, optional `phase`, `mask`, `subject`, `session`, `flip_phase`;
  relative paths are relative to the manifest's folder; empty cells mean none. `flip_phase` (1/0, yes/no,
  true/false; empty: the run's `--flip-phase`) says per scan whether its phase uses the opposite sign
  convention, for cohorts that mix vendors.
- a BIDS dataset (a folder with `dataset_description.json` or `sub-*` folders): every
  `sub-*/[ses-*/]anat/*_{swi,T2starw,GRE,MEGRE}.nii[.gz]`. A `part-phase` file is the phase of the
  `part-mag` file with the same other entities; a file without `part-` is a magnitude (e.g. the SWI).
  Echoes (`echo-N`): by default the LONGEST echo of each acquisition (the highest N) with its own phase:
  microbleeds bloom with the echo time, so the last echo shows them best, and its phase pairs exactly
  (the CNN was trained on one echo's magnitude and phase). `echoes="all"` makes every echo its own scan.
  `part-real` / `part-imag` files are not read.
- a folder: every image file directly in it (magnitude only; use a manifest for phases and masks).
- a glob (`scans/*/swi.nii.gz`, `**` allowed): every image file or DICOM folder it matches.

A scan with a subject writes into OUT/<subject>[/<session>], one without into OUT/<stem>. Stems follow
`vocabulary.run_stem`; two scans that would share a folder and stem (e.g. `a/Mag.nii` and `b/Mag.nii`)
are named after their paths instead (`a_Mag`, `b_Mag`).
"""

from __future__ import annotations

import csv
import glob
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import InputError
from .vocabulary import INPUT_SUFFIXES, run_stem, safe_stem, stem_of

BIDS_SUFFIXES = ("swi", "T2starw", "GRE", "MEGRE")
BIDS_IMAGE_SUFFIXES = (".nii.gz", ".nii")
MANIFEST_COLUMNS = ("path", "phase", "mask", "subject", "session", "flip_phase")
_YES, _NO = ("1", "yes", "true", "y"), ("0", "no", "false", "n")
ECHO_CHOICES = ("last", "all")
_IMAGE_SUFFIXES = tuple(s for s in INPUT_SUFFIXES if s != ".dcm")  # a .dcm file is one slice of a series


@dataclass(frozen=True)
class Scan:
    """One scan of a cohort: its input files, who it belongs to and where its results go (under OUT)."""

    magnitude: str
    phase: str | None = None
    mask: str | None = None
    subject: str = ""
    session: str = ""
    stem: str = ""
    folder: str = ""  # relative to OUT
    echo: int | str = "combine"  # for a 4D multi-echo file, as `detect --echo`
    flip_phase: bool | None = None  # its phase's sign is reversed on reading; None: as the run says

    @property
    def files(self) -> dict:
        """The input files by role (what the input content hash covers)."""
        return {role: path for role, path in (("magnitude", self.magnitude), ("phase", self.phase),
                                              ("mask", self.mask)) if path}


def find_scans(source: str, echoes: str = "last") -> list:
    """The scans INPUT names (module docstring), with unique output folders and stems. InputError when
    INPUT names none or cannot be read."""
    if echoes not in ECHO_CHOICES:
        raise InputError(f"--echoes must be one of {', '.join(ECHO_CHOICES)}, got {echoes}")
    path = Path(source)
    if path.is_file() and path.suffix.lower() == ".csv":
        scans = _from_manifest(path)
    elif path.is_dir() and _is_bids(path):
        scans = _from_bids(path, echoes)
    elif path.is_dir():
        scans = [_plain(p) for p in sorted(path.iterdir()) if p.is_file() and _is_image(p)]
    elif glob.has_magic(source):
        scans = [_plain(Path(p)) for p in sorted(glob.glob(source, recursive=True))
                 if (Path(p).is_file() and _is_image(Path(p))) or Path(p).is_dir()]
    elif path.exists():
        raise InputError(f"{source} is not a folder, a CSV manifest, a BIDS dataset or a glob")
    else:
        raise InputError(f"input not found: {source}")
    if not scans:
        raise InputError(f"no scans found in {source}")
    return _unique_stems(scans)


def _is_image(path: Path) -> bool:
    return path.name.lower().endswith(_IMAGE_SUFFIXES)


def _plain(path: Path) -> Scan:
    stem = run_stem(path)
    return Scan(str(path), stem=stem, folder=stem)


def _subject_scan(magnitude, phase=None, mask=None, subject="", session="", echo="combine") -> Scan:
    subject, session = _folder_name(subject), _folder_name(session)
    stem = run_stem(magnitude)
    folder = "/".join(part for part in (subject, session) if part) or stem
    return Scan(str(magnitude), str(phase) if phase else None, str(mask) if mask else None,
                subject, session, stem, folder, echo)


def _folder_name(text: str) -> str:
    """A subject or session as one folder name below OUT: no separators, never "." or ".."."""
    return safe_stem(text.strip(), "").lstrip(".")


def _from_manifest(manifest: Path) -> list:
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
            columns = [c.strip() for c in (rows[0].keys() if rows else [])]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"cannot read the manifest {manifest}: {error}") from None
    if "path" not in columns:
        raise InputError(f"manifest {manifest} needs a 'path' column (columns: {', '.join(MANIFEST_COLUMNS)})")
    base = manifest.parent

    def resolve(cell):
        cell = (cell or "").strip()
        return str(base / cell) if cell else None  # an absolute cell stays absolute

    scans = []
    for number, row in enumerate(rows, start=2):
        row = {(k or "").strip(): v for k, v in row.items()}
        magnitude = resolve(row.get("path"))
        if magnitude is None:
            raise InputError(f"manifest {manifest} line {number}: empty path")
        scan = _subject_scan(magnitude, resolve(row.get("phase")), resolve(row.get("mask")),
                             (row.get("subject") or "").strip(), (row.get("session") or "").strip())
        scans.append(replace(scan, flip_phase=_yes_or_no(row.get("flip_phase"), f"{manifest} line {number}")))
    return scans


def _yes_or_no(cell, where: str) -> bool | None:
    """A manifest's yes/no cell: True, False, or None when empty."""
    text = (cell or "").strip().lower()
    if not text:
        return None
    if text in _YES + _NO:
        return text in _YES
    raise InputError(f"manifest {where}: flip_phase must be one of {', '.join(_YES + _NO)} or empty, "
                     f"got {cell!r}")


# ---- BIDS ----------------------------------------------------------------------------------------

_ENTITY = re.compile(r"^([a-zA-Z0-9]+)-([a-zA-Z0-9]+)$")


def _is_bids(folder: Path) -> bool:
    return (folder / "dataset_description.json").is_file() or any(
        p.is_dir() for p in folder.glob("sub-*"))


def _bids_entities(path: Path):
    """({entity: value}, suffix) of a BIDS file name, or None when it is not one."""
    name = path.name
    for extension in BIDS_IMAGE_SUFFIXES:
        if name.endswith(extension):
            name = name[: -len(extension)]
            break
    else:
        return None
    *pairs, suffix = name.split("_")
    entities = {}
    for pair in pairs:
        match = _ENTITY.match(pair)
        if not match:
            return None
        entities[match.group(1)] = match.group(2)
    return entities, suffix


def _from_bids(root: Path, echoes: str) -> list:
    acquisitions = {}  # every entity but echo and part, + suffix -> {"mag"/"phase": {echo: path}}
    files = sorted(root.glob("sub-*/anat/*")) + sorted(root.glob("sub-*/ses-*/anat/*"))
    for path in files:
        parsed = _bids_entities(path)
        if parsed is None or parsed[1] not in BIDS_SUFFIXES or "sub" not in parsed[0]:
            continue
        entities, suffix = parsed
        part = entities.pop("part", "mag")
        if part not in ("mag", "phase"):
            continue  # real / imaginary parts: not read
        echo = entities.pop("echo", None)
        key = (tuple(sorted(entities.items())), suffix)
        parts = acquisitions.setdefault(key, {"mag": {}, "phase": {}, "entities": entities})
        parts[part][int(echo) if echo and echo.isdigit() else echo] = path
    scans = []
    for parts in acquisitions.values():
        magnitudes = parts["mag"]
        if not magnitudes:
            continue  # a phase without its magnitude
        numbered = sorted(e for e in magnitudes if isinstance(e, int))
        chosen = [e for e in magnitudes] if echoes == "all" or not numbered else [numbered[-1]]
        for echo in chosen:
            entities = parts["entities"]
            scans.append(_subject_scan(magnitudes[echo], parts["phase"].get(echo), None,
                                       f"sub-{entities['sub']}",
                                       f"ses-{entities['ses']}" if "ses" in entities else ""))
    return sorted(scans, key=lambda scan: scan.magnitude)


# ---- unique names --------------------------------------------------------------------------------

def _unique_stems(scans: list) -> list:
    """Scans that would share an output folder and stem are named after their paths below the folder
    all of them share; the same file listed twice is an error."""
    by_target = {}
    for scan in scans:
        by_target.setdefault((scan.folder, scan.stem), []).append(scan)
    renamed = {}
    for (folder, _), clashing in by_target.items():
        if len(clashing) < 2:
            continue
        paths = [os.path.abspath(scan.magnitude) for scan in clashing]
        if len(set(paths)) < len(paths):
            raise InputError(f"{clashing[0].magnitude} is listed twice")
        common = os.path.commonpath([os.path.dirname(p) for p in paths])
        relative = [os.path.relpath(p, common) for p in paths]
        stems = [safe_stem(os.path.join(os.path.dirname(r), stem_of(r)).replace(os.sep, "_")) for r in relative]
        if len(set(stems)) < len(stems):  # one folder holding a.nii and a.nii.gz: keep the suffixes
            stems = [safe_stem(r.replace(os.sep, "_")) for r in relative]
        for scan, stem in zip(clashing, stems):
            renamed[id(scan)] = replace(scan, stem=stem, folder=stem if folder == scan.stem else folder)
    return [renamed.get(id(scan), scan) for scan in scans]
