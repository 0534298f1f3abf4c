"""Hugging Face's top-p set without sorting the vocabulary (`top_p_keep`), exact.

The rule (TopPLogitsWarper): keep the most likely tokens whose mass ahead of them is < top_p. The
obvious way sorts each row. On the CPU a full sort of V = 151936 floats costs ~10 ms a row, and even
at V = 640 a sort costs ~20 us a row (a round's 96 verified rows: ~3 ms, as much as a tiny draft's
forward), so the CPU path avoids it:
  * a trained model's row is peaked: its nucleus lies among its few most likely tokens, and a
    partial topk finds it (`_top_p_from_candidates`, TOP_P_CANDIDATES of them;
    TOP_P_CANDIDATES_SMALL at a vocabulary of at most TOP_P_SORT_BELOW tokens, where a topk's cost
    is mostly its k);
  * the rows the candidates cannot settle (a flat row: random weights, or a very uncertain position)
    are sorted at a small vocabulary; at a large one they go to a radix select over the float bits,
    whose cost does not depend on the row (`_top_p_radix`, O(V)).
On CUDA the full sort is cheap, so it sorts (`_top_p_sorted`). Every path gives the same set.
"""
import torch

from plumbing.cpu_memory import by_rows

TOP_P_SORT_BELOW = 16384  # CPU: up to this vocabulary, the rows the candidates cannot settle sort
TOP_P_CANDIDATES = 256  # top-p first looks for the nucleus among this many most likely tokens
TOP_P_CANDIDATES_SMALL = 64  # ... at a vocabulary of at most TOP_P_SORT_BELOW tokens


def top_p_keep(probs: torch.Tensor, top_p: float, full_sort: bool | None = None) -> torch.Tensor:
    """Hugging Face's top-p set of probs (N, V) -> keep (N, V) bool, without sorting the vocabulary.

    TopPLogitsWarper sorts ascending, drops every token whose cumulative mass (itself and all LESS
    likely tokens) is <= 1 - top_p, and always keeps the most likely token. Read from the top: the
    token of descending rank r is kept iff the mass of the r - 1 tokens ahead of it, M_{r-1}, is
    < top_p (as 1 - M_{r-1} > 1 - top_p); M_0 = 0, so the most likely token is always kept. The kept
    ranks are a prefix.

    full_sort=None: sort on CUDA, the candidates (then a sort or the radix select) on the CPU; True
    forces the full sort, False the candidates with the radix select behind them, at any vocabulary;
    every path gives the same set. The CPU path runs a few rows at a time (by_rows), so its bucket
    tables stay small whatever the batch. Masses are float64 sums relative to the total, i.e. the
    rule in exact arithmetic up to float64 rounding (~1e-16 of the mass: a top_p within that of a
    partial sum may go either way); HF's float32 rule can differ from it on tokens at the boundary
    of a flat distribution (by ~1e-6 of mass). Among tokens of exactly equal probability at the
    boundary, which are kept is unspecified in HF (torch.sort is not stable); here the lowest ids,
    on every path."""
    if probs.dim() != 2:
        raise ValueError(f"top_p_keep takes probabilities of shape (N, V), got "
                         f"{tuple(probs.shape)}")
    if full_sort or (full_sort is None and probs.device.type == "cuda"):
        return _top_p_sorted(probs, _top_p_threshold(probs, top_p))
    if full_sort is None and probs.shape[-1] <= TOP_P_SORT_BELOW:  # a small vocabulary on the CPU
        return by_rows(lambda rows: _top_p_by_candidates(rows, top_p, TOP_P_CANDIDATES_SMALL,
                                                         _top_p_sorted), probs)
    return by_rows(lambda rows: _top_p_by_candidates(rows, top_p, TOP_P_CANDIDATES, _top_p_radix),
                   probs)


def _top_p_sorted(probs: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """The top-p set of probs (N, V) (the ranks r with M_{r-1} < threshold (N, 1)) by a full stable
    sort -> keep (N, V) bool; equal p: the lowest id first."""
    top, idx = probs.sort(stable=True, dim=-1, descending=True)  # (N, V)
    top = top.double()
    keep = (top.cumsum(-1) - top) < threshold  # M_{r-1} < top_p of the total
    keep[:, 0] = True  # the most likely token, whatever the rounding
    return torch.zeros_like(keep).scatter_(-1, idx, keep)


def _top_p_threshold(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """top_p of each row's TOTAL mass, in float64 (N, V) -> (N, 1), the same sum for every path: a
    float32 softmax sums to 1 only within ~1e-6, and that error would decide boundary tokens of flat
    distributions (HF's float32 rule has it; the exact rule does not)."""
    return top_p * probs.sum(-1, keepdim=True, dtype=torch.float64)


def _top_p_by_candidates(probs: torch.Tensor, top_p: float, n: int, fallback) -> torch.Tensor:
    """top_p_keep's CPU path on rows (N, V): from the n most likely tokens, and the rows they cannot
    settle by fallback(probs, threshold) (_top_p_sorted or _top_p_radix)."""
    threshold = _top_p_threshold(probs, top_p)  # (N, 1)
    v, settled = _top_p_from_candidates(probs, threshold, n)  # (N, 1), (N,)
    if not bool(settled.any()):  # all flat (random weights): no row copies
        return fallback(probs, threshold)
    keep = probs >= v  # (N, V)
    if not bool(settled.all()):
        rest = (~settled).nonzero().squeeze(1)  # (n_rest,)
        keep[rest] = fallback(probs[rest], threshold[rest])
    return keep


def _top_p_from_candidates(probs: torch.Tensor, threshold: torch.Tensor,
                           n: int = TOP_P_CANDIDATES):
    """The top-p set of probs (N, V) (the ranks r with M_{r-1} < threshold (N, 1)) read off the n
    most likely tokens alone -> v (N, 1) and settled (N,) bool: a settled row keeps exactly its
    tokens with p >= v (v the last kept value, float32). A row is unsettled when its nucleus reaches
    past rank n - 1, or its boundary falls between tokens of equal probability (which of those are
    kept is decided by id, see _top_p_radix)."""
    n = min(n, probs.shape[-1])
    top = probs.topk(n, dim=-1).values  # (N, n) descending
    top64 = top.double()
    n_kept = ((top64.cumsum(-1) - top64) < threshold).sum(-1, keepdim=True)  # (N, 1) >= 1 (M_0 = 0)
    v = top.gather(1, n_kept - 1)  # (N, 1) the last kept value
    first_dropped = top.gather(1, n_kept.clamp(max=n - 1))  # (N, 1)
    return v, ((n_kept < n) & (first_dropped < v)).squeeze(1)


def _bucket_mass(key, weight, n_buckets: int):
    """Per row, the total weight of each bucket: key (N, V) in [0, n_buckets), float64 weight (N, V)
    -> (N, n_buckets)."""
    mass = torch.zeros(key.shape[0], n_buckets, dtype=torch.float64, device=key.device)
    return mass.scatter_add_(1, key, weight)


def _boundary_bucket(mass, above, threshold):
    """One radix step of top-p: per row, bucket masses (N, n) in ascending order of value and the
    mass `above` (N, 1) of every token above these buckets -> the boundary bucket b*, the last b
    with above + mass(buckets >= b) >= threshold (N, 1); the new above = above + mass(buckets > b*)
    (N, 1); and the mass of b* (N, 1)."""
    total = mass.sum(-1, keepdim=True)  # (N, 1)
    above_b = above + total - mass.cumsum(-1)  # (N, n) above + mass of the buckets > b (no flips)
    b_star = ((above_b + mass >= threshold).sum(-1, keepdim=True) - 1).clamp(min=0)  # (N, 1)
    return b_star, above_b.gather(1, b_star), mass.gather(1, b_star)


def _top_p_radix(probs: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """The top-p set of probs (N, V) (the ranks r with M_{r-1} < threshold (N, 1)) by a two-step
    radix select on the float bits -> keep (N, V) bool. The bits of a float32 p >= 0, read as an
    int32, are monotone in p. Step 1 buckets the tokens by their top 16 bits and finds the boundary
    bucket b1 (scatter_add of the masses, a cumulative sum over 2^15 buckets); tokens above b1 are
    kept, below it dropped. Step 2 splits b1 by the low 16 bits the same way, down to one exact
    float value v. The boundary tokens of value v (ties) are kept in index order while
    M_{r-1} = (mass above them) + (i - 1) v < threshold. No step depends on how many tokens share a
    bucket, so a near-uniform row (random weights: all p within 1% of 1/V) costs the same as a
    peaked one."""
    V = probs.shape[-1]
    bits = probs.view(torch.int32)  # (N, V) monotone in p
    p64 = probs.double()
    hi = (bits >> 16).long()  # (N, V) step-1 bucket; int64, as scatter_add wants
    b1, above, _ = _boundary_bucket(_bucket_mass(hi, p64, 1 << 15), torch.zeros_like(threshold),
                                    threshold)  # (N, 1) each
    # step 2 splits b1 by the low 16 bits; tokens outside b1 weigh 0 there, whatever their bucket
    # (clamping their keys into sentinel buckets instead would pile them onto two slots: scatter_add
    # slows down ~5x) (a float32 product then a cast: a bool * float64 product or torch.where costs
    # ~5x more on the CPU)
    w2 = (probs * (hi == b1)).double()  # (N, V)
    b2, above, tie_mass = _boundary_bucket(_bucket_mass((bits & 0xFFFF).long(), w2, 1 << 16), above,
                                           threshold)  # (N, 1) each
    v_bits = ((b1 << 16) | b2).int()  # (N, 1) the boundary value v as int32 bits
    v = v_bits.view(torch.float32).double()  # (N, 1)
    # kept ties: above + (i - 1) v < threshold, i = 1, 2, ... (usually every tie: keep = p >= v).
    # The count of ties is tie_mass / v exactly: c <= V copies of a float32 v (24-bit significand)
    # sum exactly in float64 while c < 2^29
    n_keep = torch.ceil((threshold - above) / v).clamp(min=1, max=V)  # (N, 1)
    if bool((torch.round(tie_mass / v) <= n_keep).all()):
        return bits >= v_bits
    tie = bits == v_bits  # (N, V)
    return (bits > v_bits) | (tie & (tie.cumsum(-1, dtype=torch.int32) <= n_keep))  # (N, V)
