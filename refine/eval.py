"""`refine eval`: how well each model predicts held-out text, and its zero-shot scores on lm-evaluation-harness tasks.

Held-out text (--data) is read with `refine score`'s conventions: each model reads every document through its
own tokenizer, its BOS (or EOS where it has no BOS) put before the document as unscored context, no EOS
appended; a document longer than --max-length is cut into windows that overlap by one token, so every token
is predicted exactly once and nothing is truncated. Per model, overall and per group:
- `loss_per_token`: the summed negative log-likelihood (nats) of the document tokens / their number;
- `bits_per_byte`: the same sum / ln 2 / UTF-8 bytes of the scored text, comparable across tokenizers.

Tasks (--tasks) run through the harness's HFLM wrapper around the model and tokenizer loaded here, zero-shot.
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from refine import __version__
from refine import data as corpus
from refine import models
from refine.config import EvalConfig, result_settings
from refine.errors import RefineError
from refine.logprobs import TokenBudget, score_sequences, sum_by_document, windows_of
from refine.output import claim, output_stage, run_info, verify, write_json, write_manifest, write_text

# The zero-shot tasks of the MiniPLM paper (Gu et al., 2025), by their names in lm-evaluation-harness.
MINIPLM_TASKS = ("hellaswag", "lambada_openai", "winogrande", "openbookqa", "arc_easy", "arc_challenge", "piqa",
                 "social_iqa", "storycloze_2016")
# `datasets` builders that read local files named in a task's YAML (dataset_kwargs.data_files): no Hub needed.
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")
# The metric a task's column in results.md shows, the first the task reports.
TABLE_METRICS = ("acc", "acc_norm", "exact_match", "perplexity")
RESULTS_FILES = ("results.json", "results.md")


def validate(cfg: EvalConfig) -> None:
    cfg.check()  # every field and cross-field check is declared in refine.config


# ---------------------------------------------------------------- the core: held-out log-likelihoods


def document_nll(model, documents: list[list[int]], start_id: int, max_length: int, max_tokens_per_batch: int,
                 progress=None) -> np.ndarray:
    """Per document, the negative log-likelihood (nats, summed over its tokens) under `model`.

    Each document is read as [start] + tokens in windows of at most `max_length` that predict every token once,
    batched as `refine score` batches them.
    """
    windows, owner = windows_of(documents, start_id, max_length)
    budget = TokenBudget(max_tokens_per_batch, max_length, model.device)
    (window_logprob,) = score_sequences([model], windows, budget, model.device, progress)
    return -sum_by_document(window_logprob, owner, len(documents))


def heldout_numbers(nll: np.ndarray, n_tokens: np.ndarray, n_bytes: np.ndarray) -> dict:
    """Loss per token (nats) and bits per byte of a set of documents from their NLL sums, token and byte counts."""
    total_nll, total_tokens, total_bytes = float(np.sum(nll)), int(np.sum(n_tokens)), int(np.sum(n_bytes))
    return {
        "loss_per_token": total_nll / total_tokens if total_tokens else None,
        "bits_per_byte": total_nll / math.log(2) / total_bytes if total_bytes else None,
        "n_tokens": total_tokens,
        "n_bytes": total_bytes,
        "n_documents": len(nll),
    }


def heldout_summary(nll: np.ndarray, n_tokens: np.ndarray, n_bytes: np.ndarray, groups: Optional[list[str]]) -> dict:
    """`heldout_numbers` over all documents, plus `groups`: the same numbers per group label (sorted; {} without labels)."""
    summary = heldout_numbers(nll, n_tokens, n_bytes)
    labels = np.asarray(groups if groups is not None else [], dtype=object)
    summary["groups"] = {g: heldout_numbers(nll[labels == g], n_tokens[labels == g], n_bytes[labels == g])
                         for g in sorted(set(labels))}
    return summary


# ---------------------------------------------------------------- set-up: everything checked before any model loads


@dataclass
class HeldOut:
    """The held-out documents (blank ones dropped), their UTF-8 byte counts and group labels."""

    texts: list[str]
    n_bytes: np.ndarray
    groups: Optional[list[str]]
    fingerprint: str
    n_blank: int


@dataclass
class TaskPlan:
    """The harness tasks to run: names as the harness knows them, and the local paths its TaskManager searches."""

    names: list[str]
    include_paths: list[str]


@dataclass
class EvalSetup:
    """What the run needs, all checked before any model loads."""

    started: float
    refs: list[str]
    names: list[str]
    heldout: Optional[HeldOut]
    max_length: Optional[int]  # held-out window length (tokens)
    tasks: Optional[TaskPlan]
    device: torch.device
    dtype: torch.dtype
    tokenizers: list  # one per model, loaded (and checked) before any model


def model_names(refs: list[str]) -> list[str]:
    """A short name per model: the directory's base name (or the hub id as given); parents are added only to
    tell apart two directories of the same name."""
    paths = [Path(r).expanduser() for r in refs]
    local = [p.exists() for p in paths]
    parts = [p.resolve().parts if is_local else (r,) for p, r, is_local in zip(paths, refs, local)]
    depth = [1] * len(refs)
    while True:
        names = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
        clashes = {n for n in names if names.count(n) > 1}
        if not clashes:
            return names
        grown = False
        for i, n in enumerate(names):
            if n in clashes and depth[i] < len(parts[i]):
                depth[i] += 1
                grown = True
        if not grown:
            return names


def check_models(cfg: EvalConfig) -> list[str]:
    """Each model exists (or is a hub id), is given once and, if `refine pretrain` wrote it, is finished and intact."""
    refs, problems = list(cfg.models), []
    sources = [models.resolve_model_source(r) for r in refs]
    seen: dict[tuple, str] = {}
    for ref, source in zip(refs, sources):
        key = (source.path, source.gguf_file)
        if key in seen:
            problems.append(f"model {ref!r} is given twice (also as {seen[key]!r}); give each model once")
        seen[key] = ref
        path = Path(source.path)
        if source.is_local and path.is_dir() and output_stage(path) is not None:
            verify(path, output_stage(path))  # refine's own output: every file checked against its manifest first
    if problems:
        raise RefineError(*problems)
    return refs


DEFAULT_MAX_LENGTH = 1024


def window_length(cfg: EvalConfig, refs: list[str]) -> int:
    """The held-out window length: --max-length, which must fit every model's positions, or by default 1024 capped
    at the fewest positions of any model (so every model reads the same windows). Read from the configs alone."""
    limits = {}
    for ref in refs:
        source = models.resolve_model_source(ref)
        if source.gguf_file:
            continue  # a GGUF file's config comes with its weights; the load itself reports a problem
        limit = models.max_positions(models.load_model_config(source.path if source.is_local else ref,
                                                              cfg.trust_remote_code))
        if limit is not None:
            limits[ref] = limit
    if cfg.max_length is None:
        return max(2, min([DEFAULT_MAX_LENGTH, *limits.values()]))
    too_long = [f"--max-length {cfg.max_length} exceeds the {limit} positions of {ref!r}; lower --max-length"
                for ref, limit in limits.items() if cfg.max_length > limit]
    if too_long:
        raise RefineError(*too_long)
    return cfg.max_length


def read_heldout(cfg: EvalConfig) -> HeldOut:
    ds = corpus.load_corpus(cfg.data, cfg.split, cfg.name)
    corpus.check_columns(ds, cfg.text_column, None, cfg.data)
    if cfg.group_column and cfg.group_column not in ds.column_names:
        raise RefineError(f"corpus {cfg.data!r} has no column {cfg.group_column!r}; pass --group-column with one of: "
                          f"{', '.join(ds.column_names)}")
    texts = ds[cfg.text_column]  # held-out sets are small: read once, tokenized once per tokenizer
    kept = [i for i, t in enumerate(texts) if not corpus.is_blank(t)]
    if not kept:
        raise RefineError(f"all {len(texts)} documents of {cfg.data!r} are empty or whitespace-only; give a corpus with text")
    groups = None
    if cfg.group_column:
        values = ds[cfg.group_column]
        groups = [str(values[i]) for i in kept]
    kept_texts = [texts[i] for i in kept]
    fingerprint = corpus.corpus_fingerprint(ds, cfg.text_column, None, corpus.corpus_files(cfg.data, cfg.split, cfg.name))
    return HeldOut(kept_texts, np.array([len(t.encode("utf-8", "surrogatepass")) for t in kept_texts], dtype=np.int64),
                   groups, fingerprint, len(texts) - len(kept))


def split_task_specs(specs: list[str]) -> list[str]:
    """--tasks values, comma-separated lists split and `miniplm` expanded, in order, each once."""
    names: list[str] = []
    for spec in specs:
        for item in (s.strip() for s in spec.split(",")):
            for name in (MINIPLM_TASKS if item == "miniplm" else (item,) if item else ()):
                if name not in names:
                    names.append(name)
    return names


def _import_harness():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401  (it needs accelerate: checked before any model loads)
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise RefineError("--tasks needs lm-evaluation-harness and accelerate; pip install lm_eval accelerate (or, in a "
                          "refine checkout, pip install -e '.[eval]')") from None
    return lm_eval, TaskManager


def plan_tasks(specs: list[str]) -> tuple[TaskPlan, Any]:
    """Resolve --tasks to harness task names; one error naming every unknown task, or the Hub being out of reach."""
    items = split_task_specs(specs)
    paths = [Path(i).expanduser() for i in items]
    local = [p for p in paths if p.is_dir() or (p.is_file() and p.suffix in (".yaml", ".yml"))]
    bad_files = [str(p) for p in paths if p.is_file() and p.suffix not in (".yaml", ".yml")]
    named = [i for i, p in zip(items, paths) if p not in local and str(p) not in bad_files]
    include = sorted({str((p if p.is_dir() else p.parent).resolve()) for p in local})
    manager = _task_manager(tuple(include), bool(named))
    index = manager.task_index
    names: list[str] = []
    for p in local:
        here = p.resolve()
        found = [n for n, e in index.items() if e.yaml_path is not None and
                 (e.yaml_path.resolve() == here if p.is_file() else here in e.yaml_path.resolve().parents)]
        if not found:
            bad_files.append(str(p))
        names += [n for n in sorted(found) if n not in names]
    unknown = [n for n in named if n not in index]
    problems = [f"{f} holds no lm-evaluation-harness task (a YAML with a `task:` key); check the --tasks path"
                for f in bad_files]
    if unknown:
        problems.append(f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; give "
                        "lm-evaluation-harness task names (`lm_eval ls tasks`), local task YAML files or directories, "
                        "or `miniplm`")
    if problems:
        raise RefineError(*problems)
    names += [n for n in named if n not in names]
    remote = [n for n in names if not _task_is_local(index[n])]
    if remote and not hub_reachable():
        raise RefineError(f"task{'s' if len(remote) > 1 else ''} {', '.join(remote)} read their data from the Hugging "
                          "Face Hub, which is not reachable (offline, or HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set); "
                          "connect to the Hub, or give local task YAML files")
    try:  # builds every task and fetches its data now, so a task that cannot run stops the command before any model loads
        manager.load(names)
    except Exception as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RefineError(f"lm-evaluation-harness could not prepare the tasks {', '.join(names)} ({message}); check "
                          "the task YAML files and that their data can be read") from None
    return TaskPlan(names, include), manager


@functools.lru_cache(maxsize=8)
def _task_manager(include: tuple[str, ...], include_defaults: bool):
    """The harness's TaskManager over `include` (and its own tasks if `include_defaults`). Indexing its few thousand
    task files takes seconds, so it is built only when a task is named, and once per process."""
    _, TaskManager = _import_harness()
    return TaskManager(include_path=list(include) or None, include_defaults=include_defaults)


def _task_is_local(entry) -> bool:
    """Whether a task reads only local files: its dataset is a packaged builder over data_files, or a local directory.

    Groups and tags are taken to need the Hub (their tasks are not inspected)."""
    config = getattr(entry, "cfg", None) or {}
    dataset = config.get("dataset_path")
    if not isinstance(dataset, str):
        return False
    return dataset in LOCAL_BUILDERS or Path(dataset).expanduser().is_dir()


def hub_reachable(timeout_s: float = 5.0) -> bool:
    """Whether the Hugging Face Hub answers (and offline mode is off)."""
    if any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout_s)
    except Exception:
        return False
    return True


def prepare(cfg: EvalConfig) -> tuple[EvalSetup, Any]:
    """Check everything a run needs without loading a model: models, held-out corpus, tasks, device."""
    validate(cfg)
    started = time.time()
    refs = check_models(cfg)
    task_plan, manager = plan_tasks(cfg.tasks) if cfg.tasks else (None, None)
    heldout, max_length = None, None
    if cfg.data:
        heldout = read_heldout(cfg)
        max_length = window_length(cfg, refs)
    device = models.resolve_device(cfg.device)
    # every tokenizer now, so that a model without one (or without a start token) stops the run before any model loads
    tokenizers = [models.load_tokenizer(ref, None, cfg.trust_remote_code) for ref in refs]
    if heldout is not None:
        for ref, tokenizer in zip(refs, tokenizers):
            models.start_token_id(tokenizer, ref)
    setup = EvalSetup(started, refs, model_names(refs), heldout, max_length, task_plan, device,
                      models.resolve_dtype(cfg.dtype, device), tokenizers)
    return setup, manager


# ---------------------------------------------------------------- run: one model at a time


def model_record(ref: str, name: str, model) -> dict:
    """Which model this is: name, where it came from, and the SHA-256 of each weight file."""
    source = models.resolve_model_source(ref)
    record: dict[str, Any] = {"name": name, "path": source.path if source.is_local else ref}
    if source.gguf_file:
        record["weights_sha256"] = {source.gguf_file: models.file_sha256(Path(source.path) / source.gguf_file)}
    elif source.is_local:
        record["weights_sha256"] = {f.name: models.file_sha256(f) for f in sorted(Path(source.path).iterdir())
                                    if f.is_file() and f.suffix in models.WEIGHT_SUFFIXES}
    else:
        record["commit"] = getattr(model.config, "_commit_hash", None)
    record["model_type"] = model.config.model_type
    record["n_params"] = sum(p.numel() for p in model.parameters())
    return record


def evaluate_heldout(model, tokenizer, ref: str, heldout: HeldOut, max_length: int, batch_size: int, name: str) -> dict:
    documents = tokenizer(heldout.texts, add_special_tokens=False, verbose=False)["input_ids"]
    n_tokens = np.array([len(d) for d in documents], dtype=np.int64)
    with tqdm(total=int(n_tokens.sum()), unit="tok", desc=f"held-out {name}", dynamic_ncols=True) as bar:
        nll = document_nll(model, documents, models.start_token_id(tokenizer, ref), max_length, batch_size * max_length, bar)
    return heldout_summary(nll, n_tokens, heldout.n_bytes, heldout.groups)


def evaluate_tasks(model, tokenizer, plan: TaskPlan, manager, cfg: EvalConfig) -> tuple[dict, dict]:
    """Run the harness zero-shot; (per task {metric: value}, the harness's own results blob)."""
    lm_eval, _ = _import_harness()
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
    raw = lm_eval.simple_evaluate(model=lm, tasks=plan.names, task_manager=manager, limit=cfg.limit, num_fewshot=0,
                                  log_samples=False)
    return task_metrics(raw["results"]), {k: raw.get(k) for k in ("results", "versions", "n-shot", "higher_is_better",
                                                                    "n-samples", "configs", "group_subtasks")}


def task_metrics(results: dict) -> dict:
    """The harness's `results` ({task: {"acc,none": 0.5, "acc_stderr,none": ...}}) as {task: {"acc": 0.5, ...}}."""
    out = {}
    for task, values in results.items():
        metrics = {}
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            if filter_name and isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[metric if filter_name == "none" else f"{metric},{filter_name}"] = float(value)
        out[task] = metrics
    return out


def evaluate_model(ref: str, name: str, tokenizer, setup: EvalSetup, manager, cfg: EvalConfig) -> dict:
    model = models.load_causal_lm(ref, None, setup.dtype, setup.device, cfg.trust_remote_code)
    record = model_record(ref, name, model)
    if setup.heldout is not None:
        record["heldout"] = evaluate_heldout(model, tokenizer, ref, setup.heldout, setup.max_length, cfg.batch_size, name)
    if setup.tasks is not None:
        record["tasks"], record["harness"] = evaluate_tasks(model, tokenizer, setup.tasks, manager, cfg)
    del model
    if setup.device.type == "cuda":
        torch.cuda.empty_cache()
    return record


def evaluate(cfg: EvalConfig) -> dict:
    """Evaluate every model; write results.json, results.md (and results.png for several models), manifest last."""
    validate(cfg)
    # Task values that are local paths (YAML files, directories) are inputs too: the output must not overlap them.
    inputs = [cfg.data, *cfg.models, *split_task_specs(cfg.tasks or [])]
    with claim(cfg.output, "eval", inputs, cfg.overwrite, staged=True) as claimed:
        setup, manager = prepare(cfg)
        records = [evaluate_model(ref, name, tokenizer, setup, manager, cfg)
                   for ref, name, tokenizer in zip(setup.refs, setup.names, setup.tokenizers)]
        return finish(cfg, setup, records, claimed)


# ---------------------------------------------------------------- finish: results, table, figure, manifest


def versions() -> dict:
    import transformers

    found = {"refine": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        from importlib.metadata import version

        found["lm_eval"] = version("lm_eval")
    except Exception:
        found["lm_eval"] = None
    return found


def table_metric(metrics: dict) -> Optional[str]:
    """The metric shown for a task in results.md: accuracy where the task reports it."""
    return next((m for m in TABLE_METRICS if m in metrics), next(iter(metrics), None))


def results_table(records: list[dict]) -> str:
    """results.md: one row per model; held-out bits per byte (overall, per group), then one column per task."""
    columns: list[tuple[str, Any]] = []
    first = records[0]
    if "heldout" in first:
        columns.append(("held-out bits/byte", lambda r: r["heldout"]["bits_per_byte"]))
        columns.append(("held-out loss/token", lambda r: r["heldout"]["loss_per_token"]))
        for group in first["heldout"].get("groups", {}):
            columns.append((f"{group} bits/byte", lambda r, g=group: r["heldout"]["groups"].get(g, {}).get("bits_per_byte")))
    task_columns = []
    if "tasks" in first:
        for task, metrics in first["tasks"].items():
            metric = table_metric(metrics)
            if metric is not None:
                task_columns.append((f"{task} {metric}", lambda r, t=task, m=metric: r["tasks"].get(t, {}).get(m)))
        columns += task_columns
        accuracy = [c for c in task_columns if c[0].endswith((" acc", " acc_norm"))]
        if accuracy:
            columns.append(("average acc", lambda r: _mean([f(r) for _, f in accuracy])))
    show = lambda v: "" if v is None else f"{v:.4f}"
    lines = ["| model | " + " | ".join(name for name, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += ["| " + " | ".join([r["name"]] + [show(f(r)) for _, f in columns]) + " |" for r in records]
    return "\n".join(lines) + "\n"


def _mean(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def results_figure(records: list[dict], path: Path) -> None:
    """results.png: held-out bits per byte (overall and per group) and task scores, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    if "heldout" in records[0]:
        labels = ["all"] + list(records[0]["heldout"].get("groups", {}))
        values = [[r["heldout"]["bits_per_byte"]] + [r["heldout"]["groups"][g]["bits_per_byte"] for g in labels[1:]]
                  for r in records]
        panels.append(("held-out bits per byte (lower is better)", labels, values))
    if "tasks" in records[0]:
        labels = [t for t, m in records[0]["tasks"].items() if table_metric(m) is not None]
        values = [[r["tasks"][t][table_metric(records[0]["tasks"][t])] for t in labels] for r in records]
        panels.append(("zero-shot " + "/".join(sorted({table_metric(records[0]["tasks"][t]) for t in labels})),
                       labels, values))
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    width = 0.8 / len(records)
    for axis, (title, labels, values) in zip(axes[0], panels):
        x = np.arange(len(labels))
        for k, (record, row) in enumerate(zip(records, values)):
            axis.bar(x + (k - (len(records) - 1) / 2) * width, row, width, label=record["name"])
        axis.set_xticks(x, labels, rotation=30, ha="right")
        axis.set_title(title)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def finish(cfg: EvalConfig, setup: EvalSetup, records: list[dict], claimed) -> dict:
    staging = claimed.staging_dir()
    results = {
        "models": records,
        "settings": result_settings(cfg),
        "data": None if setup.heldout is None else {
            "source": corpus.resolved_source(cfg.data), "split": cfg.split, "name": cfg.name,
            "text_column": cfg.text_column, "group_column": cfg.group_column, "fingerprint": setup.heldout.fingerprint,
            "n_blank_skipped": setup.heldout.n_blank, "max_length": setup.max_length},
        "tasks": None if setup.tasks is None else setup.tasks.names,
        "task_paths": None if setup.tasks is None else setup.tasks.include_paths,  # local task YAML directories searched
        "versions": versions(),
    }
    write_json(staging / "results.json", results)
    write_text(staging / "results.md", results_table(records))
    files = list(RESULTS_FILES)
    if len(records) > 1:
        results_figure(records, staging / "results.png")
        files.append("results.png")
    manifest = {"stage": "eval", **run_info(), "models": [r["name"] for r in records],
                "elapsed_s": round(time.time() - setup.started, 1)}
    write_manifest(staging, manifest, files)
    claimed.commit(staging)
    return results
