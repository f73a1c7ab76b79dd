"""Scoring that survives SIGKILL and spreads over processes (torchrun, gloo on CPU)."""

import json
import os
import signal
import subprocess
import sys
import time

import datasets
import pytest

from conftest import save_tiny_model

N_DOCS = 40


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    teacher = save_tiny_model(root / "teacher", "llama", seed=1)
    reference = save_tiny_model(root / "reference", "qwen2", seed=2)
    return teacher, reference


@pytest.fixture(scope="module")
def long_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    with open(path, "w") as f:
        for i in range(N_DOCS):
            text = f"Document {i}. " + " ".join(f"token{(i * 7 + j) % 23}" for j in range(20 + 3 * i))
            f.write(json.dumps({"text": text, "doc": f"d{i:03d}"}) + "\n")
    return path


def score_command(corpus, teacher, reference, output, *extra):
    return [sys.executable, "-m", "refine", "score", str(corpus), "--teacher", str(teacher), "--reference",
            str(reference), "--output", str(output), "--max-length", "32", "--shard-size", "1", "--id-column", "doc", *extra]


def read(output):
    return datasets.load_dataset(str(output), split="train").to_pandas().sort_values("id").reset_index(drop=True)


@pytest.fixture(scope="module")
def uninterrupted(models, long_corpus, tmp_path_factory):
    output = tmp_path_factory.mktemp("straight") / "scores"
    subprocess.run(score_command(long_corpus, *models, output), check=True, capture_output=True)
    return read(output)


@pytest.mark.slow
@pytest.mark.parametrize("kill_after_shards", [1, 10, 30])
def test_sigkill_then_rerun_equals_uninterrupted(tmp_path, models, long_corpus, uninterrupted, kill_after_shards):
    output = tmp_path / "scores"
    command = score_command(long_corpus, *models, output)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    data = output / "data"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if data.is_dir() and len(list(data.glob("scores-*.parquet"))) >= kill_after_shards:
            break
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (output / "manifest.json").exists()
    finished = len(list(data.glob("scores-*.parquet")))
    assert kill_after_shards <= finished < N_DOCS

    subprocess.run(command, check=True, capture_output=True)
    resumed = read(output)
    assert resumed.equals(uninterrupted)  # nothing lost, nothing duplicated, same values
    assert not list(data.glob(".*.tmp"))
    assert len(list(data.glob("scores-*.parquet"))) == N_DOCS


@pytest.mark.slow
def test_two_gloo_processes_stream_an_s3_corpus_like_one_local_run(tmp_path, models, long_corpus, uninterrupted,
                                                                   s3_endpoint):
    import fsspec

    fsspec.filesystem("s3").put(str(long_corpus), "corpora/long/corpus.jsonl")
    output = tmp_path / "scores"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(score_command("s3://corpora/long/*.jsonl", *models, output, "--nproc", "2", "--device", "cpu"),
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["data"]["fingerprint"].startswith("remote:")
    two = read(output)
    assert two[["id", "n_tokens"]].equals(uninterrupted[["id", "n_tokens"]])
    for column in ("teacher_logprob", "ref_logprob", "score"):
        assert (two[column] - uninterrupted[column]).abs().max() < 1e-6


@pytest.mark.slow
def test_two_gloo_processes_equal_one(tmp_path, models, long_corpus, uninterrupted):
    output = tmp_path / "scores"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(score_command(long_corpus, *models, output, "--nproc", "2", "--device", "cpu"),
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    two = read(output)
    assert two[["id", "n_tokens"]].equals(uninterrupted[["id", "n_tokens"]])
    for column in ("teacher_logprob", "ref_logprob", "score"):
        assert (two[column] - uninterrupted[column]).abs().max() < 1e-6
