import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import CORPUS, save_tiny_model, small_tokenizer, tiny_model
from refine.cli import app
from refine.config import EvalConfig
from refine.errors import RefineError
from refine.eval import MINIPLM_TASKS, document_nll, evaluate, model_names, split_task_specs
from refine.output import verify
from transformers import AutoModelForCausalLM, AutoTokenizer

runner = CliRunner()


def direct_logprobs(model, ids: list[int]) -> torch.Tensor:
    """The obvious computation: full logits of one unpadded sequence, log_softmax, gather (one per predicted token)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_models")
    return [save_tiny_model(root / "alpha", "llama", seed=1), save_tiny_model(root / "beta", "qwen2", seed=2)]


@pytest.fixture
def heldout_file(tmp_path):
    path = tmp_path / "heldout.jsonl"
    path.write_text("".join(json.dumps({"text": t, "source": "even" if i % 2 == 0 else "odd"}) + "\n"
                            for i, t in enumerate(CORPUS)))
    return path


def test_windows_predict_every_token_once_with_one_token_overlap():
    tokenizer = small_tokenizer()
    model = tiny_model("llama", tokenizer, seed=4)
    doc = list(range(10, 20))  # 10 tokens; with BOS 1 and windows of 4: [1,t0,t1,t2] [t2,t3,t4,t5] [t5,t6,t7,t8] [t8,t9]
    windows = [[1, *doc[0:3]], doc[2:6], doc[5:9], doc[8:10]]
    expected = -sum(float(direct_logprobs(model, w).sum()) for w in windows)
    short = [5, 6, 7]
    (nll_long, nll_short) = document_nll(model, [doc, short], start_id=1, max_length=4, max_tokens_per_batch=8)
    assert nll_long == pytest.approx(expected, abs=1e-4)
    assert nll_short == pytest.approx(-float(direct_logprobs(model, [1, *short]).sum()), abs=1e-4)


def test_heldout_loss_and_bits_per_byte_match_a_hand_computation(model_dirs, heldout_file, tmp_path):
    results = evaluate(EvalConfig(models=[str(model_dirs[0])], output=str(tmp_path / "out"), data=str(heldout_file),
                                  group_column="source", batch_size=2))
    model = AutoModelForCausalLM.from_pretrained(model_dirs[0]).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dirs[0])
    totals = {}  # group -> [nll, tokens, bytes, documents]
    for i, text in enumerate(CORPUS):
        if not text.strip():
            continue  # blank documents are skipped, as `refine score` does
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        nll = -float(direct_logprobs(model, [tokenizer.bos_token_id, *ids]).sum())
        for group in ("all", "even" if i % 2 == 0 else "odd"):
            t = totals.setdefault(group, [0.0, 0, 0, 0])
            t[0] += nll
            t[1] += len(ids)
            t[2] += len(text.encode("utf-8"))
            t[3] += 1
    heldout = results["models"][0]["heldout"]
    for numbers, (nll, n_tokens, n_bytes, n_documents) in [(heldout, totals["all"]), (heldout["groups"]["even"], totals["even"]),
                                                           (heldout["groups"]["odd"], totals["odd"])]:
        assert numbers["loss_per_token"] == pytest.approx(nll / n_tokens, rel=1e-5)
        assert numbers["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)
        assert (numbers["n_tokens"], numbers["n_bytes"], numbers["n_documents"]) == (n_tokens, n_bytes, n_documents)
    assert set(heldout["groups"]) == {"even", "odd"} and totals["all"][3] == 8  # two blank documents skipped
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["models"][0]["heldout"]["bits_per_byte"] == heldout["bits_per_byte"]
    assert written["models"][0]["name"] == "alpha"
    assert len(written["models"][0]["weights_sha256"]["model.safetensors"]) == 64
    assert set(written["versions"]) == {"refine", "torch", "transformers", "lm_eval"}


def test_two_models_give_a_table_and_a_figure_through_the_cli(model_dirs, heldout_file, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["eval", *map(str, model_dirs), "--data", str(heldout_file), "--group-column", "source",
                                 "--max-length", "16", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "alpha: held-out" in result.stdout and "beta: held-out" in result.stdout
    table = (out / "results.md").read_text().splitlines()
    assert table[0] == ("| model | held-out bits/byte | held-out loss/token | even bits/byte | odd bits/byte |")
    assert [row.split(" | ")[0] for row in table[2:]] == ["| alpha", "| beta"]
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = verify(out, "eval")  # every file recorded with its SHA-256, manifest last
    assert {f["path"] for f in manifest["files"]} == {"results.json", "results.md", "results.png"}
    results = json.loads((out / "results.json").read_text())
    bits = [m["heldout"]["bits_per_byte"] for m in results["models"]]
    assert f"{bits[0]:.4f}" in table[2] and f"{bits[1]:.4f}" in table[3]


def write_tasks(root):
    """Two local harness tasks over local jsonl files: a multiple-choice one and a LAMBADA-like last-word one."""
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    (root / "last_word.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in LAST_WORD_DOCS))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{label}}\"\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (tasks / "tiny_last_word.yaml").write_text(
        f"task: tiny_last_word\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'last_word.jsonl'}\n"
        "output_type: loglikelihood\ntest_split: test\n"
        "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\ndoc_to_target: \"{{' '+text.split(' ')[-1]}}\"\n"
        "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return tasks


MC_DOCS = [
    {"question": "The quick brown fox", "choices": [" jumps", " sleeps under the table all day long"], "label": 0},
    {"question": "def add(a, b):", "choices": [" return a + b if a else b + a", " pass"], "label": 1},
    {"question": "Lorem ipsum", "choices": [" dolor sit amet, consectetur", " x"], "label": 0},
]
LAST_WORD_DOCS = ["The quick brown fox jumps over the lazy dog", "def add a b return a plus b", "Short one again"]


def continuation_logprob(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | context) and whether it is the greedy continuation, encoded as the harness does:
    the whole string is tokenized and split where the context's own tokens end."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0, :-1].float()
    logprobs = torch.log_softmax(logits, dim=-1)[n_context - 1:]
    targets = torch.tensor(whole[n_context:])
    return float(logprobs.gather(-1, targets[:, None]).sum()), bool((logprobs.argmax(-1) == targets).all())


def test_harness_tasks_match_a_direct_computation(model_dirs, tmp_path):
    tasks = write_tasks(tmp_path)
    results = evaluate(EvalConfig(models=[str(model_dirs[0])], output=str(tmp_path / "out"), tasks=[str(tasks)]))
    model = AutoModelForCausalLM.from_pretrained(model_dirs[0]).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dirs[0])
    chosen = [int(np.argmax([continuation_logprob(model, tokenizer, d["question"], c)[0] for c in d["choices"]]))
              for d in MC_DOCS]
    expected_acc = np.mean([c == d["label"] for c, d in zip(chosen, MC_DOCS)])
    assert 0 < expected_acc < 1  # the labels make the check tell right from wrong answers
    last_word = [continuation_logprob(model, tokenizer, t.rsplit(" ", 1)[0], " " + t.rsplit(" ", 1)[1]) for t in LAST_WORD_DOCS]
    scores = results["models"][0]["tasks"]
    assert scores["tiny_mc"]["acc"] == pytest.approx(expected_acc)
    assert scores["tiny_last_word"]["perplexity"] == pytest.approx(math.exp(-np.mean([lp for lp, _ in last_word])), rel=1e-4)
    assert scores["tiny_last_word"]["acc"] == pytest.approx(np.mean([greedy for _, greedy in last_word]))
    assert results["models"][0]["harness"]["results"]["tiny_mc"]["acc,none"] == scores["tiny_mc"]["acc"]
    assert results["tasks"] == ["tiny_last_word", "tiny_mc"] and "heldout" not in results["models"][0]
    table = (tmp_path / "out" / "results.md").read_text()
    assert "tiny_mc acc" in table and "average acc" in table


def test_limit_passes_through_and_a_yaml_file_names_its_task(model_dirs, tmp_path):
    tasks = write_tasks(tmp_path)
    results = evaluate(EvalConfig(models=[str(model_dirs[1])], output=str(tmp_path / "out"),
                                  tasks=[str(tasks / "tiny_mc.yaml")], limit=2))
    assert results["tasks"] == ["tiny_mc"]
    assert results["models"][0]["harness"]["n-samples"]["tiny_mc"] == {"original": 3, "effective": 2}


def test_task_specs_expand_miniplm_and_split_commas():
    assert split_task_specs(["miniplm"]) == list(MINIPLM_TASKS)
    assert split_task_specs(["piqa,arc_easy", "piqa", " hellaswag "]) == ["piqa", "arc_easy", "hellaswag"]
    assert len(MINIPLM_TASKS) == 9 and "social_iqa" in MINIPLM_TASKS  # the paper's SIQA, by the harness's name


def test_model_names_are_base_names_unless_two_clash(tmp_path):
    for d in ("a/final", "b/final", "c/other"):
        (tmp_path / d).mkdir(parents=True)
    assert model_names([str(tmp_path / "c/other"), "org/model"]) == ["other", "org/model"]
    assert model_names([str(tmp_path / "a/final"), str(tmp_path / "b/final")]) == ["a/final", "b/final"]


def one_line_error(args, env=None) -> str:
    result = runner.invoke(app, ["eval", *map(str, args)], env=env)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_errors_are_one_line_before_any_model_loads(model_dirs, heldout_file, tmp_path):
    out = tmp_path / "out"
    assert "nothing to evaluate" in one_line_error([model_dirs[0], "--output", out])
    assert "no column 'domain'" in one_line_error([model_dirs[0], "--data", heldout_file, "--group-column", "domain", "--output", out])
    assert "given twice" in one_line_error([model_dirs[0], model_dirs[0], "--data", heldout_file, "--output", out])
    assert "exceeds the 512 positions" in one_line_error([model_dirs[0], "--data", heldout_file, "--max-length", "4096", "--output", out])
    assert "lies inside the input" in one_line_error([model_dirs[0], "--data", heldout_file, "--output", model_dirs[0] / "eval"])
    (out / "notes.txt").parent.mkdir()
    (out / "notes.txt").write_text("mine")
    assert "refine did not write" in one_line_error([model_dirs[0], "--data", heldout_file, "--output", out])
    (out / "notes.txt").unlink()
    out.rmdir()
    assert "does not exist" in one_line_error([tmp_path / "missing", "--data", heldout_file, "--output", out])
    assert "holds no lm-evaluation-harness task" in one_line_error([model_dirs[0], "--tasks", heldout_file, "--output", out])
    tasks = write_tasks(tmp_path)
    (tmp_path / "mc.jsonl").unlink()  # a task whose data cannot be read
    assert "could not prepare the tasks" in one_line_error([model_dirs[0], "--tasks", tasks / "tiny_mc.yaml", "--output", out])
    assert not out.exists()


def test_a_tokenizer_without_a_start_token_stops_the_run_before_any_model_loads(model_dirs, heldout_file, tmp_path):
    import shutil

    no_weights = shutil.copytree(model_dirs[0], tmp_path / "no-weights")  # loading this model would be the first error
    (no_weights / "model.safetensors").unlink()
    no_start = shutil.copytree(model_dirs[1], tmp_path / "no-start")
    tokenizer = AutoTokenizer.from_pretrained(no_start)
    tokenizer.bos_token = tokenizer.eos_token = None
    tokenizer.save_pretrained(no_start)
    error = one_line_error([no_weights, no_start, "--data", heldout_file, "--output", tmp_path / "out"])
    assert "neither a BOS nor an EOS token" in error and "no-start" in error
    assert not (tmp_path / "out").exists()


def test_unknown_and_hub_tasks_are_refused_offline_before_any_model_loads(tmp_path):
    # `org/never-loaded` is a hub id that is never fetched: the task checks come before any model loads.
    unknown = one_line_error(["org/never-loaded", "--tasks", "no_such_task,piqa", "--output", tmp_path / "out"])
    assert "unknown task 'no_such_task'" in unknown and "miniplm" in unknown
    offline = one_line_error(["org/never-loaded", "--tasks", "miniplm", "--output", tmp_path / "out"],
                             env={"HF_HUB_OFFLINE": "1"})
    assert "not reachable" in offline and "hellaswag" in offline and "storycloze_2016" in offline
    assert not (tmp_path / "out").exists()


def test_config_refuses_group_column_without_data():
    with pytest.raises(RefineError, match="--group-column splits the held-out corpus"):
        EvalConfig(models=["m"], output="o", tasks=["piqa"], group_column="domain").check()


def test_a_pretrain_output_is_evaluated_once_its_manifest_checks_out(tmp_path, heldout_file):
    from conftest import TINY
    from refine.config import PretrainConfig
    from refine.pretrain import pretrain

    tokenizer_dir = tmp_path / "tokenizer"
    small_tokenizer().save_pretrained(tokenizer_dir)
    (tmp_path / "llama.json").write_text(json.dumps({"model_type": "llama", **TINY["llama"]}))
    student = tmp_path / "runs" / "student"
    pretrain(PretrainConfig(data=str(heldout_file), model_config=str(tmp_path / "llama.json"), tokenizer=str(tokenizer_dir),
                            output=str(student), seq_len=16, micro_batch_size=2, max_steps=2, eval_fraction=0.2,
                            warmup_steps=1))
    results = evaluate(EvalConfig(models=[str(student)], output=str(tmp_path / "out"), data=str(heldout_file)))
    record = results["models"][0]
    assert record["name"] == "student" and record["heldout"]["n_documents"] == 8
    assert results["data"]["max_length"] == 512  # the default 1024 capped at the tiny model's positions
    assert set(record["weights_sha256"]) == {"model.safetensors"}
    with open(student / "model.safetensors", "r+b") as f:  # a weight file changed after pretrain wrote it
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    assert "SHA-256 differs" in one_line_error([student, "--data", heldout_file, "--output", tmp_path / "out2"])
