"""The version of chain-of-lora (one place; the package and its checkpoints read it)."""

__version__ = "0.1.0"
