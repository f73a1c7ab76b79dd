"""Tiny real models, tokenizers and corpora, built offline in-process."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

# Token files built by `refine pretrain` go to a throwaway cache, not the user's ~/.cache (subprocesses inherit it).
os.environ["REFINE_CACHE"] = tempfile.mkdtemp(prefix="refine-test-cache-")

TINY = {
    "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512),
    "qwen2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, use_sliding_window=False),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=512),
    "mamba": dict(hidden_size=32, num_hidden_layers=2, state_size=4, expand=2, conv_kernel=4),
}


def small_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in-process on the json module's source: offline, deterministic, any text encodes."""
    import inspect
    import json as json_module

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|bos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    bpe.train_from_iterator([inspect.getsource(json_module)] * 2, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|bos|>")


def tiny_model(model_type: str, tokenizer, seed: int = 0):
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                                  bos_token_id=tokenizer.bos_token_id, **TINY[model_type])
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def save_tiny_model(directory: Path, model_type: str, seed: int = 0) -> Path:
    tokenizer = small_tokenizer()
    model = tiny_model(model_type, tokenizer, seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("teacher"), "llama", seed=1)


@pytest.fixture(scope="session")
def reference_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("reference"), "qwen2", seed=2)


CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "   ",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore. " * 3,
    "x",
    "Data refining keeps hard, valuable text and drops noise: zq9#kx@@!!vv",
    "",
    "Short one.",
    "A longer document about language models, which assign probabilities to sequences of tokens. " * 2,
    "Ünïcödé tëxt — with dashes and 東京.",
]


@pytest.fixture
def corpus_file(tmp_path) -> Path:
    path = tmp_path / "corpus.jsonl"
    with open(path, "w") as f:
        for i, text in enumerate(CORPUS):
            f.write(json.dumps({"text": text, "source": "even" if i % 2 == 0 else "odd"}) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, teacher_dir, reference_dir):
    """A scored and refined (alpha 0.5) 30-document corpus with a `domain` column: root/{corpus.jsonl,scores,out}."""
    from refine.config import SampleConfig, ScoreConfig
    from refine.sample import sample
    from refine.score import score

    root = tmp_path_factory.mktemp("tiny_run")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(
        json.dumps({"text": f"Document {i}: " + "word " * (5 + i % 7), "domain": f"d{i % 3}"}) + "\n" for i in range(30)
    ))
    score(ScoreConfig(data=str(corpus), teacher=str(teacher_dir), reference=str(reference_dir),
                      output=str(root / "scores"), max_length=16))
    sample(SampleConfig(scores=str(root / "scores"), output=str(root / "out"), alpha=0.5, shard_size_mb=1))
    return root


def reference_loss(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The straightforward computation the lean loss must equal: full logits, log-softmax, mean NLL."""
    logits = model(input_ids=input_ids).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))


class SimulatedCrash(Exception):
    pass


def pretrain_until_crash(cfg, monkeypatch, after_step: int) -> None:
    """Run `refine pretrain` and crash it right after the first checkpoint at or past `after_step` is saved."""
    import refine.pretrain as stage

    save = stage.save_checkpoint

    def save_then_crash(output, loss_module, model, optimizer, scheduler, step, *args):
        save(output, loss_module, model, optimizer, scheduler, step, *args)
        if step >= after_step:
            raise SimulatedCrash(step)

    monkeypatch.setattr(stage, "save_checkpoint", save_then_crash)
    with pytest.raises(SimulatedCrash):
        stage.pretrain(cfg)
    monkeypatch.setattr(stage, "save_checkpoint", save)


@pytest.fixture
def s3_endpoint(monkeypatch):
    """A real S3 API (moto in server mode) on loopback, with a bucket `corpora`; s3fs (in this process and in
    subprocesses) and boto3 are pointed at it. Yields its endpoint URL."""
    import socket

    import boto3
    import fsspec
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "FSSPEC_S3_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})  # read from the env only at import
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="corpora")
    try:
        yield endpoint
    finally:
        server.stop()


@pytest.fixture
def hub_endpoint(tmp_path, monkeypatch):
    """The Hub stand-in (tests/hub_server.py) serving repos from tmp_path/'hub'/<owner>/<name>/<revision>/, with
    huggingface_hub pointed at it (HF_ENDPOINT for subprocesses; its constants for this process). Yields the stand-in."""
    from huggingface_hub import HfFileSystem, constants

    from hub_server import HubStandIn

    with HubStandIn(tmp_path / "hub") as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        HfFileSystem.clear_instance_cache()  # an instance made for another endpoint would be reused
        yield hub
        HfFileSystem.clear_instance_cache()
