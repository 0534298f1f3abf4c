"""The statistics of the study and of the curve: means over training seeds of per-prompt metrics, with
95% bootstrap intervals over seeds AND prompts, and the sentence a paired difference supports.

Notation: S training seeds (one trained draft each), P eval prompts, every run decoding the SAME P
prompts with the same sampling seed, so prompts and seeds are CROSSED, not nested. A statistic is the
mean over seeds of a per-seed ratio over prompts, sum_p num[s, p] / sum_p den[s, p] (a per-prompt
mean when den = 1 where the prompt has a value, 0 where it has none: `per_prompt_ratio`).

- `crossed_bootstrap`: one replicate draws ONE multiset of prompts, shared by every seed and by both
  sides of a difference A - B (paired by prompt: the prompts' shared difficulty cancels), and each
  side's seeds with replacement; the percentile interval of the replicates.
- `hierarchical_bootstrap`: the nested design (seeds, then prompts within each seed), for runs that do
  not share their prompts.
- `metric_bootstrap`: a metric of per-seed per-prompt columns (minus another's), through the crossed
  bootstrap when every run has the same prompts, else the nested one.
- `difference_statement`: separated (the interval excludes 0), equivalent within +/- EQUIV_MARGIN, or
  the bound the data give.

Used by report.py (the two-task study) and curve.py (the entropy curve): one implementation.
"""
from __future__ import annotations

import warnings

import numpy as np

EQUIV_MARGIN = 0.015              # "equivalent": the 95% interval of the difference lies within +/- 1.5 points


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


def _seed_ratios(num, den, weights):
    """Per seed and bootstrap replicate: sum_prompts w * num / sum_prompts w * den.
    num, den: (S, P, ...) ; weights: (n_boot, P) prompt multiplicities -> (n_boot, S, ...)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.einsum("bp,sp...->bs...", weights, num) / np.einsum("bp,sp...->bs...", weights, den)


def _as_stack(per_seed, name):
    x = np.stack([np.asarray(v, dtype=np.float64) for v in per_seed])      # (S, P, ...)
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"{name} needs one (P, ...) array per seed, got shape {x.shape}")
    return x


def crossed_bootstrap(a_num, a_den, b_num=None, b_den=None, n_boot: int = 2000, seed: int = 0,
                      level: float = 0.95):
    """Mean over seeds of a ratio over prompts (minus B's, if given), with a percentile interval from
    a bootstrap that resamples prompts AND seeds.

    Every run of the study is evaluated on the SAME prompts with the same sampling seed: prompts and
    training seeds are crossed, not nested. So one replicate draws ONE multiset of prompts (shared by
    every seed and by both sides of a difference: the comparison is paired by prompt) and, for each
    side, its seeds with replacement. The statistic of a side is the mean over its drawn seeds of
    sum_prompts w * num / sum_prompts w * den (e.g. num = accepted, den = tested tokens of a bin;
    or num = a per-prompt value, den = 1, and 0/0 for a prompt without one). A side with one run
    (the baseline) has no seed to resample. The point estimate is the statistic on the data as seen.

    a_num, a_den, b_num, b_den: one array per seed, each (P,) or (P, K) for K statistics at once
    (e.g. bins). -> (mean, lo, hi), each a float or a (K,) array; NaN where a side has no data."""
    A_num, A_den = _as_stack(a_num, "a_num"), _as_stack(a_den, "a_den")
    sides = [(A_num, A_den, 1.0)]
    if b_num is not None:
        sides.append((_as_stack(b_num, "b_num"), _as_stack(b_den, "b_den"), -1.0))
    P = A_num.shape[1]
    if any(x.shape[1:] != A_num.shape[1:] for n, d, _ in sides for x in (n, d)):
        raise ValueError("every run must have the same prompts (and bins): shapes "
                         f"{[x.shape for n, d, _ in sides for x in (n, d)]}")
    rng = np.random.default_rng(seed)
    weights = np.stack([np.bincount(r, minlength=P) for r in rng.integers(0, P, size=(n_boot, P))])  # (n_boot, P)
    point, boot = 0.0, 0.0
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)       # all-NaN slices: a bin a side never reached
        for num, den, sign in sides:
            S = num.shape[0]
            point = point + sign * np.nanmean(num.sum(1) / den.sum(1), 0)        # (...): mean of per-seed ratios
            ratios = _seed_ratios(num, den, weights.astype(np.float64))           # (n_boot, S, ...)
            picks = rng.integers(0, S, size=(n_boot, S))                          # (n_boot, S) seeds drawn
            drawn = np.take_along_axis(ratios, picks.reshape(picks.shape + (1,) * (ratios.ndim - 2)), 1)
            boot = boot + sign * np.nanmean(drawn, 1)                             # (n_boot, ...)
        lo, hi = np.nanquantile(boot, [(1 - level) / 2, (1 + level) / 2], axis=0)
    if np.ndim(point) == 0:
        return float(point), float(lo), float(hi)
    return np.asarray(point, dtype=np.float64), lo, hi


def per_prompt_ratio(values):
    """A per-prompt metric (NaN = nothing drafted) as num / den for crossed_bootstrap: the ratio is
    then the mean over the prompts that have a value."""
    v = np.asarray(values, dtype=np.float64)
    ok = ~np.isnan(v)
    return np.where(ok, v, 0.0), ok.astype(np.float64)


def difference_statement(a: str, b: str, diff, margin: float = EQUIV_MARGIN) -> str:
    """The finding a paired difference A - B = (mean, lo, hi) supports: separated (the 95% interval
    excludes 0), equivalent within +/- margin (the interval lies inside it), or neither: then the
    bound the data do give, max(|lo|, |hi|)."""
    m, lo, hi = (100 * x for x in diff)
    text = f"{a} - {b} = {m:+.2f} points [{lo:+.2f}, {hi:+.2f}]"
    if lo > 0 or hi < 0:
        better, worse = (a, b) if lo > 0 else (b, a)
        return f"{text}: separated, {better} is better than {worse} (95% interval excludes 0)"
    bound = max(abs(lo), abs(hi))
    if bound <= 100 * margin:
        return (f"{text}: not separated, and equivalent within +/- {100 * margin:.1f} points "
                f"(the whole 95% interval lies within +/- {bound:.2f})")
    return (f"{text}: not separated, and not bounded to +/- {100 * margin:.1f} points; the data bound the "
            f"difference to +/- {bound:.2f} points at 95% confidence")


def metric_bootstrap(seeds: list, metric: str, n_boot: int = 2000, vs: list | None = None):
    """A metric's mean over seeds of per-seed prompt means (minus those of `vs`), 95% interval.
    Runs on the same prompts (the study's design): crossed_bootstrap, paired by prompt; otherwise (a
    hand-made eval set) the nested hierarchical_bootstrap, which needs no shared prompts."""
    lengths = {len(s[metric]) for s in seeds + (vs or [])}
    if len(lengths) == 1:
        a = [per_prompt_ratio(s[metric]) for s in seeds]
        b = [per_prompt_ratio(s[metric]) for s in vs] if vs else None
        return crossed_bootstrap([x[0] for x in a], [x[1] for x in a], b and [x[0] for x in b],
                                 b and [x[1] for x in b], n_boot=n_boot)
    if vs:
        raise ValueError(f"a paired difference needs the same prompts on both sides, got prompt counts {lengths}")
    return hierarchical_bootstrap([s[metric] for s in seeds], n_boot=n_boot)
