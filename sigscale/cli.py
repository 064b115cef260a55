"""`sigscale` command line: one subcommand per stage, each a thin shell over a Python API."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

from sigscale import __version__

STAGE_PACKAGES = ("curation", "eval", "slurm", "pretrain")


def _config(args: argparse.Namespace):
    from sigscale.pretrain.config import load_config

    return load_config(args.config, args.overrides)


def cmd_config(args: argparse.Namespace) -> int:
    from sigscale.core.config import to_yaml

    print(to_yaml(_config(args)), end="")
    return 0


def _run_dir_overrides(args: argparse.Namespace) -> List[str]:
    """``train.out_dir`` fixed before any rank starts: ``--resume RUN``, the config's, or a new run dir."""
    from sigscale.core.config import ConfigError
    from sigscale.core.rundir import RunDir
    from sigscale.pretrain.config import with_run_dir

    if args.resume:
        if not RunDir(args.resume).exists():
            raise ConfigError(f"--resume {args.resume}: no run there (no {RunDir.CONFIG}); give a run dir that "
                              "`sigscale train` printed, or drop --resume to start a new run")
        return [f"train.out_dir={RunDir(args.resume).root}"]
    return [f"train.out_dir={with_run_dir(_config(args)).train.out_dir}"]


def cmd_train(args: argparse.Namespace) -> int:
    from sigscale.core.distributed import die_with_launcher, launch_ranks, launched_by_torchrun, torchrun_command

    if not launched_by_torchrun():
        args.overrides = [*args.overrides, *_run_dir_overrides(args)]
        args.resume = None
        print(f"run dir: {args.overrides[-1].split('=', 1)[1]}", flush=True)
    if args.nproc > 1 and not launched_by_torchrun():
        from sigscale.core.rundir import RunDir
        from sigscale.core.runlock import RunLock
        from sigscale.pretrain.data import check_input

        cfg = _config(args)
        check_input(cfg, args.nproc)  # what the ranks would refuse, refused before starting them
        RunLock(RunDir(cfg.train.out_dir)).check_free()  # and a run dir another live run trains
        # Re-launch this command under torchrun: one process per rank, env-based rendezvous.
        train_args = ["train", "--config", args.config, *args.overrides] + (["--no-resume"] if args.no_resume else [])
        return launch_ranks(torchrun_command(args.nproc, "sigscale.cli", train_args))
    die_with_launcher()
    from sigscale.eval.run import BenchmarkEvaluator
    from sigscale.pretrain.train import train

    cfg = _config(args)
    evaluator = BenchmarkEvaluator(cfg.eval) if cfg.eval.benchmarks else None
    result = train(cfg, resume=not args.no_resume, evaluator=evaluator)
    if result.final_weights:
        print(f"weights: {result.final_weights}")
    return 0


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from sigscale.pretrain.tokenizer import Tokenizer, train_tokenizer

    path = train_tokenizer(args.corpus, args.out, vocab_size=args.vocab_size, model_type=args.model_type,
                           character_coverage=args.character_coverage, canonicalize_text=not args.no_canonicalize)
    tok = Tokenizer(path)
    print(f"wrote {path} (vocab {tok.vocab_size})")
    if tok.vocab_size < args.vocab_size:
        print(f"note: {tok.vocab_size} pieces, not the {args.vocab_size} asked for: the corpus has no more distinct "
              "pieces worth keeping; a larger corpus gives a larger vocabulary", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from sigscale.core.rundir import RunDir
    from sigscale.pretrain import interop

    model = interop.load_model(args.checkpoint, args.model or None)
    if args.format == "hf":
        run = RunDir.of(args.checkpoint)
        tokenizer = args.tokenizer or (str(run.tokenizer) if run and run.tokenizer.is_file() else None)
        if tokenizer is None:
            raise interop.CheckpointLoadError(
                f"no tokenizer is known for {args.checkpoint} (not a run dir with {RunDir.TOKENIZER}); pass "
                "--tokenizer PATH.model so the export carries it (AutoProcessor and pipelines need it)")
        out = interop.export_hf(model, args.out, tokenizer_model=tokenizer)
    else:
        out = interop.export_open_clip(model, args.out)
    print(f"wrote {out}")
    return 0


def _bench_loss(args: argparse.Namespace) -> int:
    from sigscale.bench_loss import render_markdown, run_loss_bench

    kwargs = dict(out_json=args.out or "bench_results/loss.json")
    if args.world_sizes:
        kwargs["world_sizes"] = tuple(int(w) for w in args.world_sizes.split(","))
    if args.batch_sizes:
        kwargs["batch_sizes"] = tuple(int(b) for b in args.batch_sizes.split(","))
    if args.dim:
        kwargs["dim"] = args.dim
    if args.impls:
        kwargs["impls"] = tuple(args.impls.split(","))
    for key in ("repeats", "chunk_size", "max_seconds"):
        if getattr(args, key) is not None:
            kwargs[key] = getattr(args, key)
    kwargs["quick"] = args.quick
    results = run_loss_bench(**kwargs)
    print(render_markdown(results))
    return 0


def _bench_tokenizer(args: argparse.Namespace) -> int:
    from sigscale.bench_tokenizer import render_markdown as render_tokenizer, run_tokenizer_bench

    print(render_tokenizer(run_tokenizer_bench(args.out or "bench_results/tokenizer.json")))
    return 0


def _bench_train(args: argparse.Namespace) -> int:
    from sigscale.bench_train import render_markdown as render_train, run_train_bench

    kwargs = dict(out_json=args.out or "bench_results/train.json", quick=args.quick, capped=args.capped)
    if args.config:
        kwargs["config"] = args.config
    if args.world_sizes:
        kwargs["world"] = int(args.world_sizes.split(",")[0])
    if args.batch_sizes:
        kwargs["batch"] = int(args.batch_sizes.split(",")[0])
    for key in ("repeats", "steps"):
        if getattr(args, key) is not None:
            kwargs[key] = getattr(args, key)
    if args.strategies:
        kwargs["strategies"] = tuple(args.strategies.split(","))
    print(render_train(run_train_bench(**kwargs)))
    return 0


def _bench_memory(args: argparse.Namespace) -> int:
    from sigscale.bench_memory import render_markdown as render_memory, run_memory_bench

    if args.check:
        from sigscale.bench_plan import render_markdown as render_check, run_plan_check

        print(render_check(run_plan_check(args.out or "bench_results/plan_check.json", quick=args.quick)))
        return 0

    kwargs = dict(out_json=args.out or "bench_results/memory.json", quick=args.quick)
    if args.config:
        kwargs["config"] = args.config
    if args.world_sizes:
        kwargs["world_sizes"] = tuple(int(w) for w in args.world_sizes.split(","))
    if args.batch_sizes:
        kwargs["batch"] = int(args.batch_sizes.split(",")[0])
    if args.steps is not None:
        kwargs["steps"] = args.steps
    if args.strategies:
        kwargs["strategies"] = tuple(args.strategies.split(","))
    print(render_memory(run_memory_bench(**kwargs)))
    return 0


def _bench_gpu(args: argparse.Namespace) -> int:
    from sigscale.bench_gpu import render_markdown as render_gpu, run_gpu_bench

    print(render_gpu(run_gpu_bench(args.out or "bench_results/gpu.json", dry_run=args.dry_run)))
    return 0


def _bench_bound(args: argparse.Namespace) -> int:
    from sigscale.bench_gpu import render_markdown as render_bound, run_bound_bench

    kwargs = dict(out_json=args.out or "bench_results/bound.json")
    if args.batch_sizes:
        kwargs["batches"] = tuple(int(b) for b in args.batch_sizes.split(","))
    if args.world_sizes:
        kwargs["world"] = int(args.world_sizes.split(",")[0])
    if args.dim:
        kwargs["dim"] = args.dim
    if args.repeats:
        kwargs["repeats"] = args.repeats
    print(render_bound(run_bound_bench(**kwargs)))
    return 0


def _bench_scale(args: argparse.Namespace) -> int:
    from sigscale.bench_scale import SECTIONS, render_markdown as render_scale, run_scale_bench

    sections = tuple(args.sections.split(",")) if args.sections else SECTIONS
    print(render_scale(run_scale_bench(args.out or "bench_results/scale.json", sections, quick=args.quick)))
    return 0


def _bench_curation(args: argparse.Namespace) -> int:
    from sigscale.curation.bench import (render_curation_markdown, render_finalize_markdown, render_plan_markdown,
                                         run_curation_bench, run_finalize_bench, run_plan_bench)

    if not args.rows:
        result = run_curation_bench(args.out or "bench_results/curation.json")
        print(render_curation_markdown(result, "sigscale bench " + " ".join(sys.argv[2:])))
        return 0
    from sigscale.core.errors import SigscaleError

    threshold = 3 if args.phash_threshold is None else args.phash_threshold
    plan = (args.sections or "finalize") == "plan"
    if args.sections not in (None, "finalize", "plan"):
        raise SigscaleError(f"--sections {args.sections!r}: bench curation --rows has the sections finalize "
                            "(synthetic metadata, the default) and plan (a synthetic URL list through the planner)")
    out = Path(args.out or f"bench_results/curation_{'plan' if plan else 'finalize'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for n in args.rows.split(","):  # written after each size: a long last size does not lose the others
        workers = args.nproc or 2
        results.append(run_plan_bench(int(n), workers=workers, list_format=args.list_format) if plan else
                       run_finalize_bench(int(n), threshold=threshold, workers=workers))
        out.write_text(json.dumps(results, indent=1))
    render = render_plan_markdown if plan else render_finalize_markdown
    print(render(results, "sigscale bench " + " ".join(sys.argv[2:])))
    return 0


def _bench_langid(args: argparse.Namespace) -> int:
    from sigscale.curation.langid_bench import render_langid_markdown, run_langid_bench

    print(render_langid_markdown(run_langid_bench(args.out or "bench_results/langid.json", peer=args.peer)))
    return 0


def _bench_ablation(args: argparse.Namespace) -> int:
    from sigscale.bench_ablation import render_markdown as render_ablation, run_ablation
    from sigscale.core.config import ConfigError

    kwargs = dict(out_json=args.out or "bench_results/ablation.json", quick=args.quick)
    if args.losses:
        kwargs["losses"] = tuple(args.losses.split(","))
    for flag, key in (("--seeds", "seeds"), ("--batch-sizes", "batch_sizes")):
        text = getattr(args, key)
        if text:
            try:
                kwargs[key] = tuple(int(v) for v in text.split(","))
            except ValueError:
                raise ConfigError(f"{flag} {text}: give comma-separated integers, e.g. {flag} 0,1,2") from None
    if args.nproc:
        kwargs["nproc"] = args.nproc
    print(render_ablation(run_ablation(**kwargs)))
    return 0


# `sigscale bench WHAT`: one function per benchmark.
BENCHES: Dict[str, Callable[[argparse.Namespace], int]] = {
    "loss": _bench_loss,
    "tokenizer": _bench_tokenizer,
    "train": _bench_train,
    "memory": _bench_memory,
    "gpu": _bench_gpu,
    "bound": _bench_bound,
    "scale": _bench_scale,
    "curation": _bench_curation,
    "langid": _bench_langid,
    "ablation": _bench_ablation,
}


def cmd_bench(args: argparse.Namespace) -> int:
    return BENCHES[args.what](args)


def cmd_demo(args: argparse.Namespace) -> int:
    from sigscale.demo import run_demo

    run_demo(Path(args.out), quick=args.quick, nproc=args.nproc, loss=args.loss, cluster=args.cluster, seed=args.seed)
    return 0


def _bench_arguments(b: argparse.ArgumentParser) -> None:
    b.add_argument("what", choices=sorted(BENCHES), help="which benchmark")
    b.add_argument("--out", help="JSON path to write")
    b.add_argument("--world-sizes", help="comma-separated, e.g. 1,2,4,8")
    b.add_argument("--batch-sizes", help="comma-separated global batches, e.g. 4096,16384")
    b.add_argument("--dim", type=int, help="loss/bound: embedding width (default: the benchmark's own)")
    b.add_argument("--impls", help="comma-separated: sigscale,open_clip_bidir,open_clip_gather,naive_allgather,...")
    b.add_argument("--repeats", type=int, help="timed repetitions per point (default: the benchmark's own)")
    b.add_argument("--chunk-size", type=int, help="loss: rows per chunk of the chunked loss (default: its own)")
    b.add_argument("--max-seconds", type=float, help="skip points predicted to take longer")
    b.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    b.add_argument("--rows", help="curation: comma-separated candidate counts for the partitioned finalize on "
                   "synthetic metadata, e.g. 1000000,4000000 (without it: the loopback end-to-end bench)")
    b.add_argument("--phash-threshold", type=int, help="curation --rows: pHash Hamming threshold (default 3)")
    b.add_argument("--list-format", choices=("parquet", "csv"), default="parquet",
                   help="curation --rows --sections plan: the synthetic URL list's files (default parquet)")
    b.add_argument("--dry-run", action="store_true", help="gpu: every section on the CPU at tiny shapes")
    b.add_argument("--peer", help="langid: also compare this identifier's top-1 accuracy and speed (lingua; "
                   "needs `pip install lingua-language-detector`)")
    b.add_argument("--config", help="train/memory: experiment config of the towers (default small)")
    b.add_argument("--steps", type=int, help="train/memory: optimizer steps per run")
    b.add_argument("--strategies",
                   help="train/memory: sigscale train.strategy values, e.g. ddp,fsdp (memory: deepspeed:3 = ZeRO-3)")
    b.add_argument("--losses", help="ablation: comma-separated train.loss values (default sigmoid,softmax)")
    b.add_argument("--seeds", help="ablation: comma-separated train.seed values (default 0,1,2)")
    b.add_argument("--nproc", type=int, help="ablation: training processes per run (default 2, as the demo); "
                   "curation --rows: tasks run at once (default 2)")
    b.add_argument("--sections", help="scale: comma-separated real,simulated,train (default all); curation --rows: "
                   "finalize (default) or plan")
    b.add_argument("--check", action="store_true",
                   help="memory: the planner's predicted peak against the engine's on shapes outside its calibration")
    b.add_argument("--capped", action="store_true",
                   help="train: add the point where open_clip runs out of memory under an RLIMIT_AS cap")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sigscale", description=__doc__)
    p.add_argument("--version", action="version", version=f"sigscale {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="STAGE")

    def add(name: str, fn: Callable, help: str, config: bool = False, what: str = "experiment YAML",
            example: str = "train.batch_size=32768") -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(fn=fn)
        if config:
            sp.add_argument("--config", required=True, help=f"{what} (path, or a name in configs/)")
            sp.add_argument("overrides", nargs="*", help=f"dot-list overrides, e.g. {example}")
        return sp

    add("config", cmd_config, "print the fully resolved experiment config", config=True)

    tr = add("train", cmd_train, "train a SigLIP model (resumes from the run's latest checkpoint)", config=True)
    tr.add_argument("--nproc", type=int, default=1, help="local processes (torchrun, default 1); under Slurm/torchrun the env decides")
    tr.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints in train.out_dir")
    tr.add_argument("--resume", metavar="RUN", help="continue the run in RUN (default: a new run dir per launch "
                                                    "unless train.out_dir names one, which resumes)")

    t = add("tokenizer", cmd_tokenizer, "train a SentencePiece tokenizer on a caption corpus")
    t.add_argument("--corpus", required=True, help="text file, one caption per line")
    t.add_argument("--out", required=True, help="path of the .model to write")
    t.add_argument("--vocab-size", type=int, default=32000,
                   help="pieces wanted (default 32000); a small corpus may give fewer, and the command says so")
    t.add_argument("--character-coverage", type=float, default=0.9995,
                   help="share of characters covered by pieces, the rest by byte fallback (default 0.9995)")
    t.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram", help="SentencePiece algorithm")
    t.add_argument("--no-canonicalize", action="store_true",
                   help="keep case and punctuation (default: lower-case, drop punctuation, as big_vision)")

    e = add("export", cmd_export, "export a checkpoint to a Hugging Face SiglipModel dir or an open_clip state dict")
    e.add_argument("--checkpoint", required=True, help="a run dir, step checkpoint, HF dir or open_clip weights")
    e.add_argument("--out", required=True, help="HF: a folder; open_clip: a .safetensors/.pt file or a folder")
    e.add_argument("--format", choices=["hf", "open_clip"], default="hf",
                   help="hf: a transformers SiglipModel dir with its processor; open_clip: weights (default hf)")
    e.add_argument("--tokenizer", help="SentencePiece .model to ship with the HF export (default: the run's own)")
    e.add_argument("--model", help="model config of foreign open_clip weights: a preset or an experiment YAML "
                                   "(sigscale's own exports carry it)")

    _bench_arguments(add("bench", cmd_bench, "run a benchmark and write JSON (see BENCHMARKS.md)"))

    d = add("demo", cmd_demo, "run the whole pipeline end to end on generated data")
    d.add_argument("--out", default="demo_out", help="folder for everything the demo writes (default demo_out)")
    d.add_argument("--quick", action="store_true", help="fewer samples and steps (the test's shortened demo)")
    d.add_argument("--nproc", type=int, default=2, help="training processes (FSDP2 ranks)")
    d.add_argument("--loss", choices=["sigmoid", "softmax"], default="sigmoid",
                   help="softmax: the CLIP loss at the same batch, for a side-by-side with `sigscale report compare`")
    d.add_argument("--seed", type=int, default=0, help="train.seed: tower init and data order (default 0)")
    d.add_argument("--cluster", choices=["slurm", "local"], help="train through `sigscale submit` instead of torchrun")

    # Each stage package owns its subcommands in `<stage>/cli.py` with `register(add)`; importing it
    # must stay cheap (no torch), so `sigscale --help` is instant.
    for stage in STAGE_PACKAGES:
        name = f"sigscale.{stage}.cli"
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name).register(add)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from sigscale.core.config import ConfigError
    from sigscale.core.errors import USER_ERROR_EXIT, SigscaleError, report_user_error

    try:
        return args.fn(args)
    except SigscaleError as e:  # user errors: one line naming cause and fix, no traceback
        kind = "config error" if isinstance(e, ConfigError) else "error"
        report_user_error(f"sigscale: {kind}: {e}")
        return USER_ERROR_EXIT


if __name__ == "__main__":
    sys.exit(main())
