"""Run directories: refine writes only where it can prove it owns the place, atomically, manifest last.

Every command that writes (score, sample, pretrain, distill-cache, report, push to a path) goes through
this module:

1. `claim()` decides what to do with the output before any model loads. It refuses an output that is a
   file, that holds files refine did not write (even with --overwrite), that equals, contains or lies
   inside one of the command's inputs, or that contains the current directory. It takes an advisory lock
   (`.<name>.lock` beside the output), so a second run on the same output stops with a clear message, and
   it removes what killed runs left behind (temp files, staging directories).
2. Files are written atomically (temp file, fsync, rename); a directory built as a whole is staged beside
   the target and renamed into place.
3. `write_manifest()` comes last: it records every data file with its byte size, SHA-256 and row count,
   and a checksum of the manifest itself. `verify()` checks all of that before a command reads the files.

A directory is refine's when it holds `run.json` (written first, naming the stage) or a manifest written
by refine; on replace or resume every file in it must match what that stage writes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from refine import __version__
from refine.errors import RefineError

MANIFEST = "manifest.json"
RUN_FILE = "run.json"
DATA_DIR = "data"
STAGING = ".staging-"

# What each stage writes into its output directory (paths relative to it; `*` also matches `/`).
# Anything else found there is the user's, and refine will neither delete nor overwrite the directory.
STAGE_FILES = {
    "score": ("data/scores-*.parquet", "README.md", "exact_input.parquet", "exact/*", ".exact.lock"),
    "sample": ("data/train-*.parquet", "README.md"),
    "pretrain": ("metrics.jsonl", "checkpoint/*", "checkpoint.old/*", "checkpoint.tmp/*", "final.tmp/*"),
    "distill-cache": ("shard-*/ids.npy", "shard-*/logprobs.npy", "shard-*.tmp/*"),
}
# Outputs that `datasets.load_dataset(folder)` must be able to open.
DATASET_STAGES = ("score", "sample")
# The files a finished output's manifest must list completely: an extra one is refused when read.
DATA_FILES = {"score": "data/*.parquet", "sample": "data/*.parquet", "distill-cache": "shard-*/*.npy"}


# ---------------------------------------------------------------- atomic writes


def atomic_write(path: Path, write) -> None:
    """Call `write(file)` on a temp file beside `path`, fsync it, then rename it over `path`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise write_fault(e, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_fault(e, path) from None
        raise


def write_json(path: Path, value) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(value, indent=2, default=str) + "\n").encode()))


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def write_parquet(path: Path, table: pa.Table) -> None:
    atomic_write(path, lambda f: pq.write_table(table, f, compression="zstd"))


# Errors of writing that are the machine's, not refine's: a full disk or quota, a read-only or forbidden place.
WRITE_FAULTS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def write_fault(error: OSError, path: Path | str) -> RefineError:
    """A fault of the machine while writing `path`, as one line with the fix."""
    if error.errno == errno.ENOSPC or error.errno == errno.EDQUOT:
        return RefineError(f"no space left on the device while writing {str(path)!r}; free some space or choose "
                           "another --output, then rerun the same command to continue")
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return RefineError(f"cannot write {str(path)!r} ({os.strerror(error.errno).lower()}); choose a writable --output")
    return RefineError(f"cannot write {str(path)!r} ({error.strerror or error}); check the path and the disk, "
                       "then rerun the same command")


# ---------------------------------------------------------------- claiming an output


@dataclass
class Claim:
    """A locked output: `action` is "fresh", "resume" (same unfinished run) or "replace" (--overwrite)."""

    path: Path
    stage: str
    action: str
    _lock_fd: Optional[int] = field(default=None, repr=False)
    _lock_path: Optional[Path] = field(default=None, repr=False)

    def release(self) -> None:
        if self._lock_fd is not None:
            release_lock(self._lock_fd, self._lock_path)
            self._lock_fd = None

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def staging_dir(self) -> Path:
        """A fresh directory beside the output, marked as refine's, to build the whole result in."""
        staging = self.path.parent / f".{self.path.name}{STAGING}{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            staging.mkdir(parents=True)
        except OSError as e:
            raise write_fault(e, staging) from None
        write_json(staging / RUN_FILE, {"stage": self.stage, "refine_version": __version__})
        return staging

    def commit(self, staging: Path) -> None:
        """Rename the finished staging directory into place (replacing refine's previous result, if any)."""
        if (staging / MANIFEST).exists():  # the manifest now proves whose directory it is
            (staging / RUN_FILE).unlink(missing_ok=True)
        swap_in(staging, self.path, self.path.parent / f".{self.path.name}{STAGING}old-{os.getpid()}")


def swap_in(staging: Path, final: Path, old: Path) -> None:
    """Put the finished `staging` directory at `final`; a previous `final` is kept at `old` until the new one is in,
    and put back if the new one cannot be moved in."""
    if final.exists():
        final.rename(old)
    try:
        staging.rename(final)
    except OSError:
        if old.exists() and not final.exists():
            old.rename(final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def claim(output: str | Path, stage: str, inputs: Iterable[Optional[str]] = (), overwrite: bool = False,
          run: Optional[dict] = None, staged: bool = False) -> Claim:
    """Check and lock `output` for `stage`; see the module docstring for what is refused.

    `run` is what defines the result (settings, data and model identities): an unfinished output written
    with the same `run` is resumed, one with another is refused unless `overwrite`. `run=None` leaves the
    comparison to the stage (pretrain compares its checkpoint). `staged` outputs are built beside the
    target (`Claim.staging_dir`) and renamed into place; the others are written in place, starting with
    run.json.
    """
    path = Path(output).expanduser().absolute()
    problems = overlap_problems(path, inputs)
    if stage in DATASET_STAGES:
        problems.append(folder_pattern_problem(path))
    if any(problems):
        raise RefineError(*problems)
    if path.exists() and not path.is_dir():
        raise RefineError(f"output {str(output)!r} is a file; give a directory path")
    fd, lock_path = take_lock(path, str(output))
    try:
        remove_stale_staging(path)
        action = decide(path, str(output), stage, run, overwrite)
        if action == "replace" and not staged:
            shutil.rmtree(path)
        if action == "resume":
            remove_temp_files(path)
        elif not staged:
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise write_fault(e, path) from None
            write_json(path / RUN_FILE, {"stage": stage, "refine_version": __version__, "run": run})
    except BaseException:
        release_lock(fd, lock_path)
        raise
    return Claim(path, stage, action, fd, lock_path)


def claim_file(output: str | Path, stage: str, marker: str, inputs: Iterable[Optional[str]] = ()) -> Claim:
    """Lock a single output file; an existing file is replaced only if it contains refine's `marker`."""
    path = Path(output).expanduser().absolute()
    problems = overlap_problems(path, inputs)
    if problems:
        raise RefineError(*problems)
    if path.is_dir():
        raise RefineError(f"output {str(output)!r} is a directory; give a file path")
    fd, lock_path = take_lock(path, str(output))
    if path.exists():
        try:
            with open(path, "rb") as f:
                head = f.read(4096)
        except OSError as e:
            release_lock(fd, lock_path)
            raise write_fault(e, path) from None
        if marker.encode() not in head:
            release_lock(fd, lock_path)
            raise RefineError(f"output {str(output)!r} exists and was not written by `refine {stage}`; "
                              "choose another --output (refine never replaces files it did not write)")
    return Claim(path, stage, "replace" if path.exists() else "fresh", fd, lock_path)


def folder_pattern_problem(folder: str | Path) -> Optional[str]:
    """Why `datasets.load_dataset(folder)` would misread a dataset folder written there, or None.

    datasets joins the card's data_files patterns to the folder's full path without escaping it, then
    globs: '[1]' then matches only '1' (nothing is found), 'out*' also reads a sibling 'outX', and '::'
    splits the path into two URLs. refine's own readers escape the path; plain datasets users cannot.
    """
    full_path = Path(folder).expanduser().resolve().as_posix()
    if glob.has_magic(full_path) or "::" in full_path:
        return (f"datasets.load_dataset would read the path {full_path!r} as a pattern (it holds * ? [ or ::); "
                "choose an output folder whose full path has none of them")
    return None


def overlap_problems(output: Path, inputs: Iterable[Optional[str]]) -> list[str]:
    """An output must not be, contain or lie inside an input, nor contain the current directory."""
    out = output.resolve()
    problems = []
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        problems.append(f"output {str(output)!r} is or contains the current directory; give a new directory for --output")
    for source in inputs:
        for item in local_paths(source):
            if out == item:
                problems.append(f"output {str(output)!r} is the input {str(item)!r}; choose another --output")
            elif out in item.parents:
                problems.append(f"output {str(output)!r} contains the input {str(item)!r}; choose another --output")
            elif item in out.parents:
                problems.append(f"output {str(output)!r} lies inside the input {str(item)!r}; choose another --output")
    return problems


def local_paths(source: Optional[str]) -> list[Path]:
    """The local files or folders `source` names (resolved; a glob's matches); none for a URL or a hub name."""
    if not source or "://" in str(source):
        return []
    path = Path(source).expanduser()
    if path.exists():
        return [path.resolve()]
    if glob.has_magic(str(source)):
        return [Path(p).resolve() for p in glob.glob(str(path))]
    return []


def take_lock(path: Path, shown: str) -> tuple[int, Path]:
    """An exclusive advisory lock on `.<name>.lock` beside `path`; refuses at once if another run holds it."""
    lock_path = path.parent / f".{path.name}.lock"
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise write_fault(e, path) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RefineError(f"output {shown!r} is being written by another refine run (pid {holder}); "
                              "wait for it to finish or choose another --output") from None
        # The holder unlinks the file on release; if it did so while we waited, lock the new file instead.
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            with contextlib.suppress(OSError):  # the pid only helps the message of a second run; a full disk may refuse it
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
            return fd, lock_path
        os.close(fd)


def release_lock(fd: int, lock_path: Path) -> None:
    with contextlib.suppress(OSError):
        lock_path.unlink()
    os.close(fd)


def decide(path: Path, shown: str, stage: str, run: Optional[dict], overwrite: bool) -> str:
    """fresh / resume / replace for an output, or a RefineError naming why it cannot be used. Reads only."""
    if not path.exists() or not any(path.iterdir()):
        return "fresh"
    owner = output_stage(path)
    if owner is None:
        raise RefineError(f"output {shown!r} holds files refine did not write ({_some(list_files(path))}); "
                          "choose a new or empty --output (refine never deletes files it did not write)")
    if owner != stage:
        raise RefineError(f"output {shown!r} holds the output of `refine {owner}`, not of `refine {stage}`; "
                          "choose another --output")
    foreign = foreign_files(path, stage)
    if foreign:
        raise RefineError(f"output {shown!r} holds files refine did not write ({_some(foreign)}); move them "
                          "elsewhere or choose another --output (refine never deletes files it did not write)")
    if (path / MANIFEST).exists():
        if overwrite:
            return "replace"
        raise RefineError(f"output {shown!r} already holds a finished result; pass --overwrite or choose another --output")
    if run is None or _read_json(path / RUN_FILE, {}).get("run") == json.loads(json.dumps(run, default=str)):
        return "replace" if overwrite else "resume"
    if overwrite:
        return "replace"
    raise RefineError(f"output {shown!r} holds an unfinished run with other settings, data or models; rerun the "
                      "same command to resume it, pass --overwrite to discard it, or choose another --output")


def output_stage(path: Path) -> Optional[str]:
    """The stage that wrote `path` (its run.json or refine manifest), or None if refine did not write it."""
    for name in (RUN_FILE, MANIFEST):
        value = _read_json(path / name, None)
        if isinstance(value, dict) and isinstance(value.get("stage"), str) and (
            name == RUN_FILE or "refine_version" in value
        ):
            return value["stage"]
    return None


def list_files(path: Path) -> list[str]:
    """Every file below `path`, as sorted relative POSIX paths."""
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if not p.is_dir())


def foreign_files(path: Path, stage: str) -> list[str]:
    """Files in refine's output `path` that `stage` does not write (checked before replacing or resuming)."""
    listed = set()
    for name in (MANIFEST, RUN_FILE):
        value = _read_json(path / name, {})
        listed.update(f["path"] for f in value.get("files", []) if isinstance(f, dict) and "path" in f)
    patterns = (MANIFEST, RUN_FILE, *STAGE_FILES.get(stage, ()))
    return [
        f for f in list_files(path)
        if f not in listed and not _is_temp(f) and not any(fnmatch.fnmatchcase(f, p) for p in patterns)
    ]


def _is_temp(relative: str) -> bool:
    """refine's own temp files: `.<name>.<random>.tmp`, as atomic_write names them."""
    name = relative.rsplit("/", 1)[-1]
    return name.startswith(".") and name.endswith(".tmp")


def remove_temp_files(path: Path) -> None:
    """Temp files a killed run was writing (never a finished file: those have their final names)."""
    for relative in list_files(path):
        if _is_temp(relative):
            (path / relative).unlink(missing_ok=True)


def remove_stale_staging(path: Path) -> None:
    """Staging directories beside `path` that killed runs left (only ones marked as refine's)."""
    for staging in path.parent.glob(f".{glob.escape(path.name)}{STAGING}*"):
        if staging.is_dir() and output_stage(staging) is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _read_json(path: Path, default):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def _some(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


# ---------------------------------------------------------------- manifests: written last, verified first


def file_record(directory: Path, relative: str) -> dict:
    """Path, byte size, SHA-256 and (for Parquet) row count of one output file."""
    path = directory / relative
    record = {"path": relative, "bytes": path.stat().st_size, "sha256": file_sha256(path)}
    if relative.endswith(".parquet"):
        record["rows"] = pq.read_metadata(path).num_rows
    return record


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_checksum(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def write_manifest(directory: Path, manifest: dict, files: Iterable[str]) -> dict:
    """Record `files` (relative to `directory`) and a checksum in the manifest and write it, last."""
    sealed = {**manifest, "files": [file_record(directory, f) for f in files]}
    sealed = json.loads(json.dumps(sealed, default=str))  # the checksum covers exactly what is stored
    sealed["checksum"] = manifest_checksum(sealed)
    write_json(directory / MANIFEST, sealed)
    return sealed


def parquet_files(directory: Path, manifest: dict) -> list[Path]:
    """The Parquet data files a (verified) manifest lists, in its order."""
    return [Path(directory) / f["path"] for f in manifest["files"] if f["path"].endswith(".parquet")]


def verify(directory: str | Path, stage: str, check_hashes: bool = True) -> dict:
    """The manifest of a finished `stage` output, after checking it and every file it lists; else one error."""
    path = Path(directory).expanduser()
    shown = str(directory)
    rerun = f"rerun the `refine {stage}` command that wrote it"
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        unfinished = " (an unfinished run: rerun the same command to finish it)" if (path / RUN_FILE).exists() else ""
        raise RefineError(f"{shown!r} is not a finished `refine {stage}` output (no {MANIFEST}){unfinished}; "
                          "check the path")
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError:
        raise RefineError(f"{MANIFEST} of {shown!r} is damaged (not valid JSON); {rerun}") from None
    if not isinstance(manifest, dict) or manifest.get("stage") != stage:
        found = manifest.get("stage") if isinstance(manifest, dict) else None
        raise RefineError(f"{shown!r} holds {'the output of `refine ' + str(found) + '`' if found else 'no refine manifest'}, "
                          f"not of `refine {stage}`; check the path")
    if "checksum" not in manifest or "files" not in manifest:
        raise RefineError(f"{MANIFEST} of {shown!r} has no file checksums (written by refine "
                          f"{manifest.get('refine_version', '?')}); {rerun} with this version")
    if manifest_checksum(manifest) != manifest["checksum"]:
        raise RefineError(f"{MANIFEST} of {shown!r} was edited or damaged (its checksum does not match); {rerun}")
    problems = []
    for record in manifest["files"]:
        file = path / record["path"]
        if not file.is_file():
            problems.append(f"{record['path']} of {shown!r} is missing")
        elif file.stat().st_size != record["bytes"]:
            problems.append(f"{record['path']} of {shown!r} has {file.stat().st_size} bytes, the manifest says "
                            f"{record['bytes']} (truncated or changed)")
        elif check_hashes and file_sha256(file) != record["sha256"]:
            problems.append(f"{record['path']} of {shown!r} was changed after refine wrote it (SHA-256 differs)")
        elif "rows" in record and pq.read_metadata(file).num_rows != record["rows"]:
            problems.append(f"{record['path']} of {shown!r} has {pq.read_metadata(file).num_rows} rows, the manifest "
                            f"says {record['rows']}")
    listed = {record["path"] for record in manifest["files"]}
    pattern = DATA_FILES.get(stage)
    if pattern:
        extra = [f for f in list_files(path) if fnmatch.fnmatchcase(f, pattern) and f not in listed]
        problems += [f"{f} in {shown!r} is not in its manifest (an extra file)" for f in extra]
    if problems:
        raise RefineError(*problems[:5], f"{rerun}, or restore the files it wrote")
    return manifest


# ---------------------------------------------------------------- provenance


SECRET_FLAGS = ("--token",)


def command_line() -> str:
    """The command as typed, with secrets (the value after --token) replaced by ***."""
    words, hide = [], False
    for word in sys.argv:
        if hide:
            words.append("***")
        elif any(word.startswith(flag + "=") for flag in SECRET_FLAGS):
            words.append(word.split("=", 1)[0] + "=***")
        else:
            words.append(word)
        hide = word in SECRET_FLAGS
    return " ".join(["refine" if w.endswith(("/refine", "refine/__main__.py")) else w for w in words])


def run_info() -> dict:
    return {
        "refine_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
    }


def content_tag(value) -> str:
    """Short hash put into data file names and the card's data pattern.

    `datasets` caches a local folder with a card by folder name and file pattern, not by content: two
    runs into folders of the same name would read each other's cache. A content tag in the pattern
    keeps them apart.
    """
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]
