"""`refine sample`: keep the top-alpha fraction of instances by score, in original corpus order."""

from __future__ import annotations

import math
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from refine import data as corpus
from refine.card import refined_card
from refine.config import SampleConfig
from refine.errors import RefineError
from refine.output import DATA_DIR, Claim, claim, content_tag, run_info, verify, write_manifest, write_parquet, write_text

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


def read_scores(scores_dir: Path) -> tuple[pa.Table, dict]:
    """Every score row of a finished `refine score` output, after checking its files against the manifest."""
    manifest = verify(scores_dir, "score")
    paths = [scores_dir / f["path"] for f in manifest["files"] if f["path"].endswith(".parquet")]
    table = pa.concat_tables(pq.read_table(p) for p in paths)
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
            refined = kept_scores
        else:
            refined = _join_documents(source, data_spec, kept_scores)

        threshold = float(np.min(keys[kept])) if len(kept) else None
        manifest = {
            "stage": "sample",
            **run_info(),
            "method": cfg.method,
            "alpha": cfg.alpha,
            "seed": cfg.seed if cfg.method == "random" else None,
            "threshold": threshold if cfg.method != "random" else None,
            "instances_before": scores.num_rows,
            "instances_after": refined.num_rows,
            "tokens_before": int(pc_sum(scores, "n_tokens")),
            "tokens_after": int(pc_sum(refined, "n_tokens")),
            "score_stats": _stats(scores.column("score").to_numpy()),
            "scores": score_manifest,
        }
        return _write_dataset(claimed, refined, manifest, cfg.shard_size_mb)


def pc_sum(table: pa.Table, column: str) -> float:
    return float(table.column(column).to_numpy().sum()) if table.num_rows else 0.0


def _stats(values: np.ndarray) -> dict:
    quantiles = np.quantile(values, [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
    return {"mean": float(values.mean()), "std": float(values.std()),
            **{f"q{int(q * 100):02d}": float(v) for q, v in zip([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0], quantiles)}}


def open_scored_corpus(source: str, data_spec: dict):
    """The corpus at `source`, refused unless it is the one the scores' manifest (`data_spec`) describes."""
    ds = corpus.load_corpus(source, data_spec["split"], data_spec["name"])
    corpus.check_columns(ds, data_spec["text_column"], data_spec["id_column"], source)
    if len(ds) != data_spec["n_rows"]:
        raise RefineError(
            f"corpus {source!r} has {len(ds)} rows but was scored with {data_spec['n_rows']}; "
            "give the corpus the scores were made from, or rescore"
        )
    if corpus.corpus_fingerprint(ds, data_spec["text_column"], data_spec["id_column"]) != data_spec["fingerprint"]:
        raise RefineError(
            f"corpus {source!r} differs from the one that was scored (content fingerprint mismatch); "
            "give the corpus the scores were made from, or rescore"
        )
    return ds


def _join_documents(source: str, data_spec: dict, kept_scores: pa.Table) -> pa.Table:
    """Original rows of the kept documents (in corpus order) with the score columns beside them."""
    ds = open_scored_corpus(source, data_spec)
    id_column = data_spec["id_column"]
    kept_ids = kept_scores.column("id").to_pylist()
    if id_column is None:
        rows = np.asarray(kept_ids, dtype=np.int64)
    else:
        position = {value: row for row, value in enumerate(ds[id_column])}
        rows = np.asarray([position[i] for i in kept_ids], dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    table = ds.select(rows[order]).with_format("arrow")[:]
    aligned = kept_scores.take(order)
    if id_column is None:
        table = table.append_column("id", aligned.column("id")) if "id" not in table.column_names else table
    for column in SCORE_COLUMNS:
        name = column if column not in table.column_names else f"refine_{column}"
        table = table.append_column(name, aligned.column(column))
    return table


def _write_dataset(claimed: Claim, table: pa.Table, manifest: dict, shard_size_mb: int) -> dict:
    """Build the whole directory beside the output, then rename it into place: complete or absent."""
    staging = claimed.staging_dir()
    try:
        tag = content_tag(manifest)
        n_shards = max(1, math.ceil(table.nbytes / (shard_size_mb * 2**20)))
        rows_per_shard = math.ceil(table.num_rows / n_shards) if table.num_rows else 0
        files = []
        for k in range(n_shards):
            files.append(f"{DATA_DIR}/train-{tag}-{k:05d}-of-{n_shards:05d}.parquet")
            write_parquet(staging / files[-1], table.slice(k * rows_per_shard, rows_per_shard))
        write_text(staging / "README.md", refined_card(manifest, f"{DATA_DIR}/train-{tag}-*.parquet"))
        sealed = write_manifest(staging, manifest, [*files, "README.md"])
        claimed.commit(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return sealed
