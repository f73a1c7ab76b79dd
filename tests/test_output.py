"""The run-directory protocol: what refine refuses to touch, the lock, staging, manifests and their checks."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from refine.errors import RefineError
from refine.output import (
    MANIFEST,
    claim,
    claim_file,
    take_lock,
    verify,
    write_manifest,
    write_parquet,
    write_text,
)


def snapshot(root: Path) -> dict[str, str]:
    """Every file below `root` with its SHA-256: to show that nothing was touched."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def refine_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "refine", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})


def assert_one_error_line(result, *fragments):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def project(tmp_path, tiny_run):
    """A copy of a scored and refined tiny corpus: project/{corpus.jsonl, scores, out}."""
    root = tmp_path / "proj"
    shutil.copytree(tiny_run, root)
    return root


# ---------------------------------------------------------------- the four reported data losses


def test_sample_refuses_a_directory_refine_did_not_write(tmp_path, project):
    user = tmp_path / "userdir"
    user.mkdir()
    (user / "notes.txt").write_text("precious\n")
    before = snapshot(tmp_path)
    for extra in ([], ["--overwrite"]):
        result = refine_cli("sample", project / "scores", "--output", user, *extra)
        assert_one_error_line(result, "refine did not write", "notes.txt")
        assert snapshot(tmp_path) == before


def test_sample_refuses_an_output_that_contains_its_inputs(project):
    (project / "train.py").write_text("print('mine')\n")
    before = snapshot(project)
    result = refine_cli("sample", project / "scores", "--data", project / "corpus.jsonl", "--output", project,
                        "--overwrite")
    assert_one_error_line(result, "contains the input")
    assert snapshot(project) == before


def test_sample_refuses_the_current_directory(tmp_path, project):
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    (sandbox / "keep.txt").write_text("mine\n")
    before = snapshot(tmp_path)
    result = refine_cli("sample", project / "scores", "--data", project / "corpus.jsonl", "--output", ".", cwd=sandbox)
    assert_one_error_line(result, "current directory")
    assert snapshot(tmp_path) == before


def test_push_refuses_an_incomplete_dataset(tmp_path, project):
    next((project / "out" / "data").glob("*.parquet")).unlink()
    result = refine_cli("push", project / "out", tmp_path / "published")
    assert_one_error_line(result, "is missing")
    assert not (tmp_path / "published").exists()


def test_output_inside_an_input_is_refused(project):
    result = refine_cli("sample", project / "scores", "--output", project / "scores" / "refined")
    assert_one_error_line(result, "lies inside the input")


# ---------------------------------------------------------------- claiming, locking, staging


def test_claim_decides_fresh_resume_replace(tmp_path):
    out = tmp_path / "out"
    with claim(out, "score", run={"a": 1}) as first:
        assert first.action == "fresh" and (out / "run.json").exists()
    write_parquet(out / "data" / "scores-x-0-1.parquet", pa.table({"id": [0]}))
    with claim(out, "score", run={"a": 1}) as again:
        assert again.action == "resume"
    with pytest.raises(RefineError, match="other settings"):
        claim(out, "score", run={"a": 2})
    with claim(out, "score", run={"a": 2}, overwrite=True) as replaced:
        assert replaced.action == "replace" and not (out / "data").exists()
    with pytest.raises(RefineError, match="output of `refine score`"):
        claim(out, "sample", overwrite=True)


def test_claim_refuses_foreign_files_in_its_own_output(tmp_path):
    out = tmp_path / "out"
    claim(out, "score", run={}).release()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RefineError, match="notes.txt"):
        claim(out, "score", run={}, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"


def test_claim_refuses_a_file_and_a_second_writer(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RefineError, match="is a file"):
        claim(tmp_path / "file", "score")
    held = claim(tmp_path / "out", "score")
    try:
        with pytest.raises(RefineError, match="another refine run"):
            claim(tmp_path / "out", "score")
    finally:
        held.release()
    claim(tmp_path / "out", "score").release()  # free again once released
    assert not (tmp_path / ".out.lock").exists()


def test_lock_is_taken_over_after_a_killed_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from refine.output import take_lock; take_lock(Path(sys.argv[1]), 'x'); "
                               "print('locked', flush=True); time.sleep(60)", str(tmp_path / "out")],
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RefineError, match=f"pid {holder.pid}"):
        take_lock(tmp_path / "out", "out")
    holder.kill()
    holder.wait()
    fd, _ = take_lock(tmp_path / "out", "out")  # the kernel dropped the dead holder's lock
    os.close(fd)


def test_stale_staging_of_a_killed_run_is_removed(tmp_path):
    out = tmp_path / "out"
    stale = tmp_path / ".out.staging-999"
    stale.mkdir()
    (stale / "run.json").write_text(json.dumps({"stage": "sample"}))
    (stale / "half.parquet").write_text("x")
    users = tmp_path / ".out.staging-mine"
    users.mkdir()
    (users / "keep.txt").write_text("x")  # no refine marker: not refine's to delete
    with claim(out, "sample", staged=True) as claimed:
        staging = claimed.staging_dir()
        write_text(staging / "README.md", "card")
        write_manifest(staging, {"stage": "sample", "refine_version": "test"}, ["README.md"])
        claimed.commit(staging)
    assert not stale.exists() and (users / "keep.txt").exists()
    assert sorted(p.name for p in out.iterdir()) == ["README.md", MANIFEST]


def test_temp_files_of_a_killed_run_are_removed_on_resume(tmp_path):
    out = tmp_path / "out"
    claim(out, "score", run={}).release()
    (out / "data").mkdir()
    (out / "data" / ".scores-x.parquet.abc.tmp").write_text("half")
    claim(out, "score", run={}).release()
    assert not list((out / "data").iterdir())


def test_claim_file_replaces_only_its_own_page(tmp_path):
    page = tmp_path / "report.html"
    page.write_text("<html>my own page</html>")
    with pytest.raises(RefineError, match="not written by `refine report`"):
        claim_file(page, "report", "<meta refine>")
    page.write_text("<html><meta refine></html>")
    with claim_file(page, "report", "<meta refine>") as claimed:
        assert claimed.action == "replace"


# ---------------------------------------------------------------- manifests


@pytest.fixture
def sealed(tmp_path):
    out = tmp_path / "sealed"
    write_parquet(out / "data" / "train-a.parquet", pa.table({"x": [1, 2, 3]}))
    write_parquet(out / "data" / "train-b.parquet", pa.table({"x": [4]}))
    write_text(out / "README.md", "card")
    manifest = write_manifest(out, {"stage": "sample", "refine_version": "test"},
                              ["data/train-a.parquet", "data/train-b.parquet", "README.md"])
    assert [f["rows"] for f in manifest["files"][:2]] == [3, 1]
    return out


def test_verify_accepts_an_untouched_output(sealed):
    assert verify(sealed, "sample")["stage"] == "sample"


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "data" / "train-a.parquet").unlink(), "is missing"),
    (lambda d: shutil.copy(d / "data" / "train-b.parquet", d / "data" / "train-c.parquet"), "extra file"),
    (lambda d: (d / "data" / "train-a.parquet").write_bytes((d / "data" / "train-a.parquet").read_bytes()[:-9]),
     "truncated"),
    (lambda d: (d / "README.md").write_text("edit"), "changed after refine wrote it"),
    (lambda d: (d / MANIFEST).write_text((d / MANIFEST).read_text()[:-40]), "damaged"),
    (lambda d: (d / MANIFEST).write_text((d / MANIFEST).read_text().replace('"test"', '"1.0"')), "edited"),
    (lambda d: (d / MANIFEST).unlink(), "not a finished"),
])
def test_verify_names_each_kind_of_damage(sealed, damage, message):
    damage(sealed)
    with pytest.raises(RefineError, match=message):
        verify(sealed, "sample")


def test_every_reading_command_checks_its_input(tmp_path, project):
    """sample and report read scores; push reads a refined set: a damaged shard is one error for each."""
    shard = next((project / "scores" / "data").glob("*.parquet"))
    shard.write_bytes(shard.read_bytes()[:-5])
    assert_one_error_line(refine_cli("sample", project / "scores", "--output", tmp_path / "r"), "truncated")
    assert_one_error_line(refine_cli("report", project / "scores", "--output", tmp_path / "r.html"), "truncated")
    refined = next((project / "out" / "data").glob("*.parquet"))
    refined.write_bytes(refined.read_bytes()[:-5])
    assert_one_error_line(refine_cli("push", project / "out", tmp_path / "pub"), "truncated")
    assert not (tmp_path / "r").exists() and not (tmp_path / "r.html").exists() and not (tmp_path / "pub").exists()


# ---------------------------------------------------------------- faults of the machine


@pytest.fixture
def small_disk(tmp_path):
    """A 300 KB tmpfs (needs root; skipped otherwise)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a small filesystem needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_read_only_output_is_one_error_before_any_work(small_disk, project):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    result = refine_cli("sample", project / "scores", "--output", small_disk / "refined")
    assert_one_error_line(result, "read-only file system", "writable --output")


def test_a_full_disk_is_one_error_and_leaves_nothing_that_looks_complete(small_disk, project):
    result = refine_cli("push", project / "out", small_disk / "pub")
    assert result.returncode == 0, result.stderr  # the tiny refined set fits
    filler = small_disk / "filler"
    while True:  # fill the disk to the last block
        try:
            with open(filler, "ab") as f:
                f.write(b"\0" * 4096)
        except OSError:
            break
    result = refine_cli("push", project / "out", small_disk / "pub2")
    assert_one_error_line(result, "no space left", "rerun the same command")
    assert not (small_disk / "pub2" / MANIFEST).exists()
    filler.unlink()
    assert refine_cli("push", project / "out", small_disk / "pub2").returncode == 0
    assert snapshot(small_disk / "pub2") == snapshot(small_disk / "pub")
