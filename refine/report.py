"""`refine report`: one self-contained HTML page showing what difference sampling keeps and drops."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from typing import Callable, Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from refine import data as corpus
from refine import diagnostics
from refine.config import ReportConfig
from refine.output import claim_file, parquet_files, write_text
from refine.card import budget_text, selection_lines
from refine.sample import choose, open_scored_corpus, read_groups, read_scores


# The mark of a page refine wrote: an existing --output without it is never replaced.
GENERATOR = '<meta name="generator" content="refine report">'


def validate(cfg: ReportConfig) -> None:
    cfg.check()  # every field and cross-field check is declared in refine.config


SCATTER_POINTS = 20_000  # points drawn in the scatter plot: a seeded sample beyond this (more only blurs the cloud)


def scored_frame(cfg: ReportConfig) -> tuple[pd.DataFrame, dict, Callable[[np.ndarray], list[str]]]:
    """Numbers only, one row per instance: per-token NLLs, the kept flag of the selection, the group; and a function
    that reads the text of a few rows of the frame (only the examples' text is ever read)."""
    scores, manifest = read_scores(Path(cfg.scores))
    frame = scores.select(["id", "n_tokens", "teacher_logprob", "ref_logprob", "score"]).to_pandas()
    frame["teacher_nll"], frame["ref_nll"] = diagnostics.per_token_nlls(scores)
    spec = manifest["data"]
    chunks = manifest["settings"]["unit"] == "chunk"
    source = cfg.data or spec["source"]
    ds = None if chunks else open_scored_corpus(source, spec)
    groups = read_groups(cfg, scores, manifest, source, ds) if cfg.group_column else None  # refuses chunk scores
    kept, _, selection = choose(cfg, scores, "difference", groups, balance_default=None)
    manifest = {**manifest, "selection": selection}
    frame["kept"] = False
    frame.loc[kept, "kept"] = True
    if groups is not None:
        codes, labels = groups
        frame["group"] = pd.Categorical.from_codes(codes, categories=labels)
    if chunks:
        paths = parquet_files(Path(cfg.scores), manifest)
        return frame, manifest, lambda positions: chunk_texts(paths, spec["text_column"], positions)
    streamed = isinstance(ds, corpus.StreamedCorpus)
    if streamed and (ds.rows_per_file is None or (spec["id_column"] and ds.ids is None)):
        # a remote corpus knows where a row lies (and which row holds an id) only after one streamed pass
        ds.scan(spec["text_column"], spec["id_column"])
    if spec["id_column"] is None:
        rows = scores.column("id").combine_chunks()
    else:
        # only this column's pages of the memory-mapped corpus; a streamed corpus's ids come from its scan
        corpus_ids = ds.ids.combine_chunks() if streamed else ds.with_format("arrow")[spec["id_column"]]
        rows = pc.index_in(scores.column("id").combine_chunks().cast(corpus_ids.type), value_set=corpus_ids)
    row_of = rows.to_numpy(zero_copy_only=False)
    return frame, manifest, lambda positions: document_texts(ds, spec["text_column"], row_of[positions])


def document_texts(ds, text_column: str, rows: np.ndarray) -> list[str]:
    return [corpus.read_rows(ds, int(row), int(row) + 1, [text_column]).column(text_column)[0].as_py() for row in rows]


def chunk_texts(paths: list[Path], text_column: str, positions: np.ndarray) -> list[str]:
    """Texts of chunks at `positions` of the scores, reading the text column of only the shards that hold one."""
    texts, first = {}, 0
    for path in paths:
        n_rows = pq.read_metadata(path).num_rows
        local = [p - first for p in positions if first <= p < first + n_rows]
        if local:
            column = pq.read_table(path, columns=[text_column]).column(text_column)
            texts.update(zip((first + p for p in local), column.take(pa.array(local, type=pa.int64())).to_pylist()))
        first += n_rows
    return [texts[p] for p in positions]


def _png(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return f'<img alt="" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def distribution_figure(frame: pd.DataFrame, threshold: Optional[float]) -> str:
    import matplotlib.pyplot as plt

    scores = frame["score"].to_numpy()
    figure, (hist, cdf) = plt.subplots(1, 2, figsize=(10, 3.6))
    counts, edges = np.histogram(scores, bins=min(60, max(10, len(frame) // 5)))
    hist.stairs(counts, edges, fill=True, color="#4c72b0")
    if threshold is not None:
        hist.axvline(threshold, color="#c44e52", linestyle="--", label=f"cut {threshold:.3f}")
        hist.legend()
    hist.set_xlabel("score = log p_teacher − log p_ref per token (nats)")
    hist.set_ylabel("instances")
    fractions = np.linspace(0, 1, min(len(scores), 2001))  # the curve at 2,001 quantiles looks the same as at every point
    cdf.plot(np.quantile(scores, fractions), fractions, color="#4c72b0")
    if threshold is not None:
        cdf.axvline(threshold, color="#c44e52", linestyle="--")
    cdf.set_xlabel("score")
    cdf.set_ylabel("fraction of instances ≤ score")
    return _png(figure)


def scatter_sample(n: int, limit: int = SCATTER_POINTS, seed: int = 0) -> np.ndarray:
    """Positions of the points to draw: all of them up to `limit`, else a seeded uniform sample of `limit`, sorted."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def scatter_figure(frame: pd.DataFrame) -> str:
    import matplotlib.pyplot as plt

    shown = frame.iloc[scatter_sample(len(frame))]
    figure, axis = plt.subplots(figsize=(6, 5))
    for kept, color, label in ((False, "#bbbbbb", "dropped"), (True, "#dd8452", "kept")):
        part = shown[shown["kept"] == kept]
        total = int((frame["kept"] == kept).sum())
        count = f"{total:,}" if len(shown) == len(frame) else f"{len(part):,} of {total:,} shown"
        axis.scatter(part["teacher_nll"], part["ref_nll"], s=8, alpha=0.6, color=color, label=f"{label} ({count})")
    low = float(min(shown["teacher_nll"].min(), shown["ref_nll"].min()))
    high = float(max(shown["teacher_nll"].max(), shown["ref_nll"].max()))
    axis.plot([low, high], [low, high], color="black", linewidth=0.8, label="equal NLL")
    axis.set_xlabel("teacher NLL per token (nats)")
    axis.set_ylabel("reference NLL per token (nats)")
    axis.legend()
    return _png(figure)


def group_figure(table: pd.DataFrame) -> str:
    import matplotlib.pyplot as plt

    figure, (share, kept) = plt.subplots(1, 2, figsize=(10, 0.5 * len(table) + 1.6))
    y = np.arange(len(table))
    share.barh(y - 0.2, table["share_before"], height=0.4, label="before", color="#bbbbbb")
    share.barh(y + 0.2, table["share_after"], height=0.4, label="after", color="#dd8452")
    share.set_yticks(y, table.index)
    share.set_xlabel("share of instances")
    share.legend()
    kept.barh(y - 0.2, table["kept_fraction"], height=0.4, label="instances", color="#4c72b0")
    kept.barh(y + 0.2, table["kept_fraction_tokens"], height=0.4, label="tokens", color="#55a868")
    kept.set_yticks(y, table.index)
    kept.set_xlabel("fraction kept")
    kept.set_xlim(0, 1)
    kept.legend()
    return _png(figure)


def group_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per group: instances and tokens before and after, their shares, and the fraction kept of each.

    Counted with bincount over the group codes, so no copy of the frame is made (it may hold 10^8 rows).
    """
    codes, labels = frame["group"].cat.codes.to_numpy(), frame["group"].cat.categories.astype(str)
    kept, n_tokens = frame["kept"].to_numpy(), frame["n_tokens"].to_numpy().astype(np.float64)
    count = lambda weights=None: np.bincount(codes, weights=weights, minlength=len(labels))
    table = pd.DataFrame({"before": count(), "after": count(kept).astype(int),
                          "tokens_before": count(n_tokens).astype(np.int64),
                          "tokens_after": count(np.where(kept, n_tokens, 0)).astype(np.int64),
                          "mean_score": count(frame["score"].to_numpy()) / np.maximum(count(), 1)}, index=labels)
    table = table[table["before"] > 0]
    table["share_before"] = table["before"] / table["before"].sum()
    table["share_after"] = table["after"] / max(table["after"].sum(), 1)
    table["token_share_before"] = table["tokens_before"] / max(table["tokens_before"].sum(), 1)
    table["token_share_after"] = table["tokens_after"] / max(table["tokens_after"].sum(), 1)
    table["kept_fraction"] = table["after"] / table["before"]
    table["kept_fraction_tokens"] = table["tokens_after"] / table["tokens_before"].clip(lower=1)
    return table.sort_values("kept_fraction", ascending=False)


def example_rows(frame: pd.DataFrame, n: int) -> dict[str, pd.DataFrame]:
    """The top, boundary and bottom instances of the ranking (frame rows, still without text)."""
    order = np.lexsort((frame["id"].to_numpy(), -frame["score"].to_numpy()))  # highest score first, ties by id
    cut = int(frame["kept"].sum())
    boundary = order[max(0, cut - (n + 1) // 2) : cut + n // 2]
    return {"Top (highest score)": frame.iloc[order[:n]], "Boundary (around the cut)": frame.iloc[boundary],
            "Bottom (lowest score)": frame.iloc[order[max(0, len(order) - n):]]}


def _examples(frame: pd.DataFrame, read_texts, n: int, chars: int) -> dict[str, pd.DataFrame]:
    shorten = lambda text: text if len(text) <= chars else text[:chars] + " …"
    examples = {}
    for name, part in example_rows(frame, n).items():
        positions = frame.index.get_indexer(part.index)
        examples[name] = part.reset_index(drop=True).assign(text=[shorten(t or "") for t in read_texts(positions)])
    return examples


def _example_table(part: pd.DataFrame) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(str(r.id))}</td><td>{r.score:.3f}</td><td>{r.teacher_nll:.2f}</td><td>{r.ref_nll:.2f}</td>"
        f"<td>{'kept' if r.kept else 'dropped'}</td><td><pre>{html.escape(r.text)}</pre></td></tr>"
        for r in part.itertuples()
    )
    return ("<table><tr><th>id</th><th>score</th><th>teacher NLL</th><th>ref NLL</th><th></th><th>text</th></tr>"
            f"{rows}</table>")


def frame_diagnostics(frame: pd.DataFrame, manifest: dict, alpha: Optional[float]) -> dict:
    """refine.diagnostics of the report's own selection, with the reference's NLL per group when there are groups."""
    groups = ((frame["group"].cat.codes.to_numpy(), frame["group"].cat.categories.astype(str))
              if "group" in frame else None)
    return diagnostics.reference_diagnostics(
        frame["teacher_nll"].to_numpy(), frame["ref_nll"].to_numpy(), frame["score"].to_numpy(), alpha,
        kept=np.flatnonzero(frame["kept"].to_numpy()), groups=groups, vocab_size=diagnostics.reference_vocab_size(manifest))


def reference_section(d: dict, threshold: float) -> str:
    """The "Is the reference informative?" section: the figures, what they mean, and the warning when weak."""
    number = lambda v, f: format(v, f) if v is not None else "–"
    rows = [("reference NLL per token, mean ± std across instances",
             f"{number(d['ref_nll_mean'], '.3f')} ± {number(d['ref_nll_std'], '.3f')}"
             + (f" (a uniform guess: {d['uniform_nll']:.3f})" if d.get("uniform_nll") else "")),
            ("teacher NLL per token, mean ± std", f"{number(d['teacher_nll_mean'], '.3f')} ± {number(d['teacher_nll_std'], '.3f')}"),
            ("Spearman(score, teacher log-prob per token)", number(d["spearman_score_teacher"], ".3f")),
            ("kept instances also kept by teacher-NLL filtering",
             f"{number(d['overlap_with_teacher'], '.1%')} (a random selection: {number(d['random_overlap'], '.1%')})")]
    by_group = "".join(f"<tr><td>{html.escape(label)}</td><td>{g['n']:,}</td><td>{number(g['mean'], '.3f')}</td>"
                       f"<td>{number(g['std'], '.3f')}</td></tr>" for label, g in d.get("ref_nll_by_group", {}).items())
    warning = diagnostics.weak_reference_warning(d, threshold)
    return ('<section id="reference"><h2>Is the reference informative?</h2><p>If the reference gives every text about '
            "the same NLL, the score is the teacher's log-prob plus a constant and difference sampling is perplexity "
            "filtering. Signs: a small spread of the reference's NLL, a Spearman correlation near 1, an overlap near "
            "100%.</p>" + (f"<p><strong>{html.escape(warning)}</strong></p>" if warning else "") + "<table>"
            + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"
            + ("<table><tr><th>group</th><th>instances</th><th>reference NLL mean</th><th>std</th></tr>"
               f"{by_group}</table>" if by_group else "") + "</section>")


def render(frame: pd.DataFrame, manifest: dict, cfg: ReportConfig, read_texts, reference: dict | None = None) -> str:
    kept = frame[frame["kept"]]
    selection = manifest["selection"]
    sharp = not selection["temperature"] and not selection["balance"]  # else no single score separates kept from dropped
    threshold = float(kept["score"].min()) if sharp and len(kept) else None
    quantiles = frame["score"].quantile([0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
    tokens_before, tokens_after = int(frame["n_tokens"].sum()), int(kept["n_tokens"].sum())
    summary = [
        ("corpus", html.escape(str(manifest["data"]["source"]))),
        ("teacher", html.escape(str(manifest["teacher"]["id"]))),
        ("reference", html.escape(str(manifest["reference"]["id"]))),
        ("selection", html.escape("; ".join(selection_lines(selection)))),
        ("instances", f"{len(frame):,} → {len(kept):,}"),
        ("tokens", f"{tokens_before:,} → {tokens_after:,}"),
        ("kept share", f"{len(kept) / len(frame):.1%} of instances, {tokens_after / max(tokens_before, 1):.1%} of tokens"),
        ("score threshold", f"{threshold:.4f}" if threshold is not None else "– (no single cut)"),
        ("score quantiles", " · ".join(f"{int(q * 100)}%: {v:.3f}" for q, v in quantiles.items())),
        ("mean teacher / reference NLL per token", f"{frame['teacher_nll'].mean():.3f} / {frame['ref_nll'].mean():.3f}"),
    ]
    if reference is not None:
        summary.append(("reference check", html.escape(diagnostics.summary_line(reference).removeprefix("reference: "))))
    sections = [
        '<section id="summary"><h2>Summary</h2><table>'
        + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in summary) + "</table></section>",
        '<section id="distribution"><h2>Score distribution</h2><p>'
        + ("Instances right of the dashed line are kept." if threshold is not None else "The selection is drawn or "
           "balanced, so no single score separates kept from dropped instances.") + "</p>"
        + distribution_figure(frame, threshold) + "</section>",
        '<section id="scatter"><h2>Teacher vs reference NLL</h2><p>Above the diagonal the teacher finds the text easier '
        "than the reference: hard, valuable text the small model has not learned. Both low: easy, common text. "
        "Both high: noise." + (f" A seeded random {SCATTER_POINTS:,} of the {len(frame):,} instances are drawn."
                               if len(frame) > SCATTER_POINTS else "") + "</p>" + scatter_figure(frame) + "</section>",
    ]
    if cfg.group_column:
        table = group_table(frame)
        rows = "".join(
            f"<tr><td>{html.escape(str(r.Index))}</td><td>{r.before:,}</td><td>{r.after:,}</td><td>{r.share_before:.1%}</td>"
            f"<td>{r.share_after:.1%}</td><td>{r.kept_fraction:.0%}</td><td>{r.tokens_before:,}</td><td>{r.tokens_after:,}</td>"
            f"<td>{r.token_share_before:.1%}</td><td>{r.token_share_after:.1%}</td><td>{r.kept_fraction_tokens:.0%}</td>"
            f"<td>{r.mean_score:.3f}</td></tr>"
            for r in table.itertuples()
        )
        sections.append(
            f'<section id="groups"><h2>By {html.escape(cfg.group_column)}</h2>' + group_figure(table)
            + "<table><tr><th>group</th><th>before</th><th>after</th><th>share before</th><th>share after</th>"
            "<th>kept</th><th>tokens before</th><th>tokens after</th><th>token share before</th>"
            f"<th>token share after</th><th>kept (tokens)</th><th>mean score</th></tr>{rows}</table></section>"
        )
    if reference is not None:
        sections.append(reference_section(reference, cfg.weak_reference_overlap))
    sections.append('<section id="examples"><h2>Examples</h2>' + "".join(
        f"<h3>{name}</h3>{_example_table(part)}" for name, part in _examples(frame, read_texts, cfg.n_examples, cfg.excerpt_chars).items()
    ) + "</section>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;"
             "vertical-align:top}pre{white-space:pre-wrap;margin:0;max-width:650px;font-size:12px}img{max-width:100%}")
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\">{GENERATOR}<title>refine report</title><style>{style}</style></head>"
            f"<body><h1>What difference sampling keeps ({html.escape(budget_text(selection))})</h1>{''.join(sections)}"
            f"<p><small>refine {manifest['refine_version']} · scores from {html.escape(manifest['created'])}</small></p>"
            "</body></html>")


def report(cfg: ReportConfig) -> dict:
    """Write the HTML report; return its path and the headline numbers."""
    import matplotlib

    matplotlib.use("Agg")
    validate(cfg)
    with claim_file(cfg.output, "report", GENERATOR, [cfg.scores, cfg.data]):
        frame, manifest, read_texts = scored_frame(cfg)
        reference = frame_diagnostics(frame, manifest, manifest["selection"]["alpha"])  # None for a token budget
        write_text(Path(cfg.output), render(frame, manifest, cfg, read_texts, reference))
    return {"output": cfg.output, "instances": len(frame), "kept": int(frame["kept"].sum()),
            "budget": budget_text(manifest["selection"]),
            "reference_diagnostics": reference}
