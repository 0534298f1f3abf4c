"""Tests of specdec.py: exact batched speculative decoding (p = target, q = draft) and its metrics.

All models are tiny random decoders built here (hidden 32, 2 layers). A large initializer range makes
their next-token distributions peaked, so greedy decoding has no near-ties and drafts get both accepted
and rejected. "Perturbed copy" drafts (the target's weights plus noise) agree with the target often
enough to exercise whole accepted blocks, bonus tokens and rejections in the same run.

SPECDEC_TEST_DEVICE=cuda runs every test on a GPU (default: cpu), to check that exactness survives GPU kernels.
"""
import math
import os

import pytest
import torch
from transformers import (DynamicCache, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)
from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

import entropy
import specdec
from plumbing import cpu_memory, kv_cache, topp
from plumbing.decoding_args import resolve_stop_ids
from plumbing.topp import top_p_keep
from specdec import (accept_or_resample, autoregressive_generate, counted_drafts, emit_tokens,
                     process_logits, residual, sample, speculative_generate)

DEVICE = torch.device(os.environ.get("SPECDEC_TEST_DEVICE", "cpu"))
ARCHS = ("qwen3", "llama", "gpt2")
PROMPT_LENS = (1, 5, 12, 3)  # a jagged batch, including a one-token prompt


def tiny_model(arch, seed, vocab=96, hidden=32, layers=2, init=0.5):
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, initializer_range=init, eos_token_id=None, bos_token_id=None)
    if arch == "qwen3":
        config = Qwen3Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                             max_position_embeddings=128, pad_token_id=None, **common)
        return Qwen3ForCausalLM(config).eval().to(DEVICE)
    if arch == "llama":
        config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                             pad_token_id=None, **common)
        return LlamaForCausalLM(config).eval().to(DEVICE)
    config = GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=128, **common)
    return GPT2LMHeadModel(config).eval().to(DEVICE)


def perturbed_copy(model, seed, noise=0.03):
    """A draft that agrees with the target often but not always: its weights plus Gaussian noise."""
    draft = type(model)(model.config).eval().to(DEVICE)
    draft.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in draft.parameters():
            param.add_(noise * param.std() * torch.randn(param.shape, generator=gen).to(DEVICE))
    return draft


def make_prompts(lens=PROMPT_LENS, vocab=96, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lens]


def hf_greedy(model, prompt, n):
    """The reference: transformers' own greedy decoding of one prompt alone, exactly n new tokens."""
    ids = torch.tensor([prompt], device=DEVICE)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                         min_new_tokens=n, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def pairs():
    """target, perturbed draft, prompts and the target's own greedy continuations, per architecture."""
    result = {}
    for arch in ARCHS:
        target = tiny_model(arch, 0)
        prompts = make_prompts()
        result[arch] = (target, perturbed_copy(target, 1), prompts, [hf_greedy(target, p, 24) for p in prompts])
    return result


# ----------------------------------------------------------------------------- greedy exactness

@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_target_generate_for_every_row_and_gamma(arch, pairs):
    """temperature 0 must reproduce the target's own greedy decoding token for token, for every row of a
    jagged batch (pads, holes, per-row positions, cache compaction and eviction must all be invisible)
    and every gamma; the run must also contain both accepted and rejected drafts, or it tests nothing."""
    target, draft, prompts, reference = pairs[arch]
    for gamma in (1, 2, 5, 8):
        result = speculative_generate(target, draft, prompts, gamma=gamma, max_new_tokens=24, temperature=0,
                                      eos_token_id=[])
        assert result.tokens == reference, f"gamma={gamma}"
        assert 0 < result.stats["accepted"] < result.stats["drafted"], f"gamma={gamma}"


def test_cache_compaction_is_exercised_and_invisible(pairs, monkeypatch):
    """Compacting a cache full of holes (rejected drafts) moves every key/value slot; it must happen on a run with
    many rejections and must not change a single token compared with never compacting."""
    target, draft, prompts, reference = pairs["llama"]
    calls = []
    original = kv_cache.compact
    monkeypatch.setattr(kv_cache, "compact", lambda cache, mask: calls.append(mask.shape) or original(cache, mask))
    kwargs = dict(gamma=8, max_new_tokens=24, temperature=0, eos_token_id=[])
    compacted = speculative_generate(target, draft, prompts, **kwargs)
    assert len(calls) > 0
    assert compacted.tokens == speculative_generate(target, draft, prompts, compact=False, **kwargs).tokens == reference


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_ready_made_4d_mask_gives_the_logits_of_transformers_own_mask(arch, implementation):
    """kv_cache.forward hands the model a 4-D mask built from the 2-D slot mask instead of letting transformers build it; it
    must be the same mask, so the logits must be bit-identical to a call with the 2-D mask, for a prefill with left
    padding, a multi-token call over a cache with holes (verification) and a one-token call (drafting)."""
    model = tiny_model(arch, 0)
    model.set_attn_implementation(implementation)
    ids, mask = kv_cache.left_pad(make_prompts(), DEVICE)  # (B, T)

    def both(x, slot_mask, positions, caches):
        ours = kv_cache.forward(model, x, slot_mask, positions, caches[0])
        theirs = model(input_ids=x, attention_mask=slot_mask, position_ids=positions, use_cache=True,
                       **{kv_cache.cache_kwarg(type(model)): caches[1]}).logits
        return ours, theirs

    caches = (DynamicCache(), DynamicCache())
    with torch.no_grad():
        checks = [both(ids, mask, (mask.cumsum(1) - 1).clamp(min=0), caches)]
        n_seq = mask.sum(1, keepdim=True)  # (B, 1)
        holes = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 1], [0, 1, 0]], device=DEVICE)  # (B, 3)
        mask = torch.cat([mask, holes], 1)
        checks.append(both(ids[:, :3], mask, n_seq + holes.cumsum(1) - 1, caches))
        mask = torch.cat([mask, torch.ones_like(n_seq)], 1)
        checks.append(both(ids[:, :1], mask, n_seq + 3, caches))
    for ours, theirs in checks:
        assert torch.equal(ours, theirs)


def test_greedy_batch_of_one_with_one_token_prompt(pairs):
    """The smallest input (one row, one prompt token, so nothing to prefill) must still be exact."""
    target, draft, _, _ = pairs["qwen3"]
    prompt = [7]
    result = speculative_generate(target, draft, [prompt], gamma=3, max_new_tokens=10, temperature=0, eos_token_id=[])
    assert result.tokens == [hf_greedy(target, prompt, 10)]


def test_autoregressive_greedy_equals_generate(pairs):
    """The baseline sampler must be the target itself: same tokens as transformers' greedy generate on a jagged
    batch (left padding and eviction must not change a row)."""
    target, _, prompts, reference = pairs["llama"]
    result = autoregressive_generate(target, prompts, max_new_tokens=24, temperature=0, eos_token_id=[])
    assert result.tokens == reference


def test_per_row_generators_sample_each_row_as_it_would_alone(pairs):
    """With a list of generators (one per prompt), row i of a jagged batch is exactly what prompt i samples
    alone with generator i, whichever rows share its batch and whenever they stop (rows are evicted at stop
    ids): distill.py relies on it to sample the same completions on 1 or N ranks. One shared generator does
    not have this property (the rows' draws interleave), so the comparison can fail."""
    target, _, prompts, _ = pairs["qwen3"]
    kw = dict(max_new_tokens=12, temperature=1.0, eos_token_id=[5, 9, 17])

    def gens(seeds):
        return [torch.Generator(DEVICE).manual_seed(s) for s in seeds]

    batched = autoregressive_generate(target, prompts, generator=gens(range(len(prompts))), **kw).tokens
    alone = [autoregressive_generate(target, [p], generator=gens([i]), **kw).tokens[0] for i, p in enumerate(prompts)]
    assert batched == alone
    assert len({len(t) for t in batched}) > 1                      # rows stopped at different times
    reversed_batch = autoregressive_generate(target, prompts[::-1], generator=gens(range(len(prompts)))[::-1],
                                             **kw).tokens
    assert reversed_batch[::-1] == batched
    shared = autoregressive_generate(target, prompts, generator=torch.Generator(DEVICE).manual_seed(0), **kw).tokens
    assert shared != batched
    with pytest.raises(ValueError, match="one torch.Generator per prompt"):
        autoregressive_generate(target, prompts, generator=gens([0]), **kw)


def test_lm_heads_of_different_widths_use_the_shared_vocabulary():
    """A draft whose lm_head has padding columns (wider vocabulary, same tokenizer), with vocab_size saying so,
    is compared on the shared vocabulary: the output is still exactly the target's greedy decoding."""
    target = tiny_model("qwen3", 0, vocab=96)
    draft = tiny_model("qwen3", 1, vocab=112)
    prompts = make_prompts()
    result = speculative_generate(target, draft, prompts, gamma=4, max_new_tokens=12, temperature=0, eos_token_id=[],
                                  vocab_size=96)
    assert result.tokens == [hf_greedy(target, p, 12) for p in prompts]
    assert max(t for row in result.tokens for t in row) < 96


# ----------------------------------------------------------------------------- sampling exactness

def sampling_setup():
    """A tiny vocabulary, two unrelated random models, and the sampling rules applied to both."""
    target = tiny_model("qwen3", 10, vocab=64, init=0.3)
    draft = perturbed_copy(target, 11, noise=0.06)  # acceptance about one half
    rules = dict(temperature=0.8, top_k=12, top_p=0.9)
    return target, draft, [3, 17, 42], rules


def target_two_token_distribution(target, prompt, rules):
    """Exact P_p(t1, t2) after temperature/top-k/top-p: p(t1 | prompt) * p(t2 | prompt, t1). -> (V, V)."""
    with torch.no_grad():
        p1 = process_logits(target(torch.tensor([prompt], device=DEVICE)).logits[0, -1], **rules)  # (V,)
        V = p1.shape[0]
        prefix = torch.tensor([prompt], device=DEVICE).expand(V, -1)  # (V, T)
        ids = torch.cat([prefix, torch.arange(V, device=DEVICE)[:, None]], 1)  # (V, T+1)
        p2 = process_logits(target(ids).logits[:, -1], **rules)  # (V, V)
    return (p1[:, None] * p2).cpu()


def chi_square_p_value(counts, expected):
    """Pearson's chi-square test; cells expected < 5 are pooled into one. Upper tail via the regularized gamma."""
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    assert obs[~keep].sum() == 0, "a token pair the target can never produce was generated"
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat.double() / 2))


@pytest.mark.parametrize("batch_size", [None, 1024])
def test_speculative_sampling_reproduces_the_target_distribution(batch_size):
    """The speculative output must be distributed exactly as the target's (temperature, top-k, top-p applied to p
    and q alike). 6000 samples of the first two tokens, all rows of one batch (or streamed through 1024 slots),
    must pass a chi-square test against the exactly computed P_p(t1, t2); a sampler that skipped the residual
    correction fails it by far."""
    target, draft, prompt, rules = sampling_setup()
    n = 6000
    result = speculative_generate(target, draft, [prompt] * n, gamma=2, max_new_tokens=2, eos_token_id=[], seed=0,
                                  batch_size=batch_size, **rules)
    V = 64
    pairs_ = torch.tensor(result.tokens)  # (n, 2)
    counts = torch.bincount(pairs_[:, 0] * V + pairs_[:, 1], minlength=V * V).double()
    expected = n * target_two_token_distribution(target, prompt, rules).flatten().double()
    assert 0.2 < result.stats["acceptance_rate"] < 0.9  # both branches (accept, resample) are exercised
    assert chi_square_p_value(counts, expected) > 1e-3


def test_autoregressive_sampling_reproduces_the_target_distribution():
    """The baseline sampler must also draw from the processed p: same chi-square test, with a torch.Generator."""
    target, _, prompt, rules = sampling_setup()
    n = 6000
    result = autoregressive_generate(target, [prompt] * n, max_new_tokens=2, eos_token_id=[],
                                     generator=torch.Generator(DEVICE).manual_seed(1), **rules)
    pairs_ = torch.tensor(result.tokens)
    counts = torch.bincount(pairs_[:, 0] * 64 + pairs_[:, 1], minlength=64 * 64).double()
    expected = n * target_two_token_distribution(target, prompt, rules).flatten().double()
    assert chi_square_p_value(counts, expected) > 1e-3


def test_per_position_acceptance_matches_sum_of_min_p_q():
    """Position i is accepted with probability beta_i = sum_x min(p_i, q_i) once it is reached. At position 1 beta
    is a fixed number computed here from both models' logits; the recorded acceptance_prob must equal it and the
    observed frequency must agree within 4.5 standard errors; at position 2 (reached when position 1 was accepted)
    the frequency must agree with the mean recorded beta of the reached positions."""
    target, draft, prompt, rules = sampling_setup()
    n = 6000
    result = speculative_generate(target, draft, [prompt] * n, gamma=2, max_new_tokens=2, eos_token_id=[], seed=1,
                                  record=True, **rules)
    rec = {k: v[: 2 * n] for k, v in result.records.items()}  # the first round: (row, 1), (row, 2) for every row
    with torch.no_grad():
        p1 = process_logits(target(torch.tensor([prompt], device=DEVICE)).logits[0, -1], **rules)
        q1 = process_logits(draft(torch.tensor([prompt], device=DEVICE)).logits[0, -1], **rules)
    beta1 = torch.minimum(p1, q1).sum().item()
    first = torch.nonzero(rec["position"] == 1).squeeze(1)
    assert first.numel() == n
    assert torch.allclose(rec["acceptance_prob"][first], torch.tensor(beta1), atol=1e-5)
    freq1 = rec["accepted"][first].float().mean().item()
    assert abs(freq1 - beta1) < 4.5 * math.sqrt(beta1 * (1 - beta1) / n)
    # position 2 is reached iff position 1 was accepted; its record follows the row's position-1 record
    reached = first[rec["accepted"][first]] + 1
    assert bool((rec["position"][reached] == 2).all()) and bool((rec["row"][reached] == rec["row"][reached - 1]).all())
    beta2 = rec["acceptance_prob"][reached].double().mean().item()
    freq2 = rec["accepted"][reached].float().mean().item()
    assert abs(freq2 - beta2) < 4.5 * math.sqrt(beta2 * (1 - beta2) / reached.numel())


def test_process_logits_matches_transformers_warpers():
    """process_logits must apply the same temperature -> top-k -> top-p rules as transformers' generate(do_sample),
    so our baseline and generate() sample the same distribution."""
    logits = torch.randn(5, 50) * 3
    expected = logits.clone()
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(10), TopPLogitsWarper(0.8)):
        expected = warper(None, expected)
    assert torch.allclose(process_logits(logits, 0.7, 10, 0.8), expected.softmax(-1), atol=1e-6)
    assert torch.equal(process_logits(logits, 0, 0, 1.0).argmax(-1), logits.argmax(-1))
    assert torch.equal(process_logits(logits, 0, 0, 1.0).sum(-1), torch.ones(5))


# ----------------------------------------------------------------------------- the real vocabulary (V = 151936)

QWEN3_V = 151936  # the Qwen3 lm_head width (151669 tokenizer tokens + 267 padding rows)


def hf_top_p_reference(logits, top_k, top_p):
    """transformers' own warpers (top-k then top-p) run in float64: HF's rule without float32 rounding."""
    scores = logits.double()
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    return TopPLogitsWarper(top_p)(None, scores).softmax(-1)


@pytest.mark.parametrize("scale,top_k,top_p", [  # near-uniform rows, a nucleus of ~10^4 tokens, peaked rows
    (1.0, 0, 0.95), (3.0, 0, 0.95), (3.0, 0, 0.5), (12.0, 0, 0.9), (3.0, 50, 0.9), (3.0, 0, 1e-9)])
def test_top_p_at_the_real_vocabulary_keeps_exactly_hf_set(scale, top_k, top_p):
    """At V = 151936 the sort-free top-p (bucket search; and the CUDA path's full sort) must keep exactly the
    tokens transformers' TopPLogitsWarper keeps (computed in float64), and the kept probabilities must be
    the renormalised softmax; a rule off by one rank, or one that drops the kept token's own mass, fails."""
    logits = torch.randn(2, QWEN3_V, generator=torch.Generator().manual_seed(int(scale * 10) + top_k)) * scale
    expected = hf_top_p_reference(logits, top_k, top_p)
    probs = logits.double().softmax(-1)
    if top_k:
        kth = probs.topk(top_k, dim=-1).values[:, -1:]
        probs = torch.where(probs >= kth, probs, 0.0)
    for full_sort in (False, True):
        assert torch.equal(top_p_keep(probs.float(), top_p, full_sort=full_sort), expected > 0)
    got = process_logits(logits, 1.0, top_k, top_p)
    assert torch.equal(got > 0, expected > 0)
    assert torch.allclose(got.double(), expected, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("full_sort", [False, True])
def test_top_p_with_ties_and_a_near_uniform_row(full_sort):
    """A random-weight model's row is near-uniform (every p within 1% of 1/V, one float bucket), and bf16
    logits make exact ties common. Within ties HF keeps an unspecified subset (torch.sort is not stable), so
    the kept COUNT and the multiset of kept probabilities must equal HF's (float64), row by row."""
    gen = torch.Generator().manual_seed(9)
    logits = torch.cat([(torch.randn(2, QWEN3_V, generator=gen) * 0.01),  # near-uniform
                        (torch.randn(2, QWEN3_V, generator=gen) * 2).bfloat16().float()])  # ties everywhere
    probs = logits.softmax(-1)
    for top_p in (0.3, 0.95):
        expected = TopPLogitsWarper(top_p)(None, probs.double().log()).softmax(-1) > 0
        keep = top_p_keep(probs, top_p, full_sort=full_sort)
        assert torch.equal(keep.sum(-1), expected.sum(-1))
        for row in range(4):
            assert torch.equal(probs[row][keep[row]].sort().values, probs[row][expected[row]].sort().values)


def test_radix_top_p_in_row_chunks_and_small_vocabularies_agree_with_the_sort():
    """The CPU path runs a few rows at a time (by_rows; its bucket tables are (rows, 2^16)), and a small
    vocabulary sorts; on 130 rows at V = 151936 and on 5000 rows at V = 64 (where 5000 bucket tables would need
    GBs) the default path must keep exactly the set the full sort keeps."""
    gen = torch.Generator().manual_seed(11)
    for rows, V in ((130, QWEN3_V), (5000, 64)):
        probs = (torch.randn(rows, V, generator=gen) * 3).softmax(-1)
        assert torch.equal(top_p_keep(probs, 0.9), top_p_keep(probs, 0.9, full_sort=True))


def _rows_with_nuclei(seed=12):
    """4 rows at V = 151936 whose 0.95-nuclei hold about 2 to 500 tokens (Gaussian logits of std 3 to 12,
    at temperature 0.6), and the threshold the CPU path computes for them."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.tensor([[3.0], [4.0], [6.0], [12.0]])
    probs = (torch.randn(4, QWEN3_V, generator=gen) * scale / 0.6).softmax(-1)
    return probs, 0.95 * probs.sum(-1, keepdim=True, dtype=torch.float64)


def test_top_p_from_candidates_is_the_sorted_rule_when_the_nucleus_fits():
    """A trained model's row is peaked, so top-p reads its nucleus off a partial topk: where every nucleus
    lies within the candidates, that set must be exactly the full sort's, with nothing left to the radix
    select (the fast path is really taken); the radix select alone must give the same set."""
    probs, threshold = _rows_with_nuclei()
    expected = top_p_keep(probs, 0.95, full_sort=True)
    assert 1 < int(expected.sum(-1).max()) < topp.TOP_P_CANDIDATES  # the nuclei fit
    v, settled = topp._top_p_from_candidates(probs, threshold)
    assert settled.all() and torch.equal(probs >= v, expected)
    assert torch.equal(topp._top_p_radix(probs, threshold), expected)


def test_top_p_from_candidates_declines_a_nucleus_past_the_candidates():
    """When a row's nucleus holds more tokens than the candidates (a flat row), the candidates cannot say
    where it ends: that row must be left unsettled rather than cut at the last candidate (the others stay
    settled), and top_p_keep, which hands it to the radix select, must still keep the full sort's set."""
    probs, _ = _rows_with_nuclei()
    flat = (torch.randn(1, QWEN3_V, generator=torch.Generator().manual_seed(3)) * 0.5).softmax(-1)
    probs = torch.cat([probs[:2], flat, probs[2:]])
    threshold = 0.95 * probs.sum(-1, keepdim=True, dtype=torch.float64)
    _, settled = topp._top_p_from_candidates(probs, threshold)
    assert settled.tolist() == [True, True, False, True, True]
    assert topp._top_p_from_candidates(probs, threshold, n=QWEN3_V)[1].all()  # every token a candidate
    assert torch.equal(top_p_keep(probs, 0.95), top_p_keep(probs, 0.95, full_sort=True))


def test_small_vocabulary_top_p_sorts_only_the_rows_the_candidates_cannot_settle(monkeypatch):
    """At a small vocabulary (the tiny pairs' V = 640) the CPU path reads the nucleus off 64 candidates, as a
    sort of every row costs as much as a tiny draft's forward; only a row whose nucleus runs past them (a flat
    row) may be sorted, and the set must be the full sort's on every row, peaked or flat."""
    gen = torch.Generator().manual_seed(21)
    peaked = (torch.randn(5, 640, generator=gen) * 4).softmax(-1)
    flat = (torch.randn(1, 640, generator=gen) * 0.1).softmax(-1)
    probs = torch.cat([peaked[:2], flat, peaked[2:]])             # (6, 640); row 2's nucleus > 64 tokens
    expected = top_p_keep(probs, 0.95, full_sort=True)
    assert int(expected[2].sum()) > topp.TOP_P_CANDIDATES_SMALL > int(expected[[0, 1, 3, 4, 5]].sum(-1).max())
    sorted_rows = []
    real_sort = topp._top_p_sorted
    monkeypatch.setattr(topp, "_top_p_sorted", lambda p, th: sorted_rows.append(p.shape[0]) or real_sort(p, th))
    assert torch.equal(top_p_keep(probs, 0.95), expected)
    assert sorted_rows == [1]                                     # the flat row alone


def test_top_p_from_candidates_declines_a_boundary_inside_a_tie():
    """When the nucleus ends inside a group of equal probabilities, which of them are kept is decided by id
    (the radix select keeps the lowest ids), which a topk (no order among ties) cannot say: the fast path must
    decline there, and top_p_keep must keep the rule's count with the lowest ids. A nucleus that ends after a
    whole tie group is the fast path's to take."""
    p = torch.zeros(1, QWEN3_V)
    p[0, :3] = 0.3                                         # M_0 = 0, M_1 = 0.3, M_2 = 0.6, M_3 = 0.9
    p[0, 3:] = 0.1 / (QWEN3_V - 3)
    after = 0.65 * p.sum(-1, keepdim=True, dtype=torch.float64)   # M_2 < 0.65 <= M_3: all three ties kept
    v, settled = topp._top_p_from_candidates(p, after)
    assert settled.all() and torch.equal(p >= v, p >= 0.3)
    inside = 0.5 * p.sum(-1, keepdim=True, dtype=torch.float64)   # M_1 < 0.5 <= M_2: two of the three
    assert not topp._top_p_from_candidates(p, inside)[1].any()
    assert torch.equal(top_p_keep(p, 0.5)[0, :4], torch.tensor([True, True, False, False]))
    assert int(top_p_keep(p, 0.5).sum()) == 2


def test_every_top_p_path_keeps_the_lowest_ids_among_boundary_ties():
    """Among tokens of equal probability at the boundary the rule keeps the lowest ids, whichever path runs:
    the sort (small vocabularies, CUDA) must be stable, and the radix select must agree with it id for id,
    on a uniform row of a small vocabulary and on one at the real vocabulary."""
    for V, top_p in ((17, 0.5), (QWEN3_V, 0.3)):
        p = torch.full((1, V), 1.0 / V)
        n = int(top_p * V) + 1                          # ranks r with (r - 1) / V < top_p
        expected = torch.arange(V)[None] < n
        for full_sort in (True, False):
            assert torch.equal(top_p_keep(p, top_p, full_sort=full_sort), expected)


def test_top_p_keep_refuses_other_shapes_than_rows_of_a_vocabulary():
    """top_p_keep works on rows (N, V); a (b, k, V) block would have its per-row rules (the top token kept)
    applied to the wrong axis, so it must be refused with the shape named, not answered wrongly."""
    with pytest.raises(ValueError, match=r"\(N, V\), got \(2, 3, 40\)"):
        top_p_keep(torch.full((2, 3, 40), 1 / 40), 0.9)


def test_acceptance_prob_broadcasts_like_the_formula():
    """acceptance_prob runs in row pieces on the CPU; q of one row against many rows of p must still
    broadcast as sum_x min(p, q) does."""
    p = torch.randn(40, QWEN3_V, generator=torch.Generator().manual_seed(2)).softmax(-1)
    assert torch.allclose(specdec.acceptance_prob(p, p[:1]), torch.minimum(p, p[:1]).sum(-1), rtol=1e-6)


def test_by_rows_gives_the_same_values_as_one_call():
    """by_rows runs a row-wise function a few vocabulary rows at a time only to keep temporaries small; the
    values must be exactly those of one call over all rows, for 2-D (N, V) and 3-D (b, k+1, V) inputs, for
    outputs of the input's shape and reductions, and for a non-contiguous slice like p[:, :k]."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(7, 6, 5000, generator=gen) * 3                  # (b, k+1, V)
    q = torch.randn(7, 5, 5000, generator=gen).softmax(-1)               # (b, k, V)
    p = logits.softmax(-1)
    assert torch.equal(cpu_memory.by_rows(lambda x: x.softmax(-1), logits), p)
    assert torch.equal(cpu_memory.by_rows(lambda x: x.softmax(-1), logits.reshape(-1, 5000)),
                       p.reshape(-1, 5000))
    assert torch.equal(specdec.acceptance_prob(p[:, :5], q), torch.minimum(p[:, :5], q).sum(-1))
    assert torch.equal(specdec.entropy(p[:, :5]), -torch.special.xlogy(p[:, :5], p[:, :5]).sum(-1))
    assert cpu_memory.by_rows(lambda x: x.sum(-1), torch.ones(0, 5000)).shape == (0,)


def test_processing_the_verifier_block_at_once_equals_row_by_row():
    """A round processes the target's (b, k+1, V) logits in one process_logits call (in pieces on the
    CPU); every row must get what processing it alone gives, at the real vocabulary: exactly the same kept
    set and the same probabilities (to the last bit or two: torch sums a lone row in another order), so the
    verification's p is the distribution the autoregressive sampler would use for that row."""
    logits = torch.randn(3, 6, QWEN3_V, generator=torch.Generator().manual_seed(8)) * 4  # (b, k+1, V)
    block = process_logits(logits, 0.6, 0, 0.95)
    for i in range(3):
        for j in range(6):
            alone = process_logits(logits[i, j][None], 0.6, 0, 0.95)[0]
            assert torch.equal(block[i, j] > 0, alone > 0)
            assert torch.allclose(block[i, j], alone, rtol=1e-6, atol=0)


@pytest.mark.parametrize("top_p", [1e-6, 1e-9, 1e-30])
def test_tiny_top_p_keeps_the_most_likely_token(top_p):
    """HF always keeps the most likely token (min_tokens_to_keep=1): in float32, 1 - 1e-9 rounds to 1.0 and
    the ascending cumulative mass would drop every token, giving NaN. top_p -> 0 must give the argmax,
    one-hot, without NaN, at the real vocabulary (a near-uniform row: a top token of mass ~1e-5)."""
    logits = torch.randn(3, QWEN3_V, generator=torch.Generator().manual_seed(7)) * 0.5
    probs = process_logits(logits, 0.7, 0, top_p)
    assert not torch.isnan(probs).any()
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), QWEN3_V).float())


def test_sample_draws_exactly_the_processed_distribution_at_the_real_vocabulary():
    """sample (an inverse CDF over a float64 cumulative sum) must draw each token with its probability at
    V = 151936, including ids at both ends of the vocabulary, and never a token of probability 0 (the 267
    padding rows here): 1000 draws pass a chi-square test against the processed distribution."""
    V, n_real = QWEN3_V, 151669
    gen = torch.Generator().manual_seed(3)
    support = torch.cat([torch.tensor([0, 1, n_real - 1]), torch.randint(2, n_real - 1, (37,), generator=gen)])
    logits = torch.full((V,), -math.inf)
    logits[support] = torch.randn(support.numel(), generator=gen)
    probs = process_logits(logits, 0.9, 0, 1.0)  # (V,) 40 tokens, none among the padding rows
    counts = torch.zeros(V, dtype=torch.float64)
    draw_gen = torch.Generator().manual_seed(4)
    for _ in range(10):  # 10 x 100 rows: a (100, V) float64 CDF at a time
        counts += torch.bincount(sample(probs.expand(100, V), draw_gen), minlength=V).double()
    assert counts[n_real:].sum() == 0
    assert chi_square_p_value(counts, 1000 * probs.double()) > 1e-3


def test_sample_after_top_p_at_the_real_vocabulary():
    """process_logits + sample at V = 151936 with top-p (a nucleus of a few dozen tokens out of a long tail):
    the draws must follow the renormalised nucleus and never leave it (chi-square, 1000 draws)."""
    logits = torch.randn(QWEN3_V, generator=torch.Generator().manual_seed(5)) * 3.5
    probs = process_logits(logits, 0.6, 0, 0.9)  # (V,)
    assert 10 < int((probs > 0).sum()) < 100
    counts = torch.zeros(QWEN3_V, dtype=torch.float64)
    gen = torch.Generator().manual_seed(6)
    for _ in range(10):
        counts += torch.bincount(sample(probs.expand(100, -1), gen), minlength=QWEN3_V).double()
    assert chi_square_p_value(counts, 1000 * probs.double()) > 1e-3


def test_accept_or_resample_residual_at_the_real_vocabulary():
    """After a certain rejection (p_1(x_1) = 0) the next token must come from norm(max(0, p - q)): at
    V = 151936, with p and q overlapping on part of their support, 500 draws pass a chi-square test
    against the residual, and tokens where q >= p are never emitted."""
    V = QWEN3_V
    gen = torch.Generator().manual_seed(8)
    ids = torch.randint(0, 151669, (30,), generator=gen)
    p, q = torch.zeros(V), torch.zeros(V)
    p[ids[:20]] = torch.rand(20, generator=gen)
    q[ids[10:]] = torch.rand(20, generator=gen)
    p, q = p / p.sum(), q / q.sum()
    draft = ids[25]  # only q has it: p(x) = 0, always rejected
    expected = (p - q).clamp(min=0)
    expected = expected / expected.sum()
    counts = torch.zeros(V, dtype=torch.float64)
    for _ in range(4):
        n = 125
        acc, t = accept_or_resample(p.expand(n, 2, V), q.expand(n, 1, V), draft.expand(n, 1),
                              torch.ones(n, 1, dtype=torch.bool), generator=gen)
        assert not acc.any()
        counts += torch.bincount(t, minlength=V).double()
    assert chi_square_p_value(counts, 500 * expected.double()) > 1e-3


# ----------------------------------------------------------------------------- draft == target

@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_draft_equal_to_target_accepts_every_draft(temperature, pairs):
    """With q == p every draft must be accepted (min(1, p/q) = 1), in greedy and in sampling mode; a dropped or
    shifted token in the draft's context (a bug of the seed) would show up as a rejection."""
    target, _, prompts, _ = pairs["gpt2"]
    result = speculative_generate(target, target, prompts, gamma=5, max_new_tokens=30, temperature=temperature,
                                  eos_token_id=[], seed=0)
    stats = result.stats
    assert stats["accepted"] == stats["drafted"] > 0
    assert stats["acceptance_rate"] == 1.0
    assert all(a == 1.0 for a in stats["per_position_acceptance"])
    assert stats["alpha"] > 0.9999


# ----------------------------------------------------------------------------- edge cases

def test_stop_id_inside_a_draft_block(pairs):
    """A row must end right after its first stop id even when the stop is drafted inside an accepted block; the
    drafts after it are not counted. With draft == target every block is fully accepted, so the stop is inside one."""
    target, _, prompts, reference = pairs["qwen3"]
    stop = reference[0][6]
    c = reference[0].index(stop) + 1  # row 0 ends with its c-th token
    result = speculative_generate(target, target, prompts, gamma=5, max_new_tokens=24, temperature=0,
                                  eos_token_id=[stop, 10_000])
    for tokens, ref in zip(result.tokens, reference):
        cut = ref.index(stop) + 1 if stop in ref else len(ref)
        assert tokens == ref[:cut]
    # every full round drafts 5 and emits 6 (bonus); the last round drafts up to and including the stop
    full, rest = divmod(c - 1, 6)
    row0 = result.stats["per_row"][0]
    assert row0["drafted"] == row0["accepted"] == 5 * full + min(rest + 1, 5)
    assert row0["generated"] == c


def test_max_new_tokens_reached_mid_block_is_never_exceeded(pairs):
    """Rows accept different numbers of drafts, so one row's budget runs out in the middle of a block while others
    still draft; every row must stop at exactly max_new_tokens (no stop ids) and never emit more."""
    target, draft, prompts, reference = pairs["llama"]
    for budget in (1, 3, 7):
        result = speculative_generate(target, draft, prompts * 8, gamma=5, max_new_tokens=budget, temperature=1.0,
                                      eos_token_id=[], seed=budget)
        assert [len(t) for t in result.tokens] == [budget] * len(prompts) * 8
        assert all(r["accepted"] + r["target_calls"] >= budget for r in result.stats["per_row"])  # <= accepted+1 per call
        greedy = speculative_generate(target, draft, prompts, gamma=5, max_new_tokens=budget, temperature=0,
                                      eos_token_id=[])
        assert greedy.tokens == [ref[:budget] for ref in reference]


def test_gamma_larger_than_tokens_left(pairs):
    """gamma may exceed the whole budget: the block shrinks to the tokens left, so no more than max_new_tokens draft
    calls are made and the output is still the target's greedy decoding."""
    target, draft, prompts, reference = pairs["gpt2"]
    result = speculative_generate(target, draft, prompts, gamma=8, max_new_tokens=3, temperature=0, eos_token_id=[])
    assert result.tokens == [ref[:3] for ref in reference]
    assert result.stats["draft_calls"] <= 3 * result.stats["target_calls"]
    assert result.stats["draft_calls"] <= 3 + 2 + 1


def test_finished_rows_are_evicted(pairs):
    """A row that stops early must stop costing compute: it takes part in fewer target calls than the batch made."""
    target, draft, prompts, reference = pairs["qwen3"]
    stop = reference[0][2]
    result = speculative_generate(target, draft, prompts, gamma=2, max_new_tokens=24, temperature=0,
                                  eos_token_id=[stop])
    assert len(result.tokens[0]) <= 3 and result.tokens[0][-1] == stop
    assert result.stats["per_row"][0]["target_calls"] < result.stats["target_calls"]


def test_autoregressive_multiple_stop_ids_and_generator(pairs):
    """Each row stops at the first of several stop ids, and the same torch.Generator seed reproduces the samples."""
    target, _, prompts, _ = pairs["qwen3"]
    stops = list(range(0, 96, 3))
    run = lambda: autoregressive_generate(target, prompts, max_new_tokens=20, eos_token_id=stops,
                                          generator=torch.Generator(DEVICE).manual_seed(5))
    first, second = run(), run()
    assert first.tokens == second.tokens
    for tokens in first.tokens:
        hits = [i for i, t in enumerate(tokens) if t in stops]
        assert hits == [] and len(tokens) == 20 or hits == [len(tokens) - 1]
    assert any(len(t) < 20 for t in first.tokens)


def test_stop_ids_resolution(pairs):
    """None falls back to the model's generation config (several ids allowed), an int becomes a list, [] means
    never stop early."""
    target = pairs["llama"][0]
    target.generation_config.eos_token_id = [5, 9]
    try:
        assert resolve_stop_ids(target, None) == [5, 9]
    finally:
        target.generation_config.eos_token_id = None
    assert resolve_stop_ids(target, 3) == [3]
    assert resolve_stop_ids(target, []) == []


# ----------------------------------------------------------------------------- metrics

def test_stats_and_records_are_consistent(pairs):
    """The metrics follow their definitions: acceptance_rate = accepted / drafted, alpha = mean recorded beta,
    mean_accepted_length = generated / target calls, per-row values add up to the batch, one record per counted
    drafted position with the contract's keys and dtypes."""
    target, draft, prompts, _ = pairs["llama"]
    result = speculative_generate(target, draft, prompts * 3, gamma=4, max_new_tokens=20, temperature=1.0,
                                  eos_token_id=[7], seed=3, record=True)
    stats, rec, rows = result.stats, result.records, result.stats["per_row"]
    keys = ("row", "position", "accepted", "teacher_entropy", "teacher_entropy_tempered", "acceptance_prob")
    assert set(rec) == set(keys)
    assert [rec[k].dtype for k in keys] == [torch.int64, torch.int64, torch.bool, torch.float32, torch.float32,
                                            torch.float32]
    assert len({v.numel() for v in rec.values()}) == 1 and rec["row"].numel() == stats["drafted"]
    assert int(rec["accepted"].sum()) == stats["accepted"] == sum(r["accepted"] for r in rows)
    assert stats["acceptance_rate"] == pytest.approx(stats["accepted"] / stats["drafted"])
    tested = torch.from_numpy(entropy.tested_mask(rec))
    assert stats["tested"] == int(tested.sum()) == sum(r["tested"] for r in rows) < stats["drafted"]
    assert stats["alpha"] == pytest.approx(rec["acceptance_prob"][tested].double().mean().item(), rel=1e-5)
    assert stats["alpha_all_drafted"] == pytest.approx(rec["acceptance_prob"].double().mean().item(), rel=1e-5)
    assert stats["generated"] == sum(len(t) for t in result.tokens)
    assert stats["mean_accepted_length"] == pytest.approx(
        stats["generated"] / sum(r["target_calls"] for r in rows))
    assert bool(((rec["position"] >= 1) & (rec["position"] <= 4)).all())
    assert bool((rec["teacher_entropy"] >= 0).all()) and bool((rec["acceptance_prob"] <= 1 + 1e-6).all())
    assert bool((rec["teacher_entropy_tempered"] >= 0).all())
    for i, rate in enumerate(stats["per_position_acceptance"], start=1):
        at = (rec["position"] == i) & tested
        assert rate == pytest.approx(rec["accepted"][at].float().mean().item())


def one_round_with_a_rejection_at_position_2():
    """SpecMetrics after one constructed round of one row, gamma 3, V = 2: q_i = (1, 0) at every position and
    p_1 = (0.9, 0.1), p_2 = (0.5, 0.5), p_3 = (0.1, 0.9), so beta = (0.9, 0.5, 0.1); x_1 accepted, x_2 rejected,
    x_3 drafted after the rejection (never tested). Tested positions: 1 and 2."""
    metrics = specdec.SpecMetrics(1, 3, 10, torch.device("cpu"), record=False)
    p = torch.tensor([[[0.9, 0.1], [0.5, 0.5], [0.1, 0.9], [0.5, 0.5]]])  # (1, k+1, V)
    q = torch.tensor([[[1.0, 0.0]] * 3])  # (1, k, V)
    counted = torch.tensor([[True, True, True]])
    acc = torch.tensor([[True, False, False]])
    emit = torch.tensor([[0, 1, 1, 1]])  # x_1, then the correction token
    metrics.add(torch.tensor([0]), emit, torch.tensor([2]), counted, acc, p, q, p.log())
    return metrics.result(1.0).stats


def test_alpha_counts_tested_positions_only():
    """alpha is the acceptance probability of a position verification tests: the mean beta over positions up to
    and including each block's first rejection, here (0.9 + 0.5) / 2 = 0.7. Position 3 (beta 0.1) was drafted
    after the rejection, in a context holding the rejected token, and never tested: counting it (the former
    (0.9 + 0.5 + 0.1) / 3 = 0.5, now alpha_all_drafted) understates or overstates what serving sees, and the
    textbook accepted length and predicted speedup are computed from alpha."""
    stats = one_round_with_a_rejection_at_position_2()
    assert (stats["drafted"], stats["tested"], stats["accepted"]) == (3, 2, 1)
    assert stats["alpha"] == pytest.approx(0.7)
    assert stats["alpha_all_drafted"] == pytest.approx(0.5)
    assert stats["per_row"][0]["alpha"] == pytest.approx(0.7)


def test_per_position_acceptance_counts_tested_positions_only():
    """The rate at position i is accepted at i / tested at i (the acceptance of x_i given x_1..x_{i-1} accepted):
    1/1 at position 1, 0/1 at 2, and no rate at 3, which nothing tested (the former count, 0/1 there, reported a
    rejection verification never made)."""
    stats = one_round_with_a_rejection_at_position_2()
    rates = stats["per_position_acceptance"]
    assert rates[:2] == [1.0, 0.0] and math.isnan(rates[2])
    assert stats["per_position_tested"] == [1, 1, 0]


def test_tested_drafts_end_at_the_first_rejection_and_at_the_counted_ones():
    """A counted draft is tested iff every draft before it was accepted; a draft past the budget or after a stop id
    (not counted) is never tested, even when all counted drafts before it were accepted."""
    counted = torch.tensor([[True, True, True, True], [True, True, False, False], [True, True, True, True]])
    acc = torch.tensor([[True, False, False, False], [True, True, False, False], [True, True, True, True]])
    assert specdec.tested_drafts(counted, acc).tolist() == [[True, True, False, False], [True, True, False, False],
                                                            [True, True, True, True]]


# ----------------------------------------------------------------------------- continuous batching

@pytest.mark.parametrize("arch", ["qwen3", "gpt2"])
@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_continuous_batching_is_exact_in_greedy(arch, batch_size, pairs):
    """With batch_size < len(prompts), rows are admitted as others finish and their caches joined to the batch's
    (narrower side left-padded with holes); every row must still be the target's own greedy continuation. With 8
    prompts in 1-3 slots the run admits into a batch that is partly full and into one that just emptied."""
    target, draft, prompts, reference = pairs[arch]
    prompts, reference = prompts + prompts[::-1], reference + reference[::-1]
    result = speculative_generate(target, draft, prompts, gamma=3, max_new_tokens=24, temperature=0,
                                  eos_token_id=[], batch_size=batch_size)
    assert result.tokens == reference
    assert result.stats["target_calls"] > 24 * len(prompts) / (4 * batch_size)  # never more than batch_size rows


def test_accept_lengths_are_the_tokens_each_target_call_emitted(pairs):
    """Spec-Bench's `accept_lengths` (per target forward, the tokens it produced) must be exact per row: one entry
    per target call, summing to the row's generated tokens, with or without continuous batching; with the
    target as its own draft every call emits gamma + 1 (all drafts plus the bonus), the last one cut by the budget."""
    target, draft, prompts, _ = pairs["qwen3"]
    for batch_size in (None, 2):
        result = speculative_generate(target, draft, prompts, gamma=3, max_new_tokens=20, temperature=0,
                                      eos_token_id=[], batch_size=batch_size)
        for row in result.stats["per_row"]:
            assert len(row["accept_lengths"]) == row["target_calls"]
            assert sum(row["accept_lengths"]) == row["generated"] == 20
            assert all(1 <= n <= 4 for n in row["accept_lengths"])
    perfect = speculative_generate(target, target, prompts, gamma=3, max_new_tokens=18, temperature=0, eos_token_id=[])
    assert [row["accept_lengths"] for row in perfect.stats["per_row"]] == [[4, 4, 4, 4, 2]] * len(prompts)


def test_continuous_batching_per_row_stats_follow_the_rows(pairs):
    """Per-row stats and records stay attached to the prompt they belong to when rows enter the batch late: the same
    greedy run with and without continuous batching must give the same per-row counts (timings aside, and draft
    calls, which depend on the companions: a round drafts for the row with the most budget left)."""
    target, draft, prompts, _ = pairs["llama"]
    kwargs = dict(gamma=4, max_new_tokens=16, temperature=0, eos_token_id=[], record=True)
    whole = speculative_generate(target, draft, prompts, **kwargs)
    streamed = speculative_generate(target, draft, prompts, batch_size=2, **kwargs)
    keys = ("generated", "drafted", "accepted", "target_calls", "alpha")
    for a, b in zip(whole.stats["per_row"], streamed.stats["per_row"]):
        assert {k: a[k] for k in keys} == pytest.approx({k: b[k] for k in keys}, rel=1e-5)
    for r in range(len(prompts)):
        assert torch.equal(whole.records["accepted"][whole.records["row"] == r],
                           streamed.records["accepted"][streamed.records["row"] == r])


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, value", [
    (dict(gamma=0), "0"), (dict(temperature=-0.5), "-0.5"), (dict(top_p=0.0), "0.0"), (dict(top_p=1.5), "1.5"),
    (dict(batch_size=0), "batch_size.*0")])
def test_bad_sampling_arguments_raise_value_error(kwargs, value, pairs):
    """Invalid settings must fail loudly with the offending value in the message, not sample something else."""
    target, draft, prompts, _ = pairs["qwen3"]
    with pytest.raises(ValueError, match=value):
        speculative_generate(target, draft, prompts, **kwargs)


def test_empty_or_too_long_prompt_raises_value_error(pairs):
    """An empty prompt has no last token to condition on; a prompt beyond the context has no positions."""
    target, draft, _, _ = pairs["gpt2"]
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        speculative_generate(target, draft, [[1, 2], []])
    with pytest.raises(ValueError, match="200 tokens.*128"):
        speculative_generate(target, draft, [[1] * 200], max_new_tokens=4)
    with pytest.raises(ValueError, match="top_p"):
        autoregressive_generate(target, [[1]], top_p=2.0)


def test_lm_heads_of_different_widths_without_vocab_size_are_refused():
    """Different lm_head widths may be two different vocabularies (a draft of another tokenizer decodes
    silently wrong, at a low acceptance): without vocab_size naming the shared tokens, refuse."""
    target, draft = tiny_model("qwen3", 0, vocab=96), tiny_model("qwen3", 1, vocab=112)
    with pytest.raises(ValueError, match=r"different widths \[96, 112\].*vocab_size"):
        speculative_generate(target, draft, make_prompts(), max_new_tokens=4)


@pytest.mark.parametrize("prompts, words", [
    ([[1, 2], [3, 96]], "prompt 1 holds token id 96, outside the vocabulary \\[0, 96\\)"),
    ([[1, -1]], "prompt 0 holds token id -1"),
    ([[1, 2.0]], "prompt 0 holds 2.0 \\(float\\)"),
    ([[1, True]], "prompt 0 holds True"),
    ([[1, 2], "ab"], "prompt 1 must be a list of token ids, got str"),
    ([], "non-empty list"),
    (torch.tensor([[1, 2]]), "got Tensor; convert a tensor with .tolist"),
    ([[1, 2], []], "prompt 1 is empty"),
])
def test_bad_prompts_raise_value_error_naming_them(prompts, words, pairs):
    """A token id outside [0, vocab) would index past the embedding (an IndexError deep in torch, or a
    negative id silently wrapping around); a non-integer or non-list prompt is a caller's mistake."""
    target, draft, _, _ = pairs["qwen3"]
    for call in (lambda: speculative_generate(target, draft, prompts, max_new_tokens=4),
                 lambda: autoregressive_generate(target, prompts, max_new_tokens=4)):
        with pytest.raises(ValueError, match=words):
            call()


@pytest.mark.parametrize("kwargs, words", [
    (dict(gamma=2.5), "gamma must be an integer, got 2.5"), (dict(top_k=1.0), "top_k must be an integer"),
    (dict(max_new_tokens=4.0), "max_new_tokens must be an integer"),
    (dict(temperature=float("nan")), "temperature must be a finite number, got nan"),
    (dict(temperature=float("inf")), "temperature must be a finite number, got inf"),
    (dict(top_p=float("nan")), "top_p must be a finite number"),
    (dict(vocab_size=0), "vocab_size must be a positive integer"),
])
def test_non_integer_counts_and_non_finite_temperatures_raise_value_error(kwargs, words, pairs):
    """gamma, top_k and max_new_tokens count tokens (2.5 drafts is no setting: a TypeError deep inside torch);
    a nan temperature would sample from nan probabilities."""
    target, draft, prompts, _ = pairs["qwen3"]
    with pytest.raises(ValueError, match=words):
        speculative_generate(target, draft, prompts, **{"max_new_tokens": 4, **kwargs})


# ----------------------------------------------------------------------------- the paper-shaped pieces, directly

def _dist(*values):
    """A distribution over a 4-token vocabulary, (4,) float32."""
    return torch.tensor(values, dtype=torch.float32)


def test_residual_is_the_normalised_positive_part_of_p_minus_q():
    """After a rejection the next token is drawn from norm(max(0, p - q)) (Leviathan et al., Theorem 1):
    p = (.5, .3, .2, 0), q = (.2, .5, .1, .2) gives max(0, p - q) = (.3, 0, .1, 0) -> (.75, 0, .25, 0)."""
    r = residual(_dist(.5, .3, .2, 0)[None], _dist(.2, .5, .1, .2)[None])
    assert torch.allclose(r, _dist(.75, 0, .25, 0)[None])


def test_residual_of_equal_distributions_falls_back_to_p():
    """p == q has no positive part (0 / 0); residual must then return p itself, a distribution, not nan."""
    p = _dist(.4, .6, 0, 0)[None]
    assert torch.equal(residual(p, p.clone()), p)


def test_accept_or_resample_accepts_with_probability_min_1_p_over_q():
    """A draft x with q(x) = 0.8, p(x) = 0.2 must be accepted with probability p/q = 1/4 (the seed's rule
    min(1, p/q)); in 4000 independent rows the accepted share lies within 4 standard errors of 0.25."""
    n = 4000
    p = torch.stack([_dist(.2, .8, 0, 0), _dist(0, 0, 0, 1)])[None].expand(n, 2, 4)  # (n, k+1, V)
    q = _dist(.8, .2, 0, 0)[None, None].expand(n, 1, 4)  # (n, k, V)
    drafts = torch.zeros(n, 1, dtype=torch.long)  # x_1 = token 0
    acc, t = accept_or_resample(p, q, drafts, torch.ones(n, 1, dtype=torch.bool),
                          generator=torch.Generator().manual_seed(0))
    share = acc.float().mean().item()
    assert abs(share - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n)
    # after a rejection the only token of max(0, p_1 - q_1) = (0, .6, 0, 0) is token 1; after an
    # acceptance the bonus comes from p_2 = one-hot(3)
    assert torch.equal(t, torch.where(acc[:, 0], 3, 1))


def test_accept_or_resample_never_accepts_past_the_first_rejection_and_draws_the_bonus_from_p_k_plus_1():
    """Drafts with p(x) >= q(x) are always accepted; one with p(x) = 0 always rejected, and nothing after it
    (the accepted drafts are a prefix). When all k are accepted t comes from p_{k+1} (the bonus)."""
    q = torch.stack([_dist(.5, .5, 0, 0)] * 3)  # (k, V)
    p_accept = torch.stack([_dist(.5, .5, 0, 0)] * 3 + [_dist(0, 0, 1, 0)])  # (k+1, V) p = q, bonus = token 2
    p_reject = p_accept.clone()
    p_reject[1] = _dist(0, .2, .8, 0)  # p_2(x_2 = 0) = 0
    p = torch.stack([p_accept, p_reject])  # (2, k+1, V)
    drafts = torch.tensor([[0, 1, 0], [1, 0, 1]])
    acc, t = accept_or_resample(p, torch.stack([q, q]), drafts, torch.ones(2, 3, dtype=torch.bool),
                          generator=torch.Generator().manual_seed(1))
    assert acc.tolist() == [[True, True, True], [True, False, False]]
    # row 1 after its rejection at x_2: norm(max(0, p_2 - q_2)) = norm((0, 0, .8, 0)) -> token 2 as well,
    # row 0 the bonus token 2 of p_4
    assert t.tolist() == [2, 2]


def test_accept_or_resample_refuses_drafts_that_do_not_count():
    """A draft that does not count (past the budget, or after a stop id) must not be accepted even when p = q:
    the next token is then sampled in its place, from the residual of p and q at that position (= p)."""
    p = torch.stack([_dist(1, 0, 0, 0), _dist(0, 1, 0, 0), _dist(0, 0, 1, 0)])[None]  # (1, k+1, V)
    q = p[:, :2].clone()
    acc, t = accept_or_resample(p, q, torch.tensor([[0, 1]]), torch.tensor([[True, False]]),
                          generator=torch.Generator().manual_seed(2))
    assert acc.tolist() == [[True, False]] and t.tolist() == [1]


def test_accept_or_resample_greedy_accepts_while_drafts_equal_argmax_p():
    """Greedy: x_i is accepted iff it is argmax p_i, up to the first mismatch; t = argmax p_{n+1}; no random
    number is drawn (the generator's state is untouched)."""
    p = torch.stack([_dist(.1, .7, .1, .1), _dist(.6, .2, .1, .1), _dist(.1, .1, .1, .7)])  # argmax 1, 0, 3
    q = torch.full((2, 4), .25)
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    acc, t = accept_or_resample(torch.stack([p, p]), torch.stack([q, q]), torch.tensor([[1, 0], [1, 2]]),
                          torch.ones(2, 2, dtype=torch.bool), greedy=True, generator=gen)
    assert acc.tolist() == [[True, True], [True, False]]
    assert t.tolist() == [3, 0]  # the bonus argmax p_3, the correction argmax p_2
    assert torch.equal(gen.get_state(), state)


def test_counted_drafts_stop_at_the_budget_and_after_a_stop_id():
    """x_i counts unless i > budget or a stop id is among x_1..x_{i-1}: the stop id itself counts (it is
    emitted), the drafts after it do not."""
    drafts = torch.tensor([[5, 6, 7], [9, 5, 6], [5, 6, 7]])
    counted = counted_drafts(drafts, torch.tensor([9]), torch.tensor([3, 3, 2]))
    assert counted.tolist() == [[True, True, True], [True, False, False], [True, True, False]]


def test_emit_tokens_emits_accepted_drafts_then_t_cut_at_stop_and_budget():
    """Emission rule: x_1..x_n then t, cut after the first stop id (9) among those n + 1 tokens and at the
    budget. Row 0: n = 1 -> [5, t]; row 1: stop id x_2 -> [5, 9], done; row 2: budget 2 -> [5, 6], done;
    row 3: a stop id among the REJECTED drafts is not emitted and does not end the row."""
    drafts = torch.tensor([[5, 6, 7], [5, 9, 7], [5, 6, 7], [5, 9, 7]])
    t = torch.tensor([8, 8, 8, 8])
    n = torch.tensor([1, 3, 3, 1])
    emit, e, done = emit_tokens(drafts, t, n, torch.tensor([9]), torch.tensor([10, 10, 2, 10]))
    assert [row[:m] for row, m in zip(emit.tolist(), e.tolist())] == [[5, 8], [5, 9], [5, 6], [5, 8]]
    assert done.tolist() == [False, True, True, False]


def test_emit_tokens_marks_a_row_done_when_it_uses_its_whole_budget():
    """A row whose n + 1 tokens exactly fill its budget is done, with no stop id; one short of it is not."""
    drafts, t, n = torch.tensor([[5, 6], [5, 6]]), torch.tensor([8, 8]), torch.tensor([2, 2])
    emit, e, done = emit_tokens(drafts, t, n, torch.tensor([], dtype=torch.long), torch.tensor([3, 4]))
    assert e.tolist() == [3, 3] and done.tolist() == [True, False]
    assert emit.tolist() == [[5, 6, 8], [5, 6, 8]]


def _cache(values_per_layer):
    """A DynamicCache whose keys and values are values_per_layer[l] (B, 1, L, 1) (values = -keys)."""
    cache = DynamicCache()
    for layer, kv in enumerate(values_per_layer):
        cache.update(kv.clone(), -kv.clone(), layer)
    return cache


def test_join_left_pads_the_narrower_side_with_holes():
    """Joining a batch (1 row, 2 slots) and new rows (2 rows, 3 slots): 3 rows of 3 slots, the old row
    shifted right by one hole (mask 0, zero keys), new rows unchanged, in both keys and values of every layer."""
    old = torch.tensor([[1., 2.]]).view(1, 1, 2, 1)
    new = torch.tensor([[3., 4., 5.], [0., 6., 7.]]).view(2, 1, 3, 1)
    cache, mask = kv_cache.join(_cache([old, 10 * old]), torch.tensor([[1, 1]]),
                                _cache([new, 10 * new]), torch.tensor([[1, 1, 1], [0, 1, 1]]))
    assert mask.tolist() == [[0, 1, 1], [1, 1, 1], [0, 1, 1]]
    expected = [[0., 1., 2.], [3., 4., 5.], [0., 6., 7.]]
    for layer, scale in zip(cache.layers, (1, 10)):
        assert (layer.keys.view(3, 3) / scale).tolist() == expected
        assert (-layer.values.view(3, 3) / scale).tolist() == expected


def test_join_into_an_empty_batch_is_the_new_rows():
    """The batch starts empty (mask (0, 0)): joining must hand back the new rows as they are."""
    new = torch.tensor([[3., 4.]]).view(1, 1, 2, 1)
    new_cache = _cache([new])
    cache, mask = kv_cache.join(DynamicCache(), torch.zeros(0, 0, dtype=torch.long), new_cache,
                                torch.tensor([[1, 1]]))
    assert cache is new_cache and mask.tolist() == [[1, 1]]


def test_compact_moves_valid_slots_right_in_order():
    """Compaction drops holes: mask [[1,0,1,0],[0,1,1,1]] keeps width 3 = the most valid slots of a row; row 0's
    valid slots a, c move right in order behind one hole, row 1 keeps b, c, d; keys and values move together."""
    keys = torch.tensor([[1., 2., 3., 4.], [5., 6., 7., 8.]]).view(2, 1, 4, 1)
    cache = _cache([keys])
    mask = kv_cache.compact(cache, torch.tensor([[1, 0, 1, 0], [0, 1, 1, 1]]))
    assert mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    kept = cache.layers[0].keys.view(2, 3)
    assert kept[0, 1:].tolist() == [1., 3.] and kept[1].tolist() == [6., 7., 8.]  # row 0's slot 0 is a hole
    assert torch.equal(cache.layers[0].values, -cache.layers[0].keys)


def test_freed_buffers_are_kept_for_reuse_on_glibc():
    """Both generators keep freed CPU buffers for reuse (cpu_memory.reuse_freed_memory): without it every
    O(V) temporary of a sampling step is page-faulted in afresh, which tripled the sampler's cost at
    V = 151936. On Linux/glibc (this project's machines and CI) the setting must apply."""
    import sys
    cpu_memory.reuse_freed_memory.cache_clear()
    applied = cpu_memory.reuse_freed_memory()
    assert applied is sys.platform.startswith("linux")


@pytest.mark.parametrize("full_sort", [True, False])
def test_top_p_at_an_exact_threshold_tie_keeps_hfs_count_and_the_lowest_ids(full_sort):
    """A uniform 4-token row at top_p 0.5: the mass ahead of rank 3 is exactly 0.5, not < 0.5, so HF keeps
    exactly 2 tokens (TopPLogitsWarper drops cumulative mass <= 1 - top_p); among the equal tokens the lowest
    ids, on the sort path as on the sort-free one (issue 19: the sort path's tie was tested only elsewhere)."""
    probs = torch.full((1, 4), 0.25)
    expected = TopPLogitsWarper(0.5)(None, probs.log()).softmax(-1) > 0
    keep = top_p_keep(probs, 0.5, full_sort=full_sort)
    assert keep.sum().item() == expected.sum().item() == 2
    assert keep.tolist() == [[True, True, False, False]]
