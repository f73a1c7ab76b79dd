"""Is the reference informative? Numbers that tell when difference sampling has become perplexity filtering.

The score is log p_teacher - log p_ref per token (or per byte). When the reference assigns nearly the same
NLL to every text (an undertrained reference with a large vocabulary sits near log V everywhere), the
score is the teacher's log-prob plus a constant, and keeping the top of the score keeps the texts the
teacher finds easiest: plain perplexity filtering. Three numbers show it, all from the score columns:

- the reference's NLL per token, its mean and its spread across instances (and per group): a spread
  near 0 means the reference cannot tell texts apart;
- the Spearman correlation between the score and the teacher's log-prob per token: near 1, the ranking
  is the teacher's;
- the overlap of the difference selection with the teacher-NLL selection of the same size
  (|A ∩ B| / |A|; a random selection of a fraction alpha overlaps by alpha on average).

Past `--weak-reference-overlap` the stages print one warning. Also the unigram baseline of a pretrained
model's held-out loss: a model that does not beat it has learnt no more than token frequencies.
Pure functions of numpy arrays; O(instances) numbers.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import numpy as np
import pyarrow as pa

# What a user can do about a weak reference (the part of the warning after the semicolon).
WEAK_REFERENCE_FIX = ("train the reference longer or larger, or give it a small vocabulary of its own "
                      "(e.g. 4,096 tokens) and score with --normalize bytes")


def per_token_nlls(scores: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(teacher NLL, reference NLL) per token of each instance, in nats; NaN where a log-prob is null (proxy rows).

    The reference's NLL is per reference token (`ref_n_tokens`) when it read its own tokenization.
    """
    n_tokens = np.maximum(scores.column("n_tokens").to_numpy().astype(np.float64), 1)
    ref_tokens = (np.maximum(scores.column("ref_n_tokens").to_numpy().astype(np.float64), 1)
                  if "ref_n_tokens" in scores.column_names else n_tokens)
    teacher = scores.column("teacher_logprob").to_numpy(zero_copy_only=False).astype(np.float64)
    ref = scores.column("ref_logprob").to_numpy(zero_copy_only=False).astype(np.float64)
    return -teacher / n_tokens, -ref / ref_tokens


def reference_vocab_size(score_manifest: dict) -> Optional[int]:
    """The reference's vocabulary size as a `refine score` manifest (or its run settings) records it."""
    tokenizer = score_manifest.get("reference_tokenizer") or score_manifest.get("tokenizer") or {}
    return tokenizer.get("vocab_size")


def table_diagnostics(scores: pa.Table, alpha: float, kept: Optional[np.ndarray] = None,
                      vocab_size: Optional[int] = None) -> dict:
    """`reference_diagnostics` of a scores table (the columns `refine score` writes)."""
    teacher_nll, ref_nll = per_token_nlls(scores)
    return reference_diagnostics(teacher_nll, ref_nll, scores.column("score").to_numpy(), alpha, kept,
                                 vocab_size=vocab_size)


def reference_diagnostics(teacher_nll: np.ndarray, ref_nll: np.ndarray, score: np.ndarray, alpha: float,
                          kept: Optional[np.ndarray] = None, groups: Optional[tuple[np.ndarray, Sequence[str]]] = None,
                          vocab_size: Optional[int] = None) -> dict:
    """How much the reference changes the selection, per instance arrays in, JSON-ready numbers out.

    `teacher_nll`, `ref_nll`: NLL per token (nats); `score`: the difference score as sampled. `kept`: positions
    of the difference selection (default: the top ceil(alpha N) by score); the teacher-NLL selection has the
    same size. `groups`: (integer code per instance, label per code) for the reference's NLL per group.
    `vocab_size`: the reference's, for the NLL of a uniform guess (log V). Instances without log-probs
    (a proxy's predicted rows, NaN) are left out of every figure.
    """
    exact = np.isfinite(teacher_nll) & np.isfinite(ref_nll)
    teacher_nll, ref_nll, score = teacher_nll[exact], ref_nll[exact], np.asarray(score, dtype=np.float64)[exact]
    n = int(len(score))
    if kept is None:
        selected = top_positions(score, math.ceil(alpha * n))
    else:  # the given selection, restricted to the instances with log-probs, renumbered among them
        in_selection = np.zeros(len(exact), dtype=bool)
        in_selection[np.asarray(kept, dtype=np.int64)] = True
        selected = np.flatnonzero(in_selection[exact])
    teacher_selected = top_positions(-teacher_nll, len(selected))
    result = {
        "n_instances": n,
        "alpha": alpha,
        "random_overlap": len(selected) / n if n else None,  # what a random selection of that size shares on average
        "ref_nll_mean": _number(ref_nll.mean()) if n else None,
        "ref_nll_std": _number(ref_nll.std()) if n else None,
        "teacher_nll_mean": _number(teacher_nll.mean()) if n else None,
        "teacher_nll_std": _number(teacher_nll.std()) if n else None,
        "uniform_nll": math.log(vocab_size) if vocab_size else None,
        "spearman_score_teacher": spearman(score, -teacher_nll),
        "overlap_with_teacher": overlap(selected, teacher_selected, n) if len(selected) else None,
    }
    if groups is not None:
        codes, labels = np.asarray(groups[0])[exact], list(groups[1])
        result["ref_nll_by_group"] = group_stats(ref_nll, codes, labels)
    return result


def top_positions(keys: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest keys, ties broken by the smaller position (as `refine sample` breaks them by id)."""
    order = np.lexsort((np.arange(len(keys)), -np.asarray(keys, dtype=np.float64)))
    return order[:k]


def overlap(a: np.ndarray, b: np.ndarray, n: int) -> float:
    """|A ∩ B| / |A| for two sets of positions in [0, n), with an n-long mask rather than Python sets."""
    in_b = np.zeros(n, dtype=bool)
    in_b[b] = True
    return float(in_b[a].sum() / len(a))


def spearman(x: np.ndarray, y: np.ndarray) -> Optional[float]:
    """Spearman's rank correlation (ties get their average rank); None when either side is constant or too short."""
    from scipy.stats import spearmanr

    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return _number(spearmanr(x, y).statistic)


def group_stats(values: np.ndarray, codes: np.ndarray, labels: Sequence[str]) -> dict:
    """{label: {n, mean, std}} of `values` per group, with bincount (no copy per group)."""
    count = np.bincount(codes, minlength=len(labels)).astype(np.float64)
    total = np.bincount(codes, weights=values, minlength=len(labels))
    mean = total / np.maximum(count, 1)
    square = np.bincount(codes, weights=(values - mean[codes]) ** 2, minlength=len(labels))
    return {str(label): {"n": int(count[k]), "mean": _number(mean[k]), "std": _number(math.sqrt(square[k] / count[k]))}
            for k, label in enumerate(labels) if count[k] > 0}


def is_weak(diagnostics: dict, threshold: float) -> bool:
    """Whether the difference selection is (nearly) the teacher-NLL selection: overlap above `threshold`."""
    value = diagnostics.get("overlap_with_teacher")
    return value is not None and value > threshold


def summary_line(diagnostics: dict) -> str:
    """One line of the headline figures, e.g. for the end of `refine score`."""
    d = diagnostics
    if not d.get("n_instances") or d.get("overlap_with_teacher") is None:
        return "reference: no kept instance has both log-probs (proxy-predicted rows have none); nothing to diagnose"
    uniform = f" (uniform guess {d['uniform_nll']:.2f})" if d.get("uniform_nll") else ""
    rho = f"{d['spearman_score_teacher']:.2f}" if d["spearman_score_teacher"] is not None else "undefined"
    return (f"reference: NLL {d['ref_nll_mean']:.2f} ± {d['ref_nll_std']:.2f} nats/token across instances{uniform}; "
            f"Spearman(score, teacher log-prob/token) {rho}; the selection ({d['random_overlap']:.0%} of instances) shares "
            f"{d['overlap_with_teacher']:.0%} with the teacher-NLL selection of its size (a random one would share "
            f"{d['random_overlap']:.0%})")


def weak_reference_warning(diagnostics: dict, threshold: float) -> Optional[str]:
    """The one warning line for a reference too weak to matter, or None."""
    if not is_weak(diagnostics, threshold):
        return None
    d = diagnostics
    return (f"warning: the reference adds almost nothing: difference sampling keeps {d['overlap_with_teacher']:.0%} of "
            f"what plain teacher-perplexity filtering keeps (above --weak-reference-overlap {threshold}; reference NLL "
            f"{d['ref_nll_mean']:.2f} ± {d['ref_nll_std']:.2f} nats/token); {WEAK_REFERENCE_FIX}")


def unigram_cross_entropy(train_chunks: Iterable[np.ndarray], held_out_targets: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) on `held_out_targets` of a unigram model fitted on the training tokens.

    Add-one (Laplace) smoothing over the whole vocabulary: p(t) = (count(t) + 1) / (N + V), so a token never
    seen in training still has a finite loss. The training tokens come in chunks (e.g. `TokenFile.chunks()`),
    so a token file of any size is counted without being held in memory.
    """
    counts = np.zeros(vocab_size, dtype=np.int64)
    for chunk in train_chunks:
        counts += np.bincount(np.asarray(chunk, dtype=np.int64), minlength=vocab_size)[:vocab_size]
    log_p = np.log(counts + 1.0) - math.log(int(counts.sum()) + vocab_size)
    return float(-log_p[np.asarray(held_out_targets, dtype=np.int64)].mean())


def _number(value) -> Optional[float]:
    value = float(value)
    return value if math.isfinite(value) else None
