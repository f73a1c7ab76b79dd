"""Pretraining at scale: lean loss, token files, data parallel over processes (gloo), SIGKILL + resume, presets."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import TINY, pretrain_until_crash, reference_loss, small_tokenizer, tiny_model
from refine import packed
from refine.config import PretrainConfig
from refine.errors import RefineError
from refine.lm_loss import CausalLMLoss, linear_cross_entropy_sum
from refine.models import list_presets, load_model_config
from refine.pretrain import pretrain

TEXTS = [f"Doc {i}: " + " ".join(f"tok{(j * 7 + i) % 23}" for j in range(20 + i % 9)) for i in range(80)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    (root / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    small_tokenizer().save_pretrained(root / "tokenizer")
    (root / "llama.json").write_text(json.dumps({"model_type": "llama", **TINY["llama"]}))
    return root


def args(root, output, **overrides):
    values = dict(data=root / "train.jsonl", model_config=root / "llama.json", tokenizer=root / "tokenizer", output=output,
                  seq_len=32, micro_batch_size=4, max_steps=6, eval_every=3, save_every=2, log_every=1,
                  warmup_steps=1, eval_fraction=0.1, device="cpu", token_cache=root / "cache")
    values.update(overrides)
    return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}


def cli(values: dict) -> list[str]:
    words = [str(values.pop("data"))]
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        words += [flag] if value is True else [f"--no-{flag[2:]}"] if value is False else [flag, str(value)]
    return words


def metrics(directory):
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


def torchrun(nproc: int, values: dict, **kwargs) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "refine", "pretrain", *cli(dict(values))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def descendants(pid: int) -> list[int]:
    """Child processes, recursively (torchrun starts its workers in sessions of their own)."""
    try:
        children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return [d for c in children for d in (*descendants(c), c)]


# ---------------------------------------------------------------- the lean loss


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2", "mamba"])
def test_lean_loss_and_gradients_equal_the_full_logits_computation(model_type):
    tokenizer = small_tokenizer()
    model = tiny_model(model_type, tokenizer).train()
    ids = torch.randint(0, len(tokenizer), (3, 21))
    torch.manual_seed(5)  # GPT-2's dropout draws the same masks in both passes
    expected = reference_loss(model, ids)
    expected.backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    lean = CausalLMLoss(model, chunk_bytes=4 * len(tokenizer) * 7)  # 7 positions per chunk: several chunks
    assert lean.lean
    torch.manual_seed(5)
    loss = lean(ids)
    loss.backward()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_linear_cross_entropy_skips_masked_targets():
    torch.manual_seed(0)
    hidden = torch.randn(10, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    targets = torch.randint(0, 50, (10,))
    targets[[2, 7]] = -100
    got = linear_cross_entropy_sum(hidden, weight, targets, chunk_bytes=4 * 50 * 3)
    got.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    want = F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100, reduction="sum")
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grads[0], hidden.grad)
    torch.testing.assert_close(grads[1], weight.grad)
    assert grads[0][[2, 7]].abs().sum() == 0


# ---------------------------------------------------------------- token files and data order


def test_token_file_is_built_once_and_reused(setup, tmp_path):
    first = pretrain(PretrainConfig(**args(setup, tmp_path / "a", max_steps=2)))
    built = packed.TokenFile.open(Path(first["token_file"]))
    stamp = (built.directory / packed.TOKENS).stat().st_mtime_ns
    second = pretrain(PretrainConfig(**args(setup, tmp_path / "b", max_steps=2, seq_len=16, model_config="tiny-gpt2")))
    assert second["token_file"] == first["token_file"]  # another student, another --seq-len: same file
    assert (built.directory / packed.TOKENS).stat().st_mtime_ns == stamp
    tokenizer = small_tokenizer()
    assert int(built.tokens[-1]) == tokenizer.eos_token_id
    assert built.meta["n_documents"] == len(TEXTS) - 8  # 10% held out
    assert built.tokens.dtype == np.uint16


def test_data_order_is_a_pure_function_of_the_global_position():
    n = 13
    whole = packed.sample_order(0, 3 * n, n, seed=4)
    for epoch in range(3):
        assert sorted(whole[epoch * n : (epoch + 1) * n].tolist()) == list(range(n))
    pieces = np.concatenate([packed.sample_order(p, 5, n, seed=4) for p in range(0, 3 * n, 5)])[: 3 * n]
    assert np.array_equal(pieces, whole)


# ---------------------------------------------------------------- processes


@pytest.mark.slow
@pytest.mark.parametrize("sharding", [{}, {"fsdp": True}], ids=["ddp", "fsdp"])
def test_two_processes_give_the_loss_curve_of_one_with_the_same_global_batch(setup, tmp_path, sharding):
    single = tmp_path / "single"
    pretrain(PretrainConfig(**args(setup, single, micro_batch_size=4, grad_accum=2)))
    double = tmp_path / "double"
    run = torchrun(2, args(setup, double, micro_batch_size=2, grad_accum=2, **sharding))
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err[-3000:]
    assert "trained llama" in out
    one, two = metrics(single), metrics(double)
    assert [r["step"] for r in two] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], abs=1e-5)
    assert [r["eval_loss"] for r in two if "eval_loss" in r] == pytest.approx(
        [r["eval_loss"] for r in one if "eval_loss" in r], abs=1e-5)
    assert all(r["tokens"] == r["step"] * 8 * 32 for r in two)  # global tokens: 2 x 2 x 2 sequences
    a, b = load_file(single / "model.safetensors"), load_file(double / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0)
    assert AutoModelForCausalLM.from_pretrained(double).config.model_type == "llama"


def kill_mid_run(run: subprocess.Popen, output: Path) -> None:
    """SIGKILL torchrun and its workers once the first checkpoint is on disk, as a crash or the OOM killer would."""
    deadline = time.time() + 240
    while not (output / "checkpoint" / "trainer_state.pt").exists() and run.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    for pid in [*descendants(run.pid), run.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    run.communicate()
    assert not (output / "manifest.json").exists(), "the run finished before it could be killed"


STEPS = dict(max_steps=300, save_every=25, eval_every=150, log_every=25)


@pytest.mark.slow
def test_sigkill_then_resume_on_another_process_count_ends_where_an_uninterrupted_run_does(setup, tmp_path):
    straight = tmp_path / "straight"
    pretrain(PretrainConfig(**args(setup, straight, micro_batch_size=4, **STEPS)))
    killed = tmp_path / "killed"
    kill_mid_run(torchrun(2, args(setup, killed, micro_batch_size=2, **STEPS)), killed)
    # one process, micro-batch 4: the same global batch of 4 sequences
    pretrain(PretrainConfig(**args(setup, killed, micro_batch_size=4, resume=True, **STEPS)))
    a, b = load_file(straight / "model.safetensors"), load_file(killed / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-4, rtol=0)
    assert [r["step"] for r in metrics(killed)] == [r["step"] for r in metrics(straight)]


@pytest.mark.slow
def test_fsdp_run_killed_and_resumed_matches_an_uninterrupted_one(setup, tmp_path):
    straight = tmp_path / "straight"
    pretrain(PretrainConfig(**args(setup, straight, micro_batch_size=4, **STEPS)))
    killed = tmp_path / "killed"
    kill_mid_run(torchrun(2, args(setup, killed, micro_batch_size=2, fsdp=True, **STEPS)), killed)
    resumed = torchrun(2, args(setup, killed, micro_batch_size=2, fsdp=True, resume=True, **STEPS))
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    a, b = load_file(straight / "model.safetensors"), load_file(killed / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-4, rtol=0)


def test_resume_with_another_global_batch_is_refused(setup, tmp_path, monkeypatch):
    out = tmp_path / "out"
    pretrain_until_crash(PretrainConfig(**args(setup, out)), monkeypatch, after_step=2)
    with pytest.raises(RefineError, match="global batch"):
        pretrain(PretrainConfig(**args(setup, out, micro_batch_size=2, resume=True)))


# ---------------------------------------------------------------- presets


def tiny_width(config):
    """The preset's family and settings, at a width a CPU test can afford."""
    shrink = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "n_embd": 32, "n_layer": 2,
              "n_inner": 64, "state_size": 4, "time_step_rank": 4}
    for key, value in shrink.items():
        if hasattr(config, key) and getattr(config, key) is not None:
            setattr(config, key, value)
    heads = getattr(config, "num_attention_heads", None)
    if heads and config.model_type != "mamba":
        kv = getattr(config, "num_key_value_heads", heads)
        config.num_attention_heads = 4
        config.num_key_value_heads = 4 if kv == heads else 2
        if hasattr(config, "head_dim"):
            config.head_dim = 8
    if hasattr(config, "n_head"):
        config.n_head = 4
    config.vocab_size = 400
    return config


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_trains_a_step_at_tiny_width(name):
    config = tiny_width(load_model_config(name))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.randint(0, 400, (2, 16))
    loss = CausalLMLoss(model)(ids)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
