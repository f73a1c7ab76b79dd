"""Typed configs, one dataclass per stage, loaded from YAML with CLI overrides on top.

Every field is declared once, here: its type (the annotation), its help text, what values it accepts
(`check=`) and whether it changes the result (`result=`). The CLI is generated from these fields
(refine/cli.py) and `load_config` checks every value, from a flag or from YAML alike, reporting all
problems at once. Rules that tie several fields together are declared with `@rule` after each class.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import yaml

from refine.errors import RefineError


@dataclass(frozen=True)
class Check:
    """What a field's value must be besides its type: inside a range, one of some choices, or ending in a suffix.

    `fix` replaces the default advice in the error (e.g. "give the fraction to keep, e.g. 0.5").
    """

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False  # (low, ...] instead of [low, ...]
    high_open: bool = False
    choices: tuple = ()
    suffixes: tuple = ()
    fix: Optional[str] = None

    def problem(self, value: Any) -> Optional[str]:
        """None when `value` passes, else "<what is wrong>; <fix>" to follow the option and its value."""
        if self.choices and value not in self.choices:
            return f"is not one of {', '.join(self.choices)}; {self.fix or 'choose one of them'}"
        if self.suffixes and not str(value).lower().endswith(self.suffixes):
            return f"should end in {' or '.join(self.suffixes)}; {self.fix or 'rename it'}"
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if not (below or above):
            return None
        if self.high is None:
            what = "must be positive" if self.low == 0 and self.low_open else (
                f"must be above {self.low}" if self.low_open else f"must be at least {self.low}")
            return f"{what}; {self.fix or ('give a number above 0' if self.low == 0 and self.low_open else f'give {self.low} or more')}"
        interval = f"{'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        return f"is outside {interval}; {self.fix or f'give a value in {interval}'}"


def at_least(low: float, fix: Optional[str] = None) -> Check:
    return Check(low=low, fix=fix)


def positive(fix: Optional[str] = None) -> Check:
    return Check(low=0, low_open=True, fix=fix)


def between(low: float, high: float, *, low_open: bool = False, high_open: bool = False, fix: Optional[str] = None) -> Check:
    return Check(low=low, high=high, low_open=low_open, high_open=high_open, fix=fix)


def one_of(*choices: str, fix: Optional[str] = None) -> Check:
    return Check(choices=choices, fix=fix)


SEED = between(0, 2**32 - 1, fix="give a seed from 0 to 4294967295")  # what numpy and torch both accept


def option(default: Any, help: str, result: bool = True, check: Optional[Check] = None, finite: bool = True) -> Any:
    """A config field.

    `result=False` marks a setting that cannot change the output (device, batch budget, ...): a rerun may
    change it and still resume, and it is left out of the settings a run is compared by. `check` says which
    values are accepted (see `Check`); floats must be finite unless `finite=False`.
    """
    return field(default=default, metadata={"help": help, "result": result, "check": check, "finite": finite})


def required(help: str, result: bool = True, check: Optional[Check] = None) -> Any:
    """A field with no default: it must come from the command line or the YAML file."""
    return field(default=None, metadata={"help": help, "required": True, "result": result, "check": check, "finite": True})


class Checked:
    """Base of every config: `cfg.check()` checks a config built in code as `load_config` checks one from the CLI."""

    def check(self) -> None:
        check_config(self)


@dataclass
class CorpusArgs(Checked):
    """Where a corpus comes from; shared by every stage that reads one."""

    split: str = option("train", "Split to read when DATA is a hub dataset or a dataset dict.")
    name: Optional[str] = option(None, "Configuration (subset) name of a hub dataset.")
    text_column: str = option("text", "Column holding each document's text.")


@dataclass
class TaskArgs(Checked):
    """How a stage's independent tasks run, through datatrove's executors (refine/engine.py); none changes a result."""

    executor: str = option(
        "local",
        "Where the tasks run: `local` (processes on this machine), `slurm` (one array job; this command waits for it) "
        "or `ray` (a Ray cluster: --ray-address, else a local one).",
        result=False, check=one_of("local", "slurm", "ray"),
    )
    tasks: int = option(1, "Independent tasks the work is split into; each can fail and be rerun alone. score and "
                           "distill-cache: task t takes shards t, t+N, ... and loads the model(s) once; sample: task t "
                           "writes the kept rows of the t-th of N equal row ranges of the corpus (of the scores, for chunks).",
                        result=False, check=at_least(1))
    workers: Optional[int] = option(None, "Tasks running at once (local: processes on this machine); default: local, "
                                          "one per GPU when the tasks run on GPUs (--device auto or cuda), else all of "
                                          "them; Slurm/Ray: all of them.", result=False, check=at_least(1))
    logging_dir: Optional[str] = option(
        None, "Task logs and completion files (datatrove's logging dir; Slurm logs too; sample's parts until its dataset "
              "is in place); default `.<output name>.tasks` beside --output. Must be reachable from every task.",
        result=False)
    cpus_per_task: int = option(1, "Slurm/Ray: CPUs reserved per task.", result=False, check=at_least(1))
    gpus_per_task: int = option(0, "Slurm/Ray: GPUs reserved per task (each task runs on its own GPU).", result=False,
                                check=at_least(0))
    mem_per_cpu_gb: float = option(2.0, "Slurm/Ray: memory reserved per CPU, in GB.", result=False, check=positive())
    slurm_partition: Optional[str] = option(None, "Slurm partition to submit to (needed with --executor slurm).", result=False)
    slurm_time: str = option("24:00:00", "Slurm time limit of each task (HH:MM:SS or D-HH:MM:SS).", result=False)
    slurm_env_command: Optional[str] = option(
        None, "Slurm: shell command run before each task to enter refine's environment, e.g. `source .venv/bin/activate`; "
              "default: none (the job inherits this shell's environment).", result=False)
    ray_address: Optional[str] = option(None, "Ray: address of an existing cluster (e.g. `auto` or `10.0.0.1:6379`); "
                                              "default: start a local one on this machine.", result=False)


@dataclass
class ReferenceCheckArgs(Checked):
    """When to call the reference too weak to matter; shared by the stages that print that warning."""

    # Measured with the SmolLM2-135M teacher: a 2.4M reference trained 80 steps on the teacher's 49k vocabulary overlapped
    # 97% (near-uniform NLL everywhere); a 1.4M one with its own 4,096 vocabulary, 400 steps, per-byte scores, 60%.
    weak_reference_overlap: float = option(
        0.9,
        "Warn that the reference adds almost nothing when the difference selection shares more than this fraction "
        "of its instances with the teacher-NLL (perplexity filtering) selection of the same size; a random "
        "selection of a fraction alpha shares alpha. 1 never warns.",
        result=False, check=between(0, 1),
    )


@dataclass
class ScoreConfig(TaskArgs, ReferenceCheckArgs, CorpusArgs):
    data: Optional[str] = required(
        "Corpus to score: a hub dataset name, local .jsonl/.json/.parquet/.csv/.txt/.arrow files, a glob, "
        "a directory of such files, or a `save_to_disk` directory; or an fsspec URL of .jsonl/.parquet/.csv files "
        "(s3://bucket/prefix/*.jsonl, hf://datasets/owner/name/data/*.parquet), read as a stream with no local copy."
    )
    teacher: Optional[str] = required("Teacher LM: hub id, local directory or .gguf file.")
    reference: Optional[str] = required(
        "Reference LM (small, trained on a random split of the corpus): hub id, local directory or .gguf file. "
        "With the teacher's tokenizer the score is per token (MiniPLM); with its own, per byte (--normalize bytes)."
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
        check=one_of("document", "chunk"),
    )
    normalize: Optional[str] = option(
        None,
        "What the score is per. `tokens`: (log p_teacher - log p_ref) / tokens, MiniPLM's score; needs one "
        "tokenizer for both models. `bytes`: each model reads the document through its own tokenizer and the "
        "difference is divided by the document's UTF-8 bytes, so any teacher pairs with any reference. "
        "Default: tokens when the tokenizers match, else bytes.",
        check=one_of("tokens", "bytes"),
    )
    max_length: int = option(1024, "Longest sequence (tokens) a model reads in one forward pass.",
                             check=at_least(2, "use at least 2 tokens"))
    proxy_fraction: Optional[float] = option(
        None,
        "Score only this random fraction (e.g. 0.05) with teacher and reference; train a proxy (the reference with a "
        "regression head) on it and predict the rest (MiniPLM_prx). Rows carry `exact`; the manifest reports the "
        "proxy's held-out Spearman correlation, top-alpha overlap and FLOPs saved.",
        check=between(0, 1, low_open=True, high_open=True, fix="give the fraction to score exactly, e.g. 0.05"),
    )
    proxy_alpha: float = option(0.5, "With --proxy-fraction: the alpha at which the top-alpha overlap is reported.",
                                check=between(0, 1, low_open=True))
    proxy_epochs: int = option(10, "With --proxy-fraction: passes over the exactly scored documents to train the proxy.",
                               check=at_least(1))
    proxy_lr: float = option(1e-3, "With --proxy-fraction: learning rate of the proxy's fine-tuning.", check=positive())
    proxy_seed: int = option(0, "With --proxy-fraction: seed of the exact subset, the held-out split and the head.",
                             check=SEED)
    max_tokens_per_batch: Optional[int] = option(
        None,
        "Token budget of one batch (sequences x padded length); batches are filled with similar lengths. "
        "Default: 1024 (or --max-length if longer) on CPU; on CUDA start at 262144 and halve on out-of-memory.",
        result=False, check=at_least(1),
    )
    shard_size: int = option(10000, "Documents per output shard; each finished shard is written atomically.",
                             check=at_least(1))
    device: str = option("auto", "`auto` (CUDA if available, else CPU), `cpu`, `cuda` or `cuda:N`; under torchrun each rank takes its own GPU.", result=False)
    dtype: str = option("auto", "`auto` (bf16 on CUDA, fp32 on CPU), `float32`, `bfloat16` or `float16`.",
                        check=one_of("auto", "float32", "bfloat16", "float16"))
    compile: bool = option(False, "Compile the models' bodies with torch.compile (dynamic shapes); pays off on long runs.", result=False)
    nproc: int = option(1, "Processes to launch on this machine with torchrun (e.g. one per GPU); shards are dealt round-robin.",
                        result=False, check=at_least(1))
    trust_remote_code: bool = option(False, "Allow models/tokenizers to run code from their repository.")
    full_fingerprint: bool = option(
        False, "Fingerprint the corpus by hashing every id and text too (slower: reads the whole corpus). Default: "
        "hash the files read (names, sizes, modification times), the row count and the column names.")
    overwrite: bool = option(False, "Replace an output directory that already holds a result.", result=False)


@dataclass
class SelectionArgs(Checked):
    """Which instances a selection keeps; shared by `sample` (which keeps them) and `report` (which shows them)."""

    alpha: Optional[float] = option(
        None, "Fraction of instances to keep, in (0, 1]; exactly ceil(alpha*N) are kept. Default 0.5 when neither "
        "--tokens nor --token-fraction is given.", check=between(0, 1, low_open=True, fix="give the fraction to keep, e.g. 0.5"))
    tokens: Optional[int] = option(
        None, "Tokens to keep instead of --alpha (the scores' n_tokens, i.e. teacher tokens): the shortest prefix of the "
        "ranking that holds at least this many.", check=at_least(1, "give the number of tokens to keep"))
    token_fraction: Optional[float] = option(
        None, "Fraction of the corpus's tokens to keep instead of --alpha, in (0, 1]: --tokens ceil(F * all tokens).",
        check=between(0, 1, low_open=True, fix="give the fraction of tokens to keep, e.g. 0.5"))
    temperature: float = option(
        0.0, "0: keep the best-ranked instances. Above 0: sample them without replacement with probability "
        "proportional to exp(key / temperature) (Gumbel top-k; key in the method's units, e.g. nats per token), "
        "seeded by --seed and each instance's id.", check=at_least(0, "give 0 for the top instances or a positive temperature"))
    seed: int = option(0, "Seed of the `random` method and of --temperature's draw.", check=SEED)
    group_column: Optional[str] = option(
        None, "Corpus column whose values group the documents (e.g. domain, source). `sample` selects within each group "
        "(see --balance); `report` breaks its figures down by it.")
    balance: Optional[str] = option(
        None, "With --group-column, how the budget is split among groups: `proportional` (each group keeps its share of "
        "the corpus, in instances for --alpha, in tokens for a token budget), `equal`, or a YAML file {group: share}. "
        "Default: proportional in `sample`; in `report`, none (the unbalanced selection, broken down by group).")


@dataclass
class SampleConfig(TaskArgs, SelectionArgs, ReferenceCheckArgs):
    scores: Optional[str] = required("Scores directory written by `refine score`.")
    output: Optional[str] = required("Directory for the refined dataset (Parquet shards that `load_dataset` opens).", result=False)
    method: str = option(
        "difference",
        "Selection rule. `difference`: highest log p_teacher - log p_ref per token (MiniPLM). "
        "`random`: uniform at random (seeded). `teacher`: lowest teacher NLL per token (perplexity filtering). "
        "`reference`: lowest reference NLL per token.",
        check=one_of("difference", "random", "teacher", "reference"),
    )
    data: Optional[str] = option(
        None, "Corpus the scores were made from; default: the source recorded in the scores' manifest."
    )
    shard_size_mb: int = option(500, "Approximate size of each output Parquet shard, in MB.", check=at_least(1))
    push_to_hub: Optional[str] = option(None, "Also upload the refined dataset to this Hub dataset repo (or fsspec URL), as `refine push` does.", result=False)
    private: bool = option(False, "With --push-to-hub: create the repo as private.", result=False)
    token: Optional[str] = option(None, "Hub token for --push-to-hub; default: HF_TOKEN or the `hf auth login` cache. Never printed.", result=False)
    overwrite: bool = option(False, "Replace an output directory that already holds a result.", result=False)


@dataclass
class ReportConfig(SelectionArgs, ReferenceCheckArgs):
    scores: Optional[str] = required("Scores directory written by `refine score`.")
    output: str = option("report.html", "HTML file to write (self-contained: figures are embedded).", result=False,
                         check=Check(suffixes=(".html", ".htm"), fix="name an .html file"))
    data: Optional[str] = option(None, "Corpus the scores were made from; default: the source recorded in the scores' manifest.")
    n_examples: int = option(5, "Examples shown at the top, bottom and boundary of the ranking.", check=at_least(1))
    excerpt_chars: int = option(400, "Characters of each example's text shown.", check=at_least(1))


@dataclass
class PushConfig(Checked):
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
    data: Optional[str] = required("Training corpus (any local or hub DATA form that `refine score` accepts; e.g. a refined directory).")
    model_config: Optional[str] = required(
        "Student architecture: a preset shipped with refine (e.g. qwen-200m, tiny-llama), a config.json, "
        "a model directory or a hub id (config only; weights start from scratch)."
    )
    tokenizer: Optional[str] = required("Tokenizer: hub id, local directory or .gguf file.")
    output: Optional[str] = required("Directory for checkpoints, metrics.jsonl and the final model.", result=False)
    eval_data: Optional[str] = option(None, "Held-out corpus for evaluation; default: --eval-fraction of DATA's documents.")
    eval_fraction: float = option(0.02, "Fraction of documents held out for evaluation when --eval-data is not given.",
                                  check=between(0, 1, low_open=True, high_open=True))
    eval_every: int = option(100, "Evaluate the held-out loss every this many optimizer steps (and at the end).",
                             check=at_least(1))
    max_eval_sequences: int = option(64, "At most this many packed held-out sequences per evaluation.", check=at_least(1))
    seq_len: int = option(1024, "Length (tokens) of each packed training sequence.",
                          check=at_least(2, "use at least 2 (one token predicts the next)"))
    micro_batch_size: int = option(8, "Sequences per forward/backward pass, per process.", result=False, check=at_least(1))
    grad_accum: int = option(
        1, "Micro-batches accumulated per optimizer step. Global batch = micro-batch x accumulation x processes.",
        result=False, check=at_least(1),
    )
    max_steps: Optional[int] = option(None, "Training budget in optimizer steps (give this or --max-tokens).",
                                      check=positive("give a training budget above 0"))
    max_tokens: Optional[int] = option(
        None, "Training budget in tokens over all processes (global); converted to steps, rounded up.",
        check=positive("give a training budget above 0"),
    )
    lr: float = option(6e-4, "Peak learning rate.", check=positive())
    min_lr_ratio: float = option(0.1, "Final learning rate as a fraction of the peak (cosine decay).", check=between(0, 1))
    warmup_steps: int = option(100, "Linear warmup steps (capped at 10% of the total).", check=at_least(0))
    weight_decay: float = option(0.1, "AdamW weight decay.", check=at_least(0))
    adam_beta1: float = option(0.9, "AdamW beta1.", check=between(0, 1, high_open=True))
    adam_beta2: float = option(0.95, "AdamW beta2.", check=between(0, 1, high_open=True))
    grad_clip: float = option(1.0, "Clip the gradient norm to this value (0 disables).", check=at_least(0))
    seed: int = option(0, "Seed for initialisation, the held-out split and data order.", check=SEED)
    save_every: int = option(500, "Write a resumable checkpoint every this many steps.", check=at_least(1))
    log_every: int = option(10, "Append a line to metrics.jsonl every this many steps.", result=False, check=at_least(1))
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
    tokenize_workers: Optional[int] = option(
        None,
        "Processes that tokenise the corpus into the token cache when it is built (each takes parts of 10,000 "
        "documents); default: every CPU this process may use. The token file is the same whatever the number.",
        result=False, check=at_least(1),
    )
    device: str = option("auto", "`auto` (CUDA if available, else CPU), `cpu`, `cuda` or `cuda:N`.", result=False)
    dtype: str = option("auto", "Autocast dtype: `auto` (bf16 on CUDA, fp32 on CPU), `float32` or `bfloat16`.",
                        check=one_of("auto", "float32", "bfloat16"))
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
        result=False, check=positive(),
    )
    nproc: int = option(1, "Processes to launch on this machine with torchrun (e.g. one per GPU), data parallel.",
                        result=False, check=at_least(1))
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
        check=between(0, 1),
    )
    kd_temperature: float = option(1.0, "Temperature tau of teacher and student distributions in the KD term.",
                                   check=positive())
    trust_remote_code: bool = option(False, "Allow configs/tokenizers to run code from their repository.")
    overwrite: bool = option(False, "Replace an output directory that already holds a finished model.", result=False)


@dataclass
class PlanConfig(Checked):
    student_params: Optional[str] = required("Student size in non-embedding parameters, e.g. 200M.")
    tokens: Optional[str] = option(None, "Student training (distillation) tokens D_S, e.g. 10B; or give --compute.")
    teacher_loss: Optional[float] = option(None, "Teacher cross-entropy L_T in nats/token (or --from-scores).",
                                           check=positive("give the teacher's cross-entropy in nats per token"))
    from_scores: Optional[str] = option(None, "Read L_T as the teacher's measured NLL per token in a `refine score` output.")
    teacher_params: Optional[str] = option(None, "Teacher size, e.g. 1.8B: adds its logit cost 2 N_T D_S to the compute.")
    teacher_tokens: Optional[str] = option(
        None, "Teacher training tokens D_T, e.g. 3T: adds 6 N_T D_T in the scenarios that count teacher training."
    )
    compute: Optional[str] = option(
        None, "Compute budget in FLOPs (e.g. 1e21): find the best teacher (of --candidate) and token count for it."
    )
    candidate: Optional[list[str]] = option(
        None,
        "Candidate teacher for --compute, as PARAMS:LOSS for an existing one (e.g. 1.8B:2.3) or PARAMS for one to be "
        "trained within the budget; repeatable. Default: the --teacher-params/--teacher-loss teacher.",
    )
    scenario: str = option(
        "teacher-inference",
        "Which teacher costs count (paper's Table 2): best-case, teacher-inference, teacher-pretraining, "
        "teacher-pretraining-and-inference.",
        check=one_of("best-case", "teacher-inference", "teacher-pretraining", "teacher-pretraining-and-inference"),
    )
    plot: Optional[str] = option(None, "Also draw student loss vs teacher loss (the capacity-gap U) to this PNG.",
                                 check=Check(suffixes=(".png",), fix="name a .png file"))


@dataclass
class DistillCacheConfig(TaskArgs, CorpusArgs):
    data: Optional[str] = required(
        "Training corpus exactly as `refine pretrain` will read it (e.g. a refined directory)."
    )
    teacher: Optional[str] = required("Teacher LM: hub id, local directory or .gguf file; its tokenizer is the student's.")
    output: Optional[str] = required("Directory for the cache (shards of top-k ids and log-probs, manifest.json last).", result=False)
    top_k: int = option(64, "Teacher tokens kept per position (the most probable ones).", check=at_least(1))
    logprob_dtype: str = option(
        "float16", "Storage of the kept log-probs: `float16` (2 bytes each) or `float32` (4 bytes, exact).",
        check=one_of("float16", "float32"),
    )
    seq_len: int = option(1024, "Packed sequence length; must equal the student's --seq-len.", check=at_least(2))
    eval_data: Optional[str] = option(None, "As in `refine pretrain`: a held-out corpus, so no documents are held out of DATA.")
    eval_fraction: float = option(0.02, "As in `refine pretrain`: fraction of documents held out (not cached).",
                                  check=between(0, 1, low_open=True, high_open=True))
    seed: int = option(0, "As in `refine pretrain`: the seed of the held-out split.", check=SEED)
    token_cache: Optional[str] = option(None, "As in `refine pretrain`: where tokenised, packed corpora are kept.")
    tokenize_workers: Optional[int] = option(None, "As in `refine pretrain`: processes that tokenise the corpus into "
                                                   "the token cache; default: every CPU this process may use.",
                                             result=False, check=at_least(1))
    teacher_revision: Optional[str] = option(None, "Hub revision (branch, tag or commit) of the teacher.")
    batch_size: int = option(8, "Sequences per teacher forward pass.", result=False, check=at_least(1))
    shard_sequences: int = option(1024, "Packed sequences per cache shard; each finished shard is written atomically.",
                                  check=at_least(1))
    device: str = option("auto", "`auto` (CUDA if available, else CPU), `cpu`, `cuda` or `cuda:N`; under torchrun each rank takes its own GPU.", result=False)
    dtype: str = option("auto", "`auto` (bf16 on CUDA, fp32 on CPU), `float32` or `bfloat16`.",
                        check=one_of("auto", "float32", "bfloat16"))
    nproc: int = option(1, "Processes to launch on this machine with torchrun (e.g. one per GPU); shards are dealt round-robin.",
                        result=False, check=at_least(1))
    trust_remote_code: bool = option(False, "Allow models/tokenizers to run code from their repository.")
    overwrite: bool = option(False, "Replace an output directory that already holds a finished cache.", result=False)


@dataclass
class EvalConfig(CorpusArgs):
    models: Optional[list[str]] = required(
        "Models to evaluate: directories written by `refine pretrain`, other local model directories or hub ids; "
        "each is read with its own tokenizer."
    )
    output: Optional[str] = required("Directory for results.json, results.md, results.png and manifest.json.",
                                     result=False)
    data: Optional[str] = option(
        None, "Held-out corpus (any local or hub DATA form that `refine score` accepts; not a remote URL): each model's "
              "loss per token and bits per byte on it. Give --data, --tasks or both."
    )
    group_column: Optional[str] = option(None, "Corpus column whose values split the held-out numbers into groups "
                                               "(e.g. domain, source).")
    tasks: Optional[list[str]] = option(
        None,
        "Zero-shot tasks of lm-evaluation-harness: task names, local task YAML files or directories of them "
        "(repeat the option or separate with commas). `miniplm`: the MiniPLM paper's nine tasks. Hub-hosted "
        "task data needs the Hub.",
    )
    limit: Optional[int] = option(None, "Evaluate at most this many examples per task (for a quick look; the numbers "
                                        "are then not comparable to published ones).", check=at_least(1))
    max_length: Optional[int] = option(
        None, "Longest window (tokens) a model reads on the held-out corpus; longer documents are split into windows "
              "that overlap by one token, as in `refine score`. Default: 1024, or the fewest positions any of the "
              "models has if that is less.",
        check=at_least(2, "use at least 2 tokens"))
    batch_size: int = option(8, "Sequences per forward pass (held-out windows, and the harness's requests).",
                             result=False, check=at_least(1))
    device: str = option("auto", "`auto` (CUDA if available, else CPU), `cpu`, `cuda` or `cuda:N`.", result=False)
    dtype: str = option("auto", "`auto` (bf16 on CUDA, fp32 on CPU), `float32`, `bfloat16` or `float16`.",
                        check=one_of("auto", "float32", "bfloat16", "float16"))
    trust_remote_code: bool = option(False, "Allow models/tokenizers to run code from their repository.")
    overwrite: bool = option(False, "Replace an output directory that already holds a result.", result=False)


Config = TypeVar("Config")


@dataclass(frozen=True)
class Rule:
    """A check across fields: `problem(cfg)` returns "<problem>; <fix>" or None. It runs only when all `fields` are valid."""

    fields: tuple[str, ...]
    problem: Callable[[Any], Optional[str]]


RULES: dict[type, list[Rule]] = {}


def rule(cls: type, *fields: str):
    """Declare a cross-field check of `cls` (and its subclasses) over `fields`: `@rule(PretrainConfig, "resume", "overwrite")`."""

    def register(problem: Callable[[Any], Optional[str]]):
        RULES.setdefault(cls, []).append(Rule(fields, problem))
        return problem

    return register


@rule(ScoreConfig, "max_tokens_per_batch", "max_length")
def _batch_holds_a_window(c: ScoreConfig) -> Optional[str]:
    if c.max_tokens_per_batch is not None and c.max_tokens_per_batch < c.max_length:
        return f"--max-tokens-per-batch {c.max_tokens_per_batch} is below --max-length {c.max_length}; raise it"


@rule(ScoreConfig, "normalize", "unit")
def _bytes_score_documents(c: ScoreConfig) -> Optional[str]:
    if c.normalize == "bytes" and c.unit == "chunk":
        return "--normalize bytes scores whole documents; use --unit document"


@rule(TaskArgs, "executor", "slurm_partition")
def _slurm_needs_partition(c: TaskArgs) -> Optional[str]:
    if c.executor == "slurm" and not c.slurm_partition:
        return "--executor slurm needs --slurm-partition; give the partition to submit to"


@rule(ScoreConfig, "executor", "tasks", "nproc")
@rule(DistillCacheConfig, "executor", "tasks", "nproc")
def _one_launcher(c) -> Optional[str]:
    if c.nproc > 1 and (c.executor != "local" or c.tasks > 1):
        return "--nproc (torchrun) and --tasks/--executor both split the work; choose one"


@rule(SelectionArgs, "alpha", "tokens", "token_fraction")
def _one_selection_budget(c: SelectionArgs) -> Optional[str]:
    given = [flag(name) for name in ("alpha", "tokens", "token_fraction") if getattr(c, name) is not None]
    if len(given) > 1:
        return f"both {given[0]} and {given[1]} given; choose one budget"


@rule(SelectionArgs, "balance", "group_column")
def _balance_needs_groups(c: SelectionArgs) -> Optional[str]:
    if c.balance is not None and c.group_column is None:
        return "--balance needs --group-column; name the corpus column that holds the groups"
    if c.balance not in (None, "proportional", "equal") and not c.balance.lower().endswith((".yaml", ".yml")):
        return f"--balance {c.balance!r} is not proportional, equal or a .yaml file; choose one"


@rule(PretrainConfig, "max_steps", "max_tokens")
def _one_budget(c: PretrainConfig) -> Optional[str]:
    if c.max_steps is None and c.max_tokens is None:
        return "no training budget; give --max-steps or --max-tokens"
    if c.max_steps is not None and c.max_tokens is not None:
        return "both --max-steps and --max-tokens given; choose one"


@rule(PretrainConfig, "resume", "overwrite")
def _resume_or_overwrite(c: PretrainConfig) -> Optional[str]:
    if c.resume and c.overwrite:
        return "--resume and --overwrite contradict each other; choose one"


@rule(PretrainConfig, "kd_teacher", "kd_cache")
def _one_kd_source(c: PretrainConfig) -> Optional[str]:
    if c.kd_teacher and c.kd_cache:
        return "--kd-teacher and --kd-cache both given; distil from one of them"


@rule(EvalConfig, "data", "tasks")
def _something_to_evaluate(c: EvalConfig) -> Optional[str]:
    if not c.data and not c.tasks:
        return "nothing to evaluate; give --data (a held-out corpus), --tasks, or both"


@rule(EvalConfig, "data", "group_column")
def _groups_need_data(c: EvalConfig) -> Optional[str]:
    if c.group_column and not c.data:
        return "--group-column splits the held-out corpus; give --data too"


def result_settings(cfg) -> dict:
    """The settings that define a run's result (fields not marked `result=False`), for resume checks and manifests."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.metadata.get("result", True)}


def flag(name: str) -> str:
    """The command-line spelling of a field: `max_length` -> `--max-length`."""
    return "--" + name.replace("_", "-")


def load_config(cls: type[Config], yaml_path: Optional[str] = None, overrides: Optional[dict] = None) -> Config:
    """Build `cls` from YAML values, then CLI overrides (None means "not given"), and check every field.

    Values are converted to each field's type the same way from YAML and from the command line (numbers
    may be written as text, e.g. `1e9`; a bool is never a number); every problem found (unknown or
    duplicate keys, wrong types, values out of range, missing required fields, cross-field rules) is
    raised together in one RefineError.
    """
    problems: list[str] = []
    given: dict[str, tuple[Any, Optional[str]]] = {}  # name -> (value, YAML path it came from, or None for a flag)
    if yaml_path:
        values, yaml_problems = read_yaml(yaml_path, cls)
        problems += yaml_problems
        given.update({k: (v, yaml_path) for k, v in values.items()})
    given.update({k: (v, None) for k, v in (overrides or {}).items() if v is not None and v != () and v != []})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values, bad = {}, set()
    for name, (value, origin) in given.items():
        if name not in fields:
            problems.append(f"unknown option `{name}`; valid options: {', '.join(sorted(fields))}")
            continue
        converted, problem = _convert(value, hints[name], fields[name], text=True)
        if problem is None and converted is not None:
            problem = _value_problem(fields[name], converted)
            value = converted
        if problem:
            problems.append(f"{_show(name, value, origin)} {problem}")
            bad.add(name)
        else:
            values[name] = converted
    config = cls(**values)
    problems += _missing(config, bad) + _rule_problems(config, bad)
    if problems:
        raise RefineError(*problems)
    return config


def check_config(cfg) -> None:
    """Check a config built in code (e.g. `score(ScoreConfig(...))`) as `load_config` checks one from the CLI."""
    fields, hints = dataclasses.fields(cfg), typing.get_type_hints(type(cfg))
    problems, bad = [], set()
    for f in fields:
        value = getattr(cfg, f.name)
        if value is None:
            continue
        converted, problem = _convert(value, hints[f.name], f, text=False)
        if problem is None:
            problem = _value_problem(f, converted)
        if problem:
            problems.append(f"{_show(f.name, value, None)} {problem}")
            bad.add(f.name)
    problems += _missing(cfg, bad) + _rule_problems(cfg, bad)
    if problems:
        raise RefineError(*problems)


def _missing(cfg, bad: set) -> list[str]:
    return [
        f"{flag(f.name)} is required (give it on the command line or as `{f.name}:` in --config)"
        for f in dataclasses.fields(cfg)
        if f.metadata.get("required") and f.name not in bad and getattr(cfg, f.name) in (None, "")
    ]


def _rule_problems(cfg, bad: set) -> list[str]:
    rules = [r for klass in type(cfg).__mro__ for r in RULES.get(klass, [])]
    found = [r.problem(cfg) for r in rules if not bad & set(r.fields)]
    return [p for p in found if p]


def _show(name: str, value: Any, origin: Optional[str]) -> str:
    """How a problem names the value: `--alpha 1.5` for a flag, `` `alpha: true` in run.yaml `` for a YAML key."""
    if origin is None:
        return f"{flag(name)} {value!r}" if isinstance(value, str) else f"{flag(name)} {value}"
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
    return f"`{name}: {text}` in {origin}"


INT64 = 2**63 - 1  # torch and numpy index with 64-bit integers; anything larger cannot be a size or a seed


def _convert(value: Any, annotation: Any, f: dataclasses.Field, text: bool) -> tuple[Any, Optional[str]]:
    """(value converted to the field's type, None) or (None, "<problem>; <fix>").

    `text=True` (values from YAML or a flag) also reads numbers written as text; `text=False` (a config
    built in code) only accepts values of the right type.
    """
    kind = _base_type(annotation)
    if value is None:
        if _is_optional(annotation) or f.metadata.get("required"):
            return None, None
        return None, "needs a value; give one or leave the key out"
    if kind is bool:
        if isinstance(value, bool):
            return value, None
        return None, "is not true or false; give true or false"
    if kind in (int, float):
        number = value
        if isinstance(value, str) and text:
            try:
                number = float(value.strip()) if kind is float or not value.strip().lstrip("+-").isdigit() else int(value)
            except ValueError:
                number = None
        noun = "an integer" if kind is int else "a number"
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            return None, f"is not {noun}; give {noun}" + (f" such as {f.default}" if f.default is not None else "")
        if kind is int:
            if isinstance(number, float):
                if not (math.isfinite(number) and number.is_integer()):
                    return None, f"is not {noun}; give a whole number"
                number = int(number)
            if abs(number) > INT64:
                return None, "does not fit in 64 bits; give a smaller number"
            return number, None
        try:
            number = float(number)
        except OverflowError:
            return None, "is too large; give a finite number"
        if f.metadata.get("finite", True) and not math.isfinite(number):
            return None, "is not a finite number; give a finite number"
        return number, None
    if kind is list:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            return None, "is not a list; give a list of values (repeat the option on the command line)"
        converted = []
        for item in items:
            item, problem = _convert_text(item)
            if problem:
                return None, problem
            converted.append(item)
        return converted, None
    return _convert_text(value)


def _convert_text(value: Any) -> tuple[Any, Optional[str]]:
    # YAML reads `revision: 1234` or `compute: 1.0e21` as numbers; as text they mean the same.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return None, "is not text; quote it or give a single value"
    if not value.strip():
        return None, "is empty; give a value or leave the option out"
    if "\x00" in value:
        return None, "contains a NUL character; remove it"
    return value, None


def _value_problem(f: dataclasses.Field, value: Any) -> Optional[str]:
    check = f.metadata.get("check")
    if check is None or value is None:
        return None
    if isinstance(value, list):
        return next((p for p in map(check.problem, value) if p), None)
    return check.problem(value)


def _is_optional(annotation: Any) -> bool:
    return type(None) in typing.get_args(annotation)


def _base_type(annotation: Any) -> type:
    """`Optional[int]` -> int, `Optional[list[str]]` -> list, `bool` -> bool."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union and len(args) == 1:
        annotation = args[0]
    return typing.get_origin(annotation) or annotation


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that records keys given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    self.duplicates.append((key, seen[key], key_node.start_mark.line + 1))
                else:
                    seen[key] = key_node.start_mark.line + 1
            except TypeError:  # an unhashable key: the base class reports it
                pass
        return super().construct_mapping(node, deep)


def read_yaml(path: str, cls: type) -> tuple[dict[str, Any], list[str]]:
    """The YAML file's values and the problems with it (unreadable, not a mapping, duplicate or unknown keys)."""
    p = Path(path)
    if not p.is_file():
        return {}, [f"config file {path} not found; check the --config path"]
    try:
        loader = _UniqueKeyLoader(p.read_bytes().decode("utf-8"))
        loader.duplicates = []
        try:
            values = loader.get_single_data()
        finally:
            loader.dispose()
    except (OSError, UnicodeDecodeError) as e:
        return {}, [f"config file {path} cannot be read ({e}); give a UTF-8 text file"]
    except yaml.YAMLError as e:
        first = " ".join(str(e).split())
        return {}, [f"config file {path} is not valid YAML ({first}); fix the file"]
    problems = [f"key `{key}` appears twice in {path} (lines {first} and {second}); keep one"
                for key, first, second in loader.duplicates]
    if values is None:
        values = {}
    if not isinstance(values, dict):
        return {}, problems + [f"config file {path} holds a {type(values).__name__}, not a mapping of option names to values; "
                               "write one `name: value` per line"]
    known = {f.name for f in dataclasses.fields(cls)}
    problems += [f"unknown key `{k}` in {path}; valid keys: {', '.join(sorted(known))}" for k in values if k not in known]
    return {k: v for k, v in values.items() if k in known}, problems
