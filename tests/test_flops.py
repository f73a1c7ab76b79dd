"""Model FLOPs per token and the hardware peak behind the MFU figure."""

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import TINY
from refine.flops import device_peak, matmul_params


def tiny_llama(tie: bool):
    config = AutoConfig.for_model("llama", vocab_size=100, tie_word_embeddings=tie, **TINY["llama"])
    return AutoModelForCausalLM.from_config(config)


def test_matmul_params_leave_out_only_an_untied_input_embedding():
    untied, tied = tiny_llama(False), tiny_llama(True)
    embedding = 100 * TINY["llama"]["hidden_size"]
    every = lambda m: sum(p.numel() for p in m.parameters())
    assert matmul_params(untied) == every(untied) - embedding  # the lookup table is no matmul
    assert matmul_params(tied) == every(tied)  # tied: the one matrix is the output head, a matmul


def test_cpu_peak_is_a_measured_matmul_rate():
    peak, source = device_peak(torch.device("cpu"), torch.float32)
    assert "measured float32 matmul rate" in source
    assert 1e8 < peak < 1e14  # FLOP/s of a CPU: between a toy and a supercomputer node
