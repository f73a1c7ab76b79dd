import json

import datasets
import pandas as pd
import pytest

from refine.data import check_columns, corpus_fingerprint, document_ids, load_corpus
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


def test_fingerprint_follows_content_not_path(tmp_path):
    write_all_formats(tmp_path)
    a = corpus_fingerprint(load_corpus(str(tmp_path / "c.parquet")), "text", None)
    b = corpus_fingerprint(load_corpus(str(tmp_path / "jsonl")), "text", None)
    assert a == b
    changed = datasets.Dataset.from_list([*ROWS[:2], {"text": "delta epsilon!", "n": 3}])
    assert corpus_fingerprint(changed, "text", None) != a


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
