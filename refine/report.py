"""`refine report`: one self-contained HTML page showing what difference sampling keeps and drops."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
import pandas as pd

from refine import data as corpus
from refine.config import ReportConfig
from refine.errors import RefineError
from refine.output import claim_file, write_text
from refine.sample import open_scored_corpus, read_scores, select_top_fraction, selection_keys


# The mark of a page refine wrote: an existing --output without it is never replaced.
GENERATOR = '<meta name="generator" content="refine report">'


def validate(cfg: ReportConfig) -> None:
    cfg.check()  # every field and cross-field check is declared in refine.config


def scored_frame(cfg: ReportConfig) -> tuple[pd.DataFrame, dict]:
    """Scores with per-token NLLs, the kept flag at alpha, and the text (and group) of each instance."""
    scores, manifest = read_scores(Path(cfg.scores))
    frame = scores.select(["id", "n_tokens", "teacher_logprob", "ref_logprob", "score"]).to_pandas()
    ref_tokens = scores.column("ref_n_tokens").to_numpy() if "ref_n_tokens" in scores.column_names else frame["n_tokens"]
    frame["teacher_nll"] = -frame["teacher_logprob"] / frame["n_tokens"]
    frame["ref_nll"] = -frame["ref_logprob"] / ref_tokens
    kept = select_top_fraction(selection_keys(scores, "difference", 0), frame["id"].to_numpy(), cfg.alpha)
    frame["kept"] = False
    frame.loc[kept, "kept"] = True
    spec = manifest["data"]
    if manifest["settings"]["unit"] == "chunk":
        frame["text"] = scores.column(spec["text_column"]).to_pylist()
        if cfg.group_column:
            raise RefineError("--group-column needs document-level scores; chunks mix documents of several groups")
        return frame, manifest
    ds = open_scored_corpus(cfg.data or spec["source"], spec)
    if cfg.group_column and cfg.group_column not in ds.column_names:
        raise RefineError(f"corpus has no column {cfg.group_column!r}; pass --group-column with one of: {', '.join(ds.column_names)}")
    ids = corpus.document_ids(ds, spec["id_column"])
    row_of = {value: row for row, value in enumerate(ids)}
    rows = [row_of[i] for i in frame["id"].tolist()]
    columns = [spec["text_column"]] + ([cfg.group_column] if cfg.group_column else [])
    picked = ds.select_columns(columns).select(rows).to_pandas()
    frame["text"] = picked[spec["text_column"]].to_numpy()
    if cfg.group_column:
        frame["group"] = picked[cfg.group_column].astype(str).to_numpy()
    return frame, manifest


def _png(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return f'<img alt="" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def distribution_figure(frame: pd.DataFrame, threshold: float) -> str:
    import matplotlib.pyplot as plt

    figure, (hist, cdf) = plt.subplots(1, 2, figsize=(10, 3.6))
    hist.hist(frame["score"], bins=min(60, max(10, len(frame) // 5)), color="#4c72b0")
    hist.axvline(threshold, color="#c44e52", linestyle="--", label=f"cut {threshold:.3f}")
    hist.set_xlabel("score = log p_teacher − log p_ref per token (nats)")
    hist.set_ylabel("instances")
    hist.legend()
    ordered = np.sort(frame["score"].to_numpy())
    cdf.plot(ordered, np.arange(1, len(ordered) + 1) / len(ordered), color="#4c72b0")
    cdf.axvline(threshold, color="#c44e52", linestyle="--")
    cdf.set_xlabel("score")
    cdf.set_ylabel("fraction of instances ≤ score")
    return _png(figure)


def scatter_figure(frame: pd.DataFrame) -> str:
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 5))
    for kept, color, label in ((False, "#bbbbbb", "dropped"), (True, "#dd8452", "kept")):
        part = frame[frame["kept"] == kept]
        axis.scatter(part["teacher_nll"], part["ref_nll"], s=8, alpha=0.6, color=color, label=f"{label} ({len(part)})")
    low = float(min(frame["teacher_nll"].min(), frame["ref_nll"].min()))
    high = float(max(frame["teacher_nll"].max(), frame["ref_nll"].max()))
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
    kept.barh(y, table["kept_fraction"], color="#4c72b0")
    kept.set_yticks(y, table.index)
    kept.set_xlabel("fraction kept")
    kept.set_xlim(0, 1)
    return _png(figure)


def group_table(frame: pd.DataFrame) -> pd.DataFrame:
    grouped = frame.groupby("group")
    table = pd.DataFrame({"before": grouped.size(), "after": grouped["kept"].sum().astype(int),
                          "mean_score": grouped["score"].mean()})
    table["share_before"] = table["before"] / table["before"].sum()
    table["share_after"] = table["after"] / max(table["after"].sum(), 1)
    table["kept_fraction"] = table["after"] / table["before"]
    return table.sort_values("kept_fraction", ascending=False)


def _examples(frame: pd.DataFrame, n: int, chars: int) -> dict[str, pd.DataFrame]:
    ordered = frame.sort_values(["score", "id"], ascending=[False, True]).reset_index(drop=True)
    cut = int(ordered["kept"].sum())
    boundary = ordered.iloc[max(0, cut - (n + 1) // 2) : cut + n // 2]
    shorten = lambda text: text if len(text) <= chars else text[:chars] + " …"
    return {name: part.assign(text=part["text"].map(shorten)) for name, part in
            (("Top (highest score)", ordered.head(n)), ("Boundary (around the cut)", boundary),
             ("Bottom (lowest score)", ordered.tail(n)))}


def _example_table(part: pd.DataFrame) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(str(r.id))}</td><td>{r.score:.3f}</td><td>{r.teacher_nll:.2f}</td><td>{r.ref_nll:.2f}</td>"
        f"<td>{'kept' if r.kept else 'dropped'}</td><td><pre>{html.escape(r.text)}</pre></td></tr>"
        for r in part.itertuples()
    )
    return ("<table><tr><th>id</th><th>score</th><th>teacher NLL</th><th>ref NLL</th><th></th><th>text</th></tr>"
            f"{rows}</table>")


def render(frame: pd.DataFrame, manifest: dict, cfg: ReportConfig) -> str:
    kept = frame[frame["kept"]]
    threshold = float(kept["score"].min())
    quantiles = frame["score"].quantile([0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
    summary = [
        ("corpus", html.escape(str(manifest["data"]["source"]))),
        ("teacher", html.escape(str(manifest["teacher"]["id"]))),
        ("reference", html.escape(str(manifest["reference"]["id"]))),
        ("alpha", f"{cfg.alpha}"),
        ("instances", f"{len(frame):,} → {len(kept):,}"),
        ("tokens", f"{int(frame['n_tokens'].sum()):,} → {int(kept['n_tokens'].sum()):,}"),
        ("score threshold", f"{threshold:.4f}"),
        ("score quantiles", " · ".join(f"{int(q * 100)}%: {v:.3f}" for q, v in quantiles.items())),
        ("mean teacher / reference NLL per token", f"{frame['teacher_nll'].mean():.3f} / {frame['ref_nll'].mean():.3f}"),
    ]
    sections = [
        '<section id="summary"><h2>Summary</h2><table>'
        + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in summary) + "</table></section>",
        '<section id="distribution"><h2>Score distribution</h2><p>Instances right of the dashed line are kept.</p>'
        + distribution_figure(frame, threshold) + "</section>",
        '<section id="scatter"><h2>Teacher vs reference NLL</h2><p>Above the diagonal the teacher finds the text easier '
        "than the reference: hard, valuable text the small model has not learned. Both low: easy, common text. "
        "Both high: noise.</p>" + scatter_figure(frame) + "</section>",
    ]
    if cfg.group_column:
        table = group_table(frame)
        rows = "".join(
            f"<tr><td>{html.escape(str(r.Index))}</td><td>{r.before:,}</td><td>{r.after:,}</td><td>{r.share_before:.1%}</td>"
            f"<td>{r.share_after:.1%}</td><td>{r.kept_fraction:.0%}</td><td>{r.mean_score:.3f}</td></tr>"
            for r in table.itertuples()
        )
        sections.append(
            f'<section id="groups"><h2>By {html.escape(cfg.group_column)}</h2>' + group_figure(table)
            + "<table><tr><th>group</th><th>before</th><th>after</th><th>share before</th><th>share after</th>"
            f"<th>kept</th><th>mean score</th></tr>{rows}</table></section>"
        )
    sections.append('<section id="examples"><h2>Examples</h2>' + "".join(
        f"<h3>{name}</h3>{_example_table(part)}" for name, part in _examples(frame, cfg.n_examples, cfg.excerpt_chars).items()
    ) + "</section>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;"
             "vertical-align:top}pre{white-space:pre-wrap;margin:0;max-width:650px;font-size:12px}img{max-width:100%}")
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\">{GENERATOR}<title>refine report</title><style>{style}</style></head>"
            f"<body><h1>What difference sampling keeps (α = {cfg.alpha})</h1>{''.join(sections)}"
            f"<p><small>refine {manifest['refine_version']} · scores from {html.escape(manifest['created'])}</small></p>"
            "</body></html>")


def report(cfg: ReportConfig) -> dict:
    """Write the HTML report; return its path and the headline numbers."""
    import matplotlib

    matplotlib.use("Agg")
    validate(cfg)
    with claim_file(cfg.output, "report", GENERATOR, [cfg.scores, cfg.data]):
        frame, manifest = scored_frame(cfg)
        write_text(Path(cfg.output), render(frame, manifest, cfg))
    return {"output": cfg.output, "instances": len(frame), "kept": int(frame["kept"].sum())}
