"""The MiniPLM experiment script end to end in --quick mode (tiny random teacher instead of SmolLM2)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "experiment.py"
ARMS = ("difference", "random", "teacher_nll", "temperature", "balanced", "full")


def run_quick(teacher_dir, work) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--quick", "--teacher", str(teacher_dir), "--workdir", str(work)],
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_quick_experiment_writes_table_json_and_plot(tmp_path, teacher_dir):
    work = tmp_path / "exp"
    result = run_quick(teacher_dir, work)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((work / "results.json").read_text())
    summary = results["summary"]
    for arm in ARMS:  # --quick trains Llama students only
        assert summary[f"llama/{arm}"]["seeds"] == 2
    assert len({run["tokens"] for run in results["runs"]}) == 1  # every student trained on the same number of tokens
    eval_sources = set(pd.read_json(work / "corpus" / "eval.jsonl", lines=True)["source"])
    for run in results["runs"]:
        assert run["bits_per_byte"] > 0 and set(run["per_source_bits_per_byte"]) == eval_sources

    # the difference arm, recomputed independently: the shortest prefix of the ranking (score descending, ties by
    # smaller id) holding at least half the pool's teacher tokens
    scores = datasets.load_dataset(str(work / "scores"), split="train").to_pandas()
    ranked = scores.sort_values(["score", "id"], ascending=[False, True])
    budget = math.ceil(0.5 * scores["n_tokens"].sum())
    n_kept = int(np.searchsorted(ranked["n_tokens"].cumsum().to_numpy(), budget) + 1)
    kept = datasets.load_dataset(str(work / "arms" / "difference"), split="train")["id"]
    assert sorted(kept) == sorted(ranked["id"].head(n_kept))
    pool = pd.read_json(work / "corpus" / "pool.jsonl", lines=True)
    tokens_by_source = scores.set_index("id").loc[kept, "n_tokens"].groupby(pool.loc[kept, "source"].to_numpy()).sum()
    for source, share in results["token_share"]["difference"].items():
        if source != "tokens":
            assert share == pytest.approx(tokens_by_source.get(source, 0) / tokens_by_source.sum()), source
    for arm in ("random", "teacher_nll", "temperature", "balanced"):  # every selected arm holds the same budget
        assert results["token_share"][arm]["tokens"] >= budget
    overlap = results["reference_diagnostics"]["overlap_difference_teacher_nll"]
    teacher_kept = datasets.load_dataset(str(work / "arms" / "teacher_nll"), split="train")["id"]
    assert overlap == pytest.approx(len(set(kept) & set(teacher_kept)) / len(kept))

    table = (work / "results.md").read_text()
    assert "| llama | difference |" in table and "Reference diagnostics" in table
    assert (work / "results.png").stat().st_size > 10_000
    # cached: a rerun trains, scores and evaluates nothing again
    rerun = run_quick(teacher_dir, work)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert not any(step in rerun.stdout for step in ("s] student ", "scoring the pool", "evaluating", "selecting"))
