"""divergences.py: equal to TRL 1.16's generalized_jsd_loss, equal to the formulas, and the invariants.

p_T = teacher, p_S = student. TRL is the reference for generalized_jsd_loss (values AND student gradients);
float64 code written straight from the formulas is the reference for every token_divergence kind.
"""
import math
import os

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.experimental.gkd import GKDTrainer  # noqa: E402

import divergences as D  # noqa: E402

trl_loss = GKDTrainer.generalized_jsd_loss
BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]
TEMPERATURES = [0.5, 1.0, 2.0]
B, T, V = 3, 6, 33  # small vocabulary: parity is about the arithmetic, not the size


def logits_pair(seed, shape=(B, T, V), scale=2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    teacher = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    return student, teacher


def random_labels(seed, shape=(B, T)):
    """Labels with about 30% of positions masked (-100) and row 1 fully masked."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, shape, generator=g)
    labels[torch.rand(shape, generator=g) < 0.3] = -100
    labels[1] = -100
    return labels


def loss_and_grad(fn, student, teacher, weights=None, **kw):
    """The loss and d(sum(weights * loss))/d(student logits); weights make reduction='none' comparable."""
    x = student.detach().clone().requires_grad_()
    loss = fn(x, teacher, **kw)
    w = torch.ones_like(loss) if weights is None else weights
    (loss * w).sum().backward()
    return loss.detach(), x.grad


def assert_grad_close(actual, expected, rtol=1e-5):
    """Float32 gradients: elementwise rtol, plus an atol of rtol times the gradient's scale (max |g|).

    Entries of size 1e-9 next to entries of size 1e-2 carry float32 rounding of the large ones; TRL's own
    gradient differs from a float64 computation by ~3e-6 of max |g|, so a pure elementwise rtol is unreachable.
    """
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


# ------------------------------------------------------------------------------------------ TRL parity
@pytest.mark.parametrize("reduction", D.REDUCTIONS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("beta", BETAS)
def test_values_equal_trl(beta, temperature, reduction):
    """generalized_jsd_loss is a drop-in for TRL's: same value for every beta, temperature and reduction,
    with random masks including a fully masked row (float32, rtol 1e-5)."""
    student, teacher = logits_pair(seed=int(beta * 10) + int(temperature * 100))
    kw = dict(labels=random_labels(1), beta=beta, temperature=temperature, reduction=reduction)
    ours = D.generalized_jsd_loss(student, teacher, **kw)
    ref = trl_loss(student, teacher, **kw)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduction", D.REDUCTIONS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("beta", BETAS)
def test_student_gradients_equal_trl(beta, temperature, reduction):
    """Training follows the gradient, so our analytic, chunked gradient must equal TRL's autograd one
    (reduction 'none' is weighted by random numbers so that every per-vocabulary term matters)."""
    student, teacher = logits_pair(seed=7 + int(beta * 10) + int(temperature * 100))
    kw = dict(labels=random_labels(2), beta=beta, temperature=temperature, reduction=reduction)
    ref_loss = trl_loss(student, teacher, **kw)
    weights = torch.randn(ref_loss.shape, generator=torch.Generator().manual_seed(3))
    _, ours = loss_and_grad(D.generalized_jsd_loss, student, teacher, weights, chunk_size=4, **kw)
    _, ref = loss_and_grad(trl_loss, student, teacher, weights, **kw)
    assert_grad_close(ours, ref)


@pytest.mark.parametrize("beta", BETAS)
def test_no_labels_equals_trl(beta):
    """Without labels TRL's batchmean divides by logits.shape[0] (the batch), not by the token count."""
    student, teacher = logits_pair(seed=11)
    for reduction in ("batchmean", "mean", "sum"):
        ours = D.generalized_jsd_loss(student, teacher, beta=beta, reduction=reduction)
        torch.testing.assert_close(ours, trl_loss(student, teacher, beta=beta, reduction=reduction), rtol=1e-5,
                                   atol=0)


@pytest.mark.parametrize("reduction", D.REDUCTIONS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_fully_masked_batch_equals_trl(beta, reduction):
    """A batch whose completions were all truncated must not crash training: batchmean and sum give 0,
    'none' an empty tensor, 'mean' TRL's NaN (0/0), and the student gradient is exactly 0 everywhere."""
    student, teacher = logits_pair(seed=5)
    labels = torch.full((B, T), -100)
    kw = dict(labels=labels, beta=beta, reduction=reduction)
    ours, ours_grad = loss_and_grad(D.generalized_jsd_loss, student, teacher, **kw)
    ref, ref_grad = loss_and_grad(trl_loss, student, teacher, **kw)
    torch.testing.assert_close(ours, ref, equal_nan=True)
    assert torch.equal(ours_grad, torch.zeros_like(ours_grad)) and torch.equal(ref_grad, ours_grad)


@pytest.mark.parametrize("reduction", D.REDUCTIONS)
def test_single_unmasked_position_equals_trl(reduction):
    """The other edge of the masking: one position left, so batchmean divides by exactly 1."""
    student, teacher = logits_pair(seed=9)
    labels = torch.full((B, T), -100)
    labels[2, 4] = 7
    kw = dict(labels=labels, beta=0.5, reduction=reduction)
    ours, ours_grad = loss_and_grad(D.generalized_jsd_loss, student, teacher, **kw)
    ref, ref_grad = loss_and_grad(trl_loss, student, teacher, **kw)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=0)
    assert_grad_close(ours_grad, ref_grad)


def test_num_items_in_batch_equals_trl():
    """TRL's gradient-accumulation normaliser: the masked sum divided by num_items_in_batch, any reduction."""
    student, teacher = logits_pair(seed=6)
    kw = dict(labels=random_labels(3), beta=0.5, num_items_in_batch=torch.tensor(40))
    for reduction in ("batchmean", "none"):
        ours = D.generalized_jsd_loss(student, teacher, reduction=reduction, **kw)
        torch.testing.assert_close(ours, trl_loss(student, teacher, reduction=reduction, **kw), rtol=1e-5, atol=0)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_bfloat16_inputs_give_trls_float32_answer(beta):
    """bfloat16 logits are upcast, so the loss equals TRL's on the same numbers in float32 (rtol 1e-5) and is
    float32; the gradient arrives in bfloat16, equal to TRL's float32 gradient up to bfloat16 rounding."""
    student, teacher = logits_pair(seed=8, dtype=torch.bfloat16)
    kw = dict(labels=random_labels(4), beta=beta, temperature=0.7)
    ours, ours_grad = loss_and_grad(D.generalized_jsd_loss, student, teacher, **kw)
    ref, ref_grad = loss_and_grad(trl_loss, student.float(), teacher.float(), **kw)
    assert ours.dtype == torch.float32 and ours_grad.dtype == torch.bfloat16
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(ours_grad, ref_grad.to(torch.bfloat16), rtol=1.6e-2,
                               atol=1e-2 * ref_grad.abs().max().item())


# ------------------------------------------------------------------------------ float64 formula references
def ref_divergence(student, teacher, kind, beta=0.5, temperature=1.0, scale=1.0, floor=0.5):
    """Each divergence in float64, straight from its formula in probabilities (0 log 0 = 0)."""
    p_s = torch.softmax(student.double() / temperature, -1)
    p_t = torch.softmax(teacher.double() / temperature, -1)

    def kl(p, q):  # sum_v p log(p / q), with 0 log 0 = 0
        return torch.where(p > 0, p * (p.log() - q.log()), 0.0).sum(-1)

    if kind == "fkl" or (kind == "jsd" and beta == 0):
        return kl(p_t, p_s)
    if kind == "rkl" or (kind == "jsd" and beta == 1):
        return kl(p_s, p_t)
    if kind == "jsd":
        m = beta * p_t + (1 - beta) * p_s
        return beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)
    if kind == "tvd":
        return 0.5 * (p_t - p_s).abs().sum(-1)
    if kind == "ajsd":
        entropy = -torch.where(p_t > 0, p_t * p_t.log(), 0.0).sum(-1, keepdim=True)
        b = floor + (1 - floor) * torch.exp(-entropy / scale)
        m = b * p_t + (1 - b) * p_s
        return (kl(p_t, m) / (1 - b.squeeze(-1))) + (kl(p_s, m) / b.squeeze(-1))
    alpha = torch.minimum(p_t, p_s).sum(-1)  # the acceptance probability
    if kind == "nla":
        return -alpha.log()
    if kind == "lk":  # w from the mean alpha over all positions given, a constant
        w = torch.exp(-alpha.detach().mean())
        return w * kl(p_t, p_s) + (1 - w) * (1 - alpha)
    raise AssertionError(kind)


@pytest.mark.parametrize("temperature", [0.7, 1.0])
@pytest.mark.parametrize("kind,beta", [("fkl", 0.5), ("rkl", 0.5), ("tvd", 0.5), ("ajsd", 0.5), ("nla", 0.5),
                                       ("lk", 0.5), ("jsd", 0.0), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9),
                                       ("jsd", 1.0)])
def test_token_divergence_equals_float64_formula(kind, beta, temperature):
    """Each kind is exactly the divergence the module docstring writes down, per position (float32 result
    against float64 formula in probabilities, rtol 1e-5)."""
    student, teacher = logits_pair(seed=21)
    ours = D.token_divergence(student, teacher, D.Divergence(kind, beta=beta, temperature=temperature))
    ref = ref_divergence(student, teacher, kind, beta, temperature)
    assert ours.shape == (B, T) and ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,beta", [("fkl", 0.5), ("rkl", 0.5), ("tvd", 0.5), ("ajsd", 0.5), ("nla", 0.5),
                                       ("lk", 0.5), ("jsd", 0.3), ("jsd", 0.9)])
def test_analytic_gradient_equals_float64_autograd(kind, beta):
    """The closed-form gradients p_S (g - E_pS[g]) / T are the true derivatives of the formulas: in float64
    they agree with torch.autograd through the float64 reference to 1e-10."""
    student, teacher = logits_pair(seed=22, dtype=torch.float64)
    weights = torch.rand(B, T, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = student.clone().requires_grad_()
    (D.token_divergence(x, teacher, D.Divergence(kind, beta=beta, temperature=0.8)) * weights).sum().backward()
    r = student.clone().requires_grad_()
    (ref_divergence(r, teacher, kind, beta, temperature=0.8) * weights).sum().backward()
    torch.testing.assert_close(x.grad, r.grad, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- exact at every logit scale
SCALES_GRAD = [1.0, 10.0, 30.0, 100.0]  # logit standard deviations: real heads reach 10-30 at T = 0.6
SCALES_VALUE = SCALES_GRAD + [1000.0]
BETAS_SCALE = [0.0, 0.25, 0.5, 0.75, 1.0]
TEMPERATURES_SCALE = [0.6, 1.0, 2.0]


def ref_divergence_log(student, teacher, kind, beta=0.5, temperature=1.0, scale=1.0, floor=0.5):
    """Each divergence in float64 from log-probabilities (no probability underflows to log 0 on the way, so
    autograd through it is the exact gradient at any logit scale). ajsd's H(p_T) takes the top token's
    log-prob as log(1 - the others' mass), as in float64 the plain sum loses an H below 1e-16."""
    s = torch.log_softmax(student.double() / temperature, -1)
    t = torch.log_softmax(teacher.double() / temperature, -1)
    return ref_from_log_probs(s, t, kind, beta, scale, floor)


def ref_from_log_probs(s, t, kind, beta=0.5, scale=1.0, floor=0.5):
    """ref_divergence_log from the student and teacher log-probs s, t (float64)."""
    if kind == "fkl" or (kind == "jsd" and beta == 0):
        return (t.exp() * (t - s)).sum(-1)
    if kind == "rkl" or (kind == "jsd" and beta == 1):
        return (s.exp() * (s - t)).sum(-1)
    if kind == "tvd":
        return 0.5 * (s.exp() - t.exp()).abs().sum(-1)
    if kind == "nla":
        return -torch.logsumexp(torch.minimum(s, t), -1)
    if kind == "lk":  # w from the mean alpha over all positions given, detached
        w = torch.exp(-torch.logsumexp(torch.minimum(s, t), -1).exp().detach().mean())
        return w * (t.exp() * (t - s)).sum(-1) + (1 - w) * 0.5 * (s.exp() - t.exp()).abs().sum(-1)
    if kind == "jsd":
        m = torch.logaddexp(t + math.log(beta), s + math.log1p(-beta))
        return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)
    assert kind == "ajsd"
    top = t.argmax(-1, keepdim=True)
    others = torch.ones_like(t).scatter(-1, top, 0.0)
    q = (t.exp() * others).sum(-1)
    entropy = -(t.exp() * t * others).sum(-1) - (1 - q) * torch.log1p(-q)  # (...,)
    b = (floor + (1 - floor) * torch.exp(-entropy / scale)).unsqueeze(-1)
    one_minus_b = (-(1 - floor) * torch.expm1(-entropy / scale)).unsqueeze(-1)  # exact even where b rounds to 1
    log_b = torch.log1p(-one_minus_b)
    log_m_over_t = torch.logaddexp(log_b, one_minus_b.log() + s - t)
    log_m_over_s = torch.logaddexp(one_minus_b.log(), log_b + t - s)
    value = (-(t.exp() * log_m_over_t) / one_minus_b).sum(-1) + (-(s.exp() * log_m_over_s) / b).sum(-1)
    return value.masked_fill(entropy < 1e-290, math.nan)  # float64's own H subnormal: no reference there


def wide_logits(seed, std, shape=(3, 4, 257)):
    """Gaussian logits of standard deviation std (float32): at std 30 and T = 0.6 neighbouring log-probs are
    ~50 nats apart, at std 1000 thousands; a float32 floor at -87.3 nats changes the answer there."""
    return logits_pair(seed, shape=shape, scale=std)


def max_error(actual, expected):
    return (actual.double() - expected.double()).abs().max().item()


@pytest.mark.parametrize("temperature", TEMPERATURES_SCALE)
@pytest.mark.parametrize("beta", BETAS_SCALE)
@pytest.mark.parametrize("std", SCALES_VALUE)
def test_generalized_jsd_loss_equals_trl_float64_at_every_logit_scale(std, beta, temperature):
    """Finite logits of any magnitude are exact: the float32 loss equals TRL's function on float64 inputs to
    relative 1e-5, with a mask (the old floor at log(tiny) gave rkl 314 instead of 379 at std 30)."""
    student, teacher = wide_logits(int(std) + int(beta * 8), std)
    labels = random_labels(5, shape=student.shape[:-1]).clamp_max(student.shape[-1] - 1)
    kw = dict(labels=labels, beta=beta, temperature=temperature)
    ours = D.generalized_jsd_loss(student, teacher, **kw)
    ref = trl_loss(student.double(), teacher.double(), **kw)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("temperature", TEMPERATURES_SCALE)
@pytest.mark.parametrize("kind,beta", [("fkl", 0.5), ("rkl", 0.5), ("tvd", 0.5), ("ajsd", 0.5), ("nla", 0.5),
                                       ("lk", 0.5), ("jsd", 0.25), ("jsd", 0.5), ("jsd", 0.75)])
@pytest.mark.parametrize("std", SCALES_VALUE)
def test_token_divergence_equals_float64_at_every_logit_scale(std, kind, beta, temperature):
    """Every kind, per position, equals its formula in float64 to relative 1e-5 at logit standard
    deviations 1 ... 1000 (ajsd included: its beta comes from a near-certain teacher's entropy there)."""
    student, teacher = wide_logits(int(std) + 3, std)
    ours = D.token_divergence(student, teacher, D.Divergence(kind, beta=beta, temperature=temperature))
    ref = ref_divergence_log(student, teacher, kind, beta, temperature)
    known = torch.isfinite(ref)  # all but ajsd's positions whose H (~e^-736 and below) float64 cannot hold
    assert known.float().mean() > 0.5
    torch.testing.assert_close(ours.double()[known], ref[known], rtol=1e-5, atol=1e-12)


def float32_bar(student, teacher, kind, beta, temperature, weights):
    """The exact gradient of sum(weights * D) in float64, and what float32 rounding allows per entry.

    The exact gradient is (P - p_S sum_v P) / T with P = dD/ds = p_S g (autograd in float64 through the log-space
    formula, s = the student log-probs). Any float32 code rounds both terms (error ~ eps |term|) and the inputs
    x = logits / T (error ~ eps |x| in every log-prob), so the bar per entry is
    8 eps (1 + max|x|) (|P| + p_S (w + |sum_v P|)) / T, plus float32's smallest normal (nothing below it exists).
    """
    s = torch.log_softmax(student.double() / temperature, -1).requires_grad_()
    t = torch.log_softmax(teacher.double() / temperature, -1)
    (ref_from_log_probs(s, t, kind, beta) * weights).sum().backward()
    P, p_s = s.grad, s.detach().exp()  # (..., V)
    exact = (P - p_s * P.sum(-1, keepdim=True)) / temperature
    x_max = torch.maximum(student.abs().amax(-1, keepdim=True), teacher.abs().amax(-1, keepdim=True)).double()
    eps, tiny = torch.finfo(torch.float32).eps, torch.finfo(torch.float32).tiny
    w = weights.unsqueeze(-1)
    bar = 8 * eps * (1 + x_max / temperature) * (P.abs() + p_s * (w + P.sum(-1, keepdim=True).abs())) / temperature
    return exact, bar + tiny, p_s, t.exp()


@pytest.mark.parametrize("temperature", TEMPERATURES_SCALE)
@pytest.mark.parametrize("beta", BETAS_SCALE)
@pytest.mark.parametrize("std", SCALES_GRAD)
def test_gradients_as_close_as_trls_float32_at_every_logit_scale(std, beta, temperature):
    """The student gradient is as exact as float32 allows: every entry is within float32's rounding bar
    (float32_bar) of TRL's gradient on float64 inputs, and the largest error is of the order of TRL's own float32
    error on the same inputs (within 8x: two float32 codes' max errors differ by up to ~5x from rounding alone).
    A saturated JSD's true gradient is ~1e-17, below any float32 resolution: both codes then carry ~1e-8 of
    noise, which the bar allows. The floored version failed by 157x at std 10, T 0.6 and was wrong at std 100."""
    student, teacher = wide_logits(17 + int(std) + int(beta * 8), std)
    labels = random_labels(6, shape=student.shape[:-1]).clamp_max(student.shape[-1] - 1)
    kw = dict(labels=labels, beta=beta, temperature=temperature)
    _, ref = loss_and_grad(trl_loss, student.double(), teacher.double(), **kw)
    _, trl32 = loss_and_grad(trl_loss, student, teacher, **kw)
    _, ours = loss_and_grad(D.generalized_jsd_loss, student, teacher, chunk_size=5, **kw)
    mask = labels != -100
    kind = "fkl" if beta == 0 else "rkl" if beta == 1 else "jsd"
    exact, bar, _, _ = float32_bar(student, teacher, kind, beta, temperature, mask.double() / mask.sum())
    assert ((exact - ref).abs() <= 1e-6 * bar).all()  # the same exact gradient, to float64's rounding
    assert torch.isfinite(ours).all()
    err = (ours.double() - ref).abs()
    assert (err <= bar).all(), (err / bar).max().item()
    assert max_error(ours, ref) <= 8 * max_error(trl32, ref) + 1e-12, (max_error(ours, ref), max_error(trl32, ref))


@pytest.mark.parametrize("temperature", TEMPERATURES_SCALE)
@pytest.mark.parametrize("kind,std", [(k, s) for k in ["fkl", "rkl", "tvd", "ajsd", "nla", "lk"] for s in SCALES_GRAD]
                         + [("nla", 1000.0), ("lk", 1000.0)])
def test_token_divergence_gradients_equal_float64_at_every_logit_scale(std, kind, temperature):
    """The analytic gradients of every kind (tvd, ajsd, nla and lk, which TRL lacks, included) equal the
    float64 gradient of the log-space formula up to float32 rounding (float32_bar), entry by entry, at logit
    standard deviations 1 ... 100 (nla and lk up to 1000). The floored version missed the bar by orders of
    magnitude."""
    student, teacher = wide_logits(29 + int(std), std)
    weights = torch.rand(student.shape[:-1], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = student.clone().requires_grad_()
    (D.token_divergence(x, teacher, D.Divergence(kind, temperature=temperature)).double() * weights).sum().backward()
    exact, bar, p_s, p_t = float32_bar(student, teacher, kind, 0.5, temperature, weights)
    assert torch.isfinite(x.grad).all()
    ok = (x.grad.double() - exact).abs() <= bar
    if kind in ("tvd", "nla", "lk"):  # sign(p_S - p_T) jumps where p_S = p_T: leave out positions within 1e-4
        # of a kink
        kink = ((p_s - p_t).abs() < 1e-4 * (p_s + p_t)) & (p_s + p_t > torch.finfo(torch.float32).tiny)
        away = ~kink.any(-1, keepdim=True)  # (B, T, 1)
        assert away.float().mean() > 0.8
        ok |= ~away
    assert ok.all(), ((x.grad.double() - exact).abs() / bar).max().item()


def test_divergence_sum_returns_the_teacher_entropy_at_the_loss_temperature():
    """return_teacher_entropy gives the masked sum of H(p_T) at the loss temperature, without top-p (what
    distill.py logs as loss_teacher_entropy), equal to the float64 entropy; the loss itself is unchanged."""
    student, teacher = logits_pair(seed=57, scale=6.0)
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(3)) < 0.6
    x = student.clone().requires_grad_()
    rkl = D.Divergence("rkl", temperature=0.7)
    total, h_sum, _ = D.divergence_sum(x, teacher, mask, rkl, chunk_size=4, return_teacher_entropy=True)
    p = torch.softmax(teacher.double() / 0.7, -1)
    expected = -(p * p.log()).sum(-1)[mask].sum()
    torch.testing.assert_close(h_sum.double(), expected, rtol=1e-6, atol=0)
    assert not h_sum.requires_grad
    torch.testing.assert_close(total, D.divergence_sum(student, teacher, mask, rkl).total, rtol=1e-6,
                               atol=0)
    total.backward()  # the entropy output does not disturb the gradient
    assert torch.isfinite(x.grad).all()


def test_teacher_entropy_keeps_its_precision_for_near_certain_teachers():
    """H of a near-certain teacher (1e-3 ... 1e-20 nats) from float32 log-probs is within 1e-5 relative of
    float64: the top token's log-prob is rebuilt from the others' mass, not read off log_softmax's rounding."""
    logits = torch.zeros(5, 50, dtype=torch.float64)
    logits[:, 0] = torch.tensor([10.0, 15.0, 20.0, 30.0, 50.0])
    t64 = torch.log_softmax(logits, -1)
    p64 = t64.exp()
    others = (p64[:, 1:] * -t64[:, 1:]).sum(-1)
    expected = others - p64[:, 0] * torch.log1p(-p64[:, 1:].sum(-1))
    ours = D.teacher_entropy(D.log_probs(logits.float(), 1.0))
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(D.teacher_log_entropy(D.log_probs(logits.float(), 1.0)).double(), expected.log(),
                               rtol=1e-6, atol=0)


def test_teacher_log_entropy_is_exact_below_the_smallest_float():
    """ajsd's beta needs log H where H itself underflows float32 (gap 120 nats: H ~ 1e-50): the log-space
    entropy equals float64's log H to 1e-6 relative, where the plain sum gives log 0 = -inf."""
    logits = torch.zeros(3, 40, dtype=torch.float64)
    logits[:, 0] = torch.tensor([100.0, 120.0, 300.0])
    t64 = torch.log_softmax(logits, -1)
    q = t64[:, 1:].exp().sum(-1)
    expected = torch.log((t64[:, 1:].exp() * -t64[:, 1:]).sum(-1) + q)  # top term (1 - q)(-log(1 - q)) ~ q
    ours = D.teacher_log_entropy(D.log_probs(logits.float(), 1.0))
    torch.testing.assert_close(ours.double(), expected, rtol=1e-6, atol=0)
    assert D.teacher_entropy(D.log_probs(logits.float(), 1.0))[1:].max() < 1e-37


# ------------------------------------------------------------------------------------------- invariants
def test_non_negative():
    """Divergences are >= 0 (Gibbs' inequality; |.| for TVD), here across kinds, betas and temperatures."""
    student, teacher = logits_pair(seed=31, scale=4.0)
    for kind in D.DIVERGENCES:
        for beta in BETAS:
            for temperature in TEMPERATURES:
                values = D.token_divergence(student, teacher, D.Divergence(kind, beta=beta, temperature=temperature))
                assert values.min() >= -1e-6, (kind, beta, temperature)


def test_zero_with_zero_gradient_when_student_equals_teacher():
    """A student identical to the teacher is the optimum of every divergence: value 0 and gradient 0."""
    student, _ = logits_pair(seed=32)
    for kind in D.DIVERGENCES:
        x = student.clone().requires_grad_()
        values = D.token_divergence(x, student, D.Divergence(kind, beta=0.3))
        values.sum().backward()
        assert values.abs().max() < 1e-6, kind
        assert x.grad.abs().max() < 1e-6, kind


def test_jsd_rescaled_tends_to_the_kls_at_the_ends():
    """TRL's endpoints are limits after rescaling: JSD(beta)/beta -> FKL as beta -> 0, JSD(beta)/(1-beta) ->
    RKL as beta -> 1 (error O(beta)); this is why jsd at beta 0/1 switches formula instead of being continuous."""
    student, teacher = logits_pair(seed=33, dtype=torch.float64)
    fkl = D.token_divergence(student, teacher, D.Divergence("fkl"))
    rkl = D.token_divergence(student, teacher, D.Divergence("rkl"))
    eps = 1e-7  # the gap is O(eps) (about 200 eps here), so 1e-4 is met only close enough to the end
    torch.testing.assert_close(D.token_divergence(student, teacher, D.Divergence("jsd", beta=eps)) / eps, fkl,
                               rtol=1e-4, atol=0)
    torch.testing.assert_close(D.token_divergence(student, teacher, D.Divergence("jsd", beta=1 - eps)) / eps, rkl,
                               rtol=1e-4,
                               atol=0)


def test_tvd_is_one_minus_acceptance_probability():
    """TVD = 1 - sum_v min(p_T, p_S): the link between the tvd loss and speculative acceptance."""
    student, teacher = logits_pair(seed=34)
    acceptance = torch.minimum(torch.softmax(student, -1), torch.softmax(teacher, -1)).sum(-1)
    torch.testing.assert_close(D.token_divergence(student, teacher, D.Divergence("tvd")), 1 - acceptance, rtol=0,
                               atol=1e-6)


def test_jsd_half_is_at_most_log_two():
    """JSD(0.5) <= log 2, reached by disjoint supports: it is bounded, unlike the KLs."""
    student, teacher = logits_pair(seed=35, scale=30.0)  # nearly one-hot, mostly disjoint
    values = D.token_divergence(student, teacher, D.Divergence("jsd", beta=0.5))
    assert values.max() <= math.log(2) + 1e-6
    assert values.max() > math.log(2) - 1e-3  # the bound is approached, so the check can fail


# ------------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("kind", D.DIVERGENCES)
def test_minus_inf_logits_give_finite_values_and_gradients(kind):
    """Top-k-masked teachers (and students) have -inf logits: the loss and its gradient must stay finite
    (TRL's formula gives NaN there), and a zero probability contributes exactly as 0 log 0 = 0 would."""
    student, teacher = logits_pair(seed=41)
    teacher[..., : V // 2] = -math.inf  # teacher keeps only the top half of the vocabulary
    student[0, 0, -3:] = -math.inf  # and the student rules out a few tokens the teacher allows
    x = student.clone().requires_grad_()
    values = D.token_divergence(x, teacher, D.Divergence(kind, beta=0.5))
    values.sum().backward()
    assert torch.isfinite(values).all() and torch.isfinite(x.grad).all()
    if kind in ("jsd", "tvd"):  # well defined with zero probabilities: must equal the formula
        torch.testing.assert_close(values.double(), ref_divergence(student, teacher, kind), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", D.DIVERGENCES)
def test_huge_logits_stay_finite(kind):
    """Logits of size 1e4 (unnormalised heads, extreme temperatures) must not overflow anywhere."""
    student, teacher = logits_pair(seed=42, scale=1e4)
    x = student.clone().requires_grad_()
    values = D.token_divergence(x, teacher, D.Divergence(kind, beta=0.5, temperature=0.5))
    values.sum().backward()
    assert torch.isfinite(values).all() and torch.isfinite(x.grad).all()


# ------------------------------------------------------------------------------- the memory-lean engine
@pytest.mark.parametrize("kind", D.DIVERGENCES)
def test_divergence_sum_equals_masked_sum_of_token_divergence(kind):
    """divergence_sum (what the training loop calls) is the masked sum of token_divergence, whatever the
    chunking, and its gradient is 0 on masked positions and the same as the unchunked one elsewhere."""
    student, teacher = logits_pair(seed=51)
    mask = random_labels(5) != -100
    grads = []
    for chunk in (1, 4, None):
        x = student.clone().requires_grad_()
        total = D.divergence_sum(x, teacher, mask, D.Divergence(kind, beta=0.3, temperature=0.9),
                                 chunk_size=chunk).total
        total.backward()
        # the kept positions alone (lk's w is the mean alpha over exactly these)
        expected = D.token_divergence(student[mask], teacher[mask], D.Divergence(kind, beta=0.3, temperature=0.9)).sum()
        torch.testing.assert_close(total, expected, rtol=1e-6, atol=1e-6)
        grads.append(x.grad)
    assert torch.equal(grads[0][~mask], torch.zeros_like(grads[0][~mask]))
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=1e-6, atol=1e-9)


def test_non_contiguous_logits_give_the_same_loss_and_gradient():
    """The loop passes shifted logits[:, :-1] (not flattenable without a copy): the blocks walk it in place
    and must give exactly what a contiguous copy gives."""
    student, teacher = logits_pair(seed=52, shape=(B, T + 1, V))
    mask = torch.ones(B, T, dtype=torch.bool)
    x = student.clone().requires_grad_()
    D.divergence_sum(x[:, :-1], teacher[:, :-1], mask, D.Divergence("rkl"), chunk_size=4).total.backward()
    y = student[:, :-1].contiguous().requires_grad_()
    D.divergence_sum(y, teacher[:, :-1].contiguous(), mask, D.Divergence("rkl"), chunk_size=4).total.backward()
    torch.testing.assert_close(x.grad[:, :-1], y.grad, rtol=0, atol=0)
    assert torch.equal(x.grad[:, -1], torch.zeros_like(x.grad[:, -1]))


def test_second_backward_with_retain_graph_gives_the_same_gradient():
    """The forward pass stores the gradient and the first backward consumes it in place; a second backward
    (retain_graph=True) must recompute it rather than return garbage."""
    student, teacher = logits_pair(seed=53)
    x = student.clone().requires_grad_()
    loss = D.generalized_jsd_loss(x, teacher, beta=0.5)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    x.grad = None
    loss.backward()
    torch.testing.assert_close(x.grad, first, rtol=0, atol=0)


def test_teacher_gets_no_gradient():
    """The teacher is frozen: even a teacher tensor with requires_grad receives no gradient."""
    student, teacher = logits_pair(seed=54)
    x, y = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    D.divergence_sum(x, y, None, D.Divergence("jsd")).total.backward()
    assert y.grad is None and x.grad is not None


# ------------------------------------------------------------------------------------ the adaptive JSD
def test_ajsd_beta_is_one_at_zero_entropy_and_decreases_to_the_floor():
    """beta(H) is the documented monotone map: 1 (reverse KL) for a certain teacher, decreasing with the
    entropy toward ajsd_floor; 1 - beta is returned exactly even where beta rounds to 1 in float32."""
    entropy = torch.tensor([0.0, 1e-9, 0.1, 1.0, 3.0, 50.0])
    beta, one_minus = D.ajsd_beta(entropy, scale=1.0, floor=0.5)
    assert beta[0] == 1.0 and torch.all(beta[1:] <= beta[:-1]) and abs(beta[-1] - 0.5) < 1e-6
    assert torch.all(one_minus[1:] > one_minus[:-1])
    torch.testing.assert_close(one_minus[1], torch.tensor(0.5e-9), rtol=1e-6, atol=0)


def test_ajsd_with_constant_beta_is_fixed_beta_jsd_rescaled():
    """With a constant beta (ajsd_scale=0 -> beta = ajsd_floor) ajsd is the fixed-beta jsd divided by
    beta (1 - beta): same minimiser and gradient direction; floor 1 gives exactly rkl, floor 0 exactly fkl."""
    student, teacher = logits_pair(seed=61)
    for b in (0.1, 0.5, 0.9):
        ajsd = D.token_divergence(student, teacher, D.Divergence("ajsd", ajsd_scale=0.0, ajsd_floor=b))
        jsd = D.token_divergence(student, teacher, D.Divergence("jsd", beta=b))
        torch.testing.assert_close(ajsd * b * (1 - b), jsd, rtol=1e-5, atol=1e-7)
    for b, kind in ((1.0, "rkl"), (0.0, "fkl")):
        ajsd = D.token_divergence(student, teacher, D.Divergence("ajsd", ajsd_scale=0.0, ajsd_floor=b))
        torch.testing.assert_close(ajsd, D.token_divergence(student, teacher, D.Divergence(kind)), rtol=1e-5, atol=1e-6)


def test_ajsd_uses_each_positions_own_teacher_entropy():
    """beta is chosen per position from that position's teacher entropy (not one beta per batch): every
    position equals the rescaled fixed-beta jsd at its own beta(H), over entropies from ~0 to ~log V."""
    student, teacher = logits_pair(seed=62, dtype=torch.float64)
    teacher = teacher * torch.logspace(-2, 1, T, dtype=torch.float64).view(1, T, 1)  # spread ... near-certain
    ours = D.token_divergence(student, teacher, D.Divergence("ajsd", ajsd_scale=0.7, ajsd_floor=0.3))
    for i, j in [(b, t) for b in range(B) for t in range(T)]:
        entropy = D.teacher_entropy(torch.log_softmax(teacher[i, j], -1))
        beta = 0.3 + 0.7 * math.exp(-entropy.item() / 0.7)
        expected = (D.token_divergence(student[i, j], teacher[i, j], D.Divergence("jsd", beta=beta))
                    / (beta * (1 - beta)))
        torch.testing.assert_close(ours[i, j], expected, rtol=1e-8, atol=0)


def test_ajsd_is_accurate_in_float32_for_near_certain_teachers():
    """beta -> 1 divides by a tiny 1 - beta (here 1e-10 .. 1e-2, below float32's resolution of beta itself);
    the log-ratio form and the exact teacher entropy (top token's log-prob rebuilt from the others' mass) keep
    float32 within 1e-5 of float64, where a float32 beta rounds to 1 and the naive formula gives 0/0."""
    student, teacher = logits_pair(seed=63, dtype=torch.float64)
    teacher = teacher * torch.linspace(3, 12, T, dtype=torch.float64).view(1, T, 1)  # entropies 1e-1 ... 1e-9
    ref = ref_divergence(student, teacher, "ajsd")
    ours = D.token_divergence(student.float(), teacher.float(), D.Divergence("ajsd"))
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=0)


# --------------------------------------------------------------------------------------- shared vocabulary
def test_shared_vocab_cuts_both_heads_to_the_real_tokens():
    """Qwen-style padded heads (different widths, one tokenizer): cutting both to len(tokenizer) makes them
    comparable, and the result is the loss on the real tokens only."""
    student, teacher = logits_pair(seed=71, shape=(B, T, 40))
    s_cut, t_cut = D.shared_vocab(student[..., :40], torch.cat([teacher, teacher[..., :8]], -1), vocab_size=33)
    assert s_cut.shape == t_cut.shape == (B, T, 33)
    torch.testing.assert_close(D.token_divergence(s_cut, t_cut, D.Divergence("rkl")),
                               D.token_divergence(student[..., :33].contiguous(), teacher[..., :33].contiguous(),
                                                  D.Divergence("rkl")), rtol=0, atol=0)
    same = D.shared_vocab(student, teacher)
    assert same[0] is student and same[1] is teacher


def test_shared_vocab_refuses_real_mismatches():
    """Different widths without a vocab_size, or a vocab_size wider than a head, mean different
    vocabularies: a clear error instead of silently comparing unrelated tokens."""
    student, teacher = torch.zeros(2, 40), torch.zeros(2, 48)
    with pytest.raises(ValueError, match="vocab_size=len"):
        D.shared_vocab(student, teacher)
    with pytest.raises(ValueError, match="exceeds"):
        D.shared_vocab(student, teacher, vocab_size=44)


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="kl"), r"kind='kl'.*\('fkl', 'rkl', 'jsd', 'tvd', 'ajsd', 'nla', 'lk'\)"),
    (dict(kind="lk", lk_scale=-1.0), r"lk_scale=-1.0.*>= 0"),
    (dict(kind="lk", lk_decay=math.nan), r"lk_decay=nan.*finite"),
    (dict(kind="jsd", beta=1.5), r"beta=1.5.*\[0, 1\]"),
    (dict(kind="jsd", beta=-0.1), r"beta=-0.1.*\[0, 1\]"),
    (dict(kind="rkl", temperature=0.0), r"temperature=0.0.*> 0"),
    (dict(kind="rkl", temperature=-1.0), r"temperature=-1.0.*> 0"),
    (dict(kind="ajsd", ajsd_floor=2.0), r"ajsd_floor=2.0.*\[0, 1\]"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, match):
    """A typo in a config must fail loudly, saying what was given and what is allowed."""
    student, teacher = logits_pair(seed=81)
    with pytest.raises(ValueError, match=match):
        D.token_divergence(student, teacher, D.Divergence(**kwargs))


def test_bad_shapes_and_reductions_raise_value_error():
    """Mismatched logits, labels or reductions are caught before any arithmetic, with the shapes named."""
    student, teacher = logits_pair(seed=82)
    with pytest.raises(ValueError, match=r"\(3, 6, 33\).*\(3, 6, 32\)"):
        D.divergence_sum(student, teacher[..., :32], None, D.Divergence("fkl"))
    with pytest.raises(ValueError, match="reduction='avg'.*batchmean"):
        D.generalized_jsd_loss(student, teacher, reduction="avg")
    with pytest.raises(ValueError, match=r"labels of shape \(3, 5\)"):
        D.generalized_jsd_loss(student, teacher, labels=torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"beta=2.0"):
        D.generalized_jsd_loss(student, teacher, beta=2.0)


# ------------------------------------------------------------------------ acceptance objectives (nla, lk)
def grad_of(kind, student, teacher, **kw):
    x = student.clone().requires_grad_()
    D.token_divergence(x, teacher, D.Divergence(kind, **kw)).sum().backward()
    return x.grad


def test_nla_gradient_is_tvds_divided_by_alpha():
    """d(-log alpha) = -d alpha / alpha and d(1 - alpha) = tvd's gradient: nla's gradient is tvd's / alpha per
    position, ties included (both take d alpha / d p_S = 1/2 at s = t). Float64, so the identity is exact."""
    student, teacher = logits_pair(seed=91, dtype=torch.float64)
    student[0, 0, :5] = teacher[0, 0, :5]  # some exact ties ...
    student[0, 0, 5:] = teacher[0, 0, 5:].flip(-1)  # ... with the same normaliser: s = t exactly there
    alpha = torch.minimum(torch.softmax(student, -1), torch.softmax(teacher, -1)).sum(-1, keepdim=True)
    torch.testing.assert_close(grad_of("nla", student, teacher), grad_of("tvd", student, teacher) / alpha,
                               rtol=1e-10, atol=1e-14)


def test_acceptance_gradient_takes_half_at_exact_ties():
    """The tie convention: at s(v) = t(v) exactly, d alpha / d p_S(v) = 1/2. Teacher logits (0, 1, 2, 3),
    student (0, 1, 3, 2): one normaliser, so tokens 0 and 1 tie, p_S > p_T at token 2, p_S < p_T at token 3.
    The gradient of -log alpha w.r.t. z is -(a - p_S sum(a)) with a = c p_S / alpha, c = (1/2, 1/2, 0, 1); the
    strict convention c = 1[p_S < p_T] (or 1[p_S <= p_T]) gives another vector, so this test tells them apart."""
    teacher = torch.tensor([[0.0, 1.0, 2.0, 3.0]], dtype=torch.float64)
    student = torch.tensor([[0.0, 1.0, 3.0, 2.0]], dtype=torch.float64)
    p_s, p_t = torch.softmax(student, -1), torch.softmax(teacher, -1)
    assert torch.equal(D.log_probs(student, 1.0)[0, :2], D.log_probs(teacher, 1.0)[0, :2])  # real ties
    alpha = torch.minimum(p_s, p_t).sum(-1, keepdim=True)

    def expected(c):
        a = torch.tensor([c], dtype=torch.float64) * p_s / alpha
        return -(a - p_s * a.sum(-1, keepdim=True))

    got = grad_of("nla", student, teacher)
    torch.testing.assert_close(got, expected([0.5, 0.5, 0.0, 1.0]), rtol=1e-12, atol=1e-15)
    for strict in ([0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 0.0, 1.0]):
        assert (got - expected(strict)).abs().max() > 1e-3


def test_nla_keeps_relative_precision_where_alpha_is_tiny():
    """alpha as logsumexp(min(s, t)): nearly disjoint one-hot distributions (alpha ~ e^-400, far below float32's
    smallest number) still give -log alpha to float32 precision, where sum(min(p_S, p_T)) in float32 is 0 (inf)."""
    student, teacher = torch.zeros(2, 9), torch.zeros(2, 9)
    student[:, 0], teacher[:, 1] = 400.0, 400.0  # the two put their mass on different tokens
    student[1, 2] = 395.0
    ours = D.token_divergence(student, teacher, D.Divergence("nla"))
    ref = ref_divergence_log(student, teacher, "nla")
    naive = torch.minimum(torch.softmax(student, -1), torch.softmax(teacher, -1)).sum(-1)
    assert (naive == 0).all()  # the probability-space sum underflows
    assert (ref > 390).all()
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=0)
    assert torch.isfinite(grad_of("nla", student, teacher)).all()


def test_nla_with_disjoint_supports_is_the_stated_finite_surrogate():
    """alpha = 0 exactly needs -inf logits on both sides (disjoint supports). With the zero_prob_log stand-in,
    min(s, t) = zero_prob_log at every token, so nla = -zero_prob_log - log V (~87.3 - log V nats in float32),
    finite; the gradient is finite, lowers the student's finite logits (positive entries: descent lowers
    them) and pulls on the student's stand-ins where the teacher has mass (negative entries)."""
    student = torch.randn(2, V, generator=torch.Generator().manual_seed(92))
    teacher = torch.randn(2, V, generator=torch.Generator().manual_seed(93))
    student[:, V // 2:] = -math.inf  # the student lives on the first half ...
    teacher[:, : V // 2] = -math.inf  # ... the teacher on the second
    x = student.clone().requires_grad_()
    values = D.token_divergence(x, teacher, D.Divergence("nla"))
    values.sum().backward()
    surrogate = -D.zero_prob_log(torch.float32) - math.log(V)
    torch.testing.assert_close(values, torch.full_like(values, surrogate), rtol=1e-6, atol=0)
    assert torch.isfinite(x.grad).all()
    assert (x.grad[:, : V // 2] > 0).all() and (x.grad[:, V // 2:] < 0).all()
    lk = D.token_divergence(student, teacher, D.Divergence("lk"))  # mean alpha ~ 0: w = lk_scale = 1: fkl's surrogate
    torch.testing.assert_close(lk, D.token_divergence(student, teacher, D.Divergence("fkl")), rtol=1e-6, atol=0)


def test_lk_is_the_hybrid_with_w_from_the_masked_mean_alpha():
    """lk = w fkl + (1 - w) tvd per position, w = lk_scale exp(-lk_decay mean alpha) over the call's MASKED
    positions: the sum equals that formula, and changing the logits at masked-out positions changes nothing
    (it would if the mean ran over every position)."""
    student, teacher = logits_pair(seed=94, scale=3.0)
    mask = random_labels(7) != -100
    kw = dict(temperature=0.8, lk_scale=1.5, lk_decay=2.0)
    total, _, alpha_sum = D.divergence_sum(student, teacher, mask, D.Divergence("lk", **kw), return_alpha=True)
    p_s, p_t = torch.softmax(student.double() / 0.8, -1), torch.softmax(teacher.double() / 0.8, -1)
    alpha = torch.minimum(p_s, p_t).sum(-1)
    w = 1.5 * torch.exp(-2.0 * alpha[mask].mean())
    fkl = D.token_divergence(student, teacher, D.Divergence("fkl", temperature=0.8))
    tvd = D.token_divergence(student, teacher, D.Divergence("tvd", temperature=0.8))
    torch.testing.assert_close(total.double(), (w * fkl + (1 - w) * tvd)[mask].sum().double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(alpha_sum.double(), alpha[mask].sum(), rtol=1e-6, atol=0)
    other = student.clone()
    other[~mask] = 10 * torch.randn(other[~mask].shape)
    torch.testing.assert_close(D.divergence_sum(other, teacher, mask, D.Divergence("lk", **kw)).total, total,
                               rtol=0, atol=0)


def test_lk_weight_is_a_constant_and_its_ends_are_tvd_and_fkl():
    """No gradient flows through w: lk's gradient is w fkl's + (1 - w) tvd's with w held fixed (a gradient
    through the mean alpha would add a term). lk_scale = 0 makes it tvd, lk_decay = 0 (w = 1) forward KL."""
    student, teacher = logits_pair(seed=95, scale=3.0)
    alpha = torch.minimum(torch.softmax(student.double(), -1), torch.softmax(teacher.double(), -1)).sum(-1)
    w = float(torch.exp(-alpha.mean()))
    expected = w * grad_of("fkl", student, teacher) + (1 - w) * grad_of("tvd", student, teacher)
    torch.testing.assert_close(grad_of("lk", student, teacher), expected, rtol=1e-5, atol=1e-7)
    for kw, kind in ((dict(lk_scale=0.0), "tvd"), (dict(lk_decay=0.0), "fkl")):
        torch.testing.assert_close(D.token_divergence(student, teacher, D.Divergence("lk", **kw)),
                                   D.token_divergence(student, teacher, D.Divergence(kind)), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad_of("lk", student, teacher, **kw), grad_of(kind, student, teacher),
                                   rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kind", D.DIVERGENCES)
def test_divergence_sum_returns_alpha_at_the_loss_temperature(kind):
    """return_alpha gives the masked sum of alpha = sum_v min(p_T, p_S) at the loss temperature (what
    distill.py logs as train_alpha), equal to the float64 formula for every kind; the loss is unchanged and the
    outputs are LossSums(total, teacher_entropy, alpha). At temperature 1 it is another number."""
    student, teacher = logits_pair(seed=96, scale=3.0)
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(4)) < 0.6
    x = student.clone().requires_grad_()
    total, h_sum, a_sum = D.divergence_sum(x, teacher, mask, D.Divergence(kind, temperature=0.6), chunk_size=4,
                                           return_teacher_entropy=True, return_alpha=True)

    def alpha_at(tau):
        p_s, p_t = torch.softmax(student.double() / tau, -1), torch.softmax(teacher.double() / tau, -1)
        return torch.minimum(p_s, p_t).sum(-1)[mask].sum()

    torch.testing.assert_close(a_sum.double(), alpha_at(0.6), rtol=1e-6, atol=0)
    assert abs(float(a_sum) - float(alpha_at(1.0))) > 1e-2
    assert not a_sum.requires_grad
    only_alpha = D.divergence_sum(student, teacher, mask, D.Divergence(kind, temperature=0.6), return_alpha=True)
    assert only_alpha.teacher_entropy is None
    torch.testing.assert_close(only_alpha.alpha, a_sum, rtol=1e-6, atol=0)
    at_06 = D.Divergence(kind, temperature=0.6)
    torch.testing.assert_close(total, D.divergence_sum(student, teacher, mask, at_06).total, rtol=1e-6, atol=0)
    total.backward()
    assert torch.isfinite(x.grad).all()
