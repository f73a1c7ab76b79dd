"""`refine score` on datatrove's executors: local processes, Slurm (stand-in commands on PATH) and a real local Ray cluster.

Every run must give exactly the scores of one process scoring everything, whatever the executor and task count.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import save_tiny_model
from refine.config import ScoreConfig
from refine.score import score

N_DOCS = 24


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-models")
    return save_tiny_model(root / "teacher", "llama", seed=1), save_tiny_model(root / "reference", "qwen2", seed=2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("engine-corpus") / "corpus.jsonl"
    with open(path, "w") as f:
        for i in range(N_DOCS):
            text = f"Document {i}. " + " ".join(f"word{(i * 5 + j) % 17}" for j in range(10 + 2 * i))
            f.write(json.dumps({"text": text}) + "\n")
    return path


def config(corpus, models, output, **kwargs) -> ScoreConfig:
    teacher, reference = models
    return ScoreConfig(data=str(corpus), teacher=str(teacher), reference=str(reference), output=str(output),
                       max_length=32, shard_size=3, device="cpu", **kwargs)


def scores_table(output: Path):
    """Every shard, in name order (the names and their contents must not depend on the executor)."""
    files = sorted((output / "data").glob("scores-*.parquet"))
    return [f.name for f in files], pq.read_table(files).replace_schema_metadata(None)


def counts(manifest: dict) -> tuple:
    return manifest["n_instances"], manifest["n_tokens"], [(f["path"], f["rows"]) for f in manifest["files"] if "rows" in f]


@pytest.fixture(scope="module")
def one_task(corpus, models, tmp_path_factory):
    output = tmp_path_factory.mktemp("one-task") / "scores"
    manifest = score(config(corpus, models, output))
    return manifest, scores_table(output)


def test_local_executor_two_workers_four_tasks_equals_one_task(corpus, models, tmp_path, one_task):
    output = tmp_path / "scores"
    manifest = score(config(corpus, models, output, tasks=4, workers=2))
    names, table = scores_table(output)
    assert names == one_task[1][0]
    assert table.equals(one_task[1][1])
    assert counts(manifest) == counts(one_task[0])
    assert manifest["world_size"] == 4 and manifest["executor"] == "local"
    completions = tmp_path / ".scores.tasks" / "4-tasks" / "completions"
    assert sorted(p.name for p in completions.iterdir()) == ["00000", "00001", "00002", "00003"]
