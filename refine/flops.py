"""Model FLOPs and the hardware's peak, for tokens/s → model FLOPs utilisation (MFU)."""

from __future__ import annotations

import functools
import time

import torch

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, by a substring of torch.cuda.get_device_name().
CUDA_BF16_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12,
                   "RTX 4090": 165e12, "RTX 3090": 71e12}


def matmul_params(model) -> int:
    """Parameters that take part in a matmul per token: all but an untied input embedding."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    return total if head is not None and embedding is head.weight else total - embedding.numel()


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """Best FLOP/s of a square matmul: the machine's practical dense peak."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = 0.0
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@functools.lru_cache(maxsize=None)
def device_peak(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s, how it was found): the datasheet bf16 peak of a known GPU, else a measured matmul rate."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        name = torch.cuda.get_device_name(device)
        for key, peak in CUDA_BF16_PEAKS.items():
            if key in name:
                return peak, f"{name} dense bf16 datasheet peak"
    peak = measure_matmul_peak(device, dtype, size=2048 if device.type == "cuda" else 1024)
    return peak, f"measured {str(dtype).removeprefix('torch.')} matmul rate"
