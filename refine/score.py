"""`refine score`: teacher and reference read the same tokens; each instance gets log p_T - log p_R per token.

Conventions (also in docs/pipeline.md):
- unit=document: the tokenizer's BOS (or EOS where it has no BOS) is put before the document as
  context and is not scored; no EOS is appended. `n_tokens` is the number of document tokens, every
  one of them predicted once. A document longer than `max_length` is cut into windows that overlap by
  one token (the last token of a window is the context of the next), so no token is lost or counted twice.
- unit=chunk: documents are joined with EOS after each and cut into `max_length`-token chunks (MiniPLM);
  the first token of a chunk is context, so `n_tokens = len(chunk) - 1`. Chunks do not cross shards.
- `teacher_logprob`, `ref_logprob`: natural-log sums over the predicted tokens.
  `score = (teacher_logprob - ref_logprob) / n_tokens`.
"""

from __future__ import annotations

import functools
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from refine import data as corpus
from refine import diagnostics, engine, models
from refine.card import scores_card
from refine.config import ScoreConfig, result_settings
from refine.distributed import World, joined_world, rank_device
from refine.errors import RefineError
from refine.logprobs import TokenBudget, score_sequences, sum_by_document, windows_of
from refine.output import (DATA_DIR, claim, content_tag, remove_temp_files, run_info, write_json, write_manifest,
                           write_parquet, write_text)

UNITS = ("document", "chunk")
NORMALIZATIONS = ("tokens", "bytes")


def validate(cfg: ScoreConfig) -> None:
    cfg.check()  # every field and cross-field check is declared in refine.config


def corpus_chunks(documents: list[list[int]], eos_id: int, max_length: int) -> list[list[int]]:
    """Join documents with EOS after each and cut the stream into `max_length` chunks (last one shorter)."""
    stream = [t for doc in documents for t in (*doc, eos_id)]
    chunks = [stream[s : s + max_length] for s in range(0, len(stream), max_length)]
    return [c for c in chunks if len(c) >= 2]


class TextProgress:
    """One bar for the whole run, measured in bytes of text, so its total (and the ETA) is known before anything
    is tokenized; scored tokens advance it at the byte/token ratio of the shard in hand."""

    def __init__(self, bar):
        self.bar, self.shard_bytes, self.done, self.bytes_per_token = bar, 0, 0.0, 0.0

    def start_shard(self, n_bytes: int) -> None:
        self.shard_bytes, self.done = n_bytes, 0.0

    def expect(self, n_tokens: int) -> None:
        self.bytes_per_token = self.shard_bytes / max(n_tokens, 1)

    def update(self, n_tokens: int) -> None:
        step = min(n_tokens * self.bytes_per_token, self.shard_bytes - self.done)
        self.done += step
        self.bar.update(step)

    def finish_shard(self) -> None:
        self.bar.update(self.shard_bytes - self.done)

    def close(self) -> None:
        self.bar.close()


def _text_bytes(ds, text_column: str, ranges) -> Optional[int]:
    """UTF-8 bytes of the text in these row ranges, from Arrow's offsets (no text is decoded); None for a streamed
    corpus, whose text is read only shard by shard."""
    if isinstance(ds, corpus.StreamedCorpus):
        return None
    table = ds.select_columns([text_column]).with_format("arrow")
    return sum(int(pc.sum(pc.binary_length(table[first:last][text_column])).as_py() or 0) for first, last in ranges)


def score_table(ids, n_tokens, teacher_lp, ref_lp, id_type: pa.DataType, extra: dict | None = None,
                per=None) -> pa.Table:
    """The scores table; the score is per token (the teacher's `n_tokens`) unless `per` gives other counts (bytes)."""
    n_tokens = np.asarray(n_tokens, dtype=np.int64)
    divisor = np.maximum(np.asarray(per if per is not None else n_tokens, dtype=np.int64), 1)
    columns = {
        "id": pa.array(ids, type=id_type),
        "n_tokens": pa.array(n_tokens),
        "teacher_logprob": pa.array(teacher_lp, type=pa.float64()),
        "ref_logprob": pa.array(ref_lp, type=pa.float64()),
        "score": pa.array((np.asarray(teacher_lp) - np.asarray(ref_lp)) / divisor, type=pa.float64()),
    }
    columns.update(extra or {})
    # The token total rides in the file's metadata so the manifest needs no read of the columns.
    return pa.table(columns).replace_schema_metadata({"refine_n_tokens": str(int(n_tokens.sum()))})


def score(cfg: ScoreConfig) -> dict:
    """Score every instance of `cfg.data`; write Parquet shards and, last, manifest.json. Returns the manifest.

    Under torchrun each rank scores its own shards (round-robin) and rank 0 writes the manifest. With
    --tasks N or --executor slurm/ray the shards are dealt to N independent tasks that datatrove runs
    (refine.engine); this process claims the output, waits for the tasks and writes the manifest.
    """
    validate(cfg)
    if cfg.proxy_fraction is not None:  # proxy scoring is built on top of this stage, in refine.proxy
        raise RefineError("score() scores every document; call refine.proxy.proxy_score for --proxy-fraction")
    with joined_world(cfg.device) as world:
        if world.world_size > 1 and engine.uses_executor(cfg):
            raise RefineError("torchrun and --tasks/--executor both split the work; run without torchrun, or drop --tasks/--executor")
        setup = _prepare_on_every_rank(cfg, world)
        inputs = [cfg.data, cfg.teacher, cfg.reference]
        with world.holding(lambda: claim(cfg.output, "score", inputs, cfg.overwrite, setup.run)):
            if engine.uses_executor(cfg):
                identities = _run_tasks(cfg, setup)
            else:
                done = score_task(cfg, world.rank, world.world_size, setup, world, show_progress=world.is_main)
                world.barrier()
                if not world.is_main:
                    return {"rank": world.rank, "shards_scored": done["shards_scored"]}
                identities = done["models"]
            return finish(cfg, setup, identities, n_processes=cfg.tasks if engine.uses_executor(cfg) else world.world_size)


@dataclass
class ScoreSetup:
    """What every task and the driver prepare before any model loads: the corpus, tokenizers and the run's identity."""

    started: float
    ds: Any  # a datasets.Dataset, or a data.StreamedCorpus for a remote URL
    ids: Optional[list]  # None: a task of a streamed corpus reads each shard's ids with its rows
    id_type: pa.DataType
    n_blank: int
    run: dict
    tokenizer: Any
    ref_tokenizer: Any  # None when the reference reads the teacher's tokens
    start_id: int
    ref_start_id: int
    scan: Optional[dict] = None  # a streamed corpus's row counts, so tasks need not read it all again

    @property
    def tag(self) -> str:
        return content_tag(self.run)


def prepare(cfg: ScoreConfig, scan: Optional[dict] = None) -> ScoreSetup:
    """Read the corpus and tokenizers and define the run (what `claim` compares a resumed output by). No model loads.

    A remote corpus is streamed: checking it reads it once (rows, blanks, ids), unless `scan` brings what the
    driver's pass found.
    """
    started = time.time()
    ds = corpus.open_corpus(cfg.data, cfg.split, cfg.name, scan)
    corpus.check_columns(ds, cfg.text_column, cfg.id_column, cfg.data)
    ids = corpus.document_ids(ds, cfg.id_column)
    id_type = pa.string() if cfg.unit == "chunk" else corpus.id_type(ds, ids, cfg.id_column)
    fingerprint = corpus.corpus_fingerprint(ds, cfg.text_column, cfg.id_column, corpus.read_files(ds, cfg.data, cfg.split, cfg.name), cfg.full_fingerprint)
    n_rows, n_blank = len(ds), corpus.count_blank(ds, cfg.text_column)
    if n_blank == n_rows:
        raise RefineError(f"all {n_rows} documents of {cfg.data!r} are empty or whitespace-only; give a corpus with text")
    models.check_distinct(cfg.teacher, cfg.teacher_revision, cfg.reference, cfg.reference_revision)

    tokenizer = models.load_tokenizer(cfg.teacher, cfg.teacher_revision, cfg.trust_remote_code)
    ref_tokenizer = models.load_tokenizer(cfg.reference, cfg.reference_revision, cfg.trust_remote_code)
    same_tokenizer = models.tokenizer_fingerprint(tokenizer) == models.tokenizer_fingerprint(ref_tokenizer)
    normalize = cfg.normalize or ("tokens" if same_tokenizer else "bytes")
    if not same_tokenizer and normalize == "tokens":
        raise RefineError(
            f"teacher {cfg.teacher!r} and reference {cfg.reference!r} tokenize differently, so a per-token score is "
            "undefined; use --normalize bytes, or train the reference with the teacher's tokenizer"
        )
    if not same_tokenizer and cfg.unit == "chunk":
        raise RefineError("chunks are cut from the teacher's tokens, which the reference cannot read; use --unit document")
    start_id = models.start_token_id(tokenizer, cfg.teacher)
    ref_start_id = start_id if same_tokenizer else models.start_token_id(ref_tokenizer, cfg.reference)
    run = {
        "settings": result_settings(cfg),  # device, process count and batch budget do not change the scores
        "data_fingerprint": fingerprint,
        "teacher": models.model_identity(cfg.teacher, None, cfg.teacher_revision),
        "reference": models.model_identity(cfg.reference, None, cfg.reference_revision),
        "tokenizer": {"fingerprint": models.tokenizer_fingerprint(tokenizer), "vocab_size": len(tokenizer),
                      "start_token_id": start_id, "eos_token_id": tokenizer.eos_token_id},
        "normalize": normalize,
    }
    if not same_tokenizer:
        run["reference_tokenizer"] = {"fingerprint": models.tokenizer_fingerprint(ref_tokenizer),
                                      "vocab_size": len(ref_tokenizer), "start_token_id": ref_start_id}
    return ScoreSetup(started, ds, ids, id_type, n_blank, run, tokenizer, None if same_tokenizer else ref_tokenizer,
                      start_id, ref_start_id, ds.scan_record() if isinstance(ds, corpus.StreamedCorpus) else None)


def _prepare_on_every_rank(cfg: ScoreConfig, world: World) -> ScoreSetup:
    """Each rank's setup. A streamed corpus is read through once, by rank 0; the other ranks open it from its record."""
    if world.world_size == 1 or not corpus.is_remote(cfg.data):
        return prepare(cfg)
    setup = world.on_main(lambda: prepare(cfg))
    scan = world.share(setup.scan if setup is not None else None)
    return setup if setup is not None else prepare(cfg, scan)


def shard_ranges(n_rows: int, shard_size: int) -> list[tuple[int, int, int]]:
    """(index, first row, last row + 1) of each shard; shards are the same whatever the task count."""
    return [(k, first, min(first + shard_size, n_rows)) for k, first in enumerate(range(0, n_rows, shard_size))]


def shard_path(output: Path, tag: str, first: int, last: int) -> Path:
    return output / DATA_DIR / f"scores-{tag}-{first:012d}-{last:012d}.parquet"


def task_of(shard_index: int, n_tasks: int) -> int:
    """Shards are dealt round-robin: task t takes shards t, t + N, t + 2N, ..."""
    return shard_index % n_tasks


# The models' identities as the first task that loaded them recorded them (in the logging dir), for the manifest.
MODELS_RECORD = "models.json"


def _run_tasks(cfg: ScoreConfig, setup: ScoreSetup) -> Optional[dict]:
    """Run the tasks whose shards are not all on disk through datatrove; the models' identities if a task recorded them."""
    logging_dir = engine.logging_dir_for(cfg.output, cfg.logging_dir, cfg.tasks, [cfg.data, cfg.teacher, cfg.reference])
    output = Path(cfg.output).expanduser().absolute()
    # The shards on disk are the truth: a task with a missing shard runs again even if datatrove marked it done
    # (e.g. after --overwrite, or a shard deleted by hand).
    unfinished = {task_of(k, cfg.tasks) for k, first, last in shard_ranges(len(setup.ds), cfg.shard_size)
                  if not shard_path(output, setup.tag, first, last).exists()}
    engine.forget_completions(logging_dir, sorted(unfinished))
    record = logging_dir / MODELS_RECORD
    shards = [shard_path(output, setup.tag, first, last).name for _, first, last in shard_ranges(len(setup.ds), cfg.shard_size)]
    engine.run_tasks(cfg, functools.partial(score_task, cfg, models_record=str(record), expected_tag=setup.tag,
                                            scan=setup.scan), logging_dir,
                     progress=engine.FilesPresent(output / DATA_DIR, shards, "shard", "scoring"))
    remove_temp_files(output)  # half-written shards of tasks that were killed and run again
    try:
        return json.loads(record.read_text())
    except (OSError, ValueError):
        return None


def _load_models(cfg: ScoreConfig, world: World):
    device = models.resolve_device(rank_device(cfg.device, world))
    dtype = models.resolve_dtype(cfg.dtype, device)
    teacher = models.load_causal_lm(cfg.teacher, cfg.teacher_revision, dtype, device, cfg.trust_remote_code)
    reference = models.load_causal_lm(cfg.reference, cfg.reference_revision, dtype, device, cfg.trust_remote_code)
    too_short = [
        f"--max-length {cfg.max_length} exceeds the {n} positions of {role} {ref!r}; lower --max-length"
        for role, ref, m in (("teacher", cfg.teacher, teacher), ("reference", cfg.reference, reference))
        if (n := models.max_positions(m.config)) is not None and cfg.max_length > n
    ]
    if too_short:
        raise RefineError(*too_short)
    if cfg.compile:
        for model in (teacher, reference):
            model.base_model.forward = torch.compile(model.base_model.forward, dynamic=True)
    return device, teacher, reference


def _model_identities(cfg: ScoreConfig, teacher, reference) -> dict:
    return {"teacher": models.model_identity(cfg.teacher, teacher, cfg.teacher_revision),
            "reference": models.model_identity(cfg.reference, reference, cfg.reference_revision)}


def score_task(cfg: ScoreConfig, task: int, n_tasks: int, setup: Optional[ScoreSetup] = None,
               world: Optional[World] = None, show_progress: bool = False, models_record: Optional[str] = None,
               expected_tag: Optional[str] = None, scan: Optional[dict] = None) -> dict:
    """Score the shards of task `task` of `n_tasks` that are not on disk yet; write each one atomically.

    The one scoring path: each torchrun rank, each datatrove task and a plain single run call it. It never
    claims the output (the driver did) and writes no manifest. The models load only if a shard is missing;
    then their identities are returned (and written to `models_record`, if given, for the driver's manifest).
    `expected_tag` is the run the driver claimed the output for; a task that finds another one stops. `scan` is
    the driver's record of a streamed corpus's rows (see `prepare`).
    """
    setup = setup or prepare(cfg, scan)
    if expected_tag is not None and setup.tag != expected_tag:
        raise RefineError(f"task {task} found another corpus, tokenizer or settings than the run it belongs to "
                          f"(was {cfg.data!r} or a model changed while it was queued?); restore them and rerun the same command")
    output = Path(cfg.output).expanduser().absolute()
    ds, ids, run, tokenizer, ref_tokenizer = setup.ds, setup.ids, setup.run, setup.tokenizer, setup.ref_tokenizer
    start_id, ref_start_id, id_type = setup.start_id, setup.ref_start_id, setup.id_type
    same_tokenizer, normalize, tag = ref_tokenizer is None, run["normalize"], setup.tag
    todo = [(k, first, last) for k, first, last in shard_ranges(len(ds), cfg.shard_size)
            if task_of(k, n_tasks) == task and not shard_path(output, tag, first, last).exists()]
    if not todo:
        return {"task": task, "shards_scored": 0, "models": None}
    device, teacher, reference = _load_models(cfg, world or World())
    identities = _model_identities(cfg, teacher, reference)
    if models_record is not None:
        write_json(Path(models_record), identities)
    budget = TokenBudget(cfg.max_tokens_per_batch, cfg.max_length, device)
    progress = TextProgress(tqdm(total=_text_bytes(ds, cfg.text_column, [(f, l) for _, f, l in todo]), unit="B",
                                 unit_scale=True, desc="scoring", dynamic_ncols=True, disable=not show_progress))

    read_ids = ids is None  # a streamed corpus's task: each shard's ids come with its rows
    columns = [cfg.text_column] + ([cfg.id_column] if read_ids else [])

    def tokenize_shard(first: int, last: int):
        shard = corpus.read_rows(ds, first, last, columns)
        texts = shard.column(cfg.text_column).to_pylist()
        shard_ids = shard.column(cfg.id_column).to_pylist() if read_ids else ids[first:last]
        rows = [i for i, text in enumerate(texts) if not corpus.is_blank(text)]
        kept = [texts[i] for i in rows]
        n_bytes = [len(t.encode("utf-8", "surrogatepass")) for t in kept]
        shard_bytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts if t is not None)
        token_ids = tokenizer(kept, add_special_tokens=False, verbose=False)["input_ids"]
        ref_ids = token_ids if same_tokenizer else ref_tokenizer(kept, add_special_tokens=False, verbose=False)["input_ids"]
        return [shard_ids[i] for i in rows], shard_bytes, (token_ids, ref_ids, n_bytes)

    # Tokenize the next shard in a thread while the models read the current one (fast tokenizers drop the GIL).
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(tokenize_shard, *todo[0][1:])
        for position, (k, first, last) in enumerate(todo):
            doc_ids, shard_bytes, (token_ids, ref_ids, n_bytes) = pending.result()
            if position + 1 < len(todo):
                pending = pool.submit(tokenize_shard, *todo[position + 1][1:])
            progress.start_shard(shard_bytes)
            if cfg.unit == "document":
                table = _score_documents(doc_ids, token_ids, start_id, teacher, reference,
                                         cfg, budget, progress, id_type, n_bytes, normalize,
                                         None if same_tokenizer else (ref_ids, ref_start_id))
            else:
                table = _score_chunks(k, token_ids, tokenizer, teacher, reference, cfg, budget, progress)
            write_parquet(shard_path(output, tag, first, last), table)
            progress.finish_shard()
    progress.close()
    return {"task": task, "shards_scored": len(todo), "models": identities}


def finish(cfg: ScoreConfig, setup: ScoreSetup, identities: Optional[dict], n_processes: int) -> dict:
    """Once every shard exists: the card and, last, the manifest. `identities` None: load the models to record them."""
    output = Path(cfg.output).expanduser().absolute()
    ds, run, tag = setup.ds, setup.run, setup.tag
    n_rows = len(ds)
    shards = shard_ranges(n_rows, cfg.shard_size)
    missing = [f"{first}-{last}" for _, first, last in shards if not shard_path(output, tag, first, last).exists()]
    if missing:
        raise RefineError(f"shards {', '.join(missing[:5])} are missing after the run; rerun the same command to finish them")
    if identities is None:  # every shard was already on disk (a rerun after a crash before the manifest)
        _, teacher, reference = _load_models(cfg, World())
        identities = _model_identities(cfg, teacher, reference)
    paths = [shard_path(output, tag, first, last) for _, first, last in shards]
    manifest = {
        "stage": "score",
        **run_info(),
        **run,
        **identities,
        "data": {
            "source": corpus.resolved_source(cfg.data),  # absolute for a local path: a rerun may start elsewhere
            "files": corpus.read_files(ds, cfg.data, cfg.split, cfg.name),  # what was read, resolved; None for the Hub
            "split": cfg.split,
            "name": cfg.name,
            "text_column": cfg.text_column,
            "id_column": cfg.id_column,
            "fingerprint": run["data_fingerprint"],
            "n_rows": n_rows,
            "n_blank_skipped": setup.n_blank,
            "license": corpus.corpus_license(ds),
        },
        "data_files": f"{DATA_DIR}/scores-{tag}-*.parquet",
        "n_instances": sum(pq.read_metadata(p).num_rows for p in paths),
        "n_tokens": sum(int(pq.read_metadata(p).metadata[b"refine_n_tokens"]) for p in paths),
        "world_size": n_processes,  # torchrun ranks, or tasks
        "executor": cfg.executor if engine.uses_executor(cfg) else ("torchrun" if n_processes > 1 else "single"),
        "elapsed_s": round(time.time() - setup.started, 1),
        "reference_diagnostics": reference_diagnostics(paths, run),
    }
    write_text(output / "README.md", scores_card(manifest, f"{DATA_DIR}/scores-{tag}-*.parquet"))
    files = [p.relative_to(output).as_posix() for p in paths] + ["README.md"]
    return write_manifest(output, manifest, files)


# The numeric columns the diagnostics read (never the text or token ids of chunks).
DIAGNOSTIC_COLUMNS = ("n_tokens", "teacher_logprob", "ref_logprob", "score", "ref_n_tokens")
DIAGNOSTIC_ALPHA = 0.5  # the fraction kept that the manifest's figures describe; `refine sample` reports its own


def reference_diagnostics(paths: list[Path], run: dict) -> dict:
    """Whether the reference changes the selection (refine.diagnostics) at alpha 0.5, from the shards' numbers."""
    present = set(pq.read_schema(paths[0]).names) if paths else set()
    columns = [c for c in DIAGNOSTIC_COLUMNS if c in present]
    scores = pa.concat_tables(pq.read_table(p, columns=columns).replace_schema_metadata(None) for p in paths)
    return diagnostics.table_diagnostics(scores, DIAGNOSTIC_ALPHA, vocab_size=diagnostics.reference_vocab_size(run))


def _score_documents(doc_ids, token_ids, start_id, teacher, reference, cfg, budget, progress, id_type, n_bytes,
                     normalize, own_reference_tokens=None) -> pa.Table:
    """Per document log-prob sums; with `own_reference_tokens` (ids, start id) the reference reads its own tokens."""
    windows, owner = windows_of(token_ids, start_id, cfg.max_length)
    if own_reference_tokens is None:
        progress.expect(sum(len(w) - 1 for w in windows))
        window_teacher, window_ref = score_sequences([teacher, reference], windows, budget, teacher.device, progress)
        ref_owner, ref_counts = owner, [len(t) for t in token_ids]
    else:
        ref_ids, ref_start = own_reference_tokens
        ref_windows, ref_owner = windows_of(ref_ids, ref_start, cfg.max_length)
        progress.expect(sum(len(w) - 1 for w in windows) + sum(len(w) - 1 for w in ref_windows))
        (window_teacher,) = score_sequences([teacher], windows, budget, teacher.device, progress)
        (window_ref,) = score_sequences([reference], ref_windows, budget, reference.device, progress)
        ref_counts = [len(t) for t in ref_ids]
    teacher_lp = sum_by_document(window_teacher, owner, len(token_ids))
    ref_lp = sum_by_document(window_ref, ref_owner, len(token_ids))
    extra = {"n_bytes": pa.array(n_bytes, type=pa.int64())}
    if own_reference_tokens is not None:
        extra["ref_n_tokens"] = pa.array(ref_counts, type=pa.int64())
    return score_table(doc_ids, [len(t) for t in token_ids], teacher_lp, ref_lp, id_type, extra,
                       per=n_bytes if normalize == "bytes" else None)


def _score_chunks(shard_index, token_ids, tokenizer, teacher, reference, cfg, budget, progress) -> pa.Table:
    chunks = corpus_chunks(token_ids, tokenizer.eos_token_id, cfg.max_length)
    progress.expect(sum(len(c) - 1 for c in chunks))
    teacher_lp, ref_lp = score_sequences([teacher, reference], chunks, budget, teacher.device, progress)
    extra = {
        cfg.text_column: pa.array(tokenizer.batch_decode(chunks), type=pa.string()),
        "input_ids": pa.array(chunks, type=pa.list_(pa.int32())),
    }
    chunk_ids = [f"s{shard_index:06d}c{k:06d}" for k in range(len(chunks))]
    return score_table(chunk_ids, [len(c) - 1 for c in chunks], teacher_lp, ref_lp, pa.string(), extra)
