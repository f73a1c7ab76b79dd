"""Dataset cards (README.md with YAML front matter) generated from refine's manifests.

The front matter's `configs` entry is what lets `datasets.load_dataset(folder_or_repo)` find the
Parquet shards, locally and on the Hub alike.
"""

from __future__ import annotations

from pathlib import Path

import yaml

SIZE_CATEGORIES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]


def size_category(n: int) -> str:
    return next((name for limit, name in SIZE_CATEGORIES if n < limit), "n>1B")


def front_matter(data_pattern: str, n_rows: int, license: str | None = None, source: str | None = None) -> str:
    meta = {
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": data_pattern}]}],
        "size_categories": [size_category(n_rows)],
        "tags": ["refine", "miniplm", "difference-sampling"],
    }
    if license:
        meta["license"] = license
    if source and _is_hub_name(source):
        meta["source_datasets"] = [source]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _is_hub_name(source: str) -> bool:
    return not Path(source).expanduser().exists() and "://" not in source and source.count("/") <= 1


def public_name(ref: str) -> str:
    """How a card names a model or corpus: hub ids and relative names as given, a local absolute path by its
    last component only (cards are published; local paths are nobody else's business)."""
    text = str(ref)
    if text.startswith(("/", "~")) or (len(text) > 2 and text[1] == ":" and text[2] in "\\/"):
        return Path(text).name or text
    return text


def public_command(command: str) -> str:
    """The command as recorded, with every absolute path (also in --flag=/path) cut to its last component."""
    words = []
    for word in command.split(" "):
        flag, sep, value = word.partition("=") if word.startswith("--") else ("", "", word)
        words.append(f"{flag}{sep}{public_name(value)}" if value else word)
    return " ".join(words)


def _model_line(model: dict) -> str:
    where = model.get("sha256") and f"sha256 `{model['sha256'][:16]}…`" or model.get("commit") and f"commit `{model['commit']}`" or "revision unknown"
    size = f", {model['n_params'] / 1e6:.1f}M params" if model.get("n_params") else ""
    quantised = f", quantised GGUF `{model['gguf_file']}`" if model.get("gguf_file") else ""
    return f"`{public_name(model['id'])}` ({model.get('model_type', '?')}{size}{quantised}; {where})"


def scores_card(manifest: dict, data_pattern: str) -> str:
    data = manifest["data"]
    return (
        front_matter(data_pattern, manifest["n_instances"], data.get("license"), data["source"])
        + f"\n# Scores of `{public_name(data['source'])}` by refine\n\n"
        + "Per-instance log-probabilities under a teacher and a reference LM (MiniPLM difference sampling). "
        + "Columns: `id, n_tokens, teacher_logprob, ref_logprob, score` (and, for documents, `n_bytes`), with "
        + ("`score = (teacher_logprob - ref_logprob) / n_bytes`: each model read its own tokenization, "
           "`n_tokens` and `ref_n_tokens` are the teacher's and the reference's token counts (natural log).\n\n"
           if manifest.get("normalize") == "bytes" else "`score = (teacher_logprob - ref_logprob) / n_tokens` (natural log).\n\n")
        + f"- teacher: {_model_line(manifest['teacher'])}\n- reference: {_model_line(manifest['reference'])}\n"
        + f"- instances: {manifest['n_instances']:,} ({manifest['settings']['unit']}s), tokens: {manifest['n_tokens']:,}\n"
        + f"- command: `{public_command(manifest['command'])}`\n- refine {manifest['refine_version']}, {manifest['created']}\n"
    )


def budget_text(manifest: dict) -> str:
    """The budget a sample kept, short: `alpha=0.5`, `tokens=12000` or `token-fraction=0.3`, as the flags spell it."""
    if manifest.get("token_fraction") is not None:
        return f"token-fraction={manifest['token_fraction']}"
    if manifest.get("token_budget") is not None:
        return f"tokens={manifest['token_budget']}"
    return f"alpha={manifest['alpha']}"


def selection_lines(manifest: dict) -> list[str]:
    """What a sample kept and how, one phrase per setting: the budget, the temperature's draw, the balance."""
    if manifest.get("token_budget") is not None:
        fraction = f" ({100 * manifest['token_fraction']:.4g}% of the corpus's tokens)" if manifest.get("token_fraction") else ""
        lines = [f"the best-ranked instances holding at least {manifest['token_budget']:,} tokens{fraction}"]
    else:
        lines = [f"the top {manifest['alpha']:.0%} of instances (α = {manifest['alpha']})"]
    if manifest.get("temperature"):
        lines.append(f"drawn without replacement with probability ∝ exp(key / {manifest['temperature']}) "
                     f"(Gumbel top-k, seed {manifest['seed']})")
    if manifest.get("balance"):
        shares = {"proportional": "each group's share of the corpus", "equal": "equal shares"}.get(
            manifest["balance"], f"the shares of `{public_name(manifest['balance'])}`")
        lines.append(f"within each group of `{manifest['group_column']}`, by {shares}")
    return lines


def _group_rows(groups: dict, limit: int = 50) -> str:
    rows = [f"| `{label}` | {g['share']:.1%} | {g['instances_before']:,} → {g['instances_after']:,} | "
            f"{g['tokens_before']:,} → {g['tokens_after']:,} |\n" for label, g in list(groups.items())[:limit]]
    more = f"\n{len(groups) - limit:,} more groups are listed in `manifest.json`.\n" if len(groups) > limit else ""
    return ("\n| group | budget share | instances | tokens |\n|---|---|---|---|\n" + "".join(rows) + more)


def refined_card(manifest: dict, data_pattern: str) -> str:
    """The card of a refined corpus: what it is, how to load it, and exactly how it was made."""
    scores = manifest["scores"]
    data = scores["data"]
    stats = manifest["score_stats"]
    method = {"difference": "difference sampling (MiniPLM): highest log p_teacher − log p_ref per token",
              "random": "uniform random selection (baseline)",
              "teacher": "lowest teacher NLL per token (perplexity filtering baseline)",
              "reference": "lowest reference NLL per token (baseline)"}[manifest["method"]]
    threshold = f"{manifest['threshold']:.4f}" if manifest["threshold"] is not None else "– (no single cut)"
    selection = selection_lines(manifest)
    return (
        front_matter(data_pattern, manifest["instances_after"], data.get("license"), data["source"])
        + f"\n# `{public_name(data['source'])}` refined by {manifest['method']} sampling, {budget_text(manifest)}\n\n"
        + f"{selection[0][0].upper() + selection[0][1:]} of `{public_name(data['source'])}` ({scores['settings']['unit']}s) "
        + f"selected by {method}{''.join(', ' + line for line in selection[1:])}, "
        + "made with refine. Original columns are kept, in corpus order, with `id` and the "
        + "score columns `n_tokens, teacher_logprob, ref_logprob, score` beside them.\n\n"
        + "```python\nimport datasets\nds = datasets.load_dataset(\"THIS_REPO_OR_FOLDER\", split=\"train\")\n```\n\n"
        + "## Provenance\n\n"
        + "| | |\n|---|---|\n"
        + f"| source | `{public_name(data['source'])}` (split `{data['split']}`, text column `{data['text_column']}`, "
        + f"fingerprint `{data['fingerprint'][:24]}…`) |\n"
        + f"| teacher | {_model_line(scores['teacher'])} |\n"
        + f"| reference | {_model_line(scores['reference'])} |\n"
        + f"| method | {method}; {'; '.join(selection)}"
        + (f", seed {manifest['seed']}" if manifest["seed"] is not None and not manifest.get("temperature") else "") + " |\n"
        + f"| instances | {manifest['instances_before']:,} → {manifest['instances_after']:,} |\n"
        + f"| tokens | {manifest['tokens_before']:,} → {manifest['tokens_after']:,} |\n"
        + f"| score threshold | {threshold} |\n"
        + f"| score quantiles (all instances) | min {stats['q00']:.3f}, 10% {stats['q10']:.3f}, 25% {stats['q25']:.3f}, "
        + f"median {stats['q50']:.3f}, 75% {stats['q75']:.3f}, 90% {stats['q90']:.3f}, max {stats['q100']:.3f}; "
        + f"mean {stats['mean']:.3f} ± {stats['std']:.3f} |\n"
        + f"| scoring | unit `{scores['settings']['unit']}`, max length {scores['settings']['max_length']} tokens, "
        + f"{scores['n_tokens']:,} tokens scored; BOS as unscored context, no EOS |\n"
        + f"| refine | {manifest['refine_version']}, {manifest['created']} |\n"
        + (_group_rows(manifest["groups"]) if manifest.get("groups") else "")
        + f"\nCommands:\n\n```\n{public_command(scores['command'])}\n{public_command(manifest['command'])}\n```\n"
    )
