"""`cmbdetector batch`: a small cohort on a real Dask cluster, real detection, real files.

One coarse simulated scan (1.5 x 1.5 x 3 mm) is made once for the module; the other "scans" are copies
with their intensities scaled (new bytes, new content hash, the same anatomy), so each detection takes
seconds. The embedded LocalCluster (2 worker processes) runs the main cohort; the later runs use
--scheduler on a LocalCluster this module starts, which also keeps their Detectors warm.
"""

import csv
import hashlib
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl
import pytest

from CMBDetectorLib.batch import (COHORT_CSV, COHORT_PARQUET, FINDINGS_PARQUET, Settings, expected_model_hashes,
                                  finished_summary, summary_path)
from CMBDetectorLib.cohort_inputs import find_scans
from CMBDetectorLib.errors import InputError
from CMBDetectorLib.findings import Finding, write_markups_json
from CMBDetectorLib.simulate.synth import simulate_scan
from helpers import cli

SEED = 4242  # not among the training (1xxxx) or validation (2xxxx) seeds
SCALES = (1.0, 1.03, 0.97)  # three scans of one simulated head, each with its own bytes
RESULT_SUFFIXES = (".json", ".csv", ".mrk.json", ".png")


def _save(path: Path, array, affine) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return path


@pytest.fixture(scope="module")
def head():
    """(magnitude array, phase array, affine) of one small simulated 3 T GRE head with microbleeds."""
    scan = simulate_scan(SEED, "gre3t", n_cmb=3, spacing_mm=(1.5, 1.5, 3.0))
    return scan.magnitude.array, scan.phase.array, scan.magnitude.affine


def _bad_files(folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    unreadable = folder / "unreadable.nii.gz"
    unreadable.write_bytes(b"\x1f\x8b not really a gzip or a NIfTI")
    labels = _save(folder / "labels.nii.gz", np.random.default_rng(0).integers(0, 4, (80, 80, 80)).astype(np.int16),
                   np.eye(4))
    return {"unreadable": unreadable, "labels": labels}


@pytest.fixture(scope="module")
def cohort(head, tmp_path_factory):
    """A CSV manifest of 3 scans (one with its phase, written by a vendor of the other sign convention and
    marked so; two subjects, one with sessions) + 2 bad files, run by `batch` on the embedded cluster with 2
    workers."""
    magnitude, phase, affine = head
    root = tmp_path_factory.mktemp("cohort")
    images = root / "images"
    scans = [_save(images / f"scan{i}.nii.gz", magnitude * scale, affine) for i, scale in enumerate(SCALES)]
    phase_file = _save(images / "scan0_phase.nii.gz", -phase, affine)
    bad = _bad_files(images)
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "phase", "mask", "subject", "session", "flip_phase"])
        writer.writerow(["images/scan0.nii.gz", "images/scan0_phase.nii.gz", "", "sub-01", "ses-1", "yes"])
        writer.writerow(["images/scan1.nii.gz", "", "", "sub-01", "ses-2"])
        writer.writerow([str(scans[2]), "", "", "sub-02", ""])  # an absolute path
        writer.writerow(["images/unreadable.nii.gz", "", "", "sub-03", ""])
        writer.writerow(["images/labels.nii.gz", "", "", "sub-04", ""])
    out = root / "out"
    result = cli("batch", manifest, "--out", out, "--workers", 2)
    return {"root": root, "manifest": manifest, "out": out, "result": result, "scans": scans,
            "phase": phase_file, "bad": bad}


def _table(out: Path) -> list:
    return pl.read_parquet(out / COHORT_PARQUET).to_dicts()


def _result_files(out: Path) -> dict:
    """(inode, mtime_ns) of every per-scan file under `out`: a rewrite (temp + rename) changes the inode."""
    return {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in sorted(out.rglob("*"))
            if path.is_file() and path.parent != out}


# ---- the cohort on the embedded cluster ------------------------------------------------------------

def test_a_cohort_gives_ok_rows_and_failed_rows_with_their_reasons(cohort):
    result, out = cohort["result"], cohort["out"]
    assert result.returncode == 3, result.stderr  # some scans failed
    assert "Traceback" not in result.stderr
    rows = _table(out)
    assert [row["status"] for row in rows] == ["ok", "ok", "ok", "failed", "failed"]
    by_input = {Path(row["input"]).name: row for row in rows}
    assert "cannot read image file" in by_input["unreadable.nii.gz"]["reason"]
    assert "label map" in by_input["labels.nii.gz"]["reason"]
    assert all(row["failure"] == "input" and "\n" not in row["reason"] for row in rows if row["status"] == "failed")
    assert all(row["reason"] == "" and row["n_total"] >= 0 for row in rows if row["status"] == "ok")
    # each scan lands in its subject / session folder with every file `detect` writes
    for folder, stem in (("sub-01/ses-1", "scan0"), ("sub-01/ses-2", "scan1"), ("sub-02", "scan2")):
        assert sorted(p.name for p in (out / folder).iterdir()) == sorted(stem + s for s in RESULT_SUFFIXES)
    assert not (out / "sub-03").exists() and not (out / "sub-04").exists()
    progress = [line for line in result.stderr.splitlines() if line.startswith("batch: ")]
    assert progress[-1].startswith("batch: 5/5 done, 2 failed") and "scans/h" in progress[-1]


def test_the_phase_of_the_manifest_is_used_and_the_subjects_are_recorded(cohort):
    out = cohort["out"]
    with_phase = json.loads((out / "sub-01/ses-1/scan0.json").read_text())
    without = json.loads((out / "sub-01/ses-2/scan1.json").read_text())
    assert with_phase["phase_given"] and not without["phase_given"]
    assert with_phase["phase_sign_reversed"] and not without["phase_sign_reversed"]  # the manifest's flip_phase
    assert with_phase["batch"]["inputs"] == {"magnitude": str(cohort["scans"][0]), "phase": str(cohort["phase"])}
    rows = {row["input"]: row for row in _table(out)}
    assert (rows[str(cohort["scans"][0])]["subject"], rows[str(cohort["scans"][0])]["session"]) == ("sub-01", "ses-1")
    assert (rows[str(cohort["scans"][2])]["subject"], rows[str(cohort["scans"][2])]["session"]) == ("sub-02", "")


def test_a_manifest_says_per_scan_whose_phase_runs_the_other_way(tmp_path):
    """A cohort mixing vendors: `flip_phase` per row (empty: the run's --flip-phase), and a result stands only
    for the same reading of its phase (a summary from before the option, without the key, for no reversal)."""
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,phase,flip_phase\na.nii.gz,a_ph.nii.gz,yes\nb.nii.gz,b_ph.nii.gz,0\n"
                        "c.nii.gz,c_ph.nii.gz,\nd.nii.gz,,1\n")
    scans = find_scans(str(manifest))
    assert [s.flip_phase for s in scans] == [True, False, None, True]
    for run_flag, expected in ((False, [True, False, False, False]), (True, [True, False, True, False])):
        assert [Settings(flip_phase=run_flag).reverses_phase(s) for s in scans] == expected  # d: no phase
    manifest.write_text("path,phase,flip_phase\na.nii.gz,a_ph.nii.gz,maybe\n")
    with pytest.raises(InputError, match="line 2: flip_phase must be one of"):
        find_scans(str(manifest))

    scan, settings = scans[0], Settings()
    (tmp_path / scan.folder).mkdir()
    summary = {"phase_sign_reversed": True, "batch": {"input_sha256": "x", "model_hashes": {}, "echo": scan.echo,
                                                      "settings": settings.result_key()}}
    summary_path(tmp_path, scan).write_text(json.dumps(summary))
    assert finished_summary(tmp_path, scan, "x", {}, settings) == summary
    assert finished_summary(tmp_path, replace(scan, flip_phase=False), "x", {}, settings) is None
    del summary["phase_sign_reversed"]
    summary_path(tmp_path, scan).write_text(json.dumps(summary))
    assert finished_summary(tmp_path, replace(scan, flip_phase=None), "x", {}, settings) == summary


def test_the_cohort_tables_hold_what_the_per_scan_summaries_say(cohort):
    out = cohort["out"]
    rows = _table(out)
    csv_rows = list(csv.DictReader(open(out / COHORT_CSV, newline="")))
    assert [r["input"] for r in csv_rows] == [r["input"] for r in rows]
    assert [r["status"] for r in csv_rows] == [r["status"] for r in rows]
    findings = pl.read_parquet(out / FINDINGS_PARQUET)
    workers = set()
    for row, csv_row in zip(rows, csv_rows):
        if row["status"] != "ok":
            assert row["summary"] == "" and row["n_total"] is None
            continue
        summary = json.loads(Path(row["summary"]).read_text())
        counts = summary["counts"]
        assert row["n_total"] == counts["total"] == int(csv_row["n_total"])
        assert row["n_lobar"] + row["n_deep"] + row["n_infratentorial"] + row["n_unknown"] == counts["total"]
        assert row["n_deep"] == counts["by_region"].get("deep", 0)
        lobar = [f["lobe"] for f in summary["findings"] if f["region"] == "lobar"]
        assert row["n_lobar_frontal"] == lobar.count("frontal") and row["n_lobar"] == len(lobar)
        assert row["max_score"] == summary["scan_level"]["max_score"]
        assert row["any_microbleed"] == summary["scan_level"]["any_microbleed"]
        assert row["phase_sign_reversed"] == summary["phase_sign_reversed"] == (row["phase"] != "")
        assert row["input_sha256"] == summary["batch"]["input_sha256"] and len(row["input_sha256"]) == 64
        assert row["cnn_sha256"] == summary["model"]["sha256"]
        assert row["detect_s"] == summary["timings_s"]["total"] and row["peak_rss_mb"] == summary["peak_rss_mb"]
        mine = findings.filter(pl.col("summary") == row["summary"]).sort("label")
        expected = sorted(summary["findings"], key=lambda f: f["label"])
        assert mine["label"].to_list() == [f["label"] for f in expected]
        assert mine["score"].to_list() == [f["score"] for f in expected]
        assert mine["x_ras"].to_list() == [f["position_ras"][0] for f in expected]
        assert mine["kept_by"].to_list() == [f["kept_by"] for f in expected]
        assert set(mine["kept_by"].to_list()) <= {"networks", "criteria"}
        workers.add(row["worker"])
    assert len(set(r["input_sha256"] for r in rows)) == len(rows)  # every scan has its own bytes
    for row in rows[1:]:  # one input file: its hash is the file's own SHA-256
        assert row["input_sha256"] == hashlib.sha256(Path(row["input"]).read_bytes()).hexdigest()
    assert len(workers) == 2  # both workers of the embedded cluster detected


def test_the_models_the_client_expects_are_the_ones_the_workers_loaded(cohort):
    summary = json.loads((cohort["out"] / "sub-02/scan2.json").read_text())
    assert expected_model_hashes(Settings()) == summary["batch"]["model_hashes"]


def test_a_rerun_redoes_nothing(cohort):
    out = cohort["out"]
    before = _result_files(out)
    rerun = cli("batch", cohort["manifest"], "--out", out)
    assert rerun.returncode == 3, rerun.stderr
    assert "5 skipped (done before), 0 run now" in rerun.stdout
    assert not [line for line in rerun.stderr.splitlines() if line.startswith("batch: ")]  # no cluster started
    assert _result_files(out) == before  # no per-scan file rewritten
    rows = _table(out)
    assert all(row["skipped"] for row in rows)
    assert [row["status"] for row in rows] == ["ok", "ok", "ok", "failed", "failed"]
    assert "label map" in rows[-1]["reason"]


# ---- --force, --scheduler, BIDS: on a cluster this module starts ------------------------------------

@pytest.fixture(scope="module")
def scheduler():
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        yield cluster.scheduler_address


def test_force_redoes_a_finished_scan_and_a_changed_input_is_redone(cohort, head, scheduler):
    out = cohort["out"]
    subset = cohort["root"] / "subset.csv"
    subset.write_text(f"path,subject\n{cohort['scans'][2]},sub-02\n{cohort['bad']['labels']},sub-04\n")
    summary = out / "sub-02/scan2.json"
    before = summary.stat().st_ino
    # a reader reviewed this scan meanwhile: --force replaces the review, but keeps it as a backup
    reviewed = write_markups_json([Finding("CMB-1", (1.0, 2.0, 3.0), 0.9, status="rejected")],
                                  out / "sub-02/scan2.mrk.json").read_bytes()
    forced = cli("batch", subset, "--out", out, "--force", "--scheduler", scheduler)
    assert forced.returncode == 3, forced.stderr
    assert "0 skipped (done before), 2 run now" in forced.stdout
    assert summary.stat().st_ino != before
    backups = sorted((out / "sub-02").glob("scan2.mrk.json.bak-*"))
    assert len(backups) == 1 and backups[0].read_bytes() == reviewed
    assert f"--force: the reviewed scan2.mrk.json it replaces is kept as {backups[0]}" in \
        json.loads(summary.read_text())["warnings"]
    assert [row["skipped"] for row in _table(out)] == [False, False]
    # new bytes under the same name: redone without --force
    magnitude, _, affine = head
    _save(cohort["scans"][2], magnitude * 1.05, affine)
    changed = summary.stat().st_ino
    again = cli("batch", subset, "--out", out, "--scheduler", scheduler)
    assert "1 skipped (done before), 1 run now" in again.stdout, again.stdout + again.stderr
    assert summary.stat().st_ino != changed


def _bids_tree(root: Path, head) -> Path:
    magnitude, phase, affine = head
    (root / "dataset_description.json").parent.mkdir(parents=True)
    (root / "dataset_description.json").write_text('{"Name": "test", "BIDSVersion": "1.9.0"}')
    anat = root / "sub-01" / "ses-1" / "anat"
    for echo, scale in ((1, 1.2), (2, 1.0)):
        _save(anat / f"sub-01_ses-1_echo-{echo}_part-mag_GRE.nii.gz", magnitude * scale, affine)
        _save(anat / f"sub-01_ses-1_echo-{echo}_part-phase_GRE.nii.gz", phase * echo / 2, affine)
    _save(root / "sub-02" / "anat" / "sub-02_swi.nii.gz", magnitude * 0.9, affine)
    _save(root / "sub-02" / "anat" / "sub-02_T1w.nii.gz", magnitude, affine)  # not a GRE/SWI: not read
    return root


def test_bids_pairs_magnitude_and_phase_and_takes_the_longest_echo(head, tmp_path):
    root = _bids_tree(tmp_path / "bids", head)
    scans = find_scans(str(root))
    assert [(s.subject, s.session, Path(s.magnitude).name, Path(s.phase).name if s.phase else None)
            for s in scans] == [
        ("sub-01", "ses-1", "sub-01_ses-1_echo-2_part-mag_GRE.nii.gz", "sub-01_ses-1_echo-2_part-phase_GRE.nii.gz"),
        ("sub-02", "", "sub-02_swi.nii.gz", None)]
    every_echo = find_scans(str(root), echoes="all")
    assert sorted(Path(s.magnitude).name for s in every_echo if s.subject == "sub-01") == [
        "sub-01_ses-1_echo-1_part-mag_GRE.nii.gz", "sub-01_ses-1_echo-2_part-mag_GRE.nii.gz"]


def test_a_bids_dataset_runs_on_an_existing_scheduler(head, tmp_path, scheduler):
    root = _bids_tree(tmp_path / "bids", head)
    out = tmp_path / "out"
    result = cli("batch", root, "--out", out, "--scheduler", scheduler, "--no-png")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = _table(out)
    assert [(row["subject"], row["session"], row["status"]) for row in rows] == [
        ("sub-01", "ses-1", "ok"), ("sub-02", "", "ok")]
    summary = json.loads((out / "sub-01/ses-1/sub-01_ses-1_echo-2_part-mag_GRE.json").read_text())
    assert summary["phase_given"] and summary["batch"]["inputs"]["phase"].endswith("echo-2_part-phase_GRE.nii.gz")
    assert (out / "sub-02" / "sub-02_swi.json").is_file()


# ---- finding the scans; usage errors -------------------------------------------------------------

def test_a_folder_and_a_glob_name_clashing_files_after_their_folders(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "Mag.nii").write_bytes(b"")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    scans = find_scans(str(tmp_path / "*" / "Mag.nii"))
    assert [(s.folder, s.stem) for s in scans] == [("a_Mag", "a_Mag"), ("b_Mag", "b_Mag")]
    assert [s.stem for s in find_scans(str(tmp_path / "a"))] == ["Mag"]
    with pytest.raises(InputError, match="no scans found"):
        find_scans(str(tmp_path / "*.nrrd"))


def test_a_manifest_names_folders_safely_and_needs_a_path_column(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,subject,session\nx.nii.gz,../../etc,ses 1\n")
    (scan,) = find_scans(str(manifest))
    assert scan.folder == "_.._etc/ses_1" and scan.magnitude == str(tmp_path / "x.nii.gz")
    manifest.write_text("file,subject\nx.nii.gz,a\n")
    with pytest.raises(InputError, match="'path' column"):
        find_scans(str(manifest))


def test_a_missing_file_is_a_failed_row_without_starting_a_cluster(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path\nnowhere.nii.gz\n")
    result = cli("batch", manifest, "--out", tmp_path / "out")
    assert result.returncode == 3
    (row,) = _table(tmp_path / "out")
    assert row["status"] == "failed" and row["reason"].startswith("file not found")
    assert "batch: " not in result.stderr


@pytest.mark.parametrize("arguments, words", [
    (["nowhere/at/all", "--out", "{tmp}/out"], "input not found"),
    (["{tmp}", "--out", "{tmp}/out", "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"], "--workers"),
    (["{tmp}/in", "--out", "{tmp}/out", "--model", "{tmp}/bad.pt"], "weights not found"),
])
def test_usage_errors_exit_2_in_one_line_before_any_work(tmp_path, arguments, words):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.nii.gz").write_bytes(b"")
    result = cli("batch", *(a.format(tmp=tmp_path) for a in arguments))
    assert result.returncode == 2 and words in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out" / COHORT_PARQUET).exists()


WORKER_ENVIRONMENT = """
import json, os
from CMBDetectorLib.batch import dask_client

def environment():
    return {name: os.environ.get(name) for name in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")}

if __name__ == "__main__":
    with dask_client(None, 2) as client:
        print(json.dumps(list(client.run(environment).values())))
"""


def test_embedded_workers_keep_glibcs_adaptive_allocator_and_one_thread_per_core(tmp_path):
    """Dask's default MALLOC_TRIM_THRESHOLD_ doubled the CNN's time in its workers (every batch buffer
    mapped anew); the embedded cluster unsets it. Each of 2 workers on 2 cores gets 1 thread. Run in a fresh
    process, as `cmbdetector batch` is: a Dask nanny leaves its variables in its parent's environment, so
    an earlier cluster in this test process would hand them on."""
    import os

    script = tmp_path / "workers.py"
    script.write_text(WORKER_ENVIRONMENT)
    environment = {k: v for k, v in os.environ.items() if k != "MALLOC_TRIM_THRESHOLD_"}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=environment,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    threads = str(max(1, (os.cpu_count() or 1) // 2))
    environments = json.loads(result.stdout.strip().splitlines()[-1])
    assert environments == [{"MALLOC_TRIM_THRESHOLD_": None, "OMP_NUM_THREADS": threads}] * 2
