"""Proxy scoring (MiniPLM_prx): a small model predicts the difference score of the documents not scored exactly."""

import json
import random

import datasets
import numpy as np
import pytest

from refine.config import SampleConfig, ScoreConfig
from refine.proxy import proxy_score, top_overlap
from refine.sample import sample


def mixed_corpus(path, n=240):
    """Documents of three kinds with different token statistics, so the difference score has structure to learn."""
    rng = random.Random(0)
    words = ["model", "token", "teacher", "student", "data", "loss", "the", "of", "and", "score"]
    rows = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            text = " ".join(rng.choice(words) for _ in range(rng.randint(20, 60)))
        elif kind == 1:
            text = "".join(rng.choice("0123456789+-*/=()") for _ in range(rng.randint(40, 160)))
        else:
            text = "def f(x):\n" + "".join(f"    y{j} = x * {rng.randint(0, 99)}\n" for j in range(rng.randint(2, 8)))
        rows.append({"text": text, "kind": kind})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_top_overlap():
    exact = np.arange(10.0)
    assert top_overlap(exact, exact, 0.3) == 1.0
    assert top_overlap(-exact, exact, 0.3) == 0.0


@pytest.mark.slow
def test_proxy_predicts_the_top_alpha_set_far_better_than_chance(tmp_path, teacher_dir, reference_dir):
    corpus = mixed_corpus(tmp_path / "corpus.jsonl")
    out = tmp_path / "scores"
    manifest = proxy_score(ScoreConfig(data=str(corpus), teacher=str(teacher_dir), reference=str(reference_dir),
                                       output=str(out), max_length=64, proxy_fraction=0.4, proxy_epochs=8, proxy_lr=1e-3))
    proxy = manifest["proxy"]
    assert proxy["n_exact"] + proxy["n_predicted"] == 240 and proxy["n_exact"] == 96
    assert proxy["top_alpha_overlap"] >= proxy["random_overlap_expected"] + 0.2, proxy
    assert proxy["spearman"] > 0.5, proxy
    # FLOPs: teacher + reference over every token, against the exact share + proxy training and one window each.
    # (Here teacher, reference and proxy are all tiny, so the proxy does not pay; with a 1.8B teacher it does.)
    teacher_params, ref_params = manifest["teacher"]["n_params"], manifest["reference"]["n_params"]
    assert proxy["flops_all_exact"] == 2 * (teacher_params + ref_params) * manifest["n_tokens"]
    assert proxy["flops_saved_fraction"] == pytest.approx(1 - proxy["flops_spent"] / proxy["flops_all_exact"])
    rows = datasets.load_dataset(str(out), split="train")
    assert sum(rows["exact"]) == 96
    assert all(lp is None for lp, exact in zip(rows["teacher_logprob"], rows["exact"]) if not exact)
    # the refined set is drawn from exact and predicted rows alike
    refined = sample(SampleConfig(scores=str(out), output=str(tmp_path / "refined"), alpha=0.5))
    assert refined["instances_after"] == 120
