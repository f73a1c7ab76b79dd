import json
import math
from fractions import Fraction

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refine.config import SampleConfig
from refine.errors import RefineError
from refine.sample import (Budget, ShardWriter, apportion, balance_shares, budget_of, gumbel_noise, n_kept, sample, select,
                           select_top_fraction)


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


def pandas_token_prefix(keys, ids, n_tokens, budget):
    """Independent token budget: sort by key (then id), keep rows until the running token sum first reaches it."""
    frame = pd.DataFrame({"key": keys, "id": ids, "n": n_tokens}).sort_values(["key", "id"], ascending=[False, True])
    running = frame["n"].cumsum().to_numpy()
    stop = len(frame) if running[-1] < budget else int((running < budget).sum()) + 1
    return sorted(frame.index[:stop])


def test_token_budget_keeps_the_shortest_prefix_reaching_it():
    rng = np.random.default_rng(1)
    keys, ids, n_tokens = rng.normal(size=50).round(1), rng.permutation(50), rng.integers(1, 40, 50)  # rounding makes ties
    for budget in (1, 17, 200, int(n_tokens.sum()) // 2, int(n_tokens.sum())):
        kept = select(keys, ids, n_tokens, Budget("tokens", budget))
        assert kept.tolist() == pandas_token_prefix(keys, ids, n_tokens, budget)
        assert n_tokens[kept].sum() >= budget


def test_budget_of_each_option_and_its_default():
    n_tokens = np.array([3, 3, 4])  # 10 tokens
    config = lambda **given: SampleConfig(scores="s", output="o", **given)
    assert budget_of(config(), n_tokens) == Budget("instances", 2)  # alpha 0.5 when no budget is given
    assert budget_of(config(alpha=0.3), n_tokens) == Budget("instances", 1)
    assert budget_of(config(tokens=7), n_tokens) == Budget("tokens", 7)
    assert budget_of(config(token_fraction=0.3), n_tokens) == Budget("tokens", 3)  # exact: 0.3 * 10 is not above 3
    with pytest.raises(RefineError, match="--tokens 11 is more than the 10 tokens scored"):
        budget_of(config(tokens=11), n_tokens)


def test_zero_temperature_is_top_k_and_a_tiny_one_agrees():
    rng = np.random.default_rng(2)
    keys, ids, n_tokens = rng.normal(size=40), np.arange(40), np.ones(40, dtype=int)
    top = select(keys, ids, n_tokens, Budget("instances", 10))
    assert top.tolist() == select_top_fraction(keys, ids, 0.25).tolist()
    for seed in range(5):  # keys differ by far more than 1e-9 * any Gumbel draw
        assert select(keys, ids, n_tokens, Budget("instances", 10), temperature=1e-9, seed=seed).tolist() == top.tolist()


def test_a_large_temperature_samples_uniformly():
    keys, ids, n_tokens = np.linspace(-5, 5, 10), np.arange(10), np.ones(10, dtype=int)
    counts = np.zeros(10)
    for seed in range(2000):
        counts[select(keys, ids, n_tokens, Budget("instances", 3), temperature=1e9, seed=seed)] += 1
    frequency = counts / 2000  # each is 0.3 in expectation; the standard error is about 0.01
    assert np.abs(frequency - 0.3).max() < 0.045, frequency


def test_inclusion_frequencies_match_sequential_sampling_without_replacement():
    keys, temperature = np.array([0.0, 0.5, 1.0, 2.0]), 0.7
    weights = np.exp(keys / temperature)
    exact = np.zeros(4)  # P(i is among 2 drawn one after another, each with probability proportional to its weight)
    for first in range(4):
        for second in set(range(4)) - {first}:
            p = weights[first] / weights.sum() * weights[second] / (weights.sum() - weights[first])
            exact[[first, second]] += p
    counts = np.zeros(4)
    for seed in range(4000):
        counts[select(keys, np.array([11, 12, 13, 14]), np.ones(4, dtype=int), Budget("instances", 2), temperature, seed)] += 1
    assert np.abs(counts / 4000 - exact).max() < 0.03, (counts / 4000, exact)  # standard errors about 0.008


def test_gumbel_noise_depends_on_seed_and_id_only():
    ids = np.array(["b", "a", "c", "d"], dtype=object)
    noise = gumbel_noise(ids, 7)
    assert noise[[1, 0, 3, 2]].tolist() == gumbel_noise(ids[[1, 0, 3, 2]], 7).tolist()
    assert noise[:2].tolist() == gumbel_noise(ids[:2], 7).tolist()  # the others' presence changes nothing
    assert not np.allclose(noise, gumbel_noise(ids, 8))
    assert gumbel_noise(np.arange(5), 0)[3] == gumbel_noise(np.array([3]), 0)[0]
    draws = gumbel_noise(np.arange(20000), 1)
    assert abs(draws.mean() - np.euler_gamma) < 0.03 and abs(draws.std() - np.pi / 6**0.5) < 0.03


def test_selection_does_not_depend_on_row_order():
    rng = np.random.default_rng(3)
    keys, ids, n_tokens, groups = rng.normal(size=60), rng.permutation(60) * 7, rng.integers(1, 30, 60), rng.integers(0, 3, 60)
    shares = [Fraction(1, 3)] * 3
    perm = rng.permutation(60)
    for budget in (Budget("instances", 20), Budget("tokens", 400)):
        for temperature in (0.0, 0.5):
            kept = select(keys, ids, n_tokens, budget, temperature, 5, groups, shares)
            shuffled = select(keys[perm], ids[perm], n_tokens[perm], budget, temperature, 5, groups[perm], shares)
            assert sorted(ids[kept]) == sorted(ids[perm][shuffled])


def test_apportion_is_exact_by_largest_remainder_and_redistributes_what_a_group_lacks():
    third, half = Fraction(1, 3), Fraction(1, 2)
    assert apportion(5, [Fraction(5, 10), Fraction(3, 10), Fraction(2, 10)], [5, 3, 2]) == [3, 1, 1]  # 2.5 1.5 1: tie to the first
    assert apportion(6, [third] * 3, [5, 3, 2]) == [2, 2, 2]
    assert apportion(6, [third] * 3, [5, 1, 4]) == [3, 1, 2]  # the second has 1; its other 1 goes 2.5/2.5, tie to the first
    assert apportion(5, [Fraction(7, 10), Fraction(3, 10), Fraction(0)], [9, 9, 9]) == [4, 1, 0]
    assert apportion(9, [half, half, Fraction(0)], [2, 3, 9]) == [2, 3, 0]  # share 0 takes nothing; the total falls short
    assert apportion(10, [third] * 3, [4, 4, 4]) == [4, 3, 3]


@pytest.mark.parametrize("balance, expected", [("proportional", [3, 1, 1]), ("equal", [2, 2, 1]), ("file", [4, 1, 0])])
def test_balanced_selection_keeps_each_groups_best_instances(tmp_path, balance, expected):
    rng = np.random.default_rng(4)
    groups = np.array([0] * 5 + [1] * 3 + [2] * 2)[rng.permutation(10)]
    keys, ids, n_tokens = rng.normal(size=10), np.arange(10), np.ones(10, dtype=int)
    labels, sizes = ["a", "b", "c"], np.bincount(groups)
    if balance == "file":
        (tmp_path / "shares.yaml").write_text("a: 0.7\nb: 0.3\nc: 0\n")
        balance = str(tmp_path / "shares.yaml")
    shares = balance_shares(balance, labels, sizes)
    kept = select(keys, ids, n_tokens, Budget("instances", 5), groups=groups, shares=shares)
    assert np.bincount(groups[kept], minlength=3).tolist() == expected
    frame = pd.DataFrame({"key": keys, "group": groups}).sort_values("key", ascending=False)
    best = [frame.index[frame["group"] == g][:expected[g]].tolist() for g in range(3)]
    assert kept.tolist() == sorted(sum(best, []))


def test_balanced_token_budget_splits_tokens_in_proportion():
    groups, n_tokens = np.array([0, 0, 0, 0, 1, 1]), np.array([10, 10, 10, 10, 30, 30])  # 40 and 60 tokens
    keys = np.array([4.0, 3.0, 2.0, 1.0, 2.0, 1.0])
    shares = balance_shares("proportional", ["a", "b"], np.bincount(groups, weights=n_tokens))
    kept = select(keys, np.arange(6), n_tokens, Budget("tokens", 50), groups=groups, shares=shares)
    assert kept.tolist() == [0, 1, 4]  # quotas 20 and 30 tokens: the two best of a, the best of b


@pytest.mark.parametrize("text, fragment", [
    ("a: [\n", "is not valid YAML"), ("- a\n", "is not a mapping"), ("a: 0.5\nb: 0.5\nz: 0\n", "names group 'z'"),
    ("a: 1\n", "gives no share to group 'b'"), ("a: -0.5\nb: 1.5\n", "gives group 'a' the share -0.5"),
    ("a: 0.5\nb: 0.6\n", "sum to 1.1, not 1"), ("a: x\nb: 1\n", "the share 'x'"),
])
def test_a_bad_balance_file_is_one_error_naming_the_fix(tmp_path, text, fragment):
    (tmp_path / "shares.yaml").write_text(text)
    with pytest.raises(RefineError, match=fragment) as error:
        balance_shares(str(tmp_path / "shares.yaml"), ["a", "b"], np.array([1, 1]))
    assert len(str(error.value).splitlines()) == 1 and ";" in str(error.value)
    with pytest.raises(RefineError, match="cannot read balance file"):
        balance_shares(str(tmp_path / "none.yaml"), ["a", "b"], np.array([1, 1]))


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


@pytest.mark.parametrize("tasks", [1, 3])
@pytest.mark.parametrize("unit, id_column", [("document", None), ("document", "doc"), ("chunk", None)])
def test_refined_rows_equal_an_independent_top_alpha_join(tmp_path, teacher_dir, reference_dir, monkeypatch, unit, id_column,
                                                          tasks):
    import refine.sample as stage

    monkeypatch.setattr(stage, "BATCH_ROWS", 4)  # many batches, so kept rows cross batch and score-file borders
    documents = write_scored_corpus(tmp_path, teacher_dir, reference_dir, unit, id_column)
    alpha = 0.3
    # 3 tasks, run one after another in this process (so they read in batches of 4 too): each writes the kept rows
    # of a third of the rows (13 or 14 of 40), its range starting and ending inside batches and score files
    manifest = sample(SampleConfig(scores=str(tmp_path / "scores"), output=str(tmp_path / "out"), alpha=alpha,
                                   tasks=tasks, workers=1))
    if tasks > 1:
        assert manifest["tasks"] == 3 and manifest["executor"] == "local"
        assert not list((tmp_path / ".out.tasks" / "3-tasks").glob("sample-*"))  # the parts moved into the dataset

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


def test_cli_samples_a_token_budget_balanced_over_groups_with_temperature(tmp_path, teacher_dir, reference_dir):
    from typer.testing import CliRunner

    from refine.cli import app

    documents = write_scored_corpus(tmp_path, teacher_dir, reference_dir, "document", "doc")
    (tmp_path / "shares.yaml").write_text("d0: 0.4\nd1: 0.4\nd2: 0.2\nd3: 0\n")
    result = CliRunner().invoke(app, ["sample", str(tmp_path / "scores"), "--output", str(tmp_path / "out"), "--token-fraction",
                                      "0.4", "--temperature", "0.5", "--seed", "3", "--group-column", "domain",
                                      "--balance", str(tmp_path / "shares.yaml")])
    assert result.exit_code == 0, result.output
    assert "token-fraction=0.4 temperature=0.5 seed=3 balanced" in result.stdout

    scores = pd.concat([pd.read_parquet(p) for p in sorted((tmp_path / "scores" / "data").glob("*.parquet"))], ignore_index=True)
    scores = scores.merge(documents[["doc", "domain"]], left_on="id", right_on="doc")
    scores["key"] = scores["score"] / 0.5 + gumbel_noise(scores["id"].to_numpy(dtype=object), 3)  # tested above
    budget = math.ceil(0.4 * scores["n_tokens"].sum())
    quotas = apportion(budget, [Fraction(2, 5), Fraction(2, 5), Fraction(1, 5), Fraction(0)],
                       scores.groupby("domain")["n_tokens"].sum().tolist())
    expected = set()
    for quota, (_, group) in zip(quotas, scores.groupby("domain")):
        kept = pandas_token_prefix(group["key"].to_numpy(), group["id"].to_numpy(), group["n_tokens"].to_numpy(), quota) if quota else []
        expected |= set(group["id"].to_numpy()[kept])
    refined = datasets.load_dataset(str(tmp_path / "out"), split="train").to_pandas()
    assert set(refined["doc"]) == expected
    assert "d3" not in set(refined["domain"])

    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (manifest["token_budget"], manifest["token_fraction"], manifest["temperature"], manifest["seed"]) == (budget, 0.4, 0.5, 3)
    assert manifest["group_column"] == "domain" and manifest["threshold"] is None and manifest["alpha"] is None
    assert {g: v["tokens_after"] for g, v in manifest["groups"].items()} == refined.groupby("domain")["n_tokens"].sum().reindex(
        ["d0", "d1", "d2", "d3"], fill_value=0).to_dict()
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"at least {budget:,} tokens (40% of the corpus's tokens)" in card and "Gumbel top-k, seed 3" in card
    assert "within each group of `domain`, by the shares of `shares.yaml`" in card and "| `d2` | 20.0% |" in card


def test_proportional_alpha_keeps_the_same_fraction_of_every_group(tiny_run, tmp_path):
    manifest = sample(SampleConfig(scores=str(tiny_run / "scores"), output=str(tmp_path / "out"), alpha=0.3,
                                   group_column="domain"))
    scores = pd.concat([pd.read_parquet(p) for p in sorted((tiny_run / "scores" / "data").glob("*.parquet"))], ignore_index=True)
    scores["domain"] = pd.read_json(tiny_run / "corpus.jsonl", lines=True)["domain"].to_numpy()[scores["id"]]
    top = scores.sort_values(["score", "id"], ascending=[False, True]).groupby("domain").head(3)  # 0.3 of each 10
    refined = datasets.load_dataset(str(tmp_path / "out"), split="train").to_pandas()
    assert sorted(refined["id"]) == sorted(top["id"])
    assert manifest["balance"] == "proportional" and manifest["instances_after"] == 9
    assert [g["instances_after"] for g in manifest["groups"].values()] == [3, 3, 3]


@pytest.mark.parametrize("flags, fragment", [
    (["--alpha", "0.5", "--tokens", "10"], "both --alpha and --tokens given; choose one budget"),
    (["--tokens", "10", "--token-fraction", "0.5"], "both --tokens and --token-fraction given; choose one budget"),
    (["--balance", "equal"], "--balance needs --group-column"),
    (["--group-column", "domain", "--balance", "shares.txt"], "is not proportional, equal or a .yaml file"),
    (["--group-column", "nope"], "corpus has no column 'nope'; pass --group-column with one of: text, domain"),
    (["--group-column", "domain", "--balance", "missing.yaml"], "cannot read balance file 'missing.yaml'"),
    (["--temperature", "-1"], "--temperature -1.0 must be at least 0"),
    (["--tokens", "100000"], "--tokens 100000 is more than the"),
])
def test_bad_selection_options_are_one_line_errors(tiny_run, tmp_path, flags, fragment):
    from typer.testing import CliRunner

    from refine.cli import app

    result = CliRunner().invoke(app, ["sample", str(tiny_run / "scores"), "--output", str(tmp_path / "out"), *flags])
    assert result.exit_code == 2 and fragment in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


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


def score_and_sample(data, output, teacher_dir, reference_dir, sample_tasks=1, **score_options):
    from refine.config import ScoreConfig
    from refine.score import score

    manifest = score(ScoreConfig(data=data, teacher=str(teacher_dir), reference=str(reference_dir), max_length=16,
                                 shard_size=3, output=str(output / "scores"), **score_options))
    sample(SampleConfig(scores=str(output / "scores"), output=str(output / "refined"), alpha=0.5, tasks=sample_tasks,
                        workers=1))
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
    # two datatrove tasks in this process, for score and for sample: each opens the corpus from the driver's scan record
    remote = score_and_sample(f"s3://corpora/c/*.{extension}", tmp_path / "remote", teacher_dir, reference_dir,
                              sample_tasks=2, id_column=id_column, tasks=2, workers=1)
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


@pytest.mark.parametrize("extension, id_column", [("jsonl", None), ("parquet", "doc")])
def test_groups_and_report_examples_of_a_streamed_corpus_match_its_local_copy(
        tmp_path, teacher_dir, reference_dir, s3_endpoint, extension, id_column):
    import fsspec

    from conftest import CORPUS
    from refine.config import ReportConfig, ScoreConfig
    from refine.report import scored_frame
    from refine.score import score
    from test_data import write_parts

    rows = [{"text": text, "doc": f"doc-{k}", "domain": "ab"[k % 3 == 0]} for k, text in enumerate(CORPUS)]
    write_parts(fsspec.filesystem("s3"), "corpora/g", extension, rows)
    write_parts(fsspec.filesystem("file"), str(tmp_path / "local-corpus"), extension, rows)
    found = {}
    for where, data in (("remote", f"s3://corpora/g/*.{extension}"), ("local", str(tmp_path / "local-corpus"))):
        scores = str(tmp_path / where / "scores")
        score(ScoreConfig(data=data, teacher=str(teacher_dir), reference=str(reference_dir), max_length=16,
                          id_column=id_column, output=scores))
        manifest = sample(SampleConfig(scores=scores, output=str(tmp_path / where / "refined"), group_column="domain"))
        frame, _, read_texts = scored_frame(ReportConfig(scores=scores, group_column="domain"))
        found[where] = manifest["groups"], frame["group"].tolist(), read_texts(np.arange(len(frame)))
    assert found["remote"] == found["local"]
    assert found["local"][2] == [r["text"] for r in rows if r["text"].strip()]  # blank documents were not scored
    assert set(found["local"][0]) == {"a", "b"}


def test_kept_instances_missing_from_the_corpus_stop_sample_before_any_output(tmp_path, teacher_dir, reference_dir):
    import fsspec

    from conftest import CORPUS
    from refine.config import ScoreConfig
    from refine.score import score
    from test_data import write_parts

    fs, folder = fsspec.filesystem("memory"), f"/{tmp_path.name}/ids"
    rows = [{"text": text, "doc": f"doc-{k}"} for k, text in enumerate(CORPUS)]
    write_parts(fs, folder, "jsonl", rows)
    score(ScoreConfig(data=f"memory://{folder}/*.jsonl", teacher=str(teacher_dir), reference=str(reference_dir),
                      max_length=16, id_column="doc", output=str(tmp_path / "scores")))
    # the same bytes but other ids: memory:// gives files no version tag, so the fingerprint cannot tell
    write_parts(fs, folder, "jsonl", [{**r, "doc": r["doc"].replace("doc-", "dox-")} for r in rows])
    for tasks in (1, 2):  # in tasks, the parts of the wrong corpus are discarded, so a rerun cannot adopt them
        with pytest.raises(RefineError, match=r"the corpus holds 0 of the \d+ kept instances"):
            sample(SampleConfig(scores=str(tmp_path / "scores"), output=str(tmp_path / "refined"), alpha=1, tasks=tasks,
                                workers=1))
        assert not (tmp_path / "refined").exists() and not list(tmp_path.glob(".refined.tasks/*/sample-*"))
    write_parts(fs, folder, "jsonl", rows)  # the corpus that was scored, back
    manifest = sample(SampleConfig(scores=str(tmp_path / "scores"), output=str(tmp_path / "refined"), alpha=1, tasks=2,
                                   workers=1))
    assert manifest["instances_after"] == len(datasets.load_dataset(str(tmp_path / "refined"), split="train")) > 0


@pytest.mark.parametrize("tasks", [1, 2])
def test_a_column_null_in_the_first_batches_of_a_streamed_corpus_is_one_type_in_the_dataset(
        tmp_path, teacher_dir, reference_dir, monkeypatch, tasks):
    import fsspec

    import refine.sample as stage
    from refine.config import ScoreConfig
    from refine.score import score

    # The corpus's schema comes from its first 100 rows, where `url` is always null; batches of 16 rows read it as
    # null, then as strings.
    monkeypatch.setattr(stage, "BATCH_ROWS", 16)
    rows = [{"text": f"Document {i}: " + "word " * (1 + i % 3), "url": None if i < 110 else f"https://example.org/{i}"}
            for i in range(130)]
    folder = f"/{tmp_path.name}/nulls"
    with fsspec.filesystem("memory").open(f"{folder}/c.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    score(ScoreConfig(data=f"memory://{folder}/c.jsonl", teacher=str(teacher_dir), reference=str(reference_dir),
                      max_length=16, output=str(tmp_path / "scores")))
    sample(SampleConfig(scores=str(tmp_path / "scores"), output=str(tmp_path / "refined"), alpha=1, tasks=tasks,
                        workers=1, shard_size_mb=1))
    refined = datasets.load_dataset(str(tmp_path / "refined"), split="train")
    assert refined.features["url"].dtype == "string" and refined["url"] == [r["url"] for r in rows]


def test_a_split_sample_removes_work_folders_of_earlier_runs_into_the_same_output_only(tiny_run, tmp_path):
    """Left by runs killed before their dataset was in place, or made with other settings: refine's own, by their plan."""
    output = tmp_path / "refined"
    tasks_root = tmp_path / ".refined.tasks"
    earlier = {"sample-same-output": str(output.absolute()), "sample-other-output": str(tmp_path / "other"),
               "sample-without-plan": None}
    for name, plan_output in earlier.items():
        folder = tasks_root / "3-tasks" / name
        folder.mkdir(parents=True)
        if plan_output:
            (folder / "plan.json").write_text(json.dumps({"stage": "sample", "output": plan_output}))
        (folder / "part-00000-00000-of-00001.parquet").write_bytes(b"parts of an earlier run")
    sample(SampleConfig(scores=str(tiny_run / "scores"), output=str(output), alpha=0.5, tasks=2, workers=1))
    left = sorted(p.name for p in tasks_root.glob("*-tasks/sample-*"))
    assert left == ["sample-other-output", "sample-without-plan"]  # this output's earlier one is gone, this run's too
    assert datasets.load_dataset(str(output), split="train").num_rows == 15
