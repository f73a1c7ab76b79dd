"""The `refine` command line: thin typer wrappers that parse, load the config and call a stage function.

Every option defaults to None ("not given") so that a YAML --config value is only overridden by
flags the user actually typed; real defaults live in refine.config.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import List, Optional

import typer

from refine.config import DistillCacheConfig, PlanConfig, PretrainConfig, PushConfig, ReportConfig, SampleConfig, ScoreConfig, field_help, load_config
from refine.errors import RefineError

app = typer.Typer(
    help="Refine a pretraining corpus with a teacher LM (MiniPLM difference sampling): score → sample → pretrain.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

CONFIG_HELP = "YAML file whose keys are this command's option names (with underscores); flags given here override it."


def _opt(cls, name: str, *flags: str):
    return typer.Option(None, *flags, help=field_help(cls, name), show_default=False)


def _arg(cls, name: str):
    return typer.Argument(None, help=field_help(cls, name), show_default=False)


def _run(cls, config: Optional[str], overrides: dict, stage):
    try:
        return stage(load_config(cls, config, overrides))
    except RefineError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("interrupted; rerun the same command to continue where it stopped", err=True)
        raise typer.Exit(130) from None


@app.command("score")
def score_command(
    data: Optional[str] = _arg(ScoreConfig, "data"),
    teacher: Optional[str] = _opt(ScoreConfig, "teacher", "--teacher"),
    reference: Optional[str] = _opt(ScoreConfig, "reference", "--reference"),
    output: Optional[str] = _opt(ScoreConfig, "output", "--output", "-o"),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    split: Optional[str] = _opt(ScoreConfig, "split", "--split"),
    name: Optional[str] = _opt(ScoreConfig, "name", "--name"),
    text_column: Optional[str] = _opt(ScoreConfig, "text_column", "--text-column"),
    id_column: Optional[str] = _opt(ScoreConfig, "id_column", "--id-column"),
    teacher_revision: Optional[str] = _opt(ScoreConfig, "teacher_revision", "--teacher-revision"),
    reference_revision: Optional[str] = _opt(ScoreConfig, "reference_revision", "--reference-revision"),
    unit: Optional[str] = _opt(ScoreConfig, "unit", "--unit"),
    normalize: Optional[str] = _opt(ScoreConfig, "normalize", "--normalize"),
    proxy_fraction: Optional[float] = _opt(ScoreConfig, "proxy_fraction", "--proxy-fraction"),
    proxy_alpha: Optional[float] = _opt(ScoreConfig, "proxy_alpha", "--proxy-alpha"),
    proxy_epochs: Optional[int] = _opt(ScoreConfig, "proxy_epochs", "--proxy-epochs"),
    proxy_lr: Optional[float] = _opt(ScoreConfig, "proxy_lr", "--proxy-lr"),
    proxy_seed: Optional[int] = _opt(ScoreConfig, "proxy_seed", "--proxy-seed"),
    max_length: Optional[int] = _opt(ScoreConfig, "max_length", "--max-length"),
    max_tokens_per_batch: Optional[int] = _opt(ScoreConfig, "max_tokens_per_batch", "--max-tokens-per-batch"),
    shard_size: Optional[int] = _opt(ScoreConfig, "shard_size", "--shard-size"),
    device: Optional[str] = _opt(ScoreConfig, "device", "--device"),
    dtype: Optional[str] = _opt(ScoreConfig, "dtype", "--dtype"),
    compile: Optional[bool] = _opt(ScoreConfig, "compile", "--compile/--no-compile"),
    nproc: Optional[int] = _opt(ScoreConfig, "nproc", "--nproc"),
    trust_remote_code: Optional[bool] = _opt(ScoreConfig, "trust_remote_code", "--trust-remote-code/--no-trust-remote-code"),
    overwrite: Optional[bool] = _opt(ScoreConfig, "overwrite", "--overwrite/--no-overwrite"),
):
    """Score every instance: log p_teacher(x) - log p_ref(x) per token, with both log-probs and token counts.

    Writes Parquet shards (columns id, n_tokens, teacher_logprob, ref_logprob, score) and manifest.json.
    Rerunning an interrupted command continues where it stopped. Many GPUs or nodes: `--nproc N`, or
    `torchrun --nproc_per_node N [--nnodes ...] -m refine score ...`.
    """
    from refine.score import score

    overrides = {k: v for k, v in locals().items() if k not in ("config", "score")}
    cfg = _run(ScoreConfig, config, overrides, lambda c: c)
    if cfg.nproc > 1 and "WORLD_SIZE" not in os.environ:
        _launch_torchrun(cfg.nproc)
    manifest = _run(ScoreConfig, config, overrides, score)
    if "rank" in manifest:  # not rank 0: rank 0 reports
        return
    typer.echo(
        f"scored {manifest['n_instances']} instances ({manifest['n_tokens']} tokens) in {manifest['elapsed_s']} s; "
        f"skipped {manifest['data']['n_blank_skipped']} empty or whitespace-only documents"
    )
    if "proxy" in manifest:
        p = manifest["proxy"]
        typer.echo(
            f"proxy: {p['n_exact']} documents scored exactly, {p['n_predicted']} predicted; on {p['held_out']} held-out "
            f"exact documents Spearman {p['spearman']:.3f}, top-{p['alpha']} overlap {p['top_alpha_overlap']:.2f} "
            f"(random: {p['random_overlap_expected']:.2f}); FLOPs saved {p['flops_saved_fraction']:.0%}"
        )


@app.command("sample")
def sample_command(
    scores: Optional[str] = _arg(SampleConfig, "scores"),
    output: Optional[str] = _opt(SampleConfig, "output", "--output", "-o"),
    alpha: Optional[float] = _opt(SampleConfig, "alpha", "--alpha"),
    method: Optional[str] = _opt(SampleConfig, "method", "--method"),
    seed: Optional[int] = _opt(SampleConfig, "seed", "--seed"),
    data: Optional[str] = _opt(SampleConfig, "data", "--data"),
    shard_size_mb: Optional[int] = _opt(SampleConfig, "shard_size_mb", "--shard-size-mb"),
    push_to_hub: Optional[str] = _opt(SampleConfig, "push_to_hub", "--push-to-hub"),
    private: Optional[bool] = _opt(SampleConfig, "private", "--private/--public"),
    token: Optional[str] = _opt(SampleConfig, "token", "--token"),
    overwrite: Optional[bool] = _opt(SampleConfig, "overwrite", "--overwrite/--no-overwrite"),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
):
    """Keep the top-alpha fraction of scored instances; write them as a dataset `datasets.load_dataset` opens."""
    from refine.config import PushConfig
    from refine.push import push
    from refine.sample import sample

    overrides = {k: v for k, v in locals().items() if k not in ("config", "sample", "push", "PushConfig")}
    cfg = _run(SampleConfig, config, overrides, lambda c: c)
    m = _run(SampleConfig, config, overrides, sample)
    threshold = f"; score threshold {m['threshold']:.4f}" if m["threshold"] is not None else ""
    stats = m["score_stats"]
    typer.echo(
        f"kept {m['instances_after']} of {m['instances_before']} instances "
        f"({m['tokens_after']} of {m['tokens_before']} tokens) by {m['method']} alpha={m['alpha']}{threshold}\n"
        f"scores: mean {stats['mean']:.3f}, quantiles 10% {stats['q10']:.3f} | 50% {stats['q50']:.3f} | 90% {stats['q90']:.3f}"
    )
    if cfg.push_to_hub:
        target = PushConfig(refined=cfg.output, target=cfg.push_to_hub, private=cfg.private, token=cfg.token)
        _echo_push(_run(PushConfig, None, vars(target), push))


@app.command("report")
def report_command(
    scores: Optional[str] = _arg(ReportConfig, "scores"),
    output: Optional[str] = _opt(ReportConfig, "output", "--output", "-o"),
    data: Optional[str] = _opt(ReportConfig, "data", "--data"),
    alpha: Optional[float] = _opt(ReportConfig, "alpha", "--alpha"),
    group_column: Optional[str] = _opt(ReportConfig, "group_column", "--group-column"),
    n_examples: Optional[int] = _opt(ReportConfig, "n_examples", "--n-examples"),
    excerpt_chars: Optional[int] = _opt(ReportConfig, "excerpt_chars", "--excerpt-chars"),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
):
    """Write one HTML page showing the score distribution, teacher vs reference NLL, groups and examples."""
    from refine.report import report

    overrides = {k: v for k, v in locals().items() if k not in ("config", "report")}
    result = _run(ReportConfig, config, overrides, report)
    typer.echo(f"wrote {result['output']}: {result['kept']} of {result['instances']} instances kept at this alpha")


@app.command("push")
def push_command(
    refined: Optional[str] = _arg(PushConfig, "refined"),
    target: Optional[str] = _arg(PushConfig, "target"),
    private: Optional[bool] = _opt(PushConfig, "private", "--private/--public"),
    revision: Optional[str] = _opt(PushConfig, "revision", "--revision"),
    token: Optional[str] = _opt(PushConfig, "token", "--token"),
    commit_message: Optional[str] = _opt(PushConfig, "commit_message", "--commit-message"),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
):
    """Publish a refined dataset folder to the Hugging Face Hub (one commit) or to an fsspec URL."""
    from refine.push import push

    overrides = {k: v for k, v in locals().items() if k not in ("config", "push")}
    _echo_push(_run(PushConfig, config, overrides, push))


def _echo_push(result: dict) -> None:
    where = f" (commit {result['commit'][:12]})" if result.get("commit") else ""
    typer.echo(f"published {result['files']} files to {result['target']}{where}")


@app.command("pretrain")
def pretrain_command(
    data: Optional[str] = _arg(PretrainConfig, "data"),
    model_config: Optional[str] = _opt(PretrainConfig, "model_config", "--model-config"),
    tokenizer: Optional[str] = _opt(PretrainConfig, "tokenizer", "--tokenizer"),
    output: Optional[str] = _opt(PretrainConfig, "output", "--output", "-o"),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    split: Optional[str] = _opt(PretrainConfig, "split", "--split"),
    name: Optional[str] = _opt(PretrainConfig, "name", "--name"),
    text_column: Optional[str] = _opt(PretrainConfig, "text_column", "--text-column"),
    eval_data: Optional[str] = _opt(PretrainConfig, "eval_data", "--eval-data"),
    eval_fraction: Optional[float] = _opt(PretrainConfig, "eval_fraction", "--eval-fraction"),
    eval_every: Optional[int] = _opt(PretrainConfig, "eval_every", "--eval-every"),
    max_eval_sequences: Optional[int] = _opt(PretrainConfig, "max_eval_sequences", "--max-eval-sequences"),
    seq_len: Optional[int] = _opt(PretrainConfig, "seq_len", "--seq-len"),
    micro_batch_size: Optional[int] = _opt(PretrainConfig, "micro_batch_size", "--micro-batch-size"),
    grad_accum: Optional[int] = _opt(PretrainConfig, "grad_accum", "--grad-accum"),
    max_steps: Optional[int] = _opt(PretrainConfig, "max_steps", "--max-steps"),
    max_tokens: Optional[int] = _opt(PretrainConfig, "max_tokens", "--max-tokens"),
    lr: Optional[float] = _opt(PretrainConfig, "lr", "--lr"),
    min_lr_ratio: Optional[float] = _opt(PretrainConfig, "min_lr_ratio", "--min-lr-ratio"),
    warmup_steps: Optional[int] = _opt(PretrainConfig, "warmup_steps", "--warmup-steps"),
    weight_decay: Optional[float] = _opt(PretrainConfig, "weight_decay", "--weight-decay"),
    adam_beta1: Optional[float] = _opt(PretrainConfig, "adam_beta1", "--adam-beta1"),
    adam_beta2: Optional[float] = _opt(PretrainConfig, "adam_beta2", "--adam-beta2"),
    grad_clip: Optional[float] = _opt(PretrainConfig, "grad_clip", "--grad-clip"),
    seed: Optional[int] = _opt(PretrainConfig, "seed", "--seed"),
    save_every: Optional[int] = _opt(PretrainConfig, "save_every", "--save-every"),
    log_every: Optional[int] = _opt(PretrainConfig, "log_every", "--log-every"),
    resume: Optional[bool] = _opt(PretrainConfig, "resume", "--resume/--no-resume"),
    token_cache: Optional[str] = _opt(PretrainConfig, "token_cache", "--token-cache"),
    device: Optional[str] = _opt(PretrainConfig, "device", "--device"),
    dtype: Optional[str] = _opt(PretrainConfig, "dtype", "--dtype"),
    lean_loss: Optional[bool] = _opt(PretrainConfig, "lean_loss", "--lean-loss/--no-lean-loss"),
    compile: Optional[bool] = _opt(PretrainConfig, "compile", "--compile/--no-compile"),
    activation_checkpointing: Optional[bool] = _opt(
        PretrainConfig, "activation_checkpointing", "--activation-checkpointing/--no-activation-checkpointing"
    ),
    fsdp: Optional[bool] = _opt(PretrainConfig, "fsdp", "--fsdp/--no-fsdp"),
    peak_tflops: Optional[float] = _opt(PretrainConfig, "peak_tflops", "--peak-tflops"),
    nproc: Optional[int] = _opt(PretrainConfig, "nproc", "--nproc"),
    kd_teacher: Optional[str] = _opt(PretrainConfig, "kd_teacher", "--kd-teacher"),
    kd_cache: Optional[str] = _opt(PretrainConfig, "kd_cache", "--kd-cache"),
    kd_weight: Optional[float] = _opt(PretrainConfig, "kd_weight", "--kd-weight"),
    kd_temperature: Optional[float] = _opt(PretrainConfig, "kd_temperature", "--kd-temperature"),
    trust_remote_code: Optional[bool] = _opt(PretrainConfig, "trust_remote_code", "--trust-remote-code/--no-trust-remote-code"),
    overwrite: Optional[bool] = _opt(PretrainConfig, "overwrite", "--overwrite/--no-overwrite"),
):
    """Pretrain a model from scratch (any transformers causal-LM config) on a corpus, e.g. a refined one.

    Also trains MiniPLM's reference model: a small LM on a small random split, with the teacher's tokenizer.
    Data parallel over GPUs or nodes: `--nproc N`, or `torchrun --nproc_per_node N [--nnodes ...] -m refine pretrain ...`.
    """
    from refine.pretrain import pretrain

    overrides = {k: v for k, v in locals().items() if k not in ("config", "pretrain")}
    cfg = _run(PretrainConfig, config, overrides, lambda c: c)
    if cfg.nproc > 1 and "WORLD_SIZE" not in os.environ:
        _launch_torchrun(cfg.nproc)
    m = _run(PretrainConfig, config, overrides, pretrain)
    if "rank" in m:  # not rank 0: rank 0 reports
        return
    typer.echo(f"trained {m['model_type']} ({m['n_params']} params) for {m['steps']} steps; held-out loss {m['eval_loss']:.4f}")


@app.command("distill-cache")
def distill_cache_command(
    data: Optional[str] = _arg(DistillCacheConfig, "data"),
    teacher: Optional[str] = _opt(DistillCacheConfig, "teacher", "--teacher"),
    output: Optional[str] = _opt(DistillCacheConfig, "output", "--output", "-o"),
    top_k: Optional[int] = _opt(DistillCacheConfig, "top_k", "--top-k"),
    logprob_dtype: Optional[str] = _opt(DistillCacheConfig, "logprob_dtype", "--logprob-dtype"),
    seq_len: Optional[int] = _opt(DistillCacheConfig, "seq_len", "--seq-len"),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    split: Optional[str] = _opt(DistillCacheConfig, "split", "--split"),
    name: Optional[str] = _opt(DistillCacheConfig, "name", "--name"),
    text_column: Optional[str] = _opt(DistillCacheConfig, "text_column", "--text-column"),
    eval_data: Optional[str] = _opt(DistillCacheConfig, "eval_data", "--eval-data"),
    eval_fraction: Optional[float] = _opt(DistillCacheConfig, "eval_fraction", "--eval-fraction"),
    seed: Optional[int] = _opt(DistillCacheConfig, "seed", "--seed"),
    token_cache: Optional[str] = _opt(DistillCacheConfig, "token_cache", "--token-cache"),
    teacher_revision: Optional[str] = _opt(DistillCacheConfig, "teacher_revision", "--teacher-revision"),
    batch_size: Optional[int] = _opt(DistillCacheConfig, "batch_size", "--batch-size"),
    shard_sequences: Optional[int] = _opt(DistillCacheConfig, "shard_sequences", "--shard-sequences"),
    device: Optional[str] = _opt(DistillCacheConfig, "device", "--device"),
    dtype: Optional[str] = _opt(DistillCacheConfig, "dtype", "--dtype"),
    nproc: Optional[int] = _opt(DistillCacheConfig, "nproc", "--nproc"),
    trust_remote_code: Optional[bool] = _opt(DistillCacheConfig, "trust_remote_code", "--trust-remote-code/--no-trust-remote-code"),
    overwrite: Optional[bool] = _opt(DistillCacheConfig, "overwrite", "--overwrite/--no-overwrite"),
):
    """Cache the teacher's top-k next tokens for every packed training sequence, for `refine pretrain --kd-cache`.

    Give the same data, --seq-len and held-out options as the pretrain run that will use it. Resumable
    (rerun the same command); many GPUs: `--nproc N` or torchrun, shards dealt round-robin.
    """
    from refine.distill import build_cache

    overrides = {k: v for k, v in locals().items() if k not in ("config", "build_cache")}
    cfg = _run(DistillCacheConfig, config, overrides, lambda c: c)
    if cfg.nproc > 1 and "WORLD_SIZE" not in os.environ:
        _launch_torchrun(cfg.nproc)
    m = _run(DistillCacheConfig, config, overrides, build_cache)
    if "rank" in m:
        return
    typer.echo(f"cached the top {m['top_k']} teacher tokens for {m['n_sequences']} sequences of {m['seq_len']} "
               f"({m['bytes_per_token']} bytes per token) in {m['elapsed_s']} s")


@app.command("plan")
def plan_command(
    student_params: Optional[str] = _opt(PlanConfig, "student_params", "--student-params"),
    tokens: Optional[str] = _opt(PlanConfig, "tokens", "--tokens"),
    teacher_loss: Optional[float] = _opt(PlanConfig, "teacher_loss", "--teacher-loss"),
    from_scores: Optional[str] = _opt(PlanConfig, "from_scores", "--from-scores"),
    teacher_params: Optional[str] = _opt(PlanConfig, "teacher_params", "--teacher-params"),
    teacher_tokens: Optional[str] = _opt(PlanConfig, "teacher_tokens", "--teacher-tokens"),
    compute: Optional[str] = _opt(PlanConfig, "compute", "--compute"),
    candidate: Optional[List[str]] = _opt(PlanConfig, "candidate", "--candidate"),
    scenario: Optional[str] = _opt(PlanConfig, "scenario", "--scenario"),
    plot: Optional[str] = _opt(PlanConfig, "plot", "--plot"),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
):
    """Predict a student's loss with and without distillation, and its compute, before paying for either.

    Uses the distillation scaling law of Busbridge et al. (2025) (fitted on C4): a planning estimate.
    """
    from refine.plan import plan

    overrides = {k: v for k, v in locals().items() if k not in ("config", "plan")}
    for line in _run(PlanConfig, config, overrides, plan):
        typer.echo(line)


def _launch_torchrun(nproc: int) -> None:
    """Re-run this very command under torchrun with `nproc` processes, then exit with its status."""
    from refine.distributed import torchrun_command

    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            args.append(arg)
    raise typer.Exit(subprocess.run(torchrun_command(nproc, args)).returncode)


def main() -> None:
    app(prog_name="refine")


if __name__ == "__main__":
    sys.exit(main())
