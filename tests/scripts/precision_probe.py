"""One training step of the tiny model under ``train.strategy=STRATEGY`` and ``train.precision=PRECISION``;
writes the dtype a matmul of the first vision block computed in (rank 0), as JSON.

Launched by tests under torchrun (several ranks). The step is the engine's own ``train_step``.
Usage: precision_probe.py OUT.json STRATEGY PRECISION
"""
import json
import sys

import torch

from sigscale.core.distributed import init_distributed
from sigscale.pretrain.config import load_config
from sigscale.pretrain.train import build_engine, train_step

out, strategy, precision = sys.argv[1], sys.argv[2], sys.argv[3]
info = init_distributed()
cfg = load_config("tiny", [f"train.strategy={strategy}", f"train.precision={precision}", "train.batch_size=8"])
model, opt, _ = build_engine(cfg, info, vocab_size=cfg.model.text.vocab_size)
towers = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
seen = []
towers.visual.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, o: seen.append(str(o.dtype)))
b = cfg.train.batch_size // info.world_size
pixels = torch.rand(b, 3, 32, 32) * 2 - 1
tokens = torch.randint(3, 1000, (b, 16))
stats = train_step(model, opt, [(pixels, tokens)], cfg, info)
if info.is_main:
    with open(out, "w") as f:
        json.dump({"dtypes": seen, "loss": stats.loss.item(), "wrapper": type(model).__name__}, f)
