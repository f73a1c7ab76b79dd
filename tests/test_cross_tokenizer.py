"""Any teacher with any reference: scores per UTF-8 byte when the two tokenizers differ."""

import json

import datasets
import numpy as np
import pytest
import torch

from conftest import small_tokenizer, tiny_model
from refine.config import ScoreConfig
from refine.errors import RefineError
from refine.score import score

DOCS = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n",
        "Ünïcödé tëxt — with dashes and 東京.", "x", "A longer document about models. " * 8]


@pytest.fixture(scope="module")
def other_reference(tmp_path_factory):
    """A Qwen2 reference with its own, smaller vocabulary and no BOS (EOS starts its documents)."""
    directory = tmp_path_factory.mktemp("other_reference")
    tokenizer = small_tokenizer(300)
    tiny_model("qwen2", tokenizer, seed=3).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def docs_file(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    return path


@torch.no_grad()
def direct_logprob(model_dir, text: str) -> float:
    """Sum of log p(token | BOS + preceding tokens) under the model's own tokenizer, in one full-logits pass."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([[start] + tokenizer(text, add_special_tokens=False)["input_ids"]])
    logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
    return float(logprobs.gather(1, ids[0, 1:, None]).sum()), ids.shape[1] - 1


def test_score_per_byte_equals_an_independent_computation(tmp_path, docs_file, teacher_dir, other_reference):
    out = tmp_path / "scores"
    manifest = score(ScoreConfig(data=str(docs_file), teacher=str(teacher_dir), reference=str(other_reference),
                                 output=str(out), max_length=512))  # one window per document, as the direct pass
    assert manifest["normalize"] == "bytes"
    rows = datasets.load_dataset(str(out), split="train").sort("id")
    for row, text in zip(rows, DOCS):
        teacher_lp, teacher_n = direct_logprob(teacher_dir, text)
        ref_lp, ref_n = direct_logprob(other_reference, text)
        assert row["n_bytes"] == len(text.encode("utf-8"))
        assert (row["n_tokens"], row["ref_n_tokens"]) == (teacher_n, ref_n)
        assert row["teacher_logprob"] == pytest.approx(teacher_lp, abs=1e-3)
        assert row["ref_logprob"] == pytest.approx(ref_lp, abs=1e-3)
        assert row["score"] == pytest.approx((teacher_lp - ref_lp) / row["n_bytes"], abs=1e-4)
    assert manifest["reference_tokenizer"]["vocab_size"] == len(small_tokenizer(300))


def test_per_token_score_is_refused_when_tokenizers_differ(tmp_path, docs_file, teacher_dir, other_reference):
    with pytest.raises(RefineError, match="--normalize bytes"):
        score(ScoreConfig(data=str(docs_file), teacher=str(teacher_dir), reference=str(other_reference),
                          output=str(tmp_path / "s"), normalize="tokens"))
    with pytest.raises(RefineError, match="--unit document"):
        score(ScoreConfig(data=str(docs_file), teacher=str(teacher_dir), reference=str(other_reference),
                          output=str(tmp_path / "s"), unit="chunk"))


def test_with_one_tokenizer_both_normalisations_follow_their_definitions(tmp_path, docs_file, teacher_dir, reference_dir):
    frames = {}
    for normalize in ("tokens", "bytes"):
        out = tmp_path / normalize
        score(ScoreConfig(data=str(docs_file), teacher=str(teacher_dir), reference=str(reference_dir), output=str(out),
                          normalize=normalize, max_length=64))
        frames[normalize] = datasets.load_dataset(str(out), split="train").sort("id").to_pandas()
    by_token, by_byte = frames["tokens"], frames["bytes"]
    difference = by_token["teacher_logprob"] - by_token["ref_logprob"]
    np.testing.assert_allclose(by_byte["teacher_logprob"] - by_byte["ref_logprob"], difference, atol=1e-9)
    np.testing.assert_allclose(by_token["score"], difference / by_token["n_tokens"], atol=1e-12)
    np.testing.assert_allclose(by_byte["score"], difference / by_byte["n_bytes"], atol=1e-12)
    # each ranking is the one its definition gives (and they need not agree with each other)
    assert list(np.argsort(-by_byte["score"].to_numpy(), kind="stable")) == \
        list(np.argsort(-(difference / by_byte["n_bytes"]).to_numpy(), kind="stable"))
