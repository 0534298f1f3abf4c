"""entropy.py: entropy, binning, Wilson intervals, records from specdec, and the PNG plots."""
import math
import struct

import numpy as np
import pytest
import torch

import entropy as E


def _records(entropies, accepted, beta=None):
    n = len(entropies)
    return {
        "row": np.zeros(n, dtype=np.int64),
        "position": np.ones(n, dtype=np.int64),
        "accepted": np.asarray(accepted, dtype=bool),
        "teacher_entropy": np.asarray(entropies, dtype=np.float32),
        "acceptance_prob": np.asarray(beta if beta is not None else np.full(n, 0.5), dtype=np.float32),
    }


def png_size(path):
    """(width, height) from a PNG's signature + IHDR chunk; ValueError if it is not a PNG."""
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ValueError(f"{path} is not a PNG")
    return struct.unpack(">II", head[16:24])


# ----------------------------------------------------------------------------- entropy

def test_entropy_of_uniform_logits_is_log_v():
    """H is in nats: equal logits give the uniform distribution over V tokens, H = log V."""
    h = E.processed_entropy(torch.zeros(2, 8), temperature=0.7)
    assert torch.allclose(h, torch.full((2,), math.log(8)), atol=1e-5)


def test_processed_entropy_uses_top_p():
    """The entropy is of the distribution verification uses: with top-p small enough that only
    the argmax survives, H must be 0 although the raw softmax is spread out."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0]])
    assert E.processed_entropy(logits, temperature=1.0).item() > 0.5
    assert E.processed_entropy(logits, temperature=1.0, top_p=0.1).item() == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------- binning and intervals

def test_default_edges_span_below_1e4_to_above_1_nat():
    """The seed's range: the first bin holds everything under 1e-4 nats (incl. exactly 0), the
    last is open-ended above 1 nat, and the bins in between are log-spaced (constant ratio)."""
    e = E.DEFAULT_EDGES
    assert e[0] == 0 and e[1] == pytest.approx(1e-4) and np.isinf(e[-1]) and e[-2] > 1
    ratios = e[2:-1] / e[1:-2]
    assert np.allclose(ratios, ratios[0])


def test_bin_index_puts_edges_in_the_upper_bin():
    """Bins are half-open [lo, hi): a value equal to an edge belongs to the bin it starts; 0 and
    round-off negatives go to the first bin, huge values to the last."""
    e = np.array([0.0, 1e-4, 1e-2, 1.0, np.inf])
    idx = E.bin_index([-1e-9, 0.0, 5e-5, 1e-4, 0.5, 1.0, 1e6], e)
    assert idx.tolist() == [0, 0, 0, 1, 2, 3, 3]


def test_wilson_interval_known_values():
    """Textbook values (Wilson 1927; e.g. Newcombe 1998 table): 5/10 -> [0.2366, 0.7634], 0/10 ->
    [0, 0.2775], 10/10 -> [0.7225, 1]; n = 0 has no interval."""
    lo, hi = E.wilson_interval([5, 0, 10, 0], [10, 10, 10, 0])
    assert np.allclose(lo[:3], [0.2366, 0.0, 0.7225], atol=1e-4)
    assert np.allclose(hi[:3], [0.7634, 0.2775, 1.0], atol=1e-4)
    assert np.isnan(lo[3]) and np.isnan(hi[3])


def test_wilson_interval_has_nominal_95_percent_coverage_on_average():
    """A 95% interval must contain the true rate in about 95% of experiments. Computed exactly
    (sum of binomial probabilities of the k whose interval covers p), averaged over p in
    [0.02, 0.98] at n = 20: Wilson's is ~0.953; the normal (Wald) approximation would give ~0.87."""
    n = 20
    k = np.arange(n + 1)
    lo, hi = E.wilson_interval(k, np.full(n + 1, n))
    coverage = []
    for p in np.linspace(0.02, 0.98, 49):
        pmf = np.array([math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in k])
        coverage.append(pmf[(lo <= p) & (p <= hi)].sum())
    assert 0.94 <= np.mean(coverage) <= 0.96


def test_acceptance_by_entropy_known_counts():
    """Counts, accepted counts, rates, mean analytic beta and the too-few flag per bin on records
    whose answer is known by construction; empty bins are kept (count 0), not dropped."""
    e = np.array([0.0, 1e-4, 1e-2, 1.0, np.inf])
    ent = [0.0] * 40 + [5e-3] * 3 + [2.0] * 50
    acc = [True] * 30 + [False] * 10 + [True, False, False] + [True] * 50
    beta = [0.9] * 40 + [0.3] * 3 + [1.0] * 50
    bins = E.acceptance_by_entropy(_records(ent, acc, beta), edges=e, min_count=30)
    assert [b.count for b in bins] == [40, 3, 0, 50]
    assert [b.accepted for b in bins] == [30, 1, 0, 50]
    assert bins[0].rate == pytest.approx(0.75) and bins[1].rate == pytest.approx(1 / 3)
    assert bins[0].mean_beta == pytest.approx(0.9) and bins[3].mean_beta == pytest.approx(1.0)
    assert [b.too_few for b in bins] == [False, True, True, False]
    lo, hi = E.wilson_interval(30, 40)
    assert (bins[0].ci_lo, bins[0].ci_hi) == pytest.approx((float(lo), float(hi)))
    assert math.isnan(bins[2].rate)


def test_entropy_profile_quantiles_and_histogram():
    """The profile's histogram counts every token once and its quantiles are numpy's on the same
    values: 0..99 / 100 nats has median 0.495 and 10 values under 0.1."""
    h = np.arange(100) / 100
    prof = E.entropy_profile(h, edges=np.array([0.0, 0.1, 1.0, np.inf]))
    assert prof["counts"] == [10, 90, 0] and sum(prof["fractions"]) == pytest.approx(1.0)
    assert prof["quantiles"][0.5] == pytest.approx(0.495) and prof["n"] == 100


def test_tested_mask_stops_after_the_first_rejection_of_each_block():
    """Positions after a block's first rejection were drafted but never tested (specdec records
    them as not accepted): the mask keeps exactly the accepted prefix plus the first rejection."""
    r = _records([0.1] * 9, [True, False, False, True, True, True, False, True, False])
    r["position"] = np.array([1, 2, 3, 1, 2, 3, 1, 2, 3])  # three blocks of gamma = 3
    assert E.tested_mask(r).tolist() == [True, True, False, True, True, True, True, False, False]


def test_acceptance_by_entropy_ignores_untested_positions():
    """A bin's rate estimates P(accept | tested): untested positions (after a rejection) must not
    count as rejections, or every draft would look worse at the entropies that follow mistakes."""
    r = _records([0.0, 0.0, 2.0, 2.0], [False, False, True, True])
    r["position"] = np.array([1, 2, 1, 2])  # block 1: rejected at 1, position 2 untested
    bins = E.acceptance_by_entropy(r, edges=np.array([0.0, 1.0, np.inf]))
    assert [b.count for b in bins] == [1, 2] and [b.accepted for b in bins] == [0, 2]


def test_as_records_rejects_ragged_records():
    """Records are one entry per drafted token: keys of different lengths mean a bug upstream,
    and must stop the analysis with a ValueError naming the shapes."""
    r = _records([0.1, 0.2], [True, False])
    r["accepted"] = np.array([True])
    with pytest.raises(ValueError, match="equal-length"):
        E.as_records(r)


def test_concat_records_keeps_rows_distinct():
    """Records of two runs both start at row 0; concatenated, their rows must not merge."""
    a, b = _records([0.1, 0.2], [True, False]), _records([0.3], [True])
    a["row"] = np.array([0, 1])
    out = E.concat_records([a, b])
    assert out["row"].tolist() == [0, 1, 2] and len(out["teacher_entropy"]) == 3


# ----------------------------------------------------------------------------- records from specdec

@pytest.fixture(scope="module")
def tiny_lm():
    """A random 2-layer Llama over 48 tokens; lm_head scaled x3 so that, at T = 0.3 and top-p
    0.95, its entropies spread from exactly 0 to a few nats (several bins get tokens)."""
    model = _other_lm(0)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 48, (n,), generator=g).tolist() for n in (3, 5, 8, 4)]
    return model, prompts


def test_draft_equal_to_teacher_is_accepted_in_every_bin(tiny_lm):
    """With q = p, min(1, p/q) = 1: every drafted token is accepted and sum min(p, q) = 1, at every
    teacher entropy. Any bin below 1 means the records (or the binning) mix up positions."""
    model, prompts = tiny_lm
    rec = E.speculative_records(model, model, prompts, gamma=4, max_new_tokens=40, temperature=0.3,
                                top_p=0.95, seed=0)
    bins = [b for b in E.acceptance_by_entropy(rec) if b.count > 0]
    assert len(bins) >= 3
    assert all(b.rate == 1.0 for b in bins)
    assert all(b.mean_beta == pytest.approx(1.0, abs=1e-4) for b in bins)


def test_teacher_sample_entropies_match_each_row_alone(tiny_lm):
    """The batched, right-padded forward must give, for every sampled token, the entropy that the
    row alone (no padding) gives at the position predicting it; one value per generated token."""
    import specdec

    model, prompts = tiny_lm
    kw = dict(temperature=0.3, top_p=0.95, max_new_tokens=12, seed=1)
    got = E.teacher_sample_entropies(model, prompts, batch_size=4, **kw)
    tokens = specdec.autoregressive_generate(model, prompts, **kw).tokens
    want = []
    with torch.no_grad():
        for p, c in zip(prompts, tokens):
            logits = model(torch.tensor([p + c])).logits[0, len(p) - 1: len(p) + len(c) - 1]  # (len(c), V)
            want.append(E.processed_entropy(logits, 0.3, 0, 0.95).numpy())
    want = np.concatenate(want)
    assert got.shape == want.shape == (sum(map(len, tokens)),)
    assert np.allclose(got, want, atol=1e-4)


# ----------------------------------------------------------------------------- plots

def test_entropy_histogram_is_a_png_of_the_requested_size(tmp_path):
    """The report embeds the file: it must exist, be a real PNG, and have the pixel size asked
    for (no 'tight' bounding box silently resizing it)."""
    prof = E.entropy_profile(np.random.default_rng(0).exponential(0.3, 500))
    path = E.plot_entropy_histogram(prof, tmp_path / "h.png", "gsm8k", size_px=(640, 360), dpi=80)
    assert png_size(path) == (640, 360)


def test_acceptance_bubble_chart_is_a_png_of_the_requested_size(tmp_path):
    """Same for the acceptance-vs-entropy bubble chart, with an empty and a too-few bin in it
    (both must be drawable)."""
    rng = np.random.default_rng(0)
    ent = np.concatenate([np.zeros(100), 10 ** rng.uniform(-4, 0.8, 300), [5.0]])
    bins = E.acceptance_by_entropy(_records(ent, rng.random(ent.size) < 0.6))
    path = E.plot_acceptance_vs_entropy({"rkl": bins, "fkl": bins}, tmp_path / "a.png", size_px=(900, 500))
    assert png_size(path) == (900, 500)


# ----------------------------------------------------------------------------- data-filled bins

def test_quantile_edges_put_exact_zeros_alone_and_fill_every_bin():
    """After top-p most positions have H = 0 exactly: that value gets its own bin, and the positive
    values are cut at their quantiles, so every bin holds tokens (fixed log bins left most empty)."""
    rng = np.random.default_rng(0)
    h = np.concatenate([np.zeros(800), rng.exponential(0.5, 200)])
    edges = E.quantile_edges(h, n_bins=4)
    idx = E.bin_index(h, edges)
    counts = np.bincount(idx, minlength=len(edges) - 1)
    assert len(counts) == 5 and counts[0] == 800 and (h[idx == 0] == 0).all()
    assert (counts[1:] >= 45).all() and (counts[1:] <= 55).all()
    assert E.bin_label(edges[0], edges[1]) == "0" and E.bin_label(edges[1], edges[2]).startswith("0+")


def test_quantile_edges_without_zeros_have_no_zero_bin():
    """The tempered entropy is never exactly 0: no '0' bin, n_bins bins of equal counts."""
    h = np.linspace(0.01, 3.0, 600)
    edges = E.quantile_edges(h, n_bins=6)
    assert len(edges) == 7 and edges[1] > 0
    assert np.bincount(E.bin_index(h, edges), minlength=6).tolist() == [100] * 6


def test_per_prompt_bin_counts_sum_to_the_pooled_bins():
    """Counting per prompt and bin, then summing over prompts, must give acceptance_by_entropy's
    pooled counts (the bootstrap resamples prompts of these same tokens); a prompt without tested
    tokens is a zero row, not dropped."""
    r = _records([0.0, 0.5, 2.0, 0.0, 2.0, 0.5], [True, False, True, True, True, False])
    r["row"] = np.array([0, 0, 0, 2, 2, 2])
    r["position"] = np.array([1, 2, 1, 1, 2, 3])
    edges = np.array([0.0, E.ZERO_EDGE, 1.0, np.inf])
    n, k = E.per_prompt_bin_counts(r, edges, n_prompts=3)
    pooled = E.acceptance_by_entropy(r, edges)
    assert n.shape == (3, 3) and n[1].sum() == 0
    assert n.sum(0).tolist() == [b.count for b in pooled] and k.sum(0).tolist() == [b.accepted for b in pooled]


def test_bin_differences_plot_is_a_png_of_the_requested_size(tmp_path):
    """The difference plot: one panel per entropy view, PNG of the requested size."""
    stats = [(0.05, -0.01, 0.1), (0.1, 0.05, 0.15)]
    panels = {"processed": (["0", ">0"], {"rkl": stats}), "tempered": (["<1", ">=1"], {"rkl": stats})}
    path = E.plot_bin_differences(panels, tmp_path / "d.png", "t", size_px=(700, 300))
    assert png_size(path) == (700, 300)


# ----------------------------------------------------------------------------- what the records hold

def _other_lm(seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      initializer_range=0.3, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(3)
    return model


def _record_contexts(rec, prompts, tokens, max_new_tokens):
    """(index, context) of every tested record: prompt + the tokens emitted before its block + the
    accepted drafts before it in the block (all on the output path). Blocks are rebuilt from the
    records: a block emits its accepted drafts + one token, cut at max_new_tokens."""
    tested = E.tested_mask(rec)
    emitted = {}                                  # row -> tokens emitted before the current block
    block_start, out = {}, []
    for j in range(len(rec["row"])):
        row, pos = int(rec["row"][j]), int(rec["position"][j])
        if pos == 1:                              # a new block of this row: close the previous one
            if row in block_start:
                n_acc = block_start[row]
                emitted[row] = min(emitted.get(row, 0) + n_acc + 1, max_new_tokens)
            block_start[row] = 0
        if tested[j]:
            g = emitted.get(row, 0)
            out.append((j, prompts[row] + tokens[row][: g + pos - 1]))
        block_start[row] += int(rec["accepted"][j])
    return out


def test_records_hold_the_targets_entropies_not_the_drafts(tiny_lm):
    """The analysis bins each drafted token by the TARGET's entropy at that position. With a draft
    different from the target, recompute from the target alone, at the context of every tested
    record, H of the processed p (temperature + top-p) and of the tempered p (before top-p): each
    record's teacher_entropy and teacher_entropy_tempered must equal them; the draft's entropies
    there differ, so a record holding q's entropy (or p after top-p in the tempered key) fails."""
    target, prompts = tiny_lm
    draft = _other_lm(1)
    T, top_p, max_new = 0.7, 0.9, 24
    res = __import__("specdec").speculative_generate(target, draft, prompts, gamma=3, max_new_tokens=max_new,
                                                      temperature=T, top_p=top_p, eos_token_id=[], seed=0,
                                                      record=True)
    rec = {k: v.numpy() for k, v in res.records.items()}
    contexts = _record_contexts(rec, prompts, res.tokens, max_new)
    assert len(contexts) >= 40
    want_p, want_t, draft_p = [], [], []
    with torch.no_grad():
        for _, ctx in contexts:
            lt = target(torch.tensor([ctx])).logits[0, -1]
            want_p.append(E.processed_entropy(lt, T, 0, top_p).item())
            want_t.append(E.processed_entropy(lt, T).item())
            draft_p.append(E.processed_entropy(draft(torch.tensor([ctx])).logits[0, -1], T, 0, top_p).item())
    idx = [j for j, _ in contexts]
    got_p, got_t = rec["teacher_entropy"][idx], rec["teacher_entropy_tempered"][idx]
    assert np.allclose(got_p, want_p, atol=1e-4)
    assert np.allclose(got_t, want_t, atol=1e-4)
    assert np.abs(np.array(draft_p) - np.array(want_p)).max() > 0.1     # the draft's H is a different number
    assert np.abs(np.array(want_t) - np.array(want_p)).max() > 0.1      # top-p changes H somewhere
    assert (np.array(want_t) >= np.array(want_p) - 1e-5).mean() > 0.9   # cutting the tail mostly lowers H


def test_teacher_sample_entropy_views_are_processed_and_tempered(tiny_lm):
    """The profile's two views at each sampled token: the processed view is the default output,
    the tempered one is H before top-p (>= 0, and never below the processed one by more than
    round-off where top-p keeps a single token)."""
    model, prompts = tiny_lm
    kw = dict(temperature=0.3, top_p=0.95, max_new_tokens=12, seed=1)
    views = E.teacher_sample_entropies(model, prompts, views=True, **kw)
    assert np.array_equal(views["processed"], E.teacher_sample_entropies(model, prompts, **kw))
    assert views["tempered"].shape == views["processed"].shape
    zero = views["processed"] == 0
    assert zero.any() and (views["tempered"][zero] > 0).all()


def test_per_prompt_bin_counts_leave_out_the_drafts_after_a_blocks_first_rejection():
    """A block of 3 drafts accepted, rejected, rejected: the verifier tested only the first two (the third
    was drafted after a token the target rejected and never judged). Counting it would bias every bin's
    acceptance down (1/3 instead of 1/2, issue 19's surviving mutant)."""
    r = _records([0.5, 0.5, 0.5], [True, False, False])
    r["position"] = np.array([1, 2, 3])                    # one block of gamma = 3
    n, k = E.per_prompt_bin_counts(r, np.array([0.0, 1.0, np.inf]), n_prompts=1)
    assert n.tolist() == [[2.0, 0.0]] and k.tolist() == [[1.0, 0.0]]
