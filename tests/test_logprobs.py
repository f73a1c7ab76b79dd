import pytest
import torch

from conftest import small_tokenizer, tiny_model
from refine.logprobs import document_windows, length_batches, pad_batch, token_logprobs
from refine.score import corpus_chunks


def straightforward_logprobs(model, ids: list[int]) -> torch.Tensor:
    """The obvious computation: full logits of one unpadded sequence, log_softmax, gather."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2", "mamba"])
def test_token_logprobs_match_full_logits_with_padding(model_type):
    tokenizer = small_tokenizer()
    model = tiny_model(model_type, tokenizer, seed=3)
    g = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, len(tokenizer), (n,), generator=g).tolist() for n in (37, 5, 2, 64, 18)]
    input_ids, attention_mask = pad_batch(sequences, pad_id=7)
    fast = token_logprobs(model, input_ids, attention_mask)
    for row, seq in enumerate(sequences):
        expected = straightforward_logprobs(model, seq)
        torch.testing.assert_close(fast[row, : len(seq) - 1], expected, atol=1e-4, rtol=0)
        assert torch.all(fast[row, len(seq) - 1 :] == 0)


def test_chunked_head_matches_when_vocabulary_is_split(monkeypatch):
    import refine.logprobs

    tokenizer = small_tokenizer()
    model = tiny_model("llama", tokenizer)
    ids = torch.randint(0, len(tokenizer), (3, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    whole = token_logprobs(model, ids, mask)
    monkeypatch.setattr(refine.logprobs, "LOGITS_CHUNK_BYTES", 4 * len(tokenizer) * 7)  # 7 tokens per chunk
    torch.testing.assert_close(token_logprobs(model, ids, mask), whole, atol=1e-5, rtol=0)


def test_document_windows_predict_every_token_exactly_once():
    tokens = list(range(100, 123))  # 23 document tokens
    windows = document_windows(tokens, start_id=1, max_length=8)
    assert all(2 <= len(w) <= 8 for w in windows)
    predicted = [t for w in windows for t in w[1:]]
    assert predicted == tokens
    assert windows[0][0] == 1
    assert document_windows([5], start_id=1, max_length=8) == [[1, 5]]


def test_corpus_chunks_join_with_eos_and_keep_the_tail():
    chunks = corpus_chunks([[1, 2, 3], [4, 5]], eos_id=0, max_length=4)
    assert chunks == [[1, 2, 3, 0], [4, 5, 0]]
    assert corpus_chunks([[1, 2, 3]], eos_id=0, max_length=4) == [[1, 2, 3, 0]]
    assert corpus_chunks([[1, 2, 3, 4]], eos_id=0, max_length=4) == [[1, 2, 3, 4]]  # lone EOS tail predicts nothing


def test_length_batches_cover_all_and_respect_budget():
    lengths = [5, 40, 3, 40, 17, 8, 8, 33, 2]
    batches = length_batches(lengths, max_tokens_per_batch=80)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) * max(lengths[i] for i in batch) <= 80
    # longest first, similar lengths together
    assert lengths[batches[0][0]] == 40
