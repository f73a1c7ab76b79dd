import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

import refine
from refine.errors import RefineError
from refine.models import (ModelSource, list_presets, load_model_config, max_positions, resolve_dtype, resolve_device,
                           resolve_model_source)


def test_hub_id_is_passed_through_with_its_revision():
    assert resolve_model_source("org/name", revision="v1") == ModelSource("org/name", None, "v1")


def test_directory_resolves_to_its_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_model_source("model") == ModelSource(str(tmp_path / "model"))


def test_gguf_file_resolves_to_its_directory_and_file_name(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"")
    assert resolve_model_source(str(tmp_path / "m.gguf")) == ModelSource(str(tmp_path), "m.gguf")


def test_the_gguf_loaders_bar_is_off_while_hub_bars_are(capsys):
    """The de-quantisation bar of transformers' GGUF loader follows huggingface_hub's switch while refine loads a model."""
    import transformers.modeling_gguf_pytorch_utils as gguf_loading
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    from refine.models import gguf_bar_follows_hub_setting

    was_disabled, original = are_progress_bars_disabled(), gguf_loading.tqdm
    try:
        for disabled in (True, False):
            disable_progress_bars() if disabled else enable_progress_bars()
            with gguf_bar_follows_hub_setting():
                for _ in gguf_loading.tqdm(range(3), desc="de-quantizing"):
                    pass
            assert ("de-quantizing" in capsys.readouterr().err) is not disabled
            assert gguf_loading.tqdm is original
    finally:
        disable_progress_bars() if was_disabled else enable_progress_bars()


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(RefineError, match="not a .gguf file"):
        resolve_model_source(str(tmp_path / "weights.bin"))


@pytest.mark.parametrize("ref", ["./missing", "/no/such/dir", "missing.gguf", "a/b/c"])
def test_a_missing_path_is_refused_not_sent_to_the_hub(ref):
    with pytest.raises(RefineError, match="does not exist; check the path"):
        resolve_model_source(ref, what="teacher")


def test_list_presets_finds_every_shipped_json():
    shipped = sorted(p.stem for p in (Path(refine.__file__).parent / "presets").glob("*.json"))
    assert list_presets() == shipped
    assert {"tiny-llama", "qwen-200m"} <= set(shipped)


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_loads_as_a_config_of_its_model_type(name):
    values = json.loads((Path(refine.__file__).parent / "presets" / f"{name}.json").read_text())
    config = load_model_config(name)
    assert config.model_type == values["model_type"]
    assert config.vocab_size == values["vocab_size"]


def test_a_preset_name_wins_over_a_local_file_of_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-llama").write_text("not json")
    assert load_model_config("tiny-llama").model_type == "llama"


def test_config_json_file(tmp_path):
    path = tmp_path / "student.json"
    path.write_text(json.dumps({"model_type": "qwen2", "hidden_size": 48, "num_attention_heads": 4}))
    config = load_model_config(str(path))
    assert (config.model_type, config.hidden_size) == ("qwen2", 48)


def test_model_directory(tmp_path):
    AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=4).save_pretrained(tmp_path)
    config = load_model_config(str(tmp_path))
    assert (config.model_type, config.n_embd) == ("gpt2", 32)


@pytest.mark.parametrize("text, message", [
    ('{"model_type": "llama",', "is not valid JSON"),
    ('{"hidden_size": 32}', "has no `model_type`; add one"),
    ('{"model_type": "no-such-architecture"}', "no-such-architecture"),
])
def test_bad_config_json_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(RefineError, match=message) as error:
        load_model_config(str(path))
    assert len(error.value.problems) == 1


@pytest.mark.parametrize("ref", ["./nope.json", "/no/such/dir", "empty-dir"])
def test_a_missing_config_names_the_presets(tmp_path, monkeypatch, ref):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty-dir").mkdir()
    with pytest.raises(RefineError, match="not found; give a preset .*tiny-llama.*, a config.json") as error:
        load_model_config(ref)
    assert len(error.value.problems) == 1


@pytest.mark.parametrize("model_type, values, expected", [
    ("llama", dict(max_position_embeddings=128), 128),
    ("gpt2", dict(n_positions=64), 64),
    ("mamba", dict(), None),
])
def test_max_positions(model_type, values, expected):
    assert max_positions(AutoConfig.for_model(model_type, **values)) == expected


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(RefineError, match="unknown device 'gpu'; use auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_without_cuda_says_use_cpu():
    with pytest.raises(RefineError, match="CUDA is not available; use --device cpu"):
        resolve_device("cuda")


def test_resolve_dtype():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    with pytest.raises(RefineError, match="unknown dtype 'fp8'; use auto, float32, bfloat16, float16"):
        resolve_dtype("fp8", torch.device("cpu"))


def test_a_model_directory_without_tokenizer_files_is_refused(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from refine.models import load_tokenizer

    # Qwen2's tokenizer class builds an empty vocabulary from no files instead of failing
    Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "model")
    with pytest.raises(RefineError, match="holds no tokenizer"):
        load_tokenizer(str(tmp_path / "model"))
