"""lorad: a hands-off LoRA training daemon."""

__version__ = "0.1.0"
