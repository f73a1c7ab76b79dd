"""Token-level knowledge distillation: the teacher online, or an offline cache of its top-k next tokens.

`refine distill-cache` runs the teacher once over the packed training sequences (the very token file
`refine pretrain` reads) and stores, for every position that predicts a token, the teacher's K most
probable token ids and their log-probs (normalised over the whole vocabulary). Shards of
`--shard-sequences` sequences are written atomically and dealt round-robin to torchrun ranks; a rerun
skips finished shards; manifest.json comes last. Bytes per cached token: K x (2 or 4 for the ids: uint16
when the vocabulary fits) + K x (2 for float16 or 4 for float32 log-probs), e.g. 256 for K = 64 in
float16 with a vocabulary under 65,536.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from refine import models, packed
from refine.config import DistillCacheConfig, result_settings
from refine.distributed import World, joined_world, rank_device
from refine.errors import RefineError
from refine.lm_loss import Teacher, chunk_rows, has_plain_head
from refine.output import claim, run_info, verify, write_manifest

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
    """Write the teacher's top-k cache for every packed training sequence. Returns the manifest (written last)."""
    validate(cfg)
    run = {"settings": result_settings(cfg), "teacher": models.model_identity(cfg.teacher, None, cfg.teacher_revision)}
    inputs = [cfg.data, cfg.eval_data, cfg.teacher, cfg.token_cache]
    with joined_world(cfg.device) as world, \
            world.holding(lambda: claim(cfg.output, "distill-cache", inputs, cfg.overwrite, run)):
        return _build_cache(cfg, world)


def _build_cache(cfg: DistillCacheConfig, world: World) -> dict:
    started = time.time()
    output = Path(cfg.output).expanduser().absolute()
    tokenizer = models.load_tokenizer(cfg.teacher, cfg.teacher_revision, cfg.trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise RefineError(f"tokenizer of {cfg.teacher!r} has no EOS token, which packing needs")
    tokens = packed.token_file(cfg, packed.load_splits(cfg), tokenizer, cfg.teacher, world)
    n_sequences = tokens.n_sequences(cfg.seq_len)
    if n_sequences == 0:
        raise RefineError(f"{cfg.data!r} has fewer tokens than one --seq-len {cfg.seq_len} sequence")
    vocab = len(tokenizer)
    if cfg.top_k > vocab:
        raise RefineError(f"--top-k {cfg.top_k} exceeds the vocabulary ({vocab}); lower it")


    device = models.resolve_device(rank_device(cfg.device, world))
    dtype = models.resolve_dtype(cfg.dtype, device)
    teacher = load_teacher(cfg.teacher, cfg.teacher_revision, tokenizer, dtype, device, cfg.trust_remote_code)
    n_shards = -(-n_sequences // cfg.shard_sequences)
    mine = [s for s in range(n_shards) if world.owns(s) and not (output / shard_name(s)).exists()]
    ids_type, value_type = id_dtype(vocab), LOGPROB_DTYPES[cfg.logprob_dtype]
    progress = tqdm(total=sum(min(cfg.shard_sequences, n_sequences - s * cfg.shard_sequences) for s in mine),
                    desc=f"distill-cache{f' rank {world.rank}' if world.world_size > 1 else ''}", unit="seq",
                    dynamic_ncols=True)
    for shard in mine:
        first = shard * cfg.shard_sequences
        rows = np.arange(first, min(first + cfg.shard_sequences, n_sequences))
        shard_ids = np.empty((len(rows), cfg.seq_len - 1, cfg.top_k), dtype=ids_type)
        shard_values = np.empty((len(rows), cfg.seq_len - 1, cfg.top_k), dtype=value_type)
        for start in range(0, len(rows), cfg.batch_size):
            batch_rows = rows[start : start + cfg.batch_size]
            batch = torch.from_numpy(tokens.batch(batch_rows, cfg.seq_len)).to(device)
            ids, values = top_k_logprobs(teacher, batch, vocab, cfg.top_k)
            shard_ids[start : start + len(batch_rows)] = ids.cpu().numpy().astype(ids_type)
            shard_values[start : start + len(batch_rows)] = values.float().cpu().numpy().astype(value_type)
            progress.update(len(batch_rows))
        staging = output / f"{shard_name(shard)}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        np.save(staging / "ids.npy", shard_ids)
        np.save(staging / "logprobs.npy", shard_values)
        staging.rename(output / shard_name(shard))
    progress.close()
    world.barrier()

    bytes_per_token = cfg.top_k * (ids_type.itemsize + np.dtype(value_type).itemsize)
    meta = {
        "stage": "distill-cache", **run_info(), "settings": result_settings(cfg),
        "teacher": models.model_identity(cfg.teacher, teacher, cfg.teacher_revision),
        "tokenizer_fingerprint": models.tokenizer_fingerprint(tokenizer),
        "token_file": tokens.directory.name, "n_tokens": tokens.meta["n_tokens"], "seq_len": cfg.seq_len,
        "n_sequences": n_sequences, "shard_sequences": cfg.shard_sequences, "n_shards": n_shards,
        "top_k": cfg.top_k, "ids_dtype": ids_type.name, "logprob_dtype": cfg.logprob_dtype,
        "bytes_per_token": bytes_per_token, "elapsed_s": round(time.time() - started, 1),
    }
    if world.is_main:
        missing = [s for s in range(n_shards) if not (output / shard_name(s)).exists()]
        if missing:
            raise RefineError(f"{len(missing)} cache shards are missing after the run; rerun the same command")
        files = [f"{shard_name(s)}/{name}" for s in range(n_shards) for name in ("ids.npy", "logprobs.npy")]
        return write_manifest(output, meta, files)
    return {"rank": world.rank}

