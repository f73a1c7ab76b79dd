import dataclasses
import json
import os
import subprocess
import sys

import datasets
import pytest
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from refine.cli import app
from refine.config import DistillCacheConfig, EvalConfig, PlanConfig, PretrainConfig, PushConfig, ReportConfig, SampleConfig, ScoreConfig

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, *fragments):
    """Exit code 2, one `error:` line naming the problem, no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("command, config_class", [("score", ScoreConfig), ("sample", SampleConfig), ("pretrain", PretrainConfig),
                                                    ("report", ReportConfig), ("push", PushConfig),
                                                    ("distill-cache", DistillCacheConfig), ("plan", PlanConfig),
                                                    ("eval", EvalConfig)])
def test_help_explains_every_option(command, config_class):
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = " ".join(result.output.replace("│", " ").split())
    positional = {"score": ["data"], "sample": ["scores"], "pretrain": ["data"], "report": ["scores"],
                  "push": ["refined", "target"], "distill-cache": ["data"], "plan": [], "eval": ["models"]}[command]
    for field in dataclasses.fields(config_class):
        if field.name not in positional:
            assert f"--{field.name.replace('_', '-')}" in text, field.name
        assert " ".join(field.metadata["help"].split())[:40] in text, field.name
    assert "--config" in text


def test_top_level_help_lists_the_stages():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("score", "sample", "pretrain", "report", "push", "distill-cache", "plan", "eval"):
        assert command in result.output


def test_pipeline_end_to_end(tmp_path, teacher_dir, reference_dir, corpus_file):
    scores, refined, student = tmp_path / "scores", tmp_path / "refined", tmp_path / "student"
    result = invoke("score", corpus_file, "--teacher", teacher_dir, "--reference", reference_dir, "--output", scores,
                    "--max-length", 16)
    assert result.exit_code == 0, result.output
    assert "skipped 2 empty" in result.stdout
    result = invoke("sample", scores, "--alpha", 0.5, "--output", refined)
    assert result.exit_code == 0, result.output
    assert "kept 4 of 8 instances" in result.stdout

    kept = datasets.load_dataset(str(refined), split="train")
    assert kept.column_names == ["text", "source", "id", "n_tokens", "teacher_logprob", "ref_logprob", "score"]
    assert kept["id"] == sorted(kept["id"])  # original corpus order
    all_scores = datasets.load_dataset(str(scores), split="train").to_pandas()
    assert min(kept["score"]) >= all_scores["score"].median() - 1e-12

    config = tmp_path / "student.yaml"
    config.write_text("model_config: tiny-llama\nseq_len: 16\nmax_steps: 5\nmicro_batch_size: 2\neval_fraction: 0.25\n")
    result = invoke("pretrain", refined, "--config", config, "--tokenizer", teacher_dir, "--output", student, "--max-steps", 3)
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(student)
    assert json.loads((student / "manifest.json").read_text())["steps"] == 3  # the flag overrode the YAML
    assert model.config.model_type == "llama"


def test_python_dash_m_reports_bad_input_on_one_line(tmp_path):
    process = subprocess.run(
        [sys.executable, "-m", "refine", "sample", str(tmp_path / "nothing"), "--output", str(tmp_path / "o"), "--alpha", "1.5"],
        capture_output=True, text=True,
    )
    assert process.returncode == 2
    assert process.stderr.strip() == "error: --alpha 1.5 is outside (0, 1]; give the fraction to keep, e.g. 0.5"


@pytest.fixture
def scored(tmp_path, teacher_dir, reference_dir, corpus_file):
    result = invoke("score", corpus_file, "--teacher", teacher_dir, "--reference", reference_dir, "--output",
                    tmp_path / "scores", "--max-length", 16)
    assert result.exit_code == 0
    return tmp_path / "scores"


def test_bad_input_to_score(tmp_path, teacher_dir, reference_dir, corpus_file):
    base = ["score", corpus_file, "--teacher", teacher_dir, "--reference", reference_dir, "--output", tmp_path / "s",
            "--max-length", 16]
    assert_user_error(invoke(*base, "--text-column", "content"), "--text-column", "text, source")
    assert_user_error(invoke(*base[:3], "./no/such/model", *base[4:]), "does not exist")
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text('{"text": 1}\n{"text": 2}\n')
    assert_user_error(invoke("score", numbers, *base[2:]), "not strings")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert_user_error(invoke("score", empty, *base[2:]), "empty")
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": "  "}\n{"text": ""}\n')
    assert_user_error(invoke("score", blank, *base[2:]), "whitespace-only")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9\n")
    assert_user_error(invoke("score", bad, *base[2:]), "UTF-8")
    assert_user_error(invoke(*base[:-1], 1, "--unit", "page"), "--unit", "--max-length")
    assert_user_error(invoke("score", corpus_file, "--teacher", teacher_dir), "--reference is required", "--output is required")
    for leftover in (tmp_path / "s").glob("**/*"):
        assert leftover.name != "manifest.json"


def test_bad_input_to_sample(tmp_path, scored, corpus_file):
    for alpha in ("0", "-0.1", "1.01"):
        assert_user_error(invoke("sample", scored, "--alpha", alpha, "--output", tmp_path / "r"), "outside (0, 1]")
    assert_user_error(invoke("sample", tmp_path / "missing", "--output", tmp_path / "r"), "not a finished `refine score` output")
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(10)))
    assert_user_error(invoke("sample", scored, "--data", other, "--output", tmp_path / "r"), "differs from the one that was scored")
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text('{"text": "one"}\n')
    assert_user_error(invoke("sample", scored, "--data", fewer, "--output", tmp_path / "r"), "has 1 rows")
    assert not (tmp_path / "r").exists()
    assert invoke("sample", scored, "--output", tmp_path / "r").exit_code == 0
    assert_user_error(invoke("sample", scored, "--output", tmp_path / "r"), "--overwrite")
    assert invoke("sample", scored, "--output", tmp_path / "r", "--overwrite", "--method", "random").exit_code == 0


def test_bad_input_to_pretrain(tmp_path, teacher_dir, corpus_file):
    base = ["pretrain", corpus_file, "--tokenizer", teacher_dir, "--output", tmp_path / "p", "--seq-len", 16]
    assert_user_error(invoke(*base, "--model-config", "tiny-llama", "--max-steps", 0), "positive")
    assert_user_error(invoke(*base, "--model-config", "tiny-llama"), "--max-steps or --max-tokens")
    assert_user_error(invoke(*base, "--model-config", "./nope.json", "--max-steps", 1), "not found", "preset")
    assert_user_error(invoke(*base[:-1], 4096, "--model-config", "tiny-gpt2", "--max-steps", 1), "positions")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("max_step: 3\n")
    assert_user_error(invoke(*base, "--config", bad_yaml), "unknown key `max_step`")
    assert not (tmp_path / "p" / "manifest.json").exists()


def run_refine(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "refine", *map(str, args)], capture_output=True, text=True, **kwargs)


@pytest.mark.parametrize("args, fragment", [
    (["sample", "s", "-o", "r", "--alpha", "abc"], "--alpha 'abc' is not a number"),
    (["sample", "s", "-o", "r", "--alpha"], "option '--alpha' requires an argument; see `refine sample --help`"),
    (["sample", "s", "-o", "r", "--alpah", "0.5"], "no such option: --alpah"),
    (["sample", "s", "t", "-o", "r"], "got unexpected extra argument"),
    (["smaple"], "no such command 'smaple'. Did you mean 'sample'?; see `refine --help`"),
    (["pretrain", "d", "--lr", "nan"], "--lr 'nan' is not a finite number"),
    (["pretrain", "d", "--adam-beta1", "1.5"], "--adam-beta1 1.5 is outside [0, 1)"),
    (["pretrain", "d", "--warmup-steps", "-5"], "--warmup-steps -5 must be at least 0"),
    (["pretrain", "d", "--seed", "-1"], "--seed -1 is outside"),
    (["score", "d", "--shard-size", "0"], "--shard-size 0 must be at least 1"),
    (["score", "d", "--dtype", "fp8"], "--dtype 'fp8' is not one of"),
    (["distill-cache", "d", "--logprob-dtype", "int8"], "--logprob-dtype 'int8' is not one of"),
    (["plan", "--student-params", "200M", "--tokens", "10B", "--scenario", "free"], "--scenario 'free' is not one of"),
])
def test_bad_flags_give_one_line_through_python_dash_m_and_the_runner(args, fragment):
    process = run_refine(*args)
    assert process.returncode == 2, process.stderr
    assert "Traceback" not in process.stderr and "Usage" not in process.stderr
    assert len(process.stderr.strip().splitlines()) == 1 and process.stderr.startswith("error: ")
    assert fragment in process.stderr
    assert_user_error(invoke(*args), fragment)


@pytest.mark.parametrize("text, fragment", [
    ("alpha: true\n", "`alpha: true` in"), ("alpha: 0.1\nalpha: 0.2\n", "appears twice"),
    ("- 0.5\n", "holds a list"), ("just text\n", "holds a str"), ("shard_size_mb: 2.5\n", "is not an integer"),
])
def test_bad_yaml_gives_one_line(tmp_path, text, fragment):
    (tmp_path / "run.yaml").write_text(text)
    process = run_refine("sample", tmp_path / "s", "-o", tmp_path / "r", "--config", tmp_path / "run.yaml")
    assert process.returncode == 2 and process.stderr.count("\n") == 1 and fragment in process.stderr, process.stderr
    assert not (tmp_path / "r").exists()


def test_version():
    process = run_refine("--version")
    assert process.returncode == 0 and process.stdout.strip() == "refine 0.1.0"
    assert invoke("--version").stdout.strip() == "refine 0.1.0"


def test_help_shows_defaults_and_marks_required_options():
    text = " ".join(runner.invoke(app, ["pretrain", "--help"], env={"COLUMNS": "200"}).output.replace("│", " ").split())
    assert "(default: 0.0006)" in text and "(default: no-resume)" in text and "(default: lean-loss)" in text
    assert "Tokenizer: hub id, local directory or .gguf file. (required)" in text
    plan_help = " ".join(runner.invoke(app, ["plan", "--help"], env={"COLUMNS": "200"}).output.replace("│", " ").split())
    assert "--candidate" in plan_help and "(default: teacher-inference)" in plan_help


def test_every_field_becomes_an_option():
    from refine.cli import app as cli_app
    from typer.main import get_command

    group = get_command(cli_app)
    for name, cls in [("score", ScoreConfig), ("sample", SampleConfig), ("pretrain", PretrainConfig), ("report", ReportConfig),
                      ("push", PushConfig), ("distill-cache", DistillCacheConfig), ("plan", PlanConfig), ("eval", EvalConfig)]:
        params = {p.name for p in group.commands[name].params}
        assert params == {f.name for f in dataclasses.fields(cls)} | {"config", "verbose"}, name


def test_repeatable_list_option_and_yaml_list(tmp_path):
    args = ["plan", "--student-params", "200M", "--compute", "1e21", "--candidate", "1.8B:2.3", "--candidate", "7B:2.1"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "1.8B (loss 2.300)" in result.stdout and "7B (loss 2.100)" in result.stdout
    (tmp_path / "plan.yaml").write_text("student_params: 200M\ncompute: 1.0e+21\ncandidate: [1.8B:2.3, 7B:2.1]\n")
    from_yaml = invoke("plan", "--config", tmp_path / "plan.yaml")
    assert from_yaml.exit_code == 0 and from_yaml.stdout == result.stdout


def test_flags_not_given_keep_yaml_values(tmp_path, tiny_run):
    (tmp_path / "run.yaml").write_text(f"scores: {tiny_run / 'scores'}\nalpha: 0.2\nmethod: random\nseed: 3\n")
    result = invoke("sample", "--config", tmp_path / "run.yaml", "-o", tmp_path / "r")
    assert result.exit_code == 0, result.output
    assert "by random alpha=0.2" in result.stdout


def test_push_target_is_checked_before_sampling(tmp_path, scored):
    result = invoke("sample", scored, "--output", tmp_path / "r", "--push-to-hub", "not a repo!")
    assert_user_error(result, "not a valid Hub dataset repo id")
    assert not (tmp_path / "r").exists()


def test_third_party_bars_are_quiet_unless_verbose(tmp_path, scored):
    def run(output, *extra):  # a fresh datasets cache, so the corpus is read (and its split generated) again
        env = {k: v for k, v in os.environ.items() if "PROGRESS_BARS" not in k and "VERBOSITY" not in k}
        env["HF_DATASETS_CACHE"] = str(tmp_path / f"cache-{output}")  # (in-process runs above set those variables)
        return subprocess.run([sys.executable, "-m", "refine", "sample", str(scored), "--output", str(tmp_path / output),
                               *extra], capture_output=True, text=True, env=env)

    quiet, loud = run("q"), run("l", "--verbose")
    assert quiet.returncode == loud.returncode == 0, quiet.stderr + loud.stderr
    assert "Generating train split" not in quiet.stderr and "Generating train split" in loud.stderr


def test_a_global_batch_beyond_the_data_is_refused(tmp_path, teacher_dir, corpus_file):
    result = invoke("pretrain", corpus_file, "--tokenizer", teacher_dir, "--output", tmp_path / "p", "--seq-len", 8,
                    "--model-config", "tiny-llama", "--max-steps", 1, "--grad-accum", 2_000_000_000)
    assert_user_error(result, "exceeds the", "packed training sequences")
