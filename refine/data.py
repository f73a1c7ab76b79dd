"""Open any corpus `datasets` can read, or stream one from a remote URL; check its text column; fingerprint it."""

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
    if is_remote(source):  # only the stages that stream (score, sample, report) read URLs: see `open_corpus`
        raise RefineError(f"this command cannot read the remote corpus {source!r}; copy it to local disk, or give a hub dataset name")
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
    if is_remote(source):
        raise RefineError(f"this command cannot read the remote corpus {source!r}; copy it to local disk, or give a hub dataset name")
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


def check_columns(ds, text_column: str, id_column: Optional[str], source: str) -> None:
    """Raise one error listing every problem with the text and id columns.

    A `StreamedCorpus` not yet scanned is scanned here, once its columns pass: its rows, blanks, ids and UTF-8
    validity are known only by reading it.
    """
    if isinstance(ds, StreamedCorpus):
        return _check_streamed_columns(ds, text_column, id_column, source)
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


def _check_streamed_columns(ds: StreamedCorpus, text_column: str, id_column: Optional[str], source: str) -> None:
    schema, problems = ds.schema, []
    if text_column not in schema.names:
        problems.append(f"{source!r} has no column {text_column!r}; pass --text-column with one of: {', '.join(schema.names)}")
    elif not (pa.types.is_string(schema.field(text_column).type) or pa.types.is_large_string(schema.field(text_column).type)):
        problems.append(f"column {text_column!r} of {source!r} holds {schema.field(text_column).type}, not strings; "
                        "pass --text-column naming a string column")
    if id_column is not None and id_column not in schema.names:
        problems.append(f"{source!r} has no id column {id_column!r}; pass --id-column with one of: "
                        f"{', '.join(schema.names)}, or omit it to use the row index")
    if problems:
        raise RefineError(*problems)
    if ds.rows_per_file is None or ds.n_blank is None:
        ds.scan(text_column, id_column)
    if len(ds) == 0:
        raise RefineError(f"corpus {source!r} is empty; give a corpus with at least one document")


def _is_string(feature) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


ID_FIX = "pass --id-column naming a column of unique strings or integers, or omit it to use the row index"


def document_ids(ds, id_column: Optional[str]) -> Optional[list]:
    """Each row's id: the id column's values (unique strings or integers) or the row index.

    None for a `StreamedCorpus` opened from a scan record (a task): it has not read its ids, and reads each
    shard's with its rows; the driver's scan checked them.
    """
    if id_column is None:
        return list(range(len(ds)))
    if isinstance(ds, StreamedCorpus) and ds.ids is None:
        return None
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


def id_type(ds, ids: Optional[list], id_column: Optional[str]) -> pa.DataType:
    """The Arrow type of the ids; a streamed corpus's comes from its schema, so a task that has not read them agrees."""
    if isinstance(ds, StreamedCorpus) and id_column is not None:
        return pa.int64() if pa.types.is_integer(ds.schema.field(id_column).type) else pa.string()
    return arrow_type_for_ids(ids)


def _arrow_column(ds: datasets.Dataset, column: str) -> pa.ChunkedArray:
    if isinstance(ds, StreamedCorpus):
        return ds.ids
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


def count_blank(ds, text_column: str) -> int:
    """Number of null, empty or whitespace-only documents (a streamed corpus counted them in its scan)."""
    if isinstance(ds, StreamedCorpus):
        return ds.n_blank
    column = _arrow_column(ds, text_column)
    empty = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0)
    return int(pc.sum(pc.fill_null(empty, True)).as_py() or 0)


FINGERPRINT_KINDS = ("files", "info", "content", "remote")


def corpus_fingerprint(ds, text_column: str, id_column: Optional[str],
                       files: Optional[list[str]] = None, full: bool = False) -> str:
    """`<kind>:<sha256>`: equal fingerprints of one kind mean the same corpus.

    `content` (full=True) hashes every id and text in order: exact, but it reads the whole corpus.
    `files` hashes the local files read (name, byte size, modification time) with the row count and
    column names: it reads no rows, so it costs the same at 1 MB and at 1 TB. `info` (no local files:
    a hub dataset) hashes the commit datasets read it at (else its cache files) and its info, with the row
    count and column names. `remote` (a `StreamedCorpus`) hashes each file's path, byte size and version tag
    (ETag, or the Hub's LFS sha256 / git blob id) with the column names: one listing, no rows read.
    """
    if full:
        return "content:" + _content_digest(ds, text_column, id_column)
    if isinstance(ds, StreamedCorpus):
        facts = {"files": ds.file_facts, "columns": ds.column_names}
        return "remote:" + hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()
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
    if isinstance(ds, StreamedCorpus):
        batches = _rebatched(ds.iter_batches(10_000, columns), 10_000)
    else:
        batches = ds.select_columns(columns).with_format("arrow").iter(batch_size=10_000)
    n_rows = 0  # counted here: a streamed jsonl/csv corpus not yet scanned has no len()
    for batch in batches:
        n_rows += batch.num_rows
        for column in columns:
            values = batch.column(column).to_pylist()
            digest.update("\x1e".join("" if v is None else str(v) for v in values).encode("utf-8", "surrogatepass"))
            digest.update(b"\x1d")
    digest.update(str(n_rows).encode())
    return digest.hexdigest()


def _rebatched(tables, n_rows: int):
    """The rows of `tables` regrouped into tables of exactly `n_rows` (the last one shorter), as datasets' iter gives."""
    pending, held = [], 0
    for table in tables:
        pending.append(table)
        held += table.num_rows
        while held >= n_rows:
            joined = pa.concat_tables(pending, promote_options="default")
            yield joined.slice(0, n_rows)
            pending, held = [joined.slice(n_rows)], held - n_rows
    if held:
        yield pa.concat_tables(pending, promote_options="default")


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


def iter_arrow_batches(ds, batch_rows: int = 1000):
    """The rows of `ds` in order, as Arrow record batches, holding at most about one batch in memory.

    A `StreamedCorpus` is read through fsspec file objects, a batch at a time, with no local copy.

    A plain dataset is read from its Arrow files with ordinary reads rather than through datasets' memory map:
    mapped pages stay in the process's resident memory once touched, so a pass over a corpus larger than memory
    would look (and, under a memory limit, count) as if it held the whole corpus.
    """
    if isinstance(ds, StreamedCorpus):
        for table in ds.iter_batches(batch_rows):
            yield from table.combine_chunks().to_batches()
        return
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


def iter_column_batches(ds, columns: list[str], batch_rows: int = 1000):
    """`iter_arrow_batches` of these columns only; a streamed corpus parses (parquet: fetches) no other column."""
    if isinstance(ds, StreamedCorpus):
        for table in ds.iter_batches(batch_rows, columns):
            yield from table.combine_chunks().to_batches()
        return
    yield from iter_arrow_batches(ds.select_columns(columns), batch_rows)


def iter_row_range(ds, first: int, last: int, batch_rows: int = 1000):
    """Rows [first, last) of every column, in order, as Arrow record batches of at most `batch_rows` rows.

    A streamed corpus reads only the files (parquet: row groups; jsonl: from the scanned offset before `first`) that
    hold them. A plain dataset is sliced through datasets' memory map, which reaches any row without reading the
    ones before it; the pages it touches count in the process's resident memory until the kernel needs them back.
    """
    if isinstance(ds, StreamedCorpus):
        for table in ds.iter_rows(first, last, batch_rows=batch_rows):
            yield from _conform(table, ds.schema).combine_chunks().to_batches()
        return
    rows = ds.with_format("arrow")
    for start in range(first, last, batch_rows):
        yield from rows[start:min(start + batch_rows, last)].combine_chunks().to_batches()


def read_rows(ds, first: int, last: int, columns: list[str]) -> pa.Table:
    """Rows [first, last) of these columns; a streamed corpus reads only the files (or row groups) that hold them."""
    if isinstance(ds, StreamedCorpus):
        return ds.rows(first, last, columns)
    return ds.select_columns(columns).with_format("arrow")[first:last]


def read_files(ds, source: str, split: str, name: Optional[str]) -> Optional[list[str]]:
    """The files `ds` was read from: resolved local paths, the URLs of a streamed corpus, None for a hub dataset."""
    if isinstance(ds, StreamedCorpus):
        return ds.urls
    return corpus_files(source, split, name)


def corpus_license(ds) -> Optional[str]:
    return None if isinstance(ds, StreamedCorpus) else (ds.info.license or None)


# ---- Remote corpora, read as streams -------------------------------------------------------------------------------
# A source given as an fsspec URL (s3://, gs://, hf://datasets/..., https://...) is never handed to datasets, which
# would copy it into its Arrow cache first. Its files are listed with fsspec and their rows read through fsspec file
# objects a batch at a time, so nothing of the corpus is written to disk.

STREAMED_BUILDERS = ("json", "parquet", "csv")
SCAN_BATCH_ROWS = 10_000  # rows parsed at a time by the scan; a jsonl shard read starts at one of these batches


def is_remote(source: str) -> bool:
    """Whether `source` is a URL of a non-local fsspec filesystem (read streamed) rather than a path or a hub name."""
    return "://" in source and fsspec.utils.get_protocol(source) not in ("file", "local")


def open_corpus(source: str, split: str = "train", name: Optional[str] = None, scan: Optional[dict] = None):
    """A remote URL as a `StreamedCorpus` (with `scan`, the row counts a driver recorded); anything else as `load_corpus`."""
    if is_remote(source):
        return StreamedCorpus(source, scan)
    return load_corpus(source, split, name)


class StreamedCorpus:
    """The data files under a remote URL, in sorted order, read as one table of rows without a local copy.

    Listing the files and reading their schema is cheap (parquet: the footer; jsonl/csv: the first lines). Row
    counts need one streamed pass (`scan`) except for parquet, whose footers hold them; the pass also counts blank
    texts and collects the ids, and its record (`scan_record`) lets another process open the corpus without it.
    """

    def __init__(self, source: str, scan: Optional[dict] = None):
        self.source = source
        with _remote_errors(source):
            self.fs, path = fsspec.core.url_to_fs(source)
            infos = _remote_listing(self.fs, path)
        files = sorted(p for p, info in infos.items() if info.get("type", "file") == "file" and _extension(p) in BUILDER_BY_EXTENSION)
        if not files and not infos:  # s3fs lists a missing bucket as empty: say which part of the URL is missing
            _check_base_exists(self.fs, path, source)
        if not files:
            raise RefineError(f"corpus {source!r} matches no data files; give a URL of {', '.join(STREAMED_BUILDERS)} "
                              "files, a folder holding them, or a glob such as s3://bucket/prefix/*.jsonl")
        if not glob.has_magic(path) and self.fs.isdir(path):
            files = _majority_type(files)
        self.builder = _builder(files, source)
        if self.builder not in STREAMED_BUILDERS:
            raise RefineError(f"a remote corpus is read as a stream of {', '.join(STREAMED_BUILDERS)} files, not "
                              f"{self.builder}; convert it, or copy it to local disk")
        self.files = files
        self.urls = [self.fs.unstrip_protocol(p) for p in files]
        self.file_facts = [_remote_file_facts(p, infos[p]) for p in files]
        self.schema = self._read_schema()
        self.rows_per_file = scan["rows_per_file"] if scan else (self._footer_rows() if self.builder == "parquet" else None)
        self.n_blank = scan["n_blank"] if scan else None
        # per jsonl file, (row, byte offset) where each scanned batch starts: a shard's read seeks to the one before it
        self.checkpoints = scan.get("checkpoints") if scan else None
        self.ids = None  # the id column, once `scan` has read it

    @property
    def column_names(self) -> list[str]:
        return self.schema.names

    def __len__(self) -> int:
        if self.rows_per_file is None:
            raise RuntimeError("a streamed jsonl/csv corpus has no row count before scan()")
        return sum(self.rows_per_file)

    def scan(self, text_column: str, id_column: Optional[str]) -> None:
        """One streamed pass over the text (and id) column: rows per file, blank texts, ids, UTF-8 validity."""
        columns = [text_column] + ([id_column] if id_column else [])
        rows_per_file, n_blank, ids, self.checkpoints = [], 0, [], []
        for path in self.files:
            n_rows, checkpoints = 0, ([] if self.builder == "json" and not _is_compressed(path) else None)
            self.checkpoints.append(checkpoints)
            for _, table in self._file_tables(path, columns, batch_rows=SCAN_BATCH_ROWS, checkpoints=checkpoints):
                n_rows += table.num_rows
                text = table.column(text_column)
                try:
                    text.validate(full=True)
                except pa.ArrowInvalid:
                    raise RefineError(f"column {text_column!r} of {self.source!r} holds bytes that are not valid UTF-8; "
                                      "re-encode the corpus as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None
                empty = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(text)), 0)
                n_blank += int(pc.sum(pc.fill_null(empty, True)).as_py() or 0)
                if id_column:
                    ids.extend(table.column(id_column).chunks)
            rows_per_file.append(n_rows)
        self.rows_per_file, self.n_blank = rows_per_file, n_blank
        if id_column:
            try:
                self.ids = pa.chunked_array(ids) if ids else pa.chunked_array([], type=self.schema.field(id_column).type)
            except (pa.ArrowInvalid, pa.ArrowTypeError):  # one batch read the ids as numbers, another as strings
                raise RefineError(f"id column {id_column!r} of {self.source!r} mixes types between rows; {ID_FIX}") from None

    def scan_record(self) -> dict:
        """What `scan` found that another process needs to read shards: JSON-able, per file its row count and (jsonl)
        where each scanned batch starts, so a task neither rescans the corpus nor reads a file from its start."""
        return {"rows_per_file": list(self.rows_per_file), "n_blank": self.n_blank, "checkpoints": self.checkpoints}

    def rows(self, first: int, last: int, columns: Optional[list[str]] = None) -> pa.Table:
        """Rows [first, last) of the concatenated files; only the files (parquet: row groups) that hold them are read."""
        return _concat(list(self.iter_rows(first, last, columns)), self.schema, columns)

    def iter_rows(self, first: int, last: int, columns: Optional[list[str]] = None, batch_rows: int = 10_000):
        """Rows [first, last) as tables of at most `batch_rows` rows, read as `rows` reads them (needs the row counts)."""
        offset = 0
        for k, (path, n_rows) in enumerate(zip(self.files, self.rows_per_file)):
            start, stop = first - offset, last - offset  # the wanted rows, counted inside this file
            offset += n_rows
            if stop <= 0 or start >= n_rows:
                continue
            for table_first, table in self._file_tables(path, columns, skip_rows=start, batch_rows=batch_rows,
                                                        resume=self._resume_point(k, start)):
                table_last = table_first + table.num_rows
                if table_last > start:
                    lo, hi = max(start, table_first), min(stop, table_last)
                    yield table.slice(lo - table_first, hi - lo)
                if table_last >= stop:
                    break

    def iter_batches(self, batch_rows: int = 1000, columns: Optional[list[str]] = None):
        """Every row, in order, as Arrow tables of at most `batch_rows` rows (of `columns`, default all)."""
        schema = self.schema if columns is None else pa.schema([self.schema.field(c) for c in columns])
        for path in self.files:
            for _, table in self._file_tables(path, columns, batch_rows=batch_rows):
                yield _conform(table, schema)

    def _resume_point(self, file_index: int, row: int) -> tuple[int, int]:
        """The last scanned (row, byte offset) at or before `row` of a jsonl file; (0, 0) when there is none."""
        found = (0, 0)
        for checkpoint in (self.checkpoints[file_index] if self.checkpoints else None) or []:
            if checkpoint[0] > row:
                break
            found = tuple(checkpoint)
        return found

    def _file_tables(self, path: str, columns: Optional[list[str]], skip_rows: int = 0, batch_rows: int = 10_000,
                     resume: tuple[int, int] = (0, 0), checkpoints: Optional[list] = None):
        """(first row, table) pairs of one file's rows, from about row `skip_rows` on: parquet skips the row groups
        before it unread, jsonl starts at `resume` (a scanned (row, byte offset)), csv reads from the file's start."""
        with _remote_errors(self.source, path, self.builder):
            with self.fs.open(path, "rb", compression="infer") as f:
                if self.builder == "parquet":
                    yield from _parquet_tables(f, columns, skip_rows, batch_rows)
                elif self.builder == "json":
                    yield from _jsonl_tables(f, columns, batch_rows, resume, checkpoints)
                else:
                    yield from _csv_tables(f, columns, batch_rows)

    def _read_schema(self) -> pa.Schema:
        with _remote_errors(self.source, self.files[0], self.builder):
            if self.builder == "parquet":
                with self.fs.open(self.files[0], "rb") as f:
                    return pq.ParquetFile(f).schema_arrow
            for _, table in self._file_tables(self.files[0], None, batch_rows=100):
                return table.schema
        return pa.schema([])

    def _footer_rows(self) -> list[int]:
        counts = []
        for path in self.files:
            with _remote_errors(self.source, path, self.builder), self.fs.open(path, "rb") as f:
                counts.append(pq.ParquetFile(f).metadata.num_rows)
        return counts


def _remote_listing(fs, path: str) -> dict:
    if glob.has_magic(path):
        return fs.glob(path, detail=True)
    if fs.isfile(path):
        return {path: fs.info(path)}
    if fs.isdir(path):
        return fs.find(path, detail=True)
    raise FileNotFoundError(f"no file or folder {path}")


def _check_base_exists(fs, path: str, source: str) -> None:
    parts = path.split("/")
    base = "/".join(parts[:next((k for k, part in enumerate(parts) if glob.has_magic(part)), len(parts))])
    with _remote_errors(source):
        exists = fs.exists(base)
    if not exists:
        raise RefineError(f"could not open corpus {source!r} (no bucket, repo or folder {base!r}); check the URL, that "
                          "the bucket or repo exists, and your credentials")


def _remote_file_facts(path: str, info: dict) -> dict:
    """Name, size and a version tag that changes with the content: the S3/HTTP ETag, the Hub's LFS sha256 or git blob id."""
    lfs = info.get("lfs") or {}
    version = info.get("ETag") or info.get("etag") or lfs.get("sha256") or info.get("blob_id") or info.get("mtime") or info.get("LastModified")
    return {"path": path, "bytes": info.get("size"), "version": str(version) if version is not None else None}


def _parquet_tables(f, columns, skip_rows: int, batch_rows: int):
    parquet = pq.ParquetFile(f)
    first = 0
    for group in range(parquet.num_row_groups):
        n_rows = parquet.metadata.row_group(group).num_rows
        if first + n_rows > skip_rows:  # a row group wholly before the wanted rows is never fetched
            for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=[group], columns=columns):
                yield first, pa.Table.from_batches([batch])
                first += batch.num_rows
        else:
            first += n_rows


def _jsonl_tables(f, columns, batch_rows: int, resume: tuple[int, int] = (0, 0), checkpoints: Optional[list] = None):
    """JSON Lines, parsed a batch of lines at a time by pyarrow's JSON reader (the one datasets' json builder uses),
    from `resume` = (row, byte offset) on; each batch's (first row, byte offset) is appended to `checkpoints`."""
    import pyarrow.json as paj

    first, position = resume
    if position:
        f.seek(position)
    lines, batch_start = [], position
    for line in f:
        if not lines:
            batch_start = position
        position += len(line)
        if line.strip():  # blank lines hold no row, for pyarrow as for datasets
            lines.append(line if line.endswith(b"\n") else line + b"\n")
        if len(lines) == batch_rows:
            if checkpoints is not None:
                checkpoints.append([first, batch_start])
            yield first, _select(paj.read_json(pa.BufferReader(b"".join(lines))), columns)
            first, lines = first + len(lines), []
    if lines:
        if checkpoints is not None:
            checkpoints.append([first, batch_start])
        yield first, _select(paj.read_json(pa.BufferReader(b"".join(lines))), columns)


def _csv_tables(f, columns, batch_rows: int):
    import pandas as pd

    first = 0
    with pd.read_csv(f, chunksize=batch_rows, usecols=columns) as reader:  # the reader datasets' csv builder uses
        for frame in reader:
            yield first, pa.Table.from_pandas(frame, preserve_index=False)
            first += len(frame)


def _select(table: pa.Table, columns: Optional[list[str]]) -> pa.Table:
    return table.select(columns) if columns is not None else table


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with the corpus's column types where a batch inferred others (a column null in every row, say)."""
    if table.schema.equals(schema) or table.schema.names != schema.names:
        return table
    try:
        return table.cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return table


def _concat(tables: list[pa.Table], schema: pa.Schema, columns: Optional[list[str]]) -> pa.Table:
    schema = pa.schema([schema.field(c) for c in columns]) if columns is not None else schema
    if not tables:
        return schema.empty_table()
    return pa.concat_tables([_conform(t, schema) for t in tables], promote_options="default")


@contextlib.contextmanager
def _remote_errors(source: str, file: Optional[str] = None, builder: Optional[str] = None):
    """What fsspec and the readers raise, as one RefineError naming the URL (or file) and the fix.

    Without `file` (listing, opening) every failure means the URL could not be reached or named nothing: the
    storage clients raise their own types (botocore's connection errors are not OSErrors).
    """
    try:
        yield
    except RefineError:
        raise
    except UnicodeDecodeError as e:
        raise RefineError(_undecodable(file or source, e)) from None
    except Exception as e:
        if file is None or isinstance(e, (FileNotFoundError, PermissionError, ConnectionError)):
            raise RefineError(f"could not open corpus {source!r} ({_first_line(e)}); check the URL, that the bucket or "
                              "repo exists, and your credentials") from None
        raise RefineError(f"could not read corpus file {file!r} as {builder} ({_first_line(e)}); check that it is whole "
                          "and in the format its name says") from None
