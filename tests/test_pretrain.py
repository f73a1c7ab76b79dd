import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import TINY, pretrain_until_crash, small_tokenizer
from refine.config import PretrainConfig
from refine.errors import RefineError
from refine.packed import pack, sample_order, split_documents
from refine.pretrain import pretrain

TEXTS = [f"Document {i}: " + " ".join(f"word{j * i % 17}" for j in range(30 + i)) for i in range(40)]


@pytest.fixture
def train_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    small_tokenizer().save_pretrained(directory)
    return directory


def tiny_config_file(directory, model_type):
    path = directory / f"{model_type}.json"
    path.write_text(json.dumps({"model_type": model_type, **TINY[model_type]}))
    return path


def config(train_file, tokenizer_dir, model_config, output, **kwargs):
    values = dict(data=str(train_file), model_config=str(model_config), tokenizer=str(tokenizer_dir), output=str(output),
                  seq_len=32, micro_batch_size=2, max_steps=4, eval_every=2, save_every=2, log_every=1, warmup_steps=1,
                  eval_fraction=0.1)
    return PretrainConfig(**{**values, **kwargs})


def test_pack_joins_with_eos_and_drops_the_tail():
    sequences = pack([[1, 2, 3], [4, 5], [6]], eos_id=0, seq_len=3)
    assert [s.tolist() for s in sequences] == [[1, 2, 3], [0, 4, 5], [0, 6, 0]]
    assert [s.tolist() for s in pack([[1, 2, 3, 4]], 0, 3, keep_remainder=True)] == [[1, 2, 3], [4, 0]]


def test_data_order_is_a_seeded_permutation_per_epoch():
    first_epoch = sample_order(0, 10, 10, seed=3)
    assert sorted(first_epoch.tolist()) == list(range(10))
    assert sample_order(4, 8, 10, seed=3).tolist()[:6] == first_epoch[4:].tolist()
    assert not np.array_equal(sample_order(10, 10, 10, seed=3), first_epoch)
    train, held_out = split_documents(50, 0.1, seed=0)
    assert len(held_out) == 5 and not set(train) & set(held_out) and len(train) + len(held_out) == 50


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2", "mamba"])
def test_every_family_trains_and_saves_a_loadable_model(tmp_path, train_file, tokenizer_dir, model_type):
    out = tmp_path / "out"
    manifest = pretrain(config(train_file, tokenizer_dir, tiny_config_file(tmp_path, model_type), out))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == model_type
    assert AutoTokenizer.from_pretrained(out).get_vocab() == small_tokenizer().get_vocab()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert np.isfinite(manifest["eval_loss"]) and "eval_loss" in records[-1]
    assert records[-1]["loss"] < records[0]["loss"]


def test_resume_continues_the_same_run(tmp_path, train_file, tokenizer_dir, monkeypatch):
    model_config = tiny_config_file(tmp_path, "llama")
    straight = tmp_path / "straight"
    pretrain(config(train_file, tokenizer_dir, model_config, straight, max_steps=6, grad_accum=2))
    interrupted = tmp_path / "interrupted"
    pretrain_until_crash(config(train_file, tokenizer_dir, model_config, interrupted, max_steps=6, grad_accum=2),
                         monkeypatch, after_step=3)
    assert not (interrupted / "manifest.json").exists() and not (interrupted / "model.safetensors").exists()
    with pytest.raises(RefineError, match="--resume"):
        pretrain(config(train_file, tokenizer_dir, model_config, interrupted, max_steps=6, grad_accum=2))
    pretrain(config(train_file, tokenizer_dir, model_config, interrupted, max_steps=6, grad_accum=2, resume=True))
    a, b = load_file(straight / "model.safetensors"), load_file(interrupted / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)
    log = lambda d: [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log(interrupted)] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in log(interrupted)] == pytest.approx([r["loss"] for r in log(straight)], abs=1e-6)


def test_a_run_killed_in_its_first_checkpoint_can_be_rerun(tmp_path, train_file, tokenizer_dir, monkeypatch):
    """Killed while writing its first checkpoint: neither a plain rerun nor --resume may send the user in circles."""
    model_config = tiny_config_file(tmp_path, "llama")
    for resume in (False, True):
        out = tmp_path / f"out-{resume}"
        pretrain_until_crash(config(train_file, tokenizer_dir, model_config, out, max_steps=4), monkeypatch, 2)
        (out / "checkpoint").rename(out / "checkpoint.tmp")  # as if killed before the staged checkpoint was swapped in
        (out / "checkpoint.tmp" / "trainer_state.pt").unlink()
        manifest = pretrain(config(train_file, tokenizer_dir, model_config, out, max_steps=4, resume=resume))
        assert manifest["steps"] == 4 and (out / "model.safetensors").exists()


def test_foreign_files_in_a_pretrain_output_are_never_deleted(tmp_path, train_file, tokenizer_dir):
    model_config = tiny_config_file(tmp_path, "llama")
    out = tmp_path / "out"
    pretrain(config(train_file, tokenizer_dir, model_config, out, max_steps=2))
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RefineError, match="notes.txt"):
        pretrain(config(train_file, tokenizer_dir, model_config, out, max_steps=2, overwrite=True))
    (out / "notes.txt").unlink()
    assert pretrain(config(train_file, tokenizer_dir, model_config, out, max_steps=2, overwrite=True))["steps"] == 2


def test_resume_with_other_settings_is_refused(tmp_path, train_file, tokenizer_dir, monkeypatch):
    model_config = tiny_config_file(tmp_path, "llama")
    out = tmp_path / "out"
    pretrain_until_crash(config(train_file, tokenizer_dir, model_config, out, max_steps=6), monkeypatch, 2)
    with pytest.raises(RefineError, match="lr"):
        pretrain(config(train_file, tokenizer_dir, model_config, out, max_steps=6, lr=1e-3, resume=True))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(max_steps=0), "positive"),
        (dict(max_steps=None), "--max-steps or --max-tokens"),
        (dict(seq_len=4096), "positions"),
        (dict(seq_len=100000, model_config="MAMBA"), "fewer tokens"),
        (dict(model_config="no/such/dir/config.json"), "not found"),
    ],
)
def test_bad_budgets_and_configs_are_refused(tmp_path, train_file, tokenizer_dir, overrides, message):
    overrides = dict(overrides)
    model_config = overrides.pop("model_config", str(tiny_config_file(tmp_path, "llama")))
    if model_config == "MAMBA":  # no position limit, so a long --seq-len runs into the data size instead
        model_config = str(tiny_config_file(tmp_path, "mamba"))
    with pytest.raises(RefineError, match=message):
        pretrain(config(train_file, tokenizer_dir, model_config, tmp_path / "out", **overrides))
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_resume_after_a_half_written_metrics_line(tmp_path, train_file, tokenizer_dir, monkeypatch):
    model_config = tiny_config_file(tmp_path, "llama")
    out = tmp_path / "out"
    pretrain_until_crash(config(train_file, tokenizer_dir, model_config, out, max_steps=4), monkeypatch, 2)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # killed in the middle of a line
    manifest = pretrain(config(train_file, tokenizer_dir, model_config, out, max_steps=4, resume=True))
    assert manifest["steps"] == 4
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_resume_from_the_final_checkpoint_still_reports_a_held_out_loss(tmp_path, train_file, tokenizer_dir, monkeypatch):
    model_config = tiny_config_file(tmp_path, "llama")
    out = tmp_path / "out"
    pretrain_until_crash(config(train_file, tokenizer_dir, model_config, out, max_steps=4), monkeypatch, 4)
    manifest = pretrain(config(train_file, tokenizer_dir, model_config, out, max_steps=4, resume=True))
    assert manifest["steps"] == 4 and manifest["eval_loss"] > 0
