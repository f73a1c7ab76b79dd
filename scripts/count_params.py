"""Print the parameter count of every model preset in refine/presets (built on the meta device, no memory)."""

import torch
from transformers import AutoModelForCausalLM

from refine.models import list_presets, load_model_config

for name in list_presets():
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_model_config(name))
    print(f"{name:<12} {model.config.model_type:<6} {sum(p.numel() for p in model.parameters()) / 1e6:8.1f}M")
