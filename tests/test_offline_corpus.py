from collections import Counter

from refine.offline_corpus import build_corpus


def test_mixed_corpus_is_deterministic_and_mixed():
    documents = build_corpus(100, seed=1)
    assert documents == build_corpus(100, seed=1)
    counts = Counter(d["source"] for d in documents)
    assert counts == {"docstring": 35, "code": 35, "boilerplate": 15, "noise": 15}
    assert all(d["text"].strip() and len(d["text"]) <= 1200 for d in documents)
