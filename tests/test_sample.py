import json
import math

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refine.config import SampleConfig
from refine.errors import RefineError
from refine.sample import ShardWriter, n_kept, sample, select_top_fraction


def test_n_kept_is_exact_ceiling():
    assert n_kept(10, 0.3) == 3  # 0.3 * 10 = 3.0000000000000004 in floats
    assert n_kept(10, 0.35) == 4
    assert n_kept(7, 1.0) == 7
    assert n_kept(3, 0.01) == 1
    assert n_kept(1000, 0.7) == 700


def test_top_fraction_exact_with_ties_broken_by_id():
    keys = np.array([0.5, 2.0, 1.0, 2.0, 1.0, 1.0, -3.0, 2.0])
    ids = np.array([10, 7, 3, 2, 9, 1, 0, 5])
    # alpha=0.5 keeps 4: the three 2.0s (ids 2, 5, 7), then the 1.0 with the smallest id (id 1 at index 5)
    kept = select_top_fraction(keys, ids, 0.5)
    assert kept.tolist() == [1, 3, 5, 7]
    assert select_top_fraction(keys, ids, 0.375).tolist() == [1, 3, 7]
    assert select_top_fraction(keys, ids, 1.0).tolist() == list(range(8))
    assert select_top_fraction(keys, ids, 0.01).tolist() == [3]  # id 2 wins the tie at the top


def test_top_fraction_string_ids_and_order_independence():
    keys = np.array([1.0, 1.0, 1.0, 0.0])
    ids = np.array(["b", "c", "a", "d"])
    assert select_top_fraction(keys, ids, 0.5).tolist() == [0, 2]  # "a" and "b"
    perm = np.random.default_rng(0).permutation(4)
    kept_ids = set(ids[perm][select_top_fraction(keys[perm], ids[perm], 0.5)])
    assert kept_ids == {"a", "b"}


def test_nan_scores_are_refused():
    with pytest.raises(RefineError, match="NaN"):
        select_top_fraction(np.array([1.0, np.nan]), np.array([0, 1]), 0.5)


def write_scored_corpus(root, teacher_dir, reference_dir, unit, id_column):
    """A 40-document corpus (two of them blank, ids shuffled strings when `id_column`) scored in shards of 7."""
    from refine.config import ScoreConfig
    from refine.score import score

    rng = np.random.default_rng(0)
    ids = [f"doc-{k}" for k in rng.permutation(40)]
    rows = [{"text": "" if i in (3, 17) else f"Document {i}: " + "word " * (3 + i % 11), "domain": f"d{i % 4}",
             "doc": ids[i]} for i in range(40)]
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    score(ScoreConfig(data=str(corpus), teacher=str(teacher_dir), reference=str(reference_dir), output=str(root / "scores"),
                      max_length=16, unit=unit, id_column=id_column, shard_size=7))
    return pd.DataFrame(rows)


@pytest.mark.parametrize("unit, id_column", [("document", None), ("document", "doc"), ("chunk", None)])
def test_refined_rows_equal_an_independent_top_alpha_join(tmp_path, teacher_dir, reference_dir, monkeypatch, unit, id_column):
    import refine.sample as stage

    monkeypatch.setattr(stage, "BATCH_ROWS", 4)  # many batches, so kept rows cross batch and score-file borders
    documents = write_scored_corpus(tmp_path, teacher_dir, reference_dir, unit, id_column)
    alpha = 0.3
    manifest = sample(SampleConfig(scores=str(tmp_path / "scores"), output=str(tmp_path / "out"), alpha=alpha))

    scores = pd.concat([pd.read_parquet(p) for p in sorted((tmp_path / "scores" / "data").glob("*.parquet"))],
                       ignore_index=True)
    top = scores.sort_values(["score", "id"], ascending=[False, True], kind="stable").head(math.ceil(alpha * len(scores)))
    if unit == "chunk":
        expected = top.sort_index()  # score order: shard by shard, chunk by chunk
    else:
        documents["row"] = range(len(documents))
        on = ("doc", "id") if id_column else ("row", "id")
        expected = documents.merge(top[["id", "n_tokens", "teacher_logprob", "ref_logprob", "score"]],
                                   left_on=on[0], right_on=on[1]).sort_values("row").drop(columns="row")
        if id_column:
            expected = expected.drop(columns="id")
    refined = datasets.load_dataset(str(tmp_path / "out"), split="train").to_pandas()
    assert list(refined.columns) == list(expected.columns)
    pd.testing.assert_frame_equal(refined.reset_index(drop=True), expected.reset_index(drop=True), check_dtype=False)
    assert manifest["instances_before"] == len(scores) and manifest["instances_after"] == len(top)
    assert manifest["tokens_after"] == top["n_tokens"].sum() and manifest["threshold"] == top["score"].min()


def test_shard_writer_cuts_shards_by_size_and_names_them_of_n(tmp_path):
    writer = ShardWriter(tmp_path, "train-x", shard_bytes=100)
    for k in range(3):
        writer.write(pa.table({"v": np.arange(k * 20, k * 20 + 20, dtype=np.int64)}))  # 160 bytes: one shard each
    writer.write(pa.table({"v": np.array([], dtype=np.int64)}))
    paths = writer.close()
    assert [p.name for p in paths] == [f"train-x-{k:05d}-of-00003.parquet" for k in range(3)]
    assert pq.read_table(paths[2]).column("v").to_pylist() == list(range(40, 60))
    empty = ShardWriter(tmp_path / "e", "train-y", 100)
    (tmp_path / "e").mkdir()
    empty.write(pa.table({"v": np.array([], dtype=np.int64)}))
    assert [pq.read_table(p).num_rows for p in empty.close()] == [0]


def test_sample_refuses_a_corpus_that_changed_since_scoring(tiny_run, tmp_path):
    import os
    import shutil

    copy = tmp_path / "corpus.jsonl"
    shutil.copy2(tiny_run / "corpus.jsonl", copy)  # same name, size and modification time: the same corpus
    sample(SampleConfig(scores=str(tiny_run / "scores"), data=str(copy), output=str(tmp_path / "a"), alpha=0.5))
    os.utime(copy, ns=(0, 0))
    with pytest.raises(RefineError, match="files fingerprint mismatch.*give the corpus the scores were made from"):
        sample(SampleConfig(scores=str(tiny_run / "scores"), data=str(copy), output=str(tmp_path / "b"), alpha=0.5))


def test_sample_from_another_directory_finds_a_corpus_scored_by_a_relative_path(tmp_path, monkeypatch, teacher_dir,
                                                                                reference_dir):
    from refine.config import ScoreConfig
    from refine.score import score

    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "corpus.jsonl").write_text("".join(f'{{"text": "doc {i} words"}}\n' for i in range(6)))
    monkeypatch.chdir(tmp_path / "project")
    score(ScoreConfig(data="corpus.jsonl", teacher=str(teacher_dir), reference=str(reference_dir), output="scores",
                      max_length=16))
    monkeypatch.chdir(tmp_path)  # the manifest recorded where the corpus is, not how it was typed
    manifest = sample(SampleConfig(scores="project/scores", output="refined", alpha=0.5))
    assert manifest["instances_after"] == 3


def isolated_caches(tmp_path, monkeypatch):
    """Point datasets' cache and Python's temp folder at empty folders, to see what a run leaves on disk."""
    import tempfile

    cache, temp = tmp_path / "hf-cache", tmp_path / "tmp"
    cache.mkdir()
    temp.mkdir()
    monkeypatch.setenv("HF_HOME", str(cache))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache / "datasets"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache / "datasets")  # read from the env only at import
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    return cache, temp


def files_under(folder):
    return sorted(p for p in folder.rglob("*") if p.is_file())


def score_and_sample(data, output, teacher_dir, reference_dir, **score_options):
    from refine.config import ScoreConfig
    from refine.score import score

    manifest = score(ScoreConfig(data=data, teacher=str(teacher_dir), reference=str(reference_dir), max_length=16,
                                 shard_size=3, output=str(output / "scores"), **score_options))
    sample(SampleConfig(scores=str(output / "scores"), output=str(output / "refined"), alpha=0.5))
    shards = sorted((output / "scores" / "data").glob("*.parquet"))
    scores = pa.concat_tables(pq.read_table(p).replace_schema_metadata(None) for p in shards)
    refined = pa.concat_tables(pq.read_table(p) for p in sorted((output / "refined" / "data").glob("*.parquet")))
    return manifest, [p.name.rsplit("-", 2)[1:] for p in shards], scores, refined


@pytest.mark.parametrize("extension, id_column", [("jsonl", None), ("parquet", "doc")])
def test_a_corpus_on_s3_is_scored_and_sampled_as_a_stream_like_its_local_copy(
        tmp_path, monkeypatch, teacher_dir, reference_dir, s3_endpoint, extension, id_column):
    import fsspec

    from conftest import CORPUS
    from test_data import write_parts

    rows = [{"text": text, "doc": f"doc-{k}"} for k, text in enumerate(CORPUS)]
    write_parts(fsspec.filesystem("s3"), "corpora/c", extension, rows)
    write_parts(fsspec.filesystem("file"), str(tmp_path / "local"), extension, rows)
    cache, temp = isolated_caches(tmp_path, monkeypatch)
    # two datatrove tasks in this process: each opens the corpus from the driver's scan record
    remote = score_and_sample(f"s3://corpora/c/*.{extension}", tmp_path / "remote", teacher_dir, reference_dir,
                              id_column=id_column, tasks=2, workers=1)
    assert files_under(cache) == [] and files_under(temp) == []  # nothing of the corpus was copied to disk
    local = score_and_sample(str(tmp_path / "local"), tmp_path / "from-local", teacher_dir, reference_dir,
                             id_column=id_column)
    assert files_under(cache / "datasets")  # the check above can fail: a local folder goes through datasets' cache

    (remote_manifest, remote_shards, remote_scores, remote_refined) = remote
    (local_manifest, local_shards, local_scores, local_refined) = local
    assert remote_shards == local_shards == [["000000000000", "000000000003.parquet"], ["000000000003", "000000000006.parquet"],
                                             ["000000000006", "000000000009.parquet"], ["000000000009", "000000000010.parquet"]]
    pd.testing.assert_frame_equal(remote_scores.to_pandas(), local_scores.to_pandas())
    assert remote_refined.to_pylist() == local_refined.to_pylist() and remote_refined.num_rows == 4
    data = remote_manifest["data"]
    assert data["files"] == [f"s3://corpora/c/part-{k}.{extension}" for k in range(3)]
    assert data["fingerprint"].startswith("remote:") and data["n_rows"] == 10
    assert data["n_blank_skipped"] == local_manifest["data"]["n_blank_skipped"] == 2
    # the same rows from another place are not the corpus that was scored, unless --full-fingerprint said so
    with pytest.raises(RefineError, match="files fingerprint mismatch"):
        sample(SampleConfig(scores=str(tmp_path / "from-local" / "scores"), data=f"s3://corpora/c/*.{extension}",
                            output=str(tmp_path / "mixed"), alpha=0.5))
