"""Run a few optimizer steps of the tiny model on fixed global batches; write losses as JSON.

Launched by tests under torchrun (several ranks) or directly (one process), so every strategy
sees the same global batch: rank r takes rows [r*b, (r+1)*b) of it, split into ``accum``
micro-batches. The step is the engine's own ``train_step``.
Usage: engine_equivalence.py OUT.json STRATEGY CKPT_VISION CKPT_TEXT [STEPS] [ACCUM] [ZERO_STAGE]
"""
import json
import sys

import torch

from sigscale.core.distributed import init_distributed
from sigscale.pretrain.config import load_config
from sigscale.pretrain.train import build_engine, train_step

out, strategy, ckpt_v, ckpt_t = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "1"
steps = int(sys.argv[5]) if len(sys.argv) > 5 else 4
accum = int(sys.argv[6]) if len(sys.argv) > 6 else 1
zero_stage = int(sys.argv[7]) if len(sys.argv) > 7 else 3
torch.use_deterministic_algorithms(True)
info = init_distributed()
cfg = load_config("tiny", [f"train.strategy={strategy}", "train.batch_size=24", "train.precision=fp32",
                           f"train.grad_checkpointing.vision={ckpt_v}", f"train.grad_checkpointing.text={ckpt_t}",
                           "train.steps=10", "train.warmup_steps=2", "train.lr=1e-3", "train.loss_chunk_size=5",
                           f"train.accum_steps={accum}", f"train.zero_stage={zero_stage}"])
model, opt, sched = build_engine(cfg, info, vocab_size=cfg.model.text.vocab_size)  # the training loop's own set-up
b = cfg.train.batch_size // info.world_size
g = torch.Generator().manual_seed(1)
losses, grad_norms = [], []
for step in range(steps):
    pixels = torch.rand(cfg.train.batch_size, 3, 32, 32, generator=g) * 2 - 1
    tokens = torch.randint(3, 1000, (cfg.train.batch_size, 16), generator=g)
    m = b // accum
    rows = [slice(info.rank * b + i * m, info.rank * b + (i + 1) * m) for i in range(accum)]
    micro = [(pixels[r], tokens[r]) for r in rows]
    stats = train_step(model, opt, micro, cfg, info)
    sched.step()
    grad_norms.append(stats.grad_norm)
    total = stats.loss
    if info.world_size > 1:
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.AVG)
    losses.append(total.item())
if info.is_main:
    json.dump({"losses": losses, "grad_norms": grad_norms}, open(out, "w"))
if info.world_size > 1:
    torch.distributed.destroy_process_group()
