"""`refine pretrain`: a plain pretraining loop for any `transformers` causal-LM config.

Reads top to bottom: set up (data, model, optimizer, schedule), loop (accumulate, clip, step),
evaluate, checkpoint, save. Also used to train MiniPLM's reference model on a small random split.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, get_cosine_with_min_lr_schedule_with_warmup

from refine import data as corpus
from refine import models
from refine.config import PretrainConfig
from refine.errors import RefineError
from refine.output import MANIFEST, claim_output_dir, run_info, write_json

CHECKPOINT = "checkpoint"
METRICS = "metrics.jsonl"
# Settings that may differ between a run and its --resume.
RESUME_FREE = ("resume", "overwrite", "device", "log_every")


def validate(cfg: PretrainConfig) -> None:
    problems = []
    if cfg.max_steps is None and cfg.max_tokens is None:
        problems.append("no training budget; give --max-steps or --max-tokens")
    if cfg.max_steps is not None and cfg.max_tokens is not None:
        problems.append("both --max-steps and --max-tokens given; choose one")
    if (cfg.max_steps is not None and cfg.max_steps <= 0) or (cfg.max_tokens is not None and cfg.max_tokens <= 0):
        problems.append("the training budget must be positive; raise --max-steps / --max-tokens")
    for name in ("seq_len", "micro_batch_size", "grad_accum", "eval_every", "save_every", "log_every", "max_eval_sequences"):
        if getattr(cfg, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < cfg.eval_fraction < 1:
        problems.append(f"--eval-fraction {cfg.eval_fraction} must be in (0, 1)")
    if cfg.lr <= 0:
        problems.append(f"--lr {cfg.lr} must be positive")
    if not 0 <= cfg.min_lr_ratio <= 1:
        problems.append(f"--min-lr-ratio {cfg.min_lr_ratio} must be in [0, 1]")
    if cfg.resume and cfg.overwrite:
        problems.append("--resume and --overwrite contradict each other; choose one")
    if problems:
        raise RefineError(*problems)


def total_steps(cfg: PretrainConfig) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    return math.ceil(cfg.max_tokens / (cfg.micro_batch_size * cfg.grad_accum * cfg.seq_len))


def pack(token_lists: list[list[int]], eos_id: int, seq_len: int, keep_remainder: bool = False) -> list[np.ndarray]:
    """Join documents with EOS after each and cut into `seq_len` sequences (the remainder only if asked)."""
    stream = np.fromiter((t for doc in token_lists for t in (*doc, eos_id)), dtype=np.int64)
    n_full = len(stream) // seq_len
    sequences = list(stream[: n_full * seq_len].reshape(n_full, seq_len)) if n_full else []
    if keep_remainder and len(stream) - n_full * seq_len >= 2:
        sequences.append(stream[n_full * seq_len :])
    return sequences


def sample_order(position: int, count: int, n_sequences: int, seed: int) -> np.ndarray:
    """Sequence indices for training positions [position, position+count): a fresh seeded shuffle each epoch.

    A pure function of the position, so resuming needs nothing but the step number.
    """
    indices = []
    for p in range(position, position + count):
        epoch, offset = divmod(p, n_sequences)
        indices.append(np.random.default_rng([seed, epoch]).permutation(n_sequences)[offset])
    return np.asarray(indices)


def split_documents(n_docs: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, eval rows): a seeded random eval_fraction of the documents, at least one."""
    if n_docs < 2:
        raise RefineError("need at least 2 documents to hold one out for evaluation; add data or give --eval-data")
    n_eval = min(n_docs - 1, max(1, round(eval_fraction * n_docs)))
    permutation = np.random.default_rng(seed).permutation(n_docs)
    return np.sort(permutation[n_eval:]), np.sort(permutation[:n_eval])


def tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    out = []
    for start in range(0, len(texts), 1000):
        out.extend(tokenizer(texts[start : start + 1000], add_special_tokens=False, verbose=False)["input_ids"])
    return out


def student_config(cfg: PretrainConfig, tokenizer):
    """The architecture config, sized to the tokenizer; refuses a --seq-len beyond its positions."""
    config = models.load_model_config(cfg.model_config, cfg.trust_remote_code)
    config.vocab_size = len(tokenizer)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if hasattr(config, name):
            setattr(config, name, getattr(tokenizer, name))
    limit = models.max_positions(config)
    if limit is not None and cfg.seq_len > limit:
        raise RefineError(
            f"--seq-len {cfg.seq_len} exceeds the {limit} positions of model config {cfg.model_config!r}; lower --seq-len"
        )
    return config


def build_model(cfg: PretrainConfig, config):
    torch.manual_seed(cfg.seed)
    try:
        return AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    except ValueError as e:
        raise RefineError(f"model config {cfg.model_config!r} is not a causal LM ({e}); give a causal-LM config") from None


def make_optimizer(model, cfg: PretrainConfig, device: torch.device) -> torch.optim.Optimizer:
    # Matrices decay; biases and norm scales do not (as in GPT-2 / nanoGPT).
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), fused=device.type == "cuda"
    )


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model, sequences: list[np.ndarray], micro_batch_size: int, device, dtype) -> float:
    """Token-weighted mean next-token loss (nats) over the held-out sequences."""
    model.eval()
    total_loss, total_tokens = 0.0, 0
    by_length: dict[int, list[np.ndarray]] = {}
    for s in sequences:
        by_length.setdefault(len(s), []).append(s)
    for length, group in by_length.items():
        for start in range(0, len(group), micro_batch_size):
            batch = torch.from_numpy(np.stack(group[start : start + micro_batch_size])).to(device)
            with autocast(device, dtype):
                loss = model(input_ids=batch, labels=batch).loss
            n = batch.shape[0] * (length - 1)
            total_loss += loss.item() * n
            total_tokens += n
    model.train()
    return total_loss / total_tokens


def save_checkpoint(output: Path, model, optimizer, scheduler, step: int, cfg: PretrainConfig) -> None:
    """Write checkpoint.tmp fully, then swap it in; a crash leaves either the old or the new checkpoint."""
    final, staging, old = output / CHECKPOINT, output / f"{CHECKPOINT}.tmp", output / f"{CHECKPOINT}.old"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_model(model, str(staging / "model.safetensors"))
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    torch.save(state, staging / "trainer_state.pt")
    write_json(staging / "config.json", asdict(cfg))
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(output: Path) -> Path | None:
    for name in (CHECKPOINT, f"{CHECKPOINT}.old"):  # .old survives only a crash in the middle of the swap
        if (output / name / "trainer_state.pt").exists():
            return output / name
    return None


def load_checkpoint(path: Path, cfg: PretrainConfig, model, optimizer, scheduler) -> int:
    saved = json.loads((path / "config.json").read_text())
    changed = [k for k, v in asdict(cfg).items() if k not in RESUME_FREE and saved.get(k) != v]
    if changed:
        raise RefineError(
            f"the checkpoint in {str(path.parent)!r} was made with other settings ({', '.join(changed)}); "
            "resume with the original options or start a new --output"
        )
    load_model(model, str(path / "model.safetensors"))
    state = torch.load(path / "trainer_state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"])


def pretrain(cfg: PretrainConfig, stop_after_step: int | None = None) -> dict:
    """Train a model from scratch on `cfg.data`; save it (safetensors + tokenizer) to `cfg.output`.

    `stop_after_step` ends the run early, as a crash would, after that step's checkpoint (for tests).
    """
    validate(cfg)
    started = time.time()
    output = Path(cfg.output)
    claim_output_dir(output, cfg.overwrite)
    if cfg.overwrite and output.exists():
        shutil.rmtree(output)
    checkpoint = find_checkpoint(output)
    if cfg.resume and checkpoint is None:
        raise RefineError(f"--resume given but {str(output)!r} holds no checkpoint; drop --resume to start fresh")
    if not cfg.resume and output.exists() and any(output.iterdir()):
        raise RefineError(
            f"output {str(output)!r} holds an unfinished run; pass --resume to continue it, --overwrite to restart, "
            "or choose another --output"
        )

    # ---- data: tokenize, hold out, pack
    tokenizer = models.load_tokenizer(cfg.tokenizer, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise RefineError(f"tokenizer {cfg.tokenizer!r} has no EOS token, which packing needs; use another tokenizer")
    model_config = student_config(cfg, tokenizer)
    ds = corpus.load_corpus(cfg.data, cfg.split, cfg.name)
    corpus.check_columns(ds, cfg.text_column, None, cfg.data)
    texts = [t for t in ds[cfg.text_column] if not corpus.is_blank(t)]
    if not texts:
        raise RefineError(f"all documents of {cfg.data!r} are empty or whitespace-only; give a corpus with text")
    if cfg.eval_data is not None:
        eval_ds = corpus.load_corpus(cfg.eval_data, cfg.split, cfg.name)
        corpus.check_columns(eval_ds, cfg.text_column, None, cfg.eval_data)
        train_texts, eval_texts = texts, [t for t in eval_ds[cfg.text_column] if not corpus.is_blank(t)]
    else:
        train_rows, eval_rows = split_documents(len(texts), cfg.eval_fraction, cfg.seed)
        train_texts, eval_texts = [texts[i] for i in train_rows], [texts[i] for i in eval_rows]
    train_sequences = pack(tokenize(tokenizer, train_texts), tokenizer.eos_token_id, cfg.seq_len)
    eval_sequences = pack(tokenize(tokenizer, eval_texts), tokenizer.eos_token_id, cfg.seq_len, keep_remainder=True)
    eval_sequences = eval_sequences[: cfg.max_eval_sequences]
    if not train_sequences:
        raise RefineError(f"{cfg.data!r} has fewer tokens than one --seq-len {cfg.seq_len} sequence; lower --seq-len or add data")
    if not eval_sequences:
        raise RefineError("the held-out split has fewer than 2 tokens; raise --eval-fraction or give --eval-data")
    train_data = np.stack(train_sequences)  # (n_sequences, seq_len)

    # ---- model, optimizer, schedule
    device = models.resolve_device(cfg.device)
    dtype = models.resolve_dtype(cfg.dtype, device)
    model = build_model(cfg, model_config).to(device)
    model.train()
    steps = total_steps(cfg)
    optimizer = make_optimizer(model, cfg, device)
    warmup = min(cfg.warmup_steps, steps // 10)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, steps, min_lr_rate=cfg.min_lr_ratio)
    step = load_checkpoint(checkpoint, cfg, model, optimizer, scheduler) if cfg.resume else 0
    output.mkdir(parents=True, exist_ok=True)
    _truncate_metrics(output / METRICS, step)

    tokens_per_step = cfg.micro_batch_size * cfg.grad_accum * cfg.seq_len
    n_params = sum(p.numel() for p in model.parameters())
    tqdm.write(
        f"training {model.config.model_type} ({n_params / 1e6:.1f}M params) for {steps} steps x {tokens_per_step} tokens "
        f"on {len(train_data)} sequences of {cfg.seq_len} ({len(train_data) * cfg.seq_len} tokens); "
        f"{len(eval_sequences)} held-out sequences"
    )
    progress = tqdm(total=steps, initial=step, desc="pretrain", unit="step", dynamic_ncols=True)
    eval_loss = None
    window_start, window_tokens = time.time(), 0
    while step < steps:
        # ---- one optimizer step over grad_accum micro-batches
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):
            position = (step * cfg.grad_accum + micro) * cfg.micro_batch_size
            rows = sample_order(position, cfg.micro_batch_size, len(train_data), cfg.seed)
            batch = torch.from_numpy(train_data[rows]).to(device)  # (B, T)
            with autocast(device, dtype):
                loss = model(input_ids=batch, labels=batch).loss / cfg.grad_accum
            loss.backward()
            loss_sum += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_tokens += tokens_per_step

        # ---- evaluate, log, checkpoint
        record = None
        if step % cfg.eval_every == 0 or step == steps:
            eval_loss = evaluate(model, eval_sequences, cfg.micro_batch_size, device, dtype)
            record = {"eval_loss": eval_loss}
        if step % cfg.log_every == 0 or record is not None:
            elapsed = time.time() - window_start
            record = {
                "step": step,
                "tokens": step * tokens_per_step,
                "loss": loss_sum,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                **(record or {}),
            }
            with open(output / METRICS, "a") as f:
                f.write(json.dumps(record) + "\n")
            window_start, window_tokens = time.time(), 0
        progress.set_postfix(loss=f"{loss_sum:.3f}", eval=f"{eval_loss:.3f}" if eval_loss is not None else "-")
        progress.update(1)
        if step % cfg.save_every == 0 or step == steps:
            save_checkpoint(output, model, optimizer, scheduler, step, cfg)
        if stop_after_step is not None and step >= stop_after_step and step < steps:
            progress.close()
            return {"stopped_at_step": step}
    progress.close()

    manifest = {
        "stage": "pretrain",
        **run_info(),
        "settings": asdict(cfg),
        "model_type": model.config.model_type,
        "n_params": n_params,
        "steps": steps,
        "tokens": steps * tokens_per_step,
        "train_sequences": len(train_data),
        "eval_loss": eval_loss,
        "elapsed_s": round(time.time() - started, 1),
    }
    _save_final(output, model, tokenizer, manifest)
    return manifest


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint we resume from (they will be written again)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _save_final(output: Path, model, tokenizer, manifest: dict) -> None:
    """save_pretrained into a staging dir, move each file into place, write the manifest last."""
    staging = output / "final.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    for f in sorted(staging.iterdir(), key=lambda p: p.name == "config.json"):  # config.json last
        f.replace(output / f.name)
    staging.rmdir()
    write_json(output / MANIFEST, manifest)
