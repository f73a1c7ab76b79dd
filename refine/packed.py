"""Tokenise a corpus once into a memory-mapped token file that every later run with that tokenizer reuses.

A token directory holds `tokens.bin`, the documents' token ids one after another, each followed by EOS
(uint16 when the vocabulary fits, else uint32), and `meta.json`, written last, saying what was tokenised.
Training sequences of any length are views into that stream, so students with different `--seq-len`
share the file too; nothing is loaded into memory but the sequences of the current batch.

The file is built from parts of `PART_ROWS` corpus rows that worker processes tokenise in parallel, each
written atomically under `parts/` and then joined in order, so the file is the same whatever the number of
workers and a killed build resumes from its finished parts.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import functools
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from refine import data as corpus
from refine import models
from refine.distributed import World
from refine.errors import RefineError
from refine.output import MANIFEST, atomic_write, output_stage, remove_temp_files, write_json

TOKENS = "tokens.bin"
META = "meta.json"
FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("REFINE_CACHE", Path.home() / ".cache" / "refine")) / "tokens"


def cache_key(dataset_fingerprint: str, tokenizer_fingerprint: str, text_column: str, selection: str) -> str:
    """Same corpus version, tokenizer, column and row selection -> same token file."""
    state = [FORMAT_VERSION, dataset_fingerprint, tokenizer_fingerprint, text_column, selection]
    return hashlib.sha256(json.dumps(state).encode()).hexdigest()[:24]


@dataclass
class TokenFile:
    directory: Path
    tokens: np.ndarray  # memory-mapped, 1-D
    meta: dict

    @classmethod
    def open(cls, directory: Path) -> "TokenFile":
        meta = json.loads((directory / META).read_text())
        tokens = np.memmap(directory / TOKENS, dtype=np.dtype(meta["dtype"]), mode="r")
        if len(tokens) != meta["n_tokens"]:
            raise OSError(f"{directory / TOKENS} holds {len(tokens)} tokens, its meta.json says {meta['n_tokens']}")
        return cls(directory, tokens, meta)

    def chunks(self, chunk_tokens: int = 2**24):
        """The whole token file, `chunk_tokens` at a time, with ordinary reads: pages touched through the memory map
        would stay resident (counted in this process's memory) for the rest of the run."""
        with open(self.directory / TOKENS, "rb") as f:
            while len(chunk := np.fromfile(f, dtype=self.tokens.dtype, count=chunk_tokens)):
                yield chunk

    def n_sequences(self, seq_len: int) -> int:
        return len(self.tokens) // seq_len

    def batch(self, rows: np.ndarray, seq_len: int) -> np.ndarray:
        """(len(rows), seq_len) int64: the packed sequences with these indices (the tail is never used)."""
        return np.stack([self.tokens[r * seq_len : (r + 1) * seq_len] for r in rows]).astype(np.int64)


def join_with_eos(token_lists, eos_id: int, dtype=np.int64) -> np.ndarray:
    """The documents' tokens one after another, each followed by EOS."""
    lengths = np.fromiter(map(len, token_lists), dtype=np.int64, count=len(token_lists))
    stream = np.full(int(lengths.sum()) + len(lengths), eos_id, dtype=dtype)
    is_token = np.ones(len(stream), dtype=bool)
    is_token[np.cumsum(lengths + 1) - 1] = False
    stream[is_token] = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=dtype, count=int(lengths.sum()))
    return stream


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


# Documents per part: the unit of parallel tokenisation and of resuming. Parts are cut by row of the corpus, so
# they (and the token file) are the same whatever the number of workers.
PART_ROWS = 10_000
BATCH_ROWS = 1_000  # documents tokenised at once within a part
PARTS = "parts"
BUILD_LOCK = ".build.lock"


@dataclass(frozen=True)
class PackJob:
    """What a tokenising worker needs besides its rows: where parts go and how values become tokens."""

    parts_dir: Path
    tokenizer: object
    dtype: np.dtype
    are_token_ids: bool


def part_name(index: int) -> str:
    return f"part-{index:07d}"


def tokenize_part(job: PackJob, index: int, values: pa.Array) -> dict:
    """Tokenise one part's values and write its tokens (`<part>.bin`), then its counts (`<part>.json`, the mark of a
    finished part), each atomically. Returns the counts."""
    counts = {"n_tokens": 0, "n_documents": 0}

    def write(f) -> None:
        for start in range(0, len(values), BATCH_ROWS):
            stream, n_docs = _batch_stream(values.slice(start, BATCH_ROWS), job.tokenizer, job.dtype, job.are_token_ids)
            f.write(stream.tobytes())
            counts["n_tokens"] += len(stream)
            counts["n_documents"] += n_docs

    atomic_write(job.parts_dir / f"{part_name(index)}.bin", write)
    write_json(job.parts_dir / f"{part_name(index)}.json", counts)
    return counts


def part_values(ds, rows: np.ndarray | None, column: str, part_rows: int):
    """(part index, the `column` values of its selected rows as one Arrow array) for each part of `part_rows`
    corpus rows, in order; `rows` (sorted) selects rows of `ds`, None takes all.

    Reads the corpus once with ordinary reads (refine.data.iter_arrow_batches), so its pages do not stay resident.
    """
    first = 0  # corpus row of the batch in hand
    pieces: list[pa.Array] = []
    index = 0
    for batch in corpus.iter_arrow_batches(ds):
        values = batch.column(column)
        while len(values):
            take = min(len(values), (index + 1) * part_rows - first)
            piece = values.slice(0, take)
            if rows is not None:
                lo, hi = np.searchsorted(rows, [first, first + take])
                piece = piece.take(pa.array(rows[lo:hi] - first, type=pa.int64()))
            pieces.append(piece)
            first, values = first + take, values.slice(take)
            if first == (index + 1) * part_rows:
                yield index, _joined(pieces, batch.schema.field(column).type)
                pieces, index = [], index + 1
    if pieces or index == 0:
        yield index, _joined(pieces, ds.data.schema.field(column).type)


def _joined(pieces: list[pa.Array], kind: pa.DataType) -> pa.Array:
    # a copy, not a view: a slice of a batch would carry the whole batch's buffers to a worker process
    return pa.concat_arrays(pieces) if pieces else pa.array([], type=kind)


def default_workers() -> int:
    """The CPUs this process may run on (a Slurm or container CPU set counts, not the whole machine)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def build(directory: Path, ds, rows: np.ndarray | None, text_column: str, tokenizer, meta: dict,
          workers: int | None = None, token_column: str | None = None, part_rows: int = PART_ROWS) -> TokenFile:
    """Tokenise the `rows` of `ds` (None: all) into directory/tokens.bin, skipping blank documents.

    With `token_column` (scored chunks that already hold their token ids, EOS separators included) those
    ids are written as they are, so the student trains on exactly the tokens that were scored.

    `workers` processes (default: every CPU this process may use) tokenise parts of `part_rows` corpus rows
    into `parts/`, each written atomically; the parts are then joined into tokens.bin (also atomic) and
    meta.json comes last. A killed build leaves nothing that looks finished, and a rerun tokenises only the
    parts that were not written. The file is the same byte for byte whatever the number of workers. Builders
    of one directory (one per node on a shared cache) take turns on a lock; the later ones find the file made.
    """
    directory.mkdir(parents=True, exist_ok=True)
    with build_lock(directory):
        if (directory / META).exists():
            return open_finished(directory)
        started = time.time()
        parts_dir = directory / PARTS
        parts_dir.mkdir(exist_ok=True)
        remove_temp_files(directory)  # what killed builders were writing; the lock says none is writing now
        dtype = token_dtype(len(tokenizer))
        job = PackJob(parts_dir, tokenizer, dtype, token_column is not None)
        n_rows = len(ds) if rows is None else len(rows)
        n_parts = max(1, -(-len(ds) // part_rows))
        done = {i for i in range(n_parts) if (parts_dir / f"{part_name(i)}.json").exists()}
        workers = max(1, min(workers or default_workers(), n_parts - len(done)))
        todo = ((i, values) for i, values in part_values(ds, rows, token_column or text_column, part_rows)
                if i not in done)
        with tqdm(total=n_rows, desc="tokenize", unit="doc", dynamic_ncols=True) as progress:
            progress.update(sum(_part_rows(i, len(ds), rows, part_rows) for i in done))
            for i, _ in run_parts(job, todo, workers):
                progress.update(_part_rows(i, len(ds), rows, part_rows))
        n_tokens, n_docs = join_parts(parts_dir, n_parts, directory / TOKENS, dtype)
        write_json(directory / META, {**meta, "dtype": dtype.name, "n_tokens": n_tokens, "n_documents": n_docs,
                                      "eos_token_id": tokenizer.eos_token_id, "vocab_size": len(tokenizer),
                                      "format": FORMAT_VERSION, "elapsed_s": round(time.time() - started, 1)})
        shutil.rmtree(parts_dir, ignore_errors=True)
    return TokenFile.open(directory)


def _part_rows(index: int, n_corpus_rows: int, rows: np.ndarray | None, part_rows: int) -> int:
    first, last = index * part_rows, min((index + 1) * part_rows, n_corpus_rows)
    return last - first if rows is None else int(np.searchsorted(rows, last) - np.searchsorted(rows, first))


def run_parts(job: PackJob, todo, workers: int):
    """Tokenise each (index, values) of `todo`: in this process with one worker, else in a pool of `workers` processes,
    at most two parts per worker in flight (so memory holds a few parts, not the corpus). Yields (index, counts)."""
    if workers == 1:
        for index, values in todo:
            yield index, tokenize_part(job, index, values)
        return
    # Forked workers start at once with the tokenizer and the corpus handle; elsewhere the job is pickled.
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    # Each worker tokenises on one thread: the workers are the parallelism. Set, this variable also keeps
    # tokenizers from warning about the fork.
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = context.Pool(workers, initializer=_start_worker, initargs=(job,))
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM")
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    with pool:
        pending: collections.deque = collections.deque()
        for index, values in todo:
            pending.append((index, pool.apply_async(_tokenize_in_worker, (index, values))))
            if len(pending) >= 2 * workers:
                index, result = pending.popleft()
                yield index, result.get()
        while pending:
            index, result = pending.popleft()
            yield index, result.get()


_WORKER_JOB: PackJob | None = None


def _start_worker(job: PackJob) -> None:
    global _WORKER_JOB
    _WORKER_JOB = job


def _tokenize_in_worker(index: int, values: pa.Array) -> dict:
    return tokenize_part(_WORKER_JOB, index, values)


def join_parts(parts_dir: Path, n_parts: int, target: Path, dtype: np.dtype) -> tuple[int, int]:
    """Write the parts one after another into `target` (atomically); (tokens, documents) in all."""
    counts = [json.loads((parts_dir / f"{part_name(i)}.json").read_text()) for i in range(n_parts)]
    for i, c in enumerate(counts):
        size = (parts_dir / f"{part_name(i)}.bin").stat().st_size
        if size != c["n_tokens"] * dtype.itemsize:
            raise OSError(f"{parts_dir / part_name(i)}.bin holds {size} bytes, its counts say {c['n_tokens']} tokens")

    def copy(f) -> None:
        for i in range(n_parts):
            with open(parts_dir / f"{part_name(i)}.bin", "rb") as part:
                shutil.copyfileobj(part, f, 1 << 22)

    atomic_write(target, copy)
    return sum(c["n_tokens"] for c in counts), sum(c["n_documents"] for c in counts)


@contextlib.contextmanager
def build_lock(directory: Path):
    """An exclusive lock on the token directory, waited for; none where the filesystem has no locks."""
    fd = os.open(directory / BUILD_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
        yield
    finally:
        os.close(fd)  # closing releases the lock


def open_finished(directory: Path) -> TokenFile:
    """A finished token directory; parts a builder killed after meta.json left are removed."""
    if (directory / PARTS).exists():
        shutil.rmtree(directory / PARTS, ignore_errors=True)
    return TokenFile.open(directory)


def _batch_stream(values, tokenizer, dtype, are_token_ids: bool) -> tuple[np.ndarray, int]:
    """(tokens, documents) of one batch (a list or an Arrow array): texts tokenised and each followed by EOS, or
    token ids as they are."""
    if are_token_ids:
        if isinstance(values, pa.Array):
            return values.flatten().to_numpy(zero_copy_only=False).astype(dtype), len(values)
        return np.fromiter((t for ids in values for t in ids), dtype=dtype), len(values)
    if isinstance(values, pa.Array):
        values = values.to_pylist()
    texts = [t for t in values if not corpus.is_blank(t)]
    if not texts:
        return np.zeros(0, dtype=dtype), 0
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return join_with_eos(ids, tokenizer.eos_token_id, dtype), len(texts)


def open_or_build(cache_dir: Path, ds, rows: np.ndarray | None, text_column: str, tokenizer, meta: dict,
                  build_here: bool = True, token_column: str | None = None, workers: int | None = None) -> TokenFile:
    """The token file for this corpus selection and tokenizer: reused when one exists, else built (if build_here)."""
    key = cache_key(meta["dataset_fingerprint"], meta["tokenizer_fingerprint"], token_column or text_column,
                    meta["selection"])
    directory = cache_dir / key
    if (directory / META).exists():
        return open_finished(directory)
    if not build_here:
        raise FileNotFoundError(directory / META)
    return build(directory, ds, rows, text_column, tokenizer, meta, workers, token_column)


@functools.lru_cache(maxsize=2)
def epoch_permutation(seed: int, epoch: int, n_sequences: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_sequences)


def sample_order(position: int, count: int, n_sequences: int, seed: int) -> np.ndarray:
    """Sequence indices for global training positions [position, position+count): a fresh seeded shuffle each epoch.

    A pure function of the position, so resuming needs only the number of sequences consumed, whatever the
    number of processes.
    """
    positions = np.arange(position, position + count)
    epochs, offsets = np.divmod(positions, n_sequences)
    return np.asarray([epoch_permutation(seed, int(e), n_sequences)[o] for e, o in zip(epochs, offsets)])


# ---------------------------------------------------------------- what pretrain and distill-cache read


def pack(token_lists: list[list[int]], eos_id: int, seq_len: int, keep_remainder: bool = False) -> list[np.ndarray]:
    """Join documents with EOS after each and cut into `seq_len` sequences (the remainder only if asked)."""
    stream = join_with_eos(token_lists, eos_id)
    n_full = len(stream) // seq_len
    sequences = list(stream[: n_full * seq_len].reshape(n_full, seq_len)) if n_full else []
    if keep_remainder and len(stream) - n_full * seq_len >= 2:
        sequences.append(stream[n_full * seq_len :])
    return sequences


def split_documents(n_docs: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, eval rows): a seeded random eval_fraction of the documents, at least one."""
    if n_docs < 2:
        raise RefineError("need at least 2 documents to hold one out for evaluation; add data or give --eval-data")
    n_eval = min(n_docs - 1, max(1, round(eval_fraction * n_docs)))
    permutation = np.random.default_rng(seed).permutation(n_docs)
    return np.sort(permutation[n_eval:]), np.sort(permutation[:n_eval])


@dataclass
class Splits:
    """The training rows and the held-out documents of a run."""

    corpus: Any  # DATA, as a datasets.Dataset
    train_rows: np.ndarray | None  # sorted rows of `corpus` to train on; None: all of them
    held_out: Any  # the held-out documents, as a datasets.Dataset
    selection: str  # the training rows in words (part of the token file's key)

    @functools.cached_property
    def train(self):
        """The training rows as a dataset view (its fingerprint names the token file)."""
        return self.corpus if self.train_rows is None else self.corpus.select(self.train_rows)


def load_splits(cfg) -> Splits:
    """The training rows and the held-out documents, without reading the texts.

    `cfg` is a PretrainConfig or DistillCacheConfig: both name the corpus and the held-out split alike.
    """
    ds = corpus.load_corpus(cfg.data, cfg.split, cfg.name)
    corpus.check_columns(ds, cfg.text_column, None, cfg.data)
    if cfg.eval_data is not None:
        eval_ds = corpus.load_corpus(cfg.eval_data, cfg.split, cfg.name)
        corpus.check_columns(eval_ds, cfg.text_column, None, cfg.eval_data)
        return Splits(ds, None, eval_ds, "all rows")
    train_rows, eval_rows = split_documents(len(ds), cfg.eval_fraction, cfg.seed)
    selection = f"all rows but a held-out {cfg.eval_fraction} of {len(ds)}, seed {cfg.seed}"
    return Splits(ds, train_rows, ds.select(eval_rows), selection)


def eval_sequences(eval_ds, text_column: str, tokenizer, seq_len: int, limit: int,
                   token_column: str | None = None) -> list[np.ndarray]:
    """Packed held-out sequences (remainder kept), tokenising only as many documents as `limit` needs."""
    streams, n_tokens = [], 0
    read = token_column or text_column
    for batch in eval_ds.select_columns([read]).iter(batch_size=256):
        stream, _ = _batch_stream(batch[read], tokenizer, np.int64, token_column is not None)
        streams.append(stream)
        n_tokens += len(stream)
        if n_tokens >= (limit + 1) * seq_len:
            break
    stream = np.concatenate(streams) if streams else np.zeros(0, dtype=np.int64)
    n_full = len(stream) // seq_len
    sequences = list(stream[: n_full * seq_len].reshape(n_full, seq_len)) if n_full else []
    if len(stream) - n_full * seq_len >= 2:
        sequences.append(stream[n_full * seq_len :])
    return sequences[:limit]


def scored_token_column(source: str, ds, tokenizer) -> str | None:
    """`input_ids` when `source` is a refined set of scored chunks (`refine score --unit chunk`) made with this
    tokenizer: the student then trains on the very tokens that were scored, not a re-tokenisation of their text."""
    path = Path(source).expanduser()
    if output_stage(path) != "sample" or "input_ids" not in ds.column_names:
        return None
    scores = json.loads((path / MANIFEST).read_text())["scores"]
    if scores["settings"]["unit"] != "chunk" or scores["tokenizer"]["fingerprint"] != models.tokenizer_fingerprint(tokenizer):
        return None
    return "input_ids"


def token_file(cfg, splits: Splits, tokenizer, tokenizer_ref: str, world: World) -> TokenFile:
    """The memory-mapped training tokens: built once per node (local rank 0, with --tokenize-workers processes)
    and reused by later runs.

    `cfg` is a PretrainConfig or DistillCacheConfig (both name the corpus, --token-cache and --tokenize-workers alike).
    """
    cache_dir = Path(cfg.token_cache).expanduser() if cfg.token_cache else default_cache_dir()
    train_ds = splits.train
    meta = {
        "source": cfg.data, "split": cfg.split, "name": cfg.name, "text_column": cfg.text_column,
        "selection": splits.selection, "dataset_fingerprint": train_ds._fingerprint,  # datasets' hash of files + version
        "tokenizer": tokenizer_ref, "tokenizer_fingerprint": models.tokenizer_fingerprint(tokenizer),
    }
    token_column = scored_token_column(cfg.data, train_ds, tokenizer)
    build = functools.partial(open_or_build, cache_dir, splits.corpus, splits.train_rows, cfg.text_column, tokenizer,
                              meta, token_column=token_column, workers=cfg.tokenize_workers)
    try:
        if world.local_rank == 0:
            tokens = build()
        world.barrier()
        if world.local_rank != 0:
            tokens = build(build_here=False)
    except OSError as e:
        raise RefineError(f"token cache {str(cache_dir)!r}: {e}; check --token-cache (it must be writable)") from None
    if tokens.meta["n_documents"] == 0:
        raise RefineError(f"every training document of {cfg.data!r} is empty or whitespace-only; give a corpus with text")
    return tokens
