"""divergences.hidden_divergence_sum: the loss from hidden states and lm_head weights (the projection fused in).

p_T = teacher, p_S = student. The reference is divergence_sum on the logits hidden @ head^T, with autograd
through the projection: values, dD/d(student hidden) and dD/d(student head) must be equal, for every kind.
With bf16 hidden states and weights (what a bf16 model gives), the loss must sit at the float32 floor of the
float64 computation from the same values, far from what the bf16-rounded logits give.
"""
import pytest
import torch

import divergences as D

N, H_S, H_T, V = 11, 16, 24, 40


def inputs(seed=0, n=N, h_s=H_S, h_t=H_T, v_s=V, v_t=V, scale=0.6, dtype=torch.float32):
    """(student hidden (n, H_s), student head (V_s, H_s), teacher hidden, teacher head), float64 then cast."""
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape, s=1.0: (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype)  # noqa: E731
    return make(n, h_s), make(v_s, h_s, s=scale), make(n, h_t), make(v_t, h_t, s=scale)


def reference(s_hidden, s_head, t_hidden, t_head, mask, divergence, vocab=None):
    """divergence_sum on the logits, autograd through the projection: (sum, grad hidden, grad head)."""
    x, w = s_hidden.detach().clone().requires_grad_(), s_head.detach().clone().requires_grad_()
    s_logits, t_logits = D.shared_vocab(x @ w.t(), t_hidden @ t_head.t(), vocab)
    total = D.divergence_sum(s_logits, t_logits, mask, divergence).total
    total.backward()
    return total.detach(), x.grad, w.grad


def fused(s_hidden, s_head, t_hidden, t_head, mask, divergence, **kw):
    """hidden_divergence_sum and its gradients: (sum, grad hidden, grad head)."""
    x, w = s_hidden.detach().clone().requires_grad_(), s_head.detach().clone().requires_grad_()
    total = D.hidden_divergence_sum((x, w), (t_hidden, t_head), mask, divergence, **kw).total
    total.backward()
    return total.detach(), x.grad, w.grad


def some_masked(n=N, seed=1):
    mask = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.7
    mask[0], mask[1] = True, False
    return mask


def assert_close_to_float32(actual, expected):
    """Equal to float32 precision, relative to the tensor's scale (entries near 0 carry the large ones' rounding)."""
    torch.testing.assert_close(actual, expected, rtol=2e-5, atol=2e-5 * expected.abs().max().item())


# ------------------------------------------------------------------------------- equal to the logits path
@pytest.mark.parametrize("kind", D.DIVERGENCES)
def test_equals_divergence_sum_on_the_float32_logits_with_gradients(kind):
    """Every kind, masked positions, temperature 0.7, several blocks (chunk_size 3), different hidden sizes:
    the value and the gradients for the student's hidden states and head equal the logits path's."""
    s_h, s_w, t_h, t_w = inputs()
    divergence = D.Divergence(kind, beta=0.3, temperature=0.7, ajsd_scale=0.5, ajsd_floor=0.25)
    ref = reference(s_h, s_w, t_h, t_w, some_masked(), divergence)
    ours = fused(s_h, s_w, t_h, t_w, some_masked(), divergence, chunk_size=3)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(ours[1:], ref[1:]):
        assert a.dtype == torch.float32
        assert_close_to_float32(a, b)


@pytest.mark.parametrize("kind", D.DIVERGENCES)
def test_teacher_entropy_equals_divergence_sums(kind):
    """return_teacher_entropy: the summed H(p_T) over the kept positions is the logits path's (a constant)."""
    s_h, s_w, t_h, t_w = inputs(seed=2)
    mask = some_masked()
    divergence = D.Divergence(kind, temperature=0.6)
    _, ent_ref, _ = D.divergence_sum(s_h @ s_w.t(), t_h @ t_w.t(), mask, divergence, return_teacher_entropy=True)
    total, ent, _ = D.hidden_divergence_sum((s_h.requires_grad_(), s_w), (t_h, t_w), mask, divergence,
                                            return_teacher_entropy=True)
    torch.testing.assert_close(ent, ent_ref, rtol=1e-5, atol=1e-6)
    assert total.requires_grad and not ent.requires_grad


@pytest.mark.parametrize("kind", D.DIVERGENCES)
def test_alpha_and_the_lk_options_agree_with_divergence_sum(kind):
    """return_alpha (distill.py's train_alpha) through the fused path: the summed alpha over the kept positions
    is the logits path's for every kind, after the entropy in the outputs; lk_scale / lk_decay reach the loss
    (lk's w from the mean alpha over the kept positions in both paths: the values and gradients agree)."""
    s_h, s_w, t_h, t_w = inputs(seed=3)
    mask = some_masked()
    divergence = D.Divergence(kind, temperature=0.6, lk_scale=1.7, lk_decay=0.4)
    total_ref, ent_ref, alpha_ref = D.divergence_sum(s_h @ s_w.t(), t_h @ t_w.t(), mask, divergence,
                                                     return_teacher_entropy=True, return_alpha=True)
    total, ent, alpha = D.hidden_divergence_sum((s_h.clone().requires_grad_(), s_w), (t_h, t_w), mask, divergence,
                                                return_teacher_entropy=True, return_alpha=True)
    torch.testing.assert_close(alpha, alpha_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((total, ent), (total_ref, ent_ref), rtol=1e-5, atol=1e-6)
    assert not alpha.requires_grad and 0 < float(alpha) <= int(mask.sum())
    only = D.hidden_divergence_sum((s_h, s_w), (t_h, t_w), mask, divergence, return_alpha=True)  # no grad
    assert only.teacher_entropy is None
    torch.testing.assert_close(only.alpha, alpha_ref, rtol=1e-5, atol=1e-6)
    ref = reference(s_h, s_w, t_h, t_w, mask, divergence)
    ours = fused(s_h, s_w, t_h, t_w, mask, divergence, chunk_size=4)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(ours[1:], ref[1:]):
        assert_close_to_float32(a, b)
    if kind == "lk":  # the options matter: the defaults give another value
        defaults = D.divergence_sum(s_h @ s_w.t(), t_h @ t_w.t(), mask, D.Divergence("lk", temperature=0.6))
        assert abs(float(ref[0]) - float(defaults.total)) > 1e-3


def test_leading_shape_and_no_mask():
    """Hidden states (B, C, H) with a (B, C) mask read as the flattened positions; mask=None is every one."""
    s_h, s_w, t_h, t_w = inputs(n=12)
    mask = some_masked(12)
    flat = D.hidden_divergence_sum((s_h, s_w), (t_h, t_w), mask, D.Divergence("rkl")).total
    shaped = D.hidden_divergence_sum((s_h.view(3, 4, -1), s_w), (t_h.view(3, 4, -1), t_w), mask.view(3, 4),
                                     D.Divergence("rkl")).total
    torch.testing.assert_close(shaped, flat)
    everywhere = D.hidden_divergence_sum((s_h, s_w), (t_h, t_w), None, D.Divergence("rkl")).total
    torch.testing.assert_close(everywhere, D.divergence_sum(s_h @ s_w.t(), t_h @ t_w.t(), None,
                                                            D.Divergence("rkl")).total)


def test_a_wider_lm_head_compares_the_shared_vocabulary_only():
    """lm_heads wider than the tokenizer (padding rows, different per model): with vocab_size the loss equals
    the logits path on the cut logits (shared_vocab), however loud the padding rows, and the student head's
    padding rows get exactly zero gradient."""
    s_h, s_w, t_h, t_w = inputs(seed=3, v_s=V + 7, v_t=V + 3)
    s_w[V:], t_w[V:] = 50.0, 50.0                                     # would take all the mass if counted
    mask = some_masked()
    ref = reference(s_h, s_w, t_h, t_w, mask, D.Divergence("jsd", beta=0.5), vocab=V)
    ours = fused(s_h, s_w, t_h, t_w, mask, D.Divergence("jsd", beta=0.5), vocab_size=V)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-6)
    assert_close_to_float32(ours[1], ref[1])
    assert_close_to_float32(ours[2], ref[2])
    assert ours[2].shape == (V + 7, H_S) and torch.equal(ours[2][V:], torch.zeros(7, H_S))
    with pytest.raises(ValueError, match="vocab_size=len"):
        D.hidden_divergence_sum((s_h, s_w), (t_h, t_w), mask, D.Divergence("jsd"))


def test_fully_masked_batch_gives_zero_and_zero_gradients():
    """No kept position: the sum, the entropy sum and both gradients are exactly 0 (not NaN)."""
    s_h, s_w, t_h, t_w = inputs()
    x, w = s_h.clone().requires_grad_(), s_w.clone().requires_grad_()
    total, ent, _ = D.hidden_divergence_sum((x, w), (t_h, t_w), torch.zeros(N, dtype=torch.bool), D.Divergence("ajsd"),
                                            return_teacher_entropy=True)
    total.backward()
    assert float(total.detach()) == 0.0 and float(ent) == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(w.grad, torch.zeros_like(w))


def test_tied_head_gradient_accumulates_onto_the_embedding():
    """A tied lm_head is the embedding matrix: the loss's head gradient adds onto the gradient of the embedding
    lookup in the same parameter, exactly as autograd through `hidden @ embedding^T` does."""
    emb = torch.nn.Embedding(V, H_S)
    ids = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(4))
    _, _, t_h, t_w = inputs(seed=4)

    def grad_of(loss_fn):
        emb.zero_grad()
        hidden = torch.tanh(emb(ids))                                 # (N, H_S): depends on the same weight
        loss_fn(hidden).backward()
        return emb.weight.grad.clone()

    ref = grad_of(lambda h: D.divergence_sum(h @ emb.weight.t(), t_h @ t_w.t(), None, D.Divergence("rkl")).total)
    ours = grad_of(lambda h: D.hidden_divergence_sum((h, emb.weight), (t_h, t_w), None, D.Divergence("rkl")).total)
    assert_close_to_float32(ours, ref)


def test_autocast_does_not_round_the_projection():
    """Inside a bf16 autocast region (the training loop's) the projection still runs in float32: the result
    equals the one outside autocast."""
    s_h, s_w, t_h, t_w = inputs(seed=5)
    outside = fused(s_h, s_w, t_h, t_w, None, D.Divergence("fkl", temperature=0.6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = fused(s_h, s_w, t_h, t_w, None, D.Divergence("fkl", temperature=0.6))
    for a, b in zip(inside, outside):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_bf16_weights_project_the_same_numbers_as_float32():
    """A bf16 head is upcast tile by tile (HEAD_TILE_ROWS rows at a time): the loss and gradients equal those
    from the float32 copies of the very same values; the gradients come back in bf16, the inputs' dtype."""
    s_h, s_w, t_h, t_w = inputs(seed=6, v_s=45, v_t=45, dtype=torch.bfloat16)
    old = D.HEAD_TILE_ROWS
    D.HEAD_TILE_ROWS = 16                                             # several tiles, the last one partial
    try:
        bf = fused(s_h, s_w, t_h, t_w, some_masked(), D.Divergence("tvd"))
    finally:
        D.HEAD_TILE_ROWS = old
    f32 = fused(*(x.float() for x in (s_h, s_w, t_h, t_w)), some_masked(), D.Divergence("tvd"))
    assert bf[0].dtype == torch.float32 and bf[1].dtype == bf[2].dtype == torch.bfloat16
    torch.testing.assert_close(bf[0], f32[0], rtol=1e-6, atol=1e-7)
    for a, b in zip(bf[1:], f32[1:]):
        torch.testing.assert_close(a, b.bfloat16(), rtol=1.6e-2, atol=1e-2 * b.abs().max().item())


def test_teacher_gets_no_gradient_and_second_backward_repeats():
    """The teacher is a constant; backward twice (retain_graph) gives the same student gradient twice."""
    s_h, s_w, t_h, t_w = inputs(seed=7)
    x, tw = s_h.clone().requires_grad_(), t_w.clone().requires_grad_()
    th = t_h.clone().requires_grad_()
    total = D.hidden_divergence_sum((x, s_w), (th, tw), None, D.Divergence("jsd")).total
    total.backward(retain_graph=True)
    first = x.grad.clone()
    x.grad = None
    total.backward()
    torch.testing.assert_close(x.grad, first, rtol=0, atol=0)
    assert th.grad is None and tw.grad is None


def test_bad_shapes_are_named():
    """A head that does not match its hidden size, or hidden states of different positions, are refused."""
    s_h, s_w, t_h, t_w = inputs()
    with pytest.raises(ValueError, match=r"student_head .*\(V, 16\)"):
        D.hidden_divergence_sum((s_h, t_w), (t_h, t_w), None, D.Divergence("fkl"))
    with pytest.raises(ValueError, match="same leading shape"):
        D.hidden_divergence_sum((s_h[:5], s_w), (t_h, t_w), None, D.Divergence("fkl"))
    with pytest.raises(ValueError, match="kind="):
        D.hidden_divergence_sum((s_h, s_w), (t_h, t_w), None, D.Divergence("kl"))


# -------------------------------------------------------------------- bf16 inputs at the float32 floor
def cosine(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("eps, kl, rtol", [(7e-4, 5e-6, 3e-2), (0.027, 1e-2, 1e-4)])
def test_bf16_hidden_states_and_weights_reach_the_float32_floor(eps, kl, rtol):
    """At Qwen's vocabulary (V = 151936, 64 tokens, logits of std 4, T 0.6, forward KL), bf16 hidden states and
    head: the loss is within rtol of the float64 computation from the same (upcast) values -- 3e-2 at a KL of
    ~5e-6 per token, 1e-4 at ~1e-2 (the float32 logits' own rounding is the floor) -- and the gradients for
    the hidden states and the head have cosine >= 0.9999 to float64's. The bf16-rounded logits (what a bf16
    lm_head returns) miss by more than 2x at the small KL: the test can tell the two apart."""
    v, n, h = 151936, 64, 64
    g = torch.Generator().manual_seed(0)
    head = (torch.randn(v, h, generator=g) * 0.5).bfloat16()          # logits std 0.5 * sqrt(64) = 4
    t_hidden = torch.randn(n, h, generator=g).bfloat16()
    s_hidden = (t_hidden.float() + eps * torch.randn(n, h, generator=g)).bfloat16()
    exact = fused(s_hidden.double(), head.double(), t_hidden.double(), head.double(), None,
                  D.Divergence("fkl", temperature=0.6))
    assert kl / 3 < float(exact[0]) / n < kl * 3                       # the regime the tolerance is for
    ours = fused(s_hidden, head, t_hidden, head, None, D.Divergence("fkl", temperature=0.6))
    assert abs(float(ours[0]) / float(exact[0]) - 1) < rtol
    assert cosine(ours[1], exact[1]) >= 0.9999 and cosine(ours[2], exact[2]) >= 0.9999
    if kl < 1e-4:
        rounded = D.divergence_sum((s_hidden.float() @ head.float().t()).bfloat16(),
                                   (t_hidden.float() @ head.float().t()).bfloat16(), None,
                                   D.Divergence("fkl", temperature=0.6)).total
        assert float(rounded) / float(exact[0]) > 2


@pytest.mark.parametrize("dtype, elements", [(torch.float32, D.HIDDEN_CHUNK_ELEMENTS),
                                             (torch.bfloat16, D.HIDDEN_CHUNK_ELEMENTS_UPCAST)])
def test_the_default_block_is_larger_when_the_heads_must_be_upcast(monkeypatch, dtype, elements):
    """A head stored below the compute dtype (bf16 -> float32) is upcast tile by tile in every block, so its
    default block holds HIDDEN_CHUNK_ELEMENTS_UPCAST logits (fewer upcasts), a float32 head's
    HIDDEN_CHUNK_ELEMENTS (less memory): the block the sweep gets must follow the heads' dtype."""
    seen = []
    sweep = D._hidden_sweep

    def spy(*args, **kwargs):
        seen.append(args[5])                                  # chunk_size, positional after vocab
        return sweep(*args, **kwargs)

    monkeypatch.setattr(D, "_hidden_sweep", spy)
    V, H = 64, 8
    g = torch.Generator().manual_seed(0)
    hidden, head = torch.randn(5, H, generator=g).to(dtype), torch.randn(V, H, generator=g).to(dtype)
    with torch.no_grad():
        D.hidden_divergence_sum((hidden, head), (hidden, head), None, D.Divergence("fkl"))
    assert seen == [elements // V]
