"""Peak memory and wall time of `refine sample`, `report`, `push` and packing at two corpus sizes; the speed-up of
2 local workers over 1 for packing and for scoring.

    python scripts/bench_scale.py                      # about 50 MB and 500 MB of text, in a temp folder
    python scripts/bench_scale.py --sizes-mb 5 50      # a quick run

Each size gets a corpus folder of Parquet files (about 50 MB of text each) built from the standard
library's text (refine.offline_corpus), documents numbered so that each one is distinct. Its scores come
from a stand-in for the two models, not from models: `n_tokens` is the UTF-8 length / 4 and both
log-probabilities are deterministic functions of the text's CRC-32, written with refine's own writers
(claim, score_table, write_parquet, scores_card, write_manifest) so that sample and report accept them.
The corpus is loaded once while building, so the stages below find datasets' Arrow cache warm.

Packing is `refine pretrain --tokenize-workers 1 --max-steps 1` of a tiny student with a byte-level BPE of
4,096 tokens trained in-process (tokenising the corpus into a fresh token cache, then one step); the time
the token file took to build is also read from its meta.json. The speed-ups run the same command with
1 and 2 workers: packing the smaller corpus (`--tokenize-workers`), `refine score` of --score-docs
documents with a tiny random teacher and reference built in-process (`--tasks 2 --workers 2` against one
process), and `refine sample` of the larger corpus (`--tasks 2 --workers 2` against one process). Other work
on the machine lowers them: the load average is printed beside them.

Each stage runs refine's CLI in its own process; its peak RSS is that process's VmHWM, read from
/proc/self/status as it exits (Linux only; with 2 workers the workers' own memory is not in it). Targets:
peak RSS ratio (largest / smallest size) <= 1.25, wall time ratio <= 11, 2 workers >= 1.6x one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from refine import data as corpus
from refine.card import scores_card
from refine.offline_corpus import build_corpus
from refine.output import DATA_DIR, claim, content_tag, run_info, write_manifest, write_parquet, write_text
from refine.score import score_table

FILE_TEXT_BYTES = 50 * 2**20  # text per corpus file
STAGES = ("sample", "report", "push", "pack", "pack-scaling", "score-scaling", "sample-scaling")
TINY_LLAMA = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024)
SCORE_SHARD_ROWS = 100_000


def build_corpus_folder(folder: Path, text_bytes: int) -> int:
    """Parquet files of numbered offline documents holding about `text_bytes` of text; returns the row count."""
    base = build_corpus(2000, seed=0)
    folder.mkdir(parents=True)
    rows, written, k, file_index = [], 0, 0, 0
    while written < text_bytes:
        document = base[k % len(base)]
        text = f"[{k}] {document['text']}"
        rows.append({"text": text, "source": document["source"]})
        written += len(text.encode())
        k += 1
        if written >= FILE_TEXT_BYTES * (file_index + 1) or written >= text_bytes:
            pq.write_table(pa.Table.from_pylist(rows), folder / f"part-{file_index:05d}.parquet")
            rows, file_index = [], file_index + 1
    return k


def stand_in_scores(texts: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n_tokens, teacher_logprob, ref_logprob): deterministic functions of the text, in place of two models."""
    n_bytes = np.asarray([len(t.encode()) for t in texts.to_pylist()], dtype=np.int64)
    crc = np.asarray([zlib.crc32(t.encode()) for t in texts.to_pylist()], dtype=np.float64) / 2**32
    n_tokens = np.maximum(n_bytes // 4, 1)
    teacher_lp = -n_tokens * (2.0 + crc)
    ref_lp = -n_tokens * (2.5 + np.sin(crc * 40.0) * 0.5)
    return n_tokens, teacher_lp, ref_lp


def write_scores(source: Path, output: Path) -> None:
    """A scores folder for `source` in the layout `refine score` writes, scored by the stand-in."""
    ds = corpus.load_corpus(str(source))
    files = corpus.corpus_files(str(source))
    run = {"settings": {"data": str(source), "unit": "document", "max_length": 1024, "stand_in": "crc32 of the text"},
           "data_fingerprint": corpus.corpus_fingerprint(ds, "text", None, files),
           "teacher": {"id": "stand-in teacher (crc32 of the text)"},
           "reference": {"id": "stand-in reference (crc32 of the text)"}, "normalize": "tokens"}
    with claim(output, "score", [str(source)], overwrite=True, run=run):
        tag = content_tag(run)
        paths, n_tokens_total = [], 0
        for first in range(0, len(ds), SCORE_SHARD_ROWS):
            last = min(first + SCORE_SHARD_ROWS, len(ds))
            texts = ds.with_format("arrow")[first:last]["text"]
            n_tokens, teacher_lp, ref_lp = stand_in_scores(texts)
            n_tokens_total += int(n_tokens.sum())
            paths.append(f"{DATA_DIR}/scores-{tag}-{first:012d}-{last:012d}.parquet")
            write_parquet(output / paths[-1], score_table(list(range(first, last)), n_tokens, teacher_lp, ref_lp,
                                                          pa.int64(), {"n_bytes": pa.array(n_tokens * 4)}))
        manifest = {"stage": "score", **run_info(), **run,
                    "data": {"source": str(source), "files": files, "split": "train", "name": None, "text_column": "text",
                             "id_column": None, "fingerprint": run["data_fingerprint"], "n_rows": len(ds),
                             "n_blank_skipped": 0, "license": None},
                    "data_files": f"{DATA_DIR}/scores-{tag}-*.parquet", "n_instances": len(ds), "n_tokens": n_tokens_total,
                    "world_size": 1, "elapsed_s": 0.0}
        write_text(output / "README.md", scores_card(manifest, manifest["data_files"]))
        write_manifest(output, manifest, [*paths, "README.md"])


def train_tokenizer(directory: Path) -> Path:
    """A byte-level BPE of 4,096 tokens trained on the offline documents: cheap, offline, encodes any text."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([d["text"] for d in build_corpus(2000, seed=0)], trainer)
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(directory)
    (directory.parent / "student.json").write_text(json.dumps({**TINY_LLAMA, "vocab_size": 4096}))
    return directory


def save_random_model(directory: Path, tokenizer_dir: Path, seed: int) -> Path:
    """A tiny Llama with random weights and the benchmark's tokenizer."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    config = AutoConfig.for_model(**{**TINY_LLAMA, "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id})
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def pack(corpus_dir: Path, tokenizer_dir: Path, run_dir: Path, workers: int, peak: Path,
         env: dict | None = None) -> tuple[float, float, float]:
    """(wall s, peak RSS MiB, token file build s) of `refine pretrain ... --max-steps 1` into a fresh token cache."""
    shutil.rmtree(run_dir, ignore_errors=True)
    wall, rss = measure(["pretrain", str(corpus_dir), "--model-config", str(tokenizer_dir.parent / "student.json"),
                         "--tokenizer", str(tokenizer_dir), "--seq-len", "128", "--micro-batch-size", "1",
                         "--max-steps", "1", "--device", "cpu", "--peak-tflops", "1", "--token-cache", str(run_dir / "tokens"),
                         "--tokenize-workers", str(workers), "--output", str(run_dir / "student")], peak, env)
    (meta,) = (run_dir / "tokens").glob("*/meta.json")
    return wall, rss, json.loads(meta.read_text())["elapsed_s"]


def score_scaling(root: Path, tokenizer_dir: Path, n_docs: int, peak: Path) -> dict:
    """Wall s of `refine score` with 1 process (all cores, then one core) and with --tasks 2 --workers 2, tiny random
    teacher and reference."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    corpus_file = root / "score-corpus.parquet"
    base = build_corpus(2000, seed=1)
    pq.write_table(pa.Table.from_pylist([{"text": f"[{k}] {base[k % len(base)]['text']}"} for k in range(n_docs)]),
                   corpus_file)
    teacher = save_random_model(root / "teacher", tokenizer_dir, seed=0)
    reference = save_random_model(root / "reference", tokenizer_dir, seed=1)
    common = ["score", str(corpus_file), "--teacher", str(teacher), "--reference", str(reference), "--device", "cpu",
              "--max-length", "256", "--shard-size", str(max(1, n_docs // 8))]
    return {"1": measure([*common, "--output", str(root / "scores-1")], peak)[0],
            "1 core": measure([*common, "--output", str(root / "scores-1-core")], peak, ONE_CORE)[0],
            "2": measure([*common, "--output", str(root / "scores-2"), "--tasks", "2", "--workers", "2"], peak)[0]}


# Runs refine's CLI, then writes the process's own peak RSS (VmHWM, in KiB). Not ru_maxrss: on Linux a child's
# ru_maxrss starts at its parent's RSS when forked, so it would count this script's own memory.
STAGE_RUNNER = """
import runpy, sys
peak_file, sys.argv = sys.argv[1], ["refine", *sys.argv[2:]]
try:
    runpy.run_module("refine", run_name="__main__")
finally:
    status = open("/proc/self/status").read()
    open(peak_file, "w").write(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
"""


# One core for a process: torch's intra-op threads and the fast tokenizers' thread pool both read these.
ONE_CORE = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1", "RAYON_RS_NUM_CPUS": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def measure(args: list[str], peak_file: Path, env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of `refine ARGS` in its own process (`env`: extra environment variables)."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", STAGE_RUNNER, str(peak_file), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"refine {' '.join(args)} failed:\n{result.stderr.decode()[-2000:]}")
    return wall, int(peak_file.read_text()) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes-mb", type=int, nargs=2, default=[50, 500], help="text per corpus, in MB (small, large)")
    parser.add_argument("--score-docs", type=int, default=4000, help="documents scored for the scoring speed-up")
    parser.add_argument("--workdir", default=None, help="where to build the corpora (default: a temp folder); corpora "
                                                        "and scores found there are reused")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES, help="what to measure")
    options = parser.parse_args()
    root = Path(options.workdir or tempfile.mkdtemp(prefix="refine-bench-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    peak = root / "peak_kib"
    tokenizer_dir = train_tokenizer(root / "tokenizer")
    results, built = {}, {}
    for size_mb in options.sizes_mb:
        here = root / f"{size_mb}mb"
        if not (here / "scores" / "manifest.json").exists():
            shutil.rmtree(here, ignore_errors=True)
            started = time.perf_counter()
            n_docs = build_corpus_folder(here / "corpus", size_mb * 10**6)
            write_scores(here / "corpus", here / "scores")
            print(f"{size_mb} MB: {n_docs:,} documents, corpus and stand-in scores built in "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
        results[size_mb] = {}
        if "sample" in options.stages:
            results[size_mb]["sample"] = measure(["sample", str(here / "scores"), "--alpha", "0.5", "--overwrite",
                                                  "--output", str(here / "refined")], peak)
        if "report" in options.stages:
            results[size_mb]["report"] = measure(["report", str(here / "scores"), "--group-column", "source", "--output",
                                                  str(here / "report.html")], peak)
        if "push" in options.stages:
            shutil.rmtree(here / "pushed", ignore_errors=True)
            results[size_mb]["push"] = measure(["push", str(here / "refined"), str(here / "pushed")], peak)
        if "pack" in options.stages:
            wall, rss, built[size_mb] = pack(here / "corpus", tokenizer_dir, here / "pack-1", 1, peak)
            results[size_mb]["pack (pretrain --max-steps 1)"] = (wall, rss)
    small, large = options.sizes_mb
    print(f"\nscores: stand-in for the models (deterministic functions of each text's CRC-32); {os.cpu_count()} CPUs")
    print(f"| stage | wall {small} MB (s) | wall {large} MB (s) | wall ratio | peak RSS {small} MB (MiB) | "
          f"peak RSS {large} MB (MiB) | RSS ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for stage in results[small]:
        (wall_s, rss_s), (wall_l, rss_l) = results[small][stage], results[large][stage]
        print(f"| {stage} | {wall_s:.1f} | {wall_l:.1f} | {wall_l / wall_s:.1f} | {rss_s:.0f} | {rss_l:.0f} | {rss_l / rss_s:.2f} |")
    if built:
        print(f"token file build alone (meta.json elapsed_s): {built[small]:.1f} s at {small} MB, {built[large]:.1f} s "
              f"at {large} MB ({built[large] / max(built[small], 0.1):.1f}x)", flush=True)
    if not {"pack-scaling", "score-scaling", "sample-scaling"} & set(options.stages):
        return
    print("\n| 2 workers against 1 | 1 worker (s) | 1 worker on 1 core (s) | 2 workers (s) | speed-up | "
          "speed-up over 1 core | load average before (1 min) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    if "pack-scaling" in options.stages:
        pack_scaling(root / f"{small}mb", small, tokenizer_dir, peak)
    if "score-scaling" in options.stages:
        load = os.getloadavg()[0]
        scores = score_scaling(root / "score-scaling", tokenizer_dir, options.score_docs, peak)
        print(f"| score {options.score_docs:,} docs, tiny models: --tasks 2 --workers 2 | {scores['1']:.1f} | "
              f"{scores['1 core']:.1f} | {scores['2']:.1f} | {scores['1'] / scores['2']:.2f} | "
              f"{scores['1 core'] / scores['2']:.2f} | {load:.2f} |")
    if "sample-scaling" in options.stages:
        sample_scaling(root / f"{large}mb", large, peak)


def sample_scaling(here: Path, size_mb: int, peak: Path) -> None:
    """`refine sample` of the larger corpus in one process, then with --tasks 2 --workers 2 (the corpus pass split)."""
    load = os.getloadavg()[0]
    common = ["sample", str(here / "scores"), "--alpha", "0.5", "--overwrite"]
    walls = {"1": measure([*common, "--output", str(here / "refined-scaling-1")], peak)[0],
             "1 core": measure([*common, "--output", str(here / "refined-scaling-1-core")], peak, ONE_CORE)[0],
             "2": measure([*common, "--output", str(here / "refined-scaling-2"), "--tasks", "2", "--workers", "2"], peak)[0]}
    print(f"| sample {size_mb} MB: --tasks 2 --workers 2 | {walls['1']:.1f} | {walls['1 core']:.1f} | {walls['2']:.1f} | "
          f"{walls['1'] / walls['2']:.2f} | {walls['1 core'] / walls['2']:.2f} | {load:.2f} |", flush=True)


def pack_scaling(here: Path, size_mb: int, tokenizer_dir: Path, peak: Path) -> None:
    load = os.getloadavg()[0]
    packs = {w: pack(here / "corpus", tokenizer_dir, here / f"pack-scaling-{w}", w, peak) for w in (1, 2)}
    packs["1 core"] = pack(here / "corpus", tokenizer_dir, here / "pack-scaling-1-core", 1, peak, ONE_CORE)
    for what, k in (("pretrain --tokenize-workers", 0), ("token file build alone", 2)):
        one, core, two = packs[1][k], packs["1 core"][k], packs[2][k]
        print(f"| packing {size_mb} MB: {what} | {one:.1f} | {core:.1f} | {two:.1f} | {one / two:.2f} | {core / two:.2f} | "
              f"{load:.2f} |", flush=True)


if __name__ == "__main__":
    main()
