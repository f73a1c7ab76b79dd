"""The `refine` command line, generated from the config dataclasses in refine.config.

Each command is a plain function of its config (`score_command(cfg)`); `config_command` turns the
config's fields into the command's options: one field, one option, with the field's help text and
default. Options default to None ("not given") internally, so a YAML --config value is only overridden
by flags the user actually typed; `load_config` then converts and checks every value.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import subprocess
import sys
import typing
from typing import Any, Callable, List, Optional

import typer
from typer.core import TyperGroup

from refine import __version__
from refine.card import budget_text
from refine.config import (DistillCacheConfig, EvalConfig, PlanConfig, PretrainConfig, PushConfig, ReportConfig, SampleConfig, ScoreConfig,
                           flag, load_config)
from refine.errors import RefineError
from refine.output import WRITE_FAULTS, write_fault

try:  # typer >= 0.20 ships its own copy of click; older ones use click itself
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover
    from click import exceptions as click_errors

CONFIG_HELP = "YAML file whose keys are this command's option names (with underscores); flags given here override it."
# Flags whose spelling is not `--name/--no-name` or that have a short form.
FLAG_NAMES = {"private": ("--private/--public",), "output": ("--output", "-o")}


class OneLineErrors(TyperGroup):
    """Click's own parse errors (unknown flag, missing value, bad choice) as one `error:` line and exit code 2.

    Click would print a usage box; refine prints every user error the same way, whether it comes from
    click or from `load_config`, and whether the app runs from `main()` or typer's CliRunner.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_errors.NoArgsIsHelpError as e:  # bare `refine`: the help, as before
            e.show()
            code = e.exit_code
        except click_errors.ClickException as e:
            command = _command_path(self, e, args)
            message = " ".join(e.format_message().split()).rstrip(".")
            typer.echo(f"error: {message[:1].lower()}{message[1:]}; see `{command} --help`", err=True)
            code = 2
        except typer.Abort:
            typer.echo("interrupted; rerun the same command to continue where it stopped", err=True)
            code = 130
        code = code if isinstance(code, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


def _command_path(group, error, args) -> str:
    """`refine sample` for an error in `refine sample ...` (click does not always attach the context)."""
    ctx = getattr(error, "ctx", None)
    if ctx is not None and ctx.parent is not None:
        return f"refine {ctx.info_name}"
    words = list(sys.argv[1:] if args is None else args)
    return "refine " + words[0] if words and words[0] in group.commands else "refine"


app = typer.Typer(
    cls=OneLineErrors,
    help="Refine a pretraining corpus with a teacher LM (MiniPLM difference sampling): score → sample → pretrain.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"refine {__version__}")
        raise typer.Exit()


@app.callback()
def _refine(
    version: Optional[bool] = typer.Option(None, "--version", help="Print the version and exit.", callback=_print_version,
                                           is_eager=True),
) -> None:
    """Refine a pretraining corpus with a teacher LM (MiniPLM difference sampling): score → sample → pretrain."""


def _parameter(field: dataclasses.Field, annotation: Any, positional: bool) -> inspect.Parameter:
    """The typer Argument/Option of one config field: its type, flags, help and shown default."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    kind = typing.get_origin(args[0] if len(args) == 1 else annotation) or (args[0] if len(args) == 1 else annotation)
    help_text = field.metadata["help"]
    if field.metadata.get("required"):
        help_text += " (required)"
    if kind is bool:
        cli_type, decls = Optional[bool], FLAG_NAMES.get(field.name, (f"{flag(field.name)}/--no-{flag(field.name)[2:]}",))
        on, off = decls[0].split("/")
        help_text += f" (default: {(on if field.default else off).lstrip('-')})"
    elif kind is list:
        cli_type, decls = Optional[List[str]], (flag(field.name),)
    else:
        # Numbers are read as text and converted by load_config, as YAML values are, so `--max-tokens 1e9` works
        # and every bad value is reported together.
        cli_type, decls = Optional[str], FLAG_NAMES.get(field.name, (flag(field.name),))
        if field.default is not None:
            help_text += f" (default: {field.default})"
    metavar = {int: "INTEGER", float: "FLOAT", bool: None}.get(kind, "TEXT")
    if positional:
        info = typer.Argument(None, help=help_text, show_default=False, metavar=field.name.upper())
    else:
        info = typer.Option(None, *decls, help=help_text, show_default=False, metavar=metavar)
    return inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=cli_type)


def config_command(name: str, cls: type, positional: tuple[str, ...] = ()):
    """Register `run(cfg)` as `refine NAME`, with one option per field of `cls` (the fields in `positional` as arguments)."""

    def register(run: Callable[[Any], None]) -> Callable[[Any], None]:
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(cls)
        by_name = {f.name: f for f in fields}
        parameters = [_parameter(by_name[p], hints[p], positional=True) for p in positional]
        parameters += [_parameter(f, hints[f.name], positional=False) for f in fields if f.name not in positional]
        parameters.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                                            default=typer.Option(None, "--config", help=CONFIG_HELP, metavar="FILE.yaml")))
        parameters.append(inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                                            default=typer.Option(False, "--verbose", help=VERBOSE_HELP)))

        def command(config: Optional[str] = None, verbose: bool = False, **flags: Any) -> None:
            if not verbose:
                quiet_libraries()
            run(_stage(lambda: load_config(cls, config, flags)))

        command.__signature__ = inspect.Signature(parameters)
        command.__annotations__ = {p.name: p.annotation for p in parameters}
        command.__doc__ = run.__doc__
        command.__name__ = run.__name__
        app.command(name)(command)
        return run

    return register


VERBOSE_HELP = ("Also show the progress bars and warnings of datasets, transformers, huggingface_hub and "
                "lm-evaluation-harness, and the logs of datatrove's tasks.")


def quiet_libraries() -> None:
    """Third-party progress bars and info logs off, so each stage shows one refine bar (--verbose keeps them);
    datatrove's task logs follow huggingface_hub's switch (refine.engine.quiet_console).

    The variables are read when the libraries are imported (the stages import them lazily, after this);
    a library imported already is told directly.
    """
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' too; GGUF's via refine.models
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # "Generating train split"
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # the harness's info and warning lines (refine eval --tasks)
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
        sys.modules["datasets"].logging.set_verbosity_error()
    if "transformers" in sys.modules:
        sys.modules["transformers"].logging.set_verbosity_error()
        sys.modules["transformers"].logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()


def _stage(call: Callable[[], Any]) -> Any:
    """Run `call()`, turning bad user input into one `error:` line with exit code 2."""
    try:
        return call()
    except RefineError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("interrupted; rerun the same command to continue where it stopped", err=True)
        raise typer.Exit(130) from None
    except OSError as e:  # a fault of the machine that no stage turned into a RefineError itself
        typer.echo(f"error: {machine_fault(e)}", err=True)
        raise typer.Exit(2) from None


def machine_fault(error: OSError) -> str:
    """An OSError as `<problem>; <fix>`: a write fault names the file and the fix, anything else the path."""
    if error.filename is not None and error.errno in WRITE_FAULTS:
        return str(write_fault(error, error.filename))
    where = f" ({error.filename})" if error.filename is not None else ""
    return f"{(error.strerror or str(error)).lower()}{where}; check the path, the disk and the network, then rerun"


@config_command("score", ScoreConfig, positional=("data",))
def score_command(cfg: ScoreConfig) -> None:
    """Score every instance: log p_teacher(x) - log p_ref(x) per token, with both log-probs and token counts.

    Writes Parquet shards (columns id, n_tokens, teacher_logprob, ref_logprob, score) and manifest.json.
    Rerunning an interrupted command continues where it stopped. Many GPUs or nodes: `--nproc N`, or
    `torchrun --nproc_per_node N [--nnodes ...] -m refine score ...`.
    """
    from refine.proxy import proxy_score
    from refine.score import score

    _relaunch_under_torchrun(cfg.nproc)
    manifest = _stage(lambda: proxy_score(cfg) if cfg.proxy_fraction is not None else score(cfg))
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
    _echo_reference_check(manifest.get("reference_diagnostics"), cfg.weak_reference_overlap)


@config_command("sample", SampleConfig, positional=("scores",))
def sample_command(cfg: SampleConfig) -> None:
    """Keep the best-ranked scored instances (a fraction, or a token budget, optionally sampled and balanced over
    groups); write them as a dataset `datasets.load_dataset` opens."""
    from refine.push import check_target, push
    from refine.sample import sample

    if cfg.push_to_hub:
        _stage(lambda: check_target(cfg.push_to_hub))  # a bad repo id stops before any work, not after it
    m = _stage(lambda: sample(cfg))
    threshold = f"; score threshold {m['threshold']:.4f}" if m["threshold"] is not None else ""
    drawn = f" temperature={m['temperature']} seed={m['seed']}" if m.get("temperature") else ""
    drawn += f" balanced {m['balance']} over {m['group_column']}" if m.get("balance") else ""
    stats = m["score_stats"]
    typer.echo(
        f"kept {m['instances_after']} of {m['instances_before']} instances "
        f"({m['tokens_after']} of {m['tokens_before']} tokens) by {m['method']} {budget_text(m)}{drawn}{threshold}\n"
        f"scores: mean {stats['mean']:.3f}, quantiles 10% {stats['q10']:.3f} | 50% {stats['q50']:.3f} | 90% {stats['q90']:.3f}"
    )
    _echo_reference_check(m.get("reference_diagnostics"), cfg.weak_reference_overlap)
    if cfg.push_to_hub:
        target = {"refined": cfg.output, "target": cfg.push_to_hub, "private": cfg.private, "token": cfg.token}
        _echo_push(_stage(lambda: push(load_config(PushConfig, None, target))))


@config_command("report", ReportConfig, positional=("scores",))
def report_command(cfg: ReportConfig) -> None:
    """Write one HTML page showing the score distribution, teacher vs reference NLL, groups and examples."""
    from refine.report import report

    result = _stage(lambda: report(cfg))
    typer.echo(f"wrote {result['output']}: {result['kept']} of {result['instances']} instances kept at {result['budget']}")
    _echo_reference_check(result.get("reference_diagnostics"), cfg.weak_reference_overlap)


def _echo_reference_check(diagnostics: dict | None, threshold: float) -> None:
    """The reference's diagnostics in one line, and on stderr the warning when it is too weak to matter."""
    from refine.diagnostics import summary_line, weak_reference_warning

    if diagnostics is None:  # scores written before refine recorded them
        return
    typer.echo(summary_line(diagnostics))
    warning = weak_reference_warning(diagnostics, threshold)
    if warning:
        typer.echo(warning, err=True)


@config_command("push", PushConfig, positional=("refined", "target"))
def push_command(cfg: PushConfig) -> None:
    """Publish a refined dataset folder to the Hugging Face Hub (one commit) or to an fsspec URL."""
    from refine.push import push

    _echo_push(_stage(lambda: push(cfg)))


def _echo_push(result: dict) -> None:
    where = f" (commit {result['commit'][:12]})" if result.get("commit") else ""
    typer.echo(f"published {result['files']} files to {result['target']}{where}")


@config_command("pretrain", PretrainConfig, positional=("data",))
def pretrain_command(cfg: PretrainConfig) -> None:
    """Pretrain a model from scratch (any transformers causal-LM config) on a corpus, e.g. a refined one.

    Also trains MiniPLM's reference model: a small LM on a small random split, with the teacher's tokenizer.
    Data parallel over GPUs or nodes: `--nproc N`, or `torchrun --nproc_per_node N [--nnodes ...] -m refine pretrain ...`.
    """
    from refine.pretrain import pretrain

    _relaunch_under_torchrun(cfg.nproc)
    m = _stage(lambda: pretrain(cfg))
    if "rank" in m:  # not rank 0: rank 0 reports
        return
    typer.echo(f"trained {m['model_type']} ({m['n_params']} params) for {m['steps']} steps; held-out loss {m['eval_loss']:.4f} "
               f"(unigram baseline {m['unigram_eval_loss']:.4f})")
    if m["eval_loss"] >= m["unigram_eval_loss"]:
        typer.echo("warning: the held-out loss is no better than the unigram baseline, so the model has learnt no more "
                   "than token frequencies; train it longer (more steps or tokens), or with a smaller vocabulary", err=True)


@config_command("distill-cache", DistillCacheConfig, positional=("data",))
def distill_cache_command(cfg: DistillCacheConfig) -> None:
    """Cache the teacher's top-k next tokens for every packed training sequence, for `refine pretrain --kd-cache`.

    Give the same data, --seq-len and held-out options as the pretrain run that will use it. Resumable
    (rerun the same command); many GPUs: `--nproc N` or torchrun, shards dealt round-robin.
    """
    from refine.distill import build_cache

    _relaunch_under_torchrun(cfg.nproc)
    m = _stage(lambda: build_cache(cfg))
    if "rank" in m:
        return
    typer.echo(f"cached the top {m['top_k']} teacher tokens for {m['n_sequences']} sequences of {m['seq_len']} "
               f"({m['bytes_per_token']} bytes per token) in {m['elapsed_s']} s")


@config_command("plan", PlanConfig)
def plan_command(cfg: PlanConfig) -> None:
    """Predict a student's loss with and without distillation, and its compute, before paying for either.

    Uses the distillation scaling law of Busbridge et al. (2025) (fitted on C4): a planning estimate.
    """
    from refine.plan import plan

    for line in _stage(lambda: plan(cfg)):
        typer.echo(line)


@config_command("eval", EvalConfig, positional=("models",))
def eval_command(cfg: EvalConfig) -> None:
    """Evaluate models: loss per token and bits per byte on held-out text (--data), zero-shot tasks (--tasks).

    Writes results.json (every number, with the weights' SHA-256), results.md (one row per model) and, for
    several models, results.png. Tasks run through lm-evaluation-harness (refine's `eval` extra installs it).
    """
    from refine.eval import evaluate

    results = _stage(lambda: evaluate(cfg))
    for record in results["models"]:
        parts = []
        if "heldout" in record:
            h = record["heldout"]
            parts.append(f"held-out {h['bits_per_byte']:.4f} bits/byte, {h['loss_per_token']:.4f} nats/token")
        for task, metrics in record.get("tasks", {}).items():
            shown = next((m for m in ("acc", "acc_norm") if m in metrics), None)
            if shown:
                parts.append(f"{task} {shown} {metrics[shown]:.4f}")
        typer.echo(f"{record['name']}: " + "; ".join(parts))
    typer.echo(f"wrote {cfg.output}/results.json and results.md")


def _relaunch_under_torchrun(nproc: int) -> None:
    """With --nproc > 1 and no torchrun around us: re-run this very command under torchrun, then exit with its status."""
    if nproc <= 1 or "WORLD_SIZE" in os.environ:
        return
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
