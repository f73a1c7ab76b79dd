"""Peak memory and wall time of `refine sample`, `refine report` and `refine push` at two corpus sizes.

    python scripts/bench_scale.py                      # about 50 MB and 500 MB of text, in a temp folder
    python scripts/bench_scale.py --sizes-mb 5 50      # a quick run

Each size gets a corpus folder of Parquet files (about 50 MB of text each) built from the standard
library's text (refine.offline_corpus), documents numbered so that each one is distinct. Its scores come
from a stand-in for the two models, not from models: `n_tokens` is the UTF-8 length / 4 and both
log-probabilities are deterministic functions of the text's CRC-32, written with refine's own writers
(claim, score_table, write_parquet, scores_card, write_manifest) so that sample and report accept them.
The corpus is loaded once while building, so the stages below find datasets' Arrow cache warm.

Each stage runs refine's CLI in its own process; its peak RSS is that process's VmHWM, read from
/proc/self/status as it exits (Linux only). Targets: peak RSS ratio (largest / smallest size) <= 1.25, wall time ratio <= 11.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from refine import data as corpus
from refine.card import scores_card
from refine.offline_corpus import build_corpus
from refine.output import DATA_DIR, claim, content_tag, run_info, write_manifest, write_parquet, write_text
from refine.score import score_table

FILE_TEXT_BYTES = 50 * 2**20  # text per corpus file
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


def measure(args: list[str], peak_file: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of `refine ARGS` in its own process."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", STAGE_RUNNER, str(peak_file), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"refine {' '.join(args)} failed:\n{result.stderr.decode()[-2000:]}")
    return wall, int(peak_file.read_text()) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes-mb", type=int, nargs=2, default=[50, 500], help="text per corpus, in MB (small, large)")
    parser.add_argument("--workdir", default=None, help="where to build the corpora (default: a temp folder)")
    options = parser.parse_args()
    root = Path(options.workdir or tempfile.mkdtemp(prefix="refine-bench-scale-"))
    results = {}
    for size_mb in options.sizes_mb:
        here = root / f"{size_mb}mb"
        peak = root / "peak_kib"
        started = time.perf_counter()
        n_docs = build_corpus_folder(here / "corpus", size_mb * 10**6)
        write_scores(here / "corpus", here / "scores")
        print(f"{size_mb} MB: {n_docs:,} documents, corpus and stand-in scores built in {time.perf_counter() - started:.0f} s",
              flush=True)
        results[size_mb] = {
            "sample": measure(["sample", str(here / "scores"), "--alpha", "0.5", "--output", str(here / "refined")], peak),
            "report": measure(["report", str(here / "scores"), "--group-column", "source", "--output",
                               str(here / "report.html")], peak),
            "push": measure(["push", str(here / "refined"), str(here / "pushed")], peak),
        }
    small, large = options.sizes_mb
    print(f"\nscores: stand-in for the models (deterministic functions of each text's CRC-32); {os.cpu_count()} CPUs")
    print(f"| stage | wall {small} MB (s) | wall {large} MB (s) | wall ratio | peak RSS {small} MB (MiB) | "
          f"peak RSS {large} MB (MiB) | RSS ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for stage in ("sample", "report", "push"):
        (wall_s, rss_s), (wall_l, rss_l) = results[small][stage], results[large][stage]
        print(f"| {stage} | {wall_s:.1f} | {wall_l:.1f} | {wall_l / wall_s:.1f} | {rss_s:.0f} | {rss_l:.0f} | {rss_l / rss_s:.2f} |")


if __name__ == "__main__":
    main()
