import gzip
import json
import os
import re
import shutil

import datasets
import pandas as pd
import pytest

from refine.data import (check_columns, corpus_files, corpus_fingerprint, count_blank, document_ids, fingerprint_kind,
                         load_corpus)
from refine.output import folder_pattern_problem
from refine.errors import RefineError

ROWS = [{"text": "alpha beta", "n": 1}, {"text": "gamma", "n": 2}, {"text": "delta epsilon", "n": 3}]


def write_all_formats(root):
    frame = pd.DataFrame(ROWS)
    (root / "jsonl").mkdir()
    frame.to_json(root / "jsonl" / "a.jsonl", orient="records", lines=True)
    (root / "c.json").write_text(json.dumps(ROWS))
    frame.to_parquet(root / "c.parquet")
    frame.to_csv(root / "c.csv", index=False)
    (root / "c.txt").write_text("\n".join(r["text"] for r in ROWS) + "\n")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(root / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(root / "saved_dict"))


@pytest.mark.parametrize("name", ["jsonl/a.jsonl", "jsonl", "c.json", "c.parquet", "c.csv", "c.txt", "saved", "saved_dict", "jsonl/*.jsonl", "c.t?t"])
def test_every_local_form_loads(tmp_path, name):
    write_all_formats(tmp_path)
    ds = load_corpus(str(tmp_path / name))
    assert ds["text"] == [r["text"] for r in ROWS]


def test_full_fingerprint_follows_content_not_path(tmp_path):
    write_all_formats(tmp_path)
    a = corpus_fingerprint(load_corpus(str(tmp_path / "c.parquet")), "text", None, full=True)
    b = corpus_fingerprint(load_corpus(str(tmp_path / "jsonl")), "text", None, full=True)
    assert a == b and a.startswith("content:")
    changed = datasets.Dataset.from_list([*ROWS[:2], {"text": "delta epsilon!", "n": 3}])
    assert corpus_fingerprint(changed, "text", None, full=True) != a


def test_default_fingerprint_reads_file_facts_not_rows(tmp_path):
    write_all_formats(tmp_path)
    source = str(tmp_path / "jsonl")
    fingerprint = lambda: corpus_fingerprint(load_corpus(source), "text", None, corpus_files(source))
    first = fingerprint()
    assert first.startswith("files:") and fingerprint_kind(first) == "files" and first == fingerprint()
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "jsonl", moved, copy_function=shutil.copy2)  # names, sizes and times kept
    assert corpus_fingerprint(load_corpus(str(moved)), "text", None, corpus_files(str(moved))) == first
    os.utime(tmp_path / "jsonl" / "a.jsonl", ns=(0, 0))  # touched: treated as changed, without reading it
    assert fingerprint() != first
    saved = load_corpus(str(tmp_path / "saved"))
    assert corpus_fingerprint(saved, "text", None).startswith("info:")  # no file list given
    assert fingerprint_kind("ab12" * 16) == "content"  # what refine recorded before fingerprints had kinds


def test_column_problems_are_reported_together(tmp_path):
    ds = datasets.Dataset.from_list(ROWS)
    with pytest.raises(RefineError) as error:
        check_columns(ds, "content", "doc_id", "x")
    assert len(error.value.problems) == 2 and "--text-column" in str(error.value) and "--id-column" in str(error.value)
    with pytest.raises(RefineError, match="not strings"):
        check_columns(ds, "n", None, "x")
    with pytest.raises(RefineError, match="empty"):
        check_columns(ds.select([]), "text", None, "x")


def test_ids_default_to_row_index_and_must_be_unique():
    ds = datasets.Dataset.from_list([{"text": "a", "k": "x"}, {"text": "b", "k": "y"}, {"text": "c", "k": "x"}])
    assert document_ids(ds, None) == [0, 1, 2]
    with pytest.raises(RefineError, match=r"holds 'x' twice, at rows 0 and 2; pass --id-column naming a column of unique"):
        document_ids(ds, "k")
    assert document_ids(ds.select([1, 2]), "k") == ["y", "x"]  # a view's own rows, not the underlying table's
    assert document_ids(datasets.Dataset.from_list([{"k": 7}, {"k": 3}]), "k") == [7, 3]


@pytest.mark.parametrize("values, message", [
    (["a", None, "c"], "is null at row 1"),
    ([None, None], "is null at row 0"),
    ([1.0, float("nan")], r"holds double values, not strings or integers \(row 0"),
    ([[1], [2]], "holds list<item: int64> values"),
    ([{"a": 1}, {"a": 2}], "holds struct<a: int64> values"),
    ([True, False], "holds bool values"),
])
def test_ids_that_are_not_strings_or_integers_are_refused_with_the_row(values, message):
    ds = datasets.Dataset.from_list([{"text": "t", "k": v} for v in values])
    with pytest.raises(RefineError, match=message + ".*omit it to use the row index"):
        document_ids(ds, "k")


def test_ids_of_mixed_json_types_name_the_row(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"text": "a", "k": 1}\n{"text": "b", "k": "x"}\n')
    with pytest.raises(RefineError, match=r"mixes int and str ids \(row 1: 'x'\)"):
        document_ids(load_corpus(str(path)), "k")
    path.write_text('{"text": "a", "k": "x"}\n{"text": "b", "k": [2]}\n')
    with pytest.raises(RefineError, match=r"holds \[2\] at row 1, not a string or an integer"):
        document_ids(load_corpus(str(path)), "k")


@pytest.mark.parametrize("name, content", [
    ("bad.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9 \xff"}\n'),
    ("bad.txt", b"fine\ncaf\xe9 \xff\n"),
])
def test_undecodable_bytes_give_a_clear_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(RefineError, match="UTF-8"):
        check_columns(load_corpus(str(path)), "text", None, str(path))


def test_missing_path_and_unknown_extension(tmp_path):
    with pytest.raises(RefineError, match="does not exist"):
        load_corpus(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.docx").write_text("hi")
    with pytest.raises(RefineError, match="cannot read"):
        load_corpus(str(tmp_path / "x.docx"))


def write_jsonl(path, texts):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_an_existing_path_is_literal_and_a_glob_only_when_nothing_has_that_name(tmp_path):
    bracketed = write_jsonl(tmp_path / "gl" / "my[1].jsonl", ["bracket"])
    write_jsonl(tmp_path / "gl" / "my1.jsonl", ["one"])  # what 'my[1].jsonl' matches as a glob
    assert load_corpus(str(bracketed))["text"] == ["bracket"]
    assert corpus_files(str(bracketed)) == [str(bracketed.resolve())]
    assert load_corpus(str(tmp_path / "gl" / "my*.jsonl"))["text"] == ["one", "bracket"]
    assert corpus_files(str(tmp_path / "gl" / "my*.jsonl")) == sorted(str(p.resolve()) for p in (tmp_path / "gl").iterdir())


ODD = "my [1] ü"


def test_files_and_folders_with_brackets_spaces_and_non_ascii_names(tmp_path):
    folder = tmp_path / ODD
    file = write_jsonl(folder / f"{ODD}.jsonl", ["a", "b"])
    write_jsonl(tmp_path / "my 1 ü" / "my 1 ü.jsonl", ["decoy"])  # what the bracketed names match as globs
    assert load_corpus(str(file))["text"] == ["a", "b"]
    assert load_corpus(str(folder))["text"] == ["a", "b"]
    assert corpus_files(str(folder)) == [str(file.resolve())]
    saved = tmp_path / f"saved {ODD}"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(saved))
    assert load_corpus(str(saved))["text"] == [r["text"] for r in ROWS]
    assert all(f.startswith(str(saved.resolve())) and f.endswith(".arrow") for f in corpus_files(str(saved)))


def write_refine_output(folder):
    """A folder laid out the way refine writes its outputs: Parquet shards, a card that names them, a manifest."""
    (folder / "data").mkdir(parents=True)
    pd.DataFrame(ROWS).to_parquet(folder / "data" / "train-00000-of-00001.parquet")
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*.parquet\n---\n# out\n"
    )
    (folder / "manifest.json").write_text(json.dumps({"n": 3}))
    return folder


def test_a_refine_output_folder_with_an_odd_name_loads(tmp_path):
    folder = write_refine_output(tmp_path / f"out {ODD}")
    assert load_corpus(str(folder))["text"] == [r["text"] for r in ROWS]
    assert corpus_files(str(folder)) == [str((folder / "data" / "train-00000-of-00001.parquet").resolve())]
    with pytest.raises(RefineError, match="has no split 'test'; choose one of train with --split"):
        load_corpus(str(folder), split="test")
    spaced = write_refine_output(tmp_path / "out run ü")
    assert datasets.load_dataset(str(spaced), split="train")["text"] == [r["text"] for r in ROWS]


@pytest.mark.xfail(strict=True, raises=datasets.exceptions.DataFilesNotFoundError,
                   reason="datasets joins the card's patterns to the folder path unescaped: '[1]' matches only '1'")
def test_datasets_cannot_open_a_folder_whose_path_holds_brackets(tmp_path):
    folder = write_refine_output(tmp_path / f"out {ODD}")
    datasets.load_dataset(str(folder), split="train")


def test_local_files_of_folders_globs_and_hub_names(tmp_path):
    assert corpus_files("someone/some-dataset") is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(RefineError, match="holds no data files; put .jsonl"):
        load_corpus(str(tmp_path / "empty"))
    with pytest.raises(RefineError, match="matches no file"):
        corpus_files(str(tmp_path / "*.jsonl"))
    chained = write_jsonl(tmp_path / "a::b.jsonl", ["x"])
    with pytest.raises(RefineError, match="holds '::'; rename it"):
        load_corpus(str(chained))


def test_a_folder_of_many_files_names_the_malformed_one(tmp_path):
    write_jsonl(tmp_path / "corpus" / "a.jsonl", ["fine"])
    bad = tmp_path / "corpus" / "b.jsonl"
    bad.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "thr\n{"text": "four"}\n')
    with pytest.raises(RefineError) as error:
        load_corpus(str(tmp_path / "corpus"))
    assert str(error.value).startswith(f"corpus file {str(bad.resolve())!r} line 3 is not valid JSON (")
    assert str(error.value).endswith("; fix or remove that line") and "\n" not in str(error.value)


GOOD_JSONL = "".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(200))


@pytest.mark.parametrize("name, content, message", [
    ("x.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": "c"} junk\n', r"line 3 is not valid JSON \(Extra data at column 15\); fix or remove that line"),
    ("o.jsonl", '{"text": "a"}\n5\n', r"line 2 is not a JSON object; make each line one object"),
    ("d.json", '[{"text": "a"},\n {"text": }]\n', r"line 2 is not valid JSON \(Expecting value at column 11\); fix that line"),
    ("p.parquet", "not parquet at all", r"is not a valid parquet file \(Parquet magic bytes not found.*; write it again as parquet"),
    ("z.arrow", "not arrow", r"is not a valid arrow file \(.*\); write it again as arrow"),
    ("r.csv", "text,n\na,1\nb,2,3\nc,4\n", r"line 3 has 3 fields but its header has 2; fix that row"),
    ("t.jsonl.gz", gzip.compress(GOOD_JSONL.encode())[:300], r"is truncated or corrupt \(.*\); download or compress it again"),
])
def test_a_malformed_file_is_named_with_its_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(RefineError) as error:
        load_corpus(str(path))
    assert str(error.value).startswith(f"corpus file {str(path.resolve())!r} ")
    assert re.search(message, str(error.value)) and "\n" not in str(error.value)


@pytest.mark.parametrize("name, misread", [(f"out {ODD}", True), ("out*", True), ("out?", True), ("a::b", True),
                                           ("out run ü", False), ("out-1_2.x", False)])
def test_folders_that_datasets_would_read_as_a_pattern_are_named(tmp_path, name, misread):
    problem = folder_pattern_problem(tmp_path / name)
    assert (problem is not None) == misread
    if misread:
        assert "choose an output folder whose full path has none of them" in problem


def test_a_star_in_a_folder_name_makes_datasets_read_its_siblings_too(tmp_path):
    """Why folder_pattern_problem refuses '*': plain datasets reads the wrong data, refine's reader does not."""
    star = write_refine_output(tmp_path / "out*")
    sibling = write_refine_output(tmp_path / "outX")
    pd.DataFrame([{"text": "sibling", "n": 0}]).to_parquet(sibling / "data" / "train-00000-of-00001.parquet")
    assert "sibling" in datasets.load_dataset(str(star), split="train")["text"]
    assert "sibling" not in load_corpus(str(star))["text"]


def test_blank_count_reads_a_selected_view_s_own_rows():
    ds = datasets.Dataset.from_list([{"text": "a"}, {"text": "  "}, {"text": None}, {"text": "b"}])
    assert count_blank(ds, "text") == 2
    assert count_blank(ds.select([0, 3]), "text") == 0


def test_a_folder_s_split_is_read_from_its_own_files(tmp_path):
    write_jsonl(tmp_path / "splits" / "train.jsonl", ["t1", "t2"])
    held_out = write_jsonl(tmp_path / "splits" / "test.jsonl", ["h1"])
    assert load_corpus(str(tmp_path / "splits"), split="test")["text"] == ["h1"]
    assert corpus_files(str(tmp_path / "splits"), split="test") == [str(held_out.resolve())]
    with pytest.raises(RefineError, match="has no split 'validation'; choose one of train, test with --split"):
        load_corpus(str(tmp_path / "splits"), split="validation")


def test_a_folder_card_with_several_configs_needs_a_name(tmp_path):
    folder = tmp_path / "configs"
    write_jsonl(folder / "a" / "x.jsonl", ["from a"])
    chosen = write_jsonl(folder / "b" / "x.jsonl", ["from b"])
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: a\n  data_files: a/*.jsonl\n"
                                      "- config_name: b\n  data_files: b/*.jsonl\n---\n")
    with pytest.raises(RefineError, match="has configs a, b; choose one with --name"):
        load_corpus(str(folder))
    assert load_corpus(str(folder), name="b")["text"] == ["from b"]
    assert corpus_files(str(folder), name="b") == [str(chosen.resolve())]


# ---- remote corpora, streamed -----------------------------------------------------------------------------------

STREAM_ROWS = [{"text": t, "doc": f"d{k}", "n": k} for k, t in enumerate(
    ["alpha beta", "", "gamma", "  ", "delta epsilon", "zeta", "eta theta iota", "kappa", "lambda mu", "nu"])]


def write_parts(fs, folder: str, extension: str, rows=STREAM_ROWS, sizes=(4, 3, 3)) -> None:
    """`rows` as consecutive files part-0, part-1, ... of `sizes` rows each, in one format, through fsspec."""
    fs.makedirs(folder, exist_ok=True)
    frame, first = pd.DataFrame(rows), 0
    for k, size in enumerate(sizes):
        part = frame.iloc[first:first + size]
        first += size
        with fs.open(f"{folder}/part-{k}.{extension}", "wb") as f:
            if extension == "jsonl":
                f.write(part.to_json(orient="records", lines=True).encode())
            elif extension == "parquet":
                part.to_parquet(f, index=False, row_group_size=2)  # small row groups: reads skip whole ones
            else:
                f.write(part.to_csv(index=False).encode())


@pytest.mark.parametrize("extension", ["jsonl", "parquet", "csv"])
def test_a_streamed_corpus_reads_the_rows_of_its_local_copy(tmp_path, extension):
    import fsspec

    from refine.data import StreamedCorpus, iter_arrow_batches, iter_column_batches, open_corpus, read_rows

    remote = f"memory://{tmp_path.name}/{extension}"
    write_parts(fsspec.filesystem("memory"), remote, extension)
    write_parts(fsspec.filesystem("file"), str(tmp_path / "local"), extension)
    local = load_corpus(str(tmp_path / "local"))
    streamed = open_corpus(f"{remote}/*.{extension}")
    assert isinstance(streamed, StreamedCorpus) and streamed.column_names == local.column_names
    check_columns(streamed, "text", "doc", remote)  # the one pass: rows, blanks, ids
    assert len(streamed) == len(local) == 10 and streamed.rows_per_file == [4, 3, 3]
    assert count_blank(streamed, "text") == count_blank(local, "text")
    assert document_ids(streamed, "doc") == document_ids(local, "doc")
    every = local.to_list()
    for first, last in [(0, 10), (0, 3), (3, 8), (5, 6), (7, 10), (4, 4)]:
        assert read_rows(streamed, first, last, ["text", "doc"]).to_pylist() == [
            {"text": r["text"], "doc": r["doc"]} for r in every[first:last]], (first, last)
    assert [r for b in iter_arrow_batches(streamed, 3) for r in b.to_pylist()] == every
    assert corpus_fingerprint(streamed, "text", "doc", full=True) == corpus_fingerprint(local, "text", "doc", full=True)
    # as `refine sample` reopens it: not scanned, so without a row count; the content hash and a column pass need none
    fresh = open_corpus(f"{remote}/*.{extension}")
    assert corpus_fingerprint(fresh, "text", "doc", full=True) == corpus_fingerprint(local, "text", "doc", full=True)
    assert [r for b in iter_column_batches(fresh, ["doc"], 3) for r in b.to_pylist()] == [{"doc": r["doc"]} for r in every]


def test_a_task_opens_a_streamed_corpus_from_the_driver_s_scan_without_reading_it(tmp_path, monkeypatch):
    import fsspec

    import refine.data
    from refine.data import open_corpus, read_rows

    monkeypatch.setattr(refine.data, "SCAN_BATCH_ROWS", 2)  # a checkpoint every 2 rows
    fs, remote = fsspec.filesystem("memory"), f"memory://{tmp_path.name}"
    write_parts(fs, remote, "jsonl", sizes=(7, 3))
    driver = open_corpus(remote)  # a folder: every data file in it
    check_columns(driver, "text", "doc", remote)
    record = json.loads(json.dumps(driver.scan_record()))  # what travels to the tasks
    part_0 = fs.cat(f"{remote}/part-0.jsonl")
    assert [row for row, _ in record["checkpoints"][0]] == [0, 2, 4, 6]
    assert [json.loads(part_0[offset:].split(b"\n")[0])["n"] for _, offset in record["checkpoints"][0]] == [0, 2, 4, 6]
    task = open_corpus(remote, scan=record)
    check_columns(task, "text", "doc", remote)  # schema only: the counts came with the record
    assert task.ids is None and document_ids(task, "doc") is None and count_blank(task, "text") == 2
    for first, last in [(2, 9), (5, 6), (6, 10), (0, 1)]:
        assert read_rows(task, first, last, ["doc"]).column("doc").to_pylist() == [f"d{k}" for k in range(first, last)]


def test_the_remote_fingerprint_follows_file_versions_and_reads_no_rows(tmp_path):
    import fsspec

    from refine.data import open_corpus

    fs, remote = fsspec.filesystem("memory"), f"memory://{tmp_path.name}"
    write_parts(fs, remote, "jsonl")
    first = corpus_fingerprint(open_corpus(remote), "text", None)
    assert fingerprint_kind(first) == "remote" and first == corpus_fingerprint(open_corpus(remote), "text", None)
    with fs.open(f"{remote}/part-2.jsonl", "wb") as f:  # same rows count, other text and size
        f.write(b'{"text": "changed", "doc": "d7", "n": 7}\n')
    assert corpus_fingerprint(open_corpus(remote), "text", None) != first


def test_remote_sources_that_cannot_be_read_are_one_line_errors(tmp_path, s3_endpoint, hub_endpoint):
    import fsspec

    from refine.data import open_corpus

    with pytest.raises(RefineError, match=r"could not open corpus 's3://no-such-bucket/.*check the URL, that the bucket"):
        open_corpus("s3://no-such-bucket/c/*.jsonl")
    with pytest.raises(RefineError, match=r"could not open corpus .*no bucket, repo or folder 'corpora/empty'"):
        open_corpus("s3://corpora/empty/*.jsonl")
    with fsspec.open("s3://corpora/notes/readme.md", "w") as f:
        f.write("not data")
    with pytest.raises(RefineError, match=r"matches no data files"):
        open_corpus("s3://corpora/notes/*.jsonl")
    with pytest.raises(RefineError, match=r"could not open corpus 'hf://datasets/someone/missing.*repo exists"):
        open_corpus("hf://datasets/someone/missing/data/*.parquet")
    with fsspec.open(f"memory://{tmp_path.name}/a.txt", "w") as f:
        f.write("text lines\n")
    with pytest.raises(RefineError, match=r"read as a stream of json, parquet, csv files, not text"):
        open_corpus(f"memory://{tmp_path.name}/a.txt")
    with fsspec.open(f"memory://{tmp_path.name}/bad/a.jsonl", "w") as f:
        f.write('{"text": "fine"}\n{"text": \n')
    with pytest.raises(RefineError, match=r"could not read corpus file .*a.jsonl' as json"):
        check_columns(open_corpus(f"memory://{tmp_path.name}/bad/a.jsonl"), "text", None, "x")
    with pytest.raises(RefineError, match="cannot read the remote corpus"):
        load_corpus("s3://corpora/c/*.jsonl")  # stages that do not stream refuse a URL rather than copy it
    with pytest.raises(RefineError, match="cannot read the remote corpus"):
        corpus_files("s3://corpora/c/*.jsonl")


def test_s3_files_are_fingerprinted_by_their_etags_and_compressed_jsonl_streams(tmp_path, s3_endpoint):
    import gzip

    import boto3
    import fsspec

    from refine.data import open_corpus

    with fsspec.open("s3://corpora/gz/a.jsonl.gz", "wb") as f:
        f.write(gzip.compress(b'{"text": "one"}\n{"text": "two"}\n'))
    streamed = open_corpus("s3://corpora/gz/*.jsonl.gz")
    check_columns(streamed, "text", None, "s3://corpora/gz")
    assert [r["text"] for b in streamed.iter_batches() for r in b.to_pylist()] == ["one", "two"]
    etag = boto3.client("s3", endpoint_url=s3_endpoint).head_object(Bucket="corpora", Key="gz/a.jsonl.gz")["ETag"]
    assert streamed.file_facts == [{"path": "corpora/gz/a.jsonl.gz", "bytes": streamed.fs.size("corpora/gz/a.jsonl.gz"),
                                    "version": etag}]
    assert streamed.scan_record()["checkpoints"] == [None]  # a compressed file is read from its start
