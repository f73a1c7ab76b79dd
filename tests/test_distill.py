"""Token-level KD: the loss against a direct computation, online teacher vs top-k cache, cache checks and resume."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY
from refine.config import DistillCacheConfig, PretrainConfig
from refine.distill import build_cache, open_cache
from refine.errors import RefineError
from refine.lm_loss import Teacher, distill_loss_from_logits, linear_cross_entropy_sum
from refine.pretrain import pretrain

TEXTS = [f"Doc {i}: " + " ".join(f"tok{(j * 5 + i) % 19}" for j in range(25 + i % 7)) for i in range(60)]


def direct_kd_loss(student_logits, teacher_logits, targets, weight, tau):
    """Independent formula: per position (1-w) CE + w tau^2 sum_v q_v (log q_v - log p_v), tempered; -100 masked."""
    keep = targets != -100
    ce = F.cross_entropy(student_logits, targets.clamp(min=0), reduction="none")
    kl = F.kl_div(F.log_softmax(student_logits / tau, -1), F.log_softmax(teacher_logits / tau, -1),
                  log_target=True, reduction="none").sum(-1)
    return (((1 - weight) * ce + weight * tau**2 * kl) * keep).sum()


@pytest.mark.parametrize("weight, tau", [(0.5, 1.0), (1.0, 2.0), (0.3, 0.7)])
def test_chunked_kd_loss_and_gradients_equal_the_direct_formula(weight, tau):
    torch.manual_seed(0)
    hidden = torch.randn(11, 6, requires_grad=True)
    head = torch.randn(40, 6, requires_grad=True)
    teacher_hidden, teacher_head = torch.randn(11, 5), torch.randn(40, 5)
    targets = torch.randint(0, 40, (11,))
    targets[[0, 9]] = -100  # padding: no loss, no gradient
    got = linear_cross_entropy_sum(hidden, head, targets, chunk_bytes=4 * 40 * 4,
                                   teacher=Teacher(hidden=teacher_hidden, head_weight=teacher_head), kd_weight=weight, tau=tau)
    got.backward()
    grads = hidden.grad.clone(), head.grad.clone()
    hidden.grad = head.grad = None
    want = direct_kd_loss(hidden @ head.T, teacher_hidden @ teacher_head.T, targets, weight, tau)
    want.backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], hidden.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads[1], head.grad, atol=1e-5, rtol=1e-4)
    assert grads[0][[0, 9]].abs().sum() == 0
    # the full-logits path (students without a plain head) computes the same
    logits_path = distill_loss_from_logits(hidden.detach() @ head.detach().T, targets,
                                           Teacher(logits=teacher_hidden @ teacher_head.T), weight, tau)
    torch.testing.assert_close(logits_path, want.detach(), atol=1e-5, rtol=1e-5)


def test_top_k_teacher_renormalises_over_the_kept_ids():
    torch.manual_seed(1)
    student, teacher_logits = torch.randn(7, 30), torch.randn(7, 30)
    targets = torch.randint(0, 30, (7,))
    log_q = torch.log_softmax(teacher_logits, -1)
    everything = log_q.topk(30, -1)
    full = distill_loss_from_logits(student, targets, Teacher(top_ids=everything.indices, top_logprobs=everything.values), 0.6, 1.5)
    torch.testing.assert_close(full, direct_kd_loss(student, teacher_logits, targets, 0.6, 1.5), atol=1e-5, rtol=1e-5)
    top = log_q.topk(5, -1)
    truncated = distill_loss_from_logits(student, targets, Teacher(top_ids=top.indices, top_logprobs=top.values), 1.0, 1.0)
    kept_q = torch.softmax(top.values, -1)  # renormalised over the 5 kept ids
    want = (kept_q * (kept_q.log() - torch.log_softmax(student, -1).gather(1, top.indices))).sum()
    torch.testing.assert_close(truncated, want, atol=1e-5, rtol=1e-5)


@pytest.fixture
def kd_setup(tmp_path, teacher_dir):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (tmp_path / "student.json").write_text(json.dumps({"model_type": "gpt2", **TINY["gpt2"], "resid_pdrop": 0.0,
                                                       "embd_pdrop": 0.0, "attn_pdrop": 0.0}))
    return tmp_path


def student_args(root, teacher_dir, output, **kw):
    values = dict(data=str(root / "train.jsonl"), model_config=str(root / "student.json"), tokenizer=str(teacher_dir),
                  output=str(root / output), seq_len=24, micro_batch_size=4, max_steps=5, eval_every=5, save_every=5,
                  log_every=1, warmup_steps=1, eval_fraction=0.1, device="cpu", token_cache=str(root / "tokens"))
    return PretrainConfig(**{**values, **kw})


def cache_args(root, teacher_dir, **kw):
    values = dict(data=str(root / "train.jsonl"), teacher=str(teacher_dir), output=str(root / "cache"), seq_len=24,
                  eval_fraction=0.1, token_cache=str(root / "tokens"), device="cpu", batch_size=3, shard_sequences=16)
    return DistillCacheConfig(**{**values, **kw})


def losses(directory):
    return [json.loads(line)["loss"] for line in (directory / "metrics.jsonl").read_text().splitlines()]


def test_full_vocabulary_cache_trains_exactly_like_the_online_teacher(kd_setup, teacher_dir):
    vocab = json.loads((teacher_dir / "config.json").read_text())["vocab_size"]
    meta = build_cache(cache_args(kd_setup, teacher_dir, top_k=vocab, logprob_dtype="float32"))
    assert meta["bytes_per_token"] == vocab * (2 + 4)
    online = pretrain(student_args(kd_setup, teacher_dir, "online", kd_teacher=str(teacher_dir), kd_weight=0.7,
                                   kd_temperature=2.0))
    cached = pretrain(student_args(kd_setup, teacher_dir, "cached", kd_cache=str(kd_setup / "cache"), kd_weight=0.7,
                                   kd_temperature=2.0))
    plain = pretrain(student_args(kd_setup, teacher_dir, "plain"))
    assert losses(kd_setup / "online") == pytest.approx(losses(kd_setup / "cached"), abs=1e-4)
    assert online["eval_loss"] == pytest.approx(cached["eval_loss"], abs=1e-4)
    assert losses(kd_setup / "online") != pytest.approx(losses(kd_setup / "plain"), abs=1e-3)  # KD changed training
    assert plain["token_file"] == online["token_file"]


def test_cache_resumes_and_refuses_other_packing(kd_setup, teacher_dir):
    first = build_cache(cache_args(kd_setup, teacher_dir, top_k=8))
    cache = kd_setup / "cache"
    assert first["n_shards"] >= 3
    saved = {p.name: np.load(p / "ids.npy") for p in sorted(cache.glob("shard-*"))}
    # a crash before the end: the last shard and the meta are gone; a rerun redoes only what is missing
    (cache / "manifest.json").unlink()
    shutil.rmtree(cache / "shard-000001")
    with pytest.raises(RefineError, match="unfinished"):
        open_cache(str(cache))
    build_cache(cache_args(kd_setup, teacher_dir, top_k=8))
    for name, ids in saved.items():
        assert np.array_equal(np.load(cache / name / "ids.npy"), ids)
    with pytest.raises(RefineError, match="other settings"):
        shutil.rmtree(cache / "shard-000000")
        (cache / "manifest.json").unlink()
        build_cache(cache_args(kd_setup, teacher_dir, top_k=4))
    build_cache(cache_args(kd_setup, teacher_dir, top_k=8))
    with pytest.raises(RefineError, match="seq_len"):
        pretrain(student_args(kd_setup, teacher_dir, "student", seq_len=16, kd_cache=str(cache)))


def test_four_tasks_on_two_workers_write_the_cache_of_one_process(kd_setup, teacher_dir):
    single = build_cache(cache_args(kd_setup, teacher_dir, top_k=8, output=str(kd_setup / "single")))
    tasks = build_cache(cache_args(kd_setup, teacher_dir, top_k=8, output=str(kd_setup / "tasks"), tasks=4, workers=2))
    assert single["n_shards"] >= 4 and tasks["executor"] == "local" and single["executor"] is None
    assert [(f["path"], f["sha256"]) for f in single["files"]] == [(f["path"], f["sha256"]) for f in tasks["files"]]
    assert tasks["teacher"] == single["teacher"]
    # a shard lost after the run is redone by its task alone; the manifest comes back the same
    shutil.rmtree(kd_setup / "tasks" / "shard-000002")
    (kd_setup / "tasks" / "manifest.json").unlink()
    again = build_cache(cache_args(kd_setup, teacher_dir, top_k=8, output=str(kd_setup / "tasks"), tasks=4, workers=2))
    assert again["files"] == tasks["files"]


def test_kd_teacher_with_another_tokenizer_is_refused(kd_setup, teacher_dir, tmp_path):
    from conftest import save_tiny_model, small_tokenizer

    other = tmp_path / "other_teacher"
    save_tiny_model(other, "llama")
    small_tokenizer(300).save_pretrained(other)  # a different vocabulary
    with pytest.raises(RefineError, match="tokenizes differently"):
        pretrain(student_args(kd_setup, teacher_dir, "student", kd_teacher=str(other)))
    with pytest.raises(RefineError, match="one of them"):
        pretrain(student_args(kd_setup, teacher_dir, "student", kd_teacher=str(teacher_dir), kd_cache="x"))
