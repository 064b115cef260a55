"""Tokenizer throughput: can batch encoding keep up with training? Writes JSON."""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Dict

from sigscale.curation import synthetic
from sigscale.pretrain.tokenizer import Tokenizer, train_tokenizer


def run_tokenizer_bench(out_json: str | Path, n_captions: int = 50_000, vocab_size: int = 8000,
                        context_length: int = 64, batch_size: int = 1024) -> Dict:
    """Captions/s of SigLIP-style encoding (canonicalise, sticky EOS, pad) on the multilingual corpus."""
    captions = [c for _, _, c in synthetic.samples(n_captions, seed=7)]
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model = train_tokenizer(captions[:20_000], Path(tmp) / "bench.model", vocab_size=vocab_size)
        train_s = time.perf_counter() - t0
        tok = Tokenizer(model, context_length=context_length)
        tok(captions[:batch_size])  # warm-up
        t0 = time.perf_counter()
        for s in range(0, n_captions, batch_size):
            tok(captions[s:s + batch_size])
        enc_s = time.perf_counter() - t0
    result = {"captions": n_captions, "vocab": tok.vocab_size, "context_length": context_length,
              "batch_size": batch_size, "train_seconds_20k": round(train_s, 2),
              "captions_per_s": round(n_captions / enc_s), "languages": list(synthetic.LANGUAGES),
              "loadavg_1min": [round(load, 2), round(os.getloadavg()[0], 2)]}
    Path(out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(out_json).write_text(json.dumps(result, indent=1))
    return result


def render_markdown(r: Dict) -> str:
    """The BENCHMARKS.md table of a ``run_tokenizer_bench`` result."""
    return "\n".join([
        "| captions | languages | vocab | context | batch | captions/s (1 process) | 1-minute load (start / end) |",
        "|---:|---|---:|---:|---:|---:|---|",
        f"| {r['captions']:,} | {' '.join(r['languages'])} | {r['vocab']} | {r['context_length']} | {r['batch_size']} "
        f"| {r['captions_per_s']:,} | {r['loadavg_1min'][0]} / {r['loadavg_1min'][1]} |"]) + "\n"
