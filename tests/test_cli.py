import dataclasses
import json
import subprocess
import sys

import datasets
import pytest
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from refine.cli import app
from refine.config import DistillCacheConfig, PlanConfig, PretrainConfig, PushConfig, ReportConfig, SampleConfig, ScoreConfig

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
                                                    ("distill-cache", DistillCacheConfig), ("plan", PlanConfig)])
def test_help_explains_every_option(command, config_class):
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = " ".join(result.output.replace("│", " ").split())
    positional = {"score": ["data"], "sample": ["scores"], "pretrain": ["data"], "report": ["scores"],
                  "push": ["refined", "target"], "distill-cache": ["data"], "plan": []}[command]
    for field in dataclasses.fields(config_class):
        if field.name not in positional:
            assert f"--{field.name.replace('_', '-')}" in text, field.name
        assert " ".join(field.metadata["help"].split())[:40] in text, field.name
    assert "--config" in text


def test_top_level_help_lists_the_stages():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("score", "sample", "pretrain", "report", "push", "distill-cache", "plan"):
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
    config.write_text(f"model_config: tiny-llama\nseq_len: 16\nmax_steps: 5\nmicro_batch_size: 2\neval_fraction: 0.25\n")
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
