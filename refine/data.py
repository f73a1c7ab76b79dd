"""Open any corpus `datasets` can read, check its text column, and fingerprint its content."""

from __future__ import annotations

import contextlib
import csv
import glob
import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import datasets
import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns, sanitize_patterns
from datasets.utils.metadata import MetadataConfigs
from huggingface_hub import DatasetCard, DatasetCardData

from refine.errors import RefineError
from refine.output import output_stage, verify

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
    card), a data file, a glob of data files, or a hub dataset name. A path that exists is read as
    exactly that path; `source` is a glob only when no such path exists.
    """
    path = Path(source).expanduser()
    stage = output_stage(path) if path.is_dir() else None
    if stage is not None:
        verify(path, stage)  # refine's own output: every file checked against its manifest first
    with _read_errors(source):
        if _is_saved_dataset(path):
            return _pick_split(datasets.load_from_disk(str(path)), split, source)
        files = _local_files(source, split, name)
        if files is None:
            return _pick_split(datasets.load_dataset(source, name=name), split, source)
    builder = _builder(files, source)
    # datasets globs every data_files entry, so an unescaped 'my[1].jsonl' would read 'my1.jsonl'
    literal = [glob.escape(f) for f in files]
    data_split = split if path.is_dir() else "train"
    with _read_errors(source, files, builder), _reader_failures_unlogged():
        return datasets.load_dataset(builder, data_files={data_split: literal}, split=data_split)


def resolved_source(source: str) -> str:
    """A local path made absolute and resolved (so a manifest still finds it from another directory); else as given."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def corpus_files(source: str, split: str = "train", name: Optional[str] = None) -> list[str] | None:
    """Absolute, resolved paths of the local files `load_corpus(source, split, name)` reads; None for a hub dataset."""
    path = Path(source).expanduser()
    with _read_errors(source):
        if _is_saved_dataset(path):
            loaded = _pick_split(datasets.load_from_disk(str(path)), split, source)
            return [str(Path(f["filename"]).resolve()) for f in loaded.cache_files]
        return _local_files(source, split, name)


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / marker).exists() for marker in ("dataset_info.json", "dataset_dict.json", "state.json"))


def _local_files(source: str, split: str, name: Optional[str]) -> list[str] | None:
    """The data files a local `source` names: an existing path literally, otherwise a glob; None if it names no local path."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = _directory_files(path, split, name, source)
    elif path.is_file():
        files = [str(path)]
    elif glob.has_magic(source):
        files = sorted(f for f in glob.glob(str(path)) if os.path.isfile(f))
    else:
        files = []
    if not files:
        if path.is_dir():
            raise RefineError(f"folder {source!r} holds no data files; put {', '.join(BUILDER_BY_EXTENSION)} files in it")
        if glob.has_magic(source) or _looks_like_path(source):
            raise RefineError(f"corpus path {source!r} does not exist (or matches no file); check the path")
        return None
    files = [str(Path(f).resolve()) for f in files]
    chained = [f for f in files if "::" in f]
    if chained:  # fsspec, under datasets, reads 'a::b' as a chain of two URLs
        raise RefineError(f"datasets cannot read {chained[0]!r} because its path holds '::'; rename it or the folder")
    return files


def _directory_files(directory: Path, split: str, name: Optional[str], source: str) -> list[str]:
    """The files of `split` that `datasets.load_dataset(directory)` would read, found with the directory's name escaped.

    datasets joins the card's (or its default) patterns to the unescaped directory path, so a folder named
    'run [1]' would match nothing; resolving them ourselves keeps the folder name literal.
    """
    base_path = glob.escape(directory.resolve().as_posix())
    configs = _card_configs(directory)
    if configs:
        config_name = name or configs.get_default_config_name() or (next(iter(configs)) if len(configs) == 1 else None)
        if config_name not in configs:
            raise RefineError(f"{source!r} has configs {', '.join(configs)}; choose one with --name")
        config = configs[config_name]
        if config.get("data_dir"):
            base_path = f"{base_path}/{glob.escape(config['data_dir'])}"
        patterns = sanitize_patterns(config["data_files"]) if "data_files" in config else get_data_patterns(base_path)
    else:
        if name is not None:
            raise RefineError(f"{source!r} has no configs in a README.md card; omit --name")
        try:
            patterns = get_data_patterns(base_path)
        except EmptyDatasetError:
            return []
    files_by_split = DataFilesDict.from_patterns(patterns, base_path=base_path)
    if split not in files_by_split:
        raise RefineError(f"{source!r} has no split {split!r}; choose one of {', '.join(map(str, files_by_split))} with --split")
    return _majority_type([f for f in files_by_split[split] if _extension(f) in BUILDER_BY_EXTENSION])


def _card_configs(directory: Path) -> MetadataConfigs:
    card = directory / "README.md"
    return MetadataConfigs.from_dataset_card_data(DatasetCard.load(card).data if card.is_file() else DatasetCardData())


def _majority_type(files: list[str]) -> list[str]:
    """The files of the most common type, which is what datasets reads from a folder that holds several."""
    by_builder = {}
    for f in files:
        by_builder.setdefault(BUILDER_BY_EXTENSION[_extension(f)], []).append(f)
    return max(by_builder.values(), key=len, default=[])


def _builder(files: list[str], source: str) -> str:
    extensions = {_extension(f) for f in files}
    unknown = extensions - set(BUILDER_BY_EXTENSION)
    if unknown:
        raise RefineError(
            f"cannot read files ending in {', '.join(sorted(unknown))}; use one of {', '.join(BUILDER_BY_EXTENSION)}"
        )
    builders = {BUILDER_BY_EXTENSION[e] for e in extensions}
    if len(builders) > 1:
        raise RefineError(f"{source!r} mixes file types ({', '.join(sorted(extensions))}); give files of one type")
    return builders.pop()


def _pick_split(loaded, split: str, source: str) -> datasets.Dataset:
    if isinstance(loaded, datasets.Dataset):
        return loaded
    if split not in loaded:
        raise RefineError(f"{source!r} has no split {split!r}; choose one of {', '.join(loaded)} with --split")
    return loaded[split]


COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")


def _extension(filename: str) -> str:
    name = filename.lower()
    for suffix in COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    return os.path.splitext(name)[1]


def _is_compressed(filename: str) -> bool:
    return filename.lower().endswith(COMPRESSION_SUFFIXES)


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or os.sep in source.strip("/").split("/", 1)[-1] or _extension(source) in BUILDER_BY_EXTENSION


@contextlib.contextmanager
def _read_errors(source: str, files: Sequence[str] = (), builder: Optional[str] = None):
    """Turn what datasets and its readers raise into one RefineError that names the bad file and the fix."""
    try:
        yield
    except RefineError:
        raise
    except Exception as e:  # datasets wraps reader errors in several exception types
        raise RefineError(_read_problem(source, e, files, builder)) from None


@contextlib.contextmanager
def _reader_failures_unlogged():
    """datasets logs a reader's failure before raising it; the RefineError raised instead says it in one line."""
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)


def _read_problem(source: str, error: Exception, files: Sequence[str], builder: Optional[str]) -> str:
    undecodable = _find_cause(error, UnicodeDecodeError)
    if undecodable is not None:
        return _undecodable(source, undecodable)
    # readers rarely say which file failed, and not always the line: look, now that reading has failed
    for file in files:
        problem = _malformed_file_problem(file, builder)
        if problem:
            return problem
    if isinstance(error, (FileNotFoundError, datasets.exceptions.DatasetNotFoundError, ConnectionError)) or (
        "Couldn't find" in str(error) or "offline" in str(error).lower()
    ):
        return f"could not open corpus {source!r} ({_first_line(error)}); give an existing local path or a hub dataset name"
    return (f"could not read corpus {source!r} ({_first_line(error)}); "
            "check that its files are whole and in the format their names say")


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


def _malformed_file_problem(file: str, builder: Optional[str]) -> Optional[str]:
    """What is wrong with one data file, with its line where there is one; None if these checks find nothing.

    Each check reads the whole file, so it runs only after datasets has failed to read the corpus.
    """
    try:
        if builder == "json":
            return _json_problem(file)
        if builder == "csv":
            return _csv_problem(file)
        if builder == "parquet":
            pq.read_metadata(file)
        elif builder == "arrow":
            _read_arrow(file)
        else:
            with _open_data_file(file) as f:
                while f.read(1 << 24):
                    pass
    except UnicodeDecodeError as e:
        return _undecodable(file, e)
    except Exception as e:
        if _is_compressed(file):  # the format checks report their own problems, so this failed in decompression
            return f"corpus file {file!r} is truncated or corrupt ({_first_line(e)}); download or compress it again"
        return f"corpus file {file!r} is not a valid {builder} file ({_first_line(e)}); write it again as {builder}"
    return None


def _open_data_file(file: str, mode: str = "rb", **text_options):
    return fsspec.open(file, mode, compression="infer", **text_options)


def _json_problem(file: str) -> Optional[str]:
    bad_line = None
    with _open_data_file(file) as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                bad_line = (line_number, f"is not valid JSON ({_json_reason(e)})", "fix or remove that line")
                break
            if not isinstance(value, dict):
                bad_line = (line_number, "is not a JSON object", 'make each line one object such as {"text": "..."}')
                break
    if bad_line is None:
        return None
    if _extension(file) == ".json":  # may be one JSON document over many lines rather than JSON Lines
        with _open_data_file(file) as f:
            try:
                json.loads(f.read())
                return None
            except json.JSONDecodeError as e:
                # a document fails line by line from its first line; JSON Lines fails as a document at line 2
                if bad_line[0] == 1 or e.lineno > bad_line[0]:
                    bad_line = (e.lineno, f"is not valid JSON ({_json_reason(e)})", "fix that line")
    line_number, what, fix = bad_line
    return f"corpus file {file!r} line {line_number} {what}; {fix}"


def _json_reason(error: json.JSONDecodeError) -> str:
    return f"{error.msg.removesuffix(' at')} at column {error.colno}"


def _csv_problem(file: str) -> Optional[str]:
    with _open_data_file(file, "rt", encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, [])
            for row in reader:
                if len(row) > len(header):  # pandas fills short rows with nulls but refuses long ones
                    return (f"corpus file {file!r} line {reader.line_num} has {len(row)} fields but its header has "
                            f"{len(header)}; fix that row (quote a field that holds a comma)")
        except csv.Error as e:
            return f"corpus file {file!r} line {reader.line_num} is not valid CSV ({e}); fix that line"
    return None


def _read_arrow(file: str) -> None:
    """Read an Arrow IPC file the two ways datasets tries: as a stream, then as a random-access file."""
    try:
        with open(file, "rb") as f:
            pa.ipc.open_stream(f).read_all()
    except pa.ArrowInvalid:
        with open(file, "rb") as f:
            pa.ipc.open_file(f).read_all()


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
        # read batch by batch, not through the memory map, whose touched pages would stay resident
        for batch in iter_arrow_batches(ds, batch_rows=10_000):
            batch.column(text_column).validate(full=True)
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
    column = _arrow_column(ds, text_column)
    empty = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0)
    return int(pc.sum(pc.fill_null(empty, True)).as_py() or 0)


FINGERPRINT_KINDS = ("files", "info", "content")


def corpus_fingerprint(ds: datasets.Dataset, text_column: str, id_column: Optional[str],
                       files: Optional[list[str]] = None, full: bool = False) -> str:
    """`<kind>:<sha256>`: equal fingerprints of one kind mean the same corpus.

    `content` (full=True) hashes every id and text in order: exact, but it reads the whole corpus.
    `files` hashes the local files read (name, byte size, modification time) with the row count and
    column names: it reads no rows, so it costs the same at 1 MB and at 1 TB. `info` (no local files:
    a hub dataset) hashes the commit datasets read it at (else its cache files) and its info, with the row
    count and column names.
    """
    if full:
        return "content:" + _content_digest(ds, text_column, id_column)
    facts = {"rows": len(ds), "columns": list(ds.column_names)}
    if files is not None:
        facts["files"] = [_file_facts(f) for f in files]
        kind = "files"
    else:
        revision = hub_revision(ds)
        # the commit names the data; without one, the cache files stand in (rebuilding the cache changes them)
        facts["revision" if revision else "cache_files"] = revision or [_file_facts(f["filename"]) for f in ds.cache_files]
        facts["info"] = {"builder": ds.info.builder_name, "config": ds.info.config_name,
                         "version": str(ds.info.version), "splits": str(ds.info.splits)}
        kind = "info"
    return f"{kind}:" + hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint_kind(fingerprint: str) -> str:
    """The kind of a fingerprint; one without a prefix (refine before 0.x recorded only content) is `content`."""
    kind, sep, _ = fingerprint.partition(":")
    return kind if sep and kind in FINGERPRINT_KINDS else "content"


def _content_digest(ds: datasets.Dataset, text_column: str, id_column: Optional[str]) -> str:
    digest = hashlib.sha256()
    columns = [text_column] + ([id_column] if id_column else [])
    for batch in ds.select_columns(columns).with_format("arrow").iter(batch_size=10_000):
        for column in columns:
            values = batch.column(column).to_pylist()
            digest.update("\x1e".join("" if v is None else str(v) for v in values).encode("utf-8", "surrogatepass"))
            digest.update(b"\x1d")
    digest.update(str(len(ds)).encode())
    return digest.hexdigest()


def _file_facts(path: str) -> dict:
    stat = os.stat(path)
    # the name, not the folder: a corpus moved with `mv` (or `cp -p`) is still the corpus that was scored
    return {"name": Path(path).name, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def hub_revision(ds: datasets.Dataset) -> Optional[str]:
    """The commit a hub dataset was read at: datasets names its cache folder after it (…/<version>/<commit>/)."""
    for f in ds.cache_files:
        name = Path(f["filename"]).parent.name
        if len(name) == 40 and all(c in "0123456789abcdef" for c in name):
            return name
    return None


def iter_arrow_batches(ds: datasets.Dataset, batch_rows: int = 1000):
    """The rows of `ds` in order, as Arrow record batches, holding at most about one batch in memory.

    A plain dataset is read from its Arrow files with ordinary reads rather than through datasets' memory map:
    mapped pages stay in the process's resident memory once touched, so a pass over a corpus larger than memory
    would look (and, under a memory limit, count) as if it held the whole corpus.
    """
    files = [f["filename"] for f in ds.cache_files]
    if ds._indices is None and files and all(_stream_columns(f) == ds.data.column_names for f in files):
        for path in files:
            with pa.OSFile(path) as source:
                for batch in pa.ipc.open_stream(source):
                    for start in range(0, batch.num_rows, batch_rows):
                        yield batch.slice(start, batch_rows)
        return
    for table in ds.with_format("arrow").iter(batch_size=batch_rows):  # a view or an in-memory dataset
        yield from table.to_batches()


def _stream_columns(path: str) -> Optional[list[str]]:
    """Column names of one of datasets' Arrow stream files (only its header is read); None if it is not one."""
    try:
        with pa.OSFile(path) as source:
            return pa.ipc.open_stream(source).schema.names
    except (pa.ArrowInvalid, OSError):
        return None


def arrow_type_for_ids(ids: list) -> pa.DataType:
    return pa.int64() if all(isinstance(i, int) for i in ids) else pa.string()
