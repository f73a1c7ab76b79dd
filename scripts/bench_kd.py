"""Does token-level KD move a student toward its teacher, and what does it cost? A tiny, offline setting.

1. A small teacher (Llama, 4 layers, d=128) is trained with `refine pretrain` on a mixed corpus built from
   the standard library, with a byte-level BPE trained on that corpus.
2. A tinier student (Llama, 2 layers, d=48) is trained for the same steps on the same sequences:
   plain; online KD (--kd-teacher) at weights 0.5 and 1.0; from a top-16 cache (--kd-cache, weight 0.5).
3. On held-out documents: the student's KL(teacher || student) per token and its cross-entropy.
4. Cost: plain vs online-KD tokens/s of the student runs, and cache bytes per token for K = 16, 64, 256
   (measured on disk).

    python scripts/bench_kd.py            # about 10 minutes on 2 CPU cores
    python scripts/bench_kd.py --quick    # about 2 minutes
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from experiment import train_bpe_tokenizer  # noqa: E402  (the same small BPE as the experiment's students)

TEACHER = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
           "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512, "tie_word_embeddings": True}
STUDENT = {"model_type": "llama", "hidden_size": 48, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512, "tie_word_embeddings": True}
SEQ_LEN = 128


@torch.no_grad()
def held_out_kl_and_ce(teacher_dir: Path, student_dir: Path, sequences: list[np.ndarray]) -> tuple[float, float]:
    """Token-mean KL(teacher || student) and student cross-entropy on the held-out sequences."""
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    kl_sum = ce_sum = count = 0.0
    for start in range(0, len(sequences), 8):
        batch = torch.from_numpy(np.stack(sequences[start : start + 8]))
        log_q = torch.log_softmax(teacher(input_ids=batch).logits[:, :-1].float(), -1)
        log_p = torch.log_softmax(student(input_ids=batch).logits[:, :-1].float(), -1)
        kl_sum += (log_q.exp() * (log_q - log_p)).sum().item()
        ce_sum += -log_p.gather(-1, batch[:, 1:, None]).sum().item()
        count += batch[:, 1:].numel()
    return kl_sum / count, ce_sum / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()

    from refine.config import DistillCacheConfig, PretrainConfig
    from refine.distill import build_cache
    from refine.offline_corpus import build_corpus
    from refine.packed import pack
    from refine.pretrain import pretrain

    n_docs, teacher_steps, student_steps = (500, 150, 60) if args.quick else (1500, 600, 200)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        docs = [d for d in build_corpus(n_docs, seed=1) if d["source"] != "noise"]
        held_out, train = docs[:60], docs[60:]
        (work / "train.jsonl").write_text("".join(json.dumps({"text": d["text"]}) + "\n" for d in train))
        (work / "eval.jsonl").write_text("".join(json.dumps({"text": d["text"]}) + "\n" for d in held_out))
        tokenizer_dir = train_bpe_tokenizer(work / "train.jsonl", work / "tokenizer", 2048)
        for name, config in (("teacher", TEACHER), ("student", STUDENT)):
            (work / f"{name}.json").write_text(json.dumps(config))
        common = dict(data=str(work / "train.jsonl"), eval_data=str(work / "eval.jsonl"), tokenizer=str(tokenizer_dir),
                      seq_len=SEQ_LEN, micro_batch_size=8, warmup_steps=10, log_every=5, device="cpu",
                      token_cache=str(work / "tokens"), max_eval_sequences=64)
        print(f"training the teacher ({teacher_steps} steps)", flush=True)
        teacher = pretrain(PretrainConfig(**common, model_config=str(work / "teacher.json"), output=str(work / "teacher"),
                                          max_steps=teacher_steps, lr=3e-3, eval_every=teacher_steps, save_every=teacher_steps))

        cache_bytes = {}
        for k in (16, 64, 256):
            cache = work / f"cache{k}"
            meta = build_cache(DistillCacheConfig(data=str(work / "train.jsonl"), eval_data=str(work / "eval.jsonl"),
                                                  teacher=str(work / "teacher"), output=str(cache), top_k=k, seq_len=SEQ_LEN,
                                                  token_cache=str(work / "tokens"), device="cpu"))
            on_disk = sum(f.stat().st_size for f in cache.rglob("*.npy"))
            cache_bytes[k] = (meta["bytes_per_token"], on_disk / (meta["n_sequences"] * (SEQ_LEN - 1)))

        arms = {"plain": {}, "online KD, w=0.5": {"kd_teacher": str(work / "teacher"), "kd_weight": 0.5},
                "online KD, w=1 (pure)": {"kd_teacher": str(work / "teacher"), "kd_weight": 1.0},
                "top-16 cache, w=0.5": {"kd_cache": str(work / "cache16"), "kd_weight": 0.5}}
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        eval_ids = tokenizer([d["text"] for d in held_out], add_special_tokens=False)["input_ids"]
        eval_sequences = pack(eval_ids, tokenizer.eos_token_id, SEQ_LEN)
        rows = []
        for arm, extra in arms.items():
            print(f"student: {arm} ({student_steps} steps)", flush=True)
            out = work / f"student_{len(rows)}"
            manifest = pretrain(PretrainConfig(**common, **extra, model_config=str(work / "student.json"), output=str(out),
                                               max_steps=student_steps, lr=3e-3, eval_every=student_steps,
                                               save_every=student_steps))
            records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            speed = float(np.median([r["tokens_per_s"] for r in records[1:-1]]))
            kl, ce = held_out_kl_and_ce(work / "teacher", out, eval_sequences)
            rows.append((arm, kl, ce, speed))
            student_params = manifest["n_params"]
            assert manifest["tokens"] == student_steps * 8 * SEQ_LEN

    print(f"\nteacher: {TEACHER['num_hidden_layers']} layers, d={TEACHER['hidden_size']}, held-out loss "
          f"{teacher['eval_loss']:.3f}; student: {STUDENT['num_hidden_layers']} layers, d={STUDENT['hidden_size']}; "
          f"{student_steps} steps x 8 x {SEQ_LEN} tokens each; vocabulary {len(tokenizer)}; "
          f"{len(eval_sequences)} held-out sequences")
    print("| student arm | held-out KL(teacher ‖ student) | held-out CE | tokens/s |")
    print("|---|---|---|---|")
    for arm, kl, ce, speed in rows:
        print(f"| {arm} | {kl:.4f} | {ce:.4f} | {speed:,.0f} |")
    plain_speed = rows[0][3]
    online_speed = rows[1][3]
    print(f"\nonline KD costs {plain_speed / online_speed:.2f}x the time per token of plain pretraining here "
          f"(teacher {teacher['n_params'] / 1e6:.2f}M params, student {student_params / 1e6:.2f}M: the teacher's "
          "forward pass is the extra work)")
    print("| K | bytes per cached token (ids + log-probs) | measured on disk |")
    print("|---|---|---|")
    for k, (nominal, measured) in cache_bytes.items():
        print(f"| {k} | {nominal} | {measured:.1f} |")
    print(f"\n{time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
