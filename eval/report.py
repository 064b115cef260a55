"""Benchmark reports: JSON (machine-readable), Markdown, and one self-contained HTML page with plots.

``write_report`` turns the records of ``evaluate_checkpoints`` into ``report.json``, ``report.md``
(+ ``plots/*.png``) and ``report.html`` (the same plots inlined as base64 PNG). ``compare_reports``
puts the headline numbers of several reports side by side (``sigscale report compare``).
"""
from __future__ import annotations

import base64
import html
import io
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from sigscale import __version__
from sigscale.core.rundir import RunDir
from sigscale.eval.references import References, hidden, load_references
from sigscale.eval.seeds import ALPHA, LEVEL, METHOD, Group, Test, estimate, group_records, pairs, welch
from sigscale.eval.sources import EvalDataError
from sigscale.eval.views import PUBLISHED, VIEW, languages_heatmap, languages_view, published_views

FORMAT = "sigscale-eval-report/1"


class ReportError(EvalDataError):
    """A report file to read or compare is missing or is not a sigscale eval report."""


NOTE = "note"  # the kind of a table whose note says what its rows share, not a protocol

# The summary metrics, in order; a benchmark reports those it has ("all pairs" sets: R@1 only).
_HEADLINE = ("i2t_r@1", "t2i_r@1", "i2t_r@5", "t2i_r@5", "i2t_r@10", "t2i_r@10", "top1", "top5")


def headline(record: Dict[str, Any]) -> Dict[str, float]:
    """The few numbers that summarise a checkpoint, keyed "benchmark metric"."""
    out: Dict[str, float] = {}
    for name, res in record.get("benchmarks", {}).items():
        stats = res if "top1" in res else res.get("mean") or res.get("all") or {}
        wanted = _HEADLINE if "mean" in res or "top1" in stats else _HEADLINE[:2]
        out.update({f"{name} {m}": stats[m] for m in wanted if m in stats})
    return out


def headline_metrics(records: Sequence[Dict[str, Any]]) -> List[str]:
    """Every headline metric of the records: benchmark by benchmark, each in ``_HEADLINE``'s order
    (R@1, R@5, R@10), not alphabetically (R@1, R@10, R@5)."""
    return sorted({m for r in records for m in headline(r)},
                  key=lambda m: (m.rsplit(" ", 1)[0], _HEADLINE.index(m.rsplit(" ", 1)[1])))


def loss_curve(run_dir: Optional[str]) -> List[Tuple[int, float]]:
    """(step, loss) pairs from a run's metrics; empty when there is none."""
    if not run_dir:
        return []
    run = RunDir(run_dir)
    return [(r["step"], r["loss"]) for r in run.read_jsonl(run.metrics) if "loss" in r]


def label(record: Dict[str, Any]) -> str:
    step = record.get("step")
    name = record.get("name") or Path(record["checkpoint"]).name
    return f"{name}@{step}" if step is not None else name


def unique_labels(records: Sequence[Dict[str, Any]]) -> List[str]:
    """Labels that tell records apart: a label shared by several gets its report's or checkpoint's folder."""
    def folder(path: str) -> str:
        p = Path(path)
        return p.parent.name if p.name == "report.json" else p.name

    names = [label(r) for r in records]
    # First the report a record came from (compare), then its checkpoint path: a step dir vs the final weights.
    for detail in (lambda r: folder(r["report"]) if r.get("report") else "", lambda r: folder(r["checkpoint"])):
        names = [f"{n} ({detail(r)})" if names.count(n) > 1 and detail(r) else n for n, r in zip(names, records)]
    return names


# ----------------------------------------------------------------------------- plots

def _figure(width: float = 7.0, height: float = 3.2):
    import matplotlib

    matplotlib.use("Agg")  # headless: clusters and CI have no display
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), dpi=100)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _pair(per_lang: Dict[str, Dict]) -> Tuple[str, str]:
    """The two per-language metrics to plot: I→T/T→I R@1 for retrieval, top-1/top-5 for classification."""
    return ("i2t_r@1", "t2i_r@1") if "i2t_r@1" in next(iter(per_lang.values())) else ("top1", "top5")


def _language_bars(per_lang: Dict[str, Dict], title: str, chance: Optional[float] = None) -> bytes:
    """Per-language bars of two metrics (see _pair), sorted by the first, with the chance level as a line."""
    a, b = _pair(per_lang)
    langs = sorted(per_lang, key=lambda l: -per_lang[l][a])
    counted = "classes" in per_lang[langs[0]]
    fig, ax = _figure(max(5.0, (0.6 if counted else 0.28) * len(langs) + 2))
    x = list(range(len(langs)))
    ax.bar([i - 0.2 for i in x], [per_lang[l][a] for l in langs], 0.4, label=a)
    ax.bar([i + 0.2 for i in x], [per_lang[l][b] for l in langs], 0.4, label=b)
    # Babel-ImageNet languages name different numbers of classes: the count belongs beside the accuracy.
    ticks = [f"{l}\n{per_lang[l]['classes']} cl." if counted else l for l in langs]
    ax.set_xticks(x, ticks, rotation=90 if len(langs) > 12 else 0, fontsize=8)
    if chance is not None:
        ax.axhline(chance, color="grey", lw=0.8, ls="--", label=f"chance {chance:.2f}%")
    ax.set_ylabel("%")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside the bars
    return _png(fig)


def _i2t_vs_t2i(per_lang: Dict[str, Dict], title: str) -> bytes:
    fig, ax = _figure(4.2, 4.0)
    xs = [v["i2t_r@1"] for v in per_lang.values()]
    ys = [v["t2i_r@1"] for v in per_lang.values()]
    ax.scatter(xs, ys)
    for lang, x, y in zip(per_lang, xs, ys):
        ax.annotate(lang, (x, y), fontsize=7, xytext=(2, 2), textcoords="offset points")
    top = max(xs + ys + [1.0]) * 1.05
    ax.plot([0, top], [0, top], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("I→T R@1 (%)")
    ax.set_ylabel("T→I R@1 (%)")
    ax.set_title(title)
    return _png(fig)


def _curves(records: Sequence[Dict], curve: List[Tuple[int, float]]) -> bytes:
    """Headline metrics over training steps and, on a second axis, the training loss."""
    fig, ax = _figure(9.0)
    by_step = {r["step"]: r for r in records if r.get("step") is not None}  # final weights repeat the last step
    stepped = [by_step[s] for s in sorted(by_step)]
    for i, metric in enumerate(headline(stepped[-1]) if stepped else []):
        # Four benchmarks make a dozen lines: past the 10 default colours, lines also change style.
        ax.plot([r["step"] for r in stepped], [headline(r).get(metric) for r in stepped], marker="o", label=metric,
                color=f"C{i % 10}", ls=("-", "--", ":")[i // 10 % 3])
    ax.set_xlabel("training step")
    ax.set_ylabel("metric (%)")
    if curve:
        ax2 = ax.twinx()
        ax2.plot([s for s, _ in curve], [l for _, l in curve], color="black", lw=0.8, alpha=0.6, label="train loss")
        ax2.set_ylabel("training loss")
        ax2.legend(loc="upper center", fontsize=7)
    if stepped:  # beside the axes: inside, the legend covered the loss curve's steep start
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.12, 1.0))
    ax.set_title("metrics over training")
    return _png(fig)


def _side_by_side(rows: Sequence[Tuple[str, Dict[str, float]]], title: str) -> bytes:
    metrics = sorted({m for _, h in rows for m in h})
    fig, ax = _figure(max(6.0, 0.9 * len(metrics) + 2))
    width = 0.8 / max(1, len(rows))
    for i, (name, h) in enumerate(rows):
        # A metric a record lacks is a gap (NaN), not a bar at zero.
        ax.bar([j + i * width for j in range(len(metrics))], [h.get(m, float("nan")) for m in metrics], width,
               label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))], metrics, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("%")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _png(fig)


def report_plots(records: Sequence[Dict], curves: Dict[str, List[Tuple[int, float]]]) -> Dict[str, bytes]:
    """PNG plots by file stem: per-language bars, I→T vs T→I and the languages view of the last checkpoint,
    curves, comparison."""
    plots: Dict[str, bytes] = {}
    last = records[-1]
    view = languages_view(last)
    if view:
        plots["languages"] = languages_heatmap(*view, f"per language across benchmarks ({label(last)})", _figure, _png)
    for name, res in last.get("benchmarks", {}).items():
        per_lang = res.get("languages")
        if per_lang:
            metric = _pair(per_lang)[0]
            plots[f"{name}_languages"] = _language_bars(per_lang, f"{name}: {metric} per language ({label(last)})",
                                                        res.get("chance_r@1", res.get("chance_top1")))
            if metric == "i2t_r@1":
                plots[f"{name}_i2t_vs_t2i"] = _i2t_vs_t2i(per_lang, f"{name}: I→T vs T→I R@1")
    curve = next((c for c in curves.values() if c), [])
    if sum(r.get("step") is not None for r in records) >= 2 or curve:
        plots["training_curves"] = _curves(records, curve)
    if len(records) >= 2:
        plots["checkpoints"] = _side_by_side(list(zip(unique_labels(records), map(headline, records))),
                                             "checkpoints side by side")
    return plots


# ----------------------------------------------------------------------------- tables

def _fmt(v: Any) -> str:
    if v is None or v == "":
        return "—"  # not measured or not applicable, never a blank that reads like a lost number
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> List[List[str]]:
    return [list(header)] + [[_fmt(c) for c in r] for r in rows]


def _shared_columns(header: List[str], rows: List[List[Any]], columns: Sequence[str]) -> Tuple[List[str], List[List[Any]], str]:
    """The named columns whose value every row shares leave the table for one note: long constant cells
    (a run's model and recipe) otherwise push the metrics off the page."""
    shared = [c for c in columns if c in header and rows and len({str(r[header.index(c)]) for r in rows}) == 1]
    keep = [i for i, h in enumerate(header) if h not in shared]
    note = "; ".join(f"{c}: {_fmt(rows[0][header.index(c)])}" for c in shared)
    return [header[i] for i in keep], [[r[i] for i in keep] for r in rows], note


def _tables(records: Sequence[Dict], refs: References) -> List[Tuple[str, List[List[str]], str, str]]:
    """(title, rows with header first, note, kind) for the summary, each benchmark of the last checkpoint with
    the published results that compare with it, and the languages view."""
    out = []
    metrics = headline_metrics(records)
    header, rows, note = _shared_columns(
        ["checkpoint", "kind", "step", "model", "recipe", "config hash"] + metrics,
        [[name, r.get("kind"), r.get("step"), r.get("model"), r.get("recipe"), r.get("config_hash")]
         + [headline(r).get(m) for m in metrics] for name, r in zip(unique_labels(records), records)],
        ("model", "recipe", "config hash"))
    out.append(("Summary", _table(header, rows), note, NOTE))
    last = records[-1]
    for name, res in last.get("benchmarks", {}).items():
        note = res.get("protocol", "")
        if res.get("data"):
            note += f"; data: {res['data']}"
        chance = {k: v for k, v in res.items() if k.startswith("chance")}
        if chance:
            note += "; chance: " + ", ".join(f"{k[7:]} {v:.2f}%" for k, v in chance.items())
        if hidden(refs, name, res):
            note += f"; {hidden(refs, name, res)}"
        if "all" in res and not res.get("languages"):
            ks = [m for m in res["all"] if "@" in m]  # the counts are columns of their own
            out.append((f"{name} ({label(last)})", _table(["images", "captions"] + ks,
                                                          [[res["images"], res.get("captions")] +
                                                           [res["all"][m] for m in ks]]), note))
        if "top1" in res:
            rows = [[res["images"], res["classes"], res["top1"], res["top5"], res["templates"]]]
            out.append((f"{name} ({label(last)})", _table(["images", "classes", "top-1", "top-5", "templates"], rows), note))
        if res.get("languages"):
            ks = [m for m in next(iter(res["languages"].values()))
                  if ("@" in m or m.startswith("top") or m == "classes") and not m.startswith("chance")]
            langs = sorted(res["languages"], key=lambda l: -res["languages"][l][ks[0]])
            rows = [[l] + [res["languages"][l][m] for m in ks] for l in langs]
            if "mean" in res:
                rows.append(["**mean**"] + [res["mean"].get(m) for m in ks])
            if "all" in res:
                rows.append(["**all pairs**"] + [res["all"][m] for m in ks])
            out.append((f"{name} per language ({label(last)})", _table(["language"] + ks, rows), note))
        out += [(title, _table(rows[0], rows[1:]), vnote, kind)
                for title, rows, vnote, kind in published_views(name, res, refs, (label(last), last.get("model") or ""))]
    view = languages_view(last)
    if view:
        out.append((f"Languages view ({label(last)})", _table(*view),
                    "per language, each multilingual benchmark's zero-shot top-1 or I→T / T→I R@1 (%); — where a "
                    "benchmark lacks the language; codes unified (Babel-ImageNet EN → en, XTD10 jp → ja)", VIEW))
    return out


def _markdown(title: str, tables, plot_files: Dict[str, str], intro: str) -> str:
    lines = [f"# {title}", "", intro, ""]
    for name, rows, note, *kind in tables:
        lines += [f"## {name}", ""]
        if kind == [PUBLISHED]:  # other models' numbers: said before the table, not only in its title
            lines += [f"> **{note}**", ""]
        elif note:
            lines += [f"{'' if kind else 'Protocol: '}{note}", ""]
        lines.append("| " + " | ".join(rows[0]) + " |")
        lines.append("|" + "---|" * len(rows[0]))
        lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
        lines.append("")
    if plot_files:
        lines += ["## Plots", ""] + [f"![{k}]({v})" for k, v in plot_files.items()] + [""]
    return "\n".join(lines)


def _html(title: str, tables, plots: Dict[str, bytes], intro: str) -> str:
    esc = html.escape
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>"
             "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}td{white-space:nowrap}"
             "th{background:#eee}.note{color:#555;font-size:90%}.wide{overflow-x:auto}img{max-width:100%}"
             f".{PUBLISHED}{{background:#fff8e1;border-left:6px solid #f0a500;padding:0.2em 1em;margin:1em 0}}"
             f".{PUBLISHED} .note{{color:#7a4f00;font-weight:bold}}"
             "</style></head><body>",
             f"<h1>{esc(title)}</h1><p>{esc(intro)}</p>"]
    for name, rows, note, *kind in tables:
        published = kind == [PUBLISHED]
        parts.append(f"<div class='{PUBLISHED}'>" if published else "<div>")
        parts.append(f"<h2>{esc(name)}</h2>")
        if note:
            parts.append(f"<p class='note'>{'' if kind else 'Protocol: '}{esc(note)}</p>")
        parts.append("<div class='wide'><table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in rows[0]) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{esc(c.strip('*'))}</td>" for c in r) + "</tr>" for r in rows[1:]]
        parts.append("</table></div></div>")
    for name, png in plots.items():
        data = base64.b64encode(png).decode("ascii")
        parts.append(f"<h3>{esc(name)}</h3><img alt='{esc(name)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _write_pages(out: Path, stem: str, title: str, tables, plots: Dict[str, bytes], intro: str) -> Dict[str, Path]:
    (out / "plots").mkdir(parents=True, exist_ok=True)
    files = {}
    for name, png in plots.items():
        (out / "plots" / f"{name}.png").write_bytes(png)
        files[name] = f"plots/{name}.png"
    (out / f"{stem}.md").write_text(_markdown(title, tables, files, intro), encoding="utf-8")
    (out / f"{stem}.html").write_text(_html(title, tables, plots, intro), encoding="utf-8")
    return {"md": out / f"{stem}.md", "html": out / f"{stem}.html"}


# ----------------------------------------------------------------------------- entry points

def write_report(records: List[Dict[str, Any]], out_dir: Path, title: str = "sigscale evaluation",
                 job: Optional[Dict[str, Any]] = None, references: Optional[References] = None) -> Dict[str, Path]:
    """Write report.json, report.md (+ plots/) and report.html for the records of one eval job.

    ``references``: the published results to set beside the run's numbers (default: eval/references.json).
    """
    if not records:
        raise ReportError("no evaluation records to report; evaluate at least one checkpoint")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    curves = {r["run_dir"]: loss_curve(r["run_dir"]) for r in records if r.get("run_dir")}
    doc = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "sigscale_version": __version__,
           "title": title, "job": job or {}, "records": records, "loss_curves": {k: v for k, v in curves.items() if v}}
    (out / "report.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False), encoding="utf-8")
    intro = (f"{len(records)} checkpoint(s); benchmarks: "
             f"{', '.join(sorted({b for r in records for b in r.get('benchmarks', {})}))}; generated {doc['created']}.")
    data = (job or {}).get("curation")
    if data:  # where the training data came from, next to what it produced
        drops = ", ".join(f"{k} {v}" for k, v in data.get("dropped", {}).items())
        intro += f" Trained on {data['kept']} curated pairs of {data['rows']} URL-list rows (dropped: {drops or 'none'})."
    refs = references if references is not None else load_references()
    paths = _write_pages(out, "report", title, _tables(records, refs), report_plots(records, curves), intro)
    return {"json": out / "report.json", **paths}


def read_report(path: Path) -> Dict[str, Any]:
    """A report.json (or the folder holding one), checked to be a sigscale eval report."""
    p = Path(path)
    p = p / "report.json" if p.is_dir() else p
    if not p.is_file():
        raise ReportError(f"{p} not found; pass a folder written by `sigscale eval --out` or its report.json")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ReportError(f"{p} is not valid JSON ({e}); re-run `sigscale eval`") from e
    if doc.get("format") != FORMAT:
        raise ReportError(f"{p} has format {doc.get('format')!r}, expected {FORMAT!r}; it was not written by sigscale eval")
    return doc


def compare_reports(paths: Sequence[Path], out_dir: Path, title: str = "sigscale comparison") -> Dict[str, Path]:
    """A comparison table (and bar chart) of the headline numbers of every checkpoint in several reports."""
    if len(paths) < 1:
        raise ReportError("give at least one report to compare")
    records = []
    for p in paths:
        for r in read_report(p)["records"]:
            records.append({**r, "report": str(p)})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = headline_metrics(records)
    names = unique_labels(records)
    # The checkpoint's label already names its report folder (compare.json keeps the paths and config hashes).
    header, body, shared = _shared_columns(["checkpoint", "step", "model", "recipe"] + metrics,
                                           [[name, r.get("step"), r.get("model"), r.get("recipe")]
                                            + [headline(r).get(m) for m in metrics] for name, r in zip(names, records)],
                                           ("model", "recipe"))
    rows = _table(header, body)
    protocols = sorted({f"{b}: {res.get('protocol', '')}" for r in records for b, res in r["benchmarks"].items()})
    groups = group_records(records, names)
    seed_tables, seed_doc = _seed_groups(groups, metrics)
    tables = seed_tables + [("Headline metrics, every checkpoint", rows,
                             (f"{shared}. " if shared else "") + "Protocol: " + " | ".join(protocols), NOTE)]
    replicated = any(len(g.records) > 1 for g in groups)
    plots = {"seed_groups": _group_bars(groups, metrics)} if replicated else \
        {"comparison": _side_by_side(list(zip(names, map(headline, records))), title)}
    doc = {"format": FORMAT + "+compare", "reports": [str(p) for p in paths], "metrics": metrics,
           "rows": [{"checkpoint": name, "report": r["report"], "config_hash": r.get("config_hash"), **headline(r)}
                    for name, r in zip(names, records)],
           **seed_doc}
    (out / "compare.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False), encoding="utf-8")
    intro = (f"{len(records)} checkpoint(s) from {len(paths)} report(s) in {len(groups)} group(s) of seed "
             f"replicates. {METHOD}")
    return {"json": out / "compare.json", **_write_pages(out, "compare", title, tables, plots, intro)}


def _seed_groups(groups: Sequence[Group], metrics: Sequence[str]) -> Tuple[List, Dict[str, Any]]:
    """The tables of seed groups (mean ± CI per metric) and of Welch's tests between them, and their JSON."""
    est = {id(g): {m: estimate(g.values(m, headline)) for m in metrics if g.values(m, headline)} for g in groups}
    group_rows = [[g.label, g.step, str(len(g.records)) if len(g.records) > 1 else "n = 1, no interval",
                   ", ".join(map(str, g.seeds))] + [est[id(g)][m].text() if m in est[id(g)] else None for m in metrics]
                  for g in groups]
    tables = [(f"Seed groups: mean ± {LEVEL:.0%} CI over seeds", _table(["group", "step", "n", "seeds"] + metrics,
                                                                        group_rows), "")]
    test_rows, tests = [], []
    tested = pairs(groups)
    latest = tested[0][0].step if tested else None  # the table shows the latest step; the JSON has every step
    for a, b in tested:
        results = {m: welch(a.values(m, headline), b.values(m, headline)) for m in metrics
                   if m in est[id(a)] and m in est[id(b)]}
        tests.append({"a": a.label, "b": b.label, "step": a.step, "welch": {m: asdict(t) for m, t in results.items()}})
        if a.step != latest:
            continue
        if all(t.p is None for t in results.values()):  # n = 1 somewhere: one row says so, not one per metric
            test_rows.append([a.step, a.label, b.label, "all", None, None, None, None, None, Test(0, None, None, None).verdict()])
            continue
        for m, t in results.items():
            test_rows.append([a.step, a.label, b.label, m, est[id(a)][m].text(), est[id(b)][m].text(), f"{t.diff:+.2f}",
                              None if t.t is None else f"{t.t:.2f} ({t.df:.1f})",
                              None if t.p is None else f"{t.p:.3f}", t.verdict()])
    if test_rows:
        tables.append((f"Distinguishable? Welch's t-test, two-sided, at {ALPHA:.0%}, step {latest} "
                       "(compare.json: every step)",
                       _table(["step", "A", "B", "metric", "A mean ± CI", "B mean ± CI", "Δ (A − B)", "t (df)", "p",
                               "verdict"], test_rows), ""))
    doc = {"groups": [{"label": g.label, "step": g.step, "kind": g.kind, "n": len(g.records), "seeds": g.seeds,
                       "reports": [r.get("report") for r in g.records],
                       "metrics": {m: asdict(e) for m, e in est[id(g)].items()}} for g in groups],
           "tests": tests, "method": METHOD}
    return tables, doc


def _group_bars(groups: Sequence[Group], metrics: Sequence[str]) -> bytes:
    """Bars of each group's mean per metric with its CI as an error bar, at the latest step of the groups."""
    last = max((g.step for g in groups if g.step is not None), default=None)
    shown = [g for g in groups if g.step == last]
    fig, ax = _figure(max(6.0, 0.9 * len(metrics) + 2))
    width = 0.8 / max(1, len(shown))
    for i, g in enumerate(shown):
        es = [estimate(g.values(m, headline)) if g.values(m, headline) else None for m in metrics]
        ax.bar([j + i * width for j in range(len(metrics))], [e.mean if e else float("nan") for e in es], width,
               yerr=[(e.half or 0.0) if e else 0.0 for e in es], capsize=3, label=f"{g.label} (n = {len(g.records)})")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))], metrics, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("%")
    ax.set_title(f"seed groups at step {last}: mean ± {LEVEL:.0%} CI")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, not over them
    return _png(fig)
