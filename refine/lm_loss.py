"""Next-token cross-entropy for training without the batch's full-vocabulary logits in memory.

`transformers` computes logits for every position (B x T x V), upcasts them to fp32 and takes
log-softmax: several B x T x V tensors live at once (Qwen: V = 151,936). Here the LM head, the
log-softmax and its gradient run chunk by chunk over positions inside one autograd function: the
forward pass already computes the gradients w.r.t. the hidden states and the head weight, so the
backward pass only scales them. Same three matmuls as the plain path, peak memory O(chunk x V).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Families whose logits are exactly `final hidden states @ lm_head.weight.T` (no bias, softcap, scale or
# auxiliary router loss), so the head can be applied outside the model. Others use the model's own loss.
PLAIN_HEAD_FAMILIES = frozenset({
    "llama", "qwen2", "qwen3", "mistral", "gpt2", "gpt_neox", "mamba", "mamba2", "phi3", "olmo", "olmo2",
    "starcoder2", "stablelm", "smollm3", "gemma",
})
CHUNK_BYTES = 64 * 2**20  # fp32 logits of one chunk


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum over positions of -log softmax(h @ W.T)[target]; positions with target -100 are skipped."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows: int, compute_dtype: torch.dtype):
        keep = targets != -100
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        w = weight.to(compute_dtype)
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start : start + chunk_rows].to(compute_dtype)
            t = targets[start : start + chunk_rows]
            mask = keep[start : start + chunk_rows]
            logits = (h @ w.T).float()
            log_z = torch.logsumexp(logits, dim=-1)
            safe_t = t.clamp(min=0)
            total += ((log_z - logits.gather(1, safe_t[:, None]).squeeze(1)) * mask).sum()
            # d loss / d logits = softmax - onehot, zero on skipped rows
            grad_logits = torch.exp(logits - log_z[:, None])
            grad_logits[torch.arange(len(t), device=t.device), safe_t] -= 1.0
            grad_logits *= mask[:, None]
            grad_logits = grad_logits.to(compute_dtype)
            grad_hidden[start : start + chunk_rows] = (grad_logits @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (grad_logits.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight if grad_weight is not None else hidden.new_empty(0))
        ctx.weight_dtype, ctx.has_weight_grad = weight.dtype, grad_weight is not None
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_w = (grad_weight * grad_output).to(ctx.weight_dtype) if ctx.has_weight_grad else None
        return grad_hidden * grad_output.to(grad_hidden.dtype), grad_w, None, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             chunk_bytes: int = CHUNK_BYTES, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Summed next-token loss of hidden states (N, H) against targets (N,) through a bias-free head (V, H)."""
    chunk_rows = max(1, chunk_bytes // (4 * weight.shape[0]))
    dtype = compute_dtype or hidden.dtype
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows, dtype)


def has_plain_head(model) -> bool:
    head = model.get_output_embeddings()
    return (
        model.config.model_type in PLAIN_HEAD_FAMILIES
        and isinstance(head, torch.nn.Linear)
        and head.bias is None
        and not getattr(model.config, "final_logit_softcapping", None)
    )


class CausalLMLoss(torch.nn.Module):
    """Wraps a causal LM so that `forward(input_ids)` returns the mean next-token loss.

    DDP/FSDP wrap this module, so the chunked head runs inside their forward and gradients sync as usual.
    `lean=False` (or a family outside PLAIN_HEAD_FAMILIES) uses the model's own `labels=` loss.
    """

    def __init__(self, model, lean: bool = True, chunk_bytes: int = CHUNK_BYTES):
        super().__init__()
        self.model = model
        self.lean = lean and has_plain_head(model)
        self.chunk_bytes = chunk_bytes

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.lean:
            return self.model(input_ids=input_ids, labels=input_ids).loss
        hidden = self.model.base_model(input_ids=input_ids).last_hidden_state  # (B, T, H)
        targets = input_ids[:, 1:].reshape(-1)
        hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        weight = self.model.get_output_embeddings().weight
        compute_dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else None
        total = linear_cross_entropy_sum(hidden, weight, targets, self.chunk_bytes, compute_dtype)
        return total / (targets != -100).sum().clamp(min=1)


def reference_loss(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The straightforward computation the lean loss must equal: full logits, log-softmax, mean NLL."""
    logits = model(input_ids=input_ids).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
