"""curve.py: the entropy-knob task family, its measured teacher entropy, the curve's numbers (each
column pinned to the quantity it must be computed from) and the QUICK run end to end."""
import json
import math
from collections import Counter

import numpy as np
import pytest

from study import curve as C
import data
import entropy
import models
from study import report


# ----------------------------------------------------------------------------- the family

@pytest.mark.parametrize("k", [1, 3, 16])
def test_each_step_has_exactly_k_equally_valid_words(k):
    """The knob's definition: at every step, given the prompt, exactly the first k words of the step's key
    occur, each about 1/k of the time, so the data's conditional entropy per word is log k."""
    exs = C.family_examples(k, "train", 400)
    seen = Counter()
    for e in exs:
        key = C.KEYS.index(e.prompt.rsplit(" ", 1)[1])
        for word in e.reference.split(" "):
            assert word in C.WORDS[key][:k]
            seen[word] += 1
            key = C.next_key(key)
        assert len(e.reference.split(" ")) == C.N_ITEMS
    for key in range(C.N_KEYS):
        counts = np.array([seen[w] for w in C.WORDS[key][:k]], dtype=float)
        assert counts.min() > 0
        p = counts / counts.sum()
        assert -(p * np.log(p)).sum() == pytest.approx(math.log(k), abs=0.12)


def test_prompts_are_the_same_at_every_setting_and_splits_are_disjoint():
    """Only the completions may change with k: the same prompts at every setting; eval never trains."""
    train = {k: [e.prompt for e in C.family_examples(k, "train", 50)] for k in (1, 16)}
    ev = {k: [e.prompt for e in C.family_examples(k, "eval", 50)] for k in (1, 16)}
    assert train[1] == train[16] and ev[1] == ev[16]
    assert not set(train[1]) & set(ev[1])


def test_one_tokenizer_every_word_one_token():
    """The vocabulary is fixed across settings and every word of every setting is a single token, so the
    completion length (N_ITEMS words + a stop) is the same at every k."""
    tok = C.family_tokenizer()
    for key in range(C.N_KEYS):
        for w in C.WORDS[key]:
            assert len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1
    lengths = {len(tok(e.reference, add_special_tokens=False)["input_ids"])
               for k in (1, 16) for e in C.family_examples(k, "eval", 30)}
    assert lengths == {C.N_ITEMS}


def test_the_default_divergences_are_the_issues_list_as_far_as_distill_offers_them():
    """fkl, rkl, jsd, tvd always; nla and lk as soon as divergences.py has them; never one it lacks."""
    import divergences

    assert C.DIVS[0] == "baseline" and {"fkl", "rkl", "jsd", "tvd"} <= set(C.DIVS)
    assert set(C.DIVS[1:]) == {d for d in C.CURVE_DIVS if d in divergences.DIVERGENCES}


def test_bad_settings_are_refused_naming_the_value():
    with pytest.raises(ValueError, match="k=0"):
        C.family_examples(0, "train", 1)
    with pytest.raises(ValueError, match="unknown --divs"):
        C.parse_args(["--divs", "baseline", "kl"])
    with pytest.raises(ValueError, match="at least 2 distinct"):
        C.parse_args(["--settings", "4"])


def test_distill_runs_differ_only_in_divergence_seed_and_setting(tmp_path):
    """The budget is fixed across the curve: two drafts' distill.py command lines differ only in the
    divergence, the seed and the setting's pair / rows / run directory."""
    cfg = C.CurveConfig()
    a = C.distill_argv(cfg, 1, "fkl", 0, tmp_path / "k1", tmp_path / "k1.jsonl", tmp_path / "r1")
    b = C.distill_argv(cfg, 16, "rkl", 3, tmp_path / "k16", tmp_path / "k16.jsonl", tmp_path / "r2")
    flags = lambda argv: dict(zip(argv[::2], argv[1::2]))   # noqa: E731
    fa, fb = flags(a), flags(b)
    differ = {f for f in fa if fa[f] != fb[f]}
    assert fa["--threads"] == str(cfg.threads)
    assert differ == {"--div", "--seed", "--out", "--teacher", "--student", "--data-path"}
    assert fa["--steps"] == str(cfg.steps) and fa["--temperature"] == str(C.PROTOCOL["temperature"])


def test_rows_read_back_through_distills_data_rule(tmp_path):
    """distill.py reads the rows as a CNN/DM file (article, highlights): the same examples come back."""
    exs = C.family_examples(4, "train", 5)
    path = C.write_rows(tmp_path / "train.jsonl", exs)
    assert data.load_examples(C.TASK, "train", source="file", path=path, max_article_tokens=None) == exs


# ----------------------------------------------------------------------------- measured entropy

@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("curve_pairs")
    return root, {k: C.ensure_family_pair(k, root=root, scale="test") for k in (1, 4, 16)}


def _measure(pair, k, n=24):
    teacher, _, tok = models.load_pair(pair / "teacher", pair / "student")
    protocol = models.decoding_protocol(C.PROTOCOL, tok, teacher)
    prompts = [data.build_prompt_ids(tok, C.TASK, e) for e in C.family_examples(k, "eval", n)]
    return teacher, tok, protocol, prompts


def test_the_knob_controls_the_measured_teacher_entropy_monotonically(pairs):
    """More equally valid words per step -> a higher MEASURED mean processed H(p) of the teacher trained on
    that setting, with non-overlapping 95% intervals (test-scale teachers; CURVE.md has the full ones)."""
    _, built = pairs
    h = {}
    for k, pair in built.items():
        teacher, _, protocol, prompts = _measure(pair, k)
        h[k] = C.measure_entropy(*C.teacher_entropy_per_prompt(teacher, prompts, protocol), n_boot=300)
    assert h[1][2] < h[4][1] and h[4][2] < h[16][1], h


def test_one_vocabulary_in_every_built_pair(pairs):
    _, built = pairs
    vocabs = [models.load_tokenizer(p / "teacher").get_vocab() for p in built.values()]
    assert all(v == vocabs[0] for v in vocabs)


def test_per_prompt_entropy_is_the_teachers_own_sample_entropy(pairs):
    """The entropy column is sum H / tokens over the teacher's own samples: the same tokens, in the same
    order, as entropy.teacher_sample_entropies' flat profile (report.py's), just kept per prompt."""
    _, built = pairs
    teacher, _, protocol, prompts = _measure(built[4], 4, n=8)
    flat = entropy.teacher_sample_entropies(teacher, prompts, seed=0, **protocol.generate_kwargs())
    rows = entropy.teacher_sample_entropies(teacher, prompts, seed=0, per_row=True, **protocol.generate_kwargs())
    np.testing.assert_allclose(np.concatenate(rows), flat)
    sums, counts = C.teacher_entropy_per_prompt(teacher, prompts, protocol)
    assert counts.sum() == flat.size and sums.sum() == pytest.approx(float(flat.sum()), rel=1e-5)


def test_measured_entropy_weighs_tokens_not_prompts():
    """Mean over every sampled token: prompt A has 1 token at 3 nats, B 3 tokens at 1 nat each ->
    (3 + 3) / 4 = 1.5, not the mean of per-prompt means (3 + 1) / 2 = 2."""
    assert C.measure_entropy([3.0, 3.0], [1.0, 3.0], n_boot=100)[0] == pytest.approx(1.5)


# ----------------------------------------------------------------------------- the curve's numbers

def _pp(acc, alpha, length):
    return {"token_acceptance": list(acc), "alpha": list(alpha), "mean_accepted_length": list(length)}


def _synthetic(levels, seeds=(0, 1), n=6):
    """{k: {run_name: per-prompt metrics}} where div's token acceptance is levels[k][div] + seed noise,
    alpha is something else (0.9 everywhere) and the mean accepted length 1 + 4 x acceptance + 0.5."""
    out = {}
    for k, by_div in levels.items():
        out[k] = {}
        for div, v in by_div.items():
            for s in ((None,) if div == "baseline" else seeds):
                acc = np.full(n, v) + (0 if s is None else 0.002 * (s - 0.5))
                out[k][C.run_name(div, s)] = _pp(acc, np.full(n, 0.9), 1.5 + 4 * acc)
    return out


LEVELS = {1: {"baseline": 0.3, "fkl": 0.50, "rkl": 0.60, "jsd": 0.55},
          4: {"baseline": 0.2, "fkl": 0.52, "rkl": 0.40, "jsd": 0.45},
          16: {"baseline": 0.1, "fkl": 0.30, "rkl": 0.20, "jsd": 0.35}}
ENTROPY = {1: (0.0, 0.0, 0.0), 4: (1.3, 1.2, 1.4), 16: (2.6, 2.5, 2.7)}


def _curve():
    collected = C.collect(_synthetic(LEVELS), ("baseline", "fkl", "rkl", "jsd"), (0, 1))
    return C.build_curve(collected, ENTROPY, n_boot=300)


def test_levels_are_token_acceptance_and_mean_accepted_length_not_alpha():
    """Each level column is the mean over seeds of the per-prompt metric of its name: token acceptance
    (not alpha, 0.9 here) and mean accepted length (1.5 + 4 x acceptance here)."""
    c = _curve()
    for k, by_div in LEVELS.items():
        for div, v in by_div.items():
            assert c.levels[k][div]["token_acceptance"][0] == pytest.approx(v, abs=1e-9)
            assert c.levels[k][div]["mean_accepted_length"][0] == pytest.approx(1.5 + 4 * v, abs=1e-9)


def test_best_and_differences_to_the_best_are_div_minus_best():
    """best = the trained divergence with the highest mean (never the baseline); each difference is
    div - best (<= 0), paired by prompt; the best has none."""
    c = _curve()
    assert c.best["token_acceptance"] == {1: "rkl", 4: "fkl", 16: "jsd"}
    assert c.to_best["token_acceptance"][1]["rkl"] is None
    assert c.to_best["token_acceptance"][1]["fkl"][0] == pytest.approx(0.50 - 0.60, abs=1e-9)
    assert c.to_best["token_acceptance"][16]["rkl"][0] == pytest.approx(0.20 - 0.35, abs=1e-9)
    assert c.to_best["mean_accepted_length"][4]["jsd"][0] == pytest.approx(4 * (0.45 - 0.52), abs=1e-9)
    assert "baseline" not in c.to_best["token_acceptance"][1]
    assert c.order == [1, 4, 16]


def test_claim_is_rkl_minus_jsd_and_the_verdict_follows_its_intervals():
    """claim[k] = rkl - jsd: +5 points at K = 1, -15 at K = 16 here: rkl better at the lowest entropy
    and jsd at the highest, both separated -> the seed's claim holds; reversing the data contradicts it."""
    c = _curve()
    assert c.claim[1][0] == pytest.approx(0.05, abs=1e-9) and c.claim[16][0] == pytest.approx(-0.15, abs=1e-9)
    v = C.claim_verdict(c)
    assert v["holds"] and not v["contradicted"] and v["low"] == 1 and v["high"] == 16
    assert v["low_best"] and v["high_best"]
    flipped = {k: {**d, "rkl": d["jsd"], "jsd": d["rkl"]} for k, d in LEVELS.items()}
    c2 = C.build_curve(C.collect(_synthetic(flipped), ("baseline", "fkl", "rkl", "jsd"), (0, 1)), ENTROPY, 300)
    v2 = C.claim_verdict(c2)
    assert v2["contradicted"] and not v2["holds"]


def test_ranking_changes_name_the_winners_and_signed_differences():
    """rkl best at K = 1, fkl at K = 4, jsd at K = 16: two changes, each with old - new below (> 0) and
    above (< 0), resolved since the seed noise is tiny."""
    ch = C.ranking_changes(_curve())
    assert [(x["from"], x["to"], x["lo_k"], x["hi_k"]) for x in ch] == [("rkl", "fkl", 1, 4), ("fkl", "jsd", 4, 16)]
    assert ch[0]["below"][0] == pytest.approx(0.60 - 0.50, abs=1e-9)
    assert ch[0]["above"][0] == pytest.approx(0.40 - 0.52, abs=1e-9)
    assert all(x["resolved"] for x in ch)


def test_ties_are_the_divergences_not_separated_from_the_best():
    """Two divergences equal up to seed noise larger than their gap: the runner-up is tied with the best."""
    levels = {1: {"baseline": 0.3, "fkl": 0.50, "rkl": 0.501}, 4: {"baseline": 0.3, "fkl": 0.6, "rkl": 0.4}}
    raw = _synthetic(levels)
    for name in ("fkl-s0", "fkl-s1", "rkl-s0", "rkl-s1"):     # big seed-to-seed spread at K = 1
        s = int(name[-1])
        raw[1][name]["token_acceptance"] = list(np.asarray(raw[1][name]["token_acceptance"]) + 0.2 * (s - 0.5))
    c = C.build_curve(C.collect(raw, ("baseline", "fkl", "rkl"), (0, 1)), {1: (0, 0, 0), 4: (1, 1, 1)}, 300)
    assert set(c.ties["token_acceptance"][1]) == {"fkl", "rkl"}
    assert c.ties["token_acceptance"][4] == ["fkl"]
    assert "(tied)" in C.to_best_markdown(c)


def test_collect_names_every_missing_draft():
    raw = _synthetic(LEVELS)
    del raw[4]["rkl-s1"], raw[16]["baseline"]
    with pytest.raises(report.MissingRunError, match="k4/rkl-s1.*k16/baseline"):
        C.collect(raw, ("baseline", "fkl", "rkl", "jsd"), (0, 1))


def test_markdown_tables_show_the_numbers_and_the_answer_says_the_verdict():
    c = _curve()
    md = C.levels_markdown(c, "token_acceptance")
    assert "**0.600 [" in md and "| 16 | 2.60 [2.50, 2.70] |" in md
    assert "| 1 | 0.00 | rkl | -10.0 [" in C.to_best_markdown(c)
    text = " ".join(C.answer_sentences(c))
    assert "HOLDS" in text and "from rkl to fkl" in text


def test_one_divergence_is_not_said_to_beat_the_others():
    """A partial study with a single trained divergence has no runner-up: the answer must not claim that every
    other divergence is separated below it (there is none), but say it is the only one measured."""
    levels = {1: {"baseline": 0.3, "rkl": 0.5}}
    c = C.build_curve(C.collect(_synthetic(levels), ("baseline", "rkl"), (0, 1)), {1: (0, 0, 0)}, 300)
    (text,) = C.answer_sentences(c)
    assert "only divergence measured" in text and "every other" not in text


# ----------------------------------------------------------------------------- end to end

def test_quick_curve_end_to_end_writes_every_section_and_figure(pairs, tmp_path, monkeypatch):
    """The QUICK pipeline as CI runs it (fewer settings, drafts and prompts here): pairs, distill.py,
    evaluate_draft, the bootstrap, the figures and CURVE.md, whose numbers are the drafts' evaluations."""
    root, _ = pairs
    monkeypatch.setitem(C.QUICK, "root", str(root))
    monkeypatch.setitem(C.QUICK, "runs", str(tmp_path / "runs"))
    out = C.main(["--quick", "--settings", "1", "16", "--divs", "baseline", "rkl", "jsd", "--steps", "2",
                  "--n-prompts", "8", "--out", str(tmp_path / "CURVE.md")])
    md = out.read_text()
    for section in ("## Answer", "## The task family and its entropy knob", "## Token acceptance per setting",
                    "## Mean accepted length", "## Each divergence minus the best", "## The seed's claim",
                    "QUICK run"):
        assert section in md
    for name in ("token_acceptance", "mean_accepted_length", "to_best", "entropy_knob", "seed_claim"):
        assert (tmp_path / "figures" / f"curve_{name}.png").stat().st_size > 1000
    per_seed = [np.nanmean(np.asarray(json.loads((tmp_path / "runs" / "k16" / f"rkl-s{s}" / "curve_eval.json")
                                                 .read_text())["per_prompt"]["token_acceptance"], dtype=float))
                for s in (0, 1)]
    section = md.split("## Token acceptance per setting")[1]
    row = next(line for line in section.split("\n") if line.startswith("| 16 |"))
    assert f"{np.mean(per_seed):.3f} [" in row          # the rkl level: mean over seeds of per-seed means


def test_seeds_beyond_32_bits_are_refused_with_the_other_options():
    """Issue 31: a seed past 2^32 - 1 overflows the 64-bit seeds distill.py derives from it, deep inside the
    first training run; the curve's --seeds share distill.py's rule (cli.check_seed) and are checked first."""
    with pytest.raises(ValueError, match=r"--seeds 4294967296 is not allowed; --seeds must be an integer >= 0 and <= "):
        C.parse_args(["--seeds", "0", str(2**32)])
