"""The MiniPLM experiment script end to end in --quick mode (tiny random teacher instead of SmolLM2)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import datasets
import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "experiment.py"


@pytest.mark.slow
def test_quick_experiment_writes_table_json_and_plot(tmp_path, teacher_dir):
    work = tmp_path / "exp"
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--teacher", str(teacher_dir), "--workdir", str(work)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((work / "results.json").read_text())
    summary = results["summary"]
    for family in ("llama", "gpt2"):
        for arm in ("difference", "random", "teacher_nll", "full"):
            assert summary[f"{family}/{arm}"]["seeds"] == 2
    assert {"llama/difference_a0.3", "llama/difference_a0.7"} <= set(summary)
    tokens = {run["tokens"] for run in results["runs"]}
    assert len(tokens) == 1  # every arm trained on the same number of tokens
    # the kept fractions per source, recomputed independently: top half of the pool by score (ties: smaller id)
    pool = pd.read_json(work / "corpus" / "pool.jsonl", lines=True)
    scores = datasets.load_dataset(str(work / "scores"), split="train").to_pandas()
    top = scores.sort_values(["score", "id"], ascending=[False, True]).head(math.ceil(0.5 * len(scores)))
    kept = pool.loc[top["id"], "source"].value_counts()
    for source, fraction in results["kept_fraction"]["difference"].items():
        if source != "tokens_kept":
            assert fraction == pytest.approx(kept.get(source, 0) / (pool["source"] == source).sum()), source
    table = (work / "results.md").read_text()
    assert "| llama | difference |" in table and "Kept fraction" in table
    assert (work / "results.png").stat().st_size > 10_000
    # cached: a rerun trains nothing and scores nothing again
    rerun = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--teacher", str(teacher_dir), "--workdir", str(work)],
                           capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0 and "s] student " not in rerun.stdout and "scoring the pool" not in rerun.stdout
