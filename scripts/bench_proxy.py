"""How good is proxy scoring (MiniPLM_prx) against exact scores of the same pool, and what does it save?

Runs `refine score --proxy-fraction F` on a pool that was already scored exactly (by default the pool of
`scripts/experiment.py`, real SmolLM2-135M teacher, trained reference) and compares the proxy's
predictions with the exact scores of every predicted document: Spearman correlation, overlap of the
top-alpha sets (chance = alpha), and FLOPs spent against scoring everything exactly.

    python scripts/experiment.py                 # once: builds experiment_output/ with exact scores
    python scripts/bench_proxy.py --fraction 0.1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="experiment_output", help="an experiment.py output folder")
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--output", default=None, help="default: WORKDIR/proxy_scores_F")
    args = parser.parse_args()

    import datasets
    from scipy.stats import spearmanr

    from refine.config import ScoreConfig
    from refine.proxy import proxy_score, top_overlap

    work = Path(args.workdir)
    exact_manifest = json.loads((work / "scores" / "manifest.json").read_text())
    teacher = exact_manifest["teacher"]["id"]
    output = Path(args.output or work / f"proxy_scores_{args.fraction}")
    manifest = proxy_score(ScoreConfig(data=str(work / "corpus" / "pool.jsonl"), teacher=teacher,
                                 reference=str(work / "reference"), output=str(output), max_length=512,
                                 proxy_fraction=args.fraction, proxy_alpha=args.alpha, proxy_epochs=args.epochs,
                                 proxy_lr=args.lr, overwrite=True))
    exact = datasets.load_dataset(str(work / "scores"), split="train").sort("id")
    proxied = datasets.load_dataset(str(output), split="train").sort("id")
    assert exact["id"] == proxied["id"]
    exact_score, proxy_score, is_exact = (np.array(exact["score"]), np.array(proxied["score"]),
                                          np.array(proxied["exact"]))
    predicted = ~is_exact
    rho = spearmanr(proxy_score[predicted], exact_score[predicted]).statistic
    p = manifest["proxy"]
    print(f"pool: {len(exact_score)} documents; exact share {args.fraction} ({p['n_exact']} documents), "
          f"{p['n_predicted']} predicted; teacher {exact_manifest['teacher']['n_params'] / 1e6:.0f}M, reference "
          f"{exact_manifest['reference']['n_params'] / 1e6:.1f}M params")
    print(f"proxy's own held-out check ({p['held_out']} exact documents): Spearman {p['spearman']:.3f}, "
          f"top-{args.alpha} overlap {p['top_alpha_overlap']:.2f}")
    print(f"against the exact scores of all {predicted.sum()} predicted documents: Spearman {rho:.3f}, "
          f"top-{args.alpha} overlap {top_overlap(proxy_score[predicted], exact_score[predicted], args.alpha):.2f} "
          f"(chance {args.alpha:.2f})")
    print(f"selection over the whole pool (exact rows exact, the rest predicted) vs all-exact: top-{args.alpha} "
          f"overlap {top_overlap(proxy_score, exact_score, args.alpha):.2f}")
    print(f"FLOPs: {p['flops_spent']:.3e} spent vs {p['flops_all_exact']:.3e} for exact scoring of everything "
          f"({p['flops_saved_fraction']:.0%} saved)")


if __name__ == "__main__":
    main()
