"""The numbers behind docs/scale.md's plan for MiniPLM's setting: compute, tasks, disk and memory.

    python scripts/scale_plan.py                                  # MiniPLM: 100B tokens, Qwen1.5-1.8B, qwen-104m
    python scripts/scale_plan.py --tokens 2e10 --gpus 16 --mfu 0.3 --peak-tflops 312   # your cluster

Parameter counts come from the model configs, built on the meta device (no weights): the teacher's is
Qwen1.5-1.8B's published config written out below, the reference is refine's `qwen-104m` preset.
Compute is the forward-only cost 2·(N_teacher + N_ref)·tokens; hours need a model FLOPs utilisation
(`--mfu`), which you measure on one of your GPUs with `python scripts/bench_score.py --teacher ...`
(it prints MFU). Disk and memory use the per-row and per-token sizes given as options, measured as
described in docs/scale.md.
"""

from __future__ import annotations

import argparse
import math

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from refine.models import load_model_config

# Qwen/Qwen1.5-1.8B's config.json (the MiniPLM teacher), the fields that set its size.
QWEN15_1_8B = {"model_type": "qwen2", "hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 24,
               "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 151936,
               "tie_word_embeddings": False}


def parameters(config) -> tuple[int, int]:
    """(all parameters, those in a matmul per token: all but an untied input embedding)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return total, total if tied else total - model.get_input_embeddings().weight.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=float, default=1e11, help="corpus tokens (teacher tokenizer)")
    parser.add_argument("--chunk-tokens", type=int, default=1024, help="tokens per instance (--unit chunk --max-length)")
    parser.add_argument("--shard-size", type=int, default=10_000, help="instances per score shard (--shard-size)")
    parser.add_argument("--gpus", type=int, default=64, help="GPUs, one task each")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation of scoring on your GPU")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100: 989)")
    parser.add_argument("--alpha", type=float, default=0.5, help="kept fraction")
    parser.add_argument("--score-bytes-per-row", type=float, default=25.0, help="score columns on disk, per instance")
    parser.add_argument("--chunk-bytes-per-token", type=float, default=1.4, help="a chunk's input_ids on disk, per token")
    parser.add_argument("--sample-bytes-per-instance", type=float, default=300.0, help="refine sample's memory per instance")
    parser.add_argument("--report-bytes-per-instance", type=float, default=360.0, help="refine report's memory per instance")
    args = parser.parse_args()

    teacher_total, teacher_matmul = parameters(AutoConfig.for_model(**QWEN15_1_8B))
    reference_total, reference_matmul = parameters(load_model_config("qwen-104m"))
    flops = 2 * (teacher_matmul + reference_matmul) * args.tokens
    gpu_seconds = flops / (args.peak_tflops * 1e12 * args.mfu)
    instances = math.ceil(args.tokens / args.chunk_tokens)
    shards = math.ceil(instances / args.shard_size)
    tokens_per_s_per_gpu = args.peak_tflops * 1e12 * args.mfu / (2 * (teacher_matmul + reference_matmul))
    vocab_bytes = 2 if QWEN15_1_8B["vocab_size"] <= 2**16 else 4
    rows = [
        ("teacher parameters (matmul)", f"{teacher_total / 1e9:.2f}B ({teacher_matmul / 1e9:.2f}B)"),
        ("reference parameters (matmul)", f"{reference_total / 1e6:.0f}M ({reference_matmul / 1e6:.0f}M)"),
        ("scoring compute", f"{flops:.2e} FLOPs"),
        (f"tokens/s per GPU at {args.mfu:.0%} of {args.peak_tflops:.0f} TFLOP/s", f"{tokens_per_s_per_gpu:,.0f}"),
        ("GPU-hours", f"{gpu_seconds / 3600:,.0f}"),
        (f"wall time on {args.gpus} GPUs", f"{gpu_seconds / 3600 / args.gpus:.1f} h"),
        (f"instances ({args.chunk_tokens}-token chunks)", f"{instances:.3g}"),
        (f"score shards of {args.shard_size:,}", f"{shards:,} ({math.ceil(shards / args.gpus)} per task)"),
        ("disk: score columns", f"{instances * args.score_bytes_per_row / 1e9:.1f} GB"),
        ("disk: chunk input_ids in the scores (--unit chunk)", f"{args.tokens * args.chunk_bytes_per_token / 1e9:.0f} GB"),
        (f"disk: pretrain token file of the refined set (alpha {args.alpha})",
         f"{args.tokens * args.alpha * vocab_bytes / 1e9:.0f} GB ({vocab_bytes} bytes/token)"),
        ("memory: refine sample", f"{instances * args.sample_bytes_per_instance / 1e9:.0f} GB"),
        ("memory: refine report", f"{instances * args.report_bytes_per_instance / 1e9:.0f} GB"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
