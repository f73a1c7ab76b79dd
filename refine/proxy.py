"""Proxy scoring (MiniPLM_prx): score a random fraction exactly, let a small model predict the rest.

1. A seeded random `--proxy-fraction` of the documents is scored exactly with teacher and reference
   (an ordinary `refine score` run into `exact/`, resumable).
2. The proxy, the reference model's body with a linear regression head on its mean-pooled final hidden
   states, is fine-tuned to predict the (standardised) difference score from the document's first
   `--max-length` tokens, on 80% of the exact rows; the other 20% are held out to measure it.
3. Every other document gets the proxy's prediction: one forward pass of the reference body over its
   first window, instead of teacher + reference over every token.
Output: the usual scores folder; column `exact` says which rows were scored exactly (their log-probs
are filled) and which were predicted (log-probs null, score = prediction). manifest.json's `proxy`
records the held-out Spearman correlation, the top-alpha overlap and the FLOPs spent and saved.
Runs in one process (the exact pass alone may use torchrun by running `refine score` on a subset).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from refine import data as corpus
from refine import models
from refine.card import scores_card
from refine.errors import RefineError
from refine.logprobs import length_batches, pad_batch
from refine.config import result_settings
from refine.output import MANIFEST, claim, content_tag, parquet_files, run_info, verify, write_manifest, write_parquet, write_text

EXACT_DIR = "exact"
HELD_OUT_SHARE = 0.2
ROW_COLUMN = "__refine_row"


class ProxyRegressor(torch.nn.Module):
    """A causal LM's body + a linear head on the masked mean of its last hidden states -> one number."""

    def __init__(self, lm):
        super().__init__()
        self.body = lm.base_model
        self.head = torch.nn.Linear(lm.config.hidden_size if hasattr(lm.config, "hidden_size") else lm.config.n_embd, 1)

    def forward(self, input_ids, attention_mask):
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()
        mask = attention_mask[..., None].float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.head(pooled).squeeze(-1)


def _predict(proxy, sequences, budget_tokens: int, device, desc: str) -> np.ndarray:
    proxy.eval()
    out = np.zeros(len(sequences))
    with torch.no_grad():
        for batch in tqdm(length_batches([len(s) for s in sequences], budget_tokens), desc=desc, unit="batch",
                          dynamic_ncols=True, leave=False):
            ids, mask = pad_batch([sequences[i] for i in batch])
            out[batch] = proxy(ids.to(device), mask.to(device)).float().cpu().numpy()
    return out


def _train(proxy, sequences, targets, cfg, device) -> None:
    optimizer = torch.optim.AdamW(proxy.parameters(), lr=cfg.proxy_lr, weight_decay=0.0)
    rng = np.random.default_rng(cfg.proxy_seed)
    batches = length_batches([len(s) for s in sequences], max(cfg.max_length, 2048))
    proxy.train()
    for _ in tqdm(range(cfg.proxy_epochs), desc="proxy training", unit="epoch", dynamic_ncols=True):
        for b in rng.permutation(len(batches)):
            batch = batches[b]
            ids, mask = pad_batch([sequences[i] for i in batch])
            prediction = proxy(ids.to(device), mask.to(device))
            loss = torch.nn.functional.mse_loss(prediction, torch.tensor(targets[batch], dtype=torch.float32, device=device))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def top_overlap(predicted: np.ndarray, exact: np.ndarray, alpha: float) -> float:
    """Share of the exact top-alpha set that the predicted top-alpha set recovers."""
    k = max(1, int(np.ceil(alpha * len(exact))))
    return len(set(np.argsort(-predicted, kind="stable")[:k]) & set(np.argsort(-exact, kind="stable")[:k])) / k


def proxy_score(cfg) -> dict:
    """Score `cfg.proxy_fraction` of the corpus exactly and predict the rest; write a scores folder."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RefineError("proxy scoring runs in one process; drop torchrun/--nproc (or score the subset with torchrun)")
    if cfg.unit != "document":
        raise RefineError("--proxy-fraction predicts whole documents' scores; use --unit document")
    # What defines the result, as for `refine score`: a changed corpus or model is never resumed into.
    files = corpus.corpus_files(cfg.data, cfg.split, cfg.name)
    ds = corpus.load_corpus(cfg.data, cfg.split, cfg.name)
    corpus.check_columns(ds, cfg.text_column, cfg.id_column, cfg.data)
    run = {"proxy": result_settings(cfg),
           "data_fingerprint": corpus.corpus_fingerprint(ds, cfg.text_column, cfg.id_column, files, cfg.full_fingerprint),
           "teacher": models.model_identity(cfg.teacher, None, cfg.teacher_revision),
           "reference": models.model_identity(cfg.reference, None, cfg.reference_revision)}
    with claim(cfg.output, "score", [cfg.data, cfg.teacher, cfg.reference], cfg.overwrite, run=run):
        return _proxy_score(cfg, ds)


def _proxy_score(cfg, ds) -> dict:
    started = time.time()
    output = Path(cfg.output).expanduser().absolute()
    ids = corpus.document_ids(ds, cfg.id_column)
    texts = ds[cfg.text_column]
    rows = np.array([i for i, t in enumerate(texts) if not corpus.is_blank(t)])
    if len(rows) < 10:
        raise RefineError(f"{cfg.data!r} has {len(rows)} non-empty documents; proxy scoring needs at least 10")

    exact, exact_manifest = score_exact_subset(cfg, ds, rows, output)  # 1. the seeded random subset, exactly
    exact_row, exact_score = exact.column("id").to_numpy(), exact.column("score").to_numpy()
    tokenizer = models.load_tokenizer(cfg.reference, cfg.reference_revision, cfg.trust_remote_code)
    start = models.start_token_id(tokenizer, cfg.reference)

    def first_windows(row_ids) -> list[list[int]]:
        encoded = tokenizer([texts[i] for i in row_ids], add_special_tokens=False, verbose=False)["input_ids"]
        return [[start, *e[: cfg.max_length - 1]] for e in encoded]

    fitted = fit_proxy(cfg, exact_row, exact_score, first_windows)  # 2. reference body + regression head
    predicted_rows = np.setdiff1d(rows, exact_row)  # 3. everything else, predicted from its first window
    predicted = _predict(fitted.proxy, first_windows(predicted_rows), fitted.budget, fitted.device, "proxy scoring")
    predicted = predicted * fitted.std + fitted.mean
    predicted_tokens = [len(t) for t in tokenizer([texts[i] for i in predicted_rows], add_special_tokens=False,
                                                  verbose=False)["input_ids"]]
    table = proxy_table(exact, predicted_rows, predicted, predicted_tokens, ids)

    # ---- finish: FLOPs accounting, the one shard, the card and the manifest last
    n_tokens_all = int(np.sum(table.column("n_tokens").to_numpy()))
    teacher_params, ref_params = exact_manifest["teacher"]["n_params"], exact_manifest["reference"]["n_params"]
    window_tokens = sum(min(t + 1, cfg.max_length) for t in predicted_tokens)
    train_tokens = sum(len(w) for w in first_windows(exact_row[fitted.train]))
    flops_exact_all = 2 * (teacher_params + ref_params) * n_tokens_all
    flops_spent = (2 * (teacher_params + ref_params) * exact_manifest["n_tokens"]
                   + 6 * ref_params * train_tokens * cfg.proxy_epochs + 2 * ref_params * window_tokens)
    stats = {"fraction": cfg.proxy_fraction, "n_exact": int(len(exact_row)), "n_predicted": int(len(predicted_rows)),
             "held_out": int(len(fitted.held)), "spearman": fitted.spearman, "alpha": cfg.proxy_alpha,
             "top_alpha_overlap": fitted.overlap, "random_overlap_expected": cfg.proxy_alpha,
             "flops_all_exact": float(flops_exact_all), "flops_spent": float(flops_spent),
             "flops_saved_fraction": 1 - flops_spent / flops_exact_all, "epochs": cfg.proxy_epochs, "lr": cfg.proxy_lr}
    run = {k: exact_manifest[k] for k in ("teacher", "reference", "tokenizer", "normalize") if k in exact_manifest}
    tag = content_tag({"proxy": stats, **run, "source": cfg.data})
    write_parquet(output / "data" / f"scores-{tag}-proxy.parquet", table.replace_schema_metadata(
        {"refine_n_tokens": str(n_tokens_all)}))
    manifest = {
        "stage": "score", **run_info(), **run, "settings": {**exact_manifest["settings"], "data": cfg.data,
                                                            "id_column": cfg.id_column, "proxy_fraction": cfg.proxy_fraction},
        "data": {"source": corpus.resolved_source(cfg.data), "split": cfg.split, "name": cfg.name, "text_column": cfg.text_column,
                 "id_column": cfg.id_column, "fingerprint": corpus.corpus_fingerprint(
                     ds, cfg.text_column, cfg.id_column, corpus.corpus_files(cfg.data, cfg.split, cfg.name),
                     cfg.full_fingerprint),
                 "n_rows": len(ds), "n_blank_skipped": len(ds) - len(rows), "license": ds.info.license or None},
        "data_files": f"data/scores-{tag}-*.parquet", "n_instances": table.num_rows, "n_tokens": n_tokens_all,
        "world_size": 1, "proxy": stats, "elapsed_s": round(time.time() - started, 1),
        "reference_diagnostics": exact_manifest.get("reference_diagnostics"),  # of the exactly scored subset
    }
    write_text(output / "README.md", scores_card(manifest, manifest["data_files"]))
    return write_manifest(output, manifest, [f"data/scores-{tag}-proxy.parquet", "README.md"])


def score_exact_subset(cfg, ds, rows: np.ndarray, output: Path) -> tuple[pa.Table, dict]:
    """Score a seeded random `proxy_fraction` of the non-blank rows with teacher and reference: an ordinary,
    resumable `refine score` run into output/exact/, whose ids are the rows' original positions."""
    from refine.score import score

    n_exact = min(len(rows), max(5, int(np.ceil(cfg.proxy_fraction * len(rows)))))
    exact_rows = np.sort(np.random.default_rng(cfg.proxy_seed).choice(rows, n_exact, replace=False))
    subset_file = output / "exact_input.parquet"
    if not subset_file.exists():
        subset = ds.select(exact_rows).add_column(ROW_COLUMN, exact_rows.tolist())
        tmp = output / f".{subset_file.name}.tmp"
        subset.to_parquet(str(tmp))
        tmp.rename(subset_file)
    if (output / EXACT_DIR / MANIFEST).exists():
        manifest = verify(output / EXACT_DIR, "score")
    else:
        manifest = score(replace(cfg, data=str(subset_file), output=str(output / EXACT_DIR), proxy_fraction=None,
                                 id_column=ROW_COLUMN, split="train", name=None, overwrite=False))
    return pq.read_table(parquet_files(output / EXACT_DIR, manifest)), manifest


@dataclass
class FittedProxy:
    """The trained proxy, the standardisation of its targets, and how well it did on held-out exact rows."""

    proxy: ProxyRegressor
    mean: float
    std: float
    train: np.ndarray  # positions in the exact table
    held: np.ndarray
    spearman: float
    overlap: float
    device: torch.device
    budget: int  # tokens per prediction batch


def fit_proxy(cfg, exact_row: np.ndarray, exact_score: np.ndarray, first_windows) -> FittedProxy:
    """Fine-tune the reference + head on 80% of the exact rows; measure it on the other 20%."""
    from scipy.stats import spearmanr

    device = models.resolve_device(cfg.device)
    dtype = models.resolve_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.proxy_seed)
    lm = models.load_causal_lm(cfg.reference, cfg.reference_revision, dtype, device, cfg.trust_remote_code)
    proxy = ProxyRegressor(lm).to(device)
    order = np.random.default_rng(cfg.proxy_seed + 1).permutation(len(exact_row))
    n_held = max(2, int(round(HELD_OUT_SHARE * len(order))))
    held, train = order[:n_held], order[n_held:]
    mean, std = float(exact_score[train].mean()), float(exact_score[train].std() or 1.0)
    _train(proxy, first_windows(exact_row[train]), (exact_score[train] - mean) / std, cfg, device)
    budget = max(cfg.max_length, 2048)
    held_prediction = _predict(proxy, first_windows(exact_row[held]), budget, device, "proxy held-out") * std + mean
    return FittedProxy(proxy, mean, std, train, held, float(spearmanr(held_prediction, exact_score[held]).statistic),
                       top_overlap(held_prediction, exact_score[held], cfg.proxy_alpha), device, budget)


def proxy_table(exact: pa.Table, predicted_rows: np.ndarray, predicted: np.ndarray, predicted_tokens: list[int],
                ids: list) -> pa.Table:
    """The scores table: exact rows with their log-probs, predicted rows with null log-probs; `exact` tells which."""
    exact_row = exact.column("id").to_numpy()
    null = pa.nulls(len(predicted_rows), pa.float64())
    return pa.table({
        "id": pa.array([ids[i] for i in exact_row] + [ids[i] for i in predicted_rows], type=corpus.arrow_type_for_ids(ids)),
        "n_tokens": pa.concat_arrays([exact.column("n_tokens").combine_chunks(),
                                      pa.array(predicted_tokens, type=pa.int64())]),
        "teacher_logprob": pa.concat_arrays([exact.column("teacher_logprob").combine_chunks(), null]),
        "ref_logprob": pa.concat_arrays([exact.column("ref_logprob").combine_chunks(), null]),
        "score": pa.array(np.concatenate([exact.column("score").to_numpy(), predicted]), type=pa.float64()),
        "exact": pa.array([True] * len(exact_row) + [False] * len(predicted_rows)),
    }).sort_by("id")
