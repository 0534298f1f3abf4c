"""Exact speculative decoding, batched: samples of a large target model, drafted by a small model.

Notation: p = target (the large model whose output distribution must be reproduced exactly),
q = draft (the small model that proposes tokens). Both next-token distributions are processed the
same way (`process_logits`: float32 logits / temperature, then top-k, then top-p, Hugging Face's
order and rules), so p and q below are the processed distributions.

The algorithm: Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding",
Algorithm 1 (the same rule as Chen et al. 2023, "Accelerating Large Language Model Decoding with
Speculative Sampling"). One *round*, for all rows of the batch at once:
  1. draft k = min(gamma, most tokens any row may still emit) tokens x_1..x_k autoregressively from
     q, keeping q_i = q(. | prefix, x_<i);
  2. score all of them with ONE target forward pass over [last token, x_1..x_k] -> p_1..p_{k+1};
  3. accept x_i with probability min(1, p_i(x_i) / q_i(x_i)), left to right, until the first
     rejection;
  4. at the first rejection i sample the next token from the residual norm(max(0, p_i - q_i)); if
     all k drafts are accepted sample a bonus token from p_{k+1}.
Every round emits (accepted + 1) tokens, distributed exactly as tokens sampled from p one at a time
(both papers prove it). temperature == 0 is exact greedy: x_i = argmax q_i, x_i is accepted iff
x_i == argmax p_i, and the next token is argmax p (no random number is drawn).
The chance that a draft from q_i is accepted is
beta_i = sum_x min(p_i(x), q_i(x)) = 1 - TVD(p_i, q_i) (`acceptance_prob`; Leviathan et al.
Section 3; DistillSpec, Zhou et al. 2024, distills with TVD to raise it). If every draft is
accepted with probability alpha independently, a round emits (1 - alpha^(gamma+1)) / (1 - alpha)
tokens on average (Leviathan et al. Eq. 1, `expected_accepted_length`).

Reading order: the math of one round (`accept_or_resample`, `residual`, `acceptance_prob`, ...),
then `speculative_generate`, whose loop is one round: admit -> draft k -> score with the target ->
accept or resample -> emit -> record -> evict / compact. Below it the state it runs on: `Sampling`
(the processing / sampling rule of both models), `RunningBatch` (the per-row state and both KV
caches: admit, draft, score_with_target, keep_accepted, keep_rows, compact) and `SpecMetrics`
(per-prompt counts and records, one `add` per round). Last, `autoregressive_generate`: the baseline.

How a batch runs (the machinery is in plumbing/):
  * jagged prompts are left-padded; both models keep one KV cache for the whole run, and every call
    gets a mask over all cache slots and explicit per-row positions. Rejected drafts are never
    cropped from a cache: they stay as *holes* (mask 0), and a cache that is more than half holes is
    compacted; finished rows are evicted (plumbing/kv_cache.py);
  * the draft feeds [pending, x_1..x_{k-1}] in a round, so when all k drafts are accepted x_k is not
    in its cache yet (RunningBatch.unfed): each round's first draft call feeds two tokens
    [x_k or a hole, pending];
  * continuous batching (batch_size < len(prompts)): a batch runs until its slowest row is done, so
    with a fixed batch the rounds are set by the unluckiest row. With batch_size, finished rows free
    their slots and the next prompts are prefilled alone and joined to the running caches (the
    narrower side left-padded with holes), once a quarter of the slots are free (each admission
    costs one prefill call per model);
  * draft and target may have lm_heads of different widths over one tokenizer (padding rows): pass
    vocab_size=len(tokenizer), both logits are cut to it; exactness is w.r.t. p on that vocabulary.
    Without vocab_size, different widths are refused (they may be two different vocabularies);
  * at Qwen's vocabulary (V = 151936) a sort per row would cost more than small models' forwards, so
    top-p is read off a few candidates or found by a radix select, without a sort on the CPU
    (plumbing/topp.py), tokens are drawn by an inverse CDF over a float64 cumulative sum (`sample`),
    both exact, and every O(V) pass on the CPU runs a few rows at a time (plumbing/cpu_memory.py).

Metrics (`.stats`; the same keys for each row under stats["per_row"]). A drafted x_i is *counted*
unless the row's budget ends before it (g + i > max_new_tokens, g = tokens the row generated before
the round) or x_1..x_{i-1} contains a stop id. A counted x_i is *tested* when x_1..x_{i-1} were all
accepted: the positions up to and including the first rejection of each block. The positions after
a rejection are drafted but never verified, and their draft context holds the rejected token, so
their beta_i says nothing about the acceptance a serving draft sees; alpha and the per-position
rates count tested positions only. With beta_i = sum_x min(p_i(x), q_i(x)) = 1 - TVD(p_i, q_i):
  drafted                  D = number of counted drafted positions
  tested                   T = number of tested positions (T <= D; T = D when no block had a
                           rejection before its last counted position)
  accepted                 A = number of counted drafted tokens accepted (a prefix of each block)
  acceptance_rate          A / D   (the seed's "token acceptance"; NOT alpha)
  alpha                    (1 / T) * sum over tested positions of beta_i   (analytic acceptance: the
                           expected A / T, the per-token acceptance probability of the textbook
                           formulas)
  alpha_all_drafted        (1 / D) * sum over every counted position of beta_i (the former alpha,
                           for comparison: it includes untested positions conditioned on rejected
                           tokens)
  mean_accepted_length     generated tokens / target calls   (tokens per verification, bonus
                           included)
  per_position_acceptance  list over i = 1..gamma: accepted at position i / tested at position i
                           (the acceptance of x_i given x_1..x_{i-1} accepted; nan where nothing
                           was tested)
  per_position_tested      list over i = 1..gamma: tested at position i (the denominators above, to
                           pool the rates of several calls)
  target_calls, draft_calls  batched forward passes after the prefill (per row: the passes it was
                           in)
  wall_time_s              seconds from the call to the end (per row: from entering the batch to
                           finishing)
  tokens_per_s             generated tokens / wall_time_s
  accept_lengths           (per row only) one entry per target call of the row: the tokens that call
                           emitted (accepted drafts + 1, fewer where a stop id or the budget cut the
                           block); they sum to generated (Spec-Bench's `accept_lengths`)
The batch aggregates pool over rows (A / D over all rows, not a mean of per-row rates); target_calls
and draft_calls of the batch count batched passes; mean_accepted_length of the batch divides by the
sum of the per-row target calls.
With record=True, `.records` holds one entry per counted drafted position, in order (round by round,
rows in batch order, positions ascending): row (index into `prompts`), position (1..gamma),
accepted, teacher_entropy (nats, H(p_i) of the processed p), teacher_entropy_tempered (H of the
target's softmax(logits / T) before top-k / top-p) and acceptance_prob (beta_i). A position after a
rejection in its block is recorded with accepted=False (it was drafted but never tested).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from plumbing import kv_cache
from plumbing.cpu_memory import by_rows, reuse_freed_memory
from plumbing.decoding_args import (check_args, check_logits, make_generator, resolve_stop_ids,
                                    shared_vocab)
from plumbing.topp import top_p_keep


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # per row: generated ids only, cut after the first stop id
    stats: dict
    records: dict | None = field(default=None, repr=False)


# ----------------------------------------------------------------- the math of p, q and one round

def process_logits(logits: torch.Tensor, temperature: float, top_k: int = 0,
                   top_p: float = 1.0) -> torch.Tensor:
    """Logits (..., V) -> probabilities (..., V) in float32: / temperature, top-k, top-p (HF's order
    and rules: top-k keeps every logit >= the k-th largest, ties included; top-p see
    plumbing.topp.top_p_keep). temperature 0 -> one-hot argmax (greedy). Cost: O(V) passes (softmax,
    topk of a few candidates), no sort, a few rows at a time on the CPU (by_rows)."""
    V = logits.shape[-1]
    rows = logits.reshape(-1, V)  # (N, V); a view for the verifier's (b, k+1, V) logits
    probs = by_rows(lambda x: _process_rows(x, temperature, top_k, top_p), rows)  # (N, V)
    return probs.reshape(logits.shape)  # (..., V)


def _process_rows(logits: torch.Tensor, temperature: float, top_k: int,
                  top_p: float) -> torch.Tensor:
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
        probs = probs / probs.sum(-1, keepdim=True)  # = softmax of the kept logits (HF masks them)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from probs (B, V) -> (B,), exactly: the inverse CDF of a float64 cumulative
    sum at one float64 uniform per row (torch.multinomial does the same search, with checks and
    copies that cost more than the search at V = 151936). The token is the first i with
    C_i > u * C_V: tokens of probability 0 add nothing to C and can never be drawn. u * C_V is kept
    below C_V, so the search never runs off the end. generator: one for all rows, or a list with
    one per row (row i's uniform from generator[i]: a row's draw then does not depend on which other
    rows share the batch; distill.py's per-prompt sampling)."""
    if isinstance(generator, (list, tuple)):
        u = torch.cat([torch.rand(1, 1, dtype=torch.float64, device=probs.device, generator=g)
                       for g in generator])  # (B, 1)
    else:
        u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device,
                       generator=generator)  # (B, 1)
    return by_rows(_inverse_cdf, probs, u)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The first token i with C_i > u * C_V, per row: probs (B, V), u (B, 1) uniforms in [0, 1) ->
    (B,)."""
    cdf = probs.cumsum(-1, dtype=torch.float64)  # (B, V)
    total = cdf[:, -1:]  # (B, 1)
    x = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))  # (B, 1) < C_V
    return torch.searchsorted(cdf, x, right=True).squeeze(-1)  # (B,)


def acceptance_prob(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """beta = sum_x min(p(x), q(x)) = 1 - TVD(p, q): the chance a draft from q is accepted
    (Leviathan et al. 2023, Section 3; DistillSpec's alpha = 1 - TVD, Zhou et al. 2024).
    (..., V) -> (...)."""
    p, q = torch.broadcast_tensors(p, q)  # views; by_rows splits both alike
    return by_rows(lambda p_, q_: torch.minimum(p_, q_).sum(-1), p, q)


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)), the distribution to sample from after a rejection (Leviathan et al.
    2023, Algorithm 1); p where p == q. (B, V) -> (B, V)."""
    r = (p - q).clamp(min=0)  # (B, V)
    s = r.sum(-1, keepdim=True)  # (B, 1)
    return torch.where(s > 0, r / s.clamp(min=1e-30), p)


def entropy(p: torch.Tensor) -> torch.Tensor:
    """H(p) in nats from PROBABILITIES p (..., V) -> (...); 0 log 0 = 0 (xlogy), as top-k / top-p
    zero out tokens. divergences.teacher_entropy is the same H from log-probs, for the losses."""
    return by_rows(lambda p_: -torch.special.xlogy(p_, p_).sum(-1), p)


def tempered_entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """H(softmax(logits / T)) (..., V) -> (...): the entropy before top-k / top-p (a few rows at a
    time, so no (..., V) probabilities are kept)."""
    return by_rows(lambda z: entropy(process_logits(z, temperature)), logits)


def expected_accepted_length(alpha: float, gamma: int) -> float:
    """E[tokens per round] = (1 - alpha^(gamma+1)) / (1 - alpha) when every drafted token is
    accepted with probability alpha independently (Leviathan et al. 2023, Eq. 1): the textbook
    estimate of mean_accepted_length (bonus token included); gamma + 1 at alpha = 1, NaN for a NaN
    alpha."""
    if math.isnan(alpha):
        return math.nan
    return gamma + 1.0 if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


def accept_or_resample(p, q, drafts, counted, greedy=False, generator=None):
    """Steps 3 and 4 of a round (Leviathan et al. 2023, Algorithm 1), all rows at once: accept x_i
    with probability min(1, p_i(x_i) / q_i(x_i)) until the first rejection, then sample the next
    token t from norm(max(0, p_{n+1} - q_{n+1})) after n accepted drafts, or from p_{k+1} if all k
    were accepted. greedy: x_i is accepted iff it is argmax p_i, and t = argmax.
    p (b, k+1, V) target probs, q (b, k, V) draft probs, drafts (b, k) the x_i, counted (b, k)
    drafts allowed to be accepted. Returns the accepted prefix (b, k) bool and t (b,)."""
    b, k = drafts.shape
    p_x = p[:, :k].gather(-1, drafts[..., None]).squeeze(-1)  # (b, k) p_i(x_i)
    if greedy:
        ok = drafts == p[:, :k].argmax(-1)  # (b, k)
    else:
        q_x = q.gather(-1, drafts[..., None]).squeeze(-1)  # (b, k) q_i(x_i) > 0
        u = torch.rand(b, k, device=p.device, generator=generator)  # (b, k)
        ok = u * q_x < p_x  # u < min(1, p/q)
    acc = (ok & counted).long().cumprod(1).bool()  # (b, k) stop at the first rejection
    n = acc.sum(1)  # (b,)
    at_n = n[:, None, None].expand(b, 1, p.shape[-1])  # (b, 1, V)
    p_n = p.gather(1, at_n).squeeze(1)  # (b, V)
    # q_{k+1} = 0 (all k accepted: the residual is p itself); no (b, k+1, V) copy of q to read a row
    q_n = q.gather(1, at_n.clamp(max=k - 1)).squeeze(1) * (n < k)[:, None]  # (b, V)
    t = p_n.argmax(-1) if greedy else sample(residual(p_n, q_n), generator)  # (b,)
    return acc, t


def counted_drafts(drafts, stop_ids, budget):
    """drafts (b, k), budget (b,) tokens each row may still emit -> counted (b, k): x_i counts
    unless the budget ends before it (i > budget) or x_1..x_{i-1} holds a stop id (it would never be
    emitted)."""
    i = torch.arange(1, drafts.shape[1] + 1, device=drafts.device)  # (k,) draft positions 1..k
    is_stop = torch.isin(drafts, stop_ids).long()  # (b, k)
    stop_before = (is_stop.cumsum(1) - is_stop) > 0  # (b, k) a stop id among x_1..x_{i-1}
    return (i <= budget[:, None]) & ~stop_before  # (b, k)


def tested_drafts(counted, acc):
    """counted (b, k), acc (b, k) the accepted prefix (accept_or_resample) -> tested (b, k): the
    counted positions that verification decided, i.e. up to and including the first rejection of
    each block. A position after the first rejection is never tested (its accept/reject draw is
    discarded) and its draft context holds the rejected token, so it belongs to no acceptance rate
    or alpha."""
    j = torch.arange(counted.shape[1], device=counted.device)  # (k,) 0-based positions
    return counted & (j[None] <= acc.sum(1, keepdim=True))  # x_{j+1} tested iff x_1..x_j accepted


def emit_tokens(drafts, t, n, stop_ids, budget):
    """The emission rule of one round: x_1..x_n then t, cut after the first stop id and at the
    budget. drafts (b, k), t (b,) the correction or bonus token, n (b,) accepted drafts, budget (b,)
    tokens each row may still emit. Returns emit (b, k+1) (only its first e count; the rest is
    scratch), e (b,) and done (b,): the row emitted a stop id within its budget, or used the whole
    budget."""
    j = torch.arange(drafts.shape[1] + 1, device=drafts.device)  # (k+1,)
    emit = torch.where(j < n[:, None], torch.cat([drafts, t[:, None]], 1), t[:, None])  # (b, k+1)
    stop_in = torch.isin(emit, stop_ids) & (j <= n[:, None])  # (b, k+1) stop ids among n + 1 tokens
    first_stop = torch.where(stop_in.any(1), stop_in.long().argmax(1) + 1, n + 1)  # (b,)
    e = torch.minimum(first_stop, budget)  # (b,) tokens emitted this round
    done = (stop_in.any(1) & (first_stop <= budget)) | (e >= budget)  # (b,)
    return emit, e, done


# ----------------------------------------------------------------------------- speculative decoding

@torch.inference_mode()  # like no_grad, minus autograd's per-op bookkeeping (version counters)
def speculative_generate(target, draft, prompts, *, gamma=5, max_new_tokens=128, temperature=1.0,
                         top_p=1.0, top_k=0, eos_token_id=None, seed=None, record=False,
                         vocab_size=None, generator=None, compact=True,
                         batch_size=None) -> GenerationResult:
    """Sample continuations of `prompts` (list of token-id lists) from `target` (p), drafted by
    `draft` (q), by rounds of Leviathan et al. 2023's Algorithm 1 (the module docstring).
    batch_size=None decodes all prompts as one batch; an int keeps at most that many rows in the
    batch and admits the next prompts as rows finish (continuous batching)."""
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be None (all prompts at once) or an integer >= 1, got "
                         f"{batch_size}")
    check_args([target, draft], prompts, max_new_tokens, temperature, top_k, top_p, gamma,
               vocab_size)
    reuse_freed_memory()
    t0 = time.perf_counter()
    device = target.device
    rule = Sampling(temperature, top_k, top_p, shared_vocab([target, draft], vocab_size),
                    make_generator(seed, generator, device))
    stop_ids = torch.tensor(resolve_stop_ids(target, eos_token_id), dtype=torch.long,
                            device=device)  # (n_stop,)
    B = len(prompts)
    metrics = SpecMetrics(B, gamma, max_new_tokens, device, record, temperature)
    batch = RunningBatch(device)  # starts empty
    waiting = PromptQueue(B if max_new_tokens > 0 else 0, B if batch_size is None else batch_size)
    first_round = True  # where sampling starts: both models' logits are checked once (check_logits)

    while waiting or len(batch) > 0:
        # 0. admit prompts into free slots
        if new := waiting.admit(len(batch)):
            metrics.start[new] = time.perf_counter() - t0
            batch.admit(target, draft, prompts, new)
        budget = max_new_tokens - metrics.n_gen[batch.rows]  # (b,) tokens each row may still emit
        k = min(gamma, int(budget.max()))

        # 1. draft k tokens from q; 2. score [pending, x_1..x_k] in one target call -> p_1..p_{k+1}
        drafts, q = batch.draft(draft, k, rule, check=first_round)  # (b, k), (b, k, V)
        t_logits = batch.score_with_target(target, drafts)[..., :rule.vocab_size]  # (b, k+1, V)
        if first_round:
            check_logits(t_logits, target, "target")
            first_round = False
        p = rule.probs(t_logits)  # (b, k+1, V)

        # 3./4. accept a prefix of the drafts, then the correction or bonus token t
        counted = counted_drafts(drafts, stop_ids, budget)  # (b, k)
        acc, t = accept_or_resample(p, q, drafts, counted, rule.greedy,
                                    rule.generator)  # (b, k), (b,)
        n = acc.sum(1)  # (b,) accepted drafts per row

        # emit x_1..x_n, t (cut after a stop id and at the budget); record; rejected slots -> holes
        emit, e, done = emit_tokens(drafts, t, n, stop_ids, budget)  # (b, k+1), (b,), (b,)
        metrics.add(batch.rows, emit, e, counted, acc, p, q, t_logits)
        batch.keep_accepted(drafts, n, t)

        # evict finished rows; compact caches that are mostly holes
        if done.any():
            metrics.finish[batch.rows[done].cpu()] = time.perf_counter() - t0
            batch.keep_rows((~done).nonzero().squeeze(1))  # (b',) the rows still generating
        if compact and len(batch) > 0:
            batch.compact()

    return metrics.result(time.perf_counter() - t0)


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
        return process_logits(logits[..., :self.vocab_size], self.temperature, self.top_k,
                              self.top_p)

    def pick(self, probs: torch.Tensor) -> torch.Tensor:
        """One token per row of probs (b, V) -> (b,): argmax when greedy (no random number), else a
        sample."""
        return probs.argmax(-1) if self.greedy else sample(probs, self.generator)


@dataclass
class PromptQueue:
    """The prompts not yet in the batch (continuous batching): prompts[admitted:n] wait for one of
    the batch's `slots`. Admitting costs a prefill call per model, so they enter together, once a
    quarter of the slots is free (or the batch is empty)."""
    n: int
    slots: int
    admitted: int = 0

    def __bool__(self) -> bool:
        return self.admitted < self.n

    def admit(self, in_batch: int) -> list[int]:
        """The prompt indices that enter a batch of `in_batch` rows now ([] for none)."""
        free = self.slots - in_batch
        if not self or (free < max(1, self.slots // 4) and in_batch > 0):
            return []
        new = list(range(self.admitted, min(self.n, self.admitted + free)))
        self.admitted += len(new)
        return new


class RunningBatch:
    """The rows being decoded and both models' caches; one entry per active row in every tensor.

    tcache / dcache   one DynamicCache per model for the whole run
    tmask / dmask     (b, L) per cache slot: 1 = token, 0 = hole (a rejected draft, or left padding)
    rows              (b,) index into `prompts`
    pending           (b,) the last token, not yet in either cache
    n_seq             (b,) real tokens so far, pending included
    unfed             (b,) x_k of the last round: when all k drafts were accepted (unfed_valid)
                      it is in the target's cache but not the draft's, which fed
                      [pending, x_1..x_{k-1}]; the next round's first draft call feeds
                      [unfed or a hole, pending]
    """

    def __init__(self, device):
        self.device = device
        self.tcache, self.dcache = DynamicCache(), DynamicCache()
        self.tmask = self.dmask = torch.zeros(0, 0, dtype=torch.long, device=device)  # (0, 0)
        self.rows, self.pending, self.n_seq, self.unfed = (
            torch.zeros(0, dtype=torch.long, device=device) for _ in range(4))  # (b,) each, b = 0
        self.unfed_valid = torch.zeros(0, dtype=torch.bool, device=device)  # (b,)

    def __len__(self) -> int:
        return self.rows.numel()

    def admit(self, target, draft, prompts, new: list[int]):
        """Prefill prompts[new] alone (every token but the last, which becomes the pending token),
        then join their caches to the batch's, left-padding the narrower with holes."""
        ids, mask = kv_cache.left_pad([prompts[r][:-1] for r in new], self.device)  # (m, P-1)
        new_tcache, new_dcache = DynamicCache(), DynamicCache()
        if ids.shape[1] > 0:  # P - 1 may be 0
            positions = (mask.cumsum(1) - 1).clamp(min=0)  # (m, P-1)
            kv_cache.forward(target, ids, mask, positions, new_tcache, logits_to_keep=1)
            kv_cache.forward(draft, ids, mask, positions, new_dcache, logits_to_keep=1)
        self.tcache, self.tmask = kv_cache.join(self.tcache, self.tmask, new_tcache, mask)
        self.dcache, self.dmask = kv_cache.join(self.dcache, self.dmask, new_dcache, mask)

        def as_tensor(values):
            return torch.tensor(values, dtype=torch.long, device=self.device)

        # every per-row tensor grows from (b,) to (b + m,)
        self.rows = torch.cat([self.rows, as_tensor(new)])
        self.pending = torch.cat([self.pending, as_tensor([prompts[r][-1] for r in new])])
        self.n_seq = torch.cat([self.n_seq, as_tensor([len(prompts[r]) for r in new])])
        self.unfed = torch.cat([self.unfed, as_tensor([0] * len(new))])  # no x_k yet: a hole is fed
        self.unfed_valid = torch.cat([self.unfed_valid, torch.zeros(len(new), dtype=torch.bool,
                                                                    device=self.device)])

    def draft(self, model, k: int, rule: Sampling, check: bool = False):
        """Step 1: draft x_1..x_k from q, one call each (the first also feeds last round's x_k, or a
        hole). check: refuse non-finite logits of the first call (check_logits).
        Returns drafts (b, k) and q (b, k, V)."""
        b, n_seq = len(self), self.n_seq
        one = torch.ones(b, 1, dtype=torch.long, device=self.device)  # (b, 1) mask of a real token
        x = torch.stack([self.unfed, self.pending], 1)  # (b, 2)
        valid = torch.cat([self.unfed_valid.long()[:, None], one], 1)  # (b, 2)
        positions = torch.stack([(n_seq - 2).clamp(min=0), n_seq - 1], 1)  # (b, 2)
        drafts, qs = [], []
        for i in range(k):
            self.dmask = torch.cat([self.dmask, valid], 1)  # (b, L + x's width): the slots x fills
            logits = kv_cache.forward(model, x, self.dmask, positions, self.dcache,
                                      logits_to_keep=1)[:, -1]  # (b, V')
            if check and i == 0:
                check_logits(logits[..., :rule.vocab_size], model, "draft")
            q_i = rule.probs(logits)  # (b, V)
            x_i = rule.pick(q_i)  # (b,)
            drafts.append(x_i)
            qs.append(q_i)
            x, valid, positions = x_i[:, None], one, (n_seq + i)[:, None]  # (b, 1) each
        return torch.stack(drafts, 1), torch.stack(qs, 1)  # (b, k), (b, k, V)

    def score_with_target(self, model, drafts: torch.Tensor) -> torch.Tensor:
        """Step 2: one target call over [pending, x_1..x_k] (b, k+1) -> its logits (b, k+1, V'),
        i.e. p_1..p_{k+1} before processing. Every slot is valid until keep_accepted."""
        b, k = drafts.shape
        x = torch.cat([self.pending[:, None], drafts], 1)  # (b, k+1)
        positions = self.n_seq[:, None] - 1 + torch.arange(k + 1, device=self.device)  # (b, k+1)
        self.tmask = torch.cat([self.tmask, torch.ones(b, k + 1, dtype=torch.long,
                                                       device=self.device)], 1)  # (b, L + k + 1)
        return kv_cache.forward(model, x, self.tmask, positions, self.tcache)  # (b, k+1, V')

    def keep_accepted(self, drafts: torch.Tensor, n: torch.Tensor, t: torch.Tensor):
        """n (b,) drafts accepted, t (b,) the next token: the cache slots of the rejected drafts
        become holes, t becomes the pending token."""
        k = drafts.shape[1]
        j = torch.arange(k + 1, device=self.device)  # (k+1,)
        self.tmask[:, -(k + 1):] = (j[None] <= n[:, None]).long()  # [pending, x_1..x_k]: up to x_n
        self.dmask[:, -k:] = (j[None, :k] <= n[:, None]).long()  # [pending, x_1..x_{k-1}]: to x_n
        self.unfed, self.unfed_valid = drafts[:, -1], n == k
        self.pending, self.n_seq = t, self.n_seq + n + 1

    def keep_rows(self, kept: torch.Tensor):
        """Evict every row but kept (b',) (positions in the batch; may be empty)."""
        for cache in (self.tcache, self.dcache):
            cache.batch_select_indices(kept)
        (self.tmask, self.dmask, self.rows, self.pending, self.n_seq, self.unfed,
         self.unfed_valid) = (v[kept] for v in (self.tmask, self.dmask, self.rows, self.pending,
                                                self.n_seq, self.unfed, self.unfed_valid))

    def compact(self):
        """Compact each cache whose slots are more than half holes."""
        # both checks in one GPU sync
        t_valid, d_valid = torch.stack([self.tmask.sum(1).max(), self.dmask.sum(1).max()]).tolist()
        if self.tmask.shape[1] > 2 * t_valid:
            self.tmask = kv_cache.compact(self.tcache, self.tmask)
        if self.dmask.shape[1] > 2 * d_valid:
            self.dmask = kv_cache.compact(self.dcache, self.dmask)


RECORD_KEYS = ("row", "position", "accepted", "teacher_entropy", "teacher_entropy_tempered",
               "acceptance_prob")


class SpecMetrics:
    """Per original row (index into `prompts`): the generated ids and the counts of the module
    docstring, filled by index_add_ as rows progress; with record=True the per-draft records
    (teacher_entropy_tempered at `temperature`)."""

    def __init__(self, B: int, gamma: int, max_new_tokens: int, device, record: bool,
                 temperature: float = 1.0):
        # gamma + 1 spare columns, so a round writes its whole block without a boolean-mask gather
        # (which would wait for the GPU): tokens past a row's count are overwritten later or cut
        self.out = torch.zeros(B, max_new_tokens + gamma + 1, dtype=torch.long,
                               device=device)  # (B, max_new_tokens + gamma + 1)
        self.n_gen, self.drafted, self.accepted, self.target_calls, self.draft_calls = (
            torch.zeros(B, dtype=torch.long, device=device) for _ in range(5))  # (B,) each
        self.tested = torch.zeros(B, dtype=torch.long, device=device)  # (B,)
        self.beta_sum = torch.zeros(B, device=device)  # over tested positions (alpha)
        self.beta_sum_drafted = torch.zeros(B, device=device)  # over counted (alpha_all_drafted)
        self.pos_tested = torch.zeros(B, gamma, dtype=torch.long, device=device)  # (B, gamma)
        self.pos_accepted = torch.zeros(B, gamma, dtype=torch.long, device=device)  # (B, gamma)
        self.start = torch.zeros(B, dtype=torch.float64)  # seconds until each row entered the batch
        self.finish = torch.zeros(B, dtype=torch.float64)  # seconds until each row finished
        self.batched_target_calls = self.batched_draft_calls = 0
        self.round_rows, self.round_emitted = [], []  # per round: rows (b,), tokens emitted (b,)
        self.temperature = temperature
        self.recs = {key: [] for key in RECORD_KEYS} if record else None

    def add(self, rows, emit, e, counted, acc, p, q, t_logits):
        """One round of the rows (b,): emit (b, k+1) of which the first e (b,) count, counted / acc
        (b, k), p (b, k+1, V), q (b, k, V), t_logits (b, k+1, V) the target's logits before
        processing."""
        b, k = counted.shape
        g = self.n_gen[rows]  # (b,) tokens generated before this round
        j = torch.arange(k + 1, device=rows.device)  # (k+1,)
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
        if self.recs is not None:  # (b, k)[counted] -> (n_counted,): rows, then positions
            i = torch.arange(1, k + 1, device=rows.device)  # draft positions 1..k
            self.recs["row"].append(rows[:, None].expand(b, k)[counted])
            self.recs["position"].append(i[None].expand(b, k)[counted])
            self.recs["accepted"].append(acc[counted])
            self.recs["teacher_entropy"].append(entropy(p[:, :k])[counted])
            # the tempered p before top-k / top-p: continuous, where the processed H is often 0
            self.recs["teacher_entropy_tempered"].append(
                tempered_entropy(t_logits[:, :k], self.temperature)[counted])
            self.recs["acceptance_prob"].append(beta[counted])

    def accept_lengths(self) -> list[list[int]]:
        """Per original row, the tokens each of its target calls emitted, in round order (two
        transfers)."""
        out = [[] for _ in range(self.n_gen.numel())]
        if self.round_rows:
            for row, n in zip(torch.cat(self.round_rows).tolist(),
                              torch.cat(self.round_emitted).tolist()):
                out[row].append(n)
        return out

    def stats(self, wall: float) -> dict:
        """The metrics of the module docstring, per row and pooled over the batch, but for the rows'
        accept_lengths; wall: the call's seconds."""
        counts = {"generated": self.n_gen, "drafted": self.drafted, "tested": self.tested,
                  "accepted": self.accepted, "beta_sum": self.beta_sum,
                  "beta_sum_drafted": self.beta_sum_drafted, "pos_tested": self.pos_tested,
                  "pos_accepted": self.pos_accepted, "target_calls": self.target_calls,
                  "draft_calls": self.draft_calls}
        c = {key: v.cpu() for key, v in counts.items()}  # (B,) or (B, gamma) each
        start, finish = self.start, self.finish
        per_row = [_summary({key: v[r] for key, v in c.items()},
                            (float(finish[r]) or wall) - float(start[r]))
                   for r in range(len(finish))]
        stats = _summary({key: v.sum(0) for key, v in c.items()}, wall)
        stats["target_calls"] = self.batched_target_calls
        stats["draft_calls"] = self.batched_draft_calls
        stats["per_row"] = per_row
        return stats

    def result(self, wall: float) -> GenerationResult:
        tokens = [row[:n] for row, n in zip(self.out.tolist(), self.n_gen.tolist())]  # 2 transfers
        stats = self.stats(wall)
        for row, lengths in zip(stats["per_row"], self.accept_lengths()):
            row["accept_lengths"] = lengths
        records = None
        if self.recs is not None:
            records = {key: (torch.cat(v).cpu() if v else torch.zeros(0))
                       for key, v in self.recs.items()}
            records["row"], records["position"] = records["row"].long(), records["position"].long()
            records["accepted"] = records["accepted"].bool()
            for key in ("teacher_entropy", "teacher_entropy_tempered", "acceptance_prob"):
                records[key] = records[key].float()
            with torch.inference_mode(False):  # ordinary tensors: inference tensors refuse in-place
                records = {key: v.clone() for key, v in records.items()}
        return GenerationResult(tokens, stats, records)


def _summary(r: dict, seconds: float) -> dict:
    """The stats of one row, or of the batch: r holds SpecMetrics' counters of that row, or summed
    over the rows."""
    gen, d, t, a, tc, dc = (int(r[key]) for key in ("generated", "drafted", "tested", "accepted",
                                                    "target_calls", "draft_calls"))
    return {"generated": gen, "drafted": d, "tested": t, "accepted": a,
            "acceptance_rate": _rate(a, d),
            "alpha": _rate(float(r["beta_sum"]), t),
            "alpha_all_drafted": _rate(float(r["beta_sum_drafted"]), d),
            "mean_accepted_length": _rate(gen, tc),
            "per_position_acceptance": [_rate(x, y) for x, y in zip(r["pos_accepted"].tolist(),
                                                                     r["pos_tested"].tolist())],
            "per_position_tested": [int(y) for y in r["pos_tested"].tolist()],
            "target_calls": tc, "draft_calls": dc, "wall_time_s": seconds,
            "tokens_per_s": _rate(gen, seconds)}


def _rate(num: float, den: float) -> float:
    return num / den if den else float("nan")


# ------------------------------------------------------------------ plain sampling (the baseline)

@torch.inference_mode()
def autoregressive_generate(model, prompts, *, max_new_tokens=128, temperature=1.0, top_p=1.0,
                            top_k=0, eos_token_id=None, seed=None, generator=None,
                            vocab_size=None) -> GenerationResult:
    """Sample continuations of `prompts` token by token from `model` (same sampling rules, left
    padding, KV cache, several stop ids, finished rows evicted). Pass a torch.Generator for
    reproducibility, or a list of one per prompt: each row then samples from its own generator,
    exactly as it would alone, whichever prompts share its batch."""
    check_args([model], prompts, max_new_tokens, temperature, top_k, top_p, vocab_size=vocab_size)
    per_row = isinstance(generator, (list, tuple))
    if per_row and len(generator) != len(prompts):
        raise ValueError(f"generator: a list needs one torch.Generator per prompt, got "
                         f"{len(generator)} for {len(prompts)} prompts")
    reuse_freed_memory()
    t0 = time.perf_counter()
    device = model.device
    gen = make_generator(seed, generator, device)
    V = shared_vocab([model], vocab_size)
    stop_ids = torch.tensor(resolve_stop_ids(model, eos_token_id), dtype=torch.long,
                            device=device)  # (n_stop,)
    B = len(prompts)
    out = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)  # (B, max_new_tokens)
    n_gen = torch.zeros(B, dtype=torch.long, device=device)  # (B,)
    finish = torch.zeros(B, dtype=torch.float64)  # (B,) seconds until each row finished
    calls = torch.zeros(B, dtype=torch.long, device=device)  # (B,)
    batched_calls = 0

    cache = DynamicCache()
    x, mask = kv_cache.left_pad(prompts, device)  # (B, T)
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # (B, T)
    n_seq = mask.sum(1)  # (B,) real tokens so far
    rows = torch.arange(B, device=device)  # (b,) the rows still generating
    while max_new_tokens > 0 and rows.numel() > 0:
        logits = kv_cache.forward(model, x, mask, positions, cache,
                                  logits_to_keep=1)[:, -1, :V]  # (b, V)
        if batched_calls == 0:  # where sampling starts (check_logits)
            check_logits(logits, model, "sampling")
        probs = process_logits(logits, temperature, top_k, top_p)  # (b, V)
        batched_calls += 1
        calls.index_add_(0, rows, torch.ones_like(rows))
        t = probs.argmax(-1) if temperature == 0 else sample(
            probs, [gen[r] for r in rows.tolist()] if per_row else gen)  # (b,)
        out[rows, n_gen[rows]] = t
        n_gen.index_add_(0, rows, torch.ones_like(rows))
        done = torch.isin(t, stop_ids) | (n_gen[rows] >= max_new_tokens)  # (b,)
        if done.any():
            finish[rows[done].cpu()] = time.perf_counter() - t0
            keep = (~done).nonzero().squeeze(1)  # (b',)
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
    stats = _ar_summary(n_gen.sum(), batched_calls, wall)
    stats["per_row"] = [_ar_summary(n_gen[r], calls[r], float(finish[r]) or wall) for r in range(B)]
    return GenerationResult(tokens, stats)


def _ar_summary(generated, calls, seconds: float) -> dict:
    """autoregressive_generate's stats of the batch or of one row: tokens, model calls, time."""
    return {"generated": int(generated), "target_calls": int(calls), "wall_time_s": seconds,
            "tokens_per_s": _rate(int(generated), seconds)}
