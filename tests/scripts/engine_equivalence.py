"""Run a few optimizer steps of the tiny model on fixed global batches; write losses as JSON.

Launched by tests under torchrun (several ranks) or directly (one process), so every strategy
sees the same global batch: rank r takes rows [r*b, (r+1)*b) of it.
Usage: engine_equivalence.py OUT.json STRATEGY CKPT_VISION CKPT_TEXT [STEPS]
"""
import json
import sys

import torch

from sigscale.pretrain.config import load_config
from sigscale.pretrain.optim import build_optimizer, build_schedule
from sigscale.pretrain.sharding import init_distributed, parallelize
from sigscale.pretrain.towers import create_model
from sigscale.pretrain.train import contrastive_loss

out, strategy, ckpt_v, ckpt_t = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "1"
steps = int(sys.argv[5]) if len(sys.argv) > 5 else 4
torch.use_deterministic_algorithms(True)
info = init_distributed()
cfg = load_config("tiny", [f"train.strategy={strategy}", "train.batch_size=24", "train.precision=fp32",
                           f"train.grad_checkpointing.vision={ckpt_v}", f"train.grad_checkpointing.text={ckpt_t}",
                           "train.steps=10", "train.warmup_steps=2", "train.lr=1e-3", "train.loss_chunk_size=5"])
torch.manual_seed(0)
model = parallelize(create_model(cfg.model), cfg.train, info)
opt, b = build_optimizer(model, cfg.train), cfg.train.batch_size // info.world_size
sched = build_schedule(opt, cfg.train)
g = torch.Generator().manual_seed(1)
losses, grad_norms = [], []
for step in range(steps):
    pixels = torch.rand(cfg.train.batch_size, 3, 32, 32, generator=g) * 2 - 1
    tokens = torch.randint(3, 1000, (cfg.train.batch_size, 16), generator=g)
    sl = slice(info.rank * b, (info.rank + 1) * b)
    img, txt, scale, bias = model(pixels[sl], tokens[sl])
    loss = contrastive_loss(cfg, img, txt, scale, bias, info.group)
    loss.backward()
    grad_norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
    opt.step(); sched.step(); opt.zero_grad()
    total = loss.detach().clone()
    if info.world_size > 1:
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.AVG)
    losses.append(total.item())
if info.is_main:
    json.dump({"losses": losses, "grad_norms": grad_norms}, open(out, "w"))
if info.world_size > 1:
    torch.distributed.destroy_process_group()
