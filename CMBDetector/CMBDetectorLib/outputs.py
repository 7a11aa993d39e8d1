"""Where results go: the output folder checked before any work, and files that appear whole or not at all.

A run's files are first written under temporary names in the output folder (`.NAME.tmp-PID-RANDOM.EXT`),
each flushed and fsynced. Only when every one was written are they renamed to their final names
(`os.replace`, atomic on one file system), the summary JSON last: a summary next to the other files
marks a complete result. A run that fails or is killed before that leaves temporary files at most
(removed on failure), never a final-named file that looks finished. The previous run's summary is
removed before the new files are renamed in, so a half-replaced set never looks complete either.
Temporary files a killed run left behind are removed by the next run into the folder (remove_stale_temporaries).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path

from .errors import CMBError, InputError
from .findings import read_markups_json
from .vocabulary import AUTOSAVE_SUFFIX, MARKUPS_SUFFIX, SUMMARY_SUFFIX

MIN_FREE_MB = 50.0  # a run writes a few MB at most; warn below this much free space
STALE_TEMPORARY_S = 24 * 3600  # a temporary file this old is stale even if its PID was reused by a live process
_TEMPORARY_NAME = re.compile(r"^\..+\.tmp-(?P<pid>\d+)-[0-9a-f]{8}(\.[^.]*)?$")
BACKUP_INFIX = ".bak-"  # STEM.mrk.json.bak-YYYYMMDD-HHMMSS: not *.mrk.json, so no reader takes it for a result


class OutputError(CMBError):
    """The results cannot be written where asked (not a folder, read-only, full disk)."""


def prepare_output_folder(out_dir) -> Path:
    """Refuse (OutputError, one line) before any work when results could not be written to `out_dir`;
    creates the folder if needed."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"--out {out_dir} is an existing file, not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create the output folder {out_dir}: {error.strerror or error}") from None
    probe = _temporary_name(out_dir / "write-test")
    try:  # os.access is unreliable (Windows ACLs, root, network shares): try a real write
        with open(probe, "xb") as handle:
            handle.write(b"\0")
    except OSError as error:
        raise OutputError(f"cannot write to the output folder {out_dir}: {error.strerror or error}") from None
    finally:
        _remove_quietly(probe)
    remove_stale_temporaries(out_dir)
    return out_dir


def remove_stale_temporaries(out_dir, now: float | None = None) -> list:
    """Remove the temporary files (`.NAME.tmp-PID-RANDOM.EXT`) of runs that are no longer alive, or older
    than STALE_TEMPORARY_S (their PID may have been reused). Returns the removed paths."""
    now = time.time() if now is None else now
    removed = []
    for path in Path(out_dir).iterdir():
        match = _TEMPORARY_NAME.match(path.name)
        if match is None or not path.is_file():
            continue
        pid = int(match.group("pid"))
        try:
            old = now - path.stat().st_mtime > STALE_TEMPORARY_S
        except OSError:
            continue
        if pid != os.getpid() and (old or not _process_alive(pid)):
            _remove_quietly(path)
            removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return psutil.pid_exists(pid)
    if os.name != "posix":
        return True  # os.kill(pid, 0) would terminate the process on Windows: rely on the age rule
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def backup_review(markups) -> Path | None:
    """Copy a reviewed STEM.mrk.json (any state other than pending, or unreadable) to
    STEM.mrk.json.bak-YYYYMMDD-HHMMSS beside it, atomically, before --force replaces it.
    Returns the backup's path; None when there is nothing to keep."""
    markups = Path(markups)
    if not markups.is_file():
        return None
    try:
        _refuse_reviewed(markups)
        return None  # all pending: the detector's own output, nothing of a reader's to keep
    except OutputError:
        pass
    stamp = time.strftime("%Y%m%d-%H%M%S")
    backup = markups.with_name(f"{markups.name}{BACKUP_INFIX}{stamp}")
    counter = 1
    while backup.exists():
        counter += 1
        backup = markups.with_name(f"{markups.name}{BACKUP_INFIX}{stamp}-{counter}")
    write_all({"backup": (backup, lambda path: shutil.copyfile(markups, path))}, markups.parent, summary_key=None)
    return backup


def check_output_stem(out_dir, stem: str, force: bool = False, input_path=None) -> list:
    """Refuse (OutputError) when STEM.mrk.json in `out_dir` holds a review, or STEM.json the results of
    another input than `input_path` (two scans of one file name), unless `force`.
    Returns warnings (low free space)."""
    out_dir = Path(out_dir)
    markups = out_dir / f"{stem}.mrk.json"
    if markups.exists() and not force:
        _refuse_reviewed(markups)
    if input_path is not None and not force:
        _refuse_other_input(out_dir / f"{stem}.json", Path(input_path))
    free_mb = shutil.disk_usage(out_dir).free / 2 ** 20
    if free_mb < MIN_FREE_MB:
        return [f"only {free_mb:.0f} MB free in {out_dir}; the results may not fit"]
    return []


def result_is_complete(out_dir, stem: str) -> bool:
    """The summary-last rule: STEM.mrk.json is a finished run's only when STEM.json (renamed in last) exists."""
    out_dir = Path(out_dir)
    return (out_dir / f"{stem}{MARKUPS_SUFFIX}").is_file() and (out_dir / f"{stem}{SUMMARY_SUFFIX}").is_file()


def findings_files(out_dir) -> list:
    """The STEM.mrk.json files of detection runs in `out_dir` (finished or not; no autosaves), newest first."""
    found = [path for path in Path(out_dir).glob("*" + MARKUPS_SUFFIX)
             if not path.name.endswith(AUTOSAVE_SUFFIX) and not is_temporary(path) and path.is_file()]
    return sorted(found, key=lambda path: path.stat().st_mtime, reverse=True)


def _refuse_reviewed(markups: Path) -> None:
    """OutputError when `markups` holds a review (any state other than pending) or cannot be read."""
    try:
        states = {finding.status for finding in read_markups_json(markups)}
    except (InputError, OSError, KeyError, TypeError, ValueError):
        raise OutputError(f"{markups} exists and is not a findings file this run can safely replace; "
                          "move it away or use --force to overwrite it") from None
    reviewed = sorted(states - {"pending"})
    if reviewed:
        raise OutputError(f"{markups} holds a review (states: {', '.join(reviewed)}); "
                          "re-running would replace it: move it away or use --force")


def _refuse_other_input(summary: Path, input_path: Path) -> None:
    try:
        previous = json.loads(summary.read_text(encoding="utf-8")).get("input")
    except (OSError, ValueError, AttributeError):
        return  # no summary, or a broken one: nothing complete to protect
    if isinstance(previous, str) and previous and Path(previous).resolve() != input_path.resolve():
        raise OutputError(f"{summary} holds the results of another input ({previous}); "
                          "use another --out, or --force to replace them")


def write_all(writers: dict, out_dir, summary_key: str | None = "summary", remove=()) -> dict:
    """Write a run's files so that they appear whole or not at all (module docstring).

    writers: {key: (final_path, write(path))}; each write function writes the file it is given.
    The entry `summary_key` is renamed in last. remove: final paths of the previous run that this one does
    not write (e.g. its PNG after --no-png); removed with the old summary, before anything is renamed in.
    Returns {key: final_path}. OutputError (one line) when a file cannot be written; then no temporary
    file is left and no final file was touched.
    """
    out_dir = Path(out_dir)
    staged = {}
    try:
        for key, (final, write) in writers.items():
            temporary = _temporary_name(Path(final))
            staged[key] = (Path(final), temporary)
            write(temporary)
            _fsync_file(temporary)
    except BaseException as error:  # whatever stopped the writing, leave no temporary file behind
        for _, temporary in staged.values():
            _remove_quietly(temporary)
        if isinstance(error, OSError):
            raise OutputError(f"cannot write the results to {out_dir}: {error.strerror or error}") from None
        raise
    order = [key for key in staged if key != summary_key] + [key for key in staged if key == summary_key]
    if summary_key in staged:
        _remove_quietly(staged[summary_key][0])  # the old run's summary must not vouch for the new files
    for path in remove:  # nor may an old file this run does not replace sit beside the new summary
        _remove_quietly(Path(path))
    try:
        for index, key in enumerate(order):
            final, temporary = staged[key]
            os.replace(temporary, final)
    except OSError as error:  # the summary comes last, so what was renamed in does not look finished
        for key in order[index:]:
            _remove_quietly(staged[key][1])
        raise OutputError(f"cannot write the results to {out_dir}: {error.strerror or error}") from None
    _fsync_folder(out_dir)
    return {key: final for key, (final, _) in staged.items()}


def _temporary_name(final: Path) -> Path:
    """A unique hidden name beside `final` that keeps its extension (writers pick the format by it)."""
    return final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{''.join(final.suffixes[-1:])}")


def is_temporary(path: Path) -> bool:
    return path.name.startswith(".") and ".tmp-" in path.name


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_folder(folder: Path) -> None:
    """Make the renames durable where the platform allows opening a folder (not on Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
