import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from refine import diagnostics
from refine.cli import app
from refine.output import parquet_files, verify

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_spearman_averages_tied_ranks_as_by_hand():
    x = np.array([1.0, 2.0, 2.0, 3.0, 5.0])
    y = np.array([2.0, 1.0, 4.0, 4.0, 6.0])
    x_ranks, y_ranks = [1, 2.5, 2.5, 4, 5], [2, 1, 3.5, 3.5, 5]  # ties share the mean of the ranks they span
    by_hand = np.corrcoef(x_ranks, y_ranks)[0, 1]
    assert diagnostics.spearman(x, y) == pytest.approx(by_hand, abs=1e-12)
    assert diagnostics.spearman(x, -y) == pytest.approx(-by_hand, abs=1e-12)
    assert diagnostics.spearman(x, np.full(5, 3.0)) is None  # a constant side has no ranking
    assert diagnostics.spearman(x[:1], y[:1]) is None


def test_overlap_and_top_positions_match_set_computations():
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 20, size=200).astype(float)  # many ties
    top = diagnostics.top_positions(keys, 70)
    by_hand = sorted(range(200), key=lambda i: (-keys[i], i))[:70]  # largest first, ties by position
    assert top.tolist() == by_hand
    a, b = rng.choice(200, 70, replace=False), rng.choice(200, 70, replace=False)
    assert diagnostics.overlap(a, b, 200) == pytest.approx(len(set(a) & set(b)) / len(a))


def score_columns(teacher_nll, ref_nll, n_tokens, ref_n_tokens=None) -> pa.Table:
    """Score columns as `refine score` writes them, built from per-token NLLs."""
    ref_n_tokens = n_tokens if ref_n_tokens is None else ref_n_tokens
    teacher_lp, ref_lp = -teacher_nll * n_tokens, -ref_nll * ref_n_tokens
    columns = {"n_tokens": n_tokens, "teacher_logprob": teacher_lp, "ref_logprob": ref_lp,
               "score": (teacher_lp - ref_lp) / n_tokens, "ref_n_tokens": ref_n_tokens}
    return pa.table({k: pa.array(v) for k, v in columns.items()})


def test_a_near_uniform_reference_triggers_the_warning_and_an_informative_one_does_not():
    rng = np.random.default_rng(1)
    n = 2000
    n_tokens = rng.integers(20, 400, size=n)
    teacher_nll = rng.normal(3.0, 0.6, size=n)
    weak = diagnostics.table_diagnostics(score_columns(teacher_nll, rng.normal(9.4, 0.01, size=n), n_tokens), 0.5,
                                         vocab_size=49152)
    assert weak["ref_nll_std"] < 0.02 and weak["uniform_nll"] == pytest.approx(math.log(49152))
    assert weak["spearman_score_teacher"] > 0.95 and weak["overlap_with_teacher"] > 0.9
    line = diagnostics.weak_reference_warning(weak, 0.9)
    assert line.startswith("warning: ") and "\n" not in line and "--normalize bytes" in line.split("; ")[-1]

    # An informative reference: its own tokenization (another token count) and an NLL that differs text by text.
    ref_n_tokens = n_tokens * 2
    informative = diagnostics.table_diagnostics(
        score_columns(teacher_nll, teacher_nll * 0.8 + rng.normal(0, 0.6, size=n), n_tokens, ref_n_tokens), 0.5)
    assert informative["overlap_with_teacher"] < 0.9
    assert diagnostics.weak_reference_warning(informative, 0.9) is None
    assert diagnostics.weak_reference_warning(weak, 1.0) is None  # 1 never warns
    assert "Spearman" in diagnostics.summary_line(informative)


def test_figures_equal_independent_computations_and_skip_rows_without_log_probs():
    rng = np.random.default_rng(2)
    n = 101
    teacher_nll, ref_nll = rng.normal(3, 1, size=n), rng.normal(4, 1, size=n)
    score = ref_nll - teacher_nll
    groups = rng.integers(0, 3, size=n)
    teacher_nll[[5, 50]] = np.nan  # a proxy's predicted rows: no log-probs
    kept = np.flatnonzero(score > np.quantile(score, 0.7))
    d = diagnostics.reference_diagnostics(teacher_nll, ref_nll, score, 0.3, kept=kept, groups=(groups, ["a", "b", "c"]))
    exact = [i for i in range(n) if i not in (5, 50)]
    selected = [i for i in kept if i in exact]
    by_teacher = sorted(exact, key=lambda i: teacher_nll[i])[: len(selected)]
    assert d["n_instances"] == 99
    only_predicted = diagnostics.reference_diagnostics(teacher_nll, ref_nll, score, 0.3, kept=np.array([5, 50]))
    assert only_predicted["overlap_with_teacher"] is None and "nothing to diagnose" in diagnostics.summary_line(only_predicted)
    assert diagnostics.weak_reference_warning(only_predicted, 0.0) is None
    assert d["overlap_with_teacher"] == pytest.approx(len(set(selected) & set(by_teacher)) / len(selected))
    assert d["random_overlap"] == pytest.approx(len(selected) / 99)
    assert d["ref_nll_mean"] == pytest.approx(np.mean(ref_nll[exact])) and d["ref_nll_std"] == pytest.approx(np.std(ref_nll[exact]))
    for code, label in enumerate("abc"):
        members = [ref_nll[i] for i in exact if groups[i] == code]
        assert d["ref_nll_by_group"][label] == pytest.approx({"n": len(members), "mean": np.mean(members), "std": np.std(members)})


def test_unigram_cross_entropy_equals_a_hand_computation():
    train, held_out, vocab = np.array([0, 0, 1, 2, 0, 1], dtype=np.uint16), np.array([0, 3, 1]), 5
    # Add-one: p(t) = (count + 1) / (6 + 5); counts 0:3, 1:2, 2:1, 3:0, 4:0.
    by_hand = -(math.log(4 / 11) + math.log(1 / 11) + math.log(3 / 11)) / 3
    assert diagnostics.unigram_cross_entropy([train], held_out, vocab) == pytest.approx(by_hand, abs=1e-12)
    assert diagnostics.unigram_cross_entropy([train[:4], train[4:]], held_out, vocab) == pytest.approx(by_hand, abs=1e-12)


def independent_overlap(scores_dir, kept_ids=None, alpha=0.5) -> float:
    """The overlap recomputed from the score shards with Python sorting and sets."""
    manifest = verify(scores_dir, "score")
    rows = pq.read_table(parquet_files(scores_dir, manifest)).to_pylist()
    k = len(kept_ids) if kept_ids is not None else math.ceil(alpha * len(rows))
    by_score = kept_ids if kept_ids is not None else [r["id"] for r in sorted(rows, key=lambda r: (-r["score"], r["id"]))[:k]]
    by_teacher = [r["id"] for r in sorted(rows, key=lambda r: (-r["teacher_logprob"] / r["n_tokens"], r["id"]))[:k]]
    return len(set(by_score) & set(by_teacher)) / k


def test_score_records_the_diagnostics_in_a_manifest_that_verifies(tiny_run):
    manifest = verify(tiny_run / "scores", "score")  # the checksum covers the new key
    d = manifest["reference_diagnostics"]
    assert d["n_instances"] == 30 and d["alpha"] == 0.5
    assert d["overlap_with_teacher"] == pytest.approx(independent_overlap(tiny_run / "scores"))
    assert d["uniform_nll"] == pytest.approx(math.log(manifest["tokenizer"]["vocab_size"]))


def test_score_cli_prints_the_summary_and_warns_past_the_threshold(tmp_path, teacher_dir, reference_dir, corpus_file):
    base = ["score", corpus_file, "--teacher", teacher_dir, "--reference", reference_dir, "--max-length", 16]
    result = invoke(*base, "--output", tmp_path / "s", "--weak-reference-overlap", 0)
    assert result.exit_code == 0, result.output
    assert "reference: NLL" in result.stdout and "Spearman" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "reference adds almost nothing" in warnings[0]
    quiet = invoke(*base, "--output", tmp_path / "t", "--weak-reference-overlap", 1)
    assert quiet.exit_code == 0 and "warning:" not in quiet.stderr


def test_sample_reports_the_diagnostics_of_its_own_selection(tiny_run, tmp_path):
    out = tmp_path / "refined"
    result = invoke("sample", tiny_run / "scores", "--output", out, "--alpha", 0.3, "--weak-reference-overlap", 0)
    assert result.exit_code == 0, result.output
    assert "reference: NLL" in result.stdout and "the selection (30% of instances) shares" in result.stdout
    assert sum(line.startswith("warning:") for line in result.stderr.splitlines()) == 1
    manifest = verify(out, "sample")
    kept_ids = pq.read_table(parquet_files(out, manifest), columns=["id"]).column("id").to_pylist()
    d = manifest["reference_diagnostics"]
    assert d["alpha"] == 0.3 and d["random_overlap"] == pytest.approx(9 / 30)
    assert d["overlap_with_teacher"] == pytest.approx(independent_overlap(tiny_run / "scores", kept_ids))


def test_report_shows_the_diagnostics_with_the_reference_nll_per_group(tiny_run, tmp_path):
    output = tmp_path / "report.html"
    result = invoke("report", tiny_run / "scores", "--group-column", "domain", "--output", output,
                    "--weak-reference-overlap", 0)
    assert result.exit_code == 0, result.output
    assert "reference: NLL" in result.stdout and result.stderr.count("warning:") == 1
    page = output.read_text()
    assert '<section id="reference">' in page and "reference check" in page
    section = page.split('<section id="reference">')[1].split("</section>")[0]
    assert "reference adds almost nothing" in section
    assert all(f"<td>{group}</td><td>10</td>" in section for group in ("d0", "d1", "d2"))


def test_pretrain_records_and_prints_the_unigram_baseline(tmp_path):
    from conftest import TINY, small_tokenizer
    from refine import packed
    from refine.config import PretrainConfig

    tokenizer = small_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tok")
    (tmp_path / "llama.json").write_text(json.dumps({"model_type": "llama", **TINY["llama"]}))
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"Doc {i}: " + "word " * (20 + i)}) + "\n" for i in range(20)))
    out = tmp_path / "out"
    result = invoke("pretrain", data, "--model-config", tmp_path / "llama.json", "--tokenizer", tmp_path / "tok",
                    "--output", out, "--seq-len", 32, "--micro-batch-size", 2, "--max-steps", 2, "--eval-every", 2,
                    "--warmup-steps", 0, "--eval-fraction", 0.2)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["unigram_eval_loss"] == manifest["unigram_eval_loss"]
    assert f"unigram baseline {manifest['unigram_eval_loss']:.4f}" in result.stdout

    # Independently: counts over the training token file, add-one smoothing, the held-out tokens the loss predicts.
    meta = json.loads((Path(manifest["token_file"]) / "meta.json").read_text())
    train = np.fromfile(Path(manifest["token_file"]) / "tokens.bin", dtype=meta["dtype"]).tolist()
    cfg = PretrainConfig(data=str(data), model_config="x", tokenizer="x", output="x", eval_fraction=0.2, max_steps=1)
    held_out = packed.eval_sequences(packed.load_splits(cfg).held_out, "text", tokenizer, 32, cfg.max_eval_sequences)
    counts, vocab = Counter(train), len(tokenizer)
    targets = [int(t) for sequence in held_out for t in sequence[1:]]
    by_hand = -sum(math.log((counts[t] + 1) / (len(train) + vocab)) for t in targets) / len(targets)
    assert manifest["unigram_eval_loss"] == pytest.approx(by_hand, rel=1e-9)
