"""The memory-mapped token file: what pretrain and distill-cache read."""

import json

import datasets
import numpy as np

from refine.config import PretrainConfig, SampleConfig, ScoreConfig
from refine.packed import TokenFile, join_with_eos, pack, split_documents
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
