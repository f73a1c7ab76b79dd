"""Property: whatever value any option gets, on the command line or in a YAML --config, refine either succeeds or
prints exactly one `error:` line with exit code 2; it never shows a traceback and never touches its inputs.

Each command starts from a small valid invocation on tiny real inputs (the conftest models and corpora) and
hypothesis replaces randomly chosen options with values of wrong and edge types. A few options are held fixed
so no drawn example can run long or reach outside the test: --nproc (would relaunch under torchrun), --compile
(torch.compile takes a minute), pretrain's --max-steps, --micro-batch-size and --grad-accum and score's
--proxy-epochs (a huge value is a huge job: pretrain takes --micro-batch-size 2147483648 at its word and
allocates for it), --tasks and --workers (as many processes as asked for) and --executor (Ray would start a
cluster, Slurm submit a job), and the Hub targets and token (--push-to-hub, push's TARGET: they would publish).
"""

import dataclasses
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from refine.cli import FLAG_NAMES, app
from refine.config import DistillCacheConfig, PlanConfig, PretrainConfig, PushConfig, ReportConfig, SampleConfig, ScoreConfig

HELD_FIXED = {"nproc", "compile", "push_to_hub", "token", "tasks", "workers", "executor"}
COMMANDS = {  # command: (config class, positional fields, fields held fixed besides HELD_FIXED)
    "score": (ScoreConfig, ("data",), {"proxy_epochs"}),
    "sample": (SampleConfig, ("scores",), set()),
    "report": (ReportConfig, ("scores",), set()),
    "push": (PushConfig, ("refined", "target"), {"target"}),
    "pretrain": (PretrainConfig, ("data",), {"max_steps", "micro_batch_size", "grad_accum"}),
    "distill-cache": (DistillCacheConfig, ("data",), set()),
    "plan": (PlanConfig, (), set()),
}

# Text without path separators, `~` or NUL, and never only dots: a drawn path always lands inside the run's
# folder (the working directory), so no example can write, or delete with --overwrite, anything else.
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\\~\x00"), max_size=6).filter(
    lambda s: s.strip(".") != "" or s == "")
EDGE_TEXT = st.sampled_from(["", " ", "nan", "inf", "-inf", "-1", "0", "1e9", "1e400", "2.5", "0.5", "true", "None",
                             "--help", "-o", "[]", "{}", "a: b"])
NUMBERS = st.one_of(st.integers(-3, 3), st.sampled_from([2**31, 2**63, -(2**63), 10**30]),
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e-300, 1.5, 0.5]))
WEIRD = st.one_of(TEXT, EDGE_TEXT, st.booleans(), NUMBERS, st.none(), st.lists(st.one_of(st.integers(0, 3), TEXT), max_size=2))


def fingerprint(root: Path) -> dict:
    """Every file under `root` with its content hash (the inputs must not change)."""
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, teacher_dir, reference_dir, tiny_run):
    """A copy of the tiny inputs in one folder, so one fingerprint covers everything a command reads.

    The Hub is switched off in this process (drawn strings like `True` would otherwise be looked up as hub ids,
    each lookup waiting for the network); the libraries read HF_HUB_OFFLINE once, at import, hence the patches.
    """
    import datasets.config
    import huggingface_hub.constants

    root = tmp_path_factory.mktemp("inputs")
    shutil.copytree(teacher_dir, root / "teacher")
    shutil.copytree(reference_dir, root / "reference")
    shutil.copytree(tiny_run, root / "run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        patch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        yield root


def base_values(command: str, inputs: Path) -> dict:
    """A small valid invocation of `command`, by field name."""
    corpus = str(inputs / "run" / "corpus.jsonl")
    return {
        "score": {"data": corpus, "teacher": str(inputs / "teacher"), "reference": str(inputs / "reference"),
                  "output": "scores", "max_length": 16},
        "sample": {"scores": str(inputs / "run" / "scores"), "output": "refined"},
        "report": {"scores": str(inputs / "run" / "scores"), "output": "report.html", "n_examples": 2},
        "push": {"refined": str(inputs / "run" / "out"), "target": "./pushed"},
        "pretrain": {"data": corpus, "model_config": "tiny-llama", "tokenizer": str(inputs / "teacher"), "output": "student",
                     "seq_len": 16, "max_steps": 1, "micro_batch_size": 2, "eval_fraction": 0.25, "max_eval_sequences": 2},
        "distill-cache": {"data": corpus, "teacher": str(inputs / "teacher"), "output": "cache", "seq_len": 16, "top_k": 4},
        "plan": {"student_params": "200M", "tokens": "10B", "teacher_loss": 2.3},
    }[command]


def argv(command: str, cls: type, positional: tuple, values: dict) -> list[str]:
    """`refine COMMAND ...` for these values: positional fields in order, then options (a bool as its flag)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    args = [command] + [str(values[name]) for name in positional if name in values]
    for name, value in values.items():
        if name in positional:
            continue
        option = FLAG_NAMES.get(name, ("--" + name.replace("_", "-"),))[0]
        if fields[name].type in ("bool", bool):
            on, _, off = option.partition("/")
            args.append((on if value is True else off or f"--no-{on[2:]}") if isinstance(value, bool) else on)
            if not isinstance(value, bool):
                args.append(str(value))  # a non-bool after a flag: an extra argument click must refuse
        elif isinstance(value, list):
            for item in value:
                args += [option, str(item)]
        else:
            args += [option, str(value)]
    return args


def run_and_check(inputs: Path, command: str, args: list[str], yaml_values: dict | None):
    before = fingerprint(inputs)
    work = Path(tempfile.mkdtemp(prefix="refine-prop-"))
    cwd = os.getcwd()
    try:
        os.chdir(work)  # relative paths (outputs, drawn strings) land here
        if yaml_values is not None:
            (work / "cfg").mkdir()
            (work / "cfg" / "run.yaml").write_text(yaml.safe_dump(yaml_values, allow_unicode=True))
            args = args + ["--config", str(work / "cfg" / "run.yaml")]
        result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    finally:
        os.chdir(cwd)
        shutil.rmtree(work, ignore_errors=True)
    context = f"refine {' '.join(args)} (yaml {yaml_values!r})\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert "Traceback" not in result.output, context
    assert result.exit_code in (0, 2), f"exit {result.exit_code} ({result.exception!r}): {context}"
    if result.exit_code == 2:
        lines = result.stderr.strip().splitlines()  # progress bars may come before the error
        assert [line for line in lines if line.startswith("error:")] == lines[-1:], context
    assert fingerprint(inputs) == before, f"inputs changed: {context}"
    event(f"exit {result.exit_code}")  # see the share of each outcome with --hypothesis-show-statistics


def draws(command: str):
    cls, positional, fixed = COMMANDS[command]
    names = sorted(f.name for f in dataclasses.fields(cls) if f.name not in HELD_FIXED | fixed)
    fields = {f.name: f for f in dataclasses.fields(cls)}

    def value(name):  # a fine value (a declared choice or the default) or a weird one
        check = fields[name].metadata.get("check")
        fine = st.sampled_from(check.choices) if check is not None and check.choices else st.just(fields[name].default)
        return st.one_of(fine, WEIRD)

    return st.dictionaries(st.sampled_from(names), st.none(), min_size=1, max_size=3).flatmap(
        lambda chosen: st.fixed_dictionaries({name: value(name) for name in chosen}))


@pytest.mark.slow
@pytest.mark.parametrize("command", list(COMMANDS))
def test_any_option_value_gives_success_or_one_error_line(command, inputs):
    cls, positional, _ = COMMANDS[command]

    @settings(max_examples=50, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(drawn=draws(command), in_yaml=st.booleans())
    def check(drawn, in_yaml):
        values = base_values(command, inputs)
        if in_yaml:
            cli = {k: v for k, v in values.items() if k not in drawn}
            run_and_check(inputs, command, argv(command, cls, positional, cli), drawn)
        else:
            values = {**values, **{k: v for k, v in drawn.items() if v is not None}}
            run_and_check(inputs, command, argv(command, cls, positional, values), None)

    check()
