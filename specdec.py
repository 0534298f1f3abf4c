"""Exact batched speculative decoding over jagged batches, with KV caches, and its metrics.

Notation: p = target (the large model whose output distribution must be reproduced exactly),
q = draft (the small model that proposes tokens). Both next-token distributions are processed the same
way (`process_logits`): float32 logits / temperature, then top-k, then top-p (Hugging Face's order and
rules). At Qwen's vocabulary (V = 151936) a sort per row would cost more than small models' forwards, so
top-p reads a peaked row's nucleus off its 256 most likely tokens and finds a flat row's boundary by a
radix select over the float bits (`top_p_keep`, O(V), no sort on the CPU; at a small vocabulary 64
candidates, and the rows they cannot settle sort), and tokens are drawn by an
inverse CDF over a float64 cumulative sum (`sample`); both are exact. Every O(V) pass on the CPU runs a
few rows at a time (`by_rows`): a round's (b, k+1, V) block at once would be page-faulted in afresh.

The algorithm (Leviathan et al. 2023; Chen et al. 2023), one *round* for all rows of the batch at once:
  1. draft k = min(gamma, most tokens any row may still emit) tokens x_1..x_k autoregressively from q,
     keeping q_i = q(. | prefix, x_<i);
  2. verify all of them in ONE target forward pass over [last token, x_1..x_k] -> p_1..p_{k+1};
  3. accept x_i with probability min(1, p_i(x_i) / q_i(x_i)), left to right, until the first rejection;
  4. at the first rejection i sample the next token from norm(max(0, p_i - q_i)); if all k drafts are
     accepted sample a bonus token from p_{k+1}.
Every round emits (accepted + 1) tokens, distributed exactly as tokens sampled from p one at a time.
temperature == 0 is exact greedy: x_i = argmax q_i, x_i is accepted iff x_i == argmax p_i, and the
next token is argmax p (no random number is drawn).

Jagged batches, caches, no per-row Python loop:
  * prompts are left-padded; every model call gets an attention mask over all cache slots (kept as a
    2-D slot mask (b, L), handed over in 4-D, see below) and explicit per-row `position_ids`
    (position = number of real tokens before the token);
  * both models keep one DynamicCache for the whole run. Rejected draft slots are never cropped: they
    stay in the cache as *holes* (mask 0), which gives the same logits as a cache without them
    (verified for stock transformers 5.x Qwen3 / Llama / GPT-2, see tests/test_specdec.py);
  * when holes make up more than half of a cache, it is compacted with one stable sort + gather per
    layer (valid slots move right, order kept); finished rows are evicted with `batch_select_indices`;
  * the draft feeds [pending, x_1..x_{k-1}] in a round, so when all k drafts are accepted x_k is not
    in its cache yet (RunningBatch.unfed): each round's first draft call feeds two tokens [x_k or a hole,
    pending].
  * continuous batching (batch_size < len(prompts)): a batch runs until its slowest row is done, so with a
    fixed batch the rounds are set by the unluckiest row. With batch_size, finished rows free their slots and
    the next prompts are prefilled alone and joined to the running caches (the narrower side left-padded
    with holes), once a quarter of the slots are free (each admission costs one prefill call per model).
  * every call gets a ready-made 4-D attention mask built from the 2-D slot mask (what transformers would
    build itself, minus its construction cost in every call).
  * draft and target may have lm_heads of different widths over one tokenizer (padding rows): pass
    vocab_size=len(tokenizer), both logits are cut to it; exactness is w.r.t. p on that vocabulary. Without
    vocab_size, different widths are refused (they may be two different vocabularies).
  * limitation: full-attention decoders (sliding-window layers would count holes as tokens).

Code: `Sampling` (the processing / sampling rule of both models), `RunningBatch` (the per-row state and
both caches: admit, draft, verify, accept, keep, compact), `SpecMetrics` (per-prompt counts and records, one
`add` per round), and the pure rules `verify_block`, `counted_drafts`, `emit_tokens`. A round of
`speculative_generate` reads: admit -> draft k -> verify -> accept -> emit -> record -> evict / compact.

Metrics (`.stats`; the same keys for each row under stats["per_row"]). A drafted x_i is *counted*
unless the row's budget ends before it (g + i > max_new_tokens, g = tokens the row generated before the
round) or x_1..x_{i-1} contains a stop id. A counted x_i is *tested* when x_1..x_{i-1} were all accepted:
the positions up to and including the first rejection of each block. The positions after a rejection are
drafted but never verified, and their draft context holds the rejected token, so their beta_i says nothing
about the acceptance a serving draft sees; alpha and the per-position rates count tested positions only.
With beta_i = sum_x min(p_i(x), q_i(x)) = 1 - TVD(p_i, q_i):
  drafted                  D = number of counted drafted positions
  tested                   T = number of tested positions (T <= D; T = D when no block had a rejection
                           before its last counted position)
  accepted                 A = number of counted drafted tokens accepted (a prefix of each block)
  acceptance_rate          A / D   (the seed's "token acceptance"; NOT alpha)
  alpha                    (1 / T) * sum over tested positions of beta_i   (analytic acceptance: the
                           expected A / T, the per-token acceptance probability of the textbook formulas)
  alpha_all_drafted        (1 / D) * sum over every counted position of beta_i (the former alpha, for
                           comparison: it includes untested positions conditioned on rejected tokens)
  mean_accepted_length     generated tokens / target calls   (tokens per verification, bonus included)
  per_position_acceptance  list over i = 1..gamma: accepted at position i / tested at position i (the
                           acceptance of x_i given x_1..x_{i-1} accepted; nan where nothing was tested)
  per_position_tested      list over i = 1..gamma: tested at position i (the denominators above, to pool
                           the rates of several calls)
  target_calls, draft_calls  batched forward passes after the prefill (per row: the passes it was in)
  wall_time_s              seconds from the call to the end (per row: from entering the batch to finishing)
  tokens_per_s             generated tokens / wall_time_s
  accept_lengths           (per row only) one entry per target call of the row: the tokens that call
                           emitted (accepted drafts + 1, fewer where a stop id or the budget cut the
                           block); they sum to generated (Spec-Bench's `accept_lengths`)
The batch aggregates pool over rows (A / D over all rows, not a mean of per-row rates); target_calls
and draft_calls of the batch count batched passes; mean_accepted_length of the batch divides by the
sum of the per-row target calls.
With record=True, `.records` holds one entry per counted drafted position, in order (round by round,
rows in batch order, positions ascending): row (index into `prompts`), position (1..gamma), accepted,
teacher_entropy (nats, H(p_i) of the processed p), teacher_entropy_tempered (H of the target's
softmax(logits / T) before top-k / top-p) and acceptance_prob (beta_i). A position after a
rejection in its block is recorded with accepted=False (it was drafted but never tested).
"""
from __future__ import annotations

import functools
import inspect
import math
import numbers
import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # per row: generated ids only, cut after the first stop id
    stats: dict
    records: dict | None = field(default=None, repr=False)


# ----------------------------------------------------------------------------- small pure helpers

TOP_P_SORT_BELOW = 16384  # CPU: vocabularies up to this size sort the rows the candidates cannot settle
PASS_ELEMENTS = 1 << 20  # CPU: elements per pass of the O(V) work, about 7 rows of 151936 (see by_rows)
TOP_P_CANDIDATES = 256  # top-p first looks for the nucleus among this many most likely tokens
TOP_P_CANDIDATES_SMALL = 64  # ... at a vocabulary of at most TOP_P_SORT_BELOW tokens


def by_rows(fn, *tensors):
    """fn(*tensors) for a ROW-WISE fn (output row i depends on input row i alone), run on the CPU a few
    vocabulary rows at a time: tensors (N, ..., V) are split along dim 0 into pieces of at most PASS_ELEMENTS
    elements (at least one slice), and the pieces' outputs fill one output (N, ...). Why: a round verifies
    (b, k+1, V) target logits, e.g. 32 x 6 x 151936 floats = 117 MB, and every O(V) pass over all of them at
    once makes temporaries of that size: above glibc's largest mmap threshold (32 MiB, see
    reuse_freed_memory), so each is page-faulted in afresh, and far out of cache. Pieces of a few rows keep
    every temporary small and reused. The arithmetic per row is the same; a sum over V may round its last bit
    differently with another number of rows beside it (torch splits reductions by shape). On other devices,
    and for inputs of at most PASS_ELEMENTS, one call."""
    x = tensors[0]
    if x.device.type != "cpu" or x.dim() < 2 or x.shape[0] == 0:
        return fn(*tensors)
    step = max(1, PASS_ELEMENTS // x[0].numel())  # dim-0 slices per piece
    if step >= x.shape[0]:
        return fn(*tensors)
    out = None
    for start in range(0, x.shape[0], step):
        piece = fn(*(t[start:start + step] for t in tensors))
        if out is None:
            out = piece.new_empty((x.shape[0], *piece.shape[1:]))
        out[start:start + step] = piece
    return out


def _bucket_mass(key, weight, n_buckets: int):
    """Per row, the total weight of each bucket: key (N, V) in [0, n_buckets), float64 weight (N, V)
    -> (N, n_buckets)."""
    mass = torch.zeros(key.shape[0], n_buckets, dtype=torch.float64, device=key.device)
    return mass.scatter_add_(1, key, weight)


def _boundary_bucket(mass, above, threshold):
    """One radix step of top-p: per row, bucket masses (N, n) in ascending order of value and the mass
    `above` (N, 1) of every token above these buckets -> the boundary bucket b*, the last b with
    above + mass(buckets >= b) >= threshold (N, 1); the new above = above + mass(buckets > b*) (N, 1); and
    the mass of b* (N, 1)."""
    total = mass.sum(-1, keepdim=True)  # (N, 1)
    above_b = above + total - mass.cumsum(-1)  # (N, n) above + mass of the buckets > b (no flips)
    b_star = ((above_b + mass >= threshold).sum(-1, keepdim=True) - 1).clamp(min=0)  # (N, 1)
    return b_star, above_b.gather(1, b_star), mass.gather(1, b_star)


def top_p_keep(probs: torch.Tensor, top_p: float, full_sort: bool | None = None) -> torch.Tensor:
    """Hugging Face's top-p set of probs (N, V) -> keep (N, V) bool, without sorting the vocabulary.

    TopPLogitsWarper sorts ascending, drops every token whose cumulative mass (itself and all LESS likely
    tokens) is <= 1 - top_p, and always keeps the most likely token. Read from the top: the token of
    descending rank r is kept iff the mass of the r - 1 tokens ahead of it, M_{r-1}, is < top_p (as
    1 - M_{r-1} > 1 - top_p); M_0 = 0, so the most likely token is always kept. The kept ranks are a prefix.

    On the CPU a full sort of V = 151936 floats costs ~10 ms a row, and even at V = 640 a sort costs
    ~20 us a row (a round's 96 verified rows: ~3 ms, as much as a tiny draft's forward), so it is avoided. A
    trained model's row is peaked: its nucleus lies within its few most likely tokens, and a partial topk
    finds it (`_top_p_from_candidates`; TOP_P_CANDIDATES of them, TOP_P_CANDIDATES_SMALL at a vocabulary of
    at most TOP_P_SORT_BELOW tokens, where a topk's cost is mostly its k). The rows it cannot settle (a flat
    row: random weights, or a very uncertain position) are sorted at a small vocabulary; at a large one they
    go to a radix select over the float bits, whose cost does not depend on the row (`_top_p_radix`).
    On CUDA the full sort is cheap, so it sorts. full_sort=None: that choice; True forces the full sort,
    False the candidates with the radix select behind them, at any vocabulary; every path gives the same
    set. The CPU path runs a few rows at a time (by_rows), so its bucket tables stay small whatever the batch.
    Masses are float64 sums relative to the total, i.e. the rule in exact arithmetic up to float64 rounding
    (~1e-16 of the mass: a top_p within that of a partial sum may go either way); HF's float32 rule can
    differ from it on tokens at the boundary of a flat distribution (by ~1e-6 of mass). Among tokens of
    exactly equal probability at the boundary, which are kept is unspecified in HF (torch.sort is not
    stable); here the lowest ids, on every path."""
    if probs.dim() != 2:
        raise ValueError(f"top_p_keep takes probabilities of shape (N, V), got {tuple(probs.shape)}")
    if full_sort or (full_sort is None and probs.device.type == "cuda"):
        return _top_p_sorted(probs, _top_p_threshold(probs, top_p))
    if full_sort is None and probs.shape[-1] <= TOP_P_SORT_BELOW:      # a small vocabulary on the CPU
        return by_rows(lambda rows: _top_p_by_candidates(rows, top_p, TOP_P_CANDIDATES_SMALL, _top_p_sorted), probs)
    return by_rows(lambda rows: _top_p_by_candidates(rows, top_p, TOP_P_CANDIDATES, _top_p_radix), probs)


def _top_p_sorted(probs: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """The top-p set of probs (N, V) (the ranks r with M_{r-1} < threshold (N, 1)) by a full stable sort
    -> keep (N, V) bool; equal p: the lowest id first."""
    top, idx = probs.sort(stable=True, dim=-1, descending=True)  # (N, V)
    top = top.double()
    keep = (top.cumsum(-1) - top) < threshold  # M_{r-1} < top_p of the total
    keep[:, 0] = True  # the most likely token, whatever the rounding
    return torch.zeros_like(keep).scatter_(-1, idx, keep)


def _top_p_threshold(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """top_p of each row's TOTAL mass, in float64 (N, V) -> (N, 1), the same sum for every path: a float32
    softmax sums to 1 only within ~1e-6, and that error would decide boundary tokens of flat distributions
    (HF's float32 rule has it; the exact rule does not)."""
    return top_p * probs.sum(-1, keepdim=True, dtype=torch.float64)


def _top_p_by_candidates(probs: torch.Tensor, top_p: float, n: int, fallback) -> torch.Tensor:
    """top_p_keep's CPU path on rows (N, V): from the n most likely tokens, and the rows they cannot settle
    by fallback(probs, threshold) (_top_p_sorted or _top_p_radix)."""
    threshold = _top_p_threshold(probs, top_p)  # (N, 1)
    v, settled = _top_p_from_candidates(probs, threshold, n)  # (N, 1), (N,)
    if not bool(settled.any()):  # all flat (random weights): no row copies
        return fallback(probs, threshold)
    keep = probs >= v  # (N, V)
    if not bool(settled.all()):
        rest = (~settled).nonzero().squeeze(1)  # (n_rest,)
        keep[rest] = fallback(probs[rest], threshold[rest])
    return keep


def _top_p_from_candidates(probs: torch.Tensor, threshold: torch.Tensor, n: int = TOP_P_CANDIDATES):
    """The top-p set of probs (N, V) (the ranks r with M_{r-1} < threshold (N, 1)) read off the n most likely
    tokens alone -> v (N, 1) and settled (N,) bool: a settled row keeps exactly its tokens with p >= v (v the
    last kept value, float32). A row is unsettled when its nucleus reaches past rank n - 1, or its boundary
    falls between tokens of equal probability (which of those are kept is decided by id, see _top_p_radix)."""
    n = min(n, probs.shape[-1])
    top = probs.topk(n, dim=-1).values  # (N, n) descending
    top64 = top.double()
    n_kept = ((top64.cumsum(-1) - top64) < threshold).sum(-1, keepdim=True)  # (N, 1) kept ranks, >= 1 (M_0 = 0)
    v = top.gather(1, n_kept - 1)  # (N, 1) the last kept value
    first_dropped = top.gather(1, n_kept.clamp(max=n - 1))  # (N, 1)
    return v, ((n_kept < n) & (first_dropped < v)).squeeze(1)


def _top_p_radix(probs: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """The top-p set of probs (N, V) (the ranks r with M_{r-1} < threshold (N, 1)) by a two-step radix select
    on the float bits -> keep (N, V) bool. The bits of a float32 p >= 0, read as an int32, are monotone in p.
    Step 1 buckets the tokens by their top 16 bits and finds the boundary bucket b1 (scatter_add of the
    masses, a cumulative sum over 2^15 buckets); tokens above b1 are kept, below it dropped. Step 2 splits b1
    by the low 16 bits the same way, down to one exact float value v. The boundary tokens of value v (ties)
    are kept in index order while M_{r-1} = (mass above them) + (i - 1) v < threshold. No step depends on how
    many tokens share a bucket, so a near-uniform row (random weights: all p within 1% of 1/V) costs the same
    as a peaked one."""
    V = probs.shape[-1]
    bits = probs.view(torch.int32)  # (N, V) monotone in p
    p64 = probs.double()
    hi = (bits >> 16).long()  # (N, V) step-1 bucket; int64, as scatter_add wants
    b1, above, _ = _boundary_bucket(_bucket_mass(hi, p64, 1 << 15), torch.zeros_like(threshold), threshold)
    # step 2 splits b1 by the low 16 bits; tokens outside b1 weigh 0 there, whatever their bucket (clamping
    # their keys into sentinel buckets instead would pile them onto two slots: scatter_add slows down ~5x)
    # (a float32 product then a cast: a bool * float64 product or torch.where costs ~5x more on the CPU)
    w2 = (probs * (hi == b1)).double()  # (N, V)
    b2, above, tie_mass = _boundary_bucket(_bucket_mass((bits & 0xFFFF).long(), w2, 1 << 16), above, threshold)
    v_bits = ((b1 << 16) | b2).int()  # (N, 1) the boundary value v as int32 bits
    v = v_bits.view(torch.float32).double()  # (N, 1)
    # kept ties: above + (i - 1) v < threshold, i = 1, 2, ... (usually every tie: then keep = p >= v).
    # The count of ties is tie_mass / v exactly: c <= V copies of a float32 v (24-bit significand) sum
    # exactly in float64 while c < 2^29
    n_keep = torch.ceil((threshold - above) / v).clamp(min=1, max=V)  # (N, 1)
    if bool((torch.round(tie_mass / v) <= n_keep).all()):
        return bits >= v_bits
    tie = bits == v_bits  # (N, V)
    return (bits > v_bits) | (tie & (tie.cumsum(-1, dtype=torch.int32) <= n_keep))


@functools.cache
def reuse_freed_memory() -> bool:
    """Keep freed CPU buffers for reuse (glibc only; called once by both generators). glibc hands every
    freed block above its mmap threshold back to the kernel, so each O(V) temporary of a sampling step
    (4 rows x 151936 float64 = 4.6 MiB) is page-faulted in afresh; at the real vocabulary that tripled
    the cost of processing + sampling one token on 2 CPU cores (~10 ms -> ~3 ms for 4 rows, see
    docs/benchmarks.md). Raising the mmap threshold to its maximum (32 MiB) and the trim threshold keeps
    such blocks in the heap. Process-wide, results unchanged; elsewhere a no-op. Returns whether it applied."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:                     # not glibc (e.g. musl): nothing to tune
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


def process_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits (..., V) -> probabilities (..., V) in float32: / temperature, top-k, top-p (HF's order and rules:
    top-k keeps every logit >= the k-th largest, ties included; top-p see `top_p_keep`).
    temperature 0 -> one-hot argmax (greedy). Cost: O(V) passes (softmax, topk of a few candidates), no sort,
    a few rows at a time on the CPU (by_rows)."""
    V = logits.shape[-1]
    rows = logits.reshape(-1, V)  # (N, V); a view for the verifier's (b, k+1, V) logits
    return by_rows(lambda x: _process_rows(x, temperature, top_k, top_p), rows).reshape(logits.shape)


def _process_rows(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """process_logits on rows (N, V) -> (N, V)."""
    logits = logits.float()
    V = logits.shape[-1]
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), V).float()
    logits = logits / temperature
    if 0 < top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = logits.softmax(-1)
    if top_p < 1.0:
        probs = probs * top_p_keep(probs, top_p)
        probs = probs / probs.sum(-1, keepdim=True)  # = softmax of the kept logits (HF masks them, softmaxes)
    return probs


class NonFiniteLogits(ValueError):
    """A model's logits hold NaN or +inf (or a row is all -inf): its weights are not finite (a damaged file, a
    diverged run). Raised where sampling starts, naming the model, instead of a failure deep in top-p."""

    bad_input = True                            # a damaged model folder, not a bug: one line (cli.script_main)


def check_logits(logits: torch.Tensor, model, role: str) -> None:
    """Refuse logits (..., V) that no sampling rule can use, naming the model: a row whose max is NaN (NaN
    propagates through amax), +inf or -inf (every token masked). One reduction; called on the first call of
    each model of a generation (where sampling starts: damaged weights give non-finite logits at once), so
    decoding adds no device synchronisation per token."""
    if bool(torch.isfinite(logits.float().amax(-1)).all()):
        return
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    raise NonFiniteLogits(f"the {role} model {name} gives non-finite logits (NaN or inf): its weights hold NaN "
                          f"or inf (a damaged file, e.g. flipped bytes, or a run that diverged); load an intact "
                          f"copy (a run's checkpoints and final/ carry checksums.json)")


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from probs (B, V) -> (B,), exactly: the inverse CDF of a float64 cumulative sum at
    one float64 uniform per row (torch.multinomial does the same search, with checks and copies that cost
    more than the search at V = 151936). The token is the first i with C_i > u * C_V: tokens of probability 0
    add nothing to C and can never be drawn. u * C_V is kept below C_V, so the search never runs off the end.
    generator: one for all rows, or a list with one per row (row i's uniform from generator[i]: a row's draw
    then does not depend on which other rows share the batch; distill.py's per-prompt sampling)."""
    if isinstance(generator, (list, tuple)):
        u = torch.cat([torch.rand(1, 1, dtype=torch.float64, device=probs.device, generator=g)
                       for g in generator])  # (B, 1)
    else:
        u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device, generator=generator)  # (B, 1)
    return by_rows(_inverse_cdf, probs, u)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The first token i with C_i > u * C_V, per row: probs (B, V), u (B, 1) uniforms in [0, 1) -> (B,)."""
    cdf = probs.cumsum(-1, dtype=torch.float64)  # (B, V)
    total = cdf[:, -1:]  # (B, 1)
    x = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))  # (B, 1) in [0, C_V)
    return torch.searchsorted(cdf, x, right=True).squeeze(-1)


def acceptance_prob(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """beta = sum_x min(p(x), q(x)) = 1 - TVD(p, q): the chance a draft from q is accepted. (..., V) -> (...)."""
    p, q = torch.broadcast_tensors(p, q)  # views; by_rows splits both alike
    return by_rows(lambda p_, q_: torch.minimum(p_, q_).sum(-1), p, q)


def entropy(p: torch.Tensor) -> torch.Tensor:
    """H(p) in nats from PROBABILITIES p (..., V) -> (...); 0 log 0 = 0 (xlogy), as top-k / top-p zero out
    tokens. divergences.teacher_entropy is the same H from log-probs, for the losses."""
    return by_rows(lambda p_: -torch.special.xlogy(p_, p_).sum(-1), p)


def tempered_entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """H(softmax(logits / T)) (..., V) -> (...): the entropy before top-k / top-p (a few rows at a time, so no
    (..., V) probabilities are kept)."""
    return by_rows(lambda z: entropy(process_logits(z, temperature)), logits)


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)), the distribution to sample from after a rejection; p where p == q. (B, V)."""
    r = (p - q).clamp(min=0)
    s = r.sum(-1, keepdim=True)  # (B, 1)
    return torch.where(s > 0, r / s.clamp(min=1e-30), p)


def verify_block(p, q, drafts, counted, greedy=False, generator=None):
    """The speculative-sampling rule for one block, all rows at once.
    p (b, k+1, V) target probs, q (b, k, V) draft probs, drafts (b, k) the x_i, counted (b, k) drafts allowed
    to be accepted. Returns the accepted prefix (b, k) bool and the next token t (b,): sampled from
    norm(max(0, p_{n+1} - q_{n+1})) after n accepted drafts, or from p_{k+1} if all k were accepted."""
    b, k = drafts.shape
    p_x = p[:, :k].gather(-1, drafts[..., None]).squeeze(-1)  # (b, k) p_i(x_i)
    if greedy:
        ok = drafts == p[:, :k].argmax(-1)
    else:
        q_x = q.gather(-1, drafts[..., None]).squeeze(-1)  # (b, k) q_i(x_i) > 0
        u = torch.rand(b, k, device=p.device, generator=generator)
        ok = u * q_x < p_x  # u < min(1, p/q)
    acc = (ok & counted).long().cumprod(1).bool()  # (b, k) stop at the first rejection
    n = acc.sum(1)  # (b,)
    at_n = n[:, None, None].expand(b, 1, p.shape[-1])  # (b, 1, V)
    p_n = p.gather(1, at_n).squeeze(1)  # (b, V)
    # q_{k+1} = 0 (all k accepted: the residual is p itself); no (b, k+1, V) copy of q to read one row
    q_n = q.gather(1, at_n.clamp(max=k - 1)).squeeze(1) * (n < k)[:, None]  # (b, V)
    t = p_n.argmax(-1) if greedy else sample(residual(p_n, q_n), generator)  # (b,)
    return acc, t


def counted_drafts(drafts, stop_ids, budget):
    """drafts (b, k), budget (b,) tokens each row may still emit -> counted (b, k): x_i counts unless the
    budget ends before it (i > budget) or x_1..x_{i-1} holds a stop id (it would never be emitted)."""
    i = torch.arange(1, drafts.shape[1] + 1, device=drafts.device)  # draft positions 1..k
    is_stop = torch.isin(drafts, stop_ids).long()  # (b, k)
    stop_before = (is_stop.cumsum(1) - is_stop) > 0  # a stop id among x_1..x_{i-1}
    return (i <= budget[:, None]) & ~stop_before


def tested_drafts(counted, acc):
    """counted (b, k), acc (b, k) the accepted prefix (verify_block) -> tested (b, k): the counted positions
    that verification decided, i.e. up to and including the first rejection of each block. A position after
    the first rejection is never tested (its accept/reject draw is discarded) and its draft context holds the
    rejected token, so it belongs to no acceptance rate or alpha."""
    j = torch.arange(counted.shape[1], device=counted.device)  # 0-based: x_{j+1} is tested iff x_1..x_j accepted
    return counted & (j[None] <= acc.sum(1, keepdim=True))


def emit_tokens(drafts, t, n, stop_ids, budget):
    """The emission rule of one round: x_1..x_n then t, cut after the first stop id and at the budget.
    drafts (b, k), t (b,) the correction or bonus token, n (b,) accepted drafts, budget (b,) tokens each row
    may still emit. Returns emit (b, k+1) (only its first e count; the rest is scratch), e (b,) and done (b,):
    the row emitted a stop id within its budget, or used the whole budget."""
    j = torch.arange(drafts.shape[1] + 1, device=drafts.device)
    emit = torch.where(j < n[:, None], torch.cat([drafts, t[:, None]], 1), t[:, None])  # (b, k+1)
    stop_in = torch.isin(emit, stop_ids) & (j <= n[:, None])  # (b, k+1) stop ids among the n + 1 tokens
    first_stop = torch.where(stop_in.any(1), stop_in.long().argmax(1) + 1, n + 1)  # (b,) up to the stop
    e = torch.minimum(first_stop, budget)  # (b,) tokens emitted this round
    done = (stop_in.any(1) & (first_stop <= budget)) | (e >= budget)  # (b,)
    return emit, e, done


def resolve_stop_ids(model, eos_token_id=None) -> list[int]:
    """Stop ids: an int or a list as given ([] = never stop early); None -> the model's generation
    config (Qwen3 lists several), else its config."""
    if eos_token_id is None:
        gen_config = getattr(model, "generation_config", None)
        eos_token_id = getattr(gen_config, "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = getattr(model.config, "eos_token_id", None)
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    return [int(i) for i in eos_token_id]


def _context_length(model) -> int | None:
    config = model.config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    return None


def _is_int(x) -> bool:
    """A Python / numpy integer (bool is not a token id or a count)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_prompts(prompts, vocab: int):
    """prompts: a non-empty list of non-empty lists of token ids in [0, vocab) (ValueError otherwise)."""
    if not isinstance(prompts, (list, tuple)):
        hint = ("; convert a tensor with .tolist() (one list per row, without padding)"
                if torch.is_tensor(prompts) else "")
        raise ValueError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}{hint}")
    if len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of token-id lists, got an empty list")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, (list, tuple)):
            raise ValueError(f"prompt {i} must be a list of token ids, got {type(prompt).__name__}: "
                             f"{str(prompt)[:60]}")
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        for t in prompt:
            if not _is_int(t):
                raise ValueError(f"prompt {i} holds {t!r} ({type(t).__name__}); token ids must be integers")
            if not 0 <= t < vocab:
                raise ValueError(f"prompt {i} holds token id {t}, outside the vocabulary [0, {vocab})")


def _check_args(models, prompts, max_new_tokens, temperature, top_k, top_p, gamma=1, vocab_size=None):
    for name, value in (("gamma", gamma), ("top_k", top_k), ("max_new_tokens", max_new_tokens)):
        if not _is_int(value):
            raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if gamma < 1:
        raise ValueError(f"gamma must be an integer >= 1, got {gamma}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    _check_prompts(prompts, _shared_vocab(models, vocab_size))
    for i, prompt in enumerate(prompts):
        for model in models:
            ctx = _context_length(model)
            if ctx is not None and len(prompt) + max_new_tokens > ctx:
                raise ValueError(
                    f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} that exceeds "
                    f"the model's context of {ctx} positions (max_position_embeddings)")


def _left_pad(seqs: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Jagged token lists -> ids (B, T) and attention mask (B, T), left-padded with id 0 / mask 0."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for b, s in enumerate(seqs):
        if s:
            ids[b, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[b, width - len(s):] = 1
    return ids.to(device), mask.to(device)


@functools.cache
def _cache_kwarg(model_class) -> str:
    """transformers 5.24 renamed forward's `past_key_values` to `cache`; support both."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _attention_mask(model, mask: torch.Tensor, n_new: int) -> torch.Tensor:
    """The 2-D slot mask (B, L) -> the 4-D mask (B, 1, n_new, L) that transformers would build from it: the new
    tokens fill the last n_new slots, and a query sees every valid slot up to its own. Handing it over ready-made
    skips transformers' mask construction in every call (~20 small ops and a GPU sync each, a fifth of a one-layer
    draft's ops), with the same logits. Attention implementations that do not take a 4-D tensor get the 2-D mask."""
    implementation = model.config._attn_implementation
    if implementation not in ("sdpa", "eager"):
        return mask
    visible = mask[:, None, None, :].bool()  # (B, 1, 1, L)
    if n_new > 1:  # causality among the new tokens; one new token is the last slot and sees everything
        slots = torch.arange(mask.shape[1], device=mask.device)
        visible = visible & (slots <= slots[-n_new:, None])  # (B, 1, n_new, L)
    if implementation == "eager":  # eager attention adds the mask to its scores: 0 or the dtype's minimum
        return torch.zeros(visible.shape, dtype=model.dtype, device=mask.device).masked_fill_(
            ~visible, torch.finfo(model.dtype).min)
    return visible


def _forward(model, ids, mask, positions, cache, logits_to_keep=0):
    """One cached forward pass; `mask` (B, L) covers every slot of the cache plus the new ones. -> (B, T', V)."""
    cache_kw = _cache_kwarg(type(model))
    out = model(input_ids=ids, attention_mask=_attention_mask(model, mask, ids.shape[1]), position_ids=positions,
                use_cache=True, logits_to_keep=logits_to_keep, **{cache_kw: cache})
    return out.logits


def _compact(cache: DynamicCache, mask: torch.Tensor) -> torch.Tensor:
    """Drop holes: move every row's valid slots to the right end, in order. Returns the new mask (B, L')."""
    width = int(mask.sum(1).max())
    keep = torch.sort(mask, dim=1, stable=True).indices[:, -width:]  # (B, L'): holes first, then valid slots
    for layer in cache.layers:
        for name in ("keys", "values"):
            kv = getattr(layer, name)  # (B, H, L, D)
            idx = keep[:, None, :, None].expand(-1, kv.shape[1], -1, kv.shape[-1])
            setattr(layer, name, kv.gather(2, idx))  # (B, H, L', D)
    return mask.gather(1, keep)


def _join(cache: DynamicCache, mask: torch.Tensor, new_cache: DynamicCache, new_mask: torch.Tensor):
    """Append the rows of new_cache (mask (m, L2)) to cache (mask (b, L)); the narrower one is left-padded with
    holes, so both get max(L, L2) slots. Returns the cache and its mask (b + m, max(L, L2))."""
    if mask.shape[0] == 0:  # an empty batch: the new rows are the batch
        return new_cache, new_mask
    width = max(mask.shape[1], new_mask.shape[1])
    for i, layer in enumerate(cache.layers):
        for name in ("keys", "values"):
            kv = getattr(layer, name)  # (b, H, L, D)
            new_kv = (getattr(new_cache.layers[i], name) if new_cache.layers  # (m, H, L2, D); none if L2 == 0
                      else kv.new_zeros(new_mask.shape[0], kv.shape[1], 0, kv.shape[3]))
            padded = [torch.nn.functional.pad(t, (0, 0, width - t.shape[2], 0)) for t in (kv, new_kv)]
            setattr(layer, name, torch.cat(padded))  # (b + m, H, width, D)
    padded = [torch.nn.functional.pad(m, (width - m.shape[1], 0)) for m in (mask, new_mask)]
    return cache, torch.cat(padded)


def _shared_vocab(models, vocab_size):
    """The vocabulary the models are compared and sampled on: vocab_size, or the one lm_head width. Widths
    that differ may be one tokenizer with padding rows, or two vocabularies (then decoding would be silently
    wrong): refused unless vocab_size (len(tokenizer)) says which tokens they share."""
    widths = [m.get_output_embeddings().weight.shape[0] for m in models]
    shared = min(widths)
    if vocab_size is None and len(set(widths)) > 1:
        raise ValueError(f"the lm_heads have different widths {widths}: pass vocab_size=len(tokenizer) if they "
                         f"share one tokenizer (the extra rows are padding); models of different vocabularies "
                         f"cannot draft for each other")
    if vocab_size is not None:
        if not _is_int(vocab_size) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive integer (len(tokenizer)), got {vocab_size!r}")
        if vocab_size > shared:
            raise ValueError(f"vocab_size={vocab_size} is larger than the narrowest lm_head ({shared})")
        shared = vocab_size
    return shared


def _make_generator(seed, generator, device):
    if generator is not None:
        return generator
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def _rate(num: float, den: float) -> float:
    return num / den if den else float("nan")


def expected_accepted_length(alpha: float, gamma: int) -> float:
    """E[tokens per round] = (1 - alpha^(gamma+1)) / (1 - alpha) when every drafted token is accepted with
    probability alpha independently (Leviathan et al. 2023): the textbook estimate of mean_accepted_length
    (bonus token included); gamma + 1 at alpha = 1, NaN for a NaN alpha."""
    if math.isnan(alpha):
        return math.nan
    return gamma + 1.0 if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


# ----------------------------------------------------------------------------- speculative decoding

@dataclass
class Sampling:
    """How both models' logits become probabilities and tokens (the same rule for p and q)."""
    temperature: float
    top_k: int
    top_p: float
    vocab_size: int  # logits are cut to this many tokens (lm_head padding rows dropped)
    generator: torch.Generator | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (..., V') -> processed probabilities (..., V) on the shared vocabulary."""
        return process_logits(logits[..., :self.vocab_size], self.temperature, self.top_k, self.top_p)

    def pick(self, probs: torch.Tensor) -> torch.Tensor:
        """One token per row of probs (b, V) -> (b,): argmax when greedy (no random number), else a sample."""
        return probs.argmax(-1) if self.greedy else sample(probs, self.generator)


class RunningBatch:
    """The rows being decoded and both models' caches; one entry per active row in every tensor.

    tcache / dcache   one DynamicCache per model for the whole run
    tmask / dmask     (b, L) per cache slot: 1 = token, 0 = hole (a rejected draft, or left padding)
    rows              (b,) index into `prompts`
    pending           (b,) the last token, not yet in either cache
    n_seq             (b,) real tokens so far, pending included
    unfed             (b,) x_k of the last round: when all k drafts were accepted (unfed_valid) it is in
                      the target's cache but not the draft's, which fed [pending, x_1..x_{k-1}]; the next
                      round's first draft call feeds [unfed or a hole, pending]
    """

    def __init__(self, device):
        self.device = device
        self.tcache, self.dcache = DynamicCache(), DynamicCache()
        self.tmask = self.dmask = torch.zeros(0, 0, dtype=torch.long, device=device)
        self.rows, self.pending, self.n_seq, self.unfed = (
            torch.zeros(0, dtype=torch.long, device=device) for _ in range(4))
        self.unfed_valid = torch.zeros(0, dtype=torch.bool, device=device)

    def __len__(self) -> int:
        return self.rows.numel()

    def admit(self, target, draft, prompts, new: list[int]):
        """Prefill prompts[new] alone (every token but the last, which becomes the pending token), then join
        their caches to the batch's, left-padding the narrower with holes."""
        ids, mask = _left_pad([prompts[r][:-1] for r in new], self.device)  # (m, P-1), P-1 may be 0
        new_tcache, new_dcache = DynamicCache(), DynamicCache()
        if ids.shape[1] > 0:
            positions = (mask.cumsum(1) - 1).clamp(min=0)  # (m, P-1)
            _forward(target, ids, mask, positions, new_tcache, logits_to_keep=1)
            _forward(draft, ids, mask, positions, new_dcache, logits_to_keep=1)
        self.tcache, self.tmask = _join(self.tcache, self.tmask, new_tcache, mask)
        self.dcache, self.dmask = _join(self.dcache, self.dmask, new_dcache, mask)
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=self.device)  # noqa: E731
        self.rows = torch.cat([self.rows, as_tensor(new)])
        self.pending = torch.cat([self.pending, as_tensor([prompts[r][-1] for r in new])])
        self.n_seq = torch.cat([self.n_seq, as_tensor([len(prompts[r]) for r in new])])
        self.unfed = torch.cat([self.unfed, as_tensor([0] * len(new))])  # no x_k yet: a hole is fed
        self.unfed_valid = torch.cat([self.unfed_valid, torch.zeros(len(new), dtype=torch.bool,
                                                                    device=self.device)])

    def draft(self, model, k: int, rule: Sampling, check: bool = False):
        """Draft x_1..x_k from q, one call each (the first also feeds last round's x_k, or a hole).
        check: refuse non-finite logits of the first call (check_logits). Returns drafts (b, k) and q (b, k, V)."""
        b, n_seq = len(self), self.n_seq
        one = torch.ones(b, 1, dtype=torch.long, device=self.device)  # (b, 1) the mask entry of a real token
        x = torch.stack([self.unfed, self.pending], 1)  # (b, 2)
        valid = torch.cat([self.unfed_valid.long()[:, None], one], 1)
        positions = torch.stack([(n_seq - 2).clamp(min=0), n_seq - 1], 1)
        drafts, qs = [], []
        for i in range(k):
            self.dmask = torch.cat([self.dmask, valid], 1)  # (b, L + x's width): covers the slots x fills
            logits = _forward(model, x, self.dmask, positions, self.dcache, logits_to_keep=1)[:, -1]
            if check and i == 0:
                check_logits(logits[..., :rule.vocab_size], model, "draft")
            q_i = rule.probs(logits)
            x_i = rule.pick(q_i)  # (b,)
            drafts.append(x_i)
            qs.append(q_i)  # (b, V)
            x, valid, positions = x_i[:, None], one, (n_seq + i)[:, None]
        return torch.stack(drafts, 1), torch.stack(qs, 1)  # (b, k), (b, k, V)

    def verify(self, model, drafts: torch.Tensor) -> torch.Tensor:
        """One target call over [pending, x_1..x_k] (b, k+1) -> its logits (b, k+1, V'), i.e. p_1..p_{k+1}."""
        b, k = drafts.shape
        x = torch.cat([self.pending[:, None], drafts], 1)  # (b, k+1)
        positions = self.n_seq[:, None] - 1 + torch.arange(k + 1, device=self.device)  # (b, k+1)
        self.tmask = torch.cat([self.tmask, torch.ones(b, k + 1, dtype=torch.long, device=self.device)], 1)
        return _forward(model, x, self.tmask, positions, self.tcache)  # (b, k+1, V'); tmask (b, L + k + 1)

    def accept(self, drafts: torch.Tensor, n: torch.Tensor, t: torch.Tensor):
        """n (b,) drafts accepted, t (b,) the next token: the slots of rejected drafts become holes."""
        k = drafts.shape[1]
        j = torch.arange(k + 1, device=self.device)
        self.tmask[:, -(k + 1):] = (j[None] <= n[:, None]).long()  # [pending, x_1..x_k]: valid up to x_n
        self.dmask[:, -k:] = (j[None, :k] <= n[:, None]).long()  # [pending, x_1..x_{k-1}]: valid up to x_n
        self.unfed, self.unfed_valid = drafts[:, -1], n == k
        self.pending, self.n_seq = t, self.n_seq + n + 1

    def keep(self, kept: torch.Tensor):
        """Evict every row but kept (b',) (positions in the batch; may be empty)."""
        for cache in (self.tcache, self.dcache):
            cache.batch_select_indices(kept)
        self.tmask, self.dmask, self.rows, self.pending, self.n_seq, self.unfed, self.unfed_valid = (
            v[kept] for v in (self.tmask, self.dmask, self.rows, self.pending, self.n_seq, self.unfed,
                              self.unfed_valid))

    def compact(self):
        """Compact each cache whose slots are more than half holes."""
        # both checks in one GPU sync
        t_valid, d_valid = torch.stack([self.tmask.sum(1).max(), self.dmask.sum(1).max()]).tolist()
        if self.tmask.shape[1] > 2 * t_valid:
            self.tmask = _compact(self.tcache, self.tmask)
        if self.dmask.shape[1] > 2 * d_valid:
            self.dmask = _compact(self.dcache, self.dmask)


RECORD_KEYS = ("row", "position", "accepted", "teacher_entropy", "teacher_entropy_tempered",
               "acceptance_prob")


class SpecMetrics:
    """Per original row (index into `prompts`): the generated ids and the counts of the module docstring,
    filled by index_add_ as rows progress; with record=True the per-draft records."""

    def __init__(self, B: int, gamma: int, max_new_tokens: int, device, record: bool):
        # gamma + 1 spare columns, so a round writes its whole block without a boolean-mask gather (which
        # would wait for the GPU): tokens past a row's count are overwritten later or cut at the end
        self.out = torch.zeros(B, max_new_tokens + gamma + 1, dtype=torch.long, device=device)
        self.n_gen, self.drafted, self.accepted, self.target_calls, self.draft_calls = (
            torch.zeros(B, dtype=torch.long, device=device) for _ in range(5))
        self.tested = torch.zeros(B, dtype=torch.long, device=device)
        self.beta_sum = torch.zeros(B, device=device)  # over tested positions (alpha)
        self.beta_sum_drafted = torch.zeros(B, device=device)  # over every counted position (alpha_all_drafted)
        self.pos_tested = torch.zeros(B, gamma, dtype=torch.long, device=device)
        self.pos_accepted = torch.zeros(B, gamma, dtype=torch.long, device=device)
        self.start = torch.zeros(B, dtype=torch.float64)  # seconds until each row entered the batch
        self.finish = torch.zeros(B, dtype=torch.float64)  # seconds until each row finished
        self.batched_target_calls = self.batched_draft_calls = 0
        self.round_rows, self.round_emitted = [], []  # per round: rows (b,) and tokens each emitted (b,)
        self.recs = {key: [] for key in RECORD_KEYS} if record else None

    def add(self, rows, emit, e, counted, acc, p, q, t_logits, temperature):
        """One round of the rows (b,): emit (b, k+1) of which the first e (b,) count, counted / acc (b, k),
        p (b, k+1, V), q (b, k, V), t_logits (b, k+1, V) the target's logits before processing."""
        b, k = counted.shape
        g = self.n_gen[rows]  # (b,) tokens generated before this round
        j = torch.arange(k + 1, device=rows.device)
        self.out[rows[:, None], g[:, None] + j] = emit  # (b, k+1); only the first e of them count
        beta = acceptance_prob(p[:, :k], q)  # (b, k)
        tested = tested_drafts(counted, acc)  # (b, k)
        self.n_gen.index_add_(0, rows, e)
        self.drafted.index_add_(0, rows, counted.sum(1))
        self.tested.index_add_(0, rows, tested.sum(1))
        self.accepted.index_add_(0, rows, acc.sum(1))
        self.beta_sum.index_add_(0, rows, (beta * tested).sum(1))
        self.beta_sum_drafted.index_add_(0, rows, (beta * counted).sum(1))
        self.pos_tested[:, :k].index_add_(0, rows, tested.long())
        self.pos_accepted[:, :k].index_add_(0, rows, acc.long())
        self.target_calls.index_add_(0, rows, torch.ones_like(rows))
        self.draft_calls.index_add_(0, rows, torch.full_like(rows, k))
        self.batched_target_calls += 1
        self.batched_draft_calls += k
        self.round_rows.append(rows)
        self.round_emitted.append(e)
        if self.recs is not None:  # (b, k)[counted] -> (n_counted,): one per counted draft, rows then positions
            i = torch.arange(1, k + 1, device=rows.device)  # draft positions 1..k
            self.recs["row"].append(rows[:, None].expand(b, k)[counted])
            self.recs["position"].append(i[None].expand(b, k)[counted])
            self.recs["accepted"].append(acc[counted])
            self.recs["teacher_entropy"].append(entropy(p[:, :k])[counted])
            # the tempered p before top-k / top-p: continuous, where the processed H is often exactly 0
            self.recs["teacher_entropy_tempered"].append(tempered_entropy(t_logits[:, :k], temperature)[counted])
            self.recs["acceptance_prob"].append(beta[counted])

    def accept_lengths(self) -> list[list[int]]:
        """Per original row, the tokens each of its target calls emitted, in round order (two transfers)."""
        out = [[] for _ in range(self.n_gen.numel())]
        if self.round_rows:
            for row, n in zip(torch.cat(self.round_rows).tolist(), torch.cat(self.round_emitted).tolist()):
                out[row].append(n)
        return out

    def result(self, wall: float) -> GenerationResult:
        tokens = [row[:n] for row, n in zip(self.out.tolist(), self.n_gen.tolist())]  # two transfers, not 2B
        counts = {"generated": self.n_gen, "drafted": self.drafted, "tested": self.tested,
                  "accepted": self.accepted, "beta_sum": self.beta_sum, "beta_sum_drafted": self.beta_sum_drafted,
                  "pos_tested": self.pos_tested, "pos_accepted": self.pos_accepted,
                  "target_calls": self.target_calls, "draft_calls": self.draft_calls}
        stats = _spec_stats(counts, self.start, self.finish, wall, self.batched_target_calls,
                            self.batched_draft_calls)
        for row, lengths in zip(stats["per_row"], self.accept_lengths()):
            row["accept_lengths"] = lengths
        records = None
        if self.recs is not None:
            records = {key: (torch.cat(v).cpu() if v else torch.zeros(0)) for key, v in self.recs.items()}
            records["row"], records["position"] = records["row"].long(), records["position"].long()
            records["accepted"] = records["accepted"].bool()
            for key in ("teacher_entropy", "teacher_entropy_tempered", "acceptance_prob"):
                records[key] = records[key].float()
            with torch.inference_mode(False):  # ordinary tensors: inference tensors refuse in-place updates
                records = {key: v.clone() for key, v in records.items()}
        return GenerationResult(tokens, stats, records)


@torch.inference_mode()  # like no_grad, minus autograd's per-op bookkeeping (version counters, views)
def speculative_generate(target, draft, prompts, *, gamma=5, max_new_tokens=128, temperature=1.0, top_p=1.0,
                         top_k=0, eos_token_id=None, seed=None, record=False, vocab_size=None, generator=None,
                         compact=True, batch_size=None) -> GenerationResult:
    """Sample continuations of `prompts` (list of token-id lists) from `target` (p), drafted by `draft` (q).
    batch_size=None decodes all prompts as one batch; an int keeps at most that many rows in the batch and
    admits the next prompts as rows finish (continuous batching)."""
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be None (all prompts at once) or an integer >= 1, got {batch_size}")
    _check_args([target, draft], prompts, max_new_tokens, temperature, top_k, top_p, gamma, vocab_size)
    reuse_freed_memory()
    t0 = time.perf_counter()
    device = target.device
    rule = Sampling(temperature, top_k, top_p, _shared_vocab([target, draft], vocab_size),
                    _make_generator(seed, generator, device))
    stop_ids = torch.tensor(resolve_stop_ids(target, eos_token_id), dtype=torch.long, device=device)
    B = len(prompts)
    metrics = SpecMetrics(B, gamma, max_new_tokens, device, record)
    batch = RunningBatch(device)  # starts empty
    slots = B if batch_size is None else batch_size
    refill_at = max(1, slots // 4)  # admitting costs a prefill call per model: wait for a quarter of the slots
    admitted = 0 if max_new_tokens > 0 else B  # prompts[:admitted] have entered the batch
    first_round = True  # where sampling starts: both models' logits are checked once (check_logits)

    while admitted < B or len(batch) > 0:
        # 0. admit prompts into free slots
        free = slots - len(batch)
        if admitted < B and (free >= refill_at or len(batch) == 0):
            new = list(range(admitted, min(B, admitted + free)))
            admitted += len(new)
            metrics.start[new] = time.perf_counter() - t0
            batch.admit(target, draft, prompts, new)
        budget = max_new_tokens - metrics.n_gen[batch.rows]  # (b,) tokens each row may still emit
        k = min(gamma, int(budget.max()))

        # 1. draft k tokens from q; 2. verify [pending, x_1..x_k] in one target call -> p_1..p_{k+1}
        drafts, q = batch.draft(draft, k, rule, check=first_round)  # (b, k), (b, k, V)
        t_logits = batch.verify(target, drafts)[..., :rule.vocab_size]  # (b, k+1, V)
        if first_round:
            check_logits(t_logits, target, "target")
            first_round = False
        p = rule.probs(t_logits)  # (b, k+1, V)

        # 3./4. accept a prefix of the drafts, then the correction or bonus token t
        counted = counted_drafts(drafts, stop_ids, budget)  # (b, k)
        acc, t = verify_block(p, q, drafts, counted, rule.greedy, rule.generator)  # (b, k), (b,)
        n = acc.sum(1)  # (b,) accepted drafts per row

        # emit x_1..x_n, t (cut after the first stop id and at the budget); record; slots of rejects -> holes
        emit, e, done = emit_tokens(drafts, t, n, stop_ids, budget)  # (b, k+1), (b,), (b,)
        metrics.add(batch.rows, emit, e, counted, acc, p, q, t_logits, temperature)
        batch.accept(drafts, n, t)

        # evict finished rows; compact caches that are mostly holes
        if done.any():
            metrics.finish[batch.rows[done].cpu()] = time.perf_counter() - t0
            batch.keep((~done).nonzero().squeeze(1))  # (b',) the rows still generating; may be none
        if compact and len(batch) > 0:
            batch.compact()

    return metrics.result(time.perf_counter() - t0)


def _spec_stats(counts: dict, start, finish, wall, batched_target_calls, batched_draft_calls) -> dict:
    """The metrics of the module docstring, per row and pooled over the batch. counts: per row (B,) or
    per row and position (B, gamma) tensors, SpecMetrics' counters."""
    c = {key: v.cpu() for key, v in counts.items()}

    def summary(r, seconds):  # r: the counters of one row, or summed over the rows
        gen, d, t, a, tc, dc = (int(r[key]) for key in ("generated", "drafted", "tested", "accepted",
                                                        "target_calls", "draft_calls"))
        return {"generated": gen, "drafted": d, "tested": t, "accepted": a, "acceptance_rate": _rate(a, d),
                "alpha": _rate(float(r["beta_sum"]), t),
                "alpha_all_drafted": _rate(float(r["beta_sum_drafted"]), d),
                "mean_accepted_length": _rate(gen, tc),
                "per_position_acceptance": [_rate(x, y) for x, y in zip(r["pos_accepted"].tolist(),
                                                                          r["pos_tested"].tolist())],
                "per_position_tested": [int(y) for y in r["pos_tested"].tolist()],
                "target_calls": tc, "draft_calls": dc, "wall_time_s": seconds, "tokens_per_s": _rate(gen, seconds)}

    per_row = [summary({key: v[r] for key, v in c.items()}, (float(finish[r]) or wall) - float(start[r]))
               for r in range(len(finish))]
    stats = summary({key: v.sum(0) for key, v in c.items()}, wall)
    stats["target_calls"], stats["draft_calls"] = batched_target_calls, batched_draft_calls
    stats["per_row"] = per_row
    return stats


# ----------------------------------------------------------------------------- plain sampling (the baseline)

@torch.inference_mode()
def autoregressive_generate(model, prompts, *, max_new_tokens=128, temperature=1.0, top_p=1.0, top_k=0,
                            eos_token_id=None, seed=None, generator=None, vocab_size=None) -> GenerationResult:
    """Sample continuations of `prompts` token by token from `model` (same sampling rules, left padding,
    KV cache, several stop ids, finished rows evicted). Pass a torch.Generator for reproducibility, or a list
    of one per prompt: each row then samples from its own generator, exactly as it would alone, whichever
    prompts share its batch."""
    _check_args([model], prompts, max_new_tokens, temperature, top_k, top_p, vocab_size=vocab_size)
    per_row = isinstance(generator, (list, tuple))
    if per_row and len(generator) != len(prompts):
        raise ValueError(f"generator: a list needs one torch.Generator per prompt, got {len(generator)} for "
                         f"{len(prompts)} prompts")
    reuse_freed_memory()
    t0 = time.perf_counter()
    device = model.device
    gen = _make_generator(seed, generator, device)
    V = _shared_vocab([model], vocab_size)
    stop_ids = torch.tensor(resolve_stop_ids(model, eos_token_id), dtype=torch.long, device=device)
    B = len(prompts)
    out = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
    n_gen = torch.zeros(B, dtype=torch.long, device=device)
    finish = torch.zeros(B, dtype=torch.float64)  # seconds until each row finished
    calls = torch.zeros(B, dtype=torch.long, device=device)
    batched_calls = 0

    cache = DynamicCache()
    x, mask = _left_pad(prompts, device)  # (B, T)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    n_seq = mask.sum(1)  # (B,) real tokens so far
    rows = torch.arange(B, device=device)
    while max_new_tokens > 0 and rows.numel() > 0:
        logits = _forward(model, x, mask, positions, cache, logits_to_keep=1)[:, -1, :V]  # (b, V)
        if batched_calls == 0:  # where sampling starts (check_logits)
            check_logits(logits, model, "sampling")
        probs = process_logits(logits, temperature, top_k, top_p)  # (b, V)
        batched_calls += 1
        calls.index_add_(0, rows, torch.ones_like(rows))
        t = probs.argmax(-1) if temperature == 0 else sample(probs, [gen[r] for r in rows.tolist()] if per_row
                                                             else gen)  # (b,)
        out[rows, n_gen[rows]] = t
        n_gen.index_add_(0, rows, torch.ones_like(rows))
        done = torch.isin(t, stop_ids) | (n_gen[rows] >= max_new_tokens)
        if done.any():
            finish[rows[done].cpu()] = time.perf_counter() - t0
            keep = (~done).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            cache.batch_select_indices(keep)
            mask, rows, t, n_seq = mask[keep], rows[keep], t[keep], n_seq[keep]
        x, positions = t[:, None], n_seq[:, None]  # (b, 1)
        mask = torch.cat([mask, torch.ones_like(x)], 1)  # (b, L + 1): the slot t will fill
        n_seq = n_seq + 1

    wall = time.perf_counter() - t0
    n_gen, calls = n_gen.cpu(), calls.cpu()
    tokens = [row[:n] for row, n in zip(out.tolist(), n_gen.tolist())]

    def summary(gen_, calls_, seconds):
        return {"generated": int(gen_), "target_calls": int(calls_), "wall_time_s": seconds,
                "tokens_per_s": _rate(int(gen_), seconds)}

    stats = summary(n_gen.sum(), batched_calls, wall)
    stats["per_row"] = [summary(n_gen[r], calls[r], float(finish[r]) or wall) for r in range(B)]
    return GenerationResult(tokens, stats)
