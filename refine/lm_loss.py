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
# fp32 logits of one chunk: small on CPU, where the chunk's elementwise passes are memory-bound and
# 32 MB measured fastest of 4-64 MB for a 49k vocabulary (each chunk also adds into the V x H weight
# gradient, so chunks cannot be too small); larger on GPUs to amortise launches.
CHUNK_BYTES = {"cpu": 32 * 2**20, "cuda": 256 * 2**20}


def chunk_rows(device: torch.device, vocab_size: int, chunk_bytes: int | None = None) -> int:
    """Positions per chunk so that one chunk's fp32 logits take about `chunk_bytes` (default: per device)."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES.get(device.type, CHUNK_BYTES["cuda"])
    return max(1, chunk_bytes // (4 * vocab_size))


class Teacher:
    """The teacher's next-token distribution for a slice of positions, at temperature tau.

    Dense (online KD): teacher hidden states (N, H_T) and its head (V, H_T), or its logits (N, V).
    Sparse (offline cache): top-k ids (N, K) and their log-probs (N, K), renormalised over the kept ids.
    """

    def __init__(self, hidden=None, head_weight=None, logits=None, top_ids=None, top_logprobs=None):
        self.hidden, self.head_weight, self.logits = hidden, head_weight, logits
        self.top_ids, self.top_logprobs = top_ids, top_logprobs

    def dense_logits(self, rows: slice) -> torch.Tensor:
        """fp32 teacher logits of these positions (dense teachers only), the head applied to this slice alone."""
        if self.logits is not None:
            return self.logits[rows].float()
        return (self.hidden[rows] @ self.head_weight.T).float()

    def target(self, rows: slice, tau: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log q, ids): the teacher's tempered log-probs of these positions, over the whole vocabulary (ids None)
        or, from a top-k cache, renormalised over the kept ids."""
        if self.top_ids is not None:
            return torch.log_softmax(self.top_logprobs[rows].float() / tau, dim=-1), self.top_ids[rows].long()
        return torch.log_softmax(self.dense_logits(rows) / tau, dim=-1), None

    def kl_and_grad(self, student_logits: torch.Tensor, rows: slice, tau: float):
        """(KL(q || p_s^tau) per row, d KL / d student logits) with q the teacher's tempered distribution."""
        log_p = torch.log_softmax(student_logits / tau, dim=-1)
        log_q, ids = self.target(rows, tau)
        q = log_q.exp()
        grad = log_p.exp()  # d KL / d logits = (p - q) / tau, q zero outside the kept ids
        if ids is None:
            grad -= q
        else:
            grad.scatter_add_(1, ids, -q)
        return kl_divergence(log_q, ids, log_p), grad / tau


def kl_divergence(log_q: torch.Tensor, ids: torch.Tensor | None, log_p: torch.Tensor) -> torch.Tensor:
    """KL(q || p) per row, with q given over all of p's entries (ids None) or over the entries `ids` only."""
    return (log_q.exp() * (log_q - (log_p if ids is None else log_p.gather(1, ids)))).sum(-1)


class _LinearDistillLoss(torch.autograd.Function):
    """Sum over positions of (1-w) * CE + w * tau^2 * KL(teacher^tau || student^tau); targets -100 are skipped.

    With no teacher (w = 0) this is the plain next-token loss.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows: int, compute_dtype: torch.dtype, teacher, kd_weight: float,
                tau: float):
        keep = targets != -100
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        w = weight.to(compute_dtype)
        ce_weight = 1.0 - kd_weight if teacher is not None else 1.0
        all_kept = bool(keep.all())
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            h = hidden[rows].to(compute_dtype)
            t = targets[rows]
            mask = keep[rows]
            logits = (h @ w.T).float()
            safe_t = t.clamp(min=0)
            log_z = torch.logsumexp(logits, dim=-1)
            loss = ce_weight * (log_z - logits.gather(1, safe_t[:, None]).squeeze(1))
            grad_kl = None
            if teacher is not None and kd_weight > 0:
                kl, grad_kl = teacher.kl_and_grad(logits, rows, tau)
                loss = loss + kd_weight * tau**2 * kl
            total += (loss * mask).sum()
            # d CE / d logits = softmax - onehot, computed in the logits' own buffer (the chunk is memory-bound)
            grad_logits = logits.sub_(log_z[:, None]).exp_()
            grad_logits[torch.arange(len(t), device=t.device), safe_t] -= 1.0
            if ce_weight != 1.0:
                grad_logits.mul_(ce_weight)
            if grad_kl is not None:
                grad_logits.add_(grad_kl, alpha=kd_weight * tau**2)
            if not all_kept:
                grad_logits.mul_(mask[:, None])
            grad_logits = grad_logits.to(compute_dtype)
            grad_hidden[rows] = (grad_logits @ w).to(hidden.dtype)
            if grad_weight is not None:
                if grad_logits.dtype == torch.float32:
                    grad_weight.addmm_(grad_logits.T, h.float())
                else:
                    grad_weight += (grad_logits.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight if grad_weight is not None else hidden.new_empty(0))
        ctx.weight_dtype, ctx.has_weight_grad = weight.dtype, grad_weight is not None
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_w = (grad_weight * grad_output).to(ctx.weight_dtype) if ctx.has_weight_grad else None
        return grad_hidden * grad_output.to(grad_hidden.dtype), grad_w, None, None, None, None, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             chunk_bytes: int | None = None, compute_dtype: torch.dtype | None = None,
                             teacher: Teacher | None = None, kd_weight: float = 0.0, tau: float = 1.0) -> torch.Tensor:
    """Summed next-token loss of hidden states (N, H) against targets (N,) through a bias-free head (V, H).

    With a teacher: (1 - kd_weight) * CE + kd_weight * tau^2 * KL(teacher^tau || student^tau) per position.
    """
    rows = chunk_rows(hidden.device, weight.shape[0], chunk_bytes)
    dtype = compute_dtype or hidden.dtype
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return _LinearDistillLoss.apply(hidden, weight, targets, rows, dtype, teacher, kd_weight, tau)


def distill_loss_from_logits(logits: torch.Tensor, targets: torch.Tensor, teacher: Teacher | None,
                             kd_weight: float, tau: float) -> torch.Tensor:
    """The same summed loss from full student logits (N, V): for students without a plain LM head."""
    logits = logits.float()
    keep = targets != -100
    ce = F.cross_entropy(logits, targets.clamp(min=0), reduction="none")
    if teacher is None or kd_weight == 0:
        return (ce * keep).sum()
    log_q, ids = teacher.target(slice(None), tau)
    kl = kl_divergence(log_q, ids, torch.log_softmax(logits / tau, dim=-1))
    return (((1 - kd_weight) * ce + kd_weight * tau**2 * kl) * keep).sum()


def has_plain_head(model) -> bool:
    head = model.get_output_embeddings()
    return (
        model.config.model_type in PLAIN_HEAD_FAMILIES
        and isinstance(head, torch.nn.Linear)
        and head.bias is None
        and not getattr(model.config, "final_logit_softcapping", None)
    )


class CausalLMLoss(torch.nn.Module):
    """Wraps a causal LM so that `forward(input_ids[, teacher])` returns the mean next-token (or KD) loss.

    DDP/FSDP wrap this module, so the chunked head runs inside their forward and gradients sync as usual.
    `lean=False` (or a family outside PLAIN_HEAD_FAMILIES) computes full logits instead: the model's own
    `labels=` loss without a teacher, the same KD formula on full logits with one.
    `teacher` covers the positions that predict input_ids[:, 1:], flattened: (B * (T-1), ...).
    """

    def __init__(self, model, lean: bool = True, chunk_bytes: int | None = None, kd_weight: float = 0.0,
                 kd_temperature: float = 1.0):
        super().__init__()
        self.model = model
        self.lean = lean and has_plain_head(model)
        self.chunk_bytes = chunk_bytes
        self.kd_weight, self.kd_temperature = kd_weight, kd_temperature

    def forward(self, input_ids: torch.Tensor, teacher: Teacher | None = None) -> torch.Tensor:
        targets = input_ids[:, 1:].reshape(-1)
        n_targets = (targets != -100).sum().clamp(min=1)
        if not self.lean:
            if teacher is None:
                return self.model(input_ids=input_ids, labels=input_ids).loss
            logits = self.model(input_ids=input_ids).logits[:, :-1]
            total = distill_loss_from_logits(logits.reshape(-1, logits.shape[-1]), targets, teacher, self.kd_weight,
                                             self.kd_temperature)
            return total / n_targets
        hidden = self.model.base_model(input_ids=input_ids).last_hidden_state  # (B, T, H)
        hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        weight = self.model.get_output_embeddings().weight
        compute_dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else None
        total = linear_cross_entropy_sum(hidden, weight, targets, self.chunk_bytes, compute_dtype, teacher,
                                         self.kd_weight, self.kd_temperature)
        return total / n_targets
