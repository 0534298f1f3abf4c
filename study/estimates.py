"""How well does training predict serving? The acceptance a run estimated while it trained vs the acceptance
`make eval` measures on the evaluation split.

p = target (the teacher), q = draft (the student). alpha = sum_x min(p(x), q(x)), the probability that a token
drafted from q is accepted. Three measurements of the same draft (the run's final student):

    train_alpha  distill.py's per-step mean of alpha over the trained tokens, at the loss temperature WITHOUT
                 top-p, on the student's own samples of training prompts (free: from the loss's sweep). Per
                 step it sees one batch and the student before that step's update, so a run's value here is
                 the mean over its last TAIL_SHARE of steps (at least one).
    val_alpha    distill.py --eval-every: exact speculative decoding of the final student (the last
                 validation row, after the last step) on held-out validation prompts, with the decoding
                 protocol (processed p and q: temperature and top-p), pooled over tested positions (up to
                 each round's first rejection).
    eval alpha   evaluate.py's pooled analytic alpha on the evaluation split (pooled_alpha: the mean over every
                 tested position), same protocol: what serving sees.

`compare` gives, per task over the study's runs, the mean signed and absolute differences of train_alpha and
val_alpha from the eval alpha and their correlation across runs; `plot_estimates` draws each run as a point
(eval alpha on x, the estimates on y, the diagonal = a perfect estimate); `estimate_sentences` says it in words.
report.py calls these; they take the eval entries and the runs' metrics.jsonl and are tested without training.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

TAIL_SHARE = 0.1    # train_alpha of a run: the mean over its last 10% of steps
ESTIMATES = ("train_alpha", "val_alpha")


def run_estimates(run_dir) -> dict:
    """{"train_alpha", "val_alpha"} of one run from its metrics.jsonl (NaN where the run logged none: an
    older run, or no --eval-every)."""
    rows = [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl") if line.strip()]
    train = [r["train_alpha"] for r in rows if r.get("train_alpha") is not None]
    tail = train[-max(1, math.ceil(TAIL_SHARE * len(train))):] if train else []
    val = [r["val_alpha"] for r in rows if r.get("val_alpha") is not None]
    return {"train_alpha": float(np.mean(tail)) if tail else math.nan, "val_alpha": val[-1] if val else math.nan}


def collect_estimates(entries: dict) -> list[dict]:
    """One point per trained run of an eval.json's entries ({name: entry}; the baseline has no training run):
    {"name", "eval_alpha", "train_alpha", "val_alpha"}. The run directory is the parent of the entry's path
    (<run>/final)."""
    points = []
    for name, e in entries.items():
        run_dir = Path(e.get("path", "")).parent
        if name == "baseline" or not (run_dir / "metrics.jsonl").exists():
            continue
        points.append({"name": name, "eval_alpha": float(e["pooled_alpha"]), **run_estimates(run_dir)})
    return points


def compare(points: list[dict]) -> dict:
    """Per estimate: {"n", "bias" (mean estimate - eval), "mae" (mean |estimate - eval|), "r" (Pearson
    correlation across runs; NaN with fewer than 3 runs or no spread)} over the runs that have it."""
    out = {}
    for key in ESTIMATES:
        pts = [(p[key], p["eval_alpha"]) for p in points if not math.isnan(p[key]) and not math.isnan(p["eval_alpha"])]
        est, ev = (np.array(x, dtype=float) for x in zip(*pts)) if pts else (np.array([]), np.array([]))
        r = (float(np.corrcoef(est, ev)[0, 1]) if len(pts) >= 3 and est.std() > 0 and ev.std() > 0 else math.nan)
        out[key] = {"n": len(pts), "bias": float(np.mean(est - ev)) if pts else math.nan,
                    "mae": float(np.mean(np.abs(est - ev))) if pts else math.nan, "r": r}
    return out


def estimate_sentences(task: str, summary: dict) -> list[str]:
    """One sentence per task on how close the training-time estimates are to the served alpha."""
    parts = []
    for key, what in (("val_alpha", "val_alpha (exact speculative decoding on validation prompts)"),
                      ("train_alpha", "train_alpha (the loss's alpha, at the loss temperature without top-p)")):
        s = summary[key]
        if s["n"] == 0:
            continue
        r = f", correlation across runs r = {s['r']:.2f}" if not math.isnan(s["r"]) else ""
        parts.append(f"{what} differs from it by {100 * s['mae']:.1f} points on average (mean signed "
                     f"difference {100 * s['bias']:+.1f}{r}; {s['n']} runs)")
    if not parts:
        return []
    return [f"On {task}, against the analytic alpha make eval measures on the evaluation split: "
            + "; ".join(parts) + "."]


def plot_estimates(points_by_task: dict, path) -> Path:
    """Scatter per task: eval alpha (x) vs train_alpha and val_alpha (y) of each run, with the diagonal."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(points_by_task)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        pts = points_by_task[task]
        for key, marker in (("val_alpha", "o"), ("train_alpha", "x")):
            xy = [(p["eval_alpha"], p[key]) for p in pts if not math.isnan(p[key])]
            if xy:
                ax.scatter(*zip(*xy), marker=marker, label=key)
        values = [v for p in pts for v in (p["eval_alpha"], p["train_alpha"], p["val_alpha"]) if not math.isnan(v)]
        lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
        pad = 0.05 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=0.8, label="estimate = eval")
        ax.set(title=task, xlabel="alpha measured by make eval (eval split)", ylabel="estimate while training")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def estimates_markdown(summaries: dict, plot_rel: str | None) -> list[str]:
    """The report's section: what is compared, the plot, and per task a table of the comparison."""
    md = ["## How well training predicts serving (train_alpha, val_alpha vs make eval's alpha)", "",
          "Per run (its final student): train_alpha = distill.py's logged alpha over its last "
          f"{100 * TAIL_SHARE:.0f}% of steps (loss temperature, no top-p, the student's own samples of training "
          "prompts); val_alpha = its last validation row (--eval-every: exact speculative decoding of the final "
          "student on held-out validation prompts, the decoding protocol, pooled over tested positions); eval "
          "alpha = evaluate.py's pooled analytic alpha on the evaluation split. Differences in points.", ""]
    if plot_rel:
        md += [f"![training-time estimates vs eval alpha]({plot_rel})", ""]
    md += ["| task | estimate | runs | mean signed difference | mean absolute difference | correlation r |",
           "|---|---|---:|---:|---:|---:|"]
    for task, summary in summaries.items():
        for key in ESTIMATES:
            s = summary[key]
            md.append(f"| {task} | {key} | {s['n']} | {100 * s['bias']:+.1f} | {100 * s['mae']:.1f} | "
                      f"{_r(s['r'])} |")
    return md + [""]


def _r(r: float) -> str:
    return "" if math.isnan(r) else f"{r:.2f}"
