"""Subcommands of the pretrain stage registered into the top-level `sigscale` CLI (imports stay cheap)."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Callable


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the per-GPU memory plan of an experiment, or fail if its strategy cannot fit."""
    from sigscale.pretrain.config import load_config
    from sigscale.pretrain.plan import check_fits, parse_bytes, plan, render

    cfg = load_config(args.config, args.overrides)
    result = plan(cfg, args.gpus, parse_bytes(args.gpu_mem), nodes=args.nodes, reserve=args.reserve)
    if args.json:
        print(json.dumps(asdict(result), indent=2, default=str))
    else:
        print(render(result), end="")
    check_fits(result)
    return 0


def register(add: Callable[..., argparse.ArgumentParser]) -> None:
    p = add("plan", cmd_plan, "per-GPU memory per sharding strategy, largest micro-batch and accumulation steps",
            config=True)
    p.add_argument("--gpus-per-node", "--gpus", dest="gpus", type=int, required=True,
                   help="GPUs per node (as `sigscale submit --gpus-per-node`)")
    p.add_argument("--gpu-mem", required=True, help="memory of one GPU, e.g. 80GB (GB = GiB, as GPU specs mean)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (world size = gpus x nodes; default 1)")
    p.add_argument("--reserve", type=float, default=0.10,
                   help="fraction of each GPU kept free for the CUDA context and allocator fragmentation "
                        "(default 0.1)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
