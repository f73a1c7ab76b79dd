"""`refine pretrain`: a plain pretraining loop for any `transformers` causal-LM config, on 1 CPU to many GPUs.

Reads top to bottom: set up (processes, data, model, optimizer, schedule), loop (accumulate, clip, step),
evaluate, checkpoint, save. Under torchrun it is data parallel (DDP, or FSDP2 with --fsdp): every rank
reads its own slice of each global batch from the memory-mapped token file. Positions in the data, the
schedule and the budget count global sequences, so a run's result does not depend on the process count.
Also used to train MiniPLM's reference model on a small random split.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_model, save_model
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel, get_cosine_with_min_lr_schedule_with_warmup

from refine import diagnostics, distill, models, packed
from refine.config import PretrainConfig, result_settings
from refine.distributed import World, joined_world, rank_device
from refine.errors import RefineError
from refine.flops import device_peak, matmul_params
from refine.lm_loss import CausalLMLoss
from refine.output import RUN_FILE, claim, run_info, swap_in, write_json, write_manifest

CHECKPOINT = "checkpoint"
METRICS = "metrics.jsonl"


def validate(cfg: PretrainConfig) -> None:
    cfg.check()  # every field and cross-field check is declared in refine.config


def global_batch(cfg: PretrainConfig, world_size: int) -> int:
    """Sequences per optimizer step over all processes."""
    return cfg.micro_batch_size * cfg.grad_accum * world_size


def total_steps(cfg: PretrainConfig, world_size: int = 1) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    return math.ceil(cfg.max_tokens / (global_batch(cfg, world_size) * cfg.seq_len))


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
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
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


# ---------------------------------------------------------------- model wrapping


def wrap_model(model, cfg: PretrainConfig, world: World, device: torch.device, kd: bool = False):
    """The module whose forward(input_ids[, teacher]) returns the mean loss: CausalLMLoss, sharded or wrapped."""
    if cfg.activation_checkpointing:
        if not model.supports_gradient_checkpointing:
            raise RefineError(f"{model.config.model_type} does not support --activation-checkpointing; drop the flag")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss_module = CausalLMLoss(model, lean=cfg.lean_loss, kd_weight=cfg.kd_weight if kd else 0.0,
                               kd_temperature=cfg.kd_temperature)
    if cfg.fsdp and world.world_size > 1:
        from torch.distributed.fsdp import fully_shard

        block_names = set(getattr(model, "_no_split_modules", None) or [])
        for module in model.modules():
            if type(module).__name__ in block_names:
                fully_shard(module)
        fully_shard(loss_module)
    elif world.world_size > 1:
        # Buffers (rotary tables) are the same on every rank: no need to broadcast them each forward.
        loss_module = DistributedDataParallel(loss_module, device_ids=[device.index] if device.type == "cuda" else None,
                                              broadcast_buffers=False)
    if cfg.compile:
        loss_module = torch.compile(loss_module)
    return loss_module


def no_sync(loss_module, last_micro_step: bool):
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation."""
    if last_micro_step or not hasattr(loss_module, "no_sync"):
        return contextlib.nullcontext()
    return loss_module.no_sync()


@torch.no_grad()
def evaluate(model, sequences: list[np.ndarray], micro_batch_size: int, device, dtype) -> float:
    """Token-weighted mean next-token loss (nats) over the held-out sequences.

    `model` is a causal LM, or the loss module as wrapped for training. Under torchrun every rank evaluates
    all sequences (they are few): FSDP needs every rank in every forward pass, and all get the same figure.
    """
    if isinstance(model, PreTrainedModel):
        model = CausalLMLoss(model, lean=False)
    elif isinstance(model, DistributedDataParallel):
        model = model.module  # replicas are identical; no collectives needed
    model.eval()
    total_loss, total_tokens = 0.0, 0
    by_length: dict[int, list[np.ndarray]] = {}
    for s in sequences:
        by_length.setdefault(len(s), []).append(s)
    for length, group in sorted(by_length.items()):
        for start in range(0, len(group), micro_batch_size):
            batch = torch.from_numpy(np.stack(group[start : start + micro_batch_size]).astype(np.int64)).to(device)
            with autocast(device, dtype):
                loss = model(batch)
            n = batch.shape[0] * (length - 1)
            total_loss += loss.item() * n
            total_tokens += n
    model.train()
    return total_loss / total_tokens


def _all_reduce_sum(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    on_device = values.to(device)
    dist.all_reduce(on_device)
    return on_device.cpu()


# ---------------------------------------------------------------- checkpoints


def _rng_states(world: World) -> list:
    state = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    if world.world_size == 1:
        return [state]
    gathered = [None] * world.world_size
    dist.all_gather_object(gathered, state)
    return gathered


def full_state(loss_module, model, optimizer, cfg: PretrainConfig, world: World) -> tuple[dict | None, dict]:
    """(model weights on rank 0, optimizer state) gathered from FSDP shards; plain references otherwise."""
    if not (cfg.fsdp and world.world_size > 1):
        return None, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optimizer_state = get_state_dict(loss_module, optimizer, options=options)
    return {k.removeprefix("model."): v for k, v in model_state.items()}, optimizer_state


def save_checkpoint(output: Path, loss_module, model, optimizer, scheduler, step: int, cfg: PretrainConfig,
                    world: World) -> None:
    """Rank 0 writes checkpoint.tmp fully, then swaps it in; a crash leaves either the old or the new checkpoint."""
    model_state, optimizer_state = full_state(loss_module, model, optimizer, cfg, world)
    rng = _rng_states(world)
    if world.is_main:
        final, staging, old = output / CHECKPOINT, output / f"{CHECKPOINT}.tmp", output / f"{CHECKPOINT}.old"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        if model_state is None:
            save_model(model, str(staging / "model.safetensors"))
        else:
            model.save_pretrained(staging / "fsdp_full", state_dict=model_state, safe_serialization=True)
        state = {"step": step, "sequences": step * global_batch(cfg, world.world_size),
                 "global_batch": global_batch(cfg, world.world_size), "world_size": world.world_size,
                 "optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": rng}
        torch.save(state, staging / "trainer_state.pt")
        write_json(staging / "config.json", asdict(cfg))
        swap_in(staging, final, old)
    world.barrier()


def find_checkpoint(output: Path) -> Path | None:
    for name in (CHECKPOINT, f"{CHECKPOINT}.old"):  # .old survives only a crash in the middle of the swap
        if (output / name / "trainer_state.pt").exists():
            return output / name
    return None


def load_checkpoint(path: Path, cfg: PretrainConfig, loss_module, model, optimizer, scheduler, world: World) -> int:
    saved = json.loads((path / "config.json").read_text())
    changed = [k for k, v in result_settings(cfg).items() if saved.get(k) != v]
    if changed:
        raise RefineError(
            f"the checkpoint in {str(path.parent)!r} was made with other settings ({', '.join(changed)}); "
            "resume with the original options or start a new --output"
        )
    state = torch.load(path / "trainer_state.pt", weights_only=True)
    if state["global_batch"] != global_batch(cfg, world.world_size):
        raise RefineError(
            f"the checkpoint was trained with a global batch of {state['global_batch']} sequences; this run's is "
            f"{global_batch(cfg, world.world_size)} (micro-batch {cfg.micro_batch_size} x accumulation {cfg.grad_accum} "
            f"x {world.world_size} processes); choose --micro-batch-size/--grad-accum to match"
        )
    if cfg.fsdp and world.world_size > 1:
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        weights = {}
        for f in sorted((path / "fsdp_full").glob("*.safetensors")):
            weights.update(load_file(f))
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_state_dict(loss_module, optimizer, model_state_dict={f"model.{k}": v for k, v in weights.items()},
                       optim_state_dict=state["optimizer"], options=options)
    else:
        load_model(model, str(path / "model.safetensors"))
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state["world_size"] == world.world_size:
        rng = state["rng"][world.rank]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    else:  # another process count: data order is exact, dropout masks are freshly seeded
        torch.manual_seed(cfg.seed + 7919 * (world.rank + 1) + int(state["step"]))
    return int(state["step"])


# ---------------------------------------------------------------- the run


def pretrain(cfg: PretrainConfig) -> dict:
    """Train a model from scratch on `cfg.data`; save it (safetensors + tokenizer) to `cfg.output`.

    Under torchrun every rank calls this; rank 0 writes the files and returns the manifest.
    """
    validate(cfg)
    inputs = [cfg.data, cfg.eval_data, cfg.tokenizer, cfg.model_config, cfg.kd_teacher, cfg.kd_cache, cfg.token_cache]
    with joined_world(cfg.device) as world, world.holding(lambda: claim(cfg.output, "pretrain", inputs, cfg.overwrite)):
        return _pretrain(cfg, world)


@dataclass
class TrainData:
    """The tokenizer, the memory-mapped training sequences and the held-out sequences of a run."""

    tokenizer: Any
    tokens: packed.TokenFile
    n_sequences: int
    held_out: list


@dataclass
class Trainer:
    """Everything one optimizer step touches: the model (wrapped for the loss), optimizer, schedule, KD teacher."""

    model: Any
    loss_module: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    device: torch.device
    dtype: torch.dtype
    steps: int
    kd_teacher: Any = None
    kd_cache: Any = None


def setup_data(cfg: PretrainConfig, world: World, tokenizer) -> TrainData:
    """Tokenise and pack the corpus once into a memory-mapped file (reused later); pack the held-out set."""
    splits = packed.load_splits(cfg)
    tokens = packed.token_file(cfg, splits, tokenizer, cfg.tokenizer, world)
    held_out = packed.eval_sequences(splits.held_out, cfg.text_column, tokenizer, cfg.seq_len, cfg.max_eval_sequences,
                                     packed.scored_token_column(cfg.eval_data or cfg.data, splits.held_out, tokenizer))
    if not held_out:
        raise RefineError("the held-out split has fewer than 2 tokens; raise --eval-fraction or give --eval-data")
    n_sequences = tokens.n_sequences(cfg.seq_len)
    if n_sequences == 0:
        raise RefineError(f"{cfg.data!r} has fewer tokens than one --seq-len {cfg.seq_len} sequence; lower --seq-len or add data")
    return TrainData(tokenizer, tokens, n_sequences, held_out)


def unigram_baseline(data: TrainData) -> float:
    """Held-out loss (nats/token) of a unigram model fitted on the training tokens, on the tokens `evaluate` predicts
    (every held-out token but the first of each sequence): what a model that learnt only token frequencies scores."""
    targets = np.concatenate([sequence[1:] for sequence in data.held_out])
    return diagnostics.unigram_cross_entropy(data.tokens.chunks(), targets, len(data.tokenizer))


def setup_trainer(cfg: PretrainConfig, world: World, data: TrainData, model_config) -> Trainer:
    """The model on its device (wrapped for DDP/FSDP), AdamW, the warmup-cosine schedule and the KD source."""
    device = models.resolve_device(rank_device(cfg.device, world))
    dtype = models.resolve_dtype(cfg.dtype, device)
    model = build_model(cfg, model_config).to(device)
    model.train()
    kd_teacher = kd_cache = None
    if cfg.kd_teacher:
        kd_teacher = distill.load_teacher(cfg.kd_teacher, None, data.tokenizer, dtype, device, cfg.trust_remote_code)
    if cfg.kd_cache:
        kd_cache = distill.open_cache(cfg.kd_cache)
        kd_cache.check_matches(data.tokens, cfg.seq_len, models.tokenizer_fingerprint(data.tokenizer), cfg.kd_cache)
    loss_module = wrap_model(model, cfg, world, device, kd=kd_teacher is not None or kd_cache is not None)
    torch.manual_seed(cfg.seed + 7919 * (world.rank + 1))  # dropout: its own stream per rank
    steps = total_steps(cfg, world.world_size)
    optimizer = make_optimizer(loss_module, cfg, device)
    warmup = min(cfg.warmup_steps, steps // 10)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, steps, min_lr_rate=cfg.min_lr_ratio)
    return Trainer(model, loss_module, optimizer, scheduler, device, dtype, steps, kd_teacher, kd_cache)


def train_step(trainer: Trainer, data: TrainData, cfg: PretrainConfig, world: World, step: int) -> tuple[torch.Tensor, float]:
    """One optimizer step: this rank runs grad_accum micro-batches of its slice of the global batch.

    Returns (this rank's loss summed over its micro-batches, the gradient norm before clipping).
    """
    loss_sum = torch.zeros((), dtype=torch.float64)
    for micro in range(cfg.grad_accum):
        position = (step * cfg.grad_accum + micro) * cfg.micro_batch_size * world.world_size
        rows = packed.sample_order(position + world.rank * cfg.micro_batch_size, cfg.micro_batch_size,
                                   data.n_sequences, cfg.seed)
        batch = torch.from_numpy(data.tokens.batch(rows, cfg.seq_len)).to(trainer.device, non_blocking=True)  # (B, T)
        with no_sync(trainer.loss_module, micro == cfg.grad_accum - 1):
            with autocast(trainer.device, trainer.dtype):
                teacher = (distill.teacher_signal(trainer.kd_teacher, batch, len(data.tokenizer))
                           if trainer.kd_teacher is not None
                           else trainer.kd_cache.teacher(rows, trainer.device) if trainer.kd_cache is not None else None)
                loss = trainer.loss_module(batch, teacher) / cfg.grad_accum
            loss.backward()
        loss_sum += loss.detach().double().cpu()
    grad_norm = torch.nn.utils.clip_grad_norm_(trainer.loss_module.parameters(),
                                               cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    trainer.optimizer.step()
    trainer.scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return loss_sum, float(grad_norm)


def _pretrain(cfg: PretrainConfig, world: World) -> dict:
    started = time.time()
    output = Path(cfg.output).expanduser().absolute()
    checkpoint = find_checkpoint(output)
    if checkpoint is not None and not cfg.resume:
        raise RefineError(
            f"output {cfg.output!r} holds an unfinished run with a checkpoint; pass --resume to continue it, "
            "--overwrite to restart, or choose another --output"
        )
    if cfg.resume and checkpoint is None and world.is_main:  # e.g. killed before its first checkpoint
        tqdm.write(f"no checkpoint in {cfg.output!r} yet; starting from step 0")

    # ---- set up: data, model, optimizer, schedule; the checkpoint to continue from
    tokenizer = models.load_tokenizer(cfg.tokenizer, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise RefineError(f"tokenizer {cfg.tokenizer!r} has no EOS token, which packing needs; use another tokenizer")
    model_config = student_config(cfg, tokenizer)  # refuses a --seq-len beyond its positions before any data is read
    data = setup_data(cfg, world, tokenizer)
    if global_batch(cfg, world.world_size) > data.n_sequences:
        raise RefineError(
            f"a global batch of {global_batch(cfg, world.world_size):,} sequences (micro-batch x accumulation x processes) "
            f"exceeds the {data.n_sequences:,} packed training sequences; lower --micro-batch-size or --grad-accum, "
            "or add data"
        )
    trainer = setup_trainer(cfg, world, data, model_config)
    unigram_loss = unigram_baseline(data) if world.is_main else None  # one pass over the token file
    steps, device = trainer.steps, trainer.device
    step = (load_checkpoint(checkpoint, cfg, trainer.loss_module, trainer.model, trainer.optimizer, trainer.scheduler,
                            world) if checkpoint else 0)
    if world.is_main:
        output.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(output / METRICS, step)
    tokens_per_step = global_batch(cfg, world.world_size) * cfg.seq_len
    flops_per_token = 6 * matmul_params(trainer.model)
    peak, peak_source = ((cfg.peak_tflops * 1e12, "--peak-tflops") if cfg.peak_tflops
                         else device_peak(device, trainer.dtype))
    if world.is_main:
        tqdm.write(_plan_line(cfg, world, trainer, data, peak, peak_source))

    # ---- the loop: step, then evaluate, log and checkpoint on their schedules
    progress = tqdm(total=steps, initial=step, desc="pretrain", unit="step", dynamic_ncols=True, disable=not world.is_main)
    eval_loss = None
    window_start, window_tokens = time.time(), 0
    while step < steps:
        loss_sum, grad_norm = train_step(trainer, data, cfg, world, step)
        step += 1
        window_tokens += tokens_per_step
        record = None
        if step % cfg.eval_every == 0 or step == steps:
            eval_loss = evaluate(trainer.loss_module, data.held_out, cfg.micro_batch_size, device, trainer.dtype)
            record = {"eval_loss": eval_loss, "unigram_eval_loss": unigram_loss}
        if step % cfg.log_every == 0 or record is not None:
            if world.world_size > 1:
                loss_sum = _all_reduce_sum(loss_sum.reshape(1), device)[0] / world.world_size
            tokens_per_s = window_tokens / max(time.time() - window_start, 1e-9)
            record = {"step": step, "tokens": step * tokens_per_step, "loss": float(loss_sum),
                      "lr": trainer.scheduler.get_last_lr()[0], "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
                      "mfu": flops_per_token * tokens_per_s / (peak * world.world_size), **(record or {})}
            if world.is_main:
                _log(output / METRICS, record, progress, eval_loss)
            window_start, window_tokens = time.time(), 0
        progress.update(1)
        if step % cfg.save_every == 0 or step == steps:
            save_checkpoint(output, trainer.loss_module, trainer.model, trainer.optimizer, trainer.scheduler, step, cfg,
                            world)
    progress.close()
    if eval_loss is None:  # resumed from the final checkpoint of a run killed before it saved the model
        eval_loss = evaluate(trainer.loss_module, data.held_out, cfg.micro_batch_size, device, trainer.dtype)

    # ---- finish: the model in safetensors with its tokenizer, the manifest last
    manifest = {"stage": "pretrain", **run_info(), "settings": asdict(cfg), "model_type": trainer.model.config.model_type,
                "n_params": sum(p.numel() for p in trainer.model.parameters()), "world_size": world.world_size,
                "global_batch": global_batch(cfg, world.world_size), "steps": steps, "tokens": steps * tokens_per_step,
                "train_sequences": data.n_sequences, "token_file": str(data.tokens.directory), "eval_loss": eval_loss,
                "unigram_eval_loss": unigram_loss,
                "elapsed_s": round(time.time() - started, 1)}
    model_state, _ = full_state(trainer.loss_module, trainer.model, trainer.optimizer, cfg, world)
    if world.is_main:
        _save_final(output, trainer.model, data.tokenizer, manifest, model_state)
    world.barrier()
    return manifest if world.is_main else {"rank": world.rank}


def _log(metrics: Path, record: dict, progress, eval_loss: float | None) -> None:
    """One line of metrics.jsonl, and the same figures (with the latest held-out loss) on the progress bar."""
    with open(metrics, "a") as f:
        f.write(json.dumps(record) + "\n")
    held_out = f"{eval_loss:.3f}" if eval_loss is not None else "-"
    progress.set_postfix(loss=f"{record['loss']:.3f}", eval=held_out, tok_s=f"{record['tokens_per_s']:,.0f}",
                         mfu=f"{record['mfu']:.1%}")


def _plan_line(cfg: PretrainConfig, world: World, trainer: Trainer, data: TrainData, peak: float, source: str) -> str:
    """What the run is about to do, printed once before the first step."""
    batch = global_batch(cfg, world.world_size)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    mode = "FSDP" if cfg.fsdp and world.world_size > 1 else "DDP" if world.world_size > 1 else "single"
    kd = trainer.kd_teacher is not None or trainer.kd_cache is not None
    return (
        f"training {trainer.model.config.model_type} ({n_params / 1e6:.2f}M params) on {world.world_size} process(es) "
        f"[{mode}, {trainer.device.type}, {str(trainer.dtype).removeprefix('torch.')}]: {trainer.steps} steps x global "
        f"batch {batch} (micro {cfg.micro_batch_size} x accum {cfg.grad_accum} x {world.world_size}) x {cfg.seq_len} "
        f"tokens = {trainer.steps * batch * cfg.seq_len:,} tokens over {data.n_sequences:,} packed sequences "
        f"({trainer.steps * batch / data.n_sequences:.2f} epochs); {len(data.held_out)} held-out sequences; "
        f"{_kd_summary(cfg) if kd else 'no distillation'}; MFU against {peak / 1e12:.3g} TFLOP/s per device ({source})"
    )


def _kd_summary(cfg: PretrainConfig) -> str:
    source = f"teacher {cfg.kd_teacher}" if cfg.kd_teacher else f"top-k cache {cfg.kd_cache}"
    return f"KD from {source} (weight {cfg.kd_weight}, temperature {cfg.kd_temperature})"


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint we resume from (they will be written again)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if _logged_step(line) <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _logged_step(line: str) -> float:
    """The step of one metrics line; a line a killed run left half-written counts as past every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def _save_final(output: Path, model, tokenizer, manifest: dict, state_dict: dict | None = None) -> None:
    """save_pretrained into a staging dir, move each file into place, write the manifest last.

    The file names go into run.json before they are moved, so a run killed half-way through the move
    still owns every file it left (and a rerun may replace them).
    """
    staging = output / "final.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(staging)
    names = sorted((f.name for f in staging.iterdir()), key=lambda name: name == "config.json")  # config.json last
    run = json.loads((output / RUN_FILE).read_text())
    write_json(output / RUN_FILE, {**run, "files": [{"path": name} for name in names]})
    for name in names:
        (staging / name).replace(output / name)
    staging.rmdir()
    write_manifest(output, manifest, [*names, METRICS])
