"""Open any corpus `datasets` can read, check its text column, and fingerprint its content."""

from __future__ import annotations

import glob
import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import datasets
import pyarrow as pa
import pyarrow.compute as pc

from refine.errors import RefineError

BUILDER_BY_EXTENSION = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
    ".arrow": "arrow",
}


def load_corpus(source: str, split: str = "train", name: Optional[str] = None) -> datasets.Dataset:
    """Open `source` as one `datasets.Dataset`.

    `source` is a `save_to_disk` directory, a directory of data files (or a dataset directory with a
    card), a data file, a glob of data files, or a hub dataset name.
    """
    try:
        return _load_corpus(source, split, name)
    except RefineError:
        raise
    except UnicodeDecodeError as e:
        raise RefineError(_undecodable(source, e)) from None
    except Exception as e:  # datasets wraps reader errors in several exception types
        cause = _find_cause(e, UnicodeDecodeError)
        if cause is not None:
            raise RefineError(_undecodable(source, cause)) from None
        if isinstance(e, (FileNotFoundError, datasets.exceptions.DatasetNotFoundError, ConnectionError)) or (
            "Couldn't find" in str(e) or "offline" in str(e).lower()
        ):
            raise RefineError(
                f"could not open corpus {source!r} ({_first_line(e)}); give an existing local path or a hub dataset name"
            ) from None
        raise RefineError(f"could not read corpus {source!r}: {_first_line(e)}") from None


def _load_corpus(source: str, split: str, name: Optional[str]) -> datasets.Dataset:
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            loaded = datasets.load_from_disk(str(path))
            return _pick_split(loaded, split, source)
        return _pick_split(datasets.load_dataset(str(path), name=name), split, source)
    files = sorted(glob.glob(str(path))) if glob.has_magic(source) else ([str(path)] if path.is_file() else [])
    if files:
        extensions = {_extension(f) for f in files}
        unknown = extensions - set(BUILDER_BY_EXTENSION)
        if unknown:
            raise RefineError(
                f"cannot read files ending in {', '.join(sorted(unknown))}; use one of {', '.join(BUILDER_BY_EXTENSION)}"
            )
        builders = {BUILDER_BY_EXTENSION[e] for e in extensions}
        if len(builders) > 1:
            raise RefineError(f"{source!r} mixes file types ({', '.join(sorted(extensions))}); give files of one type")
        return datasets.load_dataset(builders.pop(), data_files=files, split="train")
    if glob.has_magic(source) or _looks_like_path(source):
        raise RefineError(f"corpus path {source!r} does not exist (or matches no file); check the path")
    return _pick_split(datasets.load_dataset(source, name=name), split, source)


def _pick_split(loaded, split: str, source: str) -> datasets.Dataset:
    if isinstance(loaded, datasets.Dataset):
        return loaded
    if split not in loaded:
        raise RefineError(f"{source!r} has no split {split!r}; choose one of {', '.join(loaded)} with --split")
    return loaded[split]


def _extension(filename: str) -> str:
    name = filename.lower()
    for suffix in (".gz", ".bz2", ".xz", ".zst"):
        name = name.removesuffix(suffix)
    return os.path.splitext(name)[1]


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or os.sep in source.strip("/").split("/", 1)[-1] or _extension(source) in BUILDER_BY_EXTENSION


def _find_cause(error: BaseException, kind: type) -> Optional[BaseException]:
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kind):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _undecodable(source: str, error: UnicodeDecodeError) -> str:
    return (
        f"corpus {source!r} holds bytes that are not valid UTF-8 ({error.reason} at byte {error.start}); "
        "re-encode it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
    )


def check_columns(ds: datasets.Dataset, text_column: str, id_column: Optional[str], source: str) -> None:
    """Raise one error listing every problem with the text and id columns."""
    problems = []
    if text_column not in ds.column_names:
        problems.append(
            f"{source!r} has no column {text_column!r}; pass --text-column with one of: {', '.join(ds.column_names)}"
        )
    elif not _is_string(ds.features[text_column]):
        problems.append(
            f"column {text_column!r} of {source!r} holds {ds.features[text_column]}, not strings; "
            "pass --text-column naming a string column"
        )
    if id_column is not None and id_column not in ds.column_names:
        problems.append(
            f"{source!r} has no id column {id_column!r}; pass --id-column with one of: {', '.join(ds.column_names)}, "
            "or omit it to use the row index"
        )
    if problems:
        raise RefineError(*problems)
    if len(ds) == 0:
        raise RefineError(f"corpus {source!r} is empty; give a corpus with at least one document")
    try:  # some readers (pyarrow's JSON reader) accept invalid UTF-8 and fail only when a row is read
        ds.data.column(text_column).validate(full=True)
    except pa.ArrowInvalid:
        raise RefineError(
            f"column {text_column!r} of {source!r} holds bytes that are not valid UTF-8; "
            "re-encode the corpus as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        ) from None


def _is_string(feature) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


ID_FIX = "pass --id-column naming a column of unique strings or integers, or omit it to use the row index"


def document_ids(ds: datasets.Dataset, id_column: Optional[str]) -> list:
    """Each row's id: the id column's values (unique strings or integers) or the row index."""
    if id_column is None:
        return list(range(len(ds)))
    column = _arrow_column(ds, id_column)
    if _is_json(column.type):  # datasets keeps a JSON field whose values differ in type as JSON text
        ids = [None if text is None else json.loads(text) for chunk in column.chunks for text in chunk.storage.to_pylist()]
        problem = _mixed_id_problem(ids, id_column)
        column = pa.chunked_array([pa.array(ids)]) if problem is None else column
    else:
        problem = _id_type_problem(column, id_column)
    problem = problem or _id_duplicate_problem(column, id_column)
    if problem:
        raise RefineError(f"{problem}; {ID_FIX}")
    return column.to_pylist()


def _arrow_column(ds: datasets.Dataset, column: str) -> pa.ChunkedArray:
    # through the format, not ds.data, so that a selected or shuffled view reads its own rows
    return ds.with_format("arrow")[column]


def _is_json(kind: pa.DataType) -> bool:
    return isinstance(kind, pa.BaseExtensionType) and kind.extension_name == "arrow.json"


def _id_type_problem(column: pa.ChunkedArray, id_column: str) -> Optional[str]:
    """The first row whose id is not an int or a str: decided by the arrow type; values are scanned only for nulls."""
    kind = column.type
    if pa.types.is_integer(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind):
        if column.null_count == 0:
            return None
        row = pc.index(pc.is_null(column), True).as_py()
        return f"id column {id_column!r} is null at row {row}"
    if len(column) == 0:
        return None
    if pa.types.is_null(kind):
        return f"id column {id_column!r} is null at row 0"
    return f"id column {id_column!r} holds {kind} values, not strings or integers (row 0: {column[0].as_py()!r})"


def _mixed_id_problem(ids: list, id_column: str) -> Optional[str]:
    for row, value in enumerate(ids):
        if value is None or isinstance(value, bool) or not isinstance(value, (int, str)):
            return f"id column {id_column!r} holds {value!r} at row {row}, not a string or an integer"
        if type(value) is not type(ids[0]):
            return f"id column {id_column!r} mixes {type(ids[0]).__name__} and {type(value).__name__} ids (row {row}: {value!r})"
    return None


def _id_duplicate_problem(column: pa.ChunkedArray, id_column: str) -> Optional[str]:
    if len(pc.unique(column)) == len(column):  # one hash pass; the slower search below runs only on failure
        return None
    counts = pc.value_counts(column)
    repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))[0]
    first = pc.index(column, repeated).as_py()
    second = first + 1 + pc.index(column.slice(first + 1), repeated).as_py()
    return f"id column {id_column!r} holds {repeated.as_py()!r} twice, at rows {first} and {second}"


def is_blank(text: Optional[str]) -> bool:
    return text is None or not text.strip()


def count_blank(ds: datasets.Dataset, text_column: str) -> int:
    """Number of null, empty or whitespace-only documents."""
    column = ds.data.column(text_column)
    empty = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0)
    return int(pc.sum(pc.fill_null(empty, True)).as_py() or 0)


def corpus_fingerprint(ds: datasets.Dataset, text_column: str, id_column: Optional[str]) -> str:
    """SHA-256 of the ids and texts, in order: equal fingerprints mean the same corpus content."""
    digest = hashlib.sha256()
    columns = [text_column] + ([id_column] if id_column else [])
    for batch in ds.select_columns(columns).with_format("arrow").iter(batch_size=10_000):
        for column in columns:
            values = batch.column(column).to_pylist()
            digest.update("\x1e".join("" if v is None else str(v) for v in values).encode("utf-8", "surrogatepass"))
            digest.update(b"\x1d")
    digest.update(str(len(ds)).encode())
    return digest.hexdigest()


def arrow_type_for_ids(ids: list) -> pa.DataType:
    return pa.int64() if all(isinstance(i, int) for i in ids) else pa.string()
