"""sigscale.pretrain: towers, tokenizer, losses, sharding and the training loop."""
import importlib

__all__ = ["SiglipModel", "create_model"]


def __getattr__(name: str):
    # Lazy: importing a light module (loss, config) must not pull in open_clip/timm (~6 s per process).
    if name in __all__:
        return getattr(importlib.import_module("sigscale.pretrain.towers"), name)
    raise AttributeError(f"module 'sigscale.pretrain' has no attribute {name!r}")
