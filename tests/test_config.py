"""Field validation in refine.config: types from YAML and flags alike, ranges, choices, duplicate keys, rules."""

import dataclasses
import typing

import pytest

from refine import distill, plan, sample, score
from refine.config import (Check, DistillCacheConfig, EvalConfig, PlanConfig, PretrainConfig, PushConfig, ReportConfig, SampleConfig,
                           ScoreConfig, at_least, between, check_config, load_config, one_of, positive)
from refine.errors import RefineError

ALL = [ScoreConfig, SampleConfig, ReportConfig, PushConfig, PretrainConfig, DistillCacheConfig, PlanConfig, EvalConfig]
SAMPLE = {"scores": "s", "output": "o"}
PRETRAIN = {"data": "d", "model_config": "tiny-llama", "tokenizer": "t", "output": "o", "max_steps": "1"}


def problems(cls, overrides=None, yaml_text=None, tmp_path=None) -> list[str]:
    path = None
    if yaml_text is not None:
        path = tmp_path / "run.yaml"
        path.write_text(yaml_text)
    with pytest.raises(RefineError) as error:
        load_config(cls, str(path) if path else None, overrides)
    return error.value.problems


def test_checks_describe_the_problem_and_the_fix():
    assert Check().problem(3) is None
    assert at_least(1).problem(0) == "must be at least 1; give 1 or more"
    assert positive().problem(0) == "must be positive; give a number above 0"
    assert between(0, 1, low_open=True, fix="give a fraction").problem(1.5) == "is outside (0, 1]; give a fraction"
    assert between(0, 1, high_open=True).problem(1) == "is outside [0, 1); give a value in [0, 1)"
    assert between(0, 1, high_open=True).problem(0) is None
    assert one_of("a", "b").problem("c") == "is not one of a, b; choose one of them"


def test_every_field_has_help_and_every_check_is_a_check():
    for cls in ALL:
        for f in dataclasses.fields(cls):
            assert f.metadata["help"], (cls, f.name)
            assert f.metadata.get("check") is None or isinstance(f.metadata["check"], Check)


def test_every_default_passes_its_own_checks():
    for cls in ALL:
        for f in dataclasses.fields(cls):
            check = f.metadata.get("check")
            if check is not None and f.default is not None:
                assert check.problem(f.default) is None, (cls, f.name)


def test_choices_match_the_stages():
    def choices(cls, name):
        return set(next(f for f in dataclasses.fields(cls) if f.name == name).metadata["check"].choices)

    assert choices(ScoreConfig, "unit") == set(score.UNITS)
    assert choices(ScoreConfig, "normalize") == set(score.NORMALIZATIONS)
    assert choices(SampleConfig, "method") == set(sample.METHODS)
    assert choices(DistillCacheConfig, "logprob_dtype") == set(distill.LOGPROB_DTYPES)
    assert choices(PlanConfig, "scenario") == set(plan.SCENARIOS)


def test_flag_values_are_converted_like_yaml_values():
    cfg = load_config(PretrainConfig, None, {**PRETRAIN, "max_steps": None, "max_tokens": "1e9", "lr": "3e-4",
                                             "resume": True})
    assert cfg.max_tokens == 1_000_000_000 and isinstance(cfg.max_tokens, int)
    assert cfg.lr == 3e-4 and cfg.resume is True


@pytest.mark.parametrize("line, fragment", [
    ("alpha: true", "`alpha: true` in"),  # a bool is not a float
    ("alpha: abc", "is not a number"),
    ("alpha: .nan", "is not a finite number"),
    ("alpha: [0.5]", "is not a number"),
    ("seed: null", "needs a value"),  # alpha may be null: no --alpha (a token budget, or the default 0.5)
    ("seed: 2.5", "is not an integer"),
    ("seed: true", "is not an integer"),
    ("method: 3", "is not one of"),
    ("method: [difference]", "is not text"),
    ("overwrite: 1", "is not true or false"),
    ("data: ''", "is empty"),
])
def test_wrong_types_in_yaml_are_refused(tmp_path, line, fragment):
    found = problems(SampleConfig, SAMPLE, line + "\n", tmp_path)
    assert len(found) == 1 and fragment in found[0], found


@pytest.mark.parametrize("cls, overrides, fragment", [
    (SampleConfig, {"alpha": "abc"}, "--alpha 'abc' is not a number"),
    (PretrainConfig, {"lr": "nan"}, "--lr 'nan' is not a finite number"),
    (PretrainConfig, {"lr": "inf"}, "--lr 'inf' is not a finite number"),
    (PretrainConfig, {"adam_beta1": "1.5"}, "--adam-beta1 1.5 is outside [0, 1)"),
    (PretrainConfig, {"adam_beta2": "1"}, "--adam-beta2 1.0 is outside [0, 1)"),
    (PretrainConfig, {"warmup_steps": "-5"}, "--warmup-steps -5 must be at least 0"),
    (PretrainConfig, {"seed": "-1"}, "--seed -1 is outside [0, 4294967295]"),
    (PretrainConfig, {"micro_batch_size": "0"}, "--micro-batch-size 0 must be at least 1"),
    (PretrainConfig, {"max_steps": "0"}, "--max-steps 0 must be positive"),
    (PretrainConfig, {"seq_len": str(2**70)}, "does not fit in 64 bits"),
    (PretrainConfig, {"dtype": "float16"}, "--dtype 'float16' is not one of auto, float32, bfloat16"),
    (ScoreConfig, {"unit": "page"}, "--unit 'page' is not one of document, chunk"),
    (ScoreConfig, {"normalize": "words"}, "--normalize 'words' is not one of tokens, bytes"),
    (ScoreConfig, {"shard_size": "2.5"}, "--shard-size '2.5' is not an integer"),
    (ScoreConfig, {"max_length": "abc"}, "--max-length 'abc' is not an integer"),
    (SampleConfig, {"method": "best"}, "--method 'best' is not one of"),
    (DistillCacheConfig, {"logprob_dtype": "int8"}, "--logprob-dtype 'int8' is not one of float16, float32"),
    (PlanConfig, {"scenario": "cheap"}, "--scenario 'cheap' is not one of"),
    (ReportConfig, {"output": "report.txt"}, "--output 'report.txt' should end in .html"),
])
def test_bad_flag_values_are_refused(cls, overrides, fragment):
    required = {f.name: "x" for f in dataclasses.fields(cls) if f.metadata.get("required")}
    if cls is PretrainConfig:
        required["max_steps"] = "1"
    found = problems(cls, {**required, **overrides})
    assert len(found) == 1 and fragment in found[0], found


def test_every_problem_is_reported_at_once(tmp_path):
    found = problems(PretrainConfig, {"lr": "nan", "warmup_steps": "-5", "resume": True, "overwrite": True,
                                      "max_tokens": "1000"},
                     "max_steps: 3\nmax_steps: 4\nadam_beta1: true\nbogus: 1\n", tmp_path)
    text = "; ".join(found)
    for fragment in ("appears twice", "unknown key `bogus`", "`adam_beta1: true`", "--lr 'nan'", "--warmup-steps -5",
                     "--model-config is required", "--resume and --overwrite", "both --max-steps and --max-tokens"):
        assert fragment in text, text


def test_a_rule_over_a_bad_field_is_not_run():
    # max_length is bad, so the batch-vs-window rule has nothing to compare and stays silent
    found = problems(ScoreConfig, {"data": "d", "teacher": "t", "reference": "r", "output": "o", "max_length": "x",
                                   "max_tokens_per_batch": "4"})
    assert len(found) == 1 and "--max-length" in found[0]


def test_duplicate_keys_name_both_lines(tmp_path):
    found = problems(SampleConfig, SAMPLE, "alpha: 0.1\nseed: 1\nalpha: 0.2\n", tmp_path)
    assert found == [f"key `alpha` appears twice in {tmp_path / 'run.yaml'} (lines 1 and 3); keep one"]


@pytest.mark.parametrize("text, fragment", [("- alpha\n- 0.5\n", "holds a list"), ("0.5\n", "holds a float"),
                                            ("alpha: [\n", "is not valid YAML")])
def test_a_yaml_file_must_be_a_mapping(tmp_path, text, fragment):
    found = problems(SampleConfig, SAMPLE, text, tmp_path)
    assert len(found) == 1 and fragment in found[0]


def test_an_empty_yaml_file_is_no_values(tmp_path):
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    assert load_config(SampleConfig, str(tmp_path / "empty.yaml"), SAMPLE).method == "difference"


def test_flags_override_yaml(tmp_path):
    (tmp_path / "run.yaml").write_text("alpha: 0.2\nseed: 3\n")
    cfg = load_config(SampleConfig, str(tmp_path / "run.yaml"), {**SAMPLE, "alpha": "0.7", "seed": None})
    assert (cfg.alpha, cfg.seed) == (0.7, 3)


def test_a_bad_value_in_yaml_is_replaced_by_a_good_flag(tmp_path):
    (tmp_path / "run.yaml").write_text("alpha: 7\n")
    assert load_config(SampleConfig, str(tmp_path / "run.yaml"), {**SAMPLE, "alpha": "0.7"}).alpha == 0.7


def test_plan_lists_and_numbers_written_as_numbers(tmp_path):
    (tmp_path / "plan.yaml").write_text("student_params: 200000000\ncompute: 1.0e+21\ncandidate: [1.8B:2.3, 7e9]\n")
    cfg = load_config(PlanConfig, str(tmp_path / "plan.yaml"))
    assert cfg.student_params == "200000000" and cfg.compute == "1e+21" and cfg.candidate == ["1.8B:2.3", "7e9"]


def test_configs_built_in_code_are_checked_too():
    with pytest.raises(RefineError, match="--alpha 2 is outside"):
        SampleConfig(scores="s", output="o", alpha=2).check()
    with pytest.raises(RefineError, match="--seed '3' is not an integer"):  # no text parsing for code
        check_config(SampleConfig(scores="s", output="o", seed="3"))
    SampleConfig(scores="s", output="o", alpha=1).check()  # an int is a fine float


def test_every_annotation_is_one_the_loader_knows():
    for cls in ALL:
        for name, hint in typing.get_type_hints(cls).items():
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            base = typing.get_origin(args[0]) or args[0] if args else hint
            assert base in (str, int, float, bool, list), (cls, name, hint)


def test_unknown_overrides_in_code_are_reported():
    found = problems(SampleConfig, {**SAMPLE, "alhpa": 0.5})
    assert found == [f"unknown option `alhpa`; valid options: {', '.join(sorted(f.name for f in dataclasses.fields(SampleConfig)))}"]
