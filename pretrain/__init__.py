"""sigscale.pretrain: towers, tokenizer, losses, sharding and the training loop."""
from sigscale.pretrain.towers import SiglipModel, create_model

__all__ = ["SiglipModel", "create_model"]
