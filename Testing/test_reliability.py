"""Reliability: hostile input, output folders that cannot take the results, faults while writing, runs at
once, Windows' missing POSIX modules, HOME unset (issue #17, #14).

Every refusal is checked the same way (`refused`): exit code 2, exactly one non-empty line on stderr,
no traceback, and no output file that looks finished. Inputs and outputs are checked before any model
loads; the proof is behavioural: those runs name a model file that does not exist (`NO_MODEL`), so a run
that reached the model loader would fail with "model ensemble card not found" instead.

Real detections run once, in `real_runs`: two command-line runs at once into one folder.

docs/reliability.md is written from this file:
    CMB_RELIABILITY_REPORT=docs/reliability.md .venv/bin/python -m pytest -q Testing/test_reliability.py
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from CMBDetectorLib import outputs, sysinfo
from CMBDetectorLib.bench import REAL_DIR
from CMBDetectorLib.classify import choose_device
from CMBDetectorLib.errors import InputError
from CMBDetectorLib.findings import Finding, read_markups_json, write_markups_json
from CMBDetectorLib.io import read_volume
from helpers import ROOT

PHILIPS = REAL_DIR / "philips-3t-dual-echo"
FINISHED_SUFFIXES = (".mrk.json", ".csv", ".json", ".png")
MODEL_NOT_REACHED = "model ensemble card not found"

# POSIX-only modules fail to import, as on Windows. Blocked for every importer, the process needs USER set
# (getpass, called by monai, falls back to pwd without it; Windows has USERNAME) and HOME set (expanduser
# falls back to pwd; Windows has USERPROFILE). With HOME unset, only CMBDetectorLib's own imports are blocked.
BLOCK_POSIX_MODULES = textwrap.dedent('''
    import sys
    BLOCKED = {{"resource", "fcntl", "pwd", "grp", "termios"}}
    class BlockPosixModules:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] not in BLOCKED:
                return None
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith("<frozen importlib"):
                frame = frame.f_back
            importer = frame.f_globals.get("__name__", "") if frame is not None else ""
            if {every_importer} or importer.split(".")[0] == "CMBDetectorLib":
                raise ImportError(f"{{importer}} imports {{name}}, which Windows does not have")
    for name in BLOCKED:
        sys.modules.pop(name, None)
    sys.meta_path.insert(0, BlockPosixModules())
''')
BLOCK_FOR_EVERY_IMPORTER = BLOCK_POSIX_MODULES.format(every_importer=True)
BLOCK_FOR_OUR_IMPORTS = BLOCK_POSIX_MODULES.format(every_importer=False)
RUN_CLI = "import sys\nfrom CMBDetectorLib.cli import main\nsys.argv[0] = 'cmbdetector'\nsys.exit(main())\n"

# (case, exit code, message) of every command-line case, for docs/reliability.md
OBSERVED = []
BASE_TEMP = []  # pytest's temporary root, written as TMP in the report


def cli(*arguments, env=None, blocked=False, timeout=300):
    """`cmbdetector ARGUMENTS` in a fresh interpreter (optionally with the POSIX-only modules blocked)."""
    code = (BLOCK_FOR_EVERY_IMPORTER if blocked else "") + RUN_CLI
    return subprocess.run([sys.executable, "-c", code, *map(str, arguments)], capture_output=True, encoding="utf-8",
                          env=env, timeout=timeout)


def record(case: str, result) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    OBSERVED.append((case, result.returncode, lines))


@pytest.fixture(scope="module", autouse=True)
def reliability_report(tmp_path_factory):
    BASE_TEMP.append(str(tmp_path_factory.getbasetemp()))
    yield
    target = os.environ.get("CMB_RELIABILITY_REPORT")
    if target:
        write_report(Path(target))


def write_report(path: Path) -> None:
    rows = []
    for case, code, lines in OBSERVED:
        message = "<br>".join(line.replace("|", "\\|") for line in lines) or "(nothing on stderr)"
        for base in BASE_TEMP:
            message = message.replace(base, "TMP")
        rows.append(f"| {case} | {code} | {message} |")
    path.write_text("# Reliability: what each hostile or odd case gives\n\n"
                    "Written by the reliability tests (do not edit by hand):\n\n"
                    "    CMB_RELIABILITY_REPORT=docs/reliability.md .venv/bin/python -m pytest -q "
                    "Testing/test_reliability.py\n\n"
                    "Each row is one `cmbdetector detect` run of `Testing/test_reliability.py`: the exit code "
                    "and every non-empty line it wrote on stderr (temporary paths shortened to `TMP`). "
                    "Refusals are one line, exit 2, before any model loads, and leave no output that looks "
                    "finished; a `STEM.json` summary marks a complete result.\n\n"
                    "| case | exit | stderr |\n|---|---|---|\n" + "\n".join(rows) + "\n" + _image_type_measurement())


IMAGE_TYPE_MEASUREMENT = ROOT / "docs" / "image-type-check.txt"


def _image_type_measurement() -> str:
    """The image-type warnings measured on every scan we have, quoted from tools/check_image_types.py's
    output (too long for a test), which is kept in docs/image-type-check.txt."""
    if not IMAGE_TYPE_MEASUREMENT.is_file():
        return ""
    summary, quoting = [], False
    for line in IMAGE_TYPE_MEASUREMENT.read_text(encoding="utf-8").splitlines():
        quoting = quoting or line.startswith(("#", "summary"))  # each run's header and summary, not its scans
        if quoting and line.strip():
            summary.append(line)
        quoting = quoting and not line.startswith(("false warnings", "#"))
    return ("\n## Image-type warnings: false warnings measured on every scan we have\n\n"
            "The T1-like and not-a-head warnings (warnings, never refusals) over every simulated scan of "
            "`/work/data/{train,tune}_{nom,rand}`, the benchmark's out-of-distribution scans, the real scans of "
            "`shared/data/real-gre` (crops take `--crop`, which skips the check), simulated scans inverted "
            "inside the head (T1-like), the MNI152 T1 template and a sphere phantom. Output of "
            "`tools/check_image_types.py` (every scan's line in `docs/image-type-check.txt`):\n\n"
            + "\n".join("    " + line for line in summary) + "\n")


def refused(case: str, result, out_dir=None) -> str:
    """The one line of a refusal, after checking everything a refusal promises."""
    record(case, result)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    if out_dir is not None:
        assert finished_files(out_dir) == [] and temporary_files(out_dir) == []
    return lines[0]


def finished_files(folder) -> list:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(FINISHED_SUFFIXES) and not outputs.is_temporary(p))


def temporary_files(folder) -> list:
    folder = Path(folder)
    return sorted(p.name for p in folder.iterdir() if outputs.is_temporary(p)) if folder.is_dir() else []


# ----------------------------------------------------------------------------------------------------
# small inputs
# ----------------------------------------------------------------------------------------------------

def noise_image(shape=(32, 32, 32), spacing=2.5, dtype=np.float32) -> sitk.Image:
    """A volume that passes the input checks (80 mm field of view, many grey values): not a brain."""
    array = (np.random.default_rng(0).random(shape[::-1]) * 900 + 100).astype(dtype)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((spacing,) * 3)
    return image


def write_image(path: Path, image=None) -> Path:
    sitk.WriteImage(noise_image() if image is None else image, str(path))
    return path


def truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_dicom_series(folder: Path, uid: str, slices: int = 32, skip=(), prefix="slice") -> list:
    """One DICOM file per slice (2.5 mm apart along z) of series `uid`, leaving out the slice numbers in `skip`."""
    folder.mkdir(parents=True, exist_ok=True)
    volume = noise_image((32, 32, slices), dtype=np.int16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    files = []
    for k in range(slices):
        if k in skip:
            continue
        plane = volume[:, :, k]
        for tag, value in (("0008|0060", "MR"), ("0020|000d", "1.2.826.0.1.3680043.2.1125.1"),
                           ("0020|000e", uid), ("0008|0018", f"{uid}.{k + 1}"),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0020|0032", f"0\\0\\{2.5 * k}"),
                           ("0020|0013", str(k + 1)), ("0018|0050", "2.5")):
            plane.SetMetaData(tag, value)
        files.append(folder / f"{prefix}{k:03d}.dcm")
        writer.SetFileName(str(files[-1]))
        writer.Execute(plane)
    return files


def reviewed_markups(path: Path, state="accepted") -> Path:
    findings = [Finding("CMB-1", (1.0, 2.0, 3.0), 0.9, status=state), Finding("CMB-2", (4.0, 5.0, 6.0), 0.8)]
    return write_markups_json(findings, path)


@pytest.fixture()
def no_model(tmp_path):
    return tmp_path / "no-such-model.json"


# ----------------------------------------------------------------------------------------------------
# bad input: one line, exit 2, before the model loads
# ----------------------------------------------------------------------------------------------------

def _singular_mha(tmp_path):
    path = write_image(tmp_path / "singular.mha")
    data = path.read_bytes().replace(b"TransformMatrix = 1 0 0 0 1 0 0 0 1", b"TransformMatrix = 1 0 0 0 1 0 0 0 0")
    path.write_bytes(data)
    return path


def _fifo(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    path = tmp_path / "pipe.nii.gz"
    os.mkfifo(path)
    return path


def _garbage_dcm_beside_a_series(tmp_path):
    write_dicom_series(tmp_path / "scans" / "sub", "1.2.826.0.1.3680043.2.1125.7")
    garbage = tmp_path / "scans" / "scan.dcm"
    garbage.write_bytes(os.urandom(4096))
    return garbage


def _dicom_missing_a_slice(tmp_path):
    write_dicom_series(tmp_path / "gap", "1.2.826.0.1.3680043.2.1125.8", skip=(12,))
    return tmp_path / "gap"


def _folder_without_dicom(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("no images here")
    return folder


def _mhd_without_its_raw(tmp_path):
    header = write_image(tmp_path / "scan.mhd")
    (tmp_path / "scan.raw").unlink()
    return header


def _empty(tmp_path):
    image = sitk.GetImageFromArray(np.zeros((32, 32, 32), np.float32))
    image.SetSpacing((2.5, 2.5, 2.5))
    return write_image(tmp_path / "empty.nii.gz", image)


BAD_INPUTS = {
    "truncated .nii (float)": (lambda tmp: truncated(write_image(tmp / "scan.nii")), "truncated or corrupt"),
    "truncated .nii (int16)": (lambda tmp: truncated(write_image(tmp / "scan.nii", noise_image(dtype=np.int16))),
                               "truncated or corrupt"),
    "truncated .nii.gz": (lambda tmp: truncated(write_image(tmp / "scan.nii.gz")), "truncated or corrupt"),
    "truncated .mha": (lambda tmp: truncated(write_image(tmp / "scan.mha")), "truncated, corrupt or not an image"),
    "truncated .nrrd": (lambda tmp: truncated(write_image(tmp / "scan.nrrd")), "truncated, corrupt or not an image"),
    "random bytes named .nii.gz": (lambda tmp: (tmp / "junk.nii.gz").write_bytes(os.urandom(5000)) and tmp / "junk.nii.gz",
                                   "cannot read image file"),
    "singular direction matrix (.mha)": (_singular_mha, "singular direction matrix"),
    "FIFO as input": (_fifo, "not a regular file"),
    "garbage scan.dcm beside a DICOM series in a subfolder": (_garbage_dcm_beside_a_series, "not a readable DICOM image"),
    "DICOM series missing one slice": (_dicom_missing_a_slice, "a slice is missing"),
    "folder without DICOM": (_folder_without_dicom, "no DICOM series found"),
    ".mhd whose .raw is missing": (_mhd_without_its_raw, "cannot read image file"),
    "empty (all-zero) volume": (_empty, "empty"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_refused_in_one_line_before_the_model_loads(case, tmp_path, no_model):
    make, words = BAD_INPUTS[case]
    out = tmp_path / "out"
    line = refused(case, cli("detect", make(tmp_path), "--out", out, "--model", no_model, timeout=60), out)
    assert words in line and MODEL_NOT_REACHED not in line


def test_an_unknown_device_is_refused_before_the_model_loads(tmp_path, no_model):
    out = tmp_path / "out"
    line = refused("--device tpu", cli("detect", write_image(tmp_path / "scan.nii.gz"), "--device", "tpu",
                                       "--out", out, "--model", no_model), out)
    assert "unknown device 'tpu'" in line


def test_a_missing_gpu_is_named_in_one_warning(tmp_path, no_model):
    if choose_device("auto")[0] == "cuda":
        pytest.skip("this machine has a GPU")
    result = cli("detect", write_image(tmp_path / "scan.nii.gz"), "--device", "cuda", "--out", tmp_path / "out",
                 "--model", no_model)
    record("--device cuda without a GPU (and a missing model, to stop early)", result)
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "warning: device cuda is not available (no such CUDA GPU); running on the CPU"
    assert MODEL_NOT_REACHED in lines[1] and len(lines) == 2


def test_auto_takes_the_gpu_when_torch_sees_one():
    import torch

    assert choose_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu", None)
    assert choose_device("CPU") == ("cpu", None)
    with pytest.raises(InputError, match="unknown device"):
        choose_device("cuda0")


def test_complex_input_is_read_as_its_magnitude_with_a_warning(tmp_path, no_model):
    magnitude = sitk.GetArrayFromImage(noise_image()).transpose(2, 1, 0)
    phase = np.random.default_rng(1).uniform(-np.pi, np.pi, magnitude.shape)
    path = tmp_path / "complex.nii"
    nib.save(nib.Nifti1Image((magnitude * np.exp(1j * phase)).astype(np.complex64), np.diag([2.5, 2.5, 2.5, 1])), path)
    volume = read_volume(path)
    np.testing.assert_allclose(volume.array, magnitude, rtol=1e-5)
    result = cli("detect", path, "--out", tmp_path / "out", "--model", no_model)
    record("complex-valued NIfTI (and a missing model, to stop early)", result)
    lines = result.stderr.strip().splitlines()
    assert lines[0] == f"warning: {path}: complex-valued voxels; using their magnitude"
    assert MODEL_NOT_REACHED in lines[1]


def test_a_dcm_file_reads_its_own_series_not_the_biggest_one(tmp_path):
    folder = tmp_path / "two-series"
    own = write_dicom_series(folder, "1.2.826.0.1.3680043.2.1125.10", slices=20, prefix="a")
    write_dicom_series(folder, "1.2.826.0.1.3680043.2.1125.11", slices=30, prefix="b")
    write_dicom_series(folder / "sub", "1.2.826.0.1.3680043.2.1125.12", slices=40, prefix="c")
    volume = read_volume(own[3])
    assert volume.meta["series_uid"] == "1.2.826.0.1.3680043.2.1125.10"
    assert volume.shape == (32, 32, 20) and volume.meta["source"] == str(own[3])
    assert read_volume(folder).shape == (32, 32, 30)  # the folder itself: its biggest series, as before


def test_a_given_mask_covering_everything_is_named_as_the_given_one(tmp_path, no_model):
    image = noise_image((64, 64, 64), spacing=3.5)
    mask = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
    mask.CopyInformation(image)
    out = tmp_path / "out"
    line = refused("--mask covering the whole field of view (refused before the model loads)",
                   cli("detect", write_image(tmp_path / "scan.nii.gz", image), "--mask",
                       write_image(tmp_path / "mask.nii.gz", mask), "--out", out, "--model", no_model), out)
    assert "the given brain mask holds" in line and "automatic" not in line


# ----------------------------------------------------------------------------------------------------
# output folder: checked before the work
# ----------------------------------------------------------------------------------------------------

def test_out_naming_an_existing_file_is_refused(tmp_path, no_model):
    out = tmp_path / "results.txt"
    out.write_text("keep me")
    line = refused("--out names an existing file",
                   cli("detect", write_image(tmp_path / "scan.nii.gz"), "--out", out, "--model", no_model))
    assert "is an existing file, not a folder" in line and out.read_text() == "keep me"


def test_out_that_cannot_be_created_is_refused(tmp_path, no_model):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    line = refused("--out cannot be created (below a file)",
                   cli("detect", write_image(tmp_path / "scan.nii.gz"), "--out", blocker / "out", "--model", no_model))
    assert "cannot create the output folder" in line


def test_a_read_only_out_folder_is_refused(tmp_path, no_model):
    out = tmp_path / "read-only"
    out.mkdir()
    out.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(out, os.W_OK):
            pytest.skip("this user (root?) can write to a read-only folder; see the fault-injection tests")
        line = refused("read-only --out folder",
                       cli("detect", write_image(tmp_path / "scan.nii.gz"), "--out", out, "--model", no_model), out)
        assert "cannot write to the output folder" in line
    finally:
        out.chmod(stat.S_IRWXU)


def test_a_reviewed_markups_file_is_never_replaced_without_force(tmp_path, no_model):
    out = tmp_path / "out"
    out.mkdir()
    markups = reviewed_markups(out / "scan.mrk.json")
    before = markups.read_bytes()
    scan = write_image(tmp_path / "scan.nii.gz")
    line = refused("re-run over a reviewed STEM.mrk.json", cli("detect", scan, "--out", out, "--model", no_model))
    assert "holds a review (states: accepted)" in line and "--force" in line
    assert markups.read_bytes() == before
    # --force passes the check: the run goes on to the model loader (and fails there, writing nothing)
    forced = cli("detect", scan, "--out", out, "--model", no_model, "--force")
    record("the same with --force (and a missing model, to stop early)", forced)
    assert forced.returncode == 2 and MODEL_NOT_REACHED in forced.stderr
    assert markups.read_bytes() == before


def test_a_markups_file_still_all_pending_may_be_replaced(tmp_path, no_model):
    out = tmp_path / "out"
    out.mkdir()
    reviewed_markups(out / "scan.mrk.json", state="pending")
    result = cli("detect", write_image(tmp_path / "scan.nii.gz"), "--out", out, "--model", no_model)
    assert result.returncode == 2 and MODEL_NOT_REACHED in result.stderr


def test_results_of_another_input_with_the_same_name_are_not_replaced(tmp_path, no_model):
    out = tmp_path / "out"
    out.mkdir()
    scan = write_image(tmp_path / "scan.nii.gz")
    (out / "scan.json").write_text(json.dumps({"input": str(tmp_path / "other" / "scan.nii.gz")}))
    line = refused("another input of the same file name already has results in --out",
                   cli("detect", scan, "--out", out, "--model", no_model))
    assert "holds the results of another input" in line and "--force" in line
    (out / "scan.json").write_text(json.dumps({"input": str(scan)}))  # its own earlier results: replaced
    result = cli("detect", scan, "--out", out, "--model", no_model)
    assert result.returncode == 2 and MODEL_NOT_REACHED in result.stderr


def test_a_point_placed_by_the_reader_counts_as_a_review(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    markups = reviewed_markups(out / "scan.mrk.json", state="pending")
    document = json.loads(markups.read_text())
    document["markups"][0]["controlPoints"][1]["description"] = ""  # placed in Slicer by the reader
    markups.write_text(json.dumps(document))
    with pytest.raises(outputs.OutputError, match="states: added"):
        outputs.check_output_stem(out, "scan")


def test_low_free_space_is_warned_about(tmp_path, monkeypatch):
    # fault injection: the file system reports 10 MB free
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 10 * 2 ** 20})())
    assert outputs.check_output_stem(tmp_path, "scan") == [f"only 10 MB free in {tmp_path}; the results may not fit"]


# ----------------------------------------------------------------------------------------------------
# atomic outputs: faults while writing leave nothing that looks finished
# ----------------------------------------------------------------------------------------------------

def _writers(folder: Path, fail_on=None) -> dict:
    def text_writer(content, fail=False):
        def write(path):
            Path(path).write_text(content)
            if fail:
                raise RuntimeError("the PNG renderer failed")
        return write
    return {key: (folder / f"scan.{key}", text_writer(f"new {key}", key == fail_on))
            for key in ("mrk.json", "csv", "png", "json")}


def _previous_run(folder: Path) -> dict:
    folder.mkdir(exist_ok=True)
    for name in ("scan.mrk.json", "scan.csv", "scan.png", "scan.json"):
        (folder / name).write_text(f"old {name}")
    return {p.name: p.read_text() for p in folder.iterdir()}


def test_a_full_disk_leaves_the_previous_results_and_no_partial_file(tmp_path, monkeypatch):
    before = _previous_run(tmp_path)
    calls = []
    real_fsync = os.fsync

    def fsync_full_disk(descriptor):  # fault injection: the disk fills up at the second file
        calls.append(descriptor)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(descriptor)

    monkeypatch.setattr(outputs.os, "fsync", fsync_full_disk)
    with pytest.raises(outputs.OutputError, match="No space left on device"):
        outputs.write_all(_writers(tmp_path), tmp_path, summary_key="json")
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == before


def test_a_read_only_folder_while_writing_leaves_nothing(tmp_path):
    writers = _writers(tmp_path)

    def read_only_file_system(path):  # fault injection: the folder turned read-only after the checks
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    writers["csv"] = (writers["csv"][0], read_only_file_system)
    with pytest.raises(outputs.OutputError, match="Read-only file system"):
        outputs.write_all(writers, tmp_path, summary_key="json")
    assert list(tmp_path.iterdir()) == []


def test_a_failing_writer_leaves_the_previous_results_and_no_temporary_file(tmp_path):
    before = _previous_run(tmp_path)
    with pytest.raises(RuntimeError, match="PNG renderer"):
        outputs.write_all(_writers(tmp_path, fail_on="png"), tmp_path, summary_key="json")
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == before


def test_the_summary_is_renamed_in_last_after_the_old_one_is_removed(tmp_path, monkeypatch):
    _previous_run(tmp_path)
    events = []
    real_replace, real_unlink = os.replace, os.unlink
    monkeypatch.setattr(outputs.os, "replace", lambda a, b: events.append(("replace", Path(b).name)) or real_replace(a, b))
    monkeypatch.setattr(outputs.os, "unlink", lambda p: events.append(("unlink", Path(p).name)) or real_unlink(p))
    paths = outputs.write_all(_writers(tmp_path), tmp_path, summary_key="json")
    assert events == [("unlink", "scan.json"), ("replace", "scan.mrk.json"), ("replace", "scan.csv"),
                      ("replace", "scan.png"), ("replace", "scan.json")]
    assert {p.read_text() for p in paths.values()} == {"new mrk.json", "new csv", "new png", "new json"}
    assert temporary_files(tmp_path) == []


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="no SIGKILL on this platform")
def test_a_run_killed_while_writing_leaves_no_final_file(tmp_path):
    code = textwrap.dedent(f'''
        import os, signal
        from pathlib import Path
        from CMBDetectorLib import outputs
        folder = Path({str(tmp_path)!r})
        def kill(path):
            Path(path).write_text("half")
            os.kill(os.getpid(), signal.SIGKILL)
        writers = {{"markups": (folder / "scan.mrk.json", lambda p: Path(p).write_text("done")),
                   "csv": (folder / "scan.csv", kill),
                   "summary": (folder / "scan.json", lambda p: Path(p).write_text("done"))}}
        outputs.write_all(writers, folder)
    ''')
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8")
    assert result.returncode == -signal.SIGKILL
    assert finished_files(tmp_path) == [] and len(temporary_files(tmp_path)) == 2


def test_the_next_run_removes_the_temporary_files_of_a_killed_run(tmp_path, no_model):
    """Temporary files whose process is gone, or that are over a day old, are removed by the next run into
    the folder (even one refused later); a live run's are left alone."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    live_pid = os.getpid()  # this test's own process: alive, and not the run's
    names = {"dead": f".scan.mrk.json.tmp-{dead_pid}-0123abcd.json", "live": f".scan.csv.tmp-{live_pid}-4567cdef.csv",
             "old": f".scan.png.tmp-{live_pid}-89ab0123.png"}
    for name in names.values():
        (tmp_path / name).write_text("half")
    two_days_ago = os.stat(tmp_path / names["old"]).st_mtime - 2 * outputs.STALE_TEMPORARY_S
    os.utime(tmp_path / names["old"], (two_days_ago, two_days_ago))
    result = cli("detect", write_image(tmp_path / "scan.nii.gz"), "--out", tmp_path, "--model", no_model)
    assert result.returncode == 2 and MODEL_NOT_REACHED in result.stderr
    assert temporary_files(tmp_path) == [names["live"]]


def _small_crop_file(folder: Path) -> Path:
    from helpers import small_swi_crop

    from CMBDetectorLib.io import write_volume

    return write_volume(small_swi_crop(), folder / "scan.nii.gz")


def test_force_backs_up_the_review_and_no_png_removes_the_old_png(tmp_path):
    """--force replaces a reviewed STEM.mrk.json only after copying it to STEM.mrk.json.bak-TIME (said on
    stderr and in the summary); --no-png removes the previous run's STEM.png, which would show other
    findings beside the new summary. Real runs on a small crop."""
    scan, out = _small_crop_file(tmp_path), tmp_path / "out"
    first = cli("detect", scan, "--crop", "--out", out, "--device", "cpu")
    assert first.returncode == 0, first.stderr
    assert finished_files(out) == ["scan.csv", "scan.json", "scan.mrk.json", "scan.png"]
    reviewed = reviewed_markups(out / "scan.mrk.json", state="rejected").read_bytes()
    forced = cli("detect", scan, "--crop", "--out", out, "--device", "cpu", "--force", "--no-png")
    record("--force over a reviewed STEM.mrk.json (small crop, --no-png after a run with a PNG)", forced)
    assert forced.returncode == 0, forced.stderr
    backups = sorted(out.glob("scan.mrk.json.bak-*"))
    assert len(backups) == 1 and backups[0].read_bytes() == reviewed
    lines = [line for line in forced.stderr.splitlines() if "--force" in line]
    assert lines == [f"warning: --force: the reviewed scan.mrk.json it replaces is kept as {backups[0]}"]
    summary = json.loads((out / "scan.json").read_text())
    assert lines[0][len("warning: "):] in summary["warnings"]
    assert finished_files(out) == ["scan.csv", "scan.json", "scan.mrk.json"]  # no PNG of the first run
    assert temporary_files(out) == []
    again = cli("detect", scan, "--crop", "--out", out, "--device", "cpu", "--force", "--no-png")
    assert again.returncode == 0 and "kept as" not in again.stderr  # all pending: nothing of a reader's to keep
    assert len(list(out.glob("scan.mrk.json.bak-*"))) == 1


# ---- image types: warnings, never refusals -----------------------------------------------------------

def _mni_t1_3mm():
    """nilearn's MNI152 2009 T1 (skull-stripped) at 3 mm: a T1-weighted head, 66 x 78 x 63."""
    from CMBDetectorLib import atlas
    from CMBDetectorLib.image import Volume

    t1 = atlas.load_mni_template()
    affine = t1.affine.copy()
    affine[:3, :3] *= 3
    return Volume(np.ascontiguousarray(t1.array[::3, ::3, ::3]), affine, {"source": "MNI152 T1 at 3 mm"})


def _t2_like_from_t1(t1):
    """The same head with the contrast turned over inside the brain: CSF bright, white matter dark."""
    from CMBDetectorLib import brain

    inside = brain.dilate_mm(t1.array > 0.02 * t1.array.max(), t1.spacing, 3.0)
    return t1.with_array(np.where(inside, 1.05 * t1.array.max() - t1.array, 0).astype(np.float32))


def _sphere_phantom():
    """A uniform 90 mm sphere with noise, 64^3 at 3 mm."""
    from CMBDetectorLib.image import Volume

    grid = (np.indices((64, 64, 64)).astype(np.float32) - 31.5) * 3
    inside = np.sqrt((grid ** 2).sum(0)) < 45
    array = np.where(inside, 1000.0, 5.0) + 20 * np.random.default_rng(0).standard_normal(inside.shape)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = -94.5
    return Volume(array.astype(np.float32), affine, {"source": "sphere phantom"})


def _image_type_warnings(volume) -> tuple:
    from CMBDetectorLib import imagetype, preprocess

    prepared = preprocess.prepare(volume)  # brain extraction and its registration, as detect does
    return imagetype.check_image_type(volume, prepared.registration), prepared.warnings


def test_a_t1_weighted_head_is_warned_and_its_t2_like_inversion_is_not():
    t1 = _mni_t1_3mm()
    check, warnings = _image_type_warnings(t1)
    assert check.csf_wm_ratio < 0.5 and [w for w in warnings if w.startswith("T1-like contrast")] == list(check.warnings)
    assert "CMBDetector expects a T2*-weighted GRE/SWI magnitude" in check.warnings[0]
    check, warnings = _image_type_warnings(_t2_like_from_t1(t1))
    assert check.csf_wm_ratio > 1.0 and check.warnings == ()


@pytest.mark.skipif(not (PHILIPS / "mag_echo1.nii.gz").is_file(), reason="the shared real scans are not here")
def test_real_short_te_gre_heads_are_not_warned():
    for echo in (1, 2):
        check, _ = _image_type_warnings(read_volume(PHILIPS / f"mag_echo{echo}.nii.gz"))
        assert check.warnings == () and check.csf_wm_ratio > 0.7


def test_a_sphere_phantom_is_warned_as_not_a_head():
    from CMBDetectorLib import imagetype

    check, warnings = _image_type_warnings(_sphere_phantom())
    assert len(check.warnings) == 1 and check.warnings[0].startswith("does not look like a head scan (the image is one convex blob")
    assert check.warnings[0] in warnings
    # the verdict is the image's own: no registration (or one that happens to pass) changes it
    assert imagetype.check_image_type(_sphere_phantom(), None).warnings == check.warnings


def test_image_type_warnings_reach_stderr_and_the_summary(tmp_path):
    """Real detect runs: one warning line each, the run completes (a warning, never a refusal)."""
    from CMBDetectorLib.io import write_volume

    for case, volume, start in (("T1-weighted head (MNI152 T1, 3 mm)", _mni_t1_3mm(), "T1-like contrast ("),
                                ("sphere phantom (90 mm, 3 mm voxels)", _sphere_phantom(), "does not look like a head scan")):
        scan = write_volume(volume, tmp_path / "scan.nii.gz")
        out = tmp_path / case.split()[0]
        result = cli("detect", scan, "--out", out, "--device", "cpu", "--no-png")
        record(case, result)
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
        lines = [line for line in result.stderr.splitlines() if start in line]
        assert len(lines) == 1 and lines[0].startswith("warning: "), result.stderr
        summary = json.loads((out / "scan.json").read_text())
        assert lines[0][len("warning: "):] in summary["warnings"]


# ----------------------------------------------------------------------------------------------------
# real runs: two at once into one folder, POSIX-only modules blocked, odd paths, no usable HOME
# ----------------------------------------------------------------------------------------------------

def _inputs(folder: Path):
    """A 4D two-echo scan and a 3D scan: the real Philips head (80 x 80 x 53) when the shared data is here,
    else one small simulated scan."""
    folder.mkdir(parents=True)
    if (PHILIPS / "mag_echo1.nii.gz").is_file():
        echoes = [nib.load(str(PHILIPS / f"mag_echo{n}.nii.gz")) for n in (1, 2)]
        affine = echoes[0].affine
        arrays = [np.asarray(e.dataobj, dtype=np.float32) for e in echoes]
    else:
        from CMBDetectorLib.simulate.synth import simulate_scan

        scan = simulate_scan(777, "gre3t", n_cmb=2)
        affine, arrays = scan.magnitude.affine, [scan.magnitude.array, scan.magnitude.array * 0.7]
    four_d = folder / "two échoes.nii.gz"
    nib.save(nib.Nifti1Image(np.stack(arrays, axis=-1), affine), str(four_d))
    three_d = folder / "head ü.nii.gz"
    nib.save(nib.Nifti1Image(arrays[1], affine), str(three_d))
    return four_d, three_d


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("real runs")
    four_d, three_d = _inputs(root / "in put ü")
    out = root / "out ü t"
    blocked_home = root / "home-is-a-file"  # like a read-only HOME: nothing can be created under it
    blocked_home.write_text("")
    env_no_home = {k: v for k, v in os.environ.items() if k not in ("HOME", "YOLO_CONFIG_DIR", "MPLCONFIGDIR")}
    env_bad_home = {**env_no_home, "HOME": str(blocked_home / "home"), "USER": "reader"}
    common = ["--out", out, "--no-locate"]
    processes = {
        "echo": subprocess.Popen([sys.executable, "-c", BLOCK_FOR_OUR_IMPORTS + RUN_CLI, "detect", four_d,
                                  "--echo", "1", *common],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8", env=env_no_home),
        "plain": subprocess.Popen([sys.executable, "-c", BLOCK_FOR_EVERY_IMPORTER + RUN_CLI, "detect", three_d, *common],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8", env=env_bad_home),
    }
    results = {}
    for key, process in processes.items():
        stdout, stderr = process.communicate(timeout=600)
        results[key] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    record("4D two-echo input, --echo 1 (HOME unset; POSIX modules blocked for our imports; at once with the next)",
           results["echo"])
    record("3D input into the same folder (HOME not creatable; POSIX modules blocked for every import)",
           results["plain"])
    return out, four_d, three_d, results


def test_two_runs_at_once_into_one_folder_both_complete(real_runs):
    out, four_d, three_d, results = real_runs
    for result in results.values():
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        assert "matplotlib" not in result.stderr.lower()  # no complaint about the unusable HOME
    assert finished_files(out) == sorted(f"{stem}{suffix}" for stem in ("head ü", "two échoes_echo1")
                                         for suffix in FINISHED_SUFFIXES)
    assert temporary_files(out) == []
    for stem, source in (("head ü", three_d), ("two échoes_echo1", four_d)):
        summary = json.loads((out / f"{stem}.json").read_text(encoding="utf-8"))
        assert summary["input"] == str(source)
        assert summary["counts"]["total"] == len(read_markups_json(out / f"{stem}.mrk.json"))


def test_the_chosen_echo_is_in_the_stem_and_the_summary(real_runs):
    out = real_runs[0]
    chosen = json.loads((out / "two échoes_echo1.json").read_text(encoding="utf-8"))
    plain = json.loads((out / "head ü.json").read_text(encoding="utf-8"))
    assert chosen["echo"] == {"requested": 1, "used": 1, "n_echoes": 2}
    assert plain["echo"] == {"requested": "combine", "used": None, "n_echoes": 1}


def test_the_device_used_is_recorded(real_runs):
    out = real_runs[0]
    summary = json.loads((out / "head ü.json").read_text(encoding="utf-8"))
    assert summary["model"]["device"] == choose_device("auto")[0]


def test_version_and_import_work_without_posix_only_modules():
    result = cli("--version", blocked=True, env={**os.environ, "USER": "reader"})
    assert result.returncode == 0 and result.stdout.startswith("cmbdetector "), result.stderr
    every_module = subprocess.run([sys.executable, "-c", BLOCK_FOR_EVERY_IMPORTER + textwrap.dedent('''
        import importlib, pkgutil
        import CMBDetectorLib
        names = [m.name for m in pkgutil.walk_packages(CMBDetectorLib.__path__, "CMBDetectorLib.")]
        for name in names:
            importlib.import_module(name)
        print(len(names))
    ''')], capture_output=True, encoding="utf-8", env={**os.environ, "USER": "reader"})
    assert every_module.returncode == 0 and int(every_module.stdout) > 20, every_module.stderr
    # the blocker does block: our own import of `resource` fails, and the peak-memory helper copes
    # psutil's Linux code needs POSIX modules itself (not on Windows): block only ours here
    probe = subprocess.run([sys.executable, "-c", BLOCK_FOR_OUR_IMPORTS + textwrap.dedent('''
        import CMBDetectorLib.sysinfo as sysinfo
        try:
            exec("import resource", vars(sysinfo))
        except ImportError:
            print("blocked", sysinfo.peak_rss_mb())
    ''')], capture_output=True, encoding="utf-8")
    words = probe.stdout.split()
    assert words[0] == "blocked" and float(words[1]) > 10, probe.stderr


def test_peak_memory_is_in_mib_on_linux_and_macos(monkeypatch):
    status = Path("/proc/self/status")
    if not status.is_file():
        pytest.skip("no /proc to compare with")
    high_water_kib = next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmHWM"))
    linux = sysinfo.peak_rss_mb()
    assert abs(linux - high_water_kib / 1024) < 0.05 * linux + 1
    # macOS reports ru_maxrss in bytes: the same raw number means 1024 times less there
    monkeypatch.setattr(sysinfo.sys, "platform", "darwin")
    assert sysinfo.peak_rss_mb() == pytest.approx(linux / 1024, abs=0.1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux carries ru_maxrss over exec")
def test_a_process_started_by_a_larger_one_reports_its_own_peak_memory():
    # as a detect started by Slicer or a batch worker: the parent holds 1.5 GB when it starts the child
    parent = textwrap.dedent('''
        import subprocess, sys
        held = bytearray(b"\x01") * (1500 * 2 ** 20)  # written, so resident
        child = "from CMBDetectorLib import sysinfo; print(sysinfo.peak_rss_mb())"
        print(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True).stdout)
    ''')
    result = subprocess.run([sys.executable, "-c", parent], capture_output=True, encoding="utf-8")
    assert result.returncode == 0, result.stderr
    assert 10 < float(result.stdout) < 500  # the child's own few tens of MiB, not the parent's 1.5 GB


def test_each_process_has_its_own_ultralytics_settings(tmp_path):
    code = ("import os\nfrom CMBDetectorLib import yolo\nfolder = yolo.configure_offline()\n"
            "print(folder, (folder / 'settings.json').is_file())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("HOME", "YOLO_CONFIG_DIR")}
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8", env=env) for _ in range(2)]
    folders = [run.stdout.rsplit(" ", 1)[0] for run in runs]
    assert all(run.returncode == 0 and run.stdout.split()[-1] == "True" for run in runs), runs
    assert folders[0] != folders[1]
    assert not any(Path(folder).exists() for folder in folders)  # removed when the process ended
