"""Load models, tokenizers and configs from hub ids, local directories or .gguf files."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Optional

import torch

from refine import output
from refine.errors import RefineError

# Package data, so a wheel install keeps `--model-config qwen-200m`. A Traversable, not necessarily a Path.
PRESET_DIR = files("refine") / "presets"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


@dataclass(frozen=True)
class ModelSource:
    """Where `from_pretrained` should look: a hub id or directory, plus the GGUF file inside it if any."""

    path: str
    gguf_file: Optional[str] = None
    revision: Optional[str] = None

    @property
    def is_local(self) -> bool:
        return os.path.exists(self.path)


def resolve_model_source(ref: str, revision: Optional[str] = None, what: str = "model") -> ModelSource:
    path = Path(ref).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise RefineError(f"{what} {ref!r} is a file but not a .gguf file; give a model directory, a hub id or a .gguf file")
        return ModelSource(str(path.parent.resolve()), path.name)
    if path.is_dir():
        return ModelSource(str(path.resolve()))
    if ref.startswith((".", "/", "~")) or ref.endswith(".gguf") or ref.count("/") > 1:
        raise RefineError(f"{what} path {ref!r} does not exist; check the path or give a hub id like org/name")
    return ModelSource(ref, None, revision)


def _from_pretrained_error(ref: str, what: str, error: Exception) -> RefineError:
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return RefineError(
        f"could not load {what} {ref!r} ({message}); give a local directory, a .gguf file or a reachable hub id"
    )


def load_tokenizer(ref: str, revision: Optional[str] = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    source = resolve_model_source(ref, revision, "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source.path, gguf_file=source.gguf_file, revision=source.revision, trust_remote_code=trust_remote_code
        )
    except RefineError:
        raise
    except Exception as e:
        raise _from_pretrained_error(ref, "tokenizer", e) from None
    # A model directory without tokenizer files gives transformers' empty tokenizer (a vocabulary of one or none).
    if len(tokenizer) < 2:
        raise RefineError(f"{ref!r} holds no tokenizer (no tokenizer files were found); save the tokenizer beside the "
                          "model (tokenizer.save_pretrained) or give one that has it")
    return tokenizer


def load_causal_lm(
    ref: str,
    revision: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device = torch.device("cpu"),
    trust_remote_code: bool = False,
):
    """Load a causal LM in eval mode on `device`."""
    from transformers import AutoModelForCausalLM

    source = resolve_model_source(ref, revision)
    try:
        with gguf_bar_follows_hub_setting():
            model = AutoModelForCausalLM.from_pretrained(
                source.path,
                gguf_file=source.gguf_file,
                revision=source.revision,
                dtype=dtype,
                trust_remote_code=trust_remote_code,
            )
    except Exception as e:
        raise _from_pretrained_error(ref, "model", e) from None
    return model.to(device).eval()


@contextlib.contextmanager
def gguf_bar_follows_hub_setting():
    """transformers' GGUF loader draws its de-quantisation bar with a bare `tqdm` that neither its own nor
    huggingface_hub's switch turns off; while a model loads, give it huggingface_hub's switch, which refine's
    CLI turns off unless --verbose (refine.cli.quiet_libraries)."""
    from huggingface_hub.utils import are_progress_bars_disabled

    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_loading
    except ImportError:  # a transformers that moved its GGUF loader: its bar is left as it is
        yield
        return
    bar = getattr(gguf_loading, "tqdm", None)
    if bar is not None and are_progress_bars_disabled():
        gguf_loading.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        if bar is not None:
            gguf_loading.tqdm = bar


def model_identity(ref: str, model=None, revision: Optional[str] = None) -> dict:
    """What a manifest records about a model: where it came from and which exact weights were used."""
    source = resolve_model_source(ref, revision)
    identity = {"id": ref, "path": source.path if source.is_local else None}
    if source.gguf_file:
        identity["gguf_file"] = source.gguf_file
        identity["sha256"] = file_sha256(Path(source.path) / source.gguf_file)
    elif source.is_local:
        identity["sha256"] = directory_weights_sha256(Path(source.path))
    else:
        identity["revision"] = revision
        identity["commit"] = getattr(getattr(model, "config", None), "_commit_hash", None)
    if model is not None:
        identity["model_type"] = model.config.model_type
        identity["n_params"] = sum(p.numel() for p in model.parameters())
    return identity


def file_sha256(path: Path) -> str:
    """SHA-256 of a weight file, computed once per (file, size, mtime) in a process: big teachers are hashed often."""
    stat = Path(path).stat()
    return _cached_sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    return output.file_sha256(Path(path))


def check_distinct(teacher: str, teacher_revision: Optional[str], reference: str, reference_revision: Optional[str]) -> None:
    """Refuse a reference that is the teacher itself: every score would be 0."""
    a, b = resolve_model_source(teacher, teacher_revision, "teacher"), resolve_model_source(reference, reference_revision, "reference")
    same = (a.path, a.gguf_file, a.revision) == (b.path, b.gguf_file, b.revision)
    if not same and a.is_local and b.is_local:
        digests = {model_identity(ref, None, rev).get("sha256") for ref, rev in ((teacher, teacher_revision), (reference, reference_revision))}
        same = len(digests) == 1 and digests != {hashlib.sha256().hexdigest()}  # not two directories without weights
    if same:
        raise RefineError(f"teacher {teacher!r} and reference {reference!r} are the same model, so every score would be 0; "
                          "give a small reference trained on a random split of the corpus (refine pretrain)")


def directory_weights_sha256(path: Path) -> str:
    """One hash over every weight file and config.json of a model directory (sorted by name)."""
    digest = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file() and (f.suffix in WEIGHT_SUFFIXES or f.name == "config.json"):
            digest.update(f.name.encode())
            digest.update(file_sha256(f).encode())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the vocabulary, special tokens and the ids of a probe text: equal means same tokenization."""
    probe = "Hello, world! 3.14 naïve 東京 \n\tdef f(x): return x**2  # ok"
    state = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": [tokenizer.bos_token_id, tokenizer.eos_token_id],
        "probe": tokenizer(probe, add_special_tokens=False)["input_ids"],
    }
    return hashlib.sha256(json.dumps(state, ensure_ascii=False).encode()).hexdigest()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RefineError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RefineError(f"device {name!r} asked for but CUDA is not available; use --device cpu")
    return device


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """bf16 on CUDA, fp32 on CPU (bf16 matmul on CPU is hundreds of times slower)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise RefineError(f"unknown dtype {name!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def list_presets() -> list[str]:
    """Names of the model presets shipped in refine/presets (each a `<name>.json`)."""
    return sorted(p.name.removesuffix(".json") for p in PRESET_DIR.iterdir() if p.name.endswith(".json"))


def load_model_config(ref: str, trust_remote_code: bool = False):
    """A `transformers` config from a preset name, a config.json, a model directory or a hub id."""
    from transformers import AutoConfig

    path = Path(ref).expanduser()
    if ref in list_presets():  # a preset name wins over a local file of the same name
        text = (PRESET_DIR / f"{ref}.json").read_text()
    elif path.is_file():
        text = path.read_text()
    else:
        text = None
    if text is not None:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise RefineError(f"model config {ref!r} is not valid JSON ({e}); fix the file") from None
        model_type = values.pop("model_type", None)
        if model_type is None:
            raise RefineError(f"model config {ref!r} has no `model_type`; add one (e.g. \"llama\")")
        try:
            return AutoConfig.for_model(model_type, **values)
        except ValueError as e:
            raise RefineError(f"model config {ref!r}: {e}") from None
    if path.is_dir() or ref.startswith((".", "/", "~")) or ref.endswith(".json"):
        if not (path / "config.json").is_file():
            raise RefineError(
                f"model config {ref!r} not found; give a preset ({', '.join(list_presets())}), a config.json, "
                "a model directory or a hub id"
            )
    try:
        return AutoConfig.from_pretrained(str(path) if path.is_dir() else ref, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise RefineError(
            f"could not load model config {ref!r} ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}); "
            f"give a preset ({', '.join(list_presets())}), a config.json, a model directory or a reachable hub id"
        ) from None


def max_positions(config) -> Optional[int]:
    """Longest sequence the architecture accepts, or None where it has no limit (e.g. Mamba)."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    return None


def start_token_id(tokenizer, ref: str) -> int:
    """The token every scored sequence starts from (BOS, else EOS), as unscored context."""
    start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start_id is None:
        raise RefineError(f"tokenizer of {ref!r} has neither a BOS nor an EOS token; refine needs one of them")
    return start_id
