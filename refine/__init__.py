"""refine: MiniPLM-style difference sampling of a pretraining corpus (score → sample → pretrain)."""

__version__ = "0.1.0"
