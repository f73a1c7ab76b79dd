"""Token-level knowledge distillation: the teacher online, or an offline cache of its top-k next tokens.

`refine distill-cache` runs the teacher once over the packed training sequences (the very token file
`refine pretrain` reads) and stores, for every position that predicts a token, the teacher's K most
probable token ids and their log-probs (normalised over the whole vocabulary). Shards of
`--shard-sequences` sequences are written atomically and dealt round-robin to torchrun ranks or to
`--tasks` that datatrove runs (refine/engine.py, as for `refine score`); a rerun
skips finished shards; manifest.json comes last. Bytes per cached token: K x (2 or 4 for the ids: uint16
when the vocabulary fits) + K x (2 for float16 or 4 for float32 log-probs), e.g. 256 for K = 64 in
float16 with a vocabulary under 65,536.
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from refine import engine, models, packed
from refine.config import DistillCacheConfig, result_settings
from refine.distributed import World, joined_world, rank_device
from refine.errors import RefineError
from refine.lm_loss import Teacher, chunk_rows, has_plain_head
from refine.output import claim, run_info, verify, write_json, write_manifest

LOGPROB_DTYPES = {"float16": np.float16, "float32": np.float32}


# ---------------------------------------------------------------- the teacher online


def load_teacher(ref: str, revision, student_tokenizer, dtype, device, trust_remote_code: bool = False):
    """The KD teacher in eval mode without gradients; refuses one whose tokenizer differs from the student's."""
    tokenizer = models.load_tokenizer(ref, revision, trust_remote_code)
    if models.tokenizer_fingerprint(tokenizer) != models.tokenizer_fingerprint(student_tokenizer):
        raise RefineError(
            f"KD teacher {ref!r} tokenizes differently from the student's tokenizer; token-level distillation "
            "needs one vocabulary: train the student with the teacher's tokenizer (--tokenizer TEACHER)"
        )
    teacher = models.load_causal_lm(ref, revision, dtype, device, trust_remote_code)
    teacher.requires_grad_(False)
    head = teacher.get_output_embeddings()
    if head is not None and head.weight.shape[0] < len(student_tokenizer):
        raise RefineError(f"KD teacher {ref!r} predicts {head.weight.shape[0]} tokens, fewer than the tokenizer's "
                          f"{len(student_tokenizer)}; use a teacher built for this tokenizer")
    return teacher


@torch.no_grad()
def teacher_signal(teacher, input_ids: torch.Tensor, vocab_size: int) -> Teacher:
    """The teacher's distribution for the positions predicting input_ids[:, 1:], flattened.

    With a plain LM head only the final hidden states are kept; the head runs chunk by chunk inside the
    loss. The head is cut to the student's vocabulary (padding rows of a larger head are never targets).
    """
    if has_plain_head(teacher):
        hidden = teacher.base_model(input_ids=input_ids).last_hidden_state[:, :-1]
        return Teacher(hidden=hidden.reshape(-1, hidden.shape[-1]),
                       head_weight=teacher.get_output_embeddings().weight[:vocab_size])
    logits = teacher(input_ids=input_ids).logits[:, :-1, :vocab_size]
    return Teacher(logits=logits.reshape(-1, logits.shape[-1]))


@torch.no_grad()
def top_k_logprobs(teacher, input_ids: torch.Tensor, vocab_size: int, k: int,
                   chunk_bytes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, log-probs), each (B, T-1, k): the teacher's k most probable next tokens per position."""
    signal = teacher_signal(teacher, input_ids, vocab_size)
    n = input_ids.shape[0] * (input_ids.shape[1] - 1)
    rows = chunk_rows(input_ids.device, vocab_size, chunk_bytes)
    ids, values = [], []
    for start in range(0, n, rows):
        top = torch.log_softmax(signal.dense_logits(slice(start, start + rows)), dim=-1).topk(k, dim=-1)
        ids.append(top.indices)
        values.append(top.values)
    shape = (input_ids.shape[0], input_ids.shape[1] - 1, k)
    return torch.cat(ids).reshape(shape), torch.cat(values).reshape(shape)


# ---------------------------------------------------------------- the offline cache


def id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


class KDCache:
    """Reads the top-k cache for given packed-sequence indices (memory-mapped shards)."""

    def __init__(self, directory: Path):
        self.directory = directory
        # Sizes and the listing are checked, not hashes: a cache holds hundreds of bytes per training token.
        self.meta = verify(directory, "distill-cache", check_hashes=False)
        self._open: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _shard(self, index: int):
        if index not in self._open:
            path = self.directory / shard_name(index)
            self._open[index] = (np.load(path / "ids.npy", mmap_mode="r"), np.load(path / "logprobs.npy", mmap_mode="r"))
        return self._open[index]

    def teacher(self, rows: np.ndarray, device: torch.device) -> Teacher:
        per_shard = self.meta["shard_sequences"]
        ids, logprobs = [], []
        for row in rows:
            shard_ids, shard_logprobs = self._shard(int(row) // per_shard)
            ids.append(shard_ids[int(row) % per_shard])
            logprobs.append(shard_logprobs[int(row) % per_shard])
        k = self.meta["top_k"]
        ids_t = torch.from_numpy(np.stack(ids).astype(np.int64).reshape(-1, k)).to(device)
        logprobs_t = torch.from_numpy(np.stack(logprobs).astype(np.float32).reshape(-1, k)).to(device)
        return Teacher(top_ids=ids_t, top_logprobs=logprobs_t)

    def check_matches(self, token_file, seq_len: int, tokenizer_fingerprint: str, source: str) -> None:
        """Refuse a cache made over other packed sequences than the ones this run trains on."""
        expected = {"token_file": token_file.directory.name, "n_tokens": token_file.meta["n_tokens"],
                    "seq_len": seq_len, "tokenizer_fingerprint": tokenizer_fingerprint}
        differs = [k for k, v in expected.items() if self.meta.get(k) != v]
        if differs:
            raise RefineError(
                f"KD cache {source!r} was made over other packed sequences ({', '.join(differs)} differ); build it "
                "with the same data, tokenizer, --seq-len and held-out split as this run"
            )


def open_cache(path: str) -> KDCache:
    return KDCache(Path(path))


def validate(cfg: DistillCacheConfig) -> None:
    cfg.check()  # every field and cross-field check is declared in refine.config


def build_cache(cfg: DistillCacheConfig) -> dict:
    """Write the teacher's top-k cache for every packed training sequence. Returns the manifest (written last).

    Under torchrun each rank caches its own shards (round-robin) and rank 0 writes the manifest. With --tasks N or
    --executor slurm/ray the shards are dealt to N independent tasks that datatrove runs (refine.engine), as
    `refine score` does; this process builds the token file, claims the output, waits for the tasks and writes
    the manifest.
    """
    validate(cfg)
    run = {"settings": result_settings(cfg), "teacher": models.model_identity(cfg.teacher, None, cfg.teacher_revision)}
    inputs = [cfg.data, cfg.eval_data, cfg.teacher, cfg.token_cache]
    with joined_world(cfg.device) as world:
        if world.world_size > 1 and engine.uses_executor(cfg):
            raise RefineError("torchrun and --tasks/--executor both split the work; run without torchrun, or drop --tasks/--executor")
        with world.holding(lambda: claim(cfg.output, "distill-cache", inputs, cfg.overwrite, run)):
            setup = prepare(cfg, world)
            if engine.uses_executor(cfg):
                identity = _run_tasks(cfg, setup)
            else:
                done = cache_task(cfg, world.rank, world.world_size, setup, world, show_progress=True)
                world.barrier()
                if not world.is_main:
                    return {"rank": world.rank}
                identity = done["teacher"]
            return finish(cfg, setup, identity)


@dataclass
class CacheSetup:
    """What the driver and every task prepare before the teacher loads: the tokenizer and the packed sequences."""

    started: float
    tokenizer: Any
    tokens: packed.TokenFile
    n_sequences: int
    shard_sequences: int

    @property
    def n_shards(self) -> int:
        return -(-self.n_sequences // self.shard_sequences)


def prepare(cfg: DistillCacheConfig, world: World | None = None) -> CacheSetup:
    """The tokenizer and the token file (built here if missing), checked against --seq-len and --top-k. No model loads."""
    started = time.time()
    tokenizer = models.load_tokenizer(cfg.teacher, cfg.teacher_revision, cfg.trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise RefineError(f"tokenizer of {cfg.teacher!r} has no EOS token, which packing needs")
    tokens = packed.token_file(cfg, packed.load_splits(cfg), tokenizer, cfg.teacher, world or World())
    n_sequences = tokens.n_sequences(cfg.seq_len)
    if n_sequences == 0:
        raise RefineError(f"{cfg.data!r} has fewer tokens than one --seq-len {cfg.seq_len} sequence")
    if cfg.top_k > len(tokenizer):
        raise RefineError(f"--top-k {cfg.top_k} exceeds the vocabulary ({len(tokenizer)}); lower it")
    return CacheSetup(started, tokenizer, tokens, n_sequences, cfg.shard_sequences)


# The teacher's identity as the first task that loaded it recorded it (in the logging dir), for the manifest.
TEACHER_RECORD = "teacher.json"


def _run_tasks(cfg: DistillCacheConfig, setup: CacheSetup) -> dict | None:
    """Run the tasks whose shards are not all on disk through datatrove; the teacher's identity if a task recorded it."""
    logging_dir = engine.logging_dir_for(cfg.output, cfg.logging_dir, cfg.tasks, [cfg.data, cfg.teacher])
    output = Path(cfg.output).expanduser().absolute()
    # The shards on disk are the truth: a task with a missing shard runs again even if datatrove marked it done.
    engine.forget_completions(logging_dir, sorted({s % cfg.tasks for s in range(setup.n_shards)
                                                   if not (output / shard_name(s)).exists()}))
    record = logging_dir / TEACHER_RECORD
    engine.run_tasks(cfg, functools.partial(cache_task, cfg, teacher_record=str(record),
                                            expected_token_file=setup.tokens.directory.name),
                     logging_dir, job_name="refine-distill-cache",
                     progress=engine.FilesPresent(output, [shard_name(s) for s in range(setup.n_shards)], "shard",
                                                   "caching"))
    try:
        return json.loads(record.read_text())
    except (OSError, ValueError):
        return None


def cache_task(cfg: DistillCacheConfig, task: int, n_tasks: int, setup: CacheSetup | None = None,
               world: World | None = None, show_progress: bool = False, teacher_record: str | None = None,
               expected_token_file: str | None = None) -> dict:
    """Cache the shards of task `task` of `n_tasks` (shards task, task + n_tasks, ...) that are not on disk yet.

    The one caching path: each torchrun rank, each datatrove task and a plain single run call it. It never
    claims the output and writes no manifest. The teacher loads only if a shard is missing; then its identity
    is returned (and written to `teacher_record`, if given, for the driver's manifest).
    """
    world = world or World()
    setup = setup or prepare(cfg, world)
    if expected_token_file is not None and setup.tokens.directory.name != expected_token_file:
        raise RefineError(f"task {task} found other packed sequences than the run it belongs to (was {cfg.data!r} or "
                          "the tokenizer changed while it was queued?); restore them and rerun the same command")
    output = Path(cfg.output).expanduser().absolute()
    mine = [s for s in range(setup.n_shards) if s % n_tasks == task and not (output / shard_name(s)).exists()]
    if not mine:
        return {"task": task, "teacher": None}
    device = models.resolve_device(rank_device(cfg.device, world))
    dtype = models.resolve_dtype(cfg.dtype, device)
    teacher = load_teacher(cfg.teacher, cfg.teacher_revision, setup.tokenizer, dtype, device, cfg.trust_remote_code)
    identity = models.model_identity(cfg.teacher, teacher, cfg.teacher_revision)
    if teacher_record is not None:
        write_json(Path(teacher_record), identity)
    n_sequences, per_shard = setup.n_sequences, cfg.shard_sequences
    progress = tqdm(total=sum(min(per_shard, n_sequences - s * per_shard) for s in mine),
                    desc=f"distill-cache{f' task {task}' if n_tasks > 1 else ''}", unit="seq", dynamic_ncols=True,
                    disable=not show_progress)
    for shard in mine:
        rows = np.arange(shard * per_shard, min((shard + 1) * per_shard, n_sequences))
        ids, values = shard_top_k(teacher, setup.tokens, rows, cfg, len(setup.tokenizer), device, progress)
        write_shard(output, shard, ids, values)
    progress.close()
    return {"task": task, "teacher": identity}


def shard_top_k(teacher, tokens: packed.TokenFile, rows: np.ndarray, cfg: DistillCacheConfig, vocab: int, device,
                progress) -> tuple[np.ndarray, np.ndarray]:
    """(ids, log-probs), each (len(rows), seq_len - 1, top_k), of the packed sequences `rows`, batch by batch."""
    ids_type, value_type = id_dtype(vocab), LOGPROB_DTYPES[cfg.logprob_dtype]
    shard_ids = np.empty((len(rows), cfg.seq_len - 1, cfg.top_k), dtype=ids_type)
    shard_values = np.empty((len(rows), cfg.seq_len - 1, cfg.top_k), dtype=value_type)
    for start in range(0, len(rows), cfg.batch_size):
        batch_rows = rows[start : start + cfg.batch_size]
        batch = torch.from_numpy(tokens.batch(batch_rows, cfg.seq_len)).to(device)
        ids, values = top_k_logprobs(teacher, batch, vocab, cfg.top_k)
        shard_ids[start : start + len(batch_rows)] = ids.cpu().numpy().astype(ids_type)
        shard_values[start : start + len(batch_rows)] = values.float().cpu().numpy().astype(value_type)
        progress.update(len(batch_rows))
    return shard_ids, shard_values


def write_shard(output: Path, shard: int, ids: np.ndarray, values: np.ndarray) -> None:
    """The shard's two arrays, staged beside it and renamed into place together."""
    staging = output / f"{shard_name(shard)}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    np.save(staging / "ids.npy", ids)
    np.save(staging / "logprobs.npy", values)
    staging.rename(output / shard_name(shard))


def finish(cfg: DistillCacheConfig, setup: CacheSetup, identity: dict | None) -> dict:
    """Once every shard exists: the manifest, last. `identity` None: load the teacher to record it."""
    output = Path(cfg.output).expanduser().absolute()
    missing = [s for s in range(setup.n_shards) if not (output / shard_name(s)).exists()]
    if missing:
        raise RefineError(f"{len(missing)} cache shards are missing after the run; rerun the same command")
    if identity is None:  # every shard was on disk already (a rerun after a crash before the manifest)
        teacher = load_teacher(cfg.teacher, cfg.teacher_revision, setup.tokenizer, torch.float32, torch.device("cpu"),
                               cfg.trust_remote_code)
        identity = models.model_identity(cfg.teacher, teacher, cfg.teacher_revision)
    ids_type = id_dtype(len(setup.tokenizer))
    bytes_per_token = cfg.top_k * (ids_type.itemsize + np.dtype(LOGPROB_DTYPES[cfg.logprob_dtype]).itemsize)
    meta = {
        "stage": "distill-cache", **run_info(), "settings": result_settings(cfg), "teacher": identity,
        "tokenizer_fingerprint": models.tokenizer_fingerprint(setup.tokenizer),
        "token_file": setup.tokens.directory.name, "n_tokens": setup.tokens.meta["n_tokens"], "seq_len": cfg.seq_len,
        "n_sequences": setup.n_sequences, "shard_sequences": cfg.shard_sequences, "n_shards": setup.n_shards,
        "top_k": cfg.top_k, "ids_dtype": ids_type.name, "logprob_dtype": cfg.logprob_dtype,
        "bytes_per_token": bytes_per_token, "executor": cfg.executor if engine.uses_executor(cfg) else None,
        "elapsed_s": round(time.time() - setup.started, 1),
    }
    files = [f"{shard_name(s)}/{name}" for s in range(setup.n_shards) for name in ("ids.npy", "logprobs.npy")]
    return write_manifest(output, meta, files)
