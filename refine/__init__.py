"""refine: MiniPLM-style difference sampling of a pretraining corpus (score → sample → pretrain)."""

__version__ = "0.1.0"  # the one place the version is set: pyproject.toml reads it from here
