"""Output directories that are either complete or visibly unfinished: atomic writes, manifest last."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from refine import __version__
from refine.errors import RefineError

MANIFEST = "manifest.json"
DATA_DIR = "data"


def atomic_write(path: Path, write) -> None:
    """Call `write(file)` on a temp file beside `path`, fsync it, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, value) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(value, indent=2, default=str) + "\n").encode()))


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def write_parquet(path: Path, table: pa.Table) -> None:
    atomic_write(path, lambda f: pq.write_table(table, f, compression="zstd"))


def read_manifest(directory: Path) -> dict | None:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def claim_output_dir(path: Path, overwrite: bool, finished_marker: str = MANIFEST) -> None:
    """Refuse an output that already holds a finished result, unless `overwrite` (then empty it)."""
    if path.exists() and not path.is_dir():
        raise RefineError(f"output {str(path)!r} is a file; give a directory path")
    if path.is_dir() and (path / finished_marker).exists():
        if not overwrite:
            raise RefineError(f"output {str(path)!r} already holds a finished result; pass --overwrite or choose another --output")
        shutil.rmtree(path)


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
