"""Typed configs, one dataclass per stage, loaded from YAML with CLI overrides on top.

Each field carries its help text in `metadata["help"]`; the CLI reads it from there, so the
YAML keys, the dataclass and `--help` can never drift apart.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TypeVar

import yaml

from refine.errors import RefineError


def option(default: Any, help: str, result: bool = True) -> Any:
    """A config field. `result=False` marks a setting that cannot change the output (device, batch budget, ...):
    a rerun may change it and still resume, and it is left out of the settings a run is compared by."""
    return field(default=default, metadata={"help": help, "result": result})


def required(help: str, result: bool = True) -> Any:
    return field(default=None, metadata={"help": help, "required": True, "result": result})


@dataclass
class CorpusArgs:
    """Where a corpus comes from; shared by every stage that reads one."""

    split: str = option("train", "Split to read when DATA is a hub dataset or a dataset dict.")
    name: Optional[str] = option(None, "Configuration (subset) name of a hub dataset.")
    text_column: str = option("text", "Column holding each document's text.")


@dataclass
class ScoreConfig(CorpusArgs):
    data: Optional[str] = required(
        "Corpus to score: a hub dataset name, local .jsonl/.json/.parquet/.csv/.txt/.arrow files, a glob, "
        "a directory of such files, or a `save_to_disk` directory."
    )
    teacher: Optional[str] = required("Teacher LM: hub id, local directory or .gguf file.")
    reference: Optional[str] = required(
        "Reference LM (small, trained on a random split of the corpus): hub id, local directory or .gguf file. "
        "Must use the teacher's tokenizer."
    )
    output: Optional[str] = required("Directory for the scores (Parquet shards + manifest.json).", result=False)
    id_column: Optional[str] = option(None, "Column with a unique id per document; default: the row index.")
    teacher_revision: Optional[str] = option(None, "Hub revision (branch, tag or commit) of the teacher.")
    reference_revision: Optional[str] = option(None, "Hub revision (branch, tag or commit) of the reference.")
    unit: str = option(
        "document",
        "What one instance is. `document`: each document, split into windows of --max-length tokens "
        "when longer (every token scored). `chunk`: documents joined with EOS and cut into --max-length "
        "token chunks, as in MiniPLM.",
    )
    normalize: Optional[str] = option(
        None,
        "What the score is per. `tokens`: (log p_teacher - log p_ref) / tokens, MiniPLM's score; needs one "
        "tokenizer for both models. `bytes`: each model reads the document through its own tokenizer and the "
        "difference is divided by the document's UTF-8 bytes, so any teacher pairs with any reference. "
        "Default: tokens when the tokenizers match, else bytes.",
    )
    max_length: int = option(1024, "Longest sequence (tokens) a model reads in one forward pass.")
    proxy_fraction: Optional[float] = option(
        None,
        "Score only this random fraction (e.g. 0.05) with teacher and reference; train a proxy (the reference with a "
        "regression head) on it and predict the rest (MiniPLM_prx). Rows carry `exact`; the manifest reports the "
        "proxy's held-out Spearman correlation, top-alpha overlap and FLOPs saved.",
    )
    proxy_alpha: float = option(0.5, "With --proxy-fraction: the alpha at which the top-alpha overlap is reported.")
    proxy_epochs: int = option(10, "With --proxy-fraction: passes over the exactly scored documents to train the proxy.")
    proxy_lr: float = option(1e-3, "With --proxy-fraction: learning rate of the proxy's fine-tuning.")
    proxy_seed: int = option(0, "With --proxy-fraction: seed of the exact subset, the held-out split and the head.")
    max_tokens_per_batch: Optional[int] = option(
        None,
        "Token budget of one batch (sequences x padded length); batches are filled with similar lengths. "
        "Default: 1024 (or --max-length if longer) on CPU; on CUDA start at 262144 and halve on out-of-memory.",
        result=False
    )
    shard_size: int = option(10000, "Documents per output shard; each finished shard is written atomically.")
    device: str = option("auto", "`auto` (CUDA if available, else CPU), `cpu`, `cuda` or `cuda:N`; under torchrun each rank takes its own GPU.", result=False)
    dtype: str = option("auto", "`auto` (bf16 on CUDA, fp32 on CPU), `float32`, `bfloat16` or `float16`.")
    compile: bool = option(False, "Compile the models' bodies with torch.compile (dynamic shapes); pays off on long runs.", result=False)
    nproc: int = option(1, "Processes to launch on this machine with torchrun (e.g. one per GPU); shards are dealt round-robin.", result=False)
    trust_remote_code: bool = option(False, "Allow models/tokenizers to run code from their repository.")
    overwrite: bool = option(False, "Replace an output directory that already holds a result.", result=False)


@dataclass
class SampleConfig:
    scores: Optional[str] = required("Scores directory written by `refine score`.")
    output: Optional[str] = required("Directory for the refined dataset (Parquet shards that `load_dataset` opens).", result=False)
    alpha: float = option(0.5, "Fraction of instances to keep, in (0, 1]; exactly ceil(alpha*N) are kept.")
    method: str = option(
        "difference",
        "Selection rule. `difference`: highest log p_teacher - log p_ref per token (MiniPLM). "
        "`random`: uniform at random (seeded). `teacher`: lowest teacher NLL per token (perplexity filtering). "
        "`reference`: lowest reference NLL per token.",
    )
    seed: int = option(0, "Seed of the `random` method.")
    data: Optional[str] = option(
        None, "Corpus the scores were made from; default: the source recorded in the scores' manifest."
    )
    shard_size_mb: int = option(500, "Approximate size of each output Parquet shard, in MB.")
    push_to_hub: Optional[str] = option(None, "Also upload the refined dataset to this Hub dataset repo (or fsspec URL), as `refine push` does.", result=False)
    private: bool = option(False, "With --push-to-hub: create the repo as private.", result=False)
    token: Optional[str] = option(None, "Hub token for --push-to-hub; default: HF_TOKEN or the `hf auth login` cache. Never printed.", result=False)
    overwrite: bool = option(False, "Replace an output directory that already holds a result.", result=False)


@dataclass
class ReportConfig:
    scores: Optional[str] = required("Scores directory written by `refine score`.")
    output: str = option("report.html", "HTML file to write (self-contained: figures are embedded).", result=False)
    data: Optional[str] = option(None, "Corpus the scores were made from; default: the source recorded in the scores' manifest.")
    alpha: float = option(0.5, "Fraction kept by difference sampling, in (0, 1], to mark on the figures.")
    group_column: Optional[str] = option(None, "Corpus column to break the selection down by (e.g. domain, source).")
    n_examples: int = option(5, "Examples shown at the top, bottom and boundary of the ranking.")
    excerpt_chars: int = option(400, "Characters of each example's text shown.")


@dataclass
class PushConfig:
    refined: Optional[str] = required("Refined dataset directory written by `refine sample`.")
    target: Optional[str] = required(
        "Where to publish: a Hub dataset repo id (user/name), or an fsspec URL (s3://bucket/path, gs://..., a local path)."
    )
    private: bool = option(False, "Create the Hub repo as private (an existing repo keeps its visibility).")
    revision: Optional[str] = option(None, "Hub branch to commit to (created if missing); default: main.")
    token: Optional[str] = option(None, "Hub token; default: HF_TOKEN or the `hf auth login` cache. Never printed or logged.")
    commit_message: Optional[str] = option(None, "Hub commit message; default: one naming the method and alpha.")


@dataclass
class PretrainConfig(CorpusArgs):
    data: Optional[str] = required("Training corpus (any DATA form that `refine score` accepts; e.g. a refined directory).")
    model_config: Optional[str] = required(
        "Student architecture: a preset shipped with refine (e.g. qwen-200m, tiny-llama), a config.json, "
        "a model directory or a hub id (config only; weights start from scratch)."
    )
    tokenizer: Optional[str] = required("Tokenizer: hub id, local directory or .gguf file.")
    output: Optional[str] = required("Directory for checkpoints, metrics.jsonl and the final model.", result=False)
    eval_data: Optional[str] = option(None, "Held-out corpus for evaluation; default: --eval-fraction of DATA's documents.")
    eval_fraction: float = option(0.02, "Fraction of documents held out for evaluation when --eval-data is not given.")
    eval_every: int = option(100, "Evaluate the held-out loss every this many optimizer steps (and at the end).")
    max_eval_sequences: int = option(64, "At most this many packed held-out sequences per evaluation.")
    seq_len: int = option(1024, "Length (tokens) of each packed training sequence.")
    micro_batch_size: int = option(8, "Sequences per forward/backward pass, per process.", result=False)
    grad_accum: int = option(
        1, "Micro-batches accumulated per optimizer step. Global batch = micro-batch x accumulation x processes.",
        result=False
    )
    max_steps: Optional[int] = option(None, "Training budget in optimizer steps (give this or --max-tokens).")
    max_tokens: Optional[int] = option(
        None, "Training budget in tokens over all processes (global); converted to steps, rounded up."
    )
    lr: float = option(6e-4, "Peak learning rate.")
    min_lr_ratio: float = option(0.1, "Final learning rate as a fraction of the peak (cosine decay).")
    warmup_steps: int = option(100, "Linear warmup steps (capped at 10% of the total).")
    weight_decay: float = option(0.1, "AdamW weight decay.")
    adam_beta1: float = option(0.9, "AdamW beta1.")
    adam_beta2: float = option(0.95, "AdamW beta2.")
    grad_clip: float = option(1.0, "Clip the gradient norm to this value (0 disables).")
    seed: int = option(0, "Seed for initialisation, the held-out split and data order.")
    save_every: int = option(500, "Write a resumable checkpoint every this many steps.")
    log_every: int = option(10, "Append a line to metrics.jsonl every this many steps.", result=False)
    resume: bool = option(
        False,
        "Continue from the checkpoint in --output: same data position, optimizer, schedule and RNG. The number of "
        "processes may change if the global batch stays the same.",
        result=False
    )
    token_cache: Optional[str] = option(
        None,
        "Directory of tokenised, packed corpora (memory-mapped), reused by every run with the same corpus, "
        "tokenizer and held-out split; default: $REFINE_CACHE/tokens or ~/.cache/refine/tokens.",
        result=False
    )
    device: str = option("auto", "`auto` (CUDA if available, else CPU), `cpu`, `cuda` or `cuda:N`.", result=False)
    dtype: str = option("auto", "Autocast dtype: `auto` (bf16 on CUDA, fp32 on CPU), `float32` or `bfloat16`.")
    lean_loss: bool = option(
        True,
        "Compute the loss chunk by chunk from the final hidden states, never holding the batch's full-vocabulary "
        "logits (for families with a plain LM head; others use the model's own loss).",
        result=False
    )
    compile: bool = option(False, "Compile the model with torch.compile; pays off on long runs.", result=False)
    activation_checkpointing: bool = option(
        False, "Recompute activations in the backward pass: less memory, about a third more compute.",
        result=False
    )
    fsdp: bool = option(
        False,
        "Shard parameters, gradients and optimizer state over the processes (FSDP2 `fully_shard`) instead of "
        "replicating the model (DDP); for students whose optimizer state does not fit one GPU.",
    )
    peak_tflops: Optional[float] = option(
        None,
        "Peak dense TFLOP/s of one device, for the MFU figure; default: the datasheet bf16 peak of known GPUs, "
        "else a measured matmul rate.",
        result=False
    )
    nproc: int = option(1, "Processes to launch on this machine with torchrun (e.g. one per GPU), data parallel.", result=False)
    kd_teacher: Optional[str] = option(
        None,
        "Online token-level distillation from this teacher (hub id, directory or .gguf), run in inference mode in "
        "the same process; it must use --tokenizer's vocabulary.",
    )
    kd_cache: Optional[str] = option(
        None, "Distil from an offline top-k cache written by `refine distill-cache` (instead of --kd-teacher)."
    )
    kd_weight: float = option(
        0.5,
        "Weight w of the distillation term: loss = (1 - w) * CE(data) + w * tau^2 * KL(teacher^tau || student^tau) "
        "per token (forward KL). 1 means pure distillation (no data loss); 0 switches KD off.",
    )
    kd_temperature: float = option(1.0, "Temperature tau of teacher and student distributions in the KD term.")
    trust_remote_code: bool = option(False, "Allow configs/tokenizers to run code from their repository.")
    overwrite: bool = option(False, "Replace an output directory that already holds a finished model.", result=False)


@dataclass
class PlanConfig:
    student_params: Optional[str] = required("Student size in non-embedding parameters, e.g. 200M.")
    tokens: Optional[str] = option(None, "Student training (distillation) tokens D_S, e.g. 10B; or give --compute.")
    teacher_loss: Optional[float] = option(None, "Teacher cross-entropy L_T in nats/token (or --from-scores).")
    from_scores: Optional[str] = option(None, "Read L_T as the teacher's measured NLL per token in a `refine score` output.")
    teacher_params: Optional[str] = option(None, "Teacher size, e.g. 1.8B: adds its logit cost 2 N_T D_S to the compute.")
    teacher_tokens: Optional[str] = option(
        None, "Teacher training tokens D_T, e.g. 3T: adds 6 N_T D_T in the scenarios that count teacher training."
    )
    compute: Optional[str] = option(
        None, "Compute budget in FLOPs (e.g. 1e21): find the best teacher (of --candidate) and token count for it."
    )
    candidate: Optional[list] = option(
        None,
        "Candidate teacher for --compute, as PARAMS:LOSS for an existing one (e.g. 1.8B:2.3) or PARAMS for one to be "
        "trained within the budget; repeatable. Default: the --teacher-params/--teacher-loss teacher.",
    )
    scenario: str = option(
        "teacher-inference",
        "Which teacher costs count (paper's Table 2): best-case, teacher-inference, teacher-pretraining, "
        "teacher-pretraining-and-inference.",
    )
    plot: Optional[str] = option(None, "Also draw student loss vs teacher loss (the capacity-gap U) to this PNG.")


@dataclass
class DistillCacheConfig(CorpusArgs):
    data: Optional[str] = required(
        "Training corpus exactly as `refine pretrain` will read it (e.g. a refined directory)."
    )
    teacher: Optional[str] = required("Teacher LM: hub id, local directory or .gguf file; its tokenizer is the student's.")
    output: Optional[str] = required("Directory for the cache (shards of top-k ids and log-probs, meta.json last).", result=False)
    top_k: int = option(64, "Teacher tokens kept per position (the most probable ones).")
    logprob_dtype: str = option(
        "float16", "Storage of the kept log-probs: `float16` (2 bytes each) or `float32` (4 bytes, exact)."
    )
    seq_len: int = option(1024, "Packed sequence length; must equal the student's --seq-len.")
    eval_data: Optional[str] = option(None, "As in `refine pretrain`: a held-out corpus, so no documents are held out of DATA.")
    eval_fraction: float = option(0.02, "As in `refine pretrain`: fraction of documents held out (not cached).")
    seed: int = option(0, "As in `refine pretrain`: the seed of the held-out split.")
    token_cache: Optional[str] = option(None, "As in `refine pretrain`: where tokenised, packed corpora are kept.")
    teacher_revision: Optional[str] = option(None, "Hub revision (branch, tag or commit) of the teacher.")
    batch_size: int = option(8, "Sequences per teacher forward pass.", result=False)
    shard_sequences: int = option(1024, "Packed sequences per cache shard; each finished shard is written atomically.")
    device: str = option("auto", "`auto` (CUDA if available, else CPU), `cpu`, `cuda` or `cuda:N`; under torchrun each rank takes its own GPU.", result=False)
    dtype: str = option("auto", "`auto` (bf16 on CUDA, fp32 on CPU), `float32` or `bfloat16`.")
    nproc: int = option(1, "Processes to launch on this machine with torchrun (e.g. one per GPU); shards are dealt round-robin.", result=False)
    trust_remote_code: bool = option(False, "Allow models/tokenizers to run code from their repository.")
    overwrite: bool = option(False, "Replace an output directory that already holds a finished cache.", result=False)


Config = TypeVar("Config")


def result_settings(cfg) -> dict:
    """The settings that define a run's result (fields not marked `result=False`), for resume checks and manifests."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.metadata.get("result", True)}


def field_help(cls: type, name: str) -> str:
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    help_text = f.metadata["help"]
    if not f.metadata.get("required") and f.default is not None:
        help_text += f" [default: {f.default}]"
    return help_text


def load_config(cls: type[Config], yaml_path: Optional[str] = None, overrides: Optional[dict] = None) -> Config:
    """Build `cls` from YAML values, then CLI overrides (None means "not given"), then check every field."""
    values: dict[str, Any] = {}
    if yaml_path:
        values.update(read_yaml(yaml_path, cls))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    config = cls(**values)
    missing = [
        f"--{f.name.replace('_', '-')} is required (give it on the command line or as `{f.name}:` in --config)"
        for f in dataclasses.fields(cls)
        if f.metadata.get("required") and getattr(config, f.name) in (None, "")
    ]
    if missing:
        raise RefineError(*missing)
    return config


def read_yaml(path: str, cls: type) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise RefineError(f"config file {path} not found; check the --config path")
    try:
        values = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0]
        raise RefineError(f"config file {path} is not valid YAML ({first}); fix the file") from None
    if not isinstance(values, dict):
        raise RefineError(f"config file {path} must be a mapping of option names to values")
    known = {f.name: f for f in dataclasses.fields(cls)}
    problems = [
        f"unknown key `{k}` in {path}; valid keys: {', '.join(sorted(known))}" for k in values if k not in known
    ]
    if problems:
        raise RefineError(*problems)
    return values
