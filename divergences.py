"""Token-level divergences between a teacher (target) and a student (draft) next-token distribution.

Notation. At every position the two models give logits over one vocabulary of size V; at
temperature T

    p_T = softmax(teacher_logits / T)      the teacher  (= the target p of speculative decoding)
    p_S = softmax(student_logits / T)      the student  (= the draft q of speculative decoding)

and s = log p_S, t = log p_T. Sums run over the vocabulary v. The divergences (`Divergence.kind`):

    fkl   forward KL    KL(p_T || p_S) = sum_v p_T(v) [t(v) - s(v)]            mass-covering
    rkl   reverse KL    KL(p_S || p_T) = sum_v p_S(v) [s(v) - t(v)]            mode-seeking
    jsd   generalized Jensen-Shannon (GKD: Agarwal et al. 2024, "On-Policy Distillation of Language
          Models: Learning from Self-Generated Mistakes", Eq. 1), in TRL's convention (beta = weight
          toward reverse KL):
              M         = beta p_T + (1 - beta) p_S
              JSD(beta) = beta KL(p_T || M) + (1 - beta) KL(p_S || M)
          The formula is 0 at beta = 0 and at beta = 1, so the endpoints are defined as TRL defines
          them: JSD(0) = fkl, JSD(1) = rkl. (The limits behave like that after rescaling:
          JSD(beta) / beta -> fkl as beta -> 0 and JSD(beta) / (1 - beta) -> rkl as beta -> 1.)
    tvd   total variation  TVD = 1/2 sum_v |p_T(v) - p_S(v)| = 1 - sum_v min(p_T(v), p_S(v)),
          and sum_v min(p_T, p_S) is exactly the probability that speculative decoding accepts a
          drafted token (Leviathan et al. 2023, Section 3), which is why DistillSpec (Zhou et al.
          2024, "DistillSpec: Improving Speculative Decoding via Knowledge Distillation") distills
          with TVD: alpha = 1 - TVD.
    ajsd  entropy-adaptive JSD (ours). Per position, beta follows the teacher's entropy
          H = -sum_v p_T t:
              beta(H) = floor + (1 - floor) exp(-H / scale)      (ajsd_floor, ajsd_scale in nats)
          beta = 1 (reverse KL, mode-seeking) where the teacher is certain (H = 0) and decays to
          `floor` (0.5 = symmetric JSD by default) where it is uncertain; monotone decreasing in H.
          The JSD is divided by its natural size beta (1 - beta) (near p_T = p_S,
          JSD(beta) ~ beta (1 - beta) chi^2 / 2):
              AJSD = JSD(beta) / (beta (1 - beta))
                   = KL(p_T || M) / (1 - beta) + KL(p_S || M) / beta,
          which is continuous in beta, equals fkl at beta = 0 and rkl at beta = 1. Without the
          division, the confident tokens (beta -> 1) would not become reverse KL, they would just
          get a weight near 0. With a constant beta it is the fixed-beta jsd times the constant
          1 / (beta (1 - beta)): the same minimiser and gradient direction (ajsd_scale=0 makes
          beta = ajsd_floor everywhere).
          Caveat, as for any JSD: it is bounded. For a near-certain teacher each unit of student
          mass on a token the teacher rules out costs at most -log(1 - beta) ~ log(2 scale / H)
          nats, not rkl's unbounded log(p_S / p_T): mode-seeking like rkl, with a capped penalty;
          exactly rkl only at H = 0.
    nla   negative log acceptance (LK losses, arXiv 2602.23881: "alpha"):  -log alpha,
              alpha = sum_v min(p_T(v), p_S(v)) = 1 - TVD,
          the probability that speculative decoding accepts a token drafted from p_S at this
          position. It is computed in log space, log alpha = logsumexp_v min(t(v), s(v)), so a tiny
          alpha (disjoint-looking distributions, alpha ~ e^-1000 at logit std 1000) keeps its
          relative precision and -log alpha is exact.
    lk    the KL -> TV hybrid of LK losses ("lambda"):  w KL(p_T || p_S) + (1 - w) (1 - alpha),
              w = lk_scale exp(-lk_decay mean(alpha))   (lk_scale = lk_decay = 1 by default, as
                                                         SpecForge's)
          where mean(alpha) is the mean of alpha over the positions of the call (divergence_sum's
          masked positions, every position for token_divergence), treated as a constant (no
          gradient flows through w). While the draft is poor (alpha ~ 0) the loss is mostly forward
          KL; as it improves, TV takes over. w couples the positions of a call: the sweep first
          computes alpha at every kept position (a values-only pass over the blocks: two
          log-softmaxes, a min and a logsumexp per entry, about half a loss pass), then the loss
          with w fixed. (1 - alpha) is computed as tvd's 1/2 sum_v |p_T - p_S|, which keeps its
          precision where alpha ~ 1.
    Acceptance statistic: divergence_sum(return_alpha=True) also returns the sum of alpha over the
    masked positions (any kind; from the log-probs of the loss's own sweep, at the loss temperature,
    without top-p).
A `Divergence` names one of them with its options (beta, temperature, the ajsd and lk parameters);
every loss function takes one, and returns its sums as `LossSums(total, teacher_entropy, alpha)`.

Gradients (with respect to the student logits). Every divergence D here depends on the student only
through p_S = softmax(z / T), so by the softmax Jacobian

    dD/dz = (1 / T) p_S * (g - sum_v p_S g),      g = dD/dp_S, the "score" of the divergence:
        fkl  g = -p_T / p_S      rkl  g = s - t + 1      jsd  g = (1 - beta)(s - log M)
        tvd  g = sign(p_S - p_T) / 2                      ajsd g = (s - log M) / beta
        nla  g = -c / alpha                               lk   g = w (-p_T / p_S)
                                                                   + (1 - w) sign(p_S - p_T) / 2
(A constant added to g cancels in g - sum_v p_S g, so the code uses rkl's g as s - t.)
Acceptance. d alpha / d p_S(v) = c(v): min(p_T, p_S) is p_S where p_S < p_T, so c = 1 there and 0
where p_S > p_T. At a tie (s(v) = t(v) exactly, in the computed log-probs) min is not
differentiable; we take c = 1/2, the mean of the two one-sided derivatives (torch.minimum's own
convention, and tvd's: sign(0) = 0). With it, nla's gradient is exactly tvd's divided by alpha, and
lk at w = 0 is exactly tvd. nla's p_S g = -c exp(s - log alpha) is formed from log alpha, so it is
O(1) (each entry <= 1) even where alpha is tiny: the gradient of -log alpha is large only in the
sense that it is not damped by alpha, which is the point of the objective (a KL's or TV's gradient
vanishes as alpha -> 0 along many directions; -log alpha's does not).

The losses use these closed forms instead of autograd: one sweep over blocks of positions computes
the values and the gradient together, so the full (N, V) tensors of log-probabilities, mixtures and
per-vocabulary terms that an autograd graph would keep never exist; only the gradient survives the
sweep (one tensor shaped like the student logits, which backward must return anyway). The teacher is
a constant: no gradient flows into `teacher_logits`.

Numerics. Half-precision logits (float16, bfloat16) are computed in float32 (float64 stays float64).
For every finite logit, of any magnitude and at any temperature, nothing is floored or clipped: the
losses equal a float64 computation to float32's precision (tests/test_divergences.py checks logit
standard deviations up to 1000 against TRL on float64 inputs and the formulas in float64). A gap of
hundreds of nats between two log-probabilities is real: it is where reverse KL's gradient lives when
the student puts mass on a token the teacher all but rules out. Only a -inf logit (a zero
probability, e.g. a top-k-masked teacher) is replaced, after the log-softmax, by a finite stand-in
log-probability, zero_prob_log = log(tiny) (about -87.3 nats in float32, the log of the smallest
normal float). That is a surrogate, stated as such: it keeps every value and gradient finite where
TRL's formula gives NaN, a zero probability still adds (almost exactly) nothing to jsd, tvd or the
side of a KL it weights (0 log 0 = 0), and where a KL is truly infinite (student mass on a token the
teacher rules out, for rkl) it counts ~87 nats per unit of mass instead of infinity -- less than a
finite log-probability below -87.3 would cost, so do not read such rkl values as exact.
alpha = 0 exactly needs disjoint supports, i.e. -inf logits (zero probabilities) on both sides: with
finite logits alpha > 0, and log space holds it exactly however small (an nla of 5000 nats is
computed exactly). With -inf logits the stand-in enters min(s, t) like any log-probability, so a
token one side rules out adds at most tiny to alpha: nothing visible changes where the true alpha is
above V x tiny (~1e-33 in float32 at V = 151936). For disjoint supports nla is then a finite
surrogate: when every token has zero probability under one of the two (and the other's log-prob is
above the stand-in) it is -zero_prob_log - log V (87.3 - log V nats in float32). Its gradient is
finite (each entry of p_S g in [-1, 0]): positive on the student's finite logits, in proportion to
p_S (descent flattens the student on its own support), negative on its stand-ins where the teacher
has mass (those -inf logits cannot move). lk there is w = lk_scale (mean alpha ~ 0) times fkl's
surrogate, plus (1 - w) x 1.
The teacher entropy (teacher_log_entropy, ajsd's beta) is computed as log H, with the top token's
log-probability rebuilt from the others' mass, so a near-certain teacher's tiny H (even below
float32's smallest number) keeps its relative precision, and ajsd's 1 - beta ~ H is never rounded to
0.

bf16 logits are already wrong before any loss reads them. Exact for the logits it is given, a loss
can only be as good as those logits: bf16 keeps 8 bits of mantissa, so a logit of size 10 is off by
up to ~0.03, and the divergence between two close distributions (a good draft, a confident teacher)
drowns in that rounding. Measured at V = 151936 (64 tokens, logits of std 4, T 0.6, forward KL): at
7.8e-6 nats per token the loss read from bf16-rounded logits is 46x too large and its gradient has
cosine 0.32 to the float32 one; at 1.9e-2 it is 8% too large. Hence hidden_divergence_sum: it takes
the hidden states and lm_head weights (bf16 or not, `HiddenAndHead`) and projects them itself in
float32, one block of positions at a time, so the loss of a bf16 model sits at the float32 floor
(the float32 logits' own rounding: ~1e-2 relative at 5e-6 nats, ~1e-5 at 1e-2, gradient cosine
> 0.9999), and neither model's (N, V) logits ever exist. Both paths run the same per-block math
(block_terms): one implementation of every kind.
"""
import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

DIVERGENCES = ("fkl", "rkl", "jsd", "tvd", "ajsd", "nla", "lk")
REDUCTIONS = ("batchmean", "sum", "mean", "none")  # generalized_jsd_loss, as TRL names them
IGNORE_INDEX = -100  # label value that masks a position out, as in TRL and transformers
CHUNK_ELEMENTS = 2**22  # default chunk: about 4M logits (16 MB of float32) per block of positions
HIDDEN_CHUNK_ELEMENTS = 2**22  # hidden_divergence_sum's default block: ~4M logits (16 MB) per model
# its block when a head must be upcast: every block upcasts the heads tile by tile, so a bigger
# block upcasts them fewer times (bf16, V = 151936: 41 vs 100 s per 1024 positions at 55 vs 27
# positions a block; docs/benchmarks.md)
HIDDEN_CHUNK_ELEMENTS_UPCAST = 2**23
HEAD_TILE_ROWS = 8192  # lm_head rows upcast at a time when a head is not in the compute dtype


@dataclass(frozen=True)
class Divergence:
    """One fully specified divergence: which kind (DIVERGENCES), its beta (jsd), the temperature,
    the ajsd parameters and the lk parameters; checked on construction (ValueError naming the
    option). jsd at beta 0 / 1 is fkl / rkl, as in TRL.
    lk_weight: lk's w once the call's mean alpha is known (set by the sweep; None before)."""

    kind: str
    beta: float = 0.5
    temperature: float = 1.0
    ajsd_scale: float = 1.0
    ajsd_floor: float = 0.5
    lk_scale: float = 1.0
    lk_decay: float = 1.0
    lk_weight: float | None = None

    def __post_init__(self):
        if self.kind not in DIVERGENCES:
            raise ValueError(f"kind={self.kind!r} is not one of {DIVERGENCES}")
        beta, temperature = float(self.beta), float(self.temperature)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta={beta} must lie in [0, 1] (0 = forward KL, 1 = reverse KL)")
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature={temperature} must be a finite number > 0")
        if not (float(self.ajsd_scale) >= 0):
            raise ValueError(f"ajsd_scale={self.ajsd_scale} must be >= 0 (nats; 0 = constant "
                             f"beta = ajsd_floor)")
        if not 0.0 <= float(self.ajsd_floor) <= 1.0:
            raise ValueError(f"ajsd_floor={self.ajsd_floor} must lie in [0, 1]")
        for name in ("lk_scale", "lk_decay"):
            x = getattr(self, name)
            if not (float(x) >= 0 and math.isfinite(float(x))):
                raise ValueError(f"{name}={x} must be a finite number >= 0 (lk's "
                                 f"w = lk_scale exp(-lk_decay mean alpha))")
        for name in ("beta", "temperature", "ajsd_scale", "ajsd_floor", "lk_scale", "lk_decay"):
            object.__setattr__(self, name, float(getattr(self, name)))  # frozen: set once, here

    @property
    def formula(self) -> str:
        """The kind whose formula computes it: jsd at beta 0 / 1 is fkl / rkl (TRL's endpoints)."""
        if self.kind == "jsd" and self.beta in (0.0, 1.0):
            return "fkl" if self.beta == 0.0 else "rkl"
        return self.kind


class LossSums(NamedTuple):
    """What a loss sums over its positions: the divergence (differentiable), and the teacher entropy
    H(p_T) and the acceptance alpha = sum_v min(p_T, p_S) at the loss temperature, without top-p
    (constants), each None unless asked for (return_teacher_entropy / return_alpha)."""

    total: torch.Tensor
    teacher_entropy: torch.Tensor | None = None
    alpha: torch.Tensor | None = None


class HiddenAndHead(NamedTuple):
    """One model's side of hidden_divergence_sum: its last hidden states (..., H) (after the final
    norm) and its lm_head weight (V, H) (no bias; a tied head is the embedding matrix). Its logits
    are hidden @ head^T, projected a block of positions at a time, never whole."""

    hidden: torch.Tensor
    head: torch.Tensor


# ---------------------------------------------------------------------------------------- the math
# Every divergence below takes log-probs s (student) and t (teacher), both (n, V), and returns the
# value per position (n,) and, if want_grad, its gradient with respect to z = student_logits / T,
# (n, V).


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16 / bfloat16 -> float32; float32 and float64 unchanged."""
    return torch.promote_types(dtype, torch.float32)


def zero_prob_log(dtype: torch.dtype) -> float:
    """The finite stand-in for log 0 (a -inf logit): log(tiny), about -87.3 nats in float32, -708 in
    float64."""
    return math.log(torch.finfo(dtype).tiny)


def log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) (n, V) -> (n, V) in >= float32; exact for every finite logit, and
    only a -inf (a zero probability, e.g. top-k masking) becomes the finite stand-in
    zero_prob_log(dtype), so products stay finite.

    Finite log-probabilities are never floored: a gap of more than 87 nats is real information
    (reverse KL's gradient lives on exactly such tokens when the student puts mass where the teacher
    all but rules it out)."""
    dtype = compute_dtype(logits.dtype)
    x = logits.to(dtype)
    if temperature != 1.0:  # shift first: the top logits' differences are exact, so dividing them
        x = (x - x.amax(-1, keepdim=True)).div_(temperature)  # rounds relative to the gap, not ~1e3
    logp = torch.log_softmax(x, dim=-1)  # (n, V)
    floor = zero_prob_log(dtype)  # nan stays nan (an all -inf row has no distribution); no +inf
    if logp.requires_grad:
        return logp.nan_to_num(nan=math.nan, neginf=floor)
    return logp.nan_to_num_(nan=math.nan, neginf=floor)  # in place when no autograd


def softmax_backward(p_s: torch.Tensor, p_g: torch.Tensor) -> torch.Tensor:
    """dD/dz = p_S (g - sum_v p_S g) from p_S and p_g = p_S * g, where g = dD/dp_S: the softmax
    Jacobian. (n, V), (n, V) -> (n, V)."""
    return p_g - p_s * p_g.sum(-1, keepdim=True)


def fkl(s, t, want_grad=False):
    """Forward KL(p_T || p_S) = sum_v p_T (t - s), GKD's JSD(0) (Agarwal et al. 2024, Eq. 1 at
    beta = 0 in TRL's convention); gradient p_S - p_T (g = -p_T / p_S)."""
    p_t = t.exp()  # (n, V)
    value = (p_t * (t - s)).sum(-1)  # (n,)
    return value, (s.exp() - p_t if want_grad else None)


def rkl(s, t, want_grad=False):
    """Reverse KL(p_S || p_T) = sum_v p_S (s - t), GKD's JSD(1) (Agarwal et al. 2024, Eq. 1 at
    beta = 1 in TRL's convention); gradient p_S (s - t - KL) (g = s - t + 1)."""
    p_s = s.exp()  # (n, V)
    p_g = p_s * (s - t)  # (n, V)
    value = p_g.sum(-1)  # (n,)
    return value, (softmax_backward(p_s, p_g) if want_grad else None)


def mixture_log_probs(s, t, beta):
    """log M for M = beta p_T + (1 - beta) p_S, in log space (0 < beta < 1). (n, V) -> (n, V)."""
    return torch.logaddexp(t + math.log(beta), s + math.log1p(-beta))


def jsd(s, t, beta, want_grad=False):
    """GKD's generalized JSD (Agarwal et al. 2024, Eq. 1), in TRL's convention:
    beta KL(p_T || M) + (1 - beta) KL(p_S || M), M = beta p_T + (1 - beta) p_S, 0 < beta < 1;
    gradient with g = (1 - beta)(s - log M)."""
    m = mixture_log_probs(s, t, beta)  # (n, V)
    p_s = s.exp()  # (n, V)
    p_gap = p_s * (s - m)  # (n, V)
    value = beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * p_gap.sum(-1)  # (n,)
    return value, ((1 - beta) * softmax_backward(p_s, p_gap) if want_grad else None)


def tvd(s, t, want_grad=False):
    """TVD = 1/2 sum_v |p_T - p_S| = 1 - sum_v min(p_T, p_S) = 1 - alpha: minimising it maximises
    the acceptance alpha (Leviathan et al. 2023, Section 3), DistillSpec's argument for it (Zhou et
    al. 2024); (sub)gradient with g = sign(p_S - p_T) / 2."""
    p_s = s.exp()  # (n, V)
    diff = p_s - t.exp()  # (n, V)
    value = 0.5 * diff.abs().sum(-1)  # (n,)
    return value, (softmax_backward(p_s, 0.5 * p_s * diff.sign()) if want_grad else None)


def teacher_log_entropy(t: torch.Tensor) -> torch.Tensor:
    """log H(p_T), H = -sum_v p_T log p_T in nats, from teacher LOG-probs t (..., V) -> (...,);
    exact in float32 even where H itself is below the smallest float (a near-certain teacher:
    H ~ 1e-50 at logit gaps of 100+).

    H = sum over the other tokens of p_v (-t_v)  +  (1 - q)(-log(1 - q)) for the top token, with q =
    the other tokens' mass. The top token's log-prob is taken as log(1 - q), not read off t: float32
    log_softmax knows it only to ~6e-8 absolute (the rounding of 1 + eps), which is all of H when
    H < 1e-6. Both parts are summed in log space (log p_v + log(-t_v)), so nothing underflows.
    """
    top = t.argmax(-1, keepdim=True)  # (..., 1)
    others = t.scatter(-1, top, -math.inf)  # (..., V): the top token left out
    log_q = torch.logsumexp(others, -1)  # (...,) log of the others' mass
    log_rest = torch.logsumexp((t + torch.log(-t)).scatter_(-1, top, -math.inf),
                               -1)  # (...,) log sum_v p_v (-t_v)
    q = log_q.exp()  # may be subnormal (imprecise) below 1e-38: the series branch needs only O(q^2)
    log1p_minus_q = torch.log1p(-q.clamp_max(1.0))  # q <= 1 - 1/V; the clamp only guards rounding
    exact = log1p_minus_q + torch.log(-log1p_minus_q)  # log[(1 - q)(-log(1 - q))], for q >= 1e-4
    # (1 - q)(q + q^2/2 + ...) = q (1 - q/2 + O(q^2))
    log_top = torch.where(q < 1e-4, log_q - q / 2, exact)  # (...,)
    return torch.logaddexp(log_rest, log_top)


def teacher_entropy(t: torch.Tensor) -> torch.Tensor:
    """H(p_T) = -sum_v p_T log p_T in nats, from teacher LOG-probs t (..., V) -> (...,).

    The top token's log-prob is rebuilt as log(1 - q) from q = the other tokens' mass, as in
    teacher_log_entropy, so H keeps its relative precision down to float32's smallest normal
    (1e-38); below that it underflows to ~0, which a mean over tokens cannot tell apart (ajsd, which
    divides by ~H, uses teacher_log_entropy instead). Fewer passes than teacher_log_entropy: what
    distill.py logs each step. The losses work in log space (t = log_probs(...), never -inf);
    specdec.entropy is the same H from probabilities p, for the processed (top-k / top-p, possibly
    exactly 0) p of verification."""
    top = t.argmax(-1, keepdim=True)  # (..., 1)
    p = t.exp()  # (..., V)
    terms = p * t  # (..., V)
    q = p.scatter_(-1, top, 0.0).sum(-1, keepdim=True)  # (..., 1): 1 - p* from the small ones
    t_top = torch.log1p(-q.clamp_max(1.0))  # (..., 1)
    return -(terms.scatter_(-1, top, 0.0).sum(-1) + (t_top.exp() * t_top).squeeze(-1))


def ajsd_beta(entropy: torch.Tensor, scale: float = 1.0, floor: float = 0.5):
    """beta(H) = floor + (1 - floor) exp(-H / scale), and 1 - beta computed without cancellation
    (the readable definition, which the tests check ajsd_log_beta against; the loss itself uses
    ajsd_log_beta).

    Returns (beta, 1 - beta), each shaped like `entropy`. scale = 0 gives beta = floor everywhere.
    """
    if scale == 0:
        return torch.full_like(entropy, floor), torch.full_like(entropy, 1 - floor)
    decay = torch.exp(-entropy / scale)
    # (1 - floor)(1 - exp(-H/scale)), exact near H = 0
    one_minus_beta = -(1 - floor) * torch.expm1(-entropy / scale)
    return floor + (1 - floor) * decay, one_minus_beta


def ajsd_log_beta(log_entropy: torch.Tensor, scale: float = 1.0, floor: float = 0.5):
    """(log beta, log(1 - beta)) of ajsd_beta from log H: exact where beta is within 1e-45 of 1 (an
    H that underflows), or of 0 (floor 0, large H). log(1 - beta) = log(1 - floor) + log(x)
    + log((1 - e^-x) / x), x = H / scale; log beta = log1p(-(1 - beta)) near 1,
    log(floor + (1 - floor) e^-x) elsewhere."""
    if scale == 0:
        return (torch.full_like(log_entropy, _log(floor)),
                torch.full_like(log_entropy, _log(1 - floor)))
    log_x = log_entropy - math.log(scale)
    x = log_x.exp()  # may underflow (or be subnormal): the series branch needs it only to O(x^2)
    log_ratio = torch.where(x < 1e-4, -x / 2, torch.log(-torch.expm1(-x) / x))  # log((1-e^-x)/x)
    log_one_minus_beta = _log(1 - floor) + log_x + log_ratio
    one_minus_beta = log_one_minus_beta.exp()
    far = torch.logaddexp(torch.full_like(x, _log(floor)), _log(1 - floor) - x)  # exact unless ~1
    log_beta = torch.where(one_minus_beta < 0.5, torch.log1p(-one_minus_beta.clamp_max(1.0)), far)
    return log_beta, log_one_minus_beta


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def mixture_term(log_p, log_k, log_one_minus_k, d, p, p_other):
    """-p log(1 - k + k e^-d) / k per vocabulary entry (n, V), for any k in [0, 1] (log k,
    log(1 - k) given) and any d.

    With p = p_T, p_other = p_S, d = t - s, k = 1 - beta this is
    p_T a = -p_T log(M / p_T) / (1 - beta); with p = p_S, p_other = p_T, d = s - t, k = beta it is
    p_S b. Writing y = k (e^-d - 1):
      |y| < 1/2:  -(p / k) log1p(y) = (p - p_other) log1p(y) / y   (-> p - p_other as k -> 0, the
                  limit; no division by a tiny or zero k, and p e^-d = p_other is never formed by
                  multiplication);
      otherwise:  -exp(log p - log k) logaddexp(log(1 - k), log k - d)   (M is then far from p: no
                  cancellation, and p / k <= 2 p_other + p cannot overflow).
    """
    log_abs_u = torch.where(d < 0, torch.log(-torch.expm1(d)) - d,
                            torch.log(-torch.expm1(-d)))  # (n, V) log|e^-d - 1|
    y = torch.exp(log_k + log_abs_u).copysign(-d)  # (n, V); +-inf where M is far from p (far)
    small = y.abs() < 0.5
    r = torch.where(y.abs() < 1e-4, 1 - y / 2, torch.log1p(y) / y)  # log1p(y) / y; series near 0
    far = -torch.exp(log_p - log_k) * torch.logaddexp(log_one_minus_k, log_k - d)  # (n, V)
    return torch.where(small, (p - p_other) * r, far)


def ajsd(s, t, scale=1.0, floor=0.5, want_grad=False, log_entropy=None):
    """KL(p_T || M) / (1 - beta) + KL(p_S || M) / beta with beta = ajsd_beta(H(p_T)) per position
    (ours: GKD's generalized JSD, Agarwal et al. 2024, Eq. 1, with a per-token beta, divided by
    beta (1 - beta)).

    Written as sum_v p_T a + sum_v p_S b with a = -log(M/p_T) / (1 - beta), b = -log(M/p_S) / beta,
    where both log-ratios come from d = t - s directly (never as a difference of two large logs) and
    beta enters only as log beta, log(1 - beta) (ajsd_log_beta, from log H): dividing by a tiny
    1 - beta (a near-certain teacher, even one whose H underflows float32) stays exact, and at
    1 - beta = 0 (beta = 0) the terms take their limits p_T - p_S (p_S - p_T) without a special case
    (mixture_term). Gradient with g = b = (s - log M) / beta.
    log_entropy: log H(p_T) per position (n,) if the caller has it already (else computed from t).
    """
    if log_entropy is None:
        log_entropy = teacher_log_entropy(t)  # (n,)
    log_beta, log_one_minus_beta = (x.unsqueeze(-1) for x in ajsd_log_beta(log_entropy, scale,
                                                                            floor))  # (n, 1) each
    d = t - s  # (n, V); finite (t, s are), of any size
    p_t, p_s = t.exp(), s.exp()  # (n, V) each
    p_a = mixture_term(t, log_one_minus_beta, log_beta, d, p_t, p_s)  # (n, V) p_T a
    p_b = mixture_term(s, log_beta, log_one_minus_beta, -d, p_s, p_t)  # (n, V) p_S b
    value = p_a.sum(-1) + p_b.sum(-1)  # (n,)
    return value, (softmax_backward(p_s, p_b) if want_grad else None)


def log_acceptance(s, t):
    """log alpha = log sum_v min(p_S, p_T) = logsumexp_v min(s, t): log-probs (n, V) -> (n,).
    alpha is speculative decoding's acceptance probability (Leviathan et al. 2023, Section 3).
    Relative precision is kept for any alpha (no probability is formed before the logsumexp)."""
    return torch.logsumexp(torch.minimum(s, t), -1)


def acceptance(s, t):
    """alpha = sum_v exp(min(s, t)) = 1 - TVD (Leviathan et al. 2023, Section 3) from log-probs
    (n, V) -> (n,): the statistic (train_alpha, lk's mean). min(s, t) <= 0, so no shift is needed
    (three passes instead of logsumexp's six); an alpha below float32's smallest normal (~1e-38)
    loses its relative precision, which a mean over tokens cannot see (nla's loss, which needs it,
    uses log_acceptance)."""
    return torch.minimum(s, t).exp_().sum(-1)


def acceptance_weights(s, t, log_alpha):
    """c(v) p_S(v) / alpha, (n, V): c = d alpha / d p_S = 1 where s < t, 1/2 at a tie s = t, 0 where
    s > t. Formed as exp(s - log alpha) (each entry <= 1 where c > 0, since there
    p_S = min(p_S, p_T) <= alpha)."""
    ratio = torch.exp(s - log_alpha.unsqueeze(-1))  # (n, V); may overflow where s > t: not selected
    return torch.where(s < t, ratio, torch.where(s == t, 0.5 * ratio, 0.0))


def nla(s, t, want_grad=False):
    """-log alpha, alpha = sum_v min(p_S, p_T) (LK losses, arXiv 2602.23881: their "alpha"
    objective); gradient with g = -c / alpha (acceptance_weights)."""
    log_alpha = log_acceptance(s, t)  # (n,)
    if not want_grad:
        return -log_alpha, None
    return -log_alpha, softmax_backward(s.exp(), -acceptance_weights(s, t, log_alpha))


def lk(s, t, weight, want_grad=False):
    """w KL(p_T || p_S) + (1 - w)(1 - alpha) (LK losses, arXiv 2602.23881: their "lambda"
    objective) with w = `weight` given (the call's lk_weight); (1 - alpha) as tvd's
    1/2 sum_v |p_T - p_S| (exact near alpha = 1). Gradient: w fkl's + (1 - w) tvd's."""
    kl, g_kl = fkl(s, t, want_grad)
    tv, g_tv = tvd(s, t, want_grad)
    value = weight * kl + (1 - weight) * tv  # (n,)
    return value, (g_kl.mul_(weight).add_(g_tv, alpha=1 - weight) if want_grad else None)


def lk_weight(mean_alpha: float, scale: float = 1.0, decay: float = 1.0) -> float:
    """lk's w = scale exp(-decay mean_alpha) (LK losses, arXiv 2602.23881): the weight of
    KL(p_T || p_S); (1 - w) weighs 1 - alpha."""
    return scale * math.exp(-decay * mean_alpha)


def value_and_grad(s, t, spec: Divergence, want_grad=False, log_entropy=None):
    """Dispatch on the divergence's formula: per-position values (n,) and, if want_grad,
    dD/d(student_logits) (n, V). log_entropy: the teacher's log H(p_T) per position (n,), if the
    caller computed it (ajsd uses it)."""
    formula = spec.formula  # jsd at beta 0 / 1 is fkl / rkl
    if formula == "fkl":
        value, grad = fkl(s, t, want_grad)
    elif formula == "rkl":
        value, grad = rkl(s, t, want_grad)
    elif formula == "jsd":
        value, grad = jsd(s, t, spec.beta, want_grad)
    elif formula == "tvd":
        value, grad = tvd(s, t, want_grad)
    elif formula == "ajsd":
        value, grad = ajsd(s, t, spec.ajsd_scale, spec.ajsd_floor, want_grad, log_entropy)
    elif formula == "nla":
        value, grad = nla(s, t, want_grad)
    elif formula == "lk":
        if spec.lk_weight is None:
            raise ValueError("lk needs spec.lk_weight (w from the call's mean alpha): use "
                             "with_lk_weight first")
        value, grad = lk(s, t, spec.lk_weight, want_grad)
    else:
        raise ValueError(f"kind={spec.kind!r} is not one of {DIVERGENCES}")
    if grad is not None and spec.temperature != 1.0:
        grad = grad.div_(spec.temperature)  # z = logits / T
    return value, grad


def gjsd_terms(s, t, beta):
    """TRL's per-vocabulary terms of the generalized JSD (GKD, Agarwal et al. 2024, Eq. 1; TRL's
    reduction="none"): (..., V) -> (..., V)."""
    if beta == 0:
        return t.exp() * (t - s)
    if beta == 1:
        return s.exp() * (s - t)
    m = mixture_log_probs(s, t, beta)  # (..., V)
    return beta * t.exp() * (t - m) + (1 - beta) * s.exp() * (s - m)


# --------------------------------------------------------------------------- the memory-lean engine
def block_terms(student_logits, teacher_logits, spec: Divergence, want_grad=False,
                want_entropy=False, want_alpha=False):
    """The math of one block of positions, shared by every path (logits or hidden states): logits
    (n, V) -> values (n,), dD/d(student logits) (n, V) if want_grad (else None), the teacher entropy
    H(p_T) (n,) and the acceptance alpha (n,) at the loss temperature if want_entropy / want_alpha
    (else None). Computed in >= float32 (compute_dtype). lk needs spec.lk_weight (with_lk_weight /
    the hidden path set it first)."""
    s, t = log_probs(student_logits, spec.temperature), log_probs(teacher_logits,
                                                                  spec.temperature)  # (n, V) each
    del student_logits, teacher_logits  # the caller's (n, V) block can go once the log-probs exist
    log_h = teacher_log_entropy(t) if spec.kind == "ajsd" else None  # (n,): H below 1e-38 too
    values, grad = value_and_grad(s, t, spec, want_grad, log_h)  # (n,), (n, V) or None
    entropy = alpha = None
    if want_entropy:
        entropy = log_h.exp() if log_h is not None else teacher_entropy(t)  # (n,)
    if want_alpha:  # nla's value is -log alpha already
        alpha = (-values).exp() if spec.kind == "nla" else acceptance(s, t)  # (n,)
    return values, grad, entropy, alpha


def block_alpha(student_logits, teacher_logits, temperature):
    """alpha (n,) of one block of logits (n, V) at the temperature: lk's values-only first pass."""
    return acceptance(log_probs(student_logits, temperature),
                      log_probs(teacher_logits, temperature))


def _row_blocks(student, teacher, size, start=0):
    """Yield (first row, student block, teacher block): aligned views (n, V) of <= size positions;
    never a copy.

    Inputs are (..., V); rows are numbered in row-major order of the leading axes. A non-contiguous
    input such as logits[:, :-1] cannot be flattened without a copy, so it is walked one leading
    index at a time.
    """
    try:
        s, t = student.view(-1, student.shape[-1]), teacher.view(-1, teacher.shape[-1])  # (N, V)
    except RuntimeError:
        for a, b in zip(student.unbind(0), teacher.unbind(0)):
            yield from _row_blocks(a, b, size, start)
            start += a.numel() // a.shape[-1]
        return
    for i in range(0, s.shape[0], size):
        yield start + i, s[i : i + size], t[i : i + size]


def _blocks_in_mask(student, teacher, mask, size):
    """The row blocks restricted to the positions where mask (N,) is True: (rows, student, teacher).

    rows is a slice when the whole block is kept (the block is then used as is), else an index
    tensor of the kept rows, which are gathered (a copy of at most one block). Fully masked blocks
    are skipped.
    """
    for start, s_blk, t_blk in _row_blocks(student, teacher, size):
        keep = mask[start : start + s_blk.shape[0]]  # (n,)
        if keep.all():
            yield slice(start, start + s_blk.shape[0]), s_blk, t_blk
        elif keep.any():
            yield start + keep.nonzero().squeeze(-1), s_blk[keep], t_blk[keep]


def _acceptances(student, teacher, mask, spec, chunk_size):
    """alpha per position (N,) at the loss temperature, 0 where mask (N,) is False: a values-only
    pass."""
    alphas = torch.zeros(student.numel() // student.shape[-1], dtype=compute_dtype(student.dtype),
                         device=student.device)  # (N,)
    for rows, s_blk, t_blk in _blocks_in_mask(student, teacher, mask, chunk_size):
        alphas[rows] = block_alpha(s_blk, t_blk, spec.temperature)
    return alphas


def lk_spec(spec, alpha_sum: float, n_kept: int):
    """spec with lk's w fixed from the mean alpha (alpha_sum / n_kept; no kept position:
    w = lk_scale, unused)."""
    w = lk_weight(alpha_sum / max(n_kept, 1), spec.lk_scale, spec.lk_decay)
    return replace(spec, lk_weight=w)


def with_lk_weight(student, teacher, mask, spec, chunk_size):
    """spec with lk's w fixed from the mean alpha over the kept positions (a first, values-only
    pass), and the alphas (N,) of that pass; other kinds (or a spec whose w is set): unchanged,
    alphas None."""
    if spec.kind != "lk" or spec.lk_weight is not None:
        return spec, None
    alphas = _acceptances(student, teacher, mask, spec, chunk_size)  # (N,)
    return lk_spec(spec, float(alphas.sum()), int(mask.sum())), alphas


def _sweep(student, teacher, mask, spec, chunk_size, want_grad, want_entropy=False,
           want_alpha=False):
    """One pass over the blocks: per-position values (N,), dD/d(student logits) (..., V) if
    want_grad, the teacher entropy H(p_T) per position (N,) at the loss temperature if want_entropy,
    and the acceptance alpha per position (N,) at the loss temperature if want_alpha (else None). lk
    needs spec.lk_weight set (with_lk_weight).

    Masked positions get value 0, gradient 0, entropy 0 and alpha 0. Per block only a few (n, V)
    float32 temporaries exist; the entropy and alpha reuse the block's log-probs s, t, so they cost
    no second read of the logits (alpha: one min and one logsumexp per entry; nla's value is
    -log alpha, so free there).
    """
    n_rows = student.numel() // student.shape[-1]
    values = torch.zeros(n_rows, dtype=compute_dtype(student.dtype), device=student.device)  # (N,)
    entropies = torch.zeros_like(values) if want_entropy else None  # (N,)
    alphas = torch.zeros_like(values) if want_alpha else None  # (N,)
    grad = (torch.zeros(student.shape, dtype=student.dtype, device=student.device)
            if want_grad else None)  # (..., V)
    for rows, s_blk, t_blk in _blocks_in_mask(student, teacher, mask, chunk_size):
        values[rows], g, h, alpha = block_terms(s_blk, t_blk, spec, want_grad, want_entropy,
                                                want_alpha)
        if want_entropy:
            entropies[rows] = h
        if want_alpha:
            alphas[rows] = alpha
        if want_grad:
            grad.view(-1, grad.shape[-1])[rows] = g.to(grad.dtype)  # (n, V), in the logits' dtype
    return values, grad, entropies, alphas


class _ChunkedDivergence(torch.autograd.Function):
    """Per-position divergence (N,) of (..., V) logits, with the analytic gradient for the student
    logits.

    Forward computes the values and the gradient in the same sweep over blocks of positions (the
    log-probs are computed once) and keeps only that gradient, one tensor like the student logits:
    backward scales it by the incoming per-position gradient, in place, and hands it on. No (n, V)
    intermediates survive a block. The spec's lk_weight is already fixed (_per_position), so a
    recomputed gradient uses the same w. The other outputs are the teacher entropy and the
    acceptance alpha per position (N,) when asked for (else empty tensors): constants, not
    differentiable.
    """

    @staticmethod
    def forward(ctx, student, teacher, mask, spec, chunk_size, want_entropy, want_alpha):
        values, ctx.grad, entropies, alphas = _sweep(student, teacher, mask, spec, chunk_size, True,
                                                     want_entropy, want_alpha)
        ctx.save_for_backward(student, teacher, mask)
        ctx.spec, ctx.chunk_size = spec, chunk_size
        entropies = values.new_empty(0) if entropies is None else entropies
        alphas = values.new_empty(0) if alphas is None else alphas
        ctx.mark_non_differentiable(entropies, alphas)
        return values, entropies, alphas

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_values, _grad_entropies, _grad_alphas):  # grad_values: (N,)
        student, teacher, mask = ctx.saved_tensors
        grad, ctx.grad = ctx.grad, None
        if grad is None:  # a second backward (retain_graph=True): the first consumed it; redo it
            grad = _sweep(student, teacher, mask, ctx.spec, ctx.chunk_size, want_grad=True)[1]
        grad_values = grad_values.masked_fill(~mask, 0)  # masked positions do not depend on it
        grad.view(-1, grad.shape[-1]).mul_(grad_values.to(grad.dtype).unsqueeze(-1))  # (N, V)(N, 1)
        return grad, None, None, None, None, None, None


def _per_position(student_logits, teacher_logits, mask, spec, chunk_size, want_entropy=False,
                  want_alpha=False):
    """Values (N,) at every position of (..., V) logits (0 where mask (N,) is False),
    autograd-aware, and the teacher entropies and acceptances (N,) if want_entropy / want_alpha
    (else None). lk: w is fixed first from the mean alpha over the kept positions (with_lk_weight),
    whose alphas are then reused."""
    teacher_logits = teacher_logits.detach()
    spec, lk_alphas = with_lk_weight(student_logits.detach(), teacher_logits, mask, spec,
                                     chunk_size)
    sweep_alpha = want_alpha and lk_alphas is None  # lk has them already
    if torch.is_grad_enabled() and student_logits.requires_grad:
        values, entropies, alphas = _ChunkedDivergence.apply(student_logits, teacher_logits, mask,
                                                             spec, chunk_size, want_entropy,
                                                             sweep_alpha)
    else:
        values, _, entropies, alphas = _sweep(student_logits, teacher_logits, mask, spec,
                                              chunk_size, want_grad=False,
                                              want_entropy=want_entropy, want_alpha=sweep_alpha)
    alphas = (alphas if lk_alphas is None else lk_alphas) if want_alpha else None
    return values, (entropies if want_entropy else None), alphas


# --------------------------------------------------------- from hidden states: the lm_head fused in
def project(hidden, head, dtype):
    """hidden (n, H) @ head (V, H)^T -> logits (n, V) in `dtype` (>= float32; the caller turns
    autocast off).

    The products of half-precision numbers are exact in float32, so this is the float32 logits of
    the very values given. A head stored in another dtype is upcast HEAD_TILE_ROWS rows at a time,
    never as a whole (a float32 copy of a 151936 x 2560 head is 1.6 GB)."""
    h = hidden.to(dtype)
    if head.dtype == dtype:
        return h @ head.t()  # (n, V)
    out = torch.empty(h.shape[0], head.shape[0], dtype=dtype, device=h.device)  # (n, V)
    for a in range(0, head.shape[0], HEAD_TILE_ROWS):
        out[:, a : a + HEAD_TILE_ROWS] = h @ head[a : a + HEAD_TILE_ROWS].to(dtype).t()
    return out


def project_back(grad_logits, head, dtype):
    """dD/d(hidden) = grad_logits (n, V) @ head (V, H) -> (n, H) in `dtype`, the head upcast tile by
    tile."""
    if head.dtype == dtype:
        return grad_logits @ head  # (n, H)
    out = torch.zeros(grad_logits.shape[0], head.shape[1], dtype=dtype,
                      device=grad_logits.device)  # (n, H)
    for a in range(0, head.shape[0], HEAD_TILE_ROWS):
        out.addmm_(grad_logits[:, a : a + HEAD_TILE_ROWS], head[a : a + HEAD_TILE_ROWS].to(dtype))
    return out


def hidden_compute_dtype(*tensors) -> torch.dtype:
    """The dtype the fused loss computes in: the widest of the hidden states and heads, at least
    float32."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return compute_dtype(dtype)


def _hidden_sweep(student: HiddenAndHead, teacher: HiddenAndHead, rows, spec, vocab, chunk_size, *,
                  want_hidden=False, want_head=False, want_entropy=False, want_alpha=False):
    """One pass over blocks of the kept positions `rows` (index tensor into the N rows of the
    student's hidden states (N, H_s) and the teacher's (N, H_t)): each block is projected through
    both heads' first `vocab` rows into (n, V) logits of the compute dtype, block_terms gives its
    values and dD/d(logits), and that gradient is turned at once into the block's dD/d(hidden)
    (n, H_s) and its share of dD/d(head) (V_s, H_s) -- so no (N, V) tensor exists.

    -> values (len(rows),), teacher entropies (len(rows),) or None, dD/d(student hidden) (N, H_s)
       or None, dD/d(student head) (V_s, H_s) or None (its padding rows beyond vocab stay 0), alphas
       (len(rows),) or None, all in the compute dtype. lk needs spec.lk_weight set (hidden_lk_spec).
    """
    s_hidden, s_head = student
    t_hidden, t_head = teacher
    dtype = hidden_compute_dtype(s_hidden, s_head, t_hidden, t_head)
    device = s_hidden.device
    values = torch.zeros(rows.numel(), dtype=dtype, device=device)  # (n_kept,)
    entropies = torch.zeros_like(values) if want_entropy else None  # (n_kept,)
    alphas = torch.zeros_like(values) if want_alpha else None  # (n_kept,)
    grad_hidden = (torch.zeros(s_hidden.shape, dtype=dtype, device=device)
                   if want_hidden else None)  # (N, H_s)
    grad_head = (torch.zeros(s_head.shape, dtype=dtype, device=device)
                 if want_head else None)  # (V_s, H_s)
    w_s, w_t = s_head[:vocab], t_head[:vocab]  # (V, H_s), (V, H_t): views without the padding rows
    with torch.autocast(device.type, enabled=False):  # the projection must not be rounded to bf16
        for i in range(0, rows.numel(), chunk_size):
            idx = rows[i : i + chunk_size]  # (n,)
            h_s = s_hidden[idx].to(dtype)  # (n, H_s)
            v, g, h, a = block_terms(project(h_s, w_s, dtype), project(t_hidden[idx], w_t, dtype),
                                     spec, want_grad=want_hidden or want_head,
                                     want_entropy=want_entropy, want_alpha=want_alpha)  # g: (n, V)
            values[i : i + idx.numel()] = v
            if want_entropy:
                entropies[i : i + idx.numel()] = h
            if want_alpha:
                alphas[i : i + idx.numel()] = a
            if want_hidden:
                grad_hidden[idx] = project_back(g, w_s, dtype)  # (n, H_s)
            if want_head:
                grad_head[:vocab].addmm_(g.t(), h_s)  # (V, n) @ (n, H_s)
            del g
    return values, entropies, grad_hidden, grad_head, alphas


def hidden_lk_spec(student: HiddenAndHead, teacher: HiddenAndHead, rows, spec, vocab, chunk_size):
    """(spec, alphas): for lk, w fixed from the mean alpha over `rows` by a first, values-only pass
    (an nla sweep: its value is -log alpha; one more projection of both heads per block), and that
    pass's alphas; other kinds: (spec, None)."""
    if spec.kind != "lk" or spec.lk_weight is not None:
        return spec, None
    alphas = _hidden_sweep(student, teacher, rows, replace(spec, kind="nla"), vocab, chunk_size,
                           want_alpha=True)[4]  # (n_kept,)
    return lk_spec(spec, float(alphas.sum()), rows.numel()), alphas


class _HiddenDivergence(torch.autograd.Function):
    """The summed divergence (a scalar) from hidden states and lm_head weights, with the analytic
    gradient.

    Forward runs _hidden_sweep once and keeps only its two gradients, dD/d(student hidden) (N, H_s)
    and dD/d(student head) (V_s, H_s), for the inputs that need one; backward scales them by the
    incoming scalar (in place) and hands them on in the inputs' dtypes. The other outputs are the
    teacher-entropy and alpha sums (constants; 0 when not asked for). A second backward
    (retain_graph=True) recomputes the gradients. lk's spec arrives with its w fixed
    (hidden_lk_spec), so a recomputed gradient uses the same w.
    """

    @staticmethod
    def forward(ctx, s_hidden, s_head, t_hidden, t_head, rows, spec, vocab, chunk_size,
                want_entropy, want_alpha):
        want_hidden, want_head = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        values, entropies, ctx.grad_hidden, ctx.grad_head, alphas = _hidden_sweep(
            HiddenAndHead(s_hidden, s_head), HiddenAndHead(t_hidden, t_head), rows, spec, vocab,
            chunk_size, want_hidden=want_hidden, want_head=want_head, want_entropy=want_entropy,
            want_alpha=want_alpha)
        ctx.save_for_backward(s_hidden, s_head, t_hidden, t_head, rows)
        ctx.args, ctx.consumed = (spec, vocab, chunk_size, want_hidden, want_head), False
        entropy_sum = entropies.sum() if want_entropy else values.new_zeros(())
        alpha_sum = alphas.sum() if want_alpha else values.new_zeros(())
        ctx.mark_non_differentiable(entropy_sum, alpha_sum)
        return values.sum(), entropy_sum, alpha_sum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total, _grad_entropy, _grad_alpha):  # grad_total: a scalar
        s_hidden, s_head, t_hidden, t_head, rows = ctx.saved_tensors
        spec, vocab, chunk_size, want_hidden, want_head = ctx.args
        grad_hidden, grad_head = ctx.grad_hidden, ctx.grad_head
        ctx.grad_hidden = ctx.grad_head = None
        if ctx.consumed:  # a second backward: the first one scaled the gradients in place; redo
            _, _, grad_hidden, grad_head, _ = _hidden_sweep(
                HiddenAndHead(s_hidden, s_head), HiddenAndHead(t_hidden, t_head), rows, spec, vocab,
                chunk_size, want_hidden=want_hidden, want_head=want_head)
        ctx.consumed = True
        scale = grad_total.to(grad_hidden.dtype if grad_hidden is not None else grad_head.dtype)
        out_hidden = grad_hidden.mul_(scale).to(s_hidden.dtype) if grad_hidden is not None else None
        out_head = grad_head.mul_(scale).to(s_head.dtype) if grad_head is not None else None
        return out_hidden, out_head, None, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------------- argument checks
def _check_float(name, x):
    if (not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1
            or x.shape[-1] == 0):
        got = (f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor)
               else type(x).__name__)
        raise ValueError(f"{name} must be a floating-point tensor (..., V) with V > 0, got {got}")


def _check_logits(student_logits, teacher_logits):
    _check_float("student_logits", student_logits)
    _check_float("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same shape (..., V); for lm_heads of "
            "different widths use shared_vocab(...) first"
        )


def _check_hidden(student: HiddenAndHead, teacher: HiddenAndHead):
    _check_float("student_hidden", student.hidden)
    _check_float("teacher_hidden", teacher.hidden)
    if student.hidden.shape[:-1] != teacher.hidden.shape[:-1]:
        raise ValueError(f"student_hidden {tuple(student.hidden.shape)} and teacher_hidden "
                         f"{tuple(teacher.hidden.shape)} must have the same leading shape (the "
                         f"positions)")
    for name, (hidden, head) in (("student_head", student), ("teacher_head", teacher)):
        if not isinstance(head, torch.Tensor) or not head.is_floating_point() or head.dim() != 2 \
                or head.shape[1] != hidden.shape[-1] or head.shape[0] == 0:
            got = (f"shape {tuple(head.shape)}" if isinstance(head, torch.Tensor)
                   else type(head).__name__)
            raise ValueError(f"{name} must be a floating-point lm_head weight "
                             f"(V, {hidden.shape[-1]}) matching its hidden states, got {got}")


def _check_mask(mask, logits, name="mask"):
    if not isinstance(mask, torch.Tensor) or mask.shape != logits.shape[:-1]:
        mask = mask if not isinstance(mask, torch.Tensor) else f"of shape {tuple(mask.shape)}"
        raise ValueError(f"{name} {mask} must be a tensor shaped like the logits' leading shape "
                         f"{tuple(logits.shape[:-1])}")


def _check_divergence(divergence):
    if not isinstance(divergence, Divergence):
        raise ValueError(f"divergence must be a Divergence (e.g. Divergence({divergence!r})), got "
                         f"{type(divergence).__name__}")


def _check_chunk(chunk_size, vocab, elements=CHUNK_ELEMENTS):
    if chunk_size is None:
        return max(1, elements // vocab)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int (positions per block) "
                         f"or None")
    return chunk_size


# --------------------------------------------------------------------------------------- public API
def token_divergence(student_logits, teacher_logits, divergence: Divergence, *,
                     chunk_size=None) -> torch.Tensor:
    """The divergence between p_T and p_S at every position: logits (..., V) -> values (...,).

    divergence: the kind and its options (lk's w comes from the mean alpha over all the positions
    given). Differentiable with respect to student_logits (chunked, analytic gradient); computed in
    >= float32.
    """
    _check_logits(student_logits, teacher_logits)
    _check_divergence(divergence)
    chunk = _check_chunk(chunk_size, student_logits.shape[-1])
    everywhere = torch.ones(student_logits.shape[:-1], dtype=torch.bool,
                            device=student_logits.device).view(-1)  # (N,)
    values, _, _ = _per_position(student_logits, teacher_logits, everywhere, divergence,
                                 chunk)  # (N,)
    return values.view(student_logits.shape[:-1])  # (...,)


def divergence_sum(student_logits, teacher_logits, mask, divergence: Divergence, *, chunk_size=None,
                   return_teacher_entropy=False, return_alpha=False) -> LossSums:
    """The token-level loss of on-policy distillation, the sum over the positions where mask (...,)
    is True of token_divergence (what GKD's Algorithm 1, Agarwal et al. 2024, minimises, for any of
    the divergences): LossSums whose total is a scalar (>= float32).

    Memory-lean: blocks of chunk_size positions (default: about 4M logits per block), masked
    positions are never computed, and the backward pass writes the analytic gradient block by block.
    The training loop divides this sum by its own token count. mask=None means every position.
    return_teacher_entropy=True fills LossSums.teacher_entropy: the sum over the same positions of
    the teacher entropy H(p_T) at the loss temperature, without top-k / top-p (a constant tensor, no
    gradient), computed from the log-probs the loss already has (no second pass over the logits).
    distill.py logs its mean as `loss_teacher_entropy`; it is NOT the processed H(p) of
    speculative-decoding records.
    return_alpha=True fills LossSums.alpha: the sum over the same positions of the acceptance
    probability alpha = sum_v min(p_T, p_S) at the loss temperature, without top-p (a constant
    tensor; from the loss's own log-probs; distill.py logs its step-wide mean as `train_alpha`).
    lk: w = lk_scale exp(-lk_decay mean alpha), the mean over this call's masked positions.
    """
    _check_logits(student_logits, teacher_logits)
    _check_divergence(divergence)
    chunk = _check_chunk(chunk_size, student_logits.shape[-1])
    if mask is None:
        mask = torch.ones(student_logits.shape[:-1], dtype=torch.bool,
                          device=student_logits.device)  # (...,)
    _check_mask(mask, student_logits)
    values, entropies, alphas = _per_position(
        student_logits, teacher_logits, mask.reshape(-1).bool(), divergence, chunk,
        want_entropy=return_teacher_entropy, want_alpha=return_alpha)  # (N,) each, or None
    return LossSums(values.sum(), entropies.sum() if return_teacher_entropy else None,
                    alphas.sum() if return_alpha else None)


def hidden_divergence_sum(student: HiddenAndHead, teacher: HiddenAndHead, mask,
                          divergence: Divergence, *, vocab_size=None, chunk_size=None,
                          return_teacher_entropy=False, return_alpha=False) -> LossSums:
    """divergence_sum of the logits student.hidden @ student.head^T and teacher.hidden @
    teacher.head^T, computed from the hidden states without ever holding an (N, V) logits tensor of
    either model.

    student, teacher: HiddenAndHead (or a (hidden, head) pair): the last hidden states (..., H_s),
    (..., H_t) (after the final norm) at the positions to compare, and the lm_head weights
    (V_s, H_s), (V_t, H_t) (no bias; a tied head is the embedding matrix, and its gradient
    accumulates onto that one parameter). mask (...,) or None, divergence, return_teacher_entropy,
    return_alpha: as divergence_sum (lk's w from the mean alpha over the masked positions: one
    values-only pass first, which projects both heads once more).
    vocab_size: the shared vocabulary (len(tokenizer)); the heads' rows beyond it (padding) are cut,
    as shared_vocab does, and get a zero gradient. chunk_size: positions per block (default: about
    4M logits, 8M when a head is stored in a lower precision than the computation and must be upcast
    in every block).

    One block of kept positions at a time is projected in float32 (whatever the dtype of the hidden
    states and weights; float64 stays float64; autocast is off inside), block_terms computes its
    values and the closed-form gradient in the same sweep (the very code divergence_sum runs on
    logits), and that gradient is folded at once into dD/d(student hidden) and dD/d(student head).
    Gradients flow to the student's hidden states and head through autograd; none to the teacher's.
    Returns LossSums, as divergence_sum.
    """
    student, teacher = HiddenAndHead(*student), HiddenAndHead(*teacher)
    _check_hidden(student, teacher)
    _check_divergence(divergence)
    spec = divergence
    vocab = shared_width(student.head.shape[0], teacher.head.shape[0], vocab_size)
    dtype = hidden_compute_dtype(*student, *teacher)
    upcast = student.head.dtype != dtype or teacher.head.dtype != dtype
    chunk = _check_chunk(chunk_size, vocab,
                         HIDDEN_CHUNK_ELEMENTS_UPCAST if upcast else HIDDEN_CHUNK_ELEMENTS)
    if mask is None:
        mask = torch.ones(student.hidden.shape[:-1], dtype=torch.bool,
                          device=student.hidden.device)  # (...,)
    _check_mask(mask, student.hidden)
    rows = mask.reshape(-1).bool().nonzero().squeeze(-1)  # (n_kept,) the positions compared
    s_hidden = student.hidden.reshape(-1, student.hidden.shape[-1])  # (N, H_s)
    t_hidden = teacher.hidden.detach().reshape(-1, teacher.hidden.shape[-1])  # (N, H_t)
    t_head = teacher.head.detach()  # (V_t, H_t)
    with torch.no_grad():
        spec, lk_alphas = hidden_lk_spec(HiddenAndHead(s_hidden.detach(), student.head.detach()),
                                         HiddenAndHead(t_hidden, t_head), rows, spec, vocab, chunk)
    sweep_alpha = return_alpha and lk_alphas is None  # lk has them already
    if torch.is_grad_enabled() and (student.hidden.requires_grad or student.head.requires_grad):
        total, entropy_sum, alpha_sum = _HiddenDivergence.apply(
            s_hidden, student.head, t_hidden, t_head, rows, spec, vocab, chunk,
            return_teacher_entropy, sweep_alpha)
    else:
        values, entropies, _, _, alphas = _hidden_sweep(
            HiddenAndHead(s_hidden, student.head), HiddenAndHead(t_hidden, t_head), rows, spec,
            vocab, chunk, want_entropy=return_teacher_entropy, want_alpha=sweep_alpha)
        total = values.sum()
        entropy_sum = entropies.sum() if return_teacher_entropy else None
        alpha_sum = alphas.sum() if sweep_alpha else None
    if lk_alphas is not None:
        alpha_sum = lk_alphas.sum()
    return LossSums(total, entropy_sum if return_teacher_entropy else None,
                    alpha_sum if return_alpha else None)


def generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                         reduction="batchmean", num_items_in_batch=None, *, chunk_size=None):
    """TRL 1.16's `GKDTrainer.generalized_jsd_loss` (GKD's generalized JSD, Agarwal et al. 2024,
    Eq. 1), same signature and meaning, memory-lean.

    beta = 0: KL(p_T || p_S); beta = 1: KL(p_S || p_T); otherwise JSD(beta). Positions with
    labels == -100 are left out. Reductions, as TRL computes them on the masked per-vocabulary terms
    `jsd` (shape (n, V)):
      "batchmean": jsd.sum() / (number of unmasked positions, at least 1), or / logits.shape[0]
      without labels;
      "sum": jsd.sum();  "mean": jsd.mean() = sum / (n * V) (NaN when every position is masked, as
      in TRL);
      "none": the per-vocabulary terms themselves, (n, V) with labels or (..., V) without (not
      memory-lean: the output is that big). num_items_in_batch: jsd.sum() / num_items_in_batch,
      whatever the reduction.
    Differences from TRL: computed in >= float32 (a bfloat16 input gives a float32 loss), -inf
    logits stay finite (the zero_prob_log surrogate; finite logits are exact), and no gradient flows
    into teacher_logits.
    """
    _check_logits(student_logits, teacher_logits)
    spec = Divergence("jsd", beta, temperature)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {REDUCTIONS}")
    if labels is not None:
        _check_mask(labels, student_logits, name="labels")
        mask = labels != IGNORE_INDEX  # (...,)
    else:
        mask = torch.ones(student_logits.shape[:-1], dtype=torch.bool,
                          device=student_logits.device)  # (...,)
    if reduction == "none" and num_items_in_batch is None:
        s = log_probs(student_logits, spec.temperature)  # (..., V)
        t = log_probs(teacher_logits.detach(), spec.temperature)  # (..., V)
        terms = gjsd_terms(s, t, spec.beta)  # (..., V)
        return terms[mask] if labels is not None else terms  # (n, V) or (..., V)

    chunk = _check_chunk(chunk_size, student_logits.shape[-1])
    values, _, _ = _per_position(student_logits, teacher_logits, mask.reshape(-1), spec,
                                 chunk)  # (N,)
    total = values.sum()
    n_positions = mask.sum()
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    if reduction == "batchmean":
        denom = n_positions.clamp_min(1) if labels is not None else max(student_logits.shape[0], 1)
        return total / denom
    if reduction == "sum":
        return total
    return total / (n_positions * student_logits.shape[-1])  # "mean"


def shared_vocab(student_logits, teacher_logits, vocab_size=None):
    """Both logits cut to the vocabulary they share: (..., V_s), (..., V_t) -> (..., V), (..., V)
    (views).

    One tokenizer, two lm_heads of different widths (Qwen pads its lm_head: 151936 rows for 151669
    real tokens) -> pass vocab_size=len(tokenizer): both are cut to the real tokens, and the softmax
    renormalises over them. Equal widths and vocab_size=None: unchanged. Raises ValueError when the
    widths differ and no vocab_size is given, or vocab_size exceeds a head (then the models do not
    share a vocabulary).
    """
    _check_float("student_logits", student_logits)
    _check_float("teacher_logits", teacher_logits)
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(f"leading shapes differ: student {tuple(student_logits.shape)}, teacher "
                         f"{tuple(teacher_logits.shape)}")
    vocab = shared_width(student_logits.shape[-1], teacher_logits.shape[-1], vocab_size)
    if vocab == student_logits.shape[-1] == teacher_logits.shape[-1]:
        return student_logits, teacher_logits
    return student_logits[..., :vocab], teacher_logits[..., :vocab]


def shared_width(v_s: int, v_t: int, vocab_size=None) -> int:
    """The vocabulary two lm_heads of widths v_s, v_t share: vocab_size (len(tokenizer)) when given,
    else their common width. ValueError when the widths differ and no vocab_size is given, or it
    exceeds a head."""
    if vocab_size is None:
        if v_s != v_t:
            raise ValueError(f"lm_head widths differ (student {v_s}, teacher {v_t}): pass "
                             "vocab_size=len(tokenizer), the real vocabulary both heads cover")
        return v_s
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size={vocab_size!r} must be a positive int (len(tokenizer))")
    if vocab_size > min(v_s, v_t):
        raise ValueError(f"vocab_size={vocab_size} exceeds the lm_head widths (student {v_s}, "
                         f"teacher {v_t}): these models do not share that vocabulary")
    return vocab_size
