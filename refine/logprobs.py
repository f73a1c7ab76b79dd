"""Per-token log-probabilities of causal LMs, without full-vocabulary logits for a whole batch.

The model's body gives final hidden states (B, T, D); the LM head is applied to a few hundred
selected positions at a time, each chunk reduced to log p(target) = logit[target] - logsumexp(logits)
before the next is computed. Peak extra memory is one (chunk, V) fp32 block, whatever the batch.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
from tqdm.auto import tqdm

from refine.errors import RefineError
from refine.lm_loss import chunk_rows

# Size of one (chunk tokens x vocabulary) fp32 logits block: ~500 tokens of a 49k vocabulary, which
# measured faster on CPU than 128 or 1024 tokens per chunk (cache-sized blocks).
LOGITS_CHUNK_BYTES = 96 * 2**20


def _body_accepts_attention_mask(body) -> bool:
    return "attention_mask" in inspect.signature(body.forward).parameters


@torch.inference_mode()
def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """log p(input_ids[:, t+1] | input_ids[:, :t+1]) for every position, as (B, T-1) fp32.

    Positions whose target is padding (attention_mask 0) are 0. Sequences must be right-padded.
    """
    head = model.get_output_embeddings()
    body = model.base_model
    if head is None or body is model:
        # No separable LM head: fall back to the model's own (full) logits.
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
        lp = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        return lp * attention_mask[:, 1:]
    kwargs = {"attention_mask": attention_mask} if _body_accepts_attention_mask(body) else {}
    hidden = body(input_ids=input_ids, **kwargs)[0]  # (B, T, D)
    targets = input_ids[:, 1:]
    valid = attention_mask[:, 1:].bool()
    selected = hidden[:, :-1][valid]  # (N, D): only real (non-padding) predictions
    selected_targets = targets[valid]
    out = torch.zeros(targets.shape, dtype=torch.float32, device=input_ids.device)
    out[valid] = _head_logprobs(model, head, selected, selected_targets)
    return out


def _fused_kernel():
    """Apple's cut-cross-entropy (`pip install -e '.[cuda]'`), used on CUDA when installed."""
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError:
        return None
    return linear_cross_entropy


def _head_logprobs(model, head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    softcap = getattr(model.config, "final_logit_softcapping", None)
    fused = _fused_kernel() if hidden.is_cuda and hidden.shape[0] > 0 else None
    if fused is not None:
        # Never forms the (N, V) logits at all: loss = logsumexp - target logit, computed blockwise on chip.
        extra = {"bias": head.bias} if head.bias is not None else {}
        loss = fused(hidden, head.weight, targets, softcap=softcap, reduction="none", **extra)
        return -loss.float()
    chunk = chunk_rows(hidden.device, head.weight.shape[0], LOGITS_CHUNK_BYTES)
    pieces = []
    for start in range(0, hidden.shape[0], chunk):
        logits = head(hidden[start : start + chunk]).float()  # (chunk, V)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        target_logits = logits.gather(-1, targets[start : start + chunk, None]).squeeze(-1)
        pieces.append(target_logits - torch.logsumexp(logits, dim=-1))
    if not pieces:
        return torch.zeros(0, dtype=torch.float32, device=hidden.device)
    return torch.cat(pieces)


def document_windows(token_ids: list[int], start_id: int, max_length: int) -> list[list[int]]:
    """Cut [start] + document into windows of at most `max_length` that predict each token exactly once."""
    sequence = [start_id] + list(token_ids)
    step = max_length - 1
    return [sequence[s : s + max_length] for s in range(0, len(sequence) - 1, step)]


def pad_batch(sequences: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into (input_ids, attention_mask) of shape (B, longest)."""
    longest = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    return input_ids, attention_mask


def length_batches(lengths: list[int], max_tokens_per_batch: int) -> list[list[int]]:
    """Group sequence indices into batches of similar length whose padded size fits the token budget.

    Longest first, so the first batch shows the peak memory at once.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # Sorted descending, so the batch's padded length is its first member's length.
        padded = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1) * padded > max_tokens_per_batch:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def windows_of(documents: list[list[int]], start_id: int, max_length: int) -> tuple[list[list[int]], list[int]]:
    """Every document's `document_windows`, one list, with the index of the document each window belongs to."""
    windows, owner = [], []
    for doc, tokens in enumerate(documents):
        for window in document_windows(tokens, start_id, max_length):
            windows.append(window)
            owner.append(doc)
    return windows, owner


def sum_by_document(values, owner: list[int], n_docs: int) -> np.ndarray:
    """Per document, the sum of its windows' `values` (`owner` from `windows_of`)."""
    total = np.zeros(n_docs)
    np.add.at(total, owner, values)
    return total


class TokenBudget:
    """Tokens per batch (sequences x padded length). `None` picks one. On CPU 1024 (or one window):
    small batches keep activations in cache, and 1024 scored 433 tokens/s against 299 for 8192 with the
    SmolLM2-135M teacher on 2 cores. On CUDA start at 2**18 and halve whenever a batch runs out of
    memory (that batch is then redone smaller)."""

    def __init__(self, tokens: int | None, max_length: int, device: torch.device):
        self.adaptive = tokens is None and device.type == "cuda"
        self.tokens = tokens or (2**18 if device.type == "cuda" else 1024)
        self.tokens = max(self.tokens, max_length)
        self.max_length = max_length

    def shrink(self) -> None:
        if not self.adaptive or self.tokens // 2 < self.max_length:
            raise RefineError(
                f"out of GPU memory with a batch of {self.tokens} tokens; lower --max-tokens-per-batch or --max-length"
            )
        self.tokens //= 2
        tqdm.write(f"out of GPU memory: token budget per batch halved to {self.tokens}")


def score_sequences(models_, sequences: list[list[int]], budget: TokenBudget, device, progress=None) -> list[np.ndarray]:
    """Per model, the log-prob sum of each sequence; all models read the same padded batches."""
    totals = [np.zeros(len(sequences), dtype=np.float64) for _ in models_]
    remaining = list(range(len(sequences)))
    while remaining:
        done = []
        try:
            for batch in length_batches([len(sequences[i]) for i in remaining], budget.tokens):
                members = [remaining[j] for j in batch]
                input_ids, attention_mask = pad_batch([sequences[i] for i in members])
                input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
                for model, total in zip(models_, totals):
                    total[members] = token_logprobs(model, input_ids, attention_mask).double().sum(1).cpu().numpy()
                done.extend(members)
                if progress is not None:
                    progress.update(sum(len(sequences[i]) - 1 for i in members))
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            budget.shrink()
        finished = set(done)
        remaining = [i for i in remaining if i not in finished]
    return totals
