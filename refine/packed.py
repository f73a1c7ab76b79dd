"""Tokenise a corpus once into a memory-mapped token file that every later run with that tokenizer reuses.

A token directory holds `tokens.bin`, the documents' token ids one after another, each followed by EOS
(uint16 when the vocabulary fits, else uint32), and `meta.json`, written last, saying what was tokenised.
Training sequences of any length are views into that stream, so students with different `--seq-len`
share the file too; nothing is loaded into memory but the sequences of the current batch.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from refine import data as corpus
from refine import models
from refine.distributed import World
from refine.errors import RefineError
from refine.output import MANIFEST, output_stage, write_json

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

    def n_sequences(self, seq_len: int) -> int:
        return len(self.tokens) // seq_len

    def batch(self, rows: np.ndarray, seq_len: int) -> np.ndarray:
        """(len(rows), seq_len) int64: the packed sequences with these indices (the tail is never used)."""
        return np.stack([self.tokens[r * seq_len : (r + 1) * seq_len] for r in rows]).astype(np.int64)


def join_with_eos(token_lists, eos_id: int, dtype=np.int64) -> np.ndarray:
    """The documents' tokens one after another, each followed by EOS."""
    return np.fromiter((t for doc in token_lists for t in (*doc, eos_id)), dtype=dtype)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def build(directory: Path, ds, text_column: str, tokenizer, meta: dict, batch_size: int = 1000,
          token_column: str | None = None) -> TokenFile:
    """Tokenise `ds[text_column]` batch by batch into directory/tokens.bin (skipping blank documents).

    With `token_column` (scored chunks that already hold their token ids, EOS separators included) those
    ids are written as they are, so the student trains on exactly the tokens that were scored.

    The stream goes to a temporary file that is renamed into place and meta.json comes last, so a killed
    build leaves nothing that looks finished; concurrent builders (one per node) each use their own temp file.
    """
    directory.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(len(tokenizer))
    eos = tokenizer.eos_token_id
    temp = directory / f"{TOKENS}.{socket.gethostname()}.{os.getpid()}.tmp"
    n_tokens = n_docs = 0
    started = time.time()
    read = token_column or text_column
    with open(temp, "wb") as f, tqdm(total=len(ds), desc="tokenize", unit="doc", dynamic_ncols=True) as progress:
        for batch in ds.select_columns([read]).iter(batch_size=batch_size):
            stream, n = _batch_stream(batch[read], tokenizer, dtype, token_column is not None)
            f.write(stream.tobytes())
            n_tokens += len(stream)
            n_docs += n
            progress.update(len(batch[read]))
    temp.replace(directory / TOKENS)
    write_json(directory / META, {**meta, "dtype": dtype.name, "n_tokens": n_tokens, "n_documents": n_docs,
                                  "eos_token_id": eos, "vocab_size": len(tokenizer), "format": FORMAT_VERSION,
                                  "elapsed_s": round(time.time() - started, 1)})
    return TokenFile.open(directory)


def _batch_stream(values: list, tokenizer, dtype, are_token_ids: bool) -> tuple[np.ndarray, int]:
    """(tokens, documents) of one batch: texts tokenised and each followed by EOS, or token ids as they are."""
    if are_token_ids:
        return np.fromiter((t for ids in values for t in ids), dtype=dtype), len(values)
    texts = [t for t in values if not corpus.is_blank(t)]
    if not texts:
        return np.zeros(0, dtype=dtype), 0
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return join_with_eos(ids, tokenizer.eos_token_id, dtype), len(texts)


def open_or_build(cache_dir: Path, ds, text_column: str, tokenizer, meta: dict, build_here: bool = True,
                  token_column: str | None = None) -> TokenFile:
    """The token file for this corpus selection and tokenizer: reused when one exists, else built (if build_here)."""
    key = cache_key(meta["dataset_fingerprint"], meta["tokenizer_fingerprint"], token_column or text_column,
                    meta["selection"])
    directory = cache_dir / key
    if (directory / META).exists():
        return TokenFile.open(directory)
    if not build_here:
        raise FileNotFoundError(directory / META)
    return build(directory, ds, text_column, tokenizer, meta, token_column=token_column)


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


def load_splits(cfg):
    """(train dataset, held-out dataset, description of the row selection) without reading the texts.

    `cfg` is a PretrainConfig or DistillCacheConfig: both name the corpus and the held-out split alike.
    """
    ds = corpus.load_corpus(cfg.data, cfg.split, cfg.name)
    corpus.check_columns(ds, cfg.text_column, None, cfg.data)
    if corpus.count_blank(ds, cfg.text_column) == len(ds):
        raise RefineError(f"all documents of {cfg.data!r} are empty or whitespace-only; give a corpus with text")
    if cfg.eval_data is not None:
        eval_ds = corpus.load_corpus(cfg.eval_data, cfg.split, cfg.name)
        corpus.check_columns(eval_ds, cfg.text_column, None, cfg.eval_data)
        return ds, eval_ds, "all rows"
    train_rows, eval_rows = split_documents(len(ds), cfg.eval_fraction, cfg.seed)
    selection = f"all rows but a held-out {cfg.eval_fraction} of {len(ds)}, seed {cfg.seed}"
    return ds.select(train_rows), ds.select(eval_rows), selection


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


def token_file(cfg, train_ds, selection: str, tokenizer, tokenizer_ref: str, world: World) -> TokenFile:
    """The memory-mapped training tokens: built once per node (local rank 0) and reused by later runs.

    `cfg` is a PretrainConfig or DistillCacheConfig (both name the corpus and --token-cache alike).
    """
    cache_dir = Path(cfg.token_cache).expanduser() if cfg.token_cache else default_cache_dir()
    meta = {
        "source": cfg.data, "split": cfg.split, "name": cfg.name, "text_column": cfg.text_column,
        "selection": selection, "dataset_fingerprint": train_ds._fingerprint,  # datasets' hash of files + version
        "tokenizer": tokenizer_ref, "tokenizer_fingerprint": models.tokenizer_fingerprint(tokenizer),
    }
    token_column = scored_token_column(cfg.data, train_ds, tokenizer)
    try:
        if world.local_rank == 0:
            tokens = open_or_build(cache_dir, train_ds, cfg.text_column, tokenizer, meta, token_column=token_column)
        world.barrier()
        if world.local_rank != 0:
            tokens = open_or_build(cache_dir, train_ds, cfg.text_column, tokenizer, meta, build_here=False,
                                   token_column=token_column)
    except OSError as e:
        raise RefineError(f"token cache {str(cache_dir)!r}: {e}; check --token-cache (it must be writable)") from None
    return tokens
