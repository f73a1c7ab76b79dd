"""`refine sample`: keep the top-alpha fraction of instances by score, in original corpus order."""

from __future__ import annotations

import math
import os
import shutil
from fractions import Fraction
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from refine import data as corpus
from refine import diagnostics
from refine.card import refined_card
from refine.config import SampleConfig
from refine.errors import RefineError
from refine.output import DATA_DIR, Claim, claim, content_tag, parquet_files, run_info, verify, write_fault, write_manifest, write_text

METHODS = ("difference", "random", "teacher", "reference")
SCORE_COLUMNS = ("n_tokens", "teacher_logprob", "ref_logprob", "score")


def validate(cfg: SampleConfig) -> None:
    cfg.check()  # every field and cross-field check is declared in refine.config


def n_kept(n: int, alpha: float) -> int:
    """ceil(alpha * n), computed exactly (0.3 * 10 is 3.0000000000000004 in floats)."""
    return math.ceil(Fraction(str(alpha)) * n)


def select_top_fraction(keys: np.ndarray, ids: np.ndarray, alpha: float) -> np.ndarray:
    """Indices of the ceil(alpha*N) largest keys, ties broken by smaller id; returned in ascending order."""
    keys = np.asarray(keys, dtype=np.float64)
    if np.isnan(keys).any():
        raise RefineError("scores contain NaN; rescore with --dtype float32")
    order = np.lexsort((np.asarray(ids), -keys))  # last key is primary: largest key first, then smallest id
    return np.sort(order[: n_kept(len(keys), alpha)])


def selection_keys(scores: pa.Table, method: str, seed: int) -> np.ndarray:
    """Per-instance key where larger means "keep" for each selection method."""
    n_tokens = scores.column("n_tokens").to_numpy().astype(np.float64)
    if method == "difference":
        return scores.column("score").to_numpy()
    if method == "teacher":  # lowest teacher NLL per token = highest mean log-prob
        return scores.column("teacher_logprob").to_numpy() / n_tokens
    if method == "reference":  # per reference token: its own count when it read its own tokenization
        ref_tokens = scores.column("ref_n_tokens").to_numpy() if "ref_n_tokens" in scores.column_names else n_tokens
        return scores.column("ref_logprob").to_numpy() / ref_tokens
    return np.random.default_rng(seed).random(len(n_tokens))


# What selection reads of the scores: numbers only, never the chunk text or token ids (those are streamed when written).
SELECTION_COLUMNS = ("id", *SCORE_COLUMNS, "ref_n_tokens")
BATCH_ROWS = 1000  # rows read and written at a time: a few MB of text for typical documents


def read_scores(scores_dir: Path) -> tuple[pa.Table, dict]:
    """The selection columns (ids and numbers) of every score row of a finished `refine score` output, after
    checking its files against the manifest: O(N) numbers, no text."""
    manifest = verify(scores_dir, "score")
    paths = parquet_files(scores_dir, manifest)
    present = set(pq.read_schema(paths[0]).names) if paths else set()
    columns = [c for c in SELECTION_COLUMNS if c in present]
    table = pa.concat_tables(pq.read_table(p, columns=columns).replace_schema_metadata(None) for p in paths)
    if table.num_rows != manifest["n_instances"]:
        raise RefineError(
            f"{str(scores_dir)!r} holds {table.num_rows} scores but its manifest says {manifest['n_instances']}; rescore"
        )
    return table, manifest


def sample(cfg: SampleConfig) -> dict:
    """Write the kept instances (original columns + score columns) as a dataset directory; return its manifest."""
    validate(cfg)
    scores_dir = Path(cfg.scores)
    scores, score_manifest = read_scores(scores_dir)
    data_spec = score_manifest["data"]
    source = cfg.data or data_spec["source"]
    with claim(cfg.output, "sample", [cfg.scores, source], cfg.overwrite, staged=True) as claimed:
        keys = selection_keys(scores, cfg.method, cfg.seed)
        kept = select_top_fraction(keys, scores.column("id").to_numpy(zero_copy_only=False), cfg.alpha)
        kept_scores = scores.take(kept)
        if score_manifest["settings"]["unit"] == "chunk":
            if cfg.data is not None:
                open_scored_corpus(cfg.data, data_spec)
            batches = kept_chunks(parquet_files(scores_dir, score_manifest), kept)
        else:
            batches = kept_documents(open_scored_corpus(source, data_spec), data_spec["id_column"], kept_scores)

        threshold = float(np.min(keys[kept])) if len(kept) else None
        manifest = {
            "stage": "sample",
            **run_info(),
            "method": cfg.method,
            "alpha": cfg.alpha,
            "seed": cfg.seed if cfg.method == "random" else None,
            "threshold": threshold if cfg.method != "random" else None,
            "instances_before": scores.num_rows,
            "instances_after": kept_scores.num_rows,
            "tokens_before": int(pc_sum(scores, "n_tokens")),
            "tokens_after": int(pc_sum(kept_scores, "n_tokens")),
            "score_stats": _stats(scores.column("score").to_numpy()),
            # Whether the reference changed this selection (for another method: the difference selection at alpha).
            "reference_diagnostics": diagnostics.table_diagnostics(
                scores, cfg.alpha, kept if cfg.method == "difference" else None,
                diagnostics.reference_vocab_size(score_manifest)),
            "scores": score_manifest,
        }
        return _write_dataset(claimed, batches, manifest, cfg.shard_size_mb)


def pc_sum(table: pa.Table, column: str) -> float:
    return float(table.column(column).to_numpy().sum()) if table.num_rows else 0.0


def _stats(values: np.ndarray) -> dict:
    quantiles = np.quantile(values, [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
    return {"mean": float(values.mean()), "std": float(values.std()),
            **{f"q{int(q * 100):02d}": float(v) for q, v in zip([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0], quantiles)}}


def open_scored_corpus(source: str, data_spec: dict):
    """The corpus at `source`, refused unless it is the one the scores' manifest (`data_spec`) describes.

    Its fingerprint is recomputed the way the recorded one was made (see `corpus.corpus_fingerprint`), so
    by default no row is read here. The text was checked (UTF-8, columns) when it was scored.
    """
    ds = corpus.load_corpus(source, data_spec["split"], data_spec["name"])
    fix = "give the corpus the scores were made from, or rescore"
    missing = [c for c in (data_spec["text_column"], data_spec["id_column"]) if c and c not in ds.column_names]
    if missing:
        raise RefineError(f"corpus {source!r} has no column {missing[0]!r}, which was scored; {fix}")
    if len(ds) != data_spec["n_rows"]:
        raise RefineError(f"corpus {source!r} has {len(ds)} rows but was scored with {data_spec['n_rows']}; {fix}")
    kind = corpus.fingerprint_kind(data_spec["fingerprint"])
    files = corpus.corpus_files(source, data_spec["split"], data_spec["name"]) if kind == "files" else None
    fingerprint = corpus.corpus_fingerprint(ds, data_spec["text_column"], data_spec["id_column"], files,
                                            full=kind == "content")
    if fingerprint.removeprefix("content:") != data_spec["fingerprint"].removeprefix("content:"):
        what = {"content": "its ids or texts differ", "files": "its files' names, sizes or modification times differ",
                "info": "its revision or dataset info differs"}[kind]
        raise RefineError(f"corpus {source!r} differs from the one that was scored ({kind} fingerprint mismatch: "
                          f"{what}); {fix}")
    return ds


def kept_rows(first: int, n_rows: int, kept_sorted: np.ndarray) -> tuple[np.ndarray, int]:
    """Positions inside rows [first, first + n_rows) of the sorted global positions `kept_sorted`, and where they start in it."""
    lo, hi = np.searchsorted(kept_sorted, [first, first + n_rows])
    return kept_sorted[lo:hi] - first, int(lo)


def kept_chunks(paths: list[Path], kept: np.ndarray):
    """The kept chunk rows (every score column, text and token ids included), in score order, a batch at a time."""
    first = 0
    for path in paths:
        with pq.ParquetFile(path) as scores:
            for batch in scores.iter_batches(batch_size=BATCH_ROWS):
                local, _ = kept_rows(first, batch.num_rows, kept)
                first += batch.num_rows
                yield pa.Table.from_batches([batch.take(pa.array(local, type=pa.int64()))]).replace_schema_metadata(None)


def kept_documents(ds, id_column: Optional[str], kept_scores: pa.Table):
    """Original rows of the kept documents, in corpus order, with the score columns beside them, a batch at a time.

    Only the kept scores are held (O(kept) numbers); the corpus is read once, in order.
    """
    if id_column is None:  # ids are row indices
        order = np.argsort(kept_scores.column("id").to_numpy(), kind="stable")
        kept_scores = kept_scores.take(order)
        kept_sorted = kept_scores.column("id").to_numpy()
    kept_ids = kept_scores.column("id").combine_chunks()
    first = 0
    for batch in corpus.iter_arrow_batches(ds, BATCH_ROWS):
        table = pa.Table.from_batches([batch])
        if id_column is None:
            local, start = kept_rows(first, batch.num_rows, kept_sorted)
            aligned = kept_scores.slice(start, len(local))
        else:  # the score row of each corpus row, found by id: null where the row was not kept
            if kept_ids.type != table.schema.field(id_column).type:  # int64 in the scores, maybe int32 in the corpus
                kept_ids = kept_ids.cast(table.schema.field(id_column).type)
            where = pc.index_in(table.column(id_column), value_set=kept_ids)
            local = np.flatnonzero(where.is_valid().to_numpy(zero_copy_only=False))
            aligned = kept_scores.take(where.take(pa.array(local, type=pa.int64())))
        first += batch.num_rows
        yield _with_scores(table.take(pa.array(local, type=pa.int64())), aligned, id_column)


def _with_scores(table: pa.Table, aligned: pa.Table, id_column: Optional[str]) -> pa.Table:
    if id_column is None and "id" not in table.column_names:
        table = table.append_column("id", aligned.column("id"))
    for column in SCORE_COLUMNS:
        name = column if column not in table.column_names else f"refine_{column}"
        table = table.append_column(name, aligned.column(column))
    return table


class ShardWriter:
    """Parquet shards of about `shard_bytes` of Arrow data each, written a row group at a time.

    Shards are named `<stem>-<k>-of-<n>.parquet`; `n` is known only at the end, so they are renamed then
    (inside the staging directory, which is renamed into place as a whole afterwards).
    """

    def __init__(self, directory: Path, stem: str, shard_bytes: int):
        self.directory, self.stem, self.shard_bytes = directory, stem, shard_bytes
        self.written: list[Path] = []
        self.writer, self.bytes_in_shard, self.schema = None, 0, None

    def write(self, table: pa.Table) -> None:
        self.schema = self.schema or table.schema
        if table.num_rows == 0:
            return
        if self.writer is None:
            self.written.append(self.directory / f"{self.stem}-{len(self.written):05d}.parquet.part")
            self.writer = pq.ParquetWriter(self.written[-1], table.schema, compression="zstd")
            self.bytes_in_shard = 0
        self.writer.write_table(table)
        self.bytes_in_shard += table.nbytes
        if self.bytes_in_shard >= self.shard_bytes:
            self.writer.close()
            self.writer = None

    def close(self) -> list[Path]:
        """Finish the last shard (an empty one if nothing was kept) and give every shard its final name."""
        if self.writer is not None:
            self.writer.close()
        elif not self.written:
            self.written.append(self.directory / f"{self.stem}-00000.parquet.part")
            pq.write_table((self.schema or pa.schema([])).empty_table(), self.written[-1], compression="zstd")
        final = []
        for k, part in enumerate(self.written):
            final.append(part.with_name(f"{self.stem}-{k:05d}-of-{len(self.written):05d}.parquet"))
            os.replace(part, final[-1])
        return final


def _write_dataset(claimed: Claim, batches, manifest: dict, shard_size_mb: int) -> dict:
    """Build the whole directory beside the output, then rename it into place: complete or absent."""
    staging = claimed.staging_dir()
    try:
        tag = content_tag(manifest)
        (staging / DATA_DIR).mkdir()
        shards = ShardWriter(staging / DATA_DIR, f"train-{tag}", shard_size_mb * 2**20)
        try:
            for table in batches:
                shards.write(table)
            files = [p.relative_to(staging).as_posix() for p in shards.close()]
        except OSError as e:
            raise write_fault(e, staging) from None
        write_text(staging / "README.md", refined_card(manifest, f"{DATA_DIR}/train-{tag}-*.parquet"))
        sealed = write_manifest(staging, manifest, [*files, "README.md"])
        claimed.commit(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return sealed
