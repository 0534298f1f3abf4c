"""Teacher entropy and draft acceptance: the analysis behind "which divergence for which task".

Notation: p = the target/teacher's next-token distribution, q = the draft/student's.

What we measure, per drafted token (one *record*):
  H(p)   = -sum_x p(x) log p(x), in nats, of the teacher's PROCESSED distribution: the logits
           divided by the temperature, then top-k / top-p (nucleus) applied and renormalised,
           exactly the p that speculative verification uses (`specdec.process_logits`).
           Why processed: a token is accepted with probability min(1, p(x)/q(x)) under THAT p, so
           that is the distribution whose sharpness governs acceptance. The raw logits' entropy
           would count tail tokens top-p can never emit; with top-p 0.95 a near-certain teacher has
           H(p) = 0 exactly (one token survives), which is why the lowest bin starts at 0.
  accepted           whether the verifier accepted the drafted token (a Bernoulli sample);
  beta = sum_x min(p(x), q(x)) = 1 - TVD(p, q)   the analytic acceptance probability at that
           position (its expectation given the context; alpha = E[beta]).

Two entropy views, both of the target's distribution at the drafted position:
  processed  H(p) above (`teacher_entropy` in the records): what verification uses. After top-p
             0.95 a position whose top token holds >= 0.95 keeps one token, so H = 0 EXACTLY at
             most positions of a confident teacher, and small non-zero values are rare.
  tempered   H(softmax(logits / T)) before top-k / top-p (`teacher_entropy_tempered`): continuous,
             what "teacher entropy" means in the seed's analysis.

Acceptance vs entropy: the records are put in entropy bins. `quantile_edges` chooses bins the data
fill: H = 0 exactly is its own bin where it occurs, the positive values are cut at their quantiles
(equal token counts per bin), so no bin is empty by construction. (`log_edges`, fixed log-spaced
bins from 1e-4 nats as in the seed, are kept for the CLI; on these teachers most of them are
empty.) Per bin we report the token count n, the
acceptance rate k/n with a 95% Wilson score interval, and the mean analytic beta. Bins with fewer
than `min_count` tokens are flagged `too_few` (drawn hollow, marked in tables), never dropped.
Caveat written where it is used: tokens of one sequence are not independent, so the Wilson
interval (which assumes they are) is a lower bound on the real uncertainty; the report's headline
numbers use a bootstrap over seeds and prompts instead.

Names: the records' `teacher_entropy` is this processed H(p). distill.py's metrics.jsonl logs another
quantity under another name, `loss_teacher_entropy`: H at the loss temperature without top-p.

Where records come from (decoding settings: pass **models.decoding_protocol(...).speculative_kwargs()
or .generate_kwargs(), the protocol training and evaluation share; this module does not import models):
  - speculative decoding: `specdec.speculative_generate(..., record=True).records`, a dict of
    equal-length 1-D tensors row, position, accepted, teacher_entropy, acceptance_prob;
  - plain teacher sampling: `teacher_sample_entropies` samples the teacher with
    `specdec.autoregressive_generate`, then runs ONE teacher forward over prompt + completion and
    takes H(p) at every position that predicted a sampled token: the task's entropy profile.

Pure numpy/torch functions for the math; the plots (matplotlib, Agg backend, imported lazily)
are separate at the bottom.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

RECORD_KEYS = ("row", "position", "accepted", "teacher_entropy", "teacher_entropy_tempered", "acceptance_prob")
VIEWS = {"processed": "teacher_entropy", "tempered": "teacher_entropy_tempered"}  # entropy view -> record key
VIEW_TITLES = {"processed": "H(p), processed (temperature + top-p)",
               "tempered": "H(softmax(logits/T)), before top-p"}
Z95 = 1.959963984540054  # standard normal quantile for a two-sided 95% interval
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


# ----------------------------------------------------------------------------- entropy

def processed_entropy(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """H(p) in nats of the teacher's processed distribution, the p verification uses.  (..., V) -> (...,)
    specdec's process_logits and entropy: one definition of "processed" and of H in the project."""
    from specdec import entropy, process_logits

    return entropy(process_logits(logits.float(), temperature, top_k, top_p)).clamp_min(0.0)


# ----------------------------------------------------------------------------- records

def as_records(records) -> dict[str, np.ndarray]:
    """Validate a record dict (tensors or lists, e.g. read back from JSON) -> dict of numpy arrays."""
    if not isinstance(records, dict):
        raise ValueError(f"records must be a dict with keys {RECORD_KEYS}, got {type(records).__name__}")
    missing = [k for k in ("accepted", "teacher_entropy", "acceptance_prob") if k not in records]
    if missing:
        raise ValueError(f"records lack keys {missing}; expected {RECORD_KEYS}")
    out = {k: np.asarray(v.cpu().numpy() if torch.is_tensor(v) else v) for k, v in records.items() if k in RECORD_KEYS}
    lengths = {k: v.shape for k, v in out.items()}
    if len({s for s in lengths.values()}) != 1 or any(len(s) != 1 for s in lengths.values()):
        raise ValueError(f"records must be equal-length 1-D arrays, got shapes {lengths}")
    out["accepted"] = out["accepted"].astype(bool)
    out["teacher_entropy"] = out["teacher_entropy"].astype(np.float64)
    if "teacher_entropy_tempered" in out:
        out["teacher_entropy_tempered"] = out["teacher_entropy_tempered"].astype(np.float64)
    out["acceptance_prob"] = out["acceptance_prob"].astype(np.float64)
    if np.isnan(out["teacher_entropy"]).any():
        raise ValueError("teacher_entropy contains NaN")
    return out


def concat_records(parts) -> dict[str, np.ndarray]:
    """Concatenate several record dicts (e.g. one per seed); `row` is offset so rows stay distinct."""
    parts = [as_records(p) for p in parts]
    if not parts:
        raise ValueError("concat_records needs at least one record dict")
    keys = set.intersection(*(set(p) for p in parts))
    out = {k: np.concatenate([p[k] for p in parts]) for k in keys}
    if "row" in keys:
        offsets = np.cumsum([0] + [int(p["row"].max()) + 1 if len(p["row"]) else 0 for p in parts[:-1]])
        out["row"] = np.concatenate([p["row"] + o for p, o in zip(parts, offsets)])
    return out


# ----------------------------------------------------------------------------- binning

def log_edges(lo: float = 1e-4, hi: float = 10 ** 0.5, per_decade: int = 2) -> np.ndarray:
    """Bin edges [0, lo, ..., hi, inf]: log-spaced between lo and hi, plus an underflow bin
    [0, lo) (H = 0 exactly is common after top-p) and an open-ended top bin [hi, inf)."""
    if not (0 < lo < hi) or per_decade < 1:
        raise ValueError(f"need 0 < lo < hi and per_decade >= 1, got lo={lo}, hi={hi}, per_decade={per_decade}")
    n = int(round(math.log10(hi / lo) * per_decade))
    return np.concatenate([[0.0], np.logspace(math.log10(lo), math.log10(hi), n + 1), [np.inf]])


DEFAULT_EDGES = log_edges()  # 0 | 1e-4 .. 10^0.5 nats in half decades | inf : 11 bins
ZERO_EDGE = 5e-324           # the smallest positive double: the bin [0, ZERO_EDGE) holds H = 0 exactly


def quantile_edges(values, n_bins: int = 6) -> np.ndarray:
    """Bins the data fill: [0, ZERO_EDGE) for H = 0 exactly (only if some value is 0), then the
    positive values cut at their 1/n_bins, ..., (n_bins-1)/n_bins quantiles, the last bin open-ended.

    Each positive bin gets about the same number of tokens (ties at an edge can merge two bins: the
    repeated edges are dropped). -> edges [0, (ZERO_EDGE,) q_1, ..., q_{n_bins-1}, inf] for bin_index.
    """
    h = np.clip(np.asarray(values, dtype=np.float64).reshape(-1), 0.0, None)
    if h.size == 0 or n_bins < 1:
        raise ValueError(f"quantile_edges needs values and n_bins >= 1, got {h.size} values, n_bins={n_bins}")
    pos = h[h > 0]
    edges = [0.0]
    if pos.size == 0:                               # every value is 0: one bin
        return np.array([0.0, np.inf])
    if pos.size < h.size:
        edges.append(ZERO_EDGE)
    inner = np.quantile(pos, np.arange(1, n_bins) / n_bins) if n_bins > 1 else np.array([])
    edges += sorted({float(x) for x in inner if x > edges[-1]})
    return np.array(edges + [np.inf])


def bin_index(values, edges=DEFAULT_EDGES) -> np.ndarray:
    """Index i of the bin [edges[i], edges[i+1]) holding each value; tiny negative round-off -> bin 0."""
    values = np.clip(np.asarray(values, dtype=np.float64), 0.0, None)
    idx = np.searchsorted(np.asarray(edges), values, side="right") - 1
    return np.clip(idx, 0, len(edges) - 2)


def bin_label(lo: float, hi: float) -> str:
    """Short human label for [lo, hi): '<1e-4', '1e-4-3e-4', '0.32-1', '>=3.2'; the H = 0 bin of
    quantile_edges is '0', the bin after it starts at '0+'."""
    def fmt(x):
        return f"{x:.0e}".replace("e-0", "e-") if x < 0.01 else f"{x:.2g}"

    if lo == 0 and hi <= ZERO_EDGE:
        return "0"
    if lo <= ZERO_EDGE and lo > 0:
        return ">0" if math.isinf(hi) else f"0+-{fmt(hi)}"
    if lo == 0:
        return f"<{fmt(hi)}"
    if math.isinf(hi):
        return f">={fmt(lo)}"
    return f"{fmt(lo)}-{fmt(hi)}"


# ----------------------------------------------------------------------------- intervals

def wilson_interval(k, n, z: float = Z95):
    """95% Wilson score interval for a binomial rate k/n (vectorised). n = 0 -> (nan, nan).

    center = (k/n + z^2/2n) / (1 + z^2/n),  half = z/(1 + z^2/n) * sqrt(k/n (1-k/n) / n + z^2/4n^2)
    Unlike the normal approximation it stays inside [0, 1] and is not degenerate at k = 0 or k = n.
    """
    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        phat = k / n
        denom = 1 + z * z / n
        center = (phat + z * z / (2 * n)) / denom
        half = z / denom * np.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n))
        return np.clip(center - half, 0.0, 1.0), np.clip(center + half, 0.0, 1.0)


# ----------------------------------------------------------------------------- tables

@dataclass
class EntropyBin:
    lo: float
    hi: float
    count: int          # drafted tokens whose teacher entropy falls in [lo, hi)
    accepted: int
    rate: float         # accepted / count (nan when count == 0)
    ci_lo: float        # 95% Wilson interval of the rate
    ci_hi: float
    mean_beta: float    # mean analytic sum_x min(p, q) (nan when count == 0)
    too_few: bool       # count < min_count: shown, but not to be read as a result

    @property
    def label(self) -> str:
        return bin_label(self.lo, self.hi)


def tested_mask(records) -> np.ndarray:
    """True where the verifier actually tested the drafted token: positions up to and including the
    first rejection of each block. specdec records the positions after it as not accepted (drafted,
    never tested); their context holds the rejected token, i.e. lies off the teacher's path.

    Blocks are read from the records' order (round by round, rows in order, positions ascending):
    a block starts at position 1, which is always counted for a row still generating.
    """
    r = as_records(records)
    if "position" not in r:
        raise ValueError("tested_mask needs the records' 'position'")
    block = np.cumsum(r["position"] == 1)                        # block id of every record
    rejected = (~r["accepted"]).astype(np.int64)
    before = np.cumsum(rejected) - rejected                      # rejections before this record, overall
    start = np.searchsorted(block, block, side="left")           # index where this record's block starts
    return (before - before[start]) == 0                         # no rejection earlier in the block


def acceptance_by_entropy(records, edges=DEFAULT_EDGES, min_count: int = 30, tested_only: bool = True,
                          key: str = "teacher_entropy") -> list[EntropyBin]:
    """Acceptance rate, its 95% Wilson interval and the mean analytic beta per entropy bin of the
    record key `key` (an entropy view, see VIEWS).

    tested_only (default): count only the tested positions (`tested_mask`), so a bin's rate
    estimates P(accept | H(p) in bin) = E[beta | H(p) in bin], the same quantity as its mean beta.
    The table's token acceptance (accepted / drafted, the seed's) keeps the untested ones."""
    r = as_records(records)
    if key not in r:
        raise ValueError(f"records have no {key!r}; have {sorted(r)}")
    if tested_only:
        keep = tested_mask(r)
        r = {k: v[keep] for k, v in r.items()}
    idx = bin_index(r[key], edges)
    nbins = len(edges) - 1
    count = np.bincount(idx, minlength=nbins)
    acc = np.bincount(idx, weights=r["accepted"].astype(np.float64), minlength=nbins)
    beta_sum = np.bincount(idx, weights=r["acceptance_prob"], minlength=nbins)
    lo, hi = wilson_interval(acc, count)
    with np.errstate(invalid="ignore", divide="ignore"):
        rate, mean_beta = acc / count, beta_sum / count
    return [
        EntropyBin(float(edges[i]), float(edges[i + 1]), int(count[i]), int(acc[i]), float(rate[i]),
                   float(lo[i]), float(hi[i]), float(mean_beta[i]), bool(count[i] < min_count))
        for i in range(nbins)
    ]


def tested_values(records, key: str = "teacher_entropy") -> np.ndarray:
    """The entropy view `key` at the tested positions (what acceptance_by_entropy bins): for edges."""
    r = as_records(records)
    if key not in r:
        raise ValueError(f"records have no {key!r}; have {sorted(r)}")
    return r[key][tested_mask(r)]


def per_prompt_bin_counts(records, edges, n_prompts: int, key: str = "teacher_entropy"):
    """Tested drafted tokens and accepted ones per prompt (the records' row) and entropy bin:
    -> (n, k), each (n_prompts, n_bins). The unit a bootstrap resamples is the prompt, whose tokens
    are correlated; a prompt with no token in a bin has n = 0 there and still counts as a prompt."""
    r = as_records(records)
    if "row" not in r:
        raise ValueError("per_prompt_bin_counts needs the records' 'row'")
    keep = tested_mask(r)
    rows, acc, h = r["row"][keep], r["accepted"][keep], r[key][keep]
    if rows.size and (rows.min() < 0 or rows.max() >= n_prompts):
        raise ValueError(f"record rows span {rows.min()}..{rows.max()}, outside n_prompts={n_prompts}")
    nb = len(edges) - 1
    cell = rows.astype(np.int64) * nb + bin_index(h, edges)    # (n_tested,) flat (prompt, bin) index
    n = np.bincount(cell, minlength=n_prompts * nb).reshape(n_prompts, nb)
    k = np.bincount(cell, weights=acc.astype(np.float64), minlength=n_prompts * nb).reshape(n_prompts, nb)
    return n.astype(np.float64), k


def entropy_profile(entropies, edges=DEFAULT_EDGES, quantiles=QUANTILES) -> dict:
    """A task's entropy profile: n, mean, quantiles and the histogram (counts, fractions) on `edges`."""
    h = np.clip(np.asarray(entropies, dtype=np.float64).reshape(-1), 0.0, None)
    if h.size == 0:
        raise ValueError("entropy_profile needs at least one entropy value")
    counts = np.bincount(bin_index(h, edges), minlength=len(edges) - 1)
    return {
        "n": int(h.size),
        "mean": float(h.mean()),
        "quantiles": {float(q): float(v) for q, v in zip(quantiles, np.quantile(h, quantiles))},
        "edges": [float(e) for e in edges],
        "counts": [int(c) for c in counts],
        "fractions": [float(c) / h.size for c in counts],
    }


def bins_markdown(bins: list[EntropyBin]) -> str:
    """Markdown table of acceptance_by_entropy's output; too-few bins are marked with '*'."""
    lines = ["| H(p) bin (nats) | tokens | acceptance [95% CI] | mean sum min(p,q) |", "|---|---:|---|---:|"]
    for b in bins:
        mark = " *" if b.too_few else ""
        rate = "-" if b.count == 0 else f"{b.rate:.3f} [{b.ci_lo:.3f}, {b.ci_hi:.3f}]"
        beta = "-" if b.count == 0 else f"{b.mean_beta:.3f}"
        lines.append(f"| {b.label} | {b.count}{mark} | {rate} | {beta} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- collecting records

def speculative_records(target, draft, prompts, **generate_kwargs) -> dict[str, np.ndarray]:
    """Per drafted token records from one batched speculative-decoding run (specdec, B's)."""
    from specdec import speculative_generate

    result = speculative_generate(target, draft, prompts, record=True, **generate_kwargs)
    return as_records(result.records)


@torch.no_grad()
def completion_step_logits(model, prompts, completions, *, batch_size: int = 16, vocab_size: int | None = None):
    """Yield (row index, logits (len(c), V) float32) for every row with a non-empty completion c: at each
    position that predicted a completion token, in row order. One forward per batch of prompt + completion,
    right-padded (causal attention: real positions never see the padding, so no position_ids are needed).
    vocab_size keeps the first vocab_size logits (the tokenizer's real tokens; lm_heads may carry padding)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            rows = [(start + i, list(p), list(c)) for i, (p, c) in
                    enumerate(zip(prompts[start:start + batch_size], completions[start:start + batch_size])) if c]
            if not rows:
                continue
            length = max(len(p) + len(c) for _, p, c in rows)
            ids = torch.zeros(len(rows), length, dtype=torch.long)
            mask = torch.zeros(len(rows), length, dtype=torch.long)
            for i, (_, p, c) in enumerate(rows):
                ids[i, : len(p) + len(c)] = torch.tensor(p + c)
                mask[i, : len(p) + len(c)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()  # (B, L, V)
            if vocab_size is not None:
                logits = logits[..., :vocab_size]
            for i, (row, p, c) in enumerate(rows):
                yield row, logits[i, len(p) - 1 : len(p) + len(c) - 1]  # (len(c), V): predicts each sampled token
    finally:
        model.train(was_training)


@torch.no_grad()
def teacher_sample_entropies(teacher, prompts, *, temperature: float, top_p: float = 1.0, top_k: int = 0,
                             max_new_tokens: int = 128, eos_token_id=None, seed: int = 0,
                             batch_size: int = 16, vocab_size: int | None = None, views: bool = False,
                             per_row: bool = False):
    """H(p) at every token the teacher samples on its own: the task's entropy profile.
    views=True returns {"processed": H(p), "tempered": H before top-k / top-p} (see VIEWS) instead.
    per_row=True keeps the prompts apart: one array per prompt (empty where nothing was sampled),
    in prompt order, instead of one concatenated array (curve.py bootstraps over prompts).

    Sample with specdec.autoregressive_generate, then one teacher forward over prompt + completion
    (`completion_step_logits`) and take the processed distribution at each position that predicted a
    completion token. vocab_size (default: the whole lm_head) restricts sampling and H(p) to the
    tokenizer's real tokens. The keyword arguments are exactly DecodingProtocol.generate_kwargs()'s:
    pass **models.decoding_protocol(...).generate_kwargs() (report.py does).
    """
    from specdec import autoregressive_generate

    result = autoregressive_generate(teacher, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                     top_p=top_p, top_k=top_k, eos_token_id=eos_token_id, seed=seed,
                                     vocab_size=vocab_size)
    out = {v: [np.zeros(0, np.float32)] * len(prompts) for v in VIEWS}         # one array per prompt
    for row, step_logits in completion_step_logits(teacher, prompts, result.tokens, batch_size=batch_size,
                                                   vocab_size=vocab_size):
        out["processed"][row] = processed_entropy(step_logits, temperature, top_k, top_p).cpu().numpy()
        out["tempered"][row] = processed_entropy(step_logits, temperature).cpu().numpy()
    if not any(x.size for x in out["processed"]):
        raise ValueError("the teacher generated no tokens for any prompt")
    if not per_row:
        out = {v: np.concatenate(x) for v, x in out.items()}
    return out if views else out["processed"]


# ----------------------------------------------------------------------------- plots

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save_png(plt, fig, path, dpi: int) -> Path:
    """Lay out, write as PNG at exactly the figure's size (no bbox_inches="tight": size_px holds), close."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    plt.close(fig)
    return path


def plot_entropy_histogram(profile: dict, path, title: str = "", size_px=(800, 450), dpi: int = 100) -> Path:
    """Bar chart of entropy_profile's fractions per bin, with the median written in. PNG of size_px."""
    plt = _pyplot()
    edges = profile["edges"]
    labels = [bin_label(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]
    fig, ax = plt.subplots(figsize=(size_px[0] / dpi, size_px[1] / dpi), dpi=dpi)
    ax.bar(range(len(labels)), profile["fractions"], color="tab:blue")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
    ax.set_xlabel("teacher entropy H(p) (nats, processed distribution)")
    ax.set_ylabel("fraction of tokens")
    q = profile["quantiles"]
    ax.set_title(f"{title}  n={profile['n']}  median={q.get(0.5, float('nan')):.3g} nats  mean={profile['mean']:.3g}", fontsize=9)
    return _save_png(plt, fig, path, dpi)


def plot_acceptance_vs_entropy(bins_by_name: dict[str, list[EntropyBin]], path, title: str = "",
                               size_px=(900, 500), dpi: int = 100) -> Path:
    """The seed's bubble chart: acceptance rate per entropy bin, one series per divergence,
    marker area ~ token count, 95% Wilson bars; too-few bins drawn hollow. PNG of size_px."""
    plt = _pyplot()
    if not bins_by_name:
        raise ValueError("plot_acceptance_vs_entropy needs at least one series")
    fig, ax = plt.subplots(figsize=(size_px[0] / dpi, size_px[1] / dpi), dpi=dpi)
    names = list(bins_by_name)
    biggest = max(max((b.count for b in bins), default=1) for bins in bins_by_name.values()) or 1
    width = 0.7 / max(len(names), 1)
    for j, name in enumerate(names):
        bins = bins_by_name[name]
        color, label = f"C{j % 10}", name  # the legend entry goes on the series' first drawn point
        for i, b in enumerate(bins):
            if b.count == 0:
                continue
            x = i - 0.35 + width * (j + 0.5)  # series side by side within the bin
            yerr = [[max(b.rate - b.ci_lo, 0.0)], [max(b.ci_hi - b.rate, 0.0)]]  # >= 0: round-off at rate 0 or 1
            ax.errorbar(x, b.rate, yerr=yerr, color=color, lw=1, capsize=2)
            ax.scatter(x, b.rate, s=15 + 400 * b.count / biggest, alpha=0.6, label=label,
                       facecolors="none" if b.too_few else color, edgecolors=color)
            label = None
    labels = [b.label for b in next(iter(bins_by_name.values()))]
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("teacher entropy H(p) (nats)   [hollow = too few tokens]")
    ax.set_ylabel("token acceptance (95% Wilson)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower left", markerscale=0.5)
    return _save_png(plt, fig, path, dpi)


def plot_bin_differences(panels: dict, path, title: str = "", ylabel: str = "acceptance - baseline",
                         size_px=(1100, 480), dpi: int = 100) -> Path:
    """Per-bin differences with their intervals, one panel per entropy view.

    panels: {panel title: (bin labels, {series name: [(mean, lo, hi) per bin]})}. Points with 95%
    bars, series side by side within a bin, a line at 0 (no difference). PNG of size_px."""
    plt = _pyplot()
    if not panels:
        raise ValueError("plot_bin_differences needs at least one panel")
    fig, axes = plt.subplots(1, len(panels), figsize=(size_px[0] / dpi, size_px[1] / dpi), dpi=dpi, squeeze=False)
    for ax, (panel, (labels, series)) in zip(axes[0], panels.items()):
        width = 0.7 / max(len(series), 1)
        for j, (name, stats) in enumerate(series.items()):
            if len(stats) != len(labels):
                raise ValueError(f"series {name!r} has {len(stats)} bins, the panel {panel!r} {len(labels)}")
            x = np.arange(len(labels)) - 0.35 + width * (j + 0.5)
            m, lo, hi = (np.array([s[i] for s in stats], dtype=np.float64) for i in range(3))
            ax.errorbar(x, m, yerr=[np.clip(m - lo, 0, None), np.clip(hi - m, 0, None)], fmt="o", ms=4, color=f"C{(j + 1) % 10}", lw=1, capsize=2,
                        label=name)
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_xlabel(f"{panel} (nats)", fontsize=8)
        ax.set_ylabel(f"{ylabel} (95% bootstrap)", fontsize=8)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=9)
    return _save_png(plt, fig, path, dpi)


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    """python entropy.py results/tiny/gsm8k/eval.json [--out DIR]: acceptance-vs-entropy tables of
    every run in a `python -m study.evaluate --record` output, and the bubble chart as DIR/acceptance_vs_entropy.png."""
    import argparse
    import json

    p = argparse.ArgumentParser(description="Acceptance vs teacher entropy from `python -m study.evaluate --record` output.")
    p.add_argument("eval_json")
    p.add_argument("--out", default=None, help="folder for the PNG (default: next to the JSON)")
    p.add_argument("--min-count", type=int, default=30)
    args = p.parse_args(argv)
    doc = json.loads(Path(args.eval_json).read_text())
    bins = {}
    for name, entry in doc["runs"].items():
        if "records" not in entry:
            raise ValueError(f"run {name!r} in {args.eval_json} has no records: evaluate with --record")
        bins[name] = acceptance_by_entropy(entry["records"], min_count=args.min_count)
        print(f"\n{name}\n{bins_markdown(bins[name])}")
    out = Path(args.out or Path(args.eval_json).parent) / "acceptance_vs_entropy.png"
    print(f"-> {plot_acceptance_vs_entropy(bins, out, doc.get('task', ''))}")


if __name__ == "__main__":
    main()
