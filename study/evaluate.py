"""How much of a draft's drafting does the target accept? Baseline vs every distilled draft of a task.

p = target (the teacher), q = draft (the student). For a preset and a task, each draft (the preset's
untrained student, "baseline", and every runs/<preset>/<task>/<run>/final written by distill.py)
drafts for the teacher with exact batched speculative decoding (specdec.speculative_generate) on the
task's held-out eval prompts, with the seed's protocol: gamma 5, nucleus sampling top-p 0.95 at the
task's temperature (both p and q processed the same way), over the tokenizer's real vocabulary (lm_head
padding rows left out), stopping on the same ids as training: models.decoding_protocol, as distill.py.
Every draft sees the same prompts and the same sampling seed. Per prompt (one row of the batch):

    token acceptance       A / D: drafted tokens accepted / drafted tokens (the seed's metric; NOT alpha)
    analytic alpha         mean over TESTED positions of beta_i = sum_x min(p_i(x), q_i(x)) = 1 - TVD(p_i, q_i):
                           the drafted positions up to and including the first rejection of each round (a
                           position after it is never verified and its context holds the rejected token;
                           specdec's alpha_all_drafted, kept in the JSON, averages over those too)
    mean accepted length   generated tokens / target calls (tokens per verification, bonus included)

The table reports the mean over prompts (a macro-mean, as the seed did; a prompt with nothing drafted
has no acceptance and is left out, not counted as 0) with a 95% percentile bootstrap interval over
prompts, and the drafts' generation speed (generated tokens / wall time, tokens/s). The JSON also keeps
the pooled token acceptance sum(A) / sum(D) over all prompts.

The speedup a user gets, per draft, at the evaluation's batch size and at batch 1:
    measured speedup       (tokens/s of speculative decoding) / (tokens/s of the target alone), the target
                           alone sampled by specdec.autoregressive_generate on the same prompts, with the same
                           sampling settings, seeds and batches (--speedup-batches K: the first K batches;
                           --batch1-prompts N: the first N prompts one at a time). Tokens per second, since
                           sampled outputs differ in length. Timed --speedup-repeats R times, the two sides in
                           turns batch by batch (the order alternating between repeats), so load from other jobs
                           hits both; the speedup is the median of the R per-repeat ratios, and repeats whose
                           spread (max - min) / median exceeds SPEEDUP_TOLERANCE are flagged as noise.
    theoretical speedup    (1 - alpha^(gamma+1)) / ((1 - alpha)(gamma c + 1))  (Leviathan et al. 2023), with
                           alpha the pooled analytic alpha (mean beta_i over every tested position), gamma the
                           protocol's and c = draft step cost / target step cost, measured here (cost_ratio) at
                           the same batch size: seconds per decoding step of each model alone, no stop ids,
                           (time of 1 + 16 steps - time of 1 step) / 16, the two models timed in turns, best of 3.
The verdict (printed last, and in eval.md): per distilled draft, its token acceptance minus the baseline's
with a paired bootstrap interval over the prompts (every draft sees the same prompts, so each resample keeps
a prompt's two values together), then the measured and predicted speedups at both batch sizes, its measured
speedup against the baseline draft's (faster or slower only when the two sets of repeats do not overlap, else
inside the timing noise), and, where
the speedup is below 1, why (the cost ratio c, or the batch's verification cost the formula leaves out).
Outputs: printed, and results/<preset>/<task>/eval.{md,json}; the JSON holds the per-prompt metrics
and, with --record, speculative_generate's per-drafted-position records (teacher entropy, beta_i,
accepted) for the entropy analysis (entropy.py / report.py).

Run:  python -m study.evaluate [--preset tiny] [--task gsm8k] [--n-prompts 64] [--record]
      python -m study.evaluate --drafts elsewhere/rkl-s0 elsewhere/jsd-s0/best      (drafts by path, not under runs/)
      python -m study.evaluate --preset paper --task gsm8k --source file --data-path data/gsm8k
"""
import json
import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from plumbing import cli
import data
import models
from plumbing import rundir
import specdec

METRICS = ("token_acceptance", "alpha", "mean_accepted_length")
HEADERS = {"token_acceptance": "token acceptance", "alpha": "analytic alpha",
           "mean_accepted_length": "mean accepted length"}


# ----------------------------------------------------------------------------- statistics (pure)

def bootstrap_ci(values, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of the per-prompt values and its percentile bootstrap interval (prompts resampled with
    replacement). NaN values (prompts with nothing drafted) are left out. -> (mean, lo, hi)"""
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    boot = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)   # (n_boot,)
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return float(x.mean()), float(lo), float(hi)


def per_prompt(per_row: list[dict]) -> dict[str, list]:
    """specdec's per-row stats -> per-prompt metric columns (None where nothing was drafted)."""
    drafted = [r["drafted"] for r in per_row]
    return {
        "token_acceptance": [r["acceptance_rate"] if d else None for r, d in zip(per_row, drafted)],
        "alpha": [r["alpha"] if r["tested"] else None for r in per_row],   # over tested positions
        "mean_accepted_length": [r["mean_accepted_length"] for r in per_row],
        "drafted": drafted,
        "tested": [r["tested"] for r in per_row],   # drafted positions up to each round's first rejection
        "accepted": [r["accepted"] for r in per_row],
        "generated": [r["generated"] for r in per_row],
        "wall_time_s": [r["wall_time_s"] for r in per_row],   # from the row's admission to its finish
    }


def pooled_acceptance(per_row: list[dict]) -> float:
    """sum over prompts of accepted / sum of drafted: every drafted token weighs the same (NaN if none)."""
    drafted = sum(r["drafted"] for r in per_row)
    return sum(r["accepted"] for r in per_row) / drafted if drafted else math.nan


def pooled_alpha(per_row: list[dict]) -> float:
    """Mean beta_i over every TESTED position of every prompt (up to and including each round's first
    rejection; specdec's alpha): the per-token acceptance probability of the speedup formula (NaN if none)."""
    tested = sum(r["tested"] for r in per_row)
    return sum(r["alpha"] * r["tested"] for r in per_row if r["tested"]) / tested if tested else math.nan


def pooled_per_position(per_row: list[dict]) -> list[float]:
    """Per draft position i: accepted at i / tested at i over every prompt (specdec's per_position_acceptance,
    pooled by its per_position_tested counts; NaN where no prompt tested position i)."""
    if not per_row:
        return []
    out = []
    for i in range(len(per_row[0]["per_position_tested"])):
        tested = sum(r["per_position_tested"][i] for r in per_row)
        accepted = sum(r["per_position_acceptance"][i] * r["per_position_tested"][i]
                       for r in per_row if r["per_position_tested"][i])
        out.append(accepted / tested if tested else math.nan)
    return out


def pooled_accepted_length(per_row: list[dict]) -> float:
    """Generated tokens / target calls over every prompt: the tokens a round really yields (NaN if none)."""
    calls = sum(r["target_calls"] for r in per_row)
    return sum(r["generated"] for r in per_row) / calls if calls else math.nan


def theoretical_speedup(alpha: float, gamma: int, c: float) -> float:
    """Expected walltime speedup of speculative decoding over the target alone (Leviathan et al. 2023):
    E[tokens per round] / cost of a round = ((1 - alpha^(gamma+1)) / (1 - alpha)) / (gamma c + 1), with
    c = draft step cost / target step cost. alpha = 1 is the limit gamma + 1 tokens per round."""
    return specdec.expected_accepted_length(alpha, gamma) / (gamma * c + 1)


SPEEDUP_TOLERANCE = 0.10   # repeats of a measured speedup that spread more than this (relative) are flagged


def repeat_summary(speedups, tolerance: float = SPEEDUP_TOLERANCE) -> dict:
    """The per-repeat measured speedups -> their median (the reported speedup), min, max, the relative spread
    (max - min) / median, and whether they agree (spread <= tolerance; one repeat cannot show its noise)."""
    x = np.asarray(speedups, dtype=np.float64)
    median = float(np.median(x))
    spread = float((x.max() - x.min()) / median) if median > 0 else math.inf
    return {"speedup_measured": median, "speedup_repeats": x.tolist(), "speedup_min": float(x.min()),
            "speedup_max": float(x.max()), "speedup_spread": spread,
            "speedup_agree": bool(x.size > 1 and spread <= tolerance), "tolerance": tolerance}


def paired_gain(draft_values, baseline_values, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """draft - baseline on the same prompts: the mean of the per-prompt differences and its percentile bootstrap
    interval, prompts resampled with both their values (paired: the prompt-to-prompt spread, shared by the two
    drafts, cancels). A prompt where either value is missing (None/NaN: nothing drafted) is left out."""
    if len(draft_values) != len(baseline_values):
        raise ValueError(f"a paired difference needs the same prompts: {len(draft_values)} vs "
                         f"{len(baseline_values)} values")
    a = np.asarray([math.nan if v is None else v for v in draft_values], dtype=np.float64)
    b = np.asarray([math.nan if v is None else v for v in baseline_values], dtype=np.float64)
    both = ~(np.isnan(a) | np.isnan(b))
    mean, lo, hi = bootstrap_ci(a[both] - b[both], n_boot=n_boot, seed=seed, level=level)
    return {"mean": mean, "lo": lo, "hi": hi, "n_prompts": int(both.sum())}


def why_slower(alpha: float, gamma: int, c: float, theory: float, batch_size: int) -> str:
    """One sentence: why speculative decoding is slower than the target alone here. Theory below 1: the
    draft is too dear (c above the break-even (E - 1) / gamma, E the tokens a round yields). Theory above 1
    but measured below: what the formula leaves out (the batch's gamma + 1-token verification, bookkeeping)."""
    tokens = specdec.expected_accepted_length(alpha, gamma)
    if theory < 1:
        return (f"the draft costs c = {c:.2f} of a target step, so a round of gamma = {gamma} draft steps and one "
                f"verification costs {gamma * c + 1:.1f} target steps for {tokens:.1f} tokens (alpha {alpha:.2f}): "
                f"it pays only for c < {(tokens - 1) / gamma:.2f}, a cheaper draft or a higher alpha")
    return (f"theory predicts {theory:.2f}x from alpha {alpha:.2f} and c = {c:.2f}, but at batch {batch_size} a round "
            f"costs more than the formula counts: verifying gamma + 1 = {gamma + 1} tokens per row costs more than "
            f"one target step once the batch makes the target compute-bound, and the acceptance bookkeeping is "
            f"paid every round")


FAR_BELOW = 0.8              # a measured speedup under this share of the predicted one is explained by its causes
LENGTH_SHORTFALL = 0.9       # rounds yielding under this share of the formula's tokens: the i.i.d. alpha overstates
POSITION_DROP = 0.1          # acceptance this much lower at the last tested position than at the first: it falls
ROUND_OVERHEAD = 1.15        # rounds costing this much more than their draft steps + one target step timed alone


def shortfall_causes(timing: dict, alpha: float, gamma: int, acceptance: dict | None) -> list[str]:
    """What the data shows besides c when the measured speedup is below the predicted one: rounds yielding
    fewer tokens than the formula's (1 - alpha^(gamma+1)) / (1 - alpha), with acceptance falling with position
    (the formula assumes every position accepted with the same alpha); rounds costing more than gamma draft steps
    and one target step timed alone (the verification of gamma + 1 tokens per row, the acceptance bookkeeping).
    acceptance: {"accepted_length", "per_position"} of the draft (evaluate_draft); timing: round_overhead."""
    causes = []
    if acceptance:
        expected, got = specdec.expected_accepted_length(alpha, gamma), acceptance.get("accepted_length", math.nan)
        if got < LENGTH_SHORTFALL * expected:
            cause = (f"rounds yielded {got:.2f} tokens, not the {expected:.2f} the formula expects from alpha "
                     f"{alpha:.2f}")
            rates = [(i, r) for i, r in enumerate(acceptance.get("per_position") or [], start=1) if not math.isnan(r)]
            if len(rates) > 1 and rates[0][1] - rates[-1][1] > POSITION_DROP:
                cause += (f": acceptance falls with position, {rates[0][1]:.0%} at position 1 to {rates[-1][1]:.0%} "
                          f"at position {rates[-1][0]}, where the formula assumes one alpha at every position")
            causes.append(cause)
    overhead = timing.get("round_overhead", math.nan)
    if overhead > ROUND_OVERHEAD:
        causes.append(f"a round took {overhead:.2f}x the time of its draft steps and one target step timed alone "
                      f"(the verification of gamma + 1 = {gamma + 1} tokens per row and the acceptance bookkeeping)")
    return causes


def speedup_phrase(timing: dict, alpha: float, gamma: int, acceptance: dict | None = None) -> str:
    """'1.45x measured (3 repeats 1.41-1.49, within 10%), 1.80x predicted (c = 0.16)' and, below 1, why."""
    m, th = timing["speedup_measured"], timing["speedup_theoretical"]
    n = len(timing["speedup_repeats"])
    if n == 1:
        noise = "1 repeat: its noise is unknown"
    elif timing["speedup_agree"]:
        noise = (f"{n} repeats {timing['speedup_min']:.2f}-{timing['speedup_max']:.2f}, within "
                 f"{timing['tolerance']:.0%}")
    else:
        noise = (f"NOISY: {n} repeats {timing['speedup_min']:.2f}-{timing['speedup_max']:.2f} differ by "
                 f"{timing['speedup_spread']:.0%}, beyond {timing['tolerance']:.0%}: the machine was busy, rerun it "
                 f"when it is quiet before trusting this number")
    out = (f"batch {timing['batch_size']}: {m:.2f}x measured ({noise}), {th:.2f}x predicted "
           f"(c = {timing['cost_ratio']:.2f})")
    if m < 1:
        out += f"; slower than the target alone because {why_slower(alpha, gamma, timing['cost_ratio'], th, timing['batch_size'])}"
    causes = shortfall_causes(timing, alpha, gamma, acceptance) if m < FAR_BELOW * th else []
    if causes:
        out += f"; measured far below predicted, as measured: {'; '.join(causes)}"
    return out


def speedup_versus_baseline(timing: dict, base: dict) -> str:
    """How a draft's measured speedup compares with the baseline draft's at the same batch, judged against the
    timing noise: the difference is real only when the two sets of repeats do not overlap (each side's repeats
    span [min, max]; with one repeat per side the noise is unknown, and nothing is claimed)."""
    m, b = timing["speedup_measured"], base["speedup_measured"]
    if len(timing["speedup_repeats"]) < 2 or len(base["speedup_repeats"]) < 2:
        return (f"{m:.2f}x vs the baseline draft's {b:.2f}x: one repeat, the timing noise is unknown, so neither "
                f"is shown faster (--speedup-repeats 3)")
    ranges = (f"repeats {timing['speedup_min']:.2f}-{timing['speedup_max']:.2f} vs "
              f"{base['speedup_min']:.2f}-{base['speedup_max']:.2f}")
    if timing["speedup_min"] > base["speedup_max"]:
        return f"{m:.2f}x, faster than the baseline draft's {b:.2f}x ({ranges}: apart)"
    if timing["speedup_max"] < base["speedup_min"]:
        return f"{m:.2f}x, slower than the baseline draft's {b:.2f}x ({ranges}: apart)"
    return (f"{m:.2f}x vs the baseline draft's {b:.2f}x: the difference ({m - b:+.2f}x) is inside the timing noise "
            f"({ranges} overlap), so neither draft is measured faster")


def verdict_lines(entries: list[dict], gamma: int) -> list[str]:
    """The verdict a user acts on, one line per draft (entries[0] is the baseline): the acceptance gain over
    the baseline with its paired 95% interval, and the speedup over the target alone at the evaluation's
    batch and at batch 1, measured and predicted, with why where it is below 1."""
    lines = []
    for e in entries:
        ta = e["summary"]["token_acceptance"]["mean"] * 100
        if e.get("gain") is None:
            head = f"{e['name']}: token acceptance {ta:.1f}% (the reference)"
        else:
            g = e["gain"]
            word = ("above the baseline" if g["lo"] > 0 else "below the baseline" if g["hi"] < 0
                    else "not distinguishable from the baseline")
            head = (f"{e['name']} ({e['divergence']}): token acceptance {ta:.1f}%, {g['mean'] * 100:+.1f} points "
                    f"[{g['lo'] * 100:+.1f}, {g['hi'] * 100:+.1f}] over the baseline (paired bootstrap over "
                    f"{g['n_prompts']} prompts): {word}")
        acceptance = {"accepted_length": e.get("pooled_accepted_length", math.nan),
                      "per_position": e.get("per_position_acceptance")}
        speed = [speedup_phrase(t, e["pooled_alpha"], gamma, acceptance) for t in (e["speedup"], e.get("batch1")) if t]
        line = head + ". Speedup over the target alone, " + "; ".join(speed) + "."
        if e.get("gain") is not None:                        # a distilled draft: its speedup against the baseline's
            versus = [f"batch {t['batch_size']}: " + speedup_versus_baseline(t, b)
                      for key in ("speedup", "batch1")
                      for t, b in [(e.get(key), entries[0].get(key))] if t and b]
            if versus:
                line += " Against the baseline draft, " + "; ".join(versus) + "."
        lines.append(line)
    return lines


def summarize(pp: dict, n_boot: int, seed: int) -> dict:
    """{metric: {mean, lo, hi}} with bootstrap intervals over prompts."""
    out = {}
    for m in METRICS:
        vals = [math.nan if v is None else v for v in pp[m]]
        mean, lo, hi = bootstrap_ci(vals, n_boot=n_boot, seed=seed)
        out[m] = {"mean": mean, "lo": lo, "hi": hi}
    return out


def fmt(s: dict, pct: bool) -> str:
    k = 100.0 if pct else 1.0
    return f"{s['mean'] * k:.2f} [{s['lo'] * k:.2f}, {s['hi'] * k:.2f}]"


def measured_cell(t: dict | None) -> str:
    """'1.45x (1.41-1.49)', 'noisy' appended when the repeats disagree beyond the tolerance; '-' if not timed."""
    if not t:
        return "-"
    if len(t["speedup_repeats"]) == 1:
        return f"{t['speedup_measured']:.2f}x"
    return (f"{t['speedup_measured']:.2f}x ({t['speedup_min']:.2f}-{t['speedup_max']:.2f})"
            + ("" if t["speedup_agree"] else " noisy"))


def table_markdown(entries: list[dict]) -> str:
    """One row per draft: divergence, the three metrics (mean [95% CI]), the paired gain over the baseline,
    tokens/s, and at the evaluation's batch and at batch 1: the cost ratio c and the measured (median of the
    repeats, their range) and theoretical speedups over the target alone."""
    lines = ["| draft | divergence | token acceptance (%) | gain over baseline (points) | analytic alpha (%) "
             "| mean accepted length | tokens/s | target alone tokens/s | c | speedup measured | speedup theory "
             "| batch 1: c | batch 1: measured | batch 1: theory |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        s, t, t1, g = e["summary"], e["speedup"], e.get("batch1"), e.get("gain")
        gain = "-" if g is None else f"{g['mean'] * 100:+.2f} [{g['lo'] * 100:+.2f}, {g['hi'] * 100:+.2f}]"
        b1 = ("- | - | -" if not t1 else
              f"{t1['cost_ratio']:.3f} | {measured_cell(t1)} | {t1['speedup_theoretical']:.2f}x")
        lines.append(f"| {e['name']} | {e['divergence']} | {fmt(s['token_acceptance'], True)} | {gain} | "
                     f"{fmt(s['alpha'], True)} | {fmt(s['mean_accepted_length'], False)} | {e['tokens_per_s']:.0f} "
                     f"| {t['target_tokens_per_s']:.0f} | {t['cost_ratio']:.3f} | {measured_cell(t)} "
                     f"| {t['speedup_theoretical']:.2f}x | {b1} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- I/O

def trained_runs(runs_root: Path, preset: str, task: str) -> list[Path]:
    """Every distilled student of the task: runs/<preset>/<task>/<run>/final."""
    return sorted(p for p in (runs_root / preset / task).glob("*/final") if (p / "config.json").exists())


def run_config(run_dir: Path | None) -> dict | None:
    """A distill.py run's config.json (it names the divergence, seed, task), or None: no run directory, or
    its config.json is a model's (a model folder's config.json has no 'div')."""
    if run_dir is None or not (run_dir / "config.json").is_file():
        return None
    try:
        cfg = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) and "div" in cfg else None


def resolve_draft(path: str) -> dict:
    """--drafts DIR -> {name, label, path (the model folder), task (the run's, or None)}. DIR is a run directory
    of distill.py (its final/ is evaluated) or a model folder (final/, best/ or any Hugging Face folder). Named
    by its run's config.json as '<div>-s<seed>' ('-best' for best/), the divergence label as the discovered
    runs'; a model outside any run is named by its folder ('<run>/final' when the folder is final/ or best/)."""
    d = Path(path)
    if not d.is_dir():
        raise ValueError(f"--drafts {path}: no such folder; pass run directories of distill.py or their "
                         f"final/ or best/ model folders")
    if (d / "final" / "config.json").is_file():
        model_dir, run_dir = d / "final", d
    elif (d / "config.json").is_file() and run_config(d) is None:
        model_dir, run_dir = d, d.parent
    else:
        raise ValueError(f"--drafts {path}: neither a run directory (holding final/) nor a model folder "
                         f"(holding a model's config.json)")
    cfg = run_config(run_dir)
    if cfg is not None:
        name = f"{cfg['div']}-s{cfg.get('seed', '?')}" + ("-best" if model_dir.name == "best" else "")
        return {"name": name, "label": divergence_label(run_dir), "path": str(model_dir), "task": cfg.get("task")}
    name = f"{d.parent.name}/{d.name}" if d.name in ("final", "best") else d.name
    return {"name": name, "label": "?", "path": str(model_dir), "task": None}


def unique_names(names: list[str], taken=("baseline",)) -> list[str]:
    """Each name once (they key the results): a repeated one gets '#2', '#3', ..."""
    seen, out = set(taken), []
    for n in names:
        k, i = n, 1
        while k in seen:
            i += 1
            k = f"{n}#{i}"
        seen.add(k)
        out.append(k)
    return out


def divergence_label(run_dir: Path) -> str:
    """'rkl', 'jsd(beta=0.9)', ... from the run's config.json (written by distill.py)."""
    cfg_file = run_dir / "config.json"
    if not cfg_file.exists():
        return "?"
    cfg = json.loads(cfg_file.read_text())
    div = cfg.get("div", "?")
    return f"jsd(beta={cfg.get('beta'):g})" if div == "jsd" else div


def _bar(total: int, desc: str):
    """Prompts done and tokens/s, as training shows its steps (1000 prompts x 312 tokens take a while)."""
    return tqdm(total=total, desc=desc, unit="prompt", leave=False, mininterval=1.0)


@torch.no_grad()
def evaluate_draft(teacher, draft, prompts, *, batch_size, seed, record, desc="draft", **protocol) -> dict:
    """speculative_generate over the prompts in batches (batch b starting at prompt `start` is seeded
    seed + start): per-prompt metrics, speed and, with record, the per-drafted-position records.
    The speedup over the target alone is timed apart, by time_speedup."""
    per_row, records, tokens, seconds = [], [], 0, 0.0
    with _bar(len(prompts), desc) as bar:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            res = specdec.speculative_generate(teacher, draft, chunk, seed=seed + start, record=record,
                                               **protocol)
            per_row += res.stats["per_row"]
            tokens += sum(len(t) for t in res.tokens)
            seconds += res.stats["wall_time_s"]
            if record:
                rec = {k: v.tolist() for k, v in res.records.items()}
                rec["row"] = [r + start for r in rec["row"]]
                records.append(rec)
            bar.update(len(chunk))
            bar.set_postfix_str(f"{tokens / max(seconds, 1e-9):.0f} tokens/s")
    out = {"per_prompt": per_prompt(per_row), "tokens_per_s": tokens / max(seconds, 1e-9),
           "generated_tokens": tokens, "wall_time_s": seconds, "pooled_acceptance": pooled_acceptance(per_row),
           "pooled_alpha": pooled_alpha(per_row), "pooled_accepted_length": pooled_accepted_length(per_row),
           "per_position_acceptance": pooled_per_position(per_row)}
    if record:
        out["records"] = {k: sum((r[k] for r in records), []) for k in records[0]}
    return out


@torch.no_grad()
def time_speedup(teacher, draft, prompts, *, batch_size: int, seed: int, repeats: int,
                 tolerance: float = SPEEDUP_TOLERANCE, **protocol) -> dict:
    """The measured speedup over the target alone on these prompts in batches of batch_size, repeated.

    Each repeat runs, batch by batch, the target alone (autoregressive_generate: the same sampling settings,
    no draft) and speculative decoding in turns, the order alternating between repeats, so that load from
    other jobs hits both sides; each side of a batch starting at prompt `start` is seeded seed + start, as in
    evaluate_draft, so every repeat generates the same tokens. A repeat's speedup = (draft tokens / draft
    seconds) / (target tokens / target seconds) over all the batches; the result is their median, with the
    spread and whether the repeats agree within `tolerance` (repeat_summary)."""
    sampling = {k: v for k, v in protocol.items() if k != "gamma"}        # the target alone: all but gamma
    runs = []
    for r in range(repeats):
        t = {"target_s": 0.0, "target_tokens": 0, "draft_s": 0.0, "draft_tokens": 0}
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            for side in (("target", "draft") if r % 2 == 0 else ("draft", "target")):
                res = (specdec.autoregressive_generate(teacher, chunk, seed=seed + start, **sampling)
                       if side == "target" else
                       specdec.speculative_generate(teacher, draft, chunk, seed=seed + start, **protocol))
                t[f"{side}_s"] += res.stats["wall_time_s"]
                t[f"{side}_tokens"] += sum(len(x) for x in res.tokens)
                if side == "draft":                          # batched rounds and draft steps: the round's cost
                    t["draft_rounds"] = t.get("draft_rounds", 0) + res.stats["target_calls"]
                    t["draft_steps"] = t.get("draft_steps", 0) + res.stats["draft_calls"]
        t["speedup"] = (t["draft_tokens"] / max(t["draft_s"], 1e-9)) / (t["target_tokens"] / max(t["target_s"], 1e-9))
        runs.append(t)
    out = {"batch_size": batch_size, "prompts": len(prompts), "timings": runs,
           **repeat_summary([t["speedup"] for t in runs], tolerance)}
    out["target_tokens_per_s"] = float(np.median([t["target_tokens"] / max(t["target_s"], 1e-9) for t in runs]))
    out["draft_tokens_per_s"] = float(np.median([t["draft_tokens"] / max(t["draft_s"], 1e-9) for t in runs]))
    return out


@torch.no_grad()
def cost_ratio(draft, target, prompts, *, n_steps: int = 16, repeats: int = 3, **sampling) -> dict:
    """c = draft step cost / target step cost. A model's step cost is its seconds per decoding step alone on
    this batch of prompts: (time to generate 1 + n_steps tokens - time to generate 1) / n_steps, so the
    prompt's prefill cancels; no stop ids, so every row runs every step. The two models are timed in turns,
    best of `repeats` each (the run least disturbed by other jobs)."""
    sampling = {k: v for k, v in sampling.items() if k not in ("max_new_tokens", "eos_token_id", "gamma")}
    best = {}
    for _ in range(repeats):
        for name, model in (("target", target), ("draft", draft)):
            for n in (1, 1 + n_steps):
                t = specdec.autoregressive_generate(model, prompts, max_new_tokens=n, seed=0, eos_token_id=[],
                                                    **sampling).stats["wall_time_s"]
                best[name, n] = min(best.get((name, n), math.inf), t)
    step = {name: max(best[name, 1 + n_steps] - best[name, 1], 1e-9) / n_steps for name in ("target", "draft")}
    return {"cost_ratio": step["draft"] / step["target"], "target_step_s": step["target"],
            "draft_step_s": step["draft"]}


def round_overhead(t: dict) -> float:
    """Seconds of speculative decoding / what its rounds would cost at the step costs timed alone (each draft
    step at draft_step_s, each round's verification at one target step, target_step_s): the median over the
    repeats. Above 1: what the formula's gamma c + 1 leaves out (verifying gamma + 1 tokens, bookkeeping)."""
    ratios = [r["draft_s"] / (r["draft_steps"] * t["draft_step_s"] + r["draft_rounds"] * t["target_step_s"])
              for r in t["timings"] if r.get("draft_rounds")]
    return float(np.median(ratios)) if ratios else math.nan


def task_group(args, task: str) -> str:
    """The task's folder under <runs>/<preset>/ and <results>/<preset>/ (rundir.task_group: the task, with
    the data in the name when it is not the preset's own)."""
    preset_source = models.preset_data(args.preset, task)
    source, data_path = data.resolve_source(args.source, args.data_path, preset_source)
    return rundir.task_group(task, source, data_path, preset_source)


def check_task_inputs(args, task: str) -> dict:
    """Everything of a task's evaluation that can be wrong, before any model loads: the pair (the preset's,
    built on first use), the eval rows (checked; CNN/DM's length filter with the teacher's tokenizer), every
    model folder (teacher, baseline, each run's final: config.json, safetensors headers), and every prompt
    + max_new_tokens within the models' context. -> the ids, the prompts, the drafts, the data."""
    pc = models.preset_config(args.preset, task)
    teacher_id, student_id = args.teacher, args.student
    if teacher_id is None or student_id is None:                    # the preset's pair (tiny: built on first use)
        t, s = models.resolve_pair(task, args.preset)
        teacher_id, student_id = teacher_id or t, student_id or s
    models.check_gguf_paths(teacher=teacher_id, student=student_id)          # a .gguf: one line if it is not one
    teacher_id, student_id = models.model_folder(teacher_id), models.model_folder(student_id)
    source, data_path = data.resolve_source(args.source, args.data_path, models.preset_data(args.preset, task))
    group = task_group(args, task)
    tokenizer = models.load_tokenizer(teacher_id, "teacher")
    n = args.n_prompts or pc.get("n_eval_prompts") or 64
    examples = data.load_examples(task, "eval", source=source, path=data_path, n=n, tokenizer=tokenizer,
                                  verbose=True)
    drafts = [("baseline", "baseline (no distillation)", student_id)]
    if args.drafts is not None:                                     # the drafts named by path (parse_args: resolved)
        for d in args.drafts:
            if d["task"] is not None and d["task"] != task:
                raise ValueError(f"--drafts {d['path']}: its run trained on task {d['task']}, not {task}; "
                                 f"pass --task {d['task']} or drafts of {task}")
        drafts += [(d["name"], d["label"], d["path"]) for d in args.drafts]
    else:
        drafts += [(final.parent.name, divergence_label(final.parent), str(final))
                   for final in trained_runs(Path(args.runs), args.preset, group)]
    if args.runs_given and len(drafts) == 1:
        print(f"[evaluate] --runs {args.runs} holds no trained draft of {args.preset}/{group} "
              f"({Path(args.runs) / args.preset / group}/*/final): the baseline alone", flush=True)
    models.check_model_files(teacher_id, "teacher")
    for name, _, path in drafts:
        models.check_model_files(path, "baseline student" if name == "baseline" else f"draft {name}")
        models.check_tokenizers(teacher_id, path)
    for role, path in [("teacher", teacher_id)] + [(name, path) for name, _, path in drafts]:
        models.check_vocabulary(path, tokenizer, role)       # the lm_heads cover the tokenizer, from config.json
    max_new = args.max_new_tokens or pc.get("max_new_tokens") or 0
    context = models.context_length(teacher_id, *(d[2] for d in drafts))
    data.check_prompt_chars(tokenizer, task, examples, context, max_new)      # a huge row: before tokenizing it
    prompts = [data.build_prompt_ids(tokenizer, task, e) for e in examples]
    data.check_prompt_lengths(prompts, examples, context, max_new)
    return {"teacher": teacher_id, "student": student_id, "prompts": prompts, "drafts": drafts,
            "source": source, "data_path": data_path, "group": group}


def evaluate_task(args, task: str, inputs: dict) -> dict:
    """Every draft of the task (check_task_inputs: checked) on its prompts -> the results document."""
    pc = models.preset_config(args.preset, task)
    teacher_id, student_id, prompts = inputs["teacher"], inputs["student"], inputs["prompts"]
    source, data_path, drafts = inputs["source"], inputs["data_path"], inputs["drafts"]
    teacher, baseline, tok = models.load_pair(teacher_id, student_id, load_in_8bit=args.teacher_8bit)
    # -- the decoding protocol (the same for every draft and for the target alone; as distill.py's)
    decoding = models.decoding_protocol(pc, tok, teacher, gamma=args.gamma, top_p=args.top_p,
                                        max_new_tokens=args.max_new_tokens)
    protocol = decoding.speculative_kwargs()                        # vocab_size: q is never put on lm_head padding
    # one distilled draft in memory at a time: with the paper preset each is a 0.6B model
    entries = []
    for name, label, path in drafts:
        draft = (baseline if name == "baseline" else models.load_model(path, device=teacher.device)).eval()
        res = evaluate_draft(teacher, draft, prompts, batch_size=args.batch_size, seed=args.seed,
                             record=args.record, desc=f"{task}/{name}", **protocol)
        entry = {"name": name, "divergence": label, "path": path, "n_prompts": len(prompts),
                 "summary": summarize(res["per_prompt"], args.n_boot, args.seed), **res}
        # -- the speedup over the target alone: at the evaluation's batch size, then at batch 1
        for key, batch, timed in (("speedup", args.batch_size, prompts[:args.speedup_batches * args.batch_size]),
                                  ("batch1", 1, prompts[:args.batch1_prompts])):
            if not timed:
                entry[key] = None
                continue
            t = time_speedup(teacher, draft, timed, batch_size=batch, seed=args.seed, repeats=args.speedup_repeats,
                             **protocol)
            t.update(cost_ratio(draft, teacher, timed[:batch], **protocol))
            t["round_overhead"] = round_overhead(t)
            t["speedup_theoretical"] = theoretical_speedup(res["pooled_alpha"], protocol["gamma"], t["cost_ratio"])
            entry[key] = t
        base = entries[0]["per_prompt"]["token_acceptance"] if entries else None
        entry["gain"] = (None if base is None else
                         paired_gain(res["per_prompt"]["token_acceptance"], base, args.n_boot, args.seed))
        entry["verdict"] = verdict_lines(entries + [entry], protocol["gamma"])[-1]   # entries[0]: the baseline
        entries.append(entry)
        print("  " + entry["verdict"])
    return {"preset": args.preset, "task": task, "group": inputs["group"], "teacher": teacher_id,
            "protocol": {**decoding.as_dict(), "n_prompts": len(prompts), "seed": args.seed, "n_boot": args.n_boot,
                         "split": "eval", "source": source, "data_path": data_path,
                         "batch_size": args.batch_size, "speedup_repeats": args.speedup_repeats,
                         "speedup_tolerance": SPEEDUP_TOLERANCE, "threads": args.threads},
            "runs": {e["name"]: e for e in entries}}


def write_results(doc: dict, results_root: Path) -> Path:
    out = results_root / doc["preset"] / doc.get("group", doc["task"])    # rundir.task_group: data in the name
    out.mkdir(parents=True, exist_ok=True)
    p = doc["protocol"]
    md = [f"# {doc['task']} ({doc['preset']} preset): speculative decoding with each draft", "",
          f"Target {doc['teacher']}; gamma {p['gamma']}, top-p {p['top_p']}, temperature {p['temperature']}, "
          f"max_new_tokens {p['max_new_tokens']}, {p['n_prompts']} held-out prompts, seed {p['seed']}. "
          f"Mean over prompts [95% bootstrap interval over prompts, {p['n_boot']} resamples]. Data: "
          f"{p['source']}{' ' + str(p['data_path']) if p.get('data_path') else ''}.", "",
          "Speedup measured = tokens/s with the draft / tokens/s of the target alone (autoregressive_generate "
          f"on the same prompts, sampling settings and seeds), at batch {p['batch_size']} and at batch 1, the median "
          f"of {p['speedup_repeats']} repeats timed in turns (their range in brackets; 'noisy': they spread more than "
          f"{SPEEDUP_TOLERANCE:.0%}); c = draft / target seconds per decoding step at that batch; speedup theory = "
          "(1 - alpha^(gamma+1)) / ((1 - alpha)(gamma c + 1)) with the pooled analytic alpha; gain = token "
          "acceptance minus the baseline's, mean over prompts [95% paired bootstrap interval].", "",
          table_markdown(list(doc["runs"].values())), "", "## Verdict", "",
          *[f"- {e['verdict']}" for e in doc["runs"].values()], ""]
    (out / "eval.md").write_text("\n".join(md))

    def clean(x):                                                  # NaN -> null: strict JSON
        if isinstance(x, float) and math.isnan(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x
    (out / "eval.json").write_text(json.dumps(clean(doc)))
    return out


def parse_args(argv=None):
    p = cli.ArgumentParser(prog="python -m study.evaluate",
                           description="Speculative-decoding acceptance of the baseline and distilled drafts.",
                           epilog="example: python -m study.evaluate --preset tiny --task gsm8k --record")
    p.add_argument("--preset", default="tiny", help=f"one of {', '.join(models.PRESETS)} (default %(default)s)")
    p.add_argument("--task", default=None, help=f"one of {', '.join(data.TASKS)} (default: every task with trained drafts)")
    p.add_argument("--teacher", default=None, help="override the preset's teacher (path or hub id)")
    p.add_argument("--student", default=None, help="override the preset's baseline student")
    p.add_argument("--runs", default=None, help="root of distill.py's runs: <runs>/<preset>/<task>/<run>/final, "
                   "<task> with the data in its name off the preset's data (rundir.task_group); given, it must "
                   "hold the task's runs (default runs, which may hold none: the baseline alone)")
    p.add_argument("--drafts", nargs="+", default=None, metavar="DIR", help="evaluate these drafts (beside the "
                   "baseline) instead of the runs under --runs: distill.py run directories (their final/) or model "
                   "folders (a run's final/ or best/, or any); each labelled by its run's config.json (<div>-s<seed>), "
                   "else by its folder name. The task: --task, else the runs' own")
    p.add_argument("--results", default="results", help="writes <results>/<preset>/<task>/eval.{md,json} "
                   "(default %(default)s)")
    p.add_argument("--n-prompts", type=int, default=None, help="held-out prompts (default: the preset's)")
    p.add_argument("--source", default=None, help=f"eval prompts from one of {', '.join(data.SOURCES)} "
                   "(default: file with --data-path, else the preset's)")
    p.add_argument("--data-path", default=None, help="a .jsonl/.json/.parquet file or a folder; the eval split "
                   "is test.* (CNN/DM: validation.* without a test file), see README 'Data'")
    p.add_argument("--record", action="store_true", help="store the per-drafted-position records in the JSON")
    p.add_argument("--gamma", type=int, default=None, help="draft tokens per round (default: the preset's, 5)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="most tokens generated per prompt (default: the preset's, e.g. 312 for paper/gsm8k)")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus top-p of both p and q (default: the preset's, 0.95 as the seed's)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="prompts per speculative_generate call (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, the same for every draft; also the bootstrap's "
                   "(default %(default)s)")
    p.add_argument("--speedup-batches", type=int, default=2, help="time the speedup over the target alone on the "
                   "first K batches (default %(default)s; each costs a target-alone and a speculative generation per "
                   "draft and repeat)")
    p.add_argument("--speedup-repeats", type=int, default=3, help=cli.help_text(
                   "time each speedup this many times, the target alone and the draft in turns; repeats spreading "
                   f"more than {SPEEDUP_TOLERANCE:.0%} are flagged") + " (default %(default)s)")
    p.add_argument("--batch1-prompts", type=int, default=4, help="also time the speedup at batch 1 on the first N "
                   "prompts, one at a time (default %(default)s; 0: not at batch 1)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples per interval (default %(default)s)")
    p.add_argument("--teacher-8bit", action="store_true", help="load the teacher in 8 bits with bitsandbytes")
    cli.add_threads_option(p)
    args = p.parse_args(argv)
    cli.check_threads(args.threads)
    cli.check_seed(args.seed)
    args.runs_given, args.runs = args.runs is not None, args.runs or "runs"
    cli.check_runs_root(args.runs, given=args.runs_given)       # a file, or a --runs not there
    rundir.check_out_dir(Path(args.results), flag="--results")
    if args.top_p is not None and not (math.isfinite(args.top_p) and 0 < args.top_p <= 1):
        raise ValueError(f"--top-p {args.top_p} is not allowed; --top-p must be in (0, 1] (1 = no nucleus)")
    models.check_preset(args.preset)
    if args.drafts is not None:
        if args.runs_given:
            raise ValueError("--drafts and --runs are two ways to pick the drafts: pass one (--drafts names them, "
                             "--runs finds every run of the task under it)")
        args.drafts = [resolve_draft(d) for d in args.drafts]
        names = unique_names([d["name"] for d in args.drafts])
        for d, name in zip(args.drafts, names):
            d["name"] = name
        if args.task is None:
            tasks = sorted({d["task"] for d in args.drafts if d["task"] is not None})
            if len(tasks) != 1:
                raise ValueError(f"--drafts: pass --task ({', '.join(data.TASKS)}); the drafts' runs name "
                                 f"{'no task' if not tasks else 'tasks ' + ', '.join(tasks)}")
            args.task = tasks[0]
    if args.task is not None:
        data.check_task(args.task)
    data.resolve_source(args.source, args.data_path)               # the rule's errors, before anything loads
    if args.data_path is not None and args.task is None:
        raise ValueError(f"--data-path {args.data_path!r} holds one task's data: pass --task "
                         f"({', '.join(data.TASKS)})")
    if args.batch1_prompts < 0:
        raise ValueError(f"--batch1-prompts must be >= 0, got {args.batch1_prompts}")
    for name in ("n_prompts", "gamma", "batch_size", "speedup_batches", "speedup_repeats", "max_new_tokens", "n_boot"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    return args


def main(argv=None) -> dict:
    """Check every task's inputs (bad input: one line, before any model loads), then evaluate each task."""
    with cli.before_the_work():
        args = parse_args(argv)
        if args.task is not None:
            tasks = [args.task]
        else:
            tasks = [t for t in models.preset_tasks(args.preset)
                     if trained_runs(Path(args.runs), args.preset, task_group(args, t))]
            if not tasks:
                raise ValueError(f"no trained drafts under {args.runs}/{args.preset}/<task>/*/final; train one "
                                 f"(make train TASK=gsm8k DIV=rkl) or pass --task to evaluate the baseline")
        inputs = {task: check_task_inputs(args, task) for task in tasks}
    cli.set_threads(args.threads)
    docs = {}
    for task in tasks:
        doc = evaluate_task(args, task, inputs[task])
        out = write_results(doc, Path(args.results))
        print(f"\n{task} ({args.preset}):\n{table_markdown(list(doc['runs'].values()))}\n-> {out}/eval.{{md,json}}")
        print(f"\nVerdict ({task}, {doc['protocol']['n_prompts']} prompts, gamma {doc['protocol']['gamma']}):")
        for e in doc["runs"].values():
            print(f"- {e['verdict']}")
        docs[task] = doc
    return docs


if __name__ == "__main__":
    cli.script_main(main)
