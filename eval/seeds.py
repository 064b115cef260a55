"""Seed replicates: runs of one recipe that differ only in ``train.seed``, summarised with error bars.

``group_records`` groups eval records by their training config minus the seed and minus where things
were written (the keys in ``IGNORED``), and by checkpoint step. ``estimate`` gives a group's mean and
the half-width of its 95% Student t confidence interval over seeds; ``welch`` says whether two groups
are distinguishable. ``METHOD`` states both in words for the reports.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from sigscale.eval.sources import EvalDataError

LEVEL = 0.95  # two-sided confidence level of the intervals; the test's level is 1 - LEVEL
ALPHA = 1 - LEVEL

# Keys that do not change what a run learns: the seed (what replicates vary) and where files live. The data
# and tokenizer paths are paths to the same curated files in every run of an ablation; the run's own
# tokenizer lies in its run dir, so its path differs per run even when the recipe does not.
IGNORED = ("train.seed", "train.out_dir", "tokenizer.model", "data.shards", "data.caption_corpus",
           "eval.imagenet_dir", "eval.classification_dir", "eval.classnames", "eval.xm3600_dir",
           "eval.retrieval_shards")

METHOD = (f"Runs are grouped by training config minus {', '.join(IGNORED)}, and by checkpoint step. "
          f"Each cell is the mean over the group's seeds ± the half-width of the {LEVEL:.0%} Student t interval, "
          "t(0.975, n−1)·s/√n with s the sample standard deviation over seeds (n ≥ 2); one run gives its value "
          f"and \"n = 1, no interval\". Two groups are called distinguishable when Welch's unequal-variance t-test "
          f"(Welch 1947, Biometrika 34:28–35; Welch–Satterthwaite degrees of freedom) gives a two-sided p < {ALPHA:.2f}; "
          "with n = 1 in either group there is no test. With 3 seeds per group the test detects only differences "
          "several times the seed-to-seed spread: \"not distinguishable\" is not \"equal\".")


class GroupError(EvalDataError):
    """Records cannot be grouped into seed replicates as given (one run passed twice)."""


@dataclass(frozen=True)
class Estimate:
    """The mean of a metric over a group's seeds and its confidence interval's half-width (None: n = 1)."""
    n: int
    mean: float
    half: Optional[float]
    sd: Optional[float]

    def text(self, digits: int = 1) -> str:
        if self.half is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.half:.{digits}f}"


def estimate(values: Sequence[float]) -> Estimate:
    """Mean ± the half-width of the two-sided ``LEVEL`` Student t interval over the values."""
    from scipy import stats

    n = len(values)
    if n == 0:
        raise ValueError("no values to estimate from")
    mean = sum(values) / n
    if n == 1:
        return Estimate(1, mean, None, None)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return Estimate(n, mean, float(stats.t.ppf(1 - ALPHA / 2, n - 1)) * sd / math.sqrt(n), sd)


@dataclass(frozen=True)
class Test:
    """Welch's t-test of two groups' means: difference a − b, t, degrees of freedom, two-sided p."""
    diff: float
    t: Optional[float]
    df: Optional[float]
    p: Optional[float]

    @property
    def distinguishable(self) -> Optional[bool]:
        return None if self.p is None else self.p < ALPHA

    def verdict(self) -> str:
        if self.p is None:
            return "n = 1 in a group, no test"
        return "distinguishable" if self.distinguishable else "not distinguishable"


def welch(a: Sequence[float], b: Sequence[float]) -> Test:
    """Welch's unequal-variance t-test, two-sided (needs n ≥ 2 in both groups, else p is None)."""
    from scipy import stats

    ea, eb = estimate(a), estimate(b)
    diff = ea.mean - eb.mean
    if ea.sd is None or eb.sd is None:
        return Test(diff, None, None, None)
    va, vb = ea.sd ** 2 / ea.n, eb.sd ** 2 / eb.n
    if va + vb == 0:  # every seed gave the same number in both groups: the means differ or they do not
        return Test(diff, None, None, 0.0 if diff else 1.0)
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (ea.n - 1) + vb ** 2 / (eb.n - 1))
    return Test(diff, t, df, float(2 * stats.t.sf(abs(t), df)))


# ----------------------------------------------------------------------------- grouping

def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def record_config(record: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The training config of a record, flattened to dotted keys: the record's own, else its run dir's."""
    if record.get("config"):
        return _flatten(record["config"])
    path = Path(record["run_dir"]) / "config.yaml" if record.get("run_dir") else None
    if path is None or not path.is_file():
        return None  # an HF dir or foreign weights: no recipe known, the record stands alone
    import yaml

    return _flatten(yaml.safe_load(path.read_text(encoding="utf-8")) or {})


@dataclass
class Group:
    """Records of one recipe at one step, one per seed."""
    recipe: Optional[Dict[str, Any]]  # flattened config minus IGNORED; None: unknown, a group of one
    step: Optional[int]
    kind: str
    records: List[Dict[str, Any]] = field(default_factory=list)
    label: str = ""

    @property
    def seeds(self) -> List[Any]:
        return [r.get("_seed") for r in self.records]

    def values(self, metric: str, headline) -> List[float]:
        return [headline(r)[metric] for r in self.records if metric in headline(r)]


def _run_name(record: Dict[str, Any]) -> str:
    return record.get("report") or record.get("checkpoint", "?")


def group_records(records: Sequence[Dict[str, Any]], names: Sequence[str]) -> List[Group]:
    """Seed groups in first-seen order, each labelled by the config keys that tell the groups apart.

    ``names`` are the records' display labels, used for records whose config is unknown."""
    groups: Dict[Tuple, Group] = {}
    for i, (r, name) in enumerate(zip(records, names)):
        cfg = record_config(r)
        seed = cfg.get("train.seed") if cfg else None
        recipe = {k: v for k, v in cfg.items() if k not in IGNORED} if cfg else None
        # Numbers of one run under two protocols (or on two data sets) are not replicates of each other.
        protocol = {b: (res.get("protocol"), res.get("data")) for b, res in r.get("benchmarks", {}).items()}
        key = (json.dumps([recipe, protocol], sort_keys=True, default=str), r.get("step"), r.get("kind")) \
            if cfg else ("", i)
        g = groups.setdefault(key, Group(recipe, r.get("step"), r.get("kind", ""), label="" if cfg else name))
        twin = next((o for o in g.records if o["_seed"] == seed), None) if cfg else None
        if twin is not None:
            raise GroupError(f"the run with seed {seed} at step {r.get('step')} is given twice ({_run_name(twin)} and "
                             f"{_run_name(r)}); pass each run's report once")
        g.records.append({**r, "_seed": seed})
    out = list(groups.values())
    _label(out)
    return out


def _label(groups: List[Group]) -> None:
    """Name each group by the config keys whose values differ between the groups (the recipe's name if none)."""
    known = [g for g in groups if g.recipe is not None]
    keys = sorted({k for g in known for k in g.recipe})
    varying = [k for k in keys if len({json.dumps(g.recipe.get(k), default=str) for g in known}) > 1]
    leaves = [k.rsplit(".", 1)[-1] for k in varying]
    # The leaf name is enough ("loss=softmax") unless two varying keys share it (vision/text width).
    names = [leaf if leaves.count(leaf) == 1 else k for k, leaf in zip(varying, leaves)]
    for g in known:
        parts = [f"{name}={g.recipe.get(k)}" for name, k in zip(names, varying)]
        g.label = ", ".join(parts) if parts else str(g.recipe.get("name", "run"))
    # Groups of one recipe at one step that still share a label differ in what was loaded or how it was evaluated.
    def folder(g: Group) -> str:
        p = Path(_run_name(g.records[0]))
        return p.parent.name if p.name == "report.json" else p.name

    for detail in (lambda g: g.kind, folder):
        labels = [(g.label, g.step) for g in known]
        for g in known:
            if labels.count((g.label, g.step)) > 1:
                g.label += f" ({detail(g)})"


def pairs(groups: Sequence[Group]) -> List[Tuple[Group, Group]]:
    """Pairs of groups to test against each other: same step and kind, different recipe; latest step first."""
    out = [(a, b) for i, a in enumerate(groups) for b in groups[i + 1:]
           if a.step == b.step and a.kind == b.kind and a.recipe is not None and b.recipe is not None]
    return sorted(out, key=lambda ab: -(ab[0].step or 0))
