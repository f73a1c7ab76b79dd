import json
import shutil

import datasets
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import CORPUS
from refine.config import ScoreConfig
from refine.errors import RefineError
from refine.score import score
from test_logprobs import straightforward_logprobs


def read_scores(directory):
    return datasets.load_dataset(str(directory), split="train").to_pandas().set_index("id")


def run_score(data, teacher, reference, output, **kwargs):
    cfg = dict(data=str(data), teacher=str(teacher), reference=str(reference), output=str(output), max_length=16,
               max_tokens_per_batch=64)
    return score(ScoreConfig(**{**cfg, **kwargs}))


def test_document_logprobs_equal_independent_sums(tmp_path, teacher_dir, reference_dir, corpus_file):
    manifest = run_score(corpus_file, teacher_dir, reference_dir, tmp_path / "scores")
    table = read_scores(tmp_path / "scores")
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    models = {"teacher_logprob": AutoModelForCausalLM.from_pretrained(teacher_dir),
              "ref_logprob": AutoModelForCausalLM.from_pretrained(reference_dir)}
    blank = [i for i, t in enumerate(CORPUS) if not t.strip()]
    assert sorted(table.index) == [i for i in range(len(CORPUS)) if i not in blank]
    assert manifest["data"]["n_blank_skipped"] == len(blank)
    long_docs = 0
    for doc_id, row in table.iterrows():
        tokens = tokenizer(CORPUS[doc_id], add_special_tokens=False)["input_ids"]
        sequence = [tokenizer.bos_token_id] + tokens
        assert row["n_tokens"] == len(tokens)
        long_docs += len(sequence) > 16
        for column, model in models.items():
            # independent: windows of 16 that share one token of context, full logits of each
            expected = sum(
                straightforward_logprobs(model, sequence[s : s + 16]).double().sum().item()
                for s in range(0, len(sequence) - 1, 15)
            )
            assert row[column] == pytest.approx(expected, abs=1e-3)
            if len(sequence) <= 16:  # one window: must equal the plain whole-document log-prob
                assert row[column] == pytest.approx(straightforward_logprobs(model, sequence).sum().item(), abs=1e-3)
        assert row["score"] == pytest.approx((row["teacher_logprob"] - row["ref_logprob"]) / row["n_tokens"])
    assert long_docs >= 3


def test_chunk_unit_scores_fixed_chunks(tmp_path, teacher_dir, reference_dir, corpus_file):
    manifest = run_score(corpus_file, teacher_dir, reference_dir, tmp_path / "scores", unit="chunk", max_length=32)
    table = datasets.load_dataset(str(tmp_path / "scores"), split="train").to_pandas()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    stream = [t for text in CORPUS if text.strip() for t in tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    assert table["input_ids"].map(len).sum() == len(stream)
    assert all(n == len(ids) - 1 for n, ids in zip(table["n_tokens"], table["input_ids"]))
    assert all(len(ids) == 32 for ids in table["input_ids"][:-1])
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    first = table.iloc[0]
    assert first["teacher_logprob"] == pytest.approx(straightforward_logprobs(teacher, list(first["input_ids"])).sum().item(), abs=1e-3)
    assert manifest["n_instances"] == len(table)


def test_rerun_resumes_and_gives_identical_scores(tmp_path, teacher_dir, reference_dir, corpus_file):
    out = tmp_path / "scores"
    run_score(corpus_file, teacher_dir, reference_dir, out, shard_size=3)
    shards = sorted((out / "data").glob("*.parquet"))
    assert len(shards) == 4
    before = read_scores(out)
    # a crash after two shards: the rest and the manifest are missing
    for path in [*shards[2:], out / "manifest.json", out / "README.md"]:
        path.unlink()
    mtime = shards[0].stat().st_mtime_ns
    run_score(corpus_file, teacher_dir, reference_dir, out, shard_size=3)
    assert shards[0].stat().st_mtime_ns == mtime  # finished shard was not redone
    after = read_scores(out)
    assert after.equals(before)


def test_unfinished_run_with_other_settings_is_refused(tmp_path, teacher_dir, reference_dir, corpus_file):
    out = tmp_path / "scores"
    run_score(corpus_file, teacher_dir, reference_dir, out, shard_size=3)
    (out / "manifest.json").unlink()
    with pytest.raises(RefineError, match="other settings"):
        run_score(corpus_file, teacher_dir, reference_dir, out, shard_size=3, max_length=8)


def test_finished_output_needs_overwrite(tmp_path, teacher_dir, reference_dir, corpus_file):
    out = tmp_path / "scores"
    run_score(corpus_file, teacher_dir, reference_dir, out)
    with pytest.raises(RefineError, match="--overwrite"):
        run_score(corpus_file, teacher_dir, reference_dir, out)
    run_score(corpus_file, teacher_dir, reference_dir, out, overwrite=True, max_length=8)
    assert json.loads((out / "manifest.json").read_text())["settings"]["max_length"] == 8


def test_per_token_score_with_mismatched_tokenizers_is_refused(tmp_path, teacher_dir, corpus_file):
    from transformers import GPT2Config, GPT2LMHeadModel
    from conftest import small_tokenizer

    other = small_tokenizer(vocab_size=350)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(other), n_embd=16, n_layer=1, n_head=2))
    model.save_pretrained(tmp_path / "other")
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(RefineError, match="tokenize differently"):
        run_score(corpus_file, teacher_dir, tmp_path / "other", tmp_path / "scores", normalize="tokens")
    assert not (tmp_path / "scores").exists()


def test_max_length_beyond_model_positions_is_refused(tmp_path, teacher_dir, reference_dir, corpus_file):
    with pytest.raises(RefineError, match="positions"):
        run_score(corpus_file, teacher_dir, reference_dir, tmp_path / "scores", max_length=4096, max_tokens_per_batch=8192)


def test_teacher_as_its_own_reference_is_refused(tmp_path, teacher_dir, corpus_file):
    copy = tmp_path / "copy"
    shutil.copytree(teacher_dir, copy)
    for reference in (teacher_dir, copy):  # the same path, or the same weights elsewhere
        with pytest.raises(RefineError, match="same model"):
            run_score(corpus_file, teacher_dir, reference, tmp_path / "scores")
    assert not (tmp_path / "scores").exists()  # refused before the output was claimed


def test_a_hub_dataset_url_is_scored_as_a_stream_like_its_local_copy(tmp_path, monkeypatch, teacher_dir, reference_dir,
                                                                     hub_endpoint):
    import fsspec

    from test_data import write_parts
    from test_sample import files_under, isolated_caches

    rows = [{"text": text, "doc": f"doc-{k}"} for k, text in enumerate(CORPUS)]
    write_parts(fsspec.filesystem("file"), str(tmp_path / "hub" / "someone" / "corpus" / "main" / "data"), "parquet", rows)
    shutil.copytree(tmp_path / "hub" / "someone" / "corpus" / "main" / "data", tmp_path / "local")
    cache, temp = isolated_caches(tmp_path, monkeypatch)
    remote = run_score("hf://datasets/someone/corpus/data/*.parquet", teacher_dir, reference_dir, tmp_path / "remote",
                       id_column="doc", shard_size=3)
    assert files_under(cache) == [] and files_under(temp) == []
    assert remote["data"]["files"] == [f"hf://datasets/someone/corpus/data/part-{k}.parquet" for k in range(3)]
    assert any(r["range"] for r in hub_endpoint.requests if "/resolve/" in r["path"])  # read in byte ranges
    run_score(tmp_path / "local", teacher_dir, reference_dir, tmp_path / "local-scores", id_column="doc", shard_size=3)
    assert read_scores(tmp_path / "remote").equals(read_scores(tmp_path / "local-scores"))


def test_a_missing_bucket_is_a_one_line_error(tmp_path, teacher_dir, reference_dir, s3_endpoint):
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "refine", "score", "s3://no-such-bucket/corpus/*.jsonl", "--teacher",
                             str(teacher_dir), "--reference", str(reference_dir), "--output", str(tmp_path / "scores")],
                            capture_output=True, text=True, env=os.environ)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("error: could not open corpus 's3://no-such-bucket/corpus/*.jsonl'")
    assert len(result.stderr.strip().splitlines()) == 1 and "check the URL" in result.stderr
