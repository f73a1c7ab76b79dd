"""`refine sample`: keep the best-ranked instances by score, in original corpus order.

The pure core is `select`: rank by the method's key (perturbed by seeded Gumbel noise above temperature 0),
ties by id, and keep the prefix that meets the budget (ceil(alpha*N) instances, or a number of tokens),
within each group when the budget is balanced over a corpus column.

Set-up reads the score columns and chooses (numbers only, no text); the run streams the corpus once and writes
the kept rows, in this process or, with --tasks/--executor, in datatrove tasks that each write the kept rows of
their own range of rows; the finish writes the card and, last, the manifest, and renames the folder into place.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from refine import __version__
from refine import data as corpus
from refine import diagnostics, engine
from refine.card import refined_card
from refine.config import SampleConfig
from refine.errors import RefineError
from refine.output import (DATA_DIR, Claim, claim, content_tag, parquet_files, run_info, verify, write_fault, write_json,
                           write_manifest, write_parquet, write_text)

METHODS = ("difference", "random", "teacher", "reference")
SCORE_COLUMNS = ("n_tokens", "teacher_logprob", "ref_logprob", "score")


def validate(cfg: SampleConfig) -> None:
    cfg.check()  # every field and cross-field check is declared in refine.config


def n_kept(n: int, alpha: float) -> int:
    """ceil(alpha * n), computed exactly (0.3 * 10 is 3.0000000000000004 in floats)."""
    return math.ceil(Fraction(str(alpha)) * n)


def select_top_fraction(keys: np.ndarray, ids: np.ndarray, alpha: float) -> np.ndarray:
    """Indices of the ceil(alpha*N) largest keys, ties broken by smaller id; returned in ascending order."""
    return np.sort(ranking(keys, ids)[: n_kept(len(keys), alpha)])


def ranking(keys: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Positions from best to worst: largest key first, ties broken by the smaller id."""
    keys = np.asarray(keys, dtype=np.float64)
    if np.isnan(keys).any():
        raise RefineError("scores contain NaN; rescore with --dtype float32")
    return np.lexsort((np.asarray(ids), -keys))  # last key is primary


@dataclass(frozen=True)
class Budget:
    """How much a selection keeps: `count` instances, or instances holding at least `count` tokens."""

    unit: str  # "instances" or "tokens"
    count: int


def budget_of(cfg, n_tokens: np.ndarray) -> Budget:
    """The budget --alpha, --tokens or --token-fraction asks for (alpha 0.5 when none is given), as an exact count."""
    total = int(n_tokens.sum())
    if cfg.tokens is not None:
        if cfg.tokens > total:
            raise RefineError(f"--tokens {cfg.tokens} is more than the {total} tokens scored; give at most {total}, "
                              "or --token-fraction 1 to keep everything")
        return Budget("tokens", cfg.tokens)
    if cfg.token_fraction is not None:
        return Budget("tokens", math.ceil(Fraction(str(cfg.token_fraction)) * total))
    return Budget("instances", n_kept(len(n_tokens), 0.5 if cfg.alpha is None else cfg.alpha))


def take_budget(order: np.ndarray, n_tokens: np.ndarray, unit: str, count: int) -> np.ndarray:
    """The first `count` positions of `order`; for a token budget, its shortest prefix holding >= `count` tokens
    (all of it if it holds fewer): like ceil(alpha*N), the budget is met and overshot by less than one instance."""
    if unit == "instances":
        return order[:count]
    if count <= 0:
        return order[:0]
    reached = np.cumsum(n_tokens[order], dtype=np.int64) >= count
    return order[: int(np.argmax(reached)) + 1] if reached.any() else order


def gumbel_noise(ids: np.ndarray, seed: int) -> np.ndarray:
    """Standard Gumbel noise that is a function of (seed, id) alone, so a draw does not depend on row order,
    sharding or which other instances are present. Integer ids are mixed as they are, string ids through
    pandas' SipHash of their UTF-8 bytes; splitmix64's finalizer spreads each (seed, id) over 64 bits."""
    ids = np.asarray(ids)
    if ids.dtype.kind in "iu":
        hashed = ids.astype(np.int64).view(np.uint64)
    else:
        hashed = pd.util.hash_array(ids if ids.dtype == object else ids.astype(object), categorize=False)
    salt = _mix64(np.array([seed], dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15))[0]
    bits = _mix64(hashed ^ salt)
    uniform = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53  # in (0, 1): 53 random bits
    return -np.log(-np.log(uniform))


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection of uint64 in which every output bit depends on every input bit."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def sampling_keys(keys: np.ndarray, ids: np.ndarray, temperature: float, seed: int) -> np.ndarray:
    """The keys a selection ranks by. At temperature 0 the keys themselves. Above it, key / temperature plus
    Gumbel noise: the order of these is a draw without replacement with probability proportional to
    exp(key / temperature) (the Gumbel top-k trick), so any prefix of it is such a sample."""
    keys = np.asarray(keys, dtype=np.float64)
    if temperature == 0:
        return keys
    return keys / temperature + gumbel_noise(ids, seed)


def apportion(total: int, shares: list[Fraction], capacities: list[int]) -> list[int]:
    """Integer quotas summing to `total` (or to every capacity, if they hold less), in proportion to `shares`.

    Largest remainders: each group gets floor(total * share), and the units left go one each to the largest
    fractional parts, ties to the earlier group. A group whose quota exceeds its capacity keeps all it has and
    the rest is re-apportioned among the others by their shares, until every quota fits; a group with share 0
    gets nothing. Exact (fractions), so the same inputs always give the same quotas.
    """
    quotas, active, left = [0] * len(shares), [g for g, s in enumerate(shares) if s > 0], total
    while active and left > 0:
        weight = sum(shares[g] for g in active)
        exact = {g: left * shares[g] / weight for g in active}
        base = {g: math.floor(exact[g]) for g in active}
        extra = sorted(active, key=lambda g: (-(exact[g] - base[g]), g))[: left - sum(base.values())]
        for g in extra:
            base[g] += 1
        full = [g for g in active if base[g] > capacities[g]]
        if not full:
            for g in active:
                quotas[g] = base[g]
            break
        for g in full:
            quotas[g] = capacities[g]
            left -= capacities[g]
            active.remove(g)
    return quotas


def select(keys: np.ndarray, ids: np.ndarray, n_tokens: np.ndarray, budget: Budget, temperature: float = 0.0,
           seed: int = 0, groups: Optional[np.ndarray] = None, shares: Optional[list[Fraction]] = None) -> np.ndarray:
    """Positions of the kept instances, ascending: the best-ranked (or, above temperature 0, sampled) instances
    until `budget` is met; with `groups` (one code 0..G-1 per instance), the budget is first apportioned
    among the groups by `shares` (see `apportion`) and met inside each group."""
    order = ranking(sampling_keys(keys, ids, temperature, seed), ids)
    n_tokens = np.asarray(n_tokens, dtype=np.int64)
    if groups is None:
        return np.sort(take_budget(order, n_tokens, budget.unit, budget.count))
    sizes = np.bincount(groups, weights=n_tokens if budget.unit == "tokens" else None, minlength=len(shares))
    quotas = apportion(budget.count, shares, [int(round(v)) for v in sizes])
    by_group = order[np.argsort(groups[order], kind="stable")]  # each group's ranking, groups one after another
    starts = np.concatenate([[0], np.cumsum(np.bincount(groups, minlength=len(shares)))])
    kept = [take_budget(by_group[starts[g]:starts[g + 1]], n_tokens, budget.unit, quotas[g]) for g in range(len(shares))]
    return np.sort(np.concatenate(kept)) if kept else order[:0]


def balance_shares(balance: str, labels: list[str], sizes: np.ndarray) -> list[Fraction]:
    """Each group's share of the budget: `proportional` to `sizes` (instances or tokens), `equal`, or read from a
    YAML file {group: share} (shares >= 0 summing to 1; every group named, no other)."""
    if balance == "proportional":
        return [Fraction(int(v), int(sizes.sum())) for v in sizes]
    if balance == "equal":
        return [Fraction(1, len(labels))] * len(labels)
    where = f"balance file {balance!r}"
    try:
        given = yaml.safe_load(Path(balance).read_text(encoding="utf-8"))
    except OSError as e:
        raise RefineError(f"cannot read {where} ({e.strerror}); give a YAML file of group: share") from None
    except UnicodeDecodeError:
        raise RefineError(f"{where} is not UTF-8 text; give a YAML file of group: share") from None
    except yaml.YAMLError as e:
        raise RefineError(f"{where} is not valid YAML ({str(e).splitlines()[0]}); write one group: share per line") from None
    if not isinstance(given, dict):
        raise RefineError(f"{where} is not a mapping; write one group: share per line")
    shares = {str(k): v for k, v in given.items()}
    bad = next((k for k, v in shares.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0
                or math.isinf(v)), None)
    if bad is not None:
        raise RefineError(f"{where} gives group {bad!r} the share {shares[bad]!r}; give a number >= 0")
    unknown = sorted(set(shares) - set(labels))
    if unknown:
        raise RefineError(f"{where} names group {unknown[0]!r}, which the corpus lacks; use the groups: {', '.join(labels)}")
    missing = [g for g in labels if g not in shares]
    if missing:
        raise RefineError(f"{where} gives no share to group {missing[0]!r}; give every group a share (0 to drop it)")
    if abs(sum(shares.values()) - 1) > 1e-6:
        raise RefineError(f"{where}'s shares sum to {sum(shares.values()):g}, not 1; make them sum to 1")
    exact = [Fraction(str(shares[g])) for g in labels]  # as written: 0.7 is 7/10, not the float nearest to it
    return [s / sum(exact) for s in exact]  # sums to exactly 1, so the quotas add up to the budget


def selection_keys(scores: pa.Table, method: str, seed: int) -> np.ndarray:
    """Per-instance key where larger means "keep" for each selection method."""
    if method == "difference":
        return scores.column("score").to_numpy()
    if method in ("teacher", "reference"):  # lowest NLL per token (the reference's own tokens when it has them)
        teacher_nll, ref_nll = diagnostics.per_token_nlls(scores)
        return -(teacher_nll if method == "teacher" else ref_nll)
    return np.random.default_rng(seed).random(scores.num_rows)


def group_codes(ds, id_column: Optional[str], group_column: str, score_ids: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Each score row's group (a code into the sorted labels; a null value is the group "None") and the labels.

    Only the id and group columns are read, a batch at a time; what is kept is one small integer per instance
    and one string per distinct group. The scores' ids are hashed once, so each batch is matched in time
    proportional to its own length; row-index ids are matched the same way, so the corpus's row count (which a
    streamed jsonl corpus does not know before a pass) is never needed.
    """
    codes = np.full(len(score_ids), -1, dtype=np.int64)
    labels: dict[str, int] = {}
    position_of_id = pd.Index(score_ids)
    first = 0
    for batch in corpus.iter_column_batches(ds, [c for c in (group_column, id_column) if c], BATCH_ROWS):
        values = pc.fill_null(batch.column(group_column).cast(pa.string()), "None").dictionary_encode()
        local = np.array([labels.setdefault(v, len(labels)) for v in values.dictionary.to_pylist()], dtype=np.int64)
        row_codes = local[values.indices.to_numpy(zero_copy_only=False)]
        if id_column is None:  # ids are row indices
            positions = position_of_id.get_indexer(np.arange(first, first + batch.num_rows))
        else:
            positions = position_of_id.get_indexer(batch.column(id_column).to_numpy(zero_copy_only=False))
        scored = positions >= 0  # blank documents were not scored
        codes[positions[scored]] = row_codes[scored]
        first += batch.num_rows
    if (codes < 0).any():
        raise RefineError(f"{int((codes < 0).sum())} scored instances are missing from the corpus; give the corpus the "
                          "scores were made from, or rescore")
    names = sorted(labels)
    rank = np.empty(len(names), dtype=np.int64)
    rank[[labels[n] for n in names]] = np.arange(len(names))
    return rank[codes], names


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
    chunks = score_manifest["settings"]["unit"] == "chunk"
    # Opened (and checked against the scores' manifest) once, before any output; chunks carry their own text.
    documents = None if chunks else open_scored_corpus(source, data_spec)
    groups = read_groups(cfg, scores, score_manifest, source, documents) if cfg.group_column else None
    kept, keys, selection = choose(cfg, scores, cfg.method, groups)  # numbers only: a bad budget stops before any output
    with claim(cfg.output, "sample", [cfg.scores, source], cfg.overwrite, staged=True) as claimed:
        kept_scores = scores.take(kept)
        if chunks and cfg.data is not None:
            open_scored_corpus(cfg.data, data_spec)
        score_paths = parquet_files(scores_dir, score_manifest)
        split = engine.uses_executor(cfg)  # the corpus pass as datatrove tasks
        if split:
            work = run_tasks(cfg, score_manifest, source, documents, score_paths, kept, kept_scores)
            write_data = adopt_parts(work, cfg.tasks)
        else:
            batches = (kept_chunks(score_paths, kept) if chunks
                       else kept_documents(documents, data_spec["id_column"], kept_scores))
            write_data = functools.partial(write_shards, batches, cfg.shard_size_mb * 2**20)

        sharp = cfg.method != "random" and cfg.temperature == 0 and groups is None  # one score cut separates kept from dropped
        manifest = {
            "stage": "sample",
            **run_info(),
            "method": cfg.method,
            **selection,
            "threshold": float(np.min(keys[kept])) if sharp and len(kept) else None,
            "instances_before": scores.num_rows,
            "instances_after": kept_scores.num_rows,
            "tokens_before": int(pc_sum(scores, "n_tokens")),
            "tokens_after": int(pc_sum(kept_scores, "n_tokens")),
            "score_stats": _stats(scores.column("score").to_numpy()),
            # Whether the reference changed this selection (for another method: the difference selection of the same
            # budget, temperature and balance).
            "reference_diagnostics": diagnostics.table_diagnostics(
                scores, selection["alpha"], kept if cfg.method == "difference" else choose(cfg, scores, "difference", groups)[0],
                diagnostics.reference_vocab_size(score_manifest)),
            "executor": cfg.executor if split else None,
            "tasks": cfg.tasks if split else None,
            "scores": score_manifest,
        }
        sealed = _write_dataset(claimed, write_data, manifest)
        if split:
            shutil.rmtree(work, ignore_errors=True)  # the parts are in the dataset now (hard links, or copies)
        return sealed


def read_groups(cfg, scores: pa.Table, score_manifest: dict, source: str, ds=None) -> tuple[np.ndarray, list[str]]:
    """The group of every score row under --group-column (codes and sorted labels), checked before any output.
    `ds`: the corpus at `source`, when the caller has opened it already (`refine report`)."""
    if score_manifest["settings"]["unit"] == "chunk":
        raise RefineError("--group-column needs document-level scores; chunks mix documents of several groups")
    ds = ds if ds is not None else open_scored_corpus(source, score_manifest["data"])
    if cfg.group_column not in ds.column_names:
        raise RefineError(f"corpus has no column {cfg.group_column!r}; pass --group-column with one of: "
                          f"{', '.join(ds.column_names)}")
    return group_codes(ds, score_manifest["data"]["id_column"], cfg.group_column,
                       scores.column("id").to_numpy(zero_copy_only=False))


def choose(cfg, scores: pa.Table, method: str, groups: Optional[tuple[np.ndarray, list[str]]],
           balance_default: Optional[str] = "proportional") -> tuple[np.ndarray, np.ndarray, dict]:
    """The kept positions by `method` under the budget, temperature and balance of `cfg`, the method's keys, and the
    record of how they were chosen (for the manifest: every setting and, per group, the counts before and after)."""
    keys = selection_keys(scores, method, cfg.seed)
    n_tokens = scores.column("n_tokens").to_numpy().astype(np.int64)
    ids = scores.column("id").to_numpy(zero_copy_only=False)
    budget = budget_of(cfg, n_tokens)
    balance = (cfg.balance or balance_default) if groups is not None else None
    codes, labels = groups if balance else (None, None)
    shares = None
    if balance:
        unit_sizes = np.bincount(codes, weights=n_tokens if budget.unit == "tokens" else None, minlength=len(labels))
        shares = balance_shares(balance, labels, unit_sizes.round().astype(np.int64))
    kept = select(keys, ids, n_tokens, budget, cfg.temperature, cfg.seed, codes, shares)
    record = {
        "alpha": (0.5 if cfg.alpha is None else cfg.alpha) if budget.unit == "instances" else None,
        "token_budget": budget.count if budget.unit == "tokens" else None,
        "token_fraction": cfg.token_fraction,
        "temperature": cfg.temperature,
        "seed": cfg.seed if method == "random" or cfg.temperature > 0 else None,
        "group_column": cfg.group_column if balance else None,
        "balance": balance,
    }
    if balance:
        kept_mask = np.zeros(len(ids), dtype=bool)
        kept_mask[kept] = True
        count = lambda weights=None: np.bincount(codes, weights=weights, minlength=len(labels))
        per_group = zip(labels, shares, count(), count(kept_mask), count(n_tokens), count(np.where(kept_mask, n_tokens, 0)))
        record["groups"] = {label: {"share": float(share), "instances_before": int(a), "instances_after": int(b),
                                    "tokens_before": int(c), "tokens_after": int(d)}
                            for label, share, a, b, c, d in per_group}
    return kept, keys, record


def pc_sum(table: pa.Table, column: str) -> float:
    return float(table.column(column).to_numpy().sum()) if table.num_rows else 0.0


def _stats(values: np.ndarray) -> dict:
    quantiles = np.quantile(values, [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
    return {"mean": float(values.mean()), "std": float(values.std()),
            **{f"q{int(q * 100):02d}": float(v) for q, v in zip([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0], quantiles)}}


def open_scored_corpus(source: str, data_spec: dict, scan: Optional[dict] = None):
    """The corpus at `source`, refused unless it is the one the scores' manifest (`data_spec`) describes.

    Its fingerprint is recomputed the way the recorded one was made (see `corpus.corpus_fingerprint`), so
    by default no row is read here. The text was checked (UTF-8, columns) when it was scored. A remote URL is
    read as a stream (`corpus.StreamedCorpus`): its files' versions pin its rows, which are counted only as they
    are read (or come from `scan`, the record of a pass the driver made).
    """
    ds = corpus.open_corpus(source, data_spec["split"], data_spec["name"], scan)
    streamed = isinstance(ds, corpus.StreamedCorpus)
    fix = "give the corpus the scores were made from, or rescore"
    missing = [c for c in (data_spec["text_column"], data_spec["id_column"]) if c and c not in ds.column_names]
    if missing:
        raise RefineError(f"corpus {source!r} has no column {missing[0]!r}, which was scored; {fix}")
    if not streamed and len(ds) != data_spec["n_rows"]:
        raise RefineError(f"corpus {source!r} has {len(ds)} rows but was scored with {data_spec['n_rows']}; {fix}")
    kind = corpus.fingerprint_kind(data_spec["fingerprint"])
    files = corpus.read_files(ds, source, data_spec["split"], data_spec["name"]) if kind == "files" else None
    fingerprint = corpus.corpus_fingerprint(ds, data_spec["text_column"], data_spec["id_column"], files,
                                            full=kind == "content")
    if fingerprint.removeprefix("content:") != data_spec["fingerprint"].removeprefix("content:"):
        what = {"content": "its ids or texts differ", "files": "its files' names, sizes or modification times differ",
                "info": "its revision or dataset info differs",
                "remote": "its files' URLs, sizes or versions (ETags) differ, or it is not the remote corpus scored"}[kind]
        raise RefineError(f"corpus {source!r} differs from the one that was scored ({kind} fingerprint mismatch: "
                          f"{what}); {fix}")
    return ds


def kept_rows(first: int, n_rows: int, kept_sorted: np.ndarray) -> tuple[np.ndarray, int]:
    """Positions inside rows [first, first + n_rows) of the sorted global positions `kept_sorted`, and where they start in it."""
    lo, hi = np.searchsorted(kept_sorted, [first, first + n_rows])
    return kept_sorted[lo:hi] - first, int(lo)


def kept_chunks(paths: list[Path], kept: np.ndarray, first: int = 0, last: Optional[int] = None):
    """The kept chunk rows (every score column, text and token ids included) among score rows [first, last), in
    score order, a batch at a time; of a score file before that range only the footer is read (its row count), of
    one after it nothing."""
    last = math.inf if last is None else last
    kept = kept[(kept >= first) & (kept < last)]
    offset = 0  # the score row each file (then each batch) starts at
    for path in paths:
        if offset >= last:
            break
        with pq.ParquetFile(path) as scores:
            if offset + scores.metadata.num_rows <= first:
                offset += scores.metadata.num_rows
                continue
            for batch in scores.iter_batches(batch_size=BATCH_ROWS):
                local, _ = kept_rows(offset, batch.num_rows, kept)
                offset += batch.num_rows
                yield pa.Table.from_batches([batch.take(pa.array(local, type=pa.int64()))]).replace_schema_metadata(None)
                if offset >= last:
                    break


def kept_documents(ds, id_column: Optional[str], kept_scores: pa.Table, first: int = 0, last: Optional[int] = None):
    """Original rows of the kept documents among corpus rows [first, last) (default: all), in corpus order, with the
    score columns beside them, a batch at a time.

    Only the kept scores are held (O(kept) numbers); the corpus is read once, in order.
    """
    if id_column is None:  # ids are row indices
        order = np.argsort(kept_scores.column("id").to_numpy(), kind="stable")
        kept_scores = kept_scores.take(order)
        kept_sorted = kept_scores.column("id").to_numpy()
    else:  # the kept ids hashed once (pc.index_in would hash the whole kept set again for every batch)
        position_of_kept = pd.Index(kept_scores.column("id").to_numpy(zero_copy_only=False))
    whole = first == 0 and last is None
    batches = corpus.iter_arrow_batches(ds, BATCH_ROWS) if whole else corpus.iter_row_range(ds, first, last, BATCH_ROWS)
    for batch in batches:
        table = pa.Table.from_batches([batch])
        if id_column is None:
            local, start = kept_rows(first, batch.num_rows, kept_sorted)
            aligned = kept_scores.slice(start, len(local))
        else:  # the score row of each corpus row, found by id: -1 where the row was not kept
            where = position_of_kept.get_indexer(table.column(id_column).to_numpy(zero_copy_only=False))
            local = np.flatnonzero(where >= 0)
            aligned = kept_scores.take(pa.array(where[local], type=pa.int64()))
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
    (inside the staging directory, which is renamed into place as a whole afterwards). A batch whose column
    types differ from the open shard's (a column null in every row of the first batches of a streamed jsonl,
    say) starts a new shard, and `close` casts every shard to one schema, so `load_dataset` reads them together.
    """

    def __init__(self, directory: Path, stem: str, shard_bytes: int):
        self.directory, self.stem, self.shard_bytes = directory, stem, shard_bytes
        self.written: list[Path] = []
        self.writer, self.bytes_in_shard, self.schema = None, 0, None

    def write(self, table: pa.Table) -> None:
        self.schema = self.schema or table.schema
        if table.num_rows == 0:
            return
        if self.writer is not None and not self.writer.schema.equals(table.schema, check_metadata=False):
            self.writer.close()
            self.writer = None
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
        final = [part.with_name(f"{self.stem}-{k:05d}-of-{len(self.written):05d}.parquet")
                 for k, part in enumerate(self.written)]
        place_shards(self.written, final, os.replace)
        for part in self.written:
            part.unlink(missing_ok=True)  # a shard written cast leaves its part behind
        return final


def place_shards(sources: list[Path], targets: list[Path], place) -> None:
    """Put each Parquet shard at its target with `place(source, target)` (a rename, a link), or, where its column
    types differ from the others' (a column null in every row of one shard), write it cast to the schema they can
    all take, so `load_dataset` reads them together."""
    schemas = [pq.read_schema(source) for source in sources]
    schema = common_schema(schemas)
    for source, target, own in zip(sources, targets, schemas):
        if own.equals(schema, check_metadata=False):
            place(source, target)
        else:
            write_parquet(target, cast_to(pq.read_table(source), schema))


def cast_to(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with the columns of `schema`, in its order and types; a column the table lacks is all null."""
    columns = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
               for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def common_schema(schemas: list[pa.Schema]) -> pa.Schema:
    """The one schema that shards of these schemas can all be cast to: a column null in some takes the type it
    has in the others, integers widen to floats where both occur."""
    try:
        return pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise RefineError(f"a column of the kept rows changes type within the corpus ({str(e).splitlines()[0]}); "
                          "give the corpus one type per column") from None


def write_shards(batches, shard_bytes: int, data_dir: Path, stem: str) -> tuple[list[Path], int]:
    """Write the kept rows (`batches` of them, in order) into shards `<stem>-<k>-of-<n>.parquet`; (paths, rows)."""
    shards = ShardWriter(data_dir, stem, shard_bytes)
    written = 0
    for table in batches:
        shards.write(table)
        written += table.num_rows
    return shards.close(), written


def _write_dataset(claimed: Claim, write_data, manifest: dict) -> dict:
    """Build the whole directory beside the output, then rename it into place: complete or absent.
    `write_data(data_dir, stem)` puts the kept rows into data_dir as shards `<stem>-*.parquet`: (paths, rows)."""
    staging = claimed.staging_dir()
    try:
        tag = content_tag(manifest)
        (staging / DATA_DIR).mkdir()
        try:
            paths, written = write_data(staging / DATA_DIR, f"train-{tag}")
            files = [p.relative_to(staging).as_posix() for p in paths]
        except OSError as e:
            raise write_fault(e, staging) from None
        if written != manifest["instances_after"]:  # a corpus whose fingerprint could not tell it had changed
            raise RefineError(f"the corpus holds {written} of the {manifest['instances_after']} kept instances; give the "
                              "corpus the scores were made from, or rescore")
        write_text(staging / "README.md", refined_card(manifest, f"{DATA_DIR}/train-{tag}-*.parquet"))
        sealed = write_manifest(staging, manifest, [*files, "README.md"])
        claimed.commit(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return sealed


# ---------------------------------------------------------------- the corpus pass as datatrove tasks
# The driver writes what the tasks need into a work folder in the logging dir (PLAN, last, and KEPT: the kept
# score rows); task t writes the kept rows of the t-th of N equal row ranges as part files and then, atomically,
# its record TASK_RECORD (the parts and their row counts). A task whose record and parts exist is done; the
# driver links the parts, in task order, into the dataset it builds beside the output.
PLAN = "plan.json"
KEPT = "kept.parquet"
TASK_RECORD = "task-{:05d}.json"


def task_rows(n_rows: int, task: int, n_tasks: int) -> tuple[int, int]:
    """Rows [first, last) that task `task` of `n_tasks` writes: equal contiguous ranges, in order."""
    return task * n_rows // n_tasks, (task + 1) * n_rows // n_tasks


def run_tasks(cfg: SampleConfig, score_manifest: dict, source: str, documents, score_paths: list[Path],
              kept: np.ndarray, kept_scores: pa.Table) -> Path:
    """Write the kept rows through `cfg.tasks` datatrove tasks on `cfg.executor`; the work folder holding every
    task's parts once all are done. A rerun with the same selection finds the folder and runs only unfinished tasks."""
    spec = score_manifest["data"]
    if isinstance(documents, corpus.StreamedCorpus) and documents.rows_per_file is None:
        documents.scan(spec["text_column"], spec["id_column"])  # a jsonl/csv URL's row count takes one pass
    plan = {
        "stage": "sample",
        "refine_version": __version__,
        "output": str(Path(cfg.output).expanduser().absolute()),
        "source": source,
        "data": spec,
        "chunks": documents is None,
        "score_files": [str(p.absolute()) for p in score_paths],
        "n_rows": score_manifest["n_instances"] if documents is None else len(documents),
        "scan": documents.scan_record() if isinstance(documents, corpus.StreamedCorpus) else None,
        "shard_bytes": cfg.shard_size_mb * 2**20,
        "scores_checksum": score_manifest.get("checksum"),
        "kept_sha256": hashlib.sha256(np.ascontiguousarray(kept, dtype=np.int64).tobytes()).hexdigest(),
    }
    logging_dir = engine.logging_dir_for(cfg.output, cfg.logging_dir, cfg.tasks, [cfg.scores, source])
    work = logging_dir / f"sample-{content_tag(plan)}"
    remove_other_work(logging_dir.parent, plan["output"], keep=work)
    if not (work / PLAN).exists():  # the kept rows first, the plan last: a folder with a plan is complete
        write_parquet(work / KEPT, kept_scores.append_column("position", pa.array(kept, type=pa.int64())))
        write_json(work / PLAN, plan)
    engine.forget_completions(logging_dir, [t for t in range(cfg.tasks) if not task_done(work, t)])
    engine.run_tasks(cfg, functools.partial(sample_task, work_dir=str(work)), logging_dir, job_name="refine-sample",
                     progress=engine.FilesPresent(work, [TASK_RECORD.format(t) for t in range(cfg.tasks)], "task",
                                                   "sampling"))
    unfinished = [t for t in range(cfg.tasks) if not task_done(work, t)]
    if unfinished:  # datatrove recorded them as done, but their parts are gone
        raise RefineError(f"tasks {', '.join(map(str, unfinished[:10]))} of {cfg.tasks} left no parts in {str(work)!r}; "
                          "rerun the same command to run them again")
    written = sum(sum(json.loads((work / TASK_RECORD.format(t)).read_text())["rows"]) for t in range(cfg.tasks))
    if written != len(kept):  # the parts would be found again by a rerun: discard them, the corpus is not the one scored
        shutil.rmtree(work, ignore_errors=True)
        raise RefineError(f"the corpus holds {written} of the {len(kept)} kept instances; give the corpus the scores "
                          "were made from, or rescore")
    return work


def remove_other_work(root: Path, output: str, keep: Path) -> None:
    """Work folders of earlier multi-task samples into the same output (other settings, or killed before they
    could clean up): refine's own, known by their plan, and of no use once this run owns the output."""
    for folder in root.glob("*-tasks/sample-*"):
        if folder != keep and folder.is_dir():
            try:
                plan = json.loads((folder / PLAN).read_text())
            except (OSError, ValueError):
                continue  # not a finished set-up of refine's: leave it
            if plan.get("stage") == "sample" and plan.get("output") == output:
                shutil.rmtree(folder, ignore_errors=True)


def task_done(work: Path, task: int) -> bool:
    """Whether task `task` wrote its record (atomically, after its parts) and every part it lists is there."""
    try:
        files = json.loads((work / TASK_RECORD.format(task)).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all((work / name).exists() for name in files)


def sample_task(task: int, n_tasks: int, work_dir: str) -> None:
    """Task `task` of `n_tasks`: write the kept rows of its range of rows as part files, then its record.

    The one corpus pass of a multi-task sample. It opens the corpus as the driver did and checks it against the
    scores' manifest again (a local corpus through datasets' cache: on a node that does not share the driver's
    cache, datasets builds it there first), then reads only its range (a streamed corpus: the files or row groups
    that hold it, a jsonl file from the scanned offset before it, a csv or compressed file from its start) and
    holds the kept score rows of its range (with an id column: all kept score rows). Its parts and record go
    into the work folder.
    """
    work = Path(work_dir)
    if task_done(work, task):
        return
    plan = json.loads((work / PLAN).read_text())
    for stale in work.glob(f"part-{task:05d}-*"):  # parts of an attempt that was killed before its record
        stale.unlink()
    first, last = task_rows(plan["n_rows"], task, n_tasks)
    # Only the kept rows of this range, where the scores say which they are: a chunk's position, a document's row
    # index as its id. Ids from a column may be anywhere, so then every kept row is read.
    by = "position" if plan["chunks"] else ("id" if plan["data"]["id_column"] is None else None)
    kept = pq.read_table(work / KEPT, filters=[(by, ">=", first), (by, "<", last)] if by else None)
    if plan["chunks"]:
        batches = kept_chunks([Path(p) for p in plan["score_files"]], kept.column("position").to_numpy(), first, last)
    else:
        ds = open_scored_corpus(plan["source"], plan["data"], plan["scan"])
        batches = kept_documents(ds, plan["data"]["id_column"], kept.drop_columns(["position"]), first, last)
    try:
        paths, _ = write_shards(batches, plan["shard_bytes"], work, f"part-{task:05d}")
    except OSError as e:
        raise write_fault(e, work) from None
    write_json(work / TASK_RECORD.format(task), {"files": [p.name for p in paths],
                                                 "rows": [pq.read_metadata(p).num_rows for p in paths]})


def adopt_parts(work: Path, n_tasks: int):
    """`write_data` for `_write_dataset`: the tasks' parts, in task order, as the dataset's shards (hard links where
    the work folder and the output share a filesystem, else copies). Empty parts are left out unless all are."""

    def write(data_dir: Path, stem: str) -> tuple[list[Path], int]:
        parts = []
        for task in range(n_tasks):
            record = json.loads((work / TASK_RECORD.format(task)).read_text())
            parts += zip(record["files"], record["rows"])
        shards = [work / name for name, rows in parts if rows] or [work / parts[0][0]]  # an empty dataset: one (its columns)
        paths = [data_dir / f"{stem}-{k:05d}-of-{len(shards):05d}.parquet" for k in range(len(shards))]
        place_shards(shards, paths, _link_or_copy)
        return paths, sum(rows for _, rows in parts)

    return write


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem
        shutil.copyfile(source, target)
