import dataclasses
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import small_tokenizer
from refine.config import DistillCacheConfig, EvalConfig, PretrainConfig, SampleConfig, ScoreConfig, load_config
from refine.models import list_presets, load_model_config
from refine.pretrain import build_model, student_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
CLASS_BY_COMMAND = {"score": ScoreConfig, "sample": SampleConfig, "pretrain": PretrainConfig,
                    "distill-cache": DistillCacheConfig, "eval": EvalConfig}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_loads_and_opens_with_its_command(path):
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# refine ") and f"--config configs/{path.name}" in first_line
    command = first_line.split()[2]
    cls = CLASS_BY_COMMAND[command]
    # the opening command may pass required values on the command line (e.g. the teacher's local path)
    filled = {f.name: "given" for f in dataclasses.fields(cls) if f.metadata.get("required")}
    config = load_config(cls, str(path), {k: v for k, v in filled.items() if f"--{k}" in first_line})
    assert isinstance(config, cls)


def test_presets_include_the_paper_students_and_tiny_ones():
    assert {"qwen-104m", "qwen-200m", "qwen-500m", "qwen-1.2b", "llama-200m", "mamba-130m",
            "tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-mamba"} <= set(list_presets())


@pytest.mark.parametrize("name, millions", [("qwen-104m", 104), ("qwen-200m", 200), ("qwen-500m", 500), ("qwen-1.2b", 1200),
                                            ("llama-200m", 200), ("mamba-130m", 130)])
def test_paper_presets_have_their_named_size(name, millions):
    config = load_model_config(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    assert abs(n_params / 1e6 - millions) / millions < 0.1, n_params


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-mamba"])
def test_tiny_presets_run_a_training_step(name):
    tokenizer = small_tokenizer()
    cfg = PretrainConfig(data="x", model_config=name, tokenizer="x", output="x", seq_len=32, max_steps=1)
    model = build_model(cfg, student_config(cfg, tokenizer))
    batch = torch.randint(0, len(tokenizer), (2, 32))
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    assert torch.isfinite(loss)
