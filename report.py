"""The whole study in one command: train, evaluate, analyse, and write results/REPORT.md.

For each task (gsm8k: low teacher entropy, cnndm: high) on one preset (default: the offline tiny
pair), train a draft with each divergence (fkl, rkl, jsd beta=0.5, tvd, ajsd; distill.main) for
several training seeds, evaluate the baseline (untrained) draft and every trained one with batched
speculative decoding (evaluate.main --record: gamma 5, top-p 0.95, the task's temperature), then:

  the table   task x divergence: token acceptance (accepted / drafted, macro-mean over prompts),
              analytic alpha (mean over drafted positions of sum_x min(p, q); p = teacher, q = draft),
              mean accepted length (tokens per target call, bonus included); each a mean with a 95%
              interval from a hierarchical bootstrap over seeds and prompts: resample the seeds with
              replacement, then within each drawn seed its prompts with replacement, and take the
              mean over seeds of the per-seed prompt means (the point estimate is the same statistic
              on the data as observed). The baseline has no training seed: its interval is over prompts.
  entropy     the task's entropy profile H(p) along the teacher's own samples (entropy.py), and
              acceptance vs teacher entropy per divergence (the records of every seed pooled).
  sentences   generated from the numbers: does the seed's ordering (RKL best on gsm8k, JSD best on
              cnndm) reproduce, and is ajsd as good as the best fixed divergence within the intervals.

Data: `--source` / `--data-path` as distill.py and evaluate.py take them (data.resolve_source); a path
is one task's folder (its train.* files train, its test.* files evaluate). Every row of both splits is
checked (check_data) before anything trains.

Every number in REPORT.md is computed in this process from the eval JSON this invocation wrote; a
run that is missing or failed raises MissingRunError, so a partial table is never written.
`--quick` (what CI runs): one seed, fewer steps and prompts; it writes results/quick/REPORT.md so
a smoke run never overwrites the real study.

The table-building (`collect_runs`, `build_table`, `table_markdown`, `findings`) is pure: it takes
already-loaded eval JSON and is tested without training anything.
"""
from __future__ import annotations

import argparse
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

DIVS = ("baseline", "fkl", "rkl", "jsd", "tvd", "ajsd")   # jsd: beta = 0.5 (distill's default)
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
    seeds: tuple = (0, 1, 2)
    steps: int | None = 150           # training steps per run (half the preset's 300: 30 runs must fit in an hour on 2 cores)
    n_prompts: int | None = 64        # eval prompts per task and run (None: the preset's 128)
    n_profile: int = 32               # prompts the teacher samples for the entropy profile
    runs: str = "runs/report"         # trained students: <runs>/<preset>/<task>/<div>-s<seed>
    results: str = "results/report"   # eval JSON + plots
    out: str = "results/REPORT.md"
    n_boot: int = 2000
    reuse: bool = False               # skip training where <run>/final exists (same settings assumed)
    quick: bool = False
    source: str | None = None         # the data (data.resolve_source): standin | file | hub; None = the preset's
    data_path: str | None = None      # a folder with train.* and test.* files of one task (README, "Data")

    def data_args(self) -> list[str]:
        """--source / --data-path as given, for distill.py and evaluate.py (one rule: data.resolve_source)."""
        return ((["--source", self.source] if self.source else [])
                + (["--data-path", self.data_path] if self.data_path else []))


QUICK = dict(seeds=(0,), steps=8, n_prompts=16, n_profile=8, runs="runs/quick", results="results/quick",
             out="results/quick/REPORT.md", n_boot=1000)


def run_name(div: str, seed: int) -> str:
    """The run directory / eval entry of one trained student (distill.py's default naming)."""
    return "baseline" if div == "baseline" else f"{div}-s{seed}"


# ----------------------------------------------------------------------------- statistics (pure)

def hierarchical_bootstrap(per_seed: list, n_boot: int = 2000, seed: int = 0, level: float = 0.95):
    """Mean over seeds of the per-seed mean over prompts, with a percentile bootstrap interval that
    resamples seeds, then prompts within each drawn seed. per_seed: one 1-D array of per-prompt
    values per seed (NaN = a prompt with nothing drafted, left out). -> (mean, lo, hi)"""
    xs = [np.asarray(x, dtype=np.float64) for x in per_seed]
    xs = [x[~np.isnan(x)] for x in xs]
    if not xs or any(x.size == 0 for x in xs):
        raise ValueError("hierarchical_bootstrap needs at least one seed, each with at least one prompt value")
    point = float(np.mean([x.mean() for x in xs]))
    rng = np.random.default_rng(seed)
    S = len(xs)
    which = rng.integers(0, S, size=(n_boot, S))                # (n_boot, S): the seed in each slot
    slot_means = np.zeros((n_boot, S))
    for s, x in enumerate(xs):
        draws = rng.integers(0, x.size, size=(n_boot, S, x.size))
        slot_means = np.where(which == s, x[draws].mean(-1), slot_means)  # (n_boot, S)
    boot = slot_means.mean(1)                                   # (n_boot,)
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return point, float(lo), float(hi)


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
    """One Row per (task, div): each metric's mean and 95% hierarchical-bootstrap interval."""
    rows = []
    for task, by_div in collected.items():
        for div, seeds in by_div.items():
            stats = {m: hierarchical_bootstrap([s[m] for s in seeds], n_boot=n_boot) for m in METRICS}
            rows.append(Row(task, div, len(seeds), int(np.mean([len(s[METRICS[0]]) for s in seeds])), stats))
    return rows


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


def findings(rows: list[Row], metric: str = "token_acceptance") -> list[str]:
    """Plain sentences from the numbers: the seed's ordering, ajsd vs the best fixed divergence."""
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
        separated = runner is None or not overlaps(trained[best], trained[runner])
        text = f"On {task}, the best {name} is {best} ({_fmt(trained[best])})"
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
            fixed = {d: s for d, s in trained.items() if d != "ajsd"}
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


def profile_sentence(profiles: dict) -> str:
    """Does the tasks' entropy contrast (gsm8k low, cnndm high) hold for this preset's teachers?"""
    parts = [f"{t}: median {p['quantiles'][0.5]:.3g}, mean {p['mean']:.3g} nats over {p['n']} tokens"
             for t, p in profiles.items()]
    text = "Teacher entropy along its own samples (" + "; ".join(parts) + ")"
    if {"gsm8k", "cnndm"} <= set(profiles):
        low = profiles["gsm8k"]["mean"] < profiles["cnndm"]["mean"]
        text += (": gsm8k is the low-entropy task, as the study assumes" if low else
                 ": gsm8k is NOT lower in entropy than cnndm here, so the study's premise does not hold for these teachers")
    return text + "."


# ----------------------------------------------------------------------------- loading eval JSON

def load_eval(path) -> dict:
    """results/<preset>/<task>/eval.json (evaluate.py) -> {run_name: entry}."""
    path = Path(path)
    if not path.exists():
        raise MissingRunError(f"no evaluation file {path}: run evaluate.py for this task first")
    doc = json.loads(path.read_text())
    runs = doc.get("runs", doc)
    if isinstance(runs, list):
        runs = {r["name"]: r for r in runs}
    return runs


def protocol_line(path) -> str:
    """The decoding protocol evaluate.py recorded in its JSON, as one line of the report."""
    p = json.loads(Path(path).read_text()).get("protocol", {})
    keys = ("gamma", "top_p", "temperature", "max_new_tokens", "n_prompts", "seed", "source", "data_path")
    return ", ".join(f"{k} {p[k]}" for k in keys if k in p)


def records_of(entry: dict):
    """The per-drafted-token records of one eval entry (evaluate.py --record)."""
    rec = entry.get("records")
    if rec is None:
        raise MissingRunError("eval entry has no 'records': evaluate.py must run with --record")
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
                                           models.preset_config(cfg.preset, task).get("data_source"))
        for split in data.SPLITS:
            n = len(data.load_examples(task, split, source=source, path=path, max_article_tokens=None))
            log(f"data {task} {split}: {n} rows ({source}{' ' + path if path else ''}) checked")


def train_all(cfg: ReportConfig, task: str, log):
    import distill

    task_dir = Path(cfg.runs) / cfg.preset / task
    if not cfg.reuse:   # evaluate.py scores every run under task_dir: leave none from an earlier report
        shutil.rmtree(task_dir, ignore_errors=True)
    for div in cfg.divs:
        if div == "baseline":
            continue
        for seed in cfg.seeds:
            out = task_dir / run_name(div, seed)
            if cfg.reuse and (out / "final").exists():
                log(f"reuse {out}")
                continue
            shutil.rmtree(out, ignore_errors=True)
            argv = ["--task", task, "--div", div, "--preset", cfg.preset, "--seed", str(seed), "--out", str(out)]
            if cfg.steps is not None:
                argv += ["--steps", str(cfg.steps)]
            argv += cfg.data_args()
            t0 = time.time()
            distill.main(argv)
            log(f"trained {task}/{run_name(div, seed)} in {time.time() - t0:.0f}s")


def evaluate_task(cfg: ReportConfig, task: str) -> Path:
    import evaluate

    task_results = Path(cfg.results) / cfg.preset / task
    shutil.rmtree(task_results, ignore_errors=True)   # only this invocation's evaluation can be read
    argv = ["--preset", cfg.preset, "--task", task, "--runs", cfg.runs, "--results", cfg.results, "--record"]
    argv += cfg.data_args()
    if cfg.n_prompts is not None:
        argv += ["--n-prompts", str(cfg.n_prompts)]
    evaluate.main(argv)
    return task_results / "eval.json"


def teacher_profile(cfg: ReportConfig, task: str) -> np.ndarray:
    """H(p) along the teacher's own samples on the task's eval prompts (entropy.py)."""
    import data
    import entropy
    import models

    pc = models.preset_config(cfg.preset, task)
    teacher_id, _ = models.resolve_pair(task, cfg.preset)
    teacher = models.load_model(teacher_id)
    tok = models.load_tokenizer(teacher_id)
    source, path = data.resolve_source(cfg.source, cfg.data_path, pc.get("data_source"))
    prompts = data.task_prompts(task, tok, split="eval", n=cfg.n_profile, source=source, path=path)
    stop_ids = models.generation_stop_ids(tok, teacher)   # as evaluate.py
    return entropy.teacher_sample_entropies(
        teacher, prompts, temperature=pc["temperature"], top_p=pc.get("top_p", 0.95),
        max_new_tokens=pc["max_new_tokens"], eos_token_id=stop_ids, seed=0)


def write_report(cfg: ReportConfig, rows, profiles, acc_bins, plots, protocols, meta) -> Path:
    import entropy

    md = [f"# Report: which divergence distils the best draft? ({cfg.preset} preset{', QUICK smoke run' if cfg.quick else ''})", ""]
    md += [f"Written by `{meta['command']}` on {meta['date']} ({meta['machine']}), commit {meta['commit']}, "
           f"in {meta['minutes']:.1f} min. Every number below was computed by that invocation from the "
           f"evaluations it ran ({cfg.results}).", ""]
    if cfg.quick:
        md += ["**QUICK run: one seed, few steps. A smoke test of the pipeline, not a result.**", ""]
    md += ["## Findings", ""] + [f"- {s}" for s in findings(rows) + [profile_sentence(profiles)]] + [""]
    md += ["## Acceptance table", "",
           "Speculative decoding on each task's held-out eval prompts, with the protocol evaluate.py recorded: "
           + "; ".join(f"{t}: {line}" for t, line in protocols.items())
           + f". Training seeds {', '.join(map(str, cfg.seeds))}. Mean with a 95% interval from a hierarchical bootstrap "
           f"(seeds, then prompts; {cfg.n_boot} resamples). Token acceptance = accepted / drafted per prompt; "
           "analytic alpha = mean of sum_x min(p, q) over drafted positions; mean accepted length = tokens per target "
           "call (bonus token included). Best mean per task in bold.", "", table_markdown(rows), ""]
    md += ["## Teacher entropy profile", "",
           "H(p) in nats of the teacher's processed distribution (the task's temperature and top-p), at every token the "
           "teacher sampled on its own for the task's eval prompts.", "",
           "| task | tokens | mean | q10 | q25 | median | q75 | q90 |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for task, prof in profiles.items():
        q = prof["quantiles"]
        md.append(f"| {task} | {prof['n']} | {prof['mean']:.3g} | " + " | ".join(f"{q[k]:.3g}" for k in sorted(q)) + " |")
    md.append("")
    for task in profiles:
        md.append(f"![entropy histogram {task}]({plots[task]['hist']})")
    md += ["", "## Acceptance vs teacher entropy", "",
           "Drafted tokens of every seed pooled, binned by the teacher's entropy at that position; point area ~ token "
           "count, bars = 95% Wilson intervals (tokens of one sequence are correlated, so these understate the "
           "uncertainty); hollow points / `*` = fewer than 30 tokens.", ""]
    for task, by_div in acc_bins.items():
        md += [f"### {task}", "", f"![acceptance vs entropy {task}]({plots[task]['acc']})", "", "<details><summary>per-bin tables</summary>", ""]
        for div, bins in by_div.items():
            md += [f"**{div}**", "", entropy.bins_markdown(bins), ""]
        md += ["</details>", ""]
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(md) + "\n")
    tmp.replace(out)
    return out


def _meta(t0: float, argv) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                          text=True).stdout.strip():
            commit += " + uncommitted changes"
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return dict(command="python report.py " + " ".join(argv), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                machine=f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}",
                commit=commit, minutes=(time.time() - t0) / 60)


def parse_args(argv=None) -> ReportConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one seed, few steps (CI smoke test)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--tasks", nargs="+", default=None)
    p.add_argument("--divs", nargs="+", default=None)
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--n-prompts", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--reuse", action="store_true", help="skip training where <run>/final already exists")
    p.add_argument("--source", default=None, help="standin, file or hub (default: file with --data-path, else the "
                   "preset's)")
    p.add_argument("--data-path", default=None, help="a folder with one task's train.* and test.* files (README "
                   "'Data'); needs --tasks with that one task")
    a = p.parse_args(argv)
    cfg = ReportConfig(preset=a.preset, quick=a.quick, reuse=a.reuse, source=a.source, data_path=a.data_path)
    if a.quick:
        for k, v in QUICK.items():
            setattr(cfg, k, v)
    for k in ("tasks", "divs", "seeds"):
        if getattr(a, k) is not None:
            setattr(cfg, k, tuple(getattr(a, k)))
    for k in ("steps", "n_prompts", "out"):
        if getattr(a, k) is not None:
            setattr(cfg, k, getattr(a, k))
    import data

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
    return cfg


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_args(argv)
    import entropy

    t0 = time.time()
    log = lambda msg: print(f"[report {time.time() - t0:6.0f}s] {msg}", flush=True)  # noqa: E731
    evals, protocols, profiles, acc_bins, plots = {}, {}, {}, {}, {}
    check_data(cfg, log)
    for task in cfg.tasks:
        train_all(cfg, task, log)
        path = evaluate_task(cfg, task)
        evals[task], protocols[task] = load_eval(path), protocol_line(path)
        log(f"evaluated {task} -> {path}")
    rows = build_table(collect_runs(evals, cfg.divs, cfg.seeds), n_boot=cfg.n_boot)   # raises on missing runs
    out_dir = Path(cfg.out).parent
    for task in cfg.tasks:
        profiles[task] = entropy.entropy_profile(teacher_profile(cfg, task))
        acc_bins[task] = {
            div: entropy.acceptance_by_entropy(entropy.concat_records(
                [records_of(evals[task][run_name(div, s)]) for s in (cfg.seeds if div != "baseline" else (None,))]))
            for div in cfg.divs}
        hist = entropy.plot_entropy_histogram(profiles[task], out_dir / "figures" / f"entropy_{task}.png", task)
        acc = entropy.plot_acceptance_vs_entropy(acc_bins[task], out_dir / "figures" / f"acceptance_{task}.png",
                                                 f"{task}: token acceptance vs teacher entropy")
        plots[task] = {"hist": hist.relative_to(out_dir).as_posix(), "acc": acc.relative_to(out_dir).as_posix()}
        log(f"entropy analysis {task} done")
    out = write_report(cfg, rows, profiles, acc_bins, plots, protocols, _meta(t0, argv))
    log(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
