"""The memory-mapped token file: what pretrain and distill-cache read."""

import json

import datasets
import numpy as np
import pytest

from refine.config import PretrainConfig, SampleConfig, ScoreConfig
from refine.data import load_corpus
from refine.models import load_tokenizer
from refine.packed import (PART_ROWS, TOKENS, PackJob, TokenFile, build, join_with_eos, pack, part_values,
                           split_documents, tokenize_part)
from refine.pretrain import pretrain
from refine.sample import sample
from refine.score import score


def test_join_with_eos_and_pack_against_a_plain_loop():
    docs = [[1, 2, 3], [4], [5, 6]]
    expected = []
    for doc in docs:
        expected += doc + [0]
    assert join_with_eos(docs, 0).tolist() == expected
    sequences = pack(docs, 0, 3, keep_remainder=True)
    assert [s.tolist() for s in sequences] == [expected[0:3], expected[3:6], expected[6:9]]


def test_split_documents_is_seeded_and_disjoint():
    train, held = split_documents(50, 0.1, seed=3)
    assert len(held) == 5 and not set(train) & set(held) and len(train) + len(held) == 50
    assert np.array_equal(split_documents(50, 0.1, seed=3)[1], held)


def test_chunk_unit_trains_on_the_scored_tokens(tmp_path, teacher_dir, reference_dir):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Text {i} " + "tok " * (i % 9 + 2)}) + "\n" for i in range(60)))
    score(ScoreConfig(data=str(corpus), teacher=str(teacher_dir), reference=str(reference_dir),
                      output=str(tmp_path / "scores"), unit="chunk", max_length=24))
    sample(SampleConfig(scores=str(tmp_path / "scores"), output=str(tmp_path / "refined"), alpha=0.5))
    manifest = pretrain(PretrainConfig(data=str(tmp_path / "refined"), model_config="tiny-llama",
                                       tokenizer=str(teacher_dir), output=str(tmp_path / "student"), seq_len=16,
                                       micro_batch_size=2, max_steps=1, eval_fraction=0.1,
                                       token_cache=str(tmp_path / "tokens")))
    refined = datasets.load_dataset(str(tmp_path / "refined"), split="train")
    train_rows, _ = split_documents(len(refined), 0.1, seed=0)
    scored = [t for row in train_rows for t in refined[int(row)]["input_ids"]]
    tokens = TokenFile.open(tmp_path / "tokens" / manifest["token_file"].rsplit("/", 1)[-1])
    assert tokens.tokens.tolist() == scored  # no re-tokenisation, no EOS added per chunk


def corpus_with_blanks(tmp_path, n_docs: int = 61):
    texts = [("  " if i % 10 == 3 else f"Doc {i}: " + "word " * (i % 13 + 1)) for i in range(n_docs)]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return load_corpus(str(path)), texts


def plain_stream(texts, rows, tokenizer) -> list[int]:
    """Independent: each selected non-blank text tokenised alone, EOS after it, one after another."""
    stream = []
    for row in rows:
        if texts[row].strip():
            stream += tokenizer(texts[row], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return stream


@pytest.mark.parametrize("rows", [None, "held-out split"])
def test_two_workers_write_the_token_file_of_one(tmp_path, teacher_dir, rows):
    ds, texts = corpus_with_blanks(tmp_path)
    tokenizer = load_tokenizer(str(teacher_dir))
    rows = None if rows is None else split_documents(len(ds), 0.2, seed=1)[0]
    meta = {"source": "test"}
    built = {}
    for workers, part_rows in [(1, PART_ROWS), (1, 7), (2, 7), (2, 1)]:
        directory = tmp_path / f"tokens-{workers}-{part_rows}"
        tokens = build(directory, ds, rows, "text", tokenizer, meta, workers=workers, part_rows=part_rows)
        built[workers, part_rows] = (directory / TOKENS).read_bytes()
        assert not (directory / "parts").exists() and tokens.meta["n_documents"] == sum(
            1 for r in (range(len(ds)) if rows is None else rows) if texts[r].strip())
    assert len(set(built.values())) == 1
    want = plain_stream(texts, range(len(ds)) if rows is None else rows, tokenizer)
    assert np.frombuffer(built[1, PART_ROWS], dtype=np.uint16).tolist() == want


def test_a_killed_build_resumes_from_its_finished_parts(tmp_path, teacher_dir):
    ds, texts = corpus_with_blanks(tmp_path)
    tokenizer = load_tokenizer(str(teacher_dir))
    reference = build(tmp_path / "whole", ds, None, "text", tokenizer, {}, workers=1, part_rows=10)
    # What a builder killed mid-way leaves: two finished parts, a part's tokens without its counts (killed between the
    # two writes) and a temp file of a part being written.
    directory = tmp_path / "killed"
    job = PackJob(directory / "parts", tokenizer, np.dtype(np.uint16), False)
    job.parts_dir.mkdir(parents=True)
    values = dict(part_values(ds, None, "text", 10))
    tokenize_part(job, 0, values[0])
    tokenize_part(job, 4, values[4])
    (job.parts_dir / "part-0000002.bin").write_bytes(b"\x01\x00" * 5)
    (job.parts_dir / ".part-0000003.bin.abc123.tmp").write_bytes(b"\x07" * 9)
    # Part 4 was finished by the killed run; were it tokenised again, this stand-in for it would be overwritten.
    (job.parts_dir / "part-0000004.bin").write_bytes(np.asarray([5, 5, 5], dtype=np.uint16).tobytes())
    (job.parts_dir / "part-0000004.json").write_text(json.dumps({"n_tokens": 3, "n_documents": 1}))
    resumed = build(directory, ds, None, "text", tokenizer, {}, workers=2, part_rows=10)
    assert not (directory / "parts").exists()
    stream = reference.tokens.tolist()
    first_of_part4 = len(plain_stream(texts, range(40), tokenizer))
    part4 = len(plain_stream(texts, range(40, 50), tokenizer))
    assert resumed.tokens.tolist() == stream[:first_of_part4] + [5, 5, 5] + stream[first_of_part4 + part4:]
    # a finished directory is reused as it is, whoever asks
    assert build(directory, ds, None, "text", tokenizer, {}, workers=2).tokens.tolist() == resumed.tokens.tolist()



def test_token_file_chunks_read_the_whole_file_in_order(tmp_path):
    from refine.packed import META, TOKENS, TokenFile

    tokens = np.arange(10, dtype=np.uint16)
    tokens.tofile(tmp_path / TOKENS)
    (tmp_path / META).write_text(json.dumps({"dtype": "uint16", "n_tokens": 10}))
    chunks = list(TokenFile.open(tmp_path).chunks(chunk_tokens=4))
    assert [len(c) for c in chunks] == [4, 4, 2]
    assert np.array_equal(np.concatenate(chunks), tokens)
