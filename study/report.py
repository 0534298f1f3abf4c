"""The whole study in one command: train, evaluate, analyse, and write results/REPORT.md.

For each task (gsm8k: low teacher entropy, cnndm: high) on one preset (default: the offline tiny
pair):
  0. tune ajsd: train it at every (floor, scale) of a small grid and score each on VALIDATION
     prompts (train-split prompts no training run sees; the eval split is disjoint by data.py's
     hash), then keep the best setting (`tune_ajsd`). The eval prompts are never touched here.
  1. train a draft with each divergence (fkl, rkl, jsd beta=0.5, tvd, ajsd with the selected
     setting, and the acceptance objectives nla and lk at distill.py's defaults; distill.main) for several
     training seeds, each validating its final student once (--eval-every, for estimates.py);
  2. evaluate the baseline (untrained) draft and every trained one with batched speculative
     decoding (evaluate.main --record: gamma 5, top-p 0.95, the task's temperature), every run on
     the same eval prompts with the same sampling seed; then:

  the table   task x divergence: token acceptance (accepted / drafted, macro-mean over prompts),
              analytic alpha (mean over tested positions, up to each round's first rejection, of
              sum_x min(p, q); p = teacher, q = draft),
              mean accepted length (tokens per target call, bonus included); each the mean over seeds
              of the per-seed mean over prompts, with a 95% interval from `crossed_bootstrap`.
  intervals   prompts and seeds are CROSSED (every seed decodes the same prompts), so a bootstrap
              replicate draws one multiset of prompts, shared by all runs, and the seeds of each
              divergence with replacement. A difference A - B uses the same prompt draw on both sides
              (paired by prompt: the prompts' shared difficulty cancels) and each side's own seeds.
  differences each divergence minus the baseline and minus the best fixed divergence (fkl, rkl, jsd,
              tvd: the highest mean), overall and per entropy bin. The headline comparisons (HEADLINE:
              the seed's claims, rkl vs jsd on gsm8k, jsd vs fkl on cnndm) are stated as separated
              (interval excludes 0), equivalent (interval within +/- EQUIV_MARGIN) or bounded.
  entropy     two views of the teacher's entropy at each drafted position (entropy.VIEWS): processed
              H(p) after top-p (what verification uses; exactly 0 at most positions) and tempered H
              before top-p (continuous). Bins per task and view come from the data
              (entropy.quantile_edges: H = 0 its own bin, quantiles of the rest), so none is empty.
              Per bin: acceptance levels (Wilson, seeds pooled) and differences with bootstrap
              intervals (tokens of one prompt stay together), plotted per task.
  estimates   each run's train_alpha and val_alpha (logged while training) against the eval alpha of
              its final student (estimates.py): a plot, a table and a sentence per task.
  sentences   generated from the numbers.

Data: `--source` / `--data-path` as distill.py and evaluate.py take them (data.resolve_source); a path
is one task's folder (its train.* files train, its test.* files evaluate). Every row of both splits is
checked (check_data) before anything trains.

Every number in REPORT.md is computed in this process from the eval JSON this invocation wrote; a
run that is missing or failed raises MissingRunError, so a partial table is never written.
`--quick` (what CI runs): two seeds, a 2 x 2 ajsd grid, few steps and prompts; it writes
results/quick/REPORT.md so a smoke run never overwrites the real study. Progress is printed as
`[report <seconds>s] ...` lines, one per training run / evaluation / analysis step.

The bootstraps and the difference sentences live in stats.py (shared with curve.py, the entropy curve:
results/CURVE.md). The tables (`collect_runs`, `build_table`, `differences`,
`bin_differences`, `findings`, ...) are pure: they take already-loaded eval JSON and are tested
without training anything.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from plumbing import cli
from study.stats import EQUIV_MARGIN, crossed_bootstrap, difference_statement, metric_bootstrap

DIVS = ("baseline", "fkl", "rkl", "jsd", "tvd", "ajsd", "nla", "lk")   # jsd: beta = 0.5 (distill's default)
FIXED = ("fkl", "rkl", "jsd", "tvd")      # the fixed divergences; ajsd, nla and lk are compared with their best
ACCEPTANCE_OBJECTIVES = ("nla", "lk")     # LK losses' objectives (divergences.py), distill.py's defaults
VALIDATE_AT_END = 10**9                   # --eval-every: one validation, after the last step (estimates.py)
METRICS = ("token_acceptance", "alpha", "mean_accepted_length")
METRIC_NAMES = {"token_acceptance": "token acceptance", "alpha": "analytic alpha",
                "mean_accepted_length": "mean accepted length"}
SEED_CLAIM = {"gsm8k": "rkl", "cnndm": "jsd"}            # the seed project's best divergence per task


class MissingRunError(RuntimeError):
    """An expected (task, divergence, seed) run has no evaluation: the report refuses to be partial."""


# ----------------------------------------------------------------------------- config

@dataclass
class ReportConfig:
    preset: str = "tiny"
    tasks: tuple = ("gsm8k", "cnndm")
    divs: tuple = DIVS
    seeds: tuple = tuple(range(8))    # sized from the measured seed-to-seed spread (docs/benchmarks.md)
    steps: int | None = 150           # training steps per run (half the preset's 300, to fit the hour)
    n_prompts: int | None = 512       # eval prompts per task and run: the prompts, not the seeds, limit
                                      # the intervals (docs/benchmarks.md), and evaluation is cheap
    n_profile: int = 32               # prompts the teacher samples for the entropy profile
    n_bins: int = 6                   # quantile bins of the positive entropies per view (+ the H = 0 bin)
    ajsd_floors: tuple = (0.25, 0.5, 0.75)   # the ajsd grid, tuned on validation prompts
    ajsd_scales: tuple = (0.3, 1.0, 3.0)     # nats
    grid_seeds: tuple = (0,)          # training seeds per grid point
    n_val: int = 256                  # validation prompts (train split, unused by every training run)
    n_val_train: int = 32             # distill.py --eval-prompts: each run validates its final student once
    runs: str = "runs/report"         # trained students: <runs>/<preset>/<task>/<div>-s<seed>
    results: str = "results/report"   # eval JSON + plots
    out: str = "results/REPORT.md"
    n_boot: int = 2000
    reuse: bool = False               # skip training where <run>/final exists (same settings assumed), and
                                      # evaluation where eval.json holds exactly this study's drafts
    quick: bool = False
    source: str | None = None         # the data (data.resolve_source): standin | file | hub; None = the preset's
    data_path: str | None = None      # a folder with train.* and test.* files of one task (README, "Data")
    threads: int = 1                  # CPU threads of every training and evaluation (cli.DEFAULT_THREADS)

    def data_args(self) -> list[str]:
        """--source / --data-path as given, for distill.py and evaluate.py (one rule: data.resolve_source)."""
        return ((["--source", self.source] if self.source else [])
                + (["--data-path", self.data_path] if self.data_path else []))


QUICK = dict(seeds=(0, 1), steps=8, n_prompts=16, n_profile=8, runs="runs/quick", results="results/quick",
             out="results/quick/REPORT.md", n_boot=1000, n_bins=3, ajsd_floors=(0.25, 0.75),
             ajsd_scales=(0.3, 3.0), n_val=8, n_val_train=8)
HEADING = "# Report: which divergence distils the best draft?"   # REPORT.md's first line (+ the preset)
HEADLINE = {"gsm8k": ("rkl", "jsd"), "cnndm": ("jsd", "fkl")}   # the comparisons the study must resolve


def run_name(div: str, seed: int) -> str:
    """The run directory / eval entry of one trained student (distill.py's default naming)."""
    return "baseline" if div == "baseline" else f"{div}-s{seed}"


# ----------------------------------------------------------------------------- tables (pure)

def per_prompt_metrics(entry: dict) -> dict[str, np.ndarray]:
    """One evaluated run's per-prompt metrics as arrays (the eval JSON's `per_prompt`)."""
    pp = entry.get("per_prompt")
    if pp is None:
        raise ValueError(f"eval entry has no 'per_prompt' metrics (keys: {sorted(entry)})")
    if isinstance(pp, list):   # list of {metric: value} rows -> columns
        pp = {m: [row.get(m, np.nan) for row in pp] for m in METRICS}
    missing = [m for m in METRICS if m not in pp]
    if missing:
        raise ValueError(f"per-prompt metrics lack {missing}; have {sorted(pp)}")
    return {m: np.asarray([np.nan if v is None else v for v in pp[m]], dtype=np.float64) for m in METRICS}


def collect_runs(evals: dict, divs=DIVS, seeds=(0, 1, 2)) -> dict:
    """evals: {task: {run_name: eval entry}} -> {task: {div: [per-seed per-prompt metrics]}}.
    Raises MissingRunError listing EVERY missing run when any expected one is absent."""
    missing, out = [], {}
    for task, runs in evals.items():
        out[task] = {}
        for div in divs:
            names = [run_name(div, s) for s in (seeds if div != "baseline" else (None,))]
            absent = [n for n in names if n not in runs]
            missing += [f"{task}/{n}" for n in absent]
            if not absent:
                out[task][div] = [per_prompt_metrics(runs[n]) for n in names]
    if missing:
        raise MissingRunError(f"no evaluation for {len(missing)} expected run(s): {', '.join(missing)}; "
                              f"train and evaluate them (or drop them from --divs/--seeds) before reporting")
    return out


@dataclass
class Row:
    task: str
    div: str
    n_seeds: int
    n_prompts: int
    stats: dict          # metric -> (mean, lo, hi)


def build_table(collected: dict, n_boot: int = 2000) -> list[Row]:
    """One Row per (task, div): each metric's mean and 95% bootstrap interval (metric_bootstrap)."""
    rows = []
    for task, by_div in collected.items():
        for div, seeds in by_div.items():
            stats = {m: metric_bootstrap(seeds, m, n_boot) for m in METRICS}
            rows.append(Row(task, div, len(seeds), int(np.mean([len(s[METRICS[0]]) for s in seeds])), stats))
    return rows


def best_fixed(by_div: dict, metric: str = "token_acceptance") -> str | None:
    """The trained fixed divergence (FIXED: not the baseline, ajsd, nla or lk) with the highest mean of `metric`.
    by_div: {div: [per-seed per-prompt metrics]} (collect_runs' value for one task)."""
    means = {d: np.mean([np.nanmean(s[metric]) for s in seeds]) for d, seeds in by_div.items() if d in FIXED}
    return max(means, key=means.get) if means else None


def differences(by_div: dict, n_boot: int = 2000, metric: str = "token_acceptance") -> dict:
    """Per divergence of one task: its `metric` minus the baseline's and minus the best fixed
    divergence's, each (mean, lo, hi) from crossed_bootstrap (None where not applicable).
    -> {"best": best fixed div, "rows": {div: {"baseline": diff, "best": diff}}}"""
    best = best_fixed(by_div, metric)
    rows = {}
    for div, seeds in by_div.items():
        if div == "baseline":
            continue
        rows[div] = {ref: (metric_bootstrap(seeds, metric, n_boot, vs=by_div[name])
                           if name in by_div and name != div else None)
                     for ref, name in (("baseline", "baseline"), ("best", best))}
    return {"best": best, "rows": rows}


def best_vs_runner_up(by_div: dict, n_boot: int = 2000, metric: str = "token_acceptance"):
    """(best, runner-up, paired difference best - runner-up) among the trained divergences of one
    task, by mean `metric`; None with fewer than two."""
    means = {d: np.mean([np.nanmean(s[metric]) for s in seeds]) for d, seeds in by_div.items() if d != "baseline"}
    if len(means) < 2:
        return None
    best, runner = sorted(means, key=means.get, reverse=True)[:2]
    return best, runner, metric_bootstrap(by_div[best], metric, n_boot, vs=by_div[runner])


def headline(by_div: dict, task: str, n_boot: int = 2000, metric: str = "token_acceptance"):
    """The task's headline comparison (HEADLINE: a vs b) as (a, b, diff, sentence); None if absent."""
    if task not in HEADLINE or not set(HEADLINE[task]) <= set(by_div):
        return None
    a, b = HEADLINE[task]
    diff = metric_bootstrap(by_div[a], metric, n_boot, vs=by_div[b])
    return a, b, diff, difference_statement(a, b, diff)


def bin_differences(counts: dict, ref: str, n_boot: int = 2000) -> dict:
    """Per-bin acceptance of each divergence minus `ref`'s, crossed bootstrap over seeds and prompts.
    counts: {div: [(n, k) per seed]}, each (P, B) tested / accepted tokens per prompt and bin
    (entropy.per_prompt_bin_counts). -> {div: (mean, lo, hi) arrays of B}, every div but ref."""
    if ref not in counts:
        raise ValueError(f"no reference {ref!r} among {sorted(counts)}")
    rn, rk = [c[0] for c in counts[ref]], [c[1] for c in counts[ref]]
    return {div: crossed_bootstrap([c[1] for c in cs], [c[0] for c in cs], rk, rn, n_boot=n_boot)
            for div, cs in counts.items() if div != ref}


def _pts(stat) -> str:
    """A difference (mean, lo, hi) of rates in points: '+1.2 [-0.3, +2.8]'; '-' if there is none."""
    if stat is None or np.isnan(stat[0]):
        return "-"
    return f"{100 * stat[0]:+.1f} [{100 * stat[1]:+.1f}, {100 * stat[2]:+.1f}]"


def differences_markdown(diffs: dict) -> str:
    """One task's `differences` as a table in points of token acceptance."""
    lines = [f"| divergence | minus baseline [95% CI] | minus best fixed ({diffs['best']}) [95% CI] |",
             "|---|---|---|"]
    for div, d in diffs["rows"].items():
        lines.append(f"| {div} | {_pts(d['baseline'])} | {_pts(d['best'])} |")
    return "\n".join(lines)


def bin_differences_markdown(labels: list, counts_ref: list, diffs: dict) -> str:
    """Bins as rows, divergences as columns: the per-bin difference in points; counts_ref = the
    reference run's tested tokens per bin (pooled), so the reader sees what each row rests on."""
    names = list(diffs)
    lines = ["| bin (nats) | reference tokens | " + " | ".join(names) + " |",
             "|---|---:|" + "---|" * len(names)]
    for i, label in enumerate(labels):
        cells = [_pts(tuple(x[i] for x in diffs[n])) for n in names]
        lines.append(f"| {label} | {int(counts_ref[i])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def select_ajsd(grid: dict):
    """The grid point (floor, scale) with the highest mean validation acceptance; ties -> the first."""
    if not grid:
        raise ValueError("select_ajsd needs at least one grid point")
    return max(grid, key=lambda k: grid[k][0])


def grid_markdown(grid: dict, selected) -> str:
    """floor x scale table of validation token acceptance; the selected setting in bold."""
    floors = sorted({f for f, _ in grid})
    scales = sorted({c for _, c in grid})
    lines = ["| floor \\ scale (nats) | " + " | ".join(f"{c:g}" for c in scales) + " |",
             "|---|" + "---|" * len(scales)]
    for f in floors:
        cells = []
        for c in scales:
            cell = _fmt(grid[(f, c)]) if (f, c) in grid else "-"
            cells.append(f"**{cell}**" if (f, c) == selected else cell)
        lines.append(f"| {f:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(stat, digits=3):
    mean, lo, hi = stat
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def table_markdown(rows: list[Row]) -> str:
    """The seed-style table; the best mean per task and metric in bold."""
    best = {}
    for r in rows:
        for m in METRICS:
            key = (r.task, m)
            if key not in best or r.stats[m][0] > best[key]:
                best[key] = r.stats[m][0]
    lines = ["| task | divergence | seeds | prompts | " + " | ".join(METRIC_NAMES[m] + " [95% CI]" for m in METRICS) + " |",
             "|---|---|---:|---:|" + "---|" * len(METRICS)]
    for r in rows:
        cells = []
        for m in METRICS:
            c = _fmt(r.stats[m], 2 if m == "mean_accepted_length" else 3)
            cells.append(f"**{c}**" if r.stats[m][0] == best[(r.task, m)] else c)
        lines.append(f"| {r.task} | {r.div} | {r.n_seeds} | {r.n_prompts} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def overlaps(a, b) -> bool:
    """Do two (mean, lo, hi) intervals overlap?"""
    return a[1] <= b[2] and b[1] <= a[2]


def findings(rows: list[Row], metric: str = "token_acceptance", paired: dict | None = None) -> list[str]:
    """Plain sentences from the numbers: the seed's ordering, ajsd vs the best fixed divergence.
    paired: {task: (best, runner-up, (mean, lo, hi) of best - runner-up)} (`best_vs_runner_up`): when
    given, the best is separated from the runner-up iff that paired difference excludes 0, which is
    sharper than comparing the two level intervals (it cancels the prompts' shared difficulty)."""
    out = []
    by_task = {}
    for r in rows:
        by_task.setdefault(r.task, {})[r.div] = r.stats[metric]
    name = METRIC_NAMES[metric]
    for task, stats in by_task.items():
        trained = {d: s for d, s in stats.items() if d != "baseline"}
        if not trained:
            continue
        best = max(trained, key=lambda d: trained[d][0])
        claim = SEED_CLAIM.get(task)
        runner = max((d for d in trained if d != best), key=lambda d: trained[d][0], default=None)
        pair = (paired or {}).get(task)
        text = f"On {task}, the best {name} is {best} ({_fmt(trained[best])})"
        if pair is not None and runner is not None and pair[:2] == (best, runner):
            d = pair[2]
            separated = d[1] > 0
            text += (f" and the paired difference to the runner-up, {runner}, {_pts(d)} points, excludes 0"
                     if separated else f", but the paired difference to the runner-up, {runner}, {_pts(d)} "
                     "points, includes 0")
        else:
            separated = runner is None or not overlaps(trained[best], trained[runner])
            if runner is not None:
                text += (" and its interval does not overlap the runner-up's" if separated else
                         f", but its interval overlaps {runner}'s ({_fmt(trained[runner])})")
        if claim in trained:
            if best == claim and separated:
                text += f"; the seed's ordering ({claim} best) reproduces"
            elif best == claim:
                text += f"; the seed's ordering ({claim} best) holds in the means only, not beyond the intervals"
            else:
                text += f"; the seed's ordering ({claim} best, here {_fmt(trained[claim])}) does not reproduce"
        out.append(text + ".")
        if "baseline" in stats:
            base = stats["baseline"]
            better = [d for d, s in trained.items() if s[1] > base[2]]
            out.append(f"On {task}, {len(better)} of {len(trained)} distilled drafts beat the baseline "
                       f"({_fmt(base)}) with non-overlapping intervals" + (f" ({', '.join(better)})." if better else "."))
        if "ajsd" in trained:
            fixed = {d: s for d, s in trained.items() if d in FIXED}
            if fixed:
                bf = max(fixed, key=lambda d: fixed[d][0])
                a = trained["ajsd"]
                if a[0] >= fixed[bf][0] or overlaps(a, fixed[bf]):
                    out.append(f"On {task}, ajsd ({_fmt(a)}) is as good as the best fixed divergence, {bf} "
                               f"({_fmt(fixed[bf])}), within the intervals.")
                else:
                    out.append(f"On {task}, ajsd is NOT as good as the best fixed divergence: {_fmt(a)} vs "
                               f"{bf}'s {_fmt(fixed[bf])}, intervals do not overlap.")
    return out


def objective_sentences(diffs: dict) -> list[str]:
    """nla and lk vs the best fixed divergence of each task: the paired difference with its interval and
    what it supports (difference_statement). diffs: {task: differences(...)}."""
    out = []
    for task, d in diffs.items():
        for div in ACCEPTANCE_OBJECTIVES:
            vs_best = d["rows"].get(div, {}).get("best")
            if vs_best is not None:
                out.append(f"On {task}, the acceptance objective {div} vs the best fixed divergence: "
                           + difference_statement(div, d["best"], vs_best) + ".")
    return out


def profile_sentence(profiles: dict, view: str = "") -> str:
    """Does the tasks' entropy contrast (gsm8k low, cnndm high) hold for this preset's teachers?
    profiles: {task: entropy_profile(...)} of one entropy view (named in the sentence if given)."""
    parts = [f"{t}: median {p['quantiles'][0.5]:.3g}, mean {p['mean']:.3g} nats over {p['n']} tokens"
             for t, p in profiles.items()]
    text = f"Teacher entropy{f' ({view} view)' if view else ''} along its own samples (" + "; ".join(parts) + ")"
    if {"gsm8k", "cnndm"} <= set(profiles):
        low = profiles["gsm8k"]["mean"] < profiles["cnndm"]["mean"]
        text += (": gsm8k is the low-entropy task, as the study assumes" if low else
                 ": gsm8k is NOT lower in entropy than cnndm here, so the study's premise does not hold for these teachers")
    return text + "."


# ----------------------------------------------------------------------------- loading eval JSON

def read_eval(path) -> dict:
    """results/<preset>/<task>/eval.json (evaluate.py) -> its parsed document."""
    path = Path(path)
    if not path.exists():
        raise MissingRunError(f"no evaluation file {path}: run python -m study.evaluate for this task first")
    return json.loads(path.read_text())


def eval_runs(doc: dict) -> dict:
    """An eval.json document -> {run_name: entry}."""
    runs = doc.get("runs", doc)
    if isinstance(runs, list):
        runs = {r["name"]: r for r in runs}
    return runs


def load_eval(path) -> dict:
    """results/<preset>/<task>/eval.json (evaluate.py) -> {run_name: entry}."""
    return eval_runs(read_eval(path))


def protocol_line(doc: dict) -> str:
    """The decoding protocol evaluate.py recorded in its JSON document, as one line of the report."""
    p = doc.get("protocol", {})
    keys = ("gamma", "top_p", "temperature", "max_new_tokens", "n_prompts", "seed", "source", "data_path")
    return ", ".join(f"{k} {p[k]}" for k in keys if k in p)


def records_of(entry: dict):
    """The per-drafted-token records of one eval entry (evaluate.py --record)."""
    rec = entry.get("records")
    if rec is None:
        raise MissingRunError("eval entry has no 'records': run python -m study.evaluate with --record")
    return rec


# ----------------------------------------------------------------------------- the study (I/O)

def check_data(cfg: ReportConfig, log):
    """Every row of both splits of every task, checked before anything trains (data.DataError names the
    file, line and column); the length filter runs later, in distill.py and evaluate.py, with the teacher's
    tokenizer."""
    import data
    import models

    for task in cfg.tasks:
        source, path = data.resolve_source(cfg.source, cfg.data_path,
                                           models.preset_data(cfg.preset, task))
        for split in data.SPLITS:
            n = len(data.load_examples(task, split, source=source, path=path, max_article_tokens=None))
            log(f"data {task} {split}: {n} rows ({source}{' ' + path if path else ''}) checked")


def _train(cfg: ReportConfig, task: str, div: str, seed: int, out: Path, extra=(), validate=True) -> bool:
    """distill.main for one run into `out`; False when --reuse found it already trained (same ajsd
    settings, read back from the run's config.json). validate: validate the final student once
    (--eval-every; the study's runs, for estimates.py; not the ajsd grid's)."""
    import distill

    if cfg.reuse and (out / "final").exists():
        saved = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}
        want = {extra[i][2:].replace("-", "_"): float(extra[i + 1]) for i in range(0, len(extra), 2)}
        if all(saved.get(k) == v for k, v in want.items()):
            return False
    shutil.rmtree(out, ignore_errors=True)
    argv = ["--task", task, "--div", div, "--preset", cfg.preset, "--seed", str(seed), "--out", str(out),
            "--threads", str(cfg.threads), *extra]
    if cfg.steps is not None:
        argv += ["--steps", str(cfg.steps)]
    validation = ["--eval-every", str(VALIDATE_AT_END), "--eval-prompts", str(cfg.n_val_train)] if validate else []
    distill.main(argv + validation + cfg.data_args() + held_out_args(cfg, task))
    return True


def task_group(cfg: ReportConfig, task: str) -> str:
    """The folder of the task's runs and evaluation under <runs|results>/<preset>/, as distill.py and
    evaluate.py name it (rundir.task_group: the data in the name when it is not the preset's own)."""
    import data
    import models
    from plumbing import rundir

    preset_source = models.preset_data(cfg.preset, task)
    source, path = data.resolve_source(cfg.source, cfg.data_path, preset_source)
    return rundir.task_group(task, source, path, preset_source)


def ajsd_flags(setting) -> list[str]:
    """distill.py flags of an ajsd (floor, scale) setting."""
    floor, scale = setting
    return ["--ajsd-floor", f"{floor:g}", "--ajsd-scale", f"{scale:g}"]


def train_all(cfg: ReportConfig, task: str, log, ajsd_setting=None):
    """Every (divergence, seed) of the study; ajsd with the setting tune_ajsd selected."""
    task_dir = Path(cfg.runs) / cfg.preset / task_group(cfg, task)
    if not cfg.reuse:   # evaluate.py scores every run under task_dir: leave none from an earlier report
        shutil.rmtree(task_dir, ignore_errors=True)
    jobs = [(d, s) for d in cfg.divs if d != "baseline" for s in cfg.seeds]
    for i, (div, seed) in enumerate(jobs, 1):
        extra = ajsd_flags(ajsd_setting) if div == "ajsd" and ajsd_setting is not None else []
        t0 = time.time()
        done = _train(cfg, task, div, seed, task_dir / run_name(div, seed), extra)
        log(f"{task}: {'trained' if done else 'reused'} {run_name(div, seed)} ({i}/{len(jobs)}) "
            f"in {time.time() - t0:.0f}s")


def _train_rows(cfg: ReportConfig, task: str) -> list:
    """The train split of a file/hub source as distill.py reads it (rows checked, CNN/DM's length filter
    with the teacher's tokenizer), in file order."""
    import data
    import models

    key = (task, cfg.source, cfg.data_path)
    if key not in _TRAIN_ROWS:
        pc = models.preset_config(cfg.preset, task)
        source, path = data.resolve_source(cfg.source, cfg.data_path, models.preset_data(cfg.preset, task))
        tok = models.load_tokenizer(models.resolve_pair(task, cfg.preset)[0]) if task in data.SUMMARY_TASKS else None
        _TRAIN_ROWS[key] = data.load_examples(task, "train", source=source, path=path, tokenizer=tok)
    return _TRAIN_ROWS[key]


_TRAIN_ROWS: dict = {}


def held_out_args(cfg: ReportConfig, task: str) -> list[str]:
    """distill.py flags that keep the validation rows out of training: with a file/hub source the last
    cfg.n_val train rows are the validation prompts, so every run trains on the rows before them."""
    import data
    import models

    pc = models.preset_config(cfg.preset, task)
    if data.resolve_source(cfg.source, cfg.data_path, models.preset_data(cfg.preset, task))[0] == "standin":
        return []
    n = len(_train_rows(cfg, task)) - cfg.n_val
    if n < 1:
        raise ValueError(f"{task}: the train split has {n + cfg.n_val} rows, too few to hold out n_val={cfg.n_val} "
                         f"validation prompts for the ajsd grid")
    if pc.get("n_train"):
        n = min(n, pc["n_train"])
    return ["--n-train", str(n)]


def validation_examples(cfg: ReportConfig, task: str, used_seeds) -> list:
    """cfg.n_val examples of the TRAIN split that no training run of `used_seeds` sees: disjoint from
    the eval prompts (data.py's split) and from every training set (checked prompt by prompt).
    Stand-ins: drawn from the stand-in's stream of seed data.VAL_SEED. A file/hub source: the last n_val
    train rows, which held_out_args keeps out of every training run."""
    import data
    import models

    pc = models.preset_config(cfg.preset, task)
    source = data.resolve_source(cfg.source, cfg.data_path, models.preset_data(cfg.preset, task))[0]
    if source != "standin":
        held_out_args(cfg, task)                       # raises when there are too few rows
        return _train_rows(cfg, task)[-cfg.n_val:]
    n_train = pc.get("n_train")
    # the stand-in articles are far below the length filter: no tokenizer needed to list them
    used = {e.prompt for s in used_seeds
            for e in data.load_examples(task, "train", source=source, n=n_train, seed=s, max_article_tokens=None)}
    return data.unused_standins(task, cfg.n_val, used)


def tune_ajsd(cfg: ReportConfig, task: str, log) -> dict:
    """Train ajsd at every (floor, scale) of the grid (cfg.grid_seeds) and score each on the validation
    prompts (token acceptance, crossed bootstrap). -> {"grid": {(floor, scale): (mean, lo, hi)},
    "selected": (floor, scale), "n_val": int}. The eval prompts are never touched."""
    import data
    from study import evaluate
    import models

    grid_dir = Path(cfg.runs) / cfg.preset / "ajsd-grid" / task   # outside <runs>/<preset>/<task>: evaluate.py
    settings = [(f, c) for f in cfg.ajsd_floors for c in cfg.ajsd_scales]    # scores every run there
    teacher, tok = load_teacher(cfg, task)
    prompts = [data.build_prompt_ids(tok, task, e)
               for e in validation_examples(cfg, task, set(cfg.seeds) | set(cfg.grid_seeds))]
    protocol = _protocol(cfg, task, tok, teacher)
    grid, n_jobs, i = {}, len(settings) * len(cfg.grid_seeds), 0
    for setting in settings:
        per_seed = []
        for seed in cfg.grid_seeds:
            i += 1
            out = grid_dir / f"f{setting[0]:g}-c{setting[1]:g}-s{seed}"
            t0 = time.time()
            _train(cfg, task, "ajsd", seed, out, ajsd_flags(setting), validate=False)
            draft = models.load_model(str(out / "final"), device=teacher.device).eval()
            res = evaluate.evaluate_draft(teacher, draft, prompts, batch_size=16, seed=0, record=False,
                                         **protocol)                     # scored by acceptance only
            per_seed.append(res["per_prompt"])
            log(f"{task}: ajsd grid floor {setting[0]:g} scale {setting[1]:g} seed {seed} ({i}/{n_jobs}): "
                f"validation acceptance {np.nanmean(np.asarray(res['per_prompt']['token_acceptance'], float)):.3f} "
                f"in {time.time() - t0:.0f}s")
        seeds = [per_prompt_metrics({"per_prompt": pp}) for pp in per_seed]
        grid[setting] = metric_bootstrap(seeds, "token_acceptance", cfg.n_boot)
    selected = select_ajsd(grid)
    log(f"{task}: ajsd selected floor {selected[0]:g}, scale {selected[1]:g} nats")
    return {"grid": grid, "selected": selected, "n_val": len(prompts)}


def _protocol(cfg: ReportConfig, task: str, tok, teacher) -> dict:
    """The decoding protocol evaluate.py uses for the task (models.decoding_protocol): speculative_generate's
    keyword arguments (gamma, lengths, temperature, top-p/top-k, stop ids, vocab_size)."""
    import models

    return models.decoding_protocol(models.preset_config(cfg.preset, task), tok, teacher).speculative_kwargs()


def reusable_eval(cfg: ReportConfig, task: str, path: Path) -> bool:
    """--reuse: an eval.json already written for exactly this study (the same drafts, prompt count and
    data) may be read instead of decoding again; anything else is evaluated afresh."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    want = {run_name(d, s) for d in cfg.divs if d != "baseline" for s in cfg.seeds} | {"baseline"}
    p = doc.get("protocol", {})
    return (set(doc.get("runs", {})) == want and (cfg.n_prompts is None or p.get("n_prompts") == cfg.n_prompts)
            and p.get("data_path") == cfg.data_path and all("records" in r for r in doc["runs"].values()))


def evaluate_task(cfg: ReportConfig, task: str) -> Path:
    from study import evaluate

    task_results = Path(cfg.results) / cfg.preset / task_group(cfg, task)
    if cfg.reuse and reusable_eval(cfg, task, task_results / "eval.json"):
        return task_results / "eval.json"
    shutil.rmtree(task_results, ignore_errors=True)   # only this invocation's evaluation can be read
    # the report reads acceptance only: time the speedup once on one batch per draft, not at batch 1
    argv = ["--preset", cfg.preset, "--task", task, "--runs", cfg.runs, "--results", cfg.results, "--record",
            "--speedup-batches", "1", "--speedup-repeats", "1", "--batch1-prompts", "0", "--threads", str(cfg.threads)]
    argv += cfg.data_args()
    if cfg.n_prompts is not None:
        argv += ["--n-prompts", str(cfg.n_prompts)]
    evaluate.main(argv)
    return task_results / "eval.json"


def load_teacher(cfg: ReportConfig, task: str):
    """The task's teacher (the target p) and its tokenizer."""
    import models

    teacher_id, _ = models.resolve_pair(task, cfg.preset)
    return models.load_model(teacher_id), models.load_tokenizer(teacher_id)


def teacher_profile(cfg: ReportConfig, task: str) -> dict:
    """Both entropy views along the teacher's own samples on the task's eval prompts (entropy.py):
    {"processed": H(p), "tempered": H before top-p}."""
    import data
    import entropy
    import models

    pc = models.preset_config(cfg.preset, task)
    teacher, tok = load_teacher(cfg, task)
    source, path = data.resolve_source(cfg.source, cfg.data_path, models.preset_data(cfg.preset, task))
    prompts = data.task_prompts(task, tok, split="eval", n=cfg.n_profile, source=source, path=path)
    protocol = models.decoding_protocol(pc, tok, teacher)   # as evaluate.py and distill.py
    return entropy.teacher_sample_entropies(teacher, prompts, seed=0, views=True, **protocol.generate_kwargs())


def entropy_analysis(cfg: ReportConfig, task: str, evals_task: dict, by_div: dict) -> dict:
    """Per entropy view: data-filled bins (entropy.quantile_edges over the tested tokens of every run
    of the task), each divergence's acceptance per bin (records of its seeds pooled, Wilson) and its
    per-bin difference to the baseline and to the best fixed divergence (crossed bootstrap over
    seeds and prompts). -> {view: {"edges", "labels", "bins", "vs_baseline", "vs_best", "ref_counts"}}"""
    import entropy

    recs = {div: [entropy.as_records(records_of(evals_task[run_name(div, s)]))   # JSON lists -> arrays, once
                  for s in (cfg.seeds if div != "baseline" else (None,))]
            for div in cfg.divs}
    n_prompts = len(by_div["baseline"][0]["token_acceptance"]) if "baseline" in by_div else None
    best = best_fixed(by_div)
    out = {}
    for view, key in entropy.VIEWS.items():
        values = np.concatenate([entropy.tested_values(r, key) for rs in recs.values() for r in rs])
        edges = entropy.quantile_edges(values, cfg.n_bins)
        labels = [entropy.bin_label(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]
        bins = {div: entropy.acceptance_by_entropy(entropy.concat_records(rs), edges, key=key) for div, rs in recs.items()}
        res = {"edges": edges, "labels": labels, "bins": bins, "vs_baseline": {}, "vs_best": {}}
        if n_prompts is not None:
            counts = {div: [entropy.per_prompt_bin_counts(r, edges, n_prompts, key) for r in rs] for div, rs in recs.items()}
            res["vs_baseline"] = bin_differences(counts, "baseline", cfg.n_boot)
            if best is not None:
                res["vs_best"] = bin_differences({d: c for d, c in counts.items() if d != "baseline"}, best, cfg.n_boot)
            res["ref_counts"] = {"baseline": counts["baseline"][0][0].sum(0),
                                 "best": sum(c[0].sum(0) for c in counts[best]) if best else None}
        out[view] = res
    return out


def gain_sentences(task: str, analysis: dict) -> list[str]:
    """Where does each divergence gain over the baseline? Per view: the bins whose 95% interval of
    the difference lies above 0, and the largest gain."""
    out = []
    for view, res in analysis.items():
        parts = []
        for div, (m, lo, hi) in res["vs_baseline"].items():
            up = [res["labels"][i] for i in range(len(m)) if lo[i] > 0]
            down = [res["labels"][i] for i in range(len(m)) if hi[i] < 0]
            j = int(np.nanargmax(m)) if not np.isnan(m).all() else None
            text = f"{div} in {len(up)} of {len(m)} bins"
            if j is not None:
                text += f" (its largest difference {100 * m[j]:+.1f} points, at {res['labels'][j]} nats)"
            if down:
                text += f", below it in {', '.join(down)}"
            parts.append(text)
        if parts:
            out.append(f"On {task}, {view} entropy view: each draft's acceptance exceeds the baseline's with "
                       f"the 95% interval above 0 for " + "; ".join(parts) + ".")
    return out


def write_report(cfg: ReportConfig, rows, profiles, analysis, diffs, heads, grids, plots, protocols, meta,
                 paired=None, estimate_summaries=None, estimates_plot=None) -> Path:
    import entropy
    from study import estimates

    md = [f"{HEADING} ({cfg.preset} preset{', QUICK smoke run' if cfg.quick else ''})", ""]
    md += [f"Written by `{meta['command']}` on {meta['date']} ({meta['machine']}), commit {meta['commit']}, "
           f"in {meta['minutes']:.1f} min. Every number below was computed by that invocation from the "
           + (f"evaluations in {cfg.results}: --reuse read back the trained runs and every evaluation that held "
              f"exactly this study's drafts, prompts and data, and ran the rest." if cfg.reuse else
              f"evaluations it ran ({cfg.results})."), ""]
    if cfg.quick:
        md += ["**QUICK run: few seeds, few steps. A smoke test of the pipeline, not a result.**", ""]
    md += ["The same question as a controlled curve, the teacher's entropy set by one knob with everything else "
           "fixed: [CURVE.md](CURVE.md) (`make curve`).", ""]
    found = [f"On {t}, the headline comparison: {h[3]}." for t, h in heads.items() if h]
    found += findings(rows, paired=paired)
    for task, g in grids.items():
        f, c = g["selected"]
        found.append(f"On {task}, ajsd was tuned on {g['n_val']} validation prompts over floor x scale "
                     f"{len(g['grid'])} settings; selected floor {f:g}, scale {c:g} nats (validation acceptance "
                     f"{_fmt(g['grid'][(f, c)])}); the ajsd row of the table uses it.")
        d = diffs[task]["rows"].get("ajsd", {}).get("best")
        if d is not None:
            found.append(f"On {task}, tuned ajsd vs the best fixed divergence: "
                         + difference_statement("ajsd", diffs[task]["best"], d) + ".")
    found += objective_sentences(diffs)
    for task, summary in (estimate_summaries or {}).items():
        found += estimates.estimate_sentences(task, summary)
    for task, an in analysis.items():
        found += gain_sentences(task, an)
    views = sorted({v for p in profiles.values() for v in p})
    found += [profile_sentence({t: p[v] for t, p in profiles.items() if v in p}, v) for v in views]
    md += ["## Findings", ""] + [f"- {x}" for x in found] + [""]
    md += ["## Acceptance table", "",
           "Speculative decoding on each task's held-out eval prompts, with the protocol evaluate.py recorded: "
           + "; ".join(f"{t}: {line}" for t, line in protocols.items())
           + f". Training seeds {', '.join(map(str, cfg.seeds))}, {cfg.steps} steps each. Mean over seeds of the "
           f"per-seed mean over prompts, with a 95% interval from a bootstrap that resamples the prompts (one "
           f"draw shared by every run: all runs decode the same prompts with the same sampling seed) and the "
           f"training seeds ({cfg.n_boot} resamples). Token acceptance = accepted / drafted per prompt; "
           "analytic alpha = mean of sum_x min(p, q) over tested positions (up to each round's first rejection); "
           "mean accepted length = tokens per target "
           "call (bonus token included). Best mean per task in bold.", "", table_markdown(rows), ""]
    md += ["## Differences in token acceptance", "",
           "Each divergence minus the baseline and minus the best fixed divergence (highest mean among fkl, rkl, "
           "jsd, tvd), in points, with 95% intervals from the same bootstrap, paired by prompt (the prompt draw is "
           f"shared by both sides). Headline comparisons (the seed's claims): "
           + "; ".join(f"{t}: {a} vs {b}" for t, (a, b) in HEADLINE.items() if t in diffs)
           + f"; a difference whose interval excludes 0 is called separated, one whose interval lies within "
           f"+/- {100 * EQUIV_MARGIN:.1f} points equivalent.", ""]
    for task, d in diffs.items():
        md += [f"### {task}", "", differences_markdown(d), ""]
        if heads.get(task):
            md += [f"Headline: {heads[task][3]}.", ""]
    if estimate_summaries:
        md += estimates.estimates_markdown(estimate_summaries, estimates_plot)
    if grids:
        md += ["## Tuning ajsd (held-out validation prompts)", "",
               "beta(H) = floor + (1 - floor) exp(-H / scale). Each setting trained with seed(s) "
               f"{', '.join(map(str, cfg.grid_seeds))} ({cfg.steps} steps) and scored by token acceptance on "
               "validation prompts: train-split prompts (disjoint from the eval split by data.py's hash) that none "
               "of the study's training runs sees (checked prompt by prompt). Mean [95% bootstrap interval]; the "
               "selected setting (highest mean) in bold; the eval prompts were not used.", ""]
        for task, g in grids.items():
            md += [f"### {task} ({g['n_val']} validation prompts)", "", grid_markdown(g["grid"], g["selected"]), ""]
    md += ["## Teacher entropy profile", "",
           "Both entropy views (nats) at every token the teacher sampled on its own for the task's eval prompts: "
           "processed = H(p) after the task's temperature and top-p (what verification uses; exactly 0 where one "
           "token survives top-p); tempered = H(softmax(logits / T)) before top-p (continuous).", "",
           "| task | view | tokens | share H = 0 | mean | q10 | q25 | median | q75 | q90 |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for task, views in profiles.items():
        for view, prof in views.items():
            q = prof["quantiles"]
            md.append(f"| {task} | {view} | {prof['n']} | {prof['zero_share']:.2f} | {prof['mean']:.3g} | "
                      + " | ".join(f"{q[k]:.3g}" for k in sorted(q)) + " |")
    md.append("")
    for task in profiles:
        md.append(" ".join(f"![entropy histogram {task} {v}]({p})" for v, p in plots[task]["hist"].items()))
    md += ["", "## Acceptance vs teacher entropy", "",
           f"Tested drafted tokens (up to each block's first rejection) binned by each entropy view. Bins chosen "
           f"from the data: per task and view, the tested tokens of every run pooled; H = 0 exactly is its own "
           f"bin where it occurs ('0'), the positive values are cut at their quantiles into {cfg.n_bins} bins of "
           "equal token counts (so no bin is empty; '0+' = just above 0). Level plots: acceptance per bin, seeds "
           "pooled, point area ~ tokens, 95% Wilson bars (tokens treated as independent: too narrow). "
           "Difference plots and tables: acceptance minus the reference's per bin, 95% interval from the "
           "bootstrap over prompts and seeds (tokens of a prompt stay together), in points.", ""]
    for task, an in analysis.items():
        md += [f"### {task}", ""]
        md += [" ".join(f"![acceptance vs {v} entropy {task}]({p})" for v, p in plots[task]["acc"].items()), ""]
        md += [f"![differences vs entropy {task}]({plots[task]['diff']})", ""]
        if plots[task].get("diff_best"):
            md += [f"![differences to the best fixed divergence {task}]({plots[task]['diff_best']})", ""]
        for view, res in an.items():
            md += [f"**{view} view ({entropy.VIEW_TITLES[view]}), minus the baseline**", "",
                   bin_differences_markdown(res["labels"], res["ref_counts"]["baseline"], res["vs_baseline"]), ""]
            if res["vs_best"]:
                md += [f"**{view} view, minus the best fixed divergence ({diffs[task]['best']})**", "",
                       bin_differences_markdown(res["labels"], res["ref_counts"]["best"], res["vs_best"]), ""]
        md += ["<details><summary>per-bin levels (Wilson)</summary>", ""]
        for view, res in an.items():
            for div, bins in res["bins"].items():
                md += [f"**{div}, {view} view**", "", entropy.bins_markdown(bins), ""]
        md += ["</details>", ""]
    return cli.write_markdown(cfg.out, md)


def source_commit() -> str:
    """The commit the run starts from, + " + uncommitted changes" if tracked files differ from it. Read before
    the work: the run itself rewrites tracked outputs (REPORT.md, CURVE.md, their figures)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                          text=True).stdout.strip():
            commit += " + uncommitted changes"
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return commit


def _meta(t0: float, argv, commit: str) -> dict:
    return dict(command=" ".join(["python -m study.report", *argv]),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                machine=f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}",
                commit=commit, minutes=(time.time() - t0) / 60)


def parse_args(argv=None) -> ReportConfig:
    p = cli.ArgumentParser(prog="python -m study.report", description=cli.description(__doc__))
    p.add_argument("--quick", action="store_true", help="two seeds, few steps, a 2 x 2 ajsd grid (CI smoke test)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--tasks", nargs="+", default=None)
    p.add_argument("--divs", nargs="+", default=None)
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--n-prompts", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--reuse", action="store_true", help="skip training where <run>/final already exists, and "
                   "evaluation where results/<preset>/<task>/eval.json holds exactly this study's drafts")
    p.add_argument("--source", default=None, help="standin, file or hub (default: file with --data-path, else the "
                   "preset's)")
    p.add_argument("--data-path", default=None, help="a folder with one task's train.* and test.* files (README "
                   "'Data'); needs --tasks with that one task")
    cli.add_threads_option(p)
    a = p.parse_args(argv)
    cfg = ReportConfig(preset=a.preset, quick=a.quick, reuse=a.reuse, source=a.source, data_path=a.data_path,
                       threads=cli.check_threads(a.threads))
    cli.apply_overrides(cfg, a, QUICK if a.quick else None, sequences=("tasks", "divs", "seeds"),
                        values=("steps", "n_prompts", "out"))
    import data
    import models

    models.check_preset(cfg.preset)
    for name in ("steps", "n_prompts"):                 # both are used only after training has started
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(cfg, name)} is not allowed; "
                             f"--{name.replace('_', '-')} must be >= 1")
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ValueError(f"--seeds {list(cfg.seeds)}: need distinct integers >= 0")
    for seed in cfg.seeds:
        cli.check_seed(seed, "--seeds")
    for t in cfg.tasks:
        data.check_task(t)
    data.resolve_source(cfg.source, cfg.data_path)                  # the shared rule's errors
    if cfg.data_path is not None:
        if len(cfg.tasks) != 1:
            raise ValueError(f"--data-path {cfg.data_path!r} holds one task's data: pass --tasks with one of "
                             f"{', '.join(data.TASKS)} (got {', '.join(cfg.tasks)})")
        if not Path(cfg.data_path).is_dir():
            raise ValueError(f"--data-path {cfg.data_path!r} is not a folder: the report trains on its train.* "
                             f"files and evaluates on its test.* files, and one file would be both")
    bad = [d for d in cfg.divs if d not in DIVS]
    if bad:
        raise ValueError(f"unknown --divs {bad}; valid: {', '.join(DIVS)}")
    cli.check_markdown_out(cfg.out, HEADING, ReportConfig.out)            # written at the very end: checked before the study
    return cfg


def progress_log(t0: float):
    """print(f"[report <seconds since t0>s] {msg}"): one progress line per step, from any worker."""
    return lambda msg: print(f"[report {time.time() - t0:6.0f}s] {msg}", flush=True)


def task_phase(cfg: ReportConfig, task: str, t0: float):
    """One task's training and evaluation: the ajsd grid, every study run, the evaluation (each run on
    cfg.threads threads). -> (the grid's result or None, the eval.json path)."""
    cli.set_threads(cfg.threads)                      # a worker process starts with torch's default
    log = progress_log(t0)
    grid = tune_ajsd(cfg, task, log) if "ajsd" in cfg.divs else None
    train_all(cfg, task, log, grid["selected"] if grid else None)
    path = evaluate_task(cfg, task)
    log(f"evaluated {task} -> {path}")
    return grid, path


def train_and_evaluate(cfg: ReportConfig, t0: float) -> dict:
    """Every task's task_phase -> {task: (grid, eval path)}. Several tasks run at once, one worker process per
    task (each on cfg.threads threads, 1 by default): the tiny models are bound by per-call overhead, so on 2
    cores two single-thread processes finish the study much sooner than one process after the other
    (docs/benchmarks.md). A worker's error is raised here, once the other workers have finished."""
    if len(cfg.tasks) == 1:
        return {cfg.tasks[0]: task_phase(cfg, cfg.tasks[0], t0)}
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(len(cfg.tasks), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {task: pool.submit(task_phase, cfg, task, t0) for task in cfg.tasks}
        return {task: f.result() for task, f in futures.items()}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    with cli.before_the_work():
        cfg = parse_args(argv)
    cli.set_threads(cfg.threads)
    import entropy
    from study import estimates

    t0, commit = time.time(), source_commit()
    log = progress_log(t0)
    n_grid = len(cfg.ajsd_floors) * len(cfg.ajsd_scales) * len(cfg.grid_seeds) if "ajsd" in cfg.divs else 0
    n_train = len([d for d in cfg.divs if d != "baseline"]) * len(cfg.seeds)
    log(f"plan: {len(cfg.tasks)} task(s) x ({n_grid} ajsd grid runs + {n_train} study runs), {cfg.steps} steps "
        f"each; {cfg.n_prompts} eval prompts per run")
    evals, protocols, profiles, analysis, plots, grids = {}, {}, {}, {}, {}, {}
    with cli.before_the_work():                       # bad rows, --source hub offline: one line
        check_data(cfg, log)
    for task, (grid, path) in train_and_evaluate(cfg, t0).items():
        if grid is not None:
            grids[task] = grid
        doc = read_eval(path)   # holds every run's records: parsed once
        evals[task], protocols[task] = eval_runs(doc), protocol_line(doc)
    collected = collect_runs(evals, cfg.divs, cfg.seeds)   # raises on missing runs
    rows = build_table(collected, n_boot=cfg.n_boot)
    diffs = {t: differences(collected[t], cfg.n_boot) for t in cfg.tasks}
    heads = {t: headline(collected[t], t, cfg.n_boot) for t in cfg.tasks}
    paired = {t: best_vs_runner_up(collected[t], cfg.n_boot) for t in cfg.tasks}
    out_dir = Path(cfg.out).parent
    fig = out_dir / "figures"
    for task in cfg.tasks:
        analysis[task] = entropy_analysis(cfg, task, evals[task], collected[task])
        views = teacher_profile(cfg, task)
        profiles[task] = {}
        plots[task] = {"hist": {}, "acc": {}}
        for view, an in analysis[task].items():
            prof = entropy.entropy_profile(views[view], an["edges"])
            prof["zero_share"] = float(np.mean(np.asarray(views[view]) == 0))
            profiles[task][view] = prof
            plots[task]["hist"][view] = entropy.plot_entropy_histogram(
                prof, fig / f"entropy_{view}_{task}.png", f"{task}, {view}")
            plots[task]["acc"][view] = entropy.plot_acceptance_vs_entropy(
                an["bins"], fig / f"acceptance_{view}_{task}.png", f"{task}: acceptance vs {entropy.VIEW_TITLES[view]}")
        panels = {entropy.VIEW_TITLES[v]: (an["labels"], {d: list(zip(*x)) for d, x in an["vs_baseline"].items()})
                  for v, an in analysis[task].items() if an["vs_baseline"]}
        if panels:
            plots[task]["diff"] = entropy.plot_bin_differences(
                panels, fig / f"diff_baseline_{task}.png", f"{task}: acceptance minus the baseline's, per entropy bin")
        best = diffs[task]["best"]
        panels = {entropy.VIEW_TITLES[v]: (an["labels"], {d: list(zip(*x)) for d, x in an["vs_best"].items()})
                  for v, an in analysis[task].items() if an["vs_best"]}
        if panels:
            plots[task]["diff_best"] = entropy.plot_bin_differences(
                panels, fig / f"diff_best_{task}.png", f"{task}: acceptance minus the best fixed divergence's ({best})",
                ylabel=f"acceptance - {best}")
        plots[task] = {k: ({v: p.relative_to(out_dir).as_posix() for v, p in x.items()} if isinstance(x, dict)
                           else x.relative_to(out_dir).as_posix()) for k, x in plots[task].items()}
        log(f"entropy analysis {task} done")
    points = {t: estimates.collect_estimates(evals[t]) for t in cfg.tasks}   # train/val alpha vs eval alpha
    summaries = {t: estimates.compare(p) for t, p in points.items() if p}
    est_plot = (estimates.plot_estimates(points, fig / "estimates.png").relative_to(out_dir).as_posix()
                if summaries else None)
    out = write_report(cfg, rows, profiles, analysis, diffs, heads, grids, plots, protocols, _meta(t0, argv, commit),
                       paired, summaries, est_plot)
    log(f"wrote {out}")
    return out


if __name__ == "__main__":
    cli.script_main(main)
