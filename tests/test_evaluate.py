"""evaluate.py: bootstrap intervals, per-prompt metrics, and the eval files report.py reads."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

import entropy
from study import evaluate
import models


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = models.ensure_tiny_pair("gsm8k", root=tmp_path_factory.mktemp("ckpt"), scale="test")
    return str(Path(root) / "teacher"), str(Path(root) / "student")


def test_bootstrap_interval_matches_the_normal_approximation():
    """For a large sample the percentile bootstrap interval of the mean is mean +- 1.96 sd / sqrt(n)."""
    x = np.random.default_rng(1).normal(3.0, 2.0, size=2000)
    mean, lo, hi = evaluate.bootstrap_ci(x, n_boot=4000)
    half = 1.96 * x.std(ddof=1) / math.sqrt(x.size)
    assert mean == pytest.approx(x.mean())
    assert lo == pytest.approx(mean - half, abs=0.1 * half)
    assert hi == pytest.approx(mean + half, abs=0.1 * half)


def test_bootstrap_leaves_out_prompts_with_nothing_drafted():
    """A prompt that drafted nothing has no acceptance rate: it must not count as 0 (the seed's defect)."""
    mean, lo, hi = evaluate.bootstrap_ci([0.5, math.nan, 0.5])
    assert (mean, lo, hi) == (0.5, 0.5, 0.5)


def test_per_prompt_marks_undrafted_rows_as_missing():
    """specdec reports rate 0 for a row that drafted nothing; per_prompt turns that into None (no data)."""
    rows = [{"drafted": 4, "tested": 3, "accepted": 2, "acceptance_rate": 0.5, "alpha": 0.6,
             "mean_accepted_length": 2.0, "generated": 6, "wall_time_s": 0.1},
            {"drafted": 0, "tested": 0, "accepted": 0, "acceptance_rate": 0.0, "alpha": 0.0,
             "mean_accepted_length": 1.0, "generated": 1, "wall_time_s": 0.1}]
    pp = evaluate.per_prompt(rows)
    assert pp["token_acceptance"] == [0.5, None] and pp["alpha"] == [0.6, None]


def make_run(runs, name, model_dir, div="rkl"):
    """A fake distill.py run: <runs>/tiny/gsm8k/<name>/{config.json, final/}."""
    run = runs / "tiny" / "gsm8k" / name
    shutil.copytree(model_dir, run / "final")
    (run / "config.json").write_text(json.dumps({"div": div, "beta": 0.5}))


def test_eval_files_and_a_perfect_draft(pair, tmp_path):
    """End to end on the test pair: the teacher drafting for itself is accepted everywhere (alpha = token
    acceptance = 1, mean accepted length > 1); the JSON has every run's per-prompt metrics (one per
    prompt) and, with --record, the per-drafted-position records; the markdown has one row per draft."""
    runs = tmp_path / "runs"
    make_run(runs, "self-s0", pair[0])
    docs = evaluate.main(["--task", "gsm8k", "--teacher", pair[0], "--student", pair[1], "--runs", str(runs),
                          "--results", str(tmp_path / "results"), "--n-prompts", "6", "--record",
                          "--n-boot", "200", "--batch-size", "4", "--speedup-repeats", "1", "--batch1-prompts", "0"])
    doc = json.loads((tmp_path / "results" / "tiny" / "gsm8k" / "eval.json").read_text())
    assert set(doc["runs"]) == {"baseline", "self-s0"} == set(docs["gsm8k"]["runs"])
    perfect = doc["runs"]["self-s0"]["summary"]
    assert perfect["alpha"]["mean"] == pytest.approx(1.0, abs=1e-5)
    assert perfect["token_acceptance"]["mean"] == pytest.approx(1.0)
    assert perfect["mean_accepted_length"]["mean"] > 1.0
    for entry in doc["runs"].values():
        assert all(len(entry["per_prompt"][m]) == 6 for m in evaluate.METRICS)
        rec = entry["records"]
        assert len(rec["accepted"]) == sum(entry["per_prompt"]["drafted"]) > 0
        assert set(rec["row"]) <= set(range(6)) and max(rec["row"]) >= 4   # rows of later batches offset
        tested = entropy.tested_mask(rec)   # the pooled alpha: mean beta over tested positions only
        assert entry["pooled_alpha"] == pytest.approx(np.mean(np.asarray(rec["acceptance_prob"])[tested]), rel=1e-5)
    gain = doc["runs"]["self-s0"]["gain"]   # paired on the same prompts: the per-prompt differences' mean
    base_acc = doc["runs"]["baseline"]["per_prompt"]["token_acceptance"]
    self_acc = doc["runs"]["self-s0"]["per_prompt"]["token_acceptance"]
    pairs = [(a, b) for a, b in zip(self_acc, base_acc) if a is not None and b is not None]
    assert gain["n_prompts"] == len(pairs) and gain["mean"] == pytest.approx(np.mean([a - b for a, b in pairs]))
    assert doc["runs"]["self-s0"]["batch1"] is None                    # --batch1-prompts 0
    md = (tmp_path / "results" / "tiny" / "gsm8k" / "eval.md").read_text()
    assert "| baseline |" in md and "| self-s0 | rkl |" in md


def test_no_trained_runs_and_no_task_is_an_error(tmp_path):
    """`make eval` with nothing trained says what to do instead of printing an empty table."""
    with pytest.raises(ValueError, match="no trained drafts"):
        evaluate.main(["--runs", str(tmp_path)])                   # a folder with no runs


@pytest.mark.parametrize("argv, word", [(["--task", "mnist"], "mnist"), (["--preset", "huge"], "huge"),
                                        (["--n-prompts", "0"], "n-prompts")])
def test_bad_input_names_the_value(argv, word):
    with pytest.raises(ValueError, match=word):
        evaluate.main(argv)


# ---- the numbers users read -----------------------------------------------------------------

def test_pooled_acceptance_is_sum_accepted_over_sum_drafted():
    """eval.json's pooled_acceptance weighs every drafted token the same: (1 + 6) / (4 + 6) = 0.7, not the
    mean of the per-prompt rates (0.625), not accepted / generated, not accepted / prompts."""
    rows = [{"drafted": 4, "tested": 2, "accepted": 1, "generated": 3, "alpha": 0.5},
            {"drafted": 6, "tested": 6, "accepted": 6, "generated": 9, "alpha": 1.0}]
    assert evaluate.pooled_acceptance(rows) == pytest.approx(0.7)
    assert math.isnan(evaluate.pooled_acceptance([{"drafted": 0, "accepted": 0}]))


def test_pooled_alpha_weighs_each_prompt_by_its_tested_positions():
    """The pooled analytic alpha (the alpha of the predicted speedup) is the mean beta over every TESTED position:
    a prompt's alpha is its mean over its tested positions, so it weighs by them, (0.5 * 2 + 1.0 * 6) / 8 = 0.875,
    not by its drafted positions ((0.5 * 4 + 1.0 * 6) / 10 = 0.8): positions drafted after a rejection are in
    neither the prompt's alpha nor the pool."""
    rows = [{"drafted": 4, "tested": 2, "accepted": 1, "generated": 3, "alpha": 0.5},
            {"drafted": 6, "tested": 6, "accepted": 6, "generated": 9, "alpha": 1.0}]
    assert evaluate.pooled_alpha(rows) == pytest.approx(0.875)
    assert math.isnan(evaluate.pooled_alpha([{"drafted": 0, "tested": 0, "accepted": 0, "alpha": math.nan}]))


@pytest.mark.parametrize("alpha, gamma, c, expected", [
    (0.8, 5, 0.0, (1 - 0.8 ** 6) / 0.2),             # free draft: expected tokens per target call
    (0.8, 5, 0.1, (1 - 0.8 ** 6) / 0.2 / 1.5),
    (0.0, 4, 0.25, 1 / 2.0),                          # nothing accepted: one token per (slower) round
    (1.0, 5, 0.1, 6 / 1.5),                           # everything accepted: gamma + 1 tokens per round
])
def test_theoretical_speedup_is_leviathans_formula(alpha, gamma, c, expected):
    """The theory column is (1 - alpha^(gamma+1)) / ((1 - alpha)(gamma c + 1)) (ANCHORS.md)."""
    assert evaluate.theoretical_speedup(alpha, gamma, c) == pytest.approx(expected)


def test_row_wall_time_runs_from_admission_to_finish(pair):
    """Under continuous batching with one slot the rows run one after another, so their times
    (admission -> finish) add up to at most the call's wall time; counted from the call's start they
    would add up to about (n + 1) / 2 times it."""
    import specdec
    teacher, draft = models.load_model(pair[0]), models.load_model(pair[1])
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14, 15]]
    res = specdec.speculative_generate(teacher, draft, prompts, max_new_tokens=12, temperature=1.0, seed=0,
                                       eos_token_id=[], batch_size=1)
    rows = [r["wall_time_s"] for r in res.stats["per_row"]]
    assert all(t > 0 for t in rows)
    assert sum(rows) <= res.stats["wall_time_s"] * 1.001


FIXTURE_TEST = Path(__file__).parent / "fixtures" / "gsm8k" / "test.jsonl"


def test_eval_on_a_local_file_reports_the_speedup(pair, tmp_path, capsys):
    """`make eval SOURCE=file DATA=...` end to end on real GSM8k rows: the prompts are the file's
    questions, and the JSON's pooled acceptance, measured speedup and theoretical speedup are computed
    from the right quantities (sums over prompts; tokens/s ratio over the batches both sides ran, here
    the first of two; the formula with the measured c)."""
    (tmp_path / "none").mkdir()
    docs = evaluate.main(["--task", "gsm8k", "--teacher", pair[0], "--student", pair[1], "--runs",
                          str(tmp_path / "none"), "--results", str(tmp_path / "results"), "--n-prompts", "3",
                          "--source", "file", "--data-path", str(FIXTURE_TEST), "--n-boot", "50",
                          "--batch-size", "2", "--speedup-batches", "1"])
    out = capsys.readouterr().out
    assert "40 rows from" in out           # the whole file is checked, 3 are used
    results = tmp_path / "results" / "tiny" / "gsm8k-file-gsm8k"    # off the preset's data: its own folder
    doc = json.loads((results / "eval.json").read_text())
    assert doc["protocol"]["source"] == "file" and doc["protocol"]["n_prompts"] == 3
    base = doc["runs"]["baseline"]
    pp, speed = base["per_prompt"], base["speedup"]
    assert base["pooled_acceptance"] == pytest.approx(sum(pp["accepted"]) / sum(pp["drafted"]))
    assert (speed["batch_size"], speed["prompts"], len(speed["timings"])) == (2, 2, 3)   # 1 batch of 2, 3 repeats
    for t in speed["timings"]:          # each repeat: tokens/s with the draft over tokens/s of the target alone
        assert t["target_tokens"] > 0 and t["speedup"] == pytest.approx(
            (t["draft_tokens"] / t["draft_s"]) / (t["target_tokens"] / t["target_s"]))
    assert speed["speedup_measured"] == pytest.approx(np.median([t["speedup"] for t in speed["timings"]]))
    assert speed["speedup_theoretical"] == pytest.approx(evaluate.theoretical_speedup(
        base["pooled_alpha"], doc["protocol"]["gamma"], speed["cost_ratio"]))
    assert speed["cost_ratio"] == pytest.approx(speed["draft_step_s"] / speed["target_step_s"])
    b1 = base["batch1"]                 # --batch1-prompts 4 of the 3 prompts: all three, one at a time
    assert (b1["batch_size"], b1["prompts"]) == (1, 3)
    assert b1["speedup_theoretical"] == pytest.approx(evaluate.theoretical_speedup(
        base["pooled_alpha"], doc["protocol"]["gamma"], b1["cost_ratio"]))
    assert base["gain"] is None and "(the reference)" in base["verdict"] and "batch 1:" in base["verdict"]
    assert "Verdict (gsm8k" in out
    md = (results / "eval.md").read_text()
    assert "speedup measured" in md and "target alone tokens/s" in md and "## Verdict" in md
    assert set(docs["gsm8k"]["runs"]) == {"baseline"}


def test_bad_data_fails_before_any_model_loads(pair, tmp_path):
    """A bad row stops evaluate.py before the models load (the student path does not even exist)."""
    bad = tmp_path / "test.jsonl"
    bad.write_text(json.dumps({"question": None, "answer": "#### 1"}) + "\n")
    with pytest.raises(ValueError, match=r"test\.jsonl, line 1: column 'question' is null"):
        evaluate.main(["--task", "gsm8k", "--teacher", pair[0], "--student", str(tmp_path / "no-student"),
                       "--data-path", str(bad)])


@pytest.mark.parametrize("argv, word", [
    (["--task", "gsm8k", "--source", "file"], "--source file needs --data-path"),
    (["--task", "gsm8k", "--source", "standin", "--data-path", "x.jsonl"], "only read with --source file"),
    (["--data-path", "x.jsonl"], "pass --task"),
])
def test_source_and_data_path_errors(argv, word):
    """The shared --source / --data-path rule: a path is never ignored, file needs a path."""
    with pytest.raises(ValueError, match=word):
        evaluate.main(argv)


def test_make_eval_passes_source_and_data():
    """`make eval SOURCE=file DATA=PATH` must reach evaluate.py as --source file --data-path PATH (with the
    TASK, which a path needs)."""
    import subprocess
    root = Path(__file__).resolve().parent.parent
    cmd = subprocess.run(["make", "-n", "eval", "SOURCE=file", "DATA=some/test.jsonl"], cwd=root,
                         capture_output=True, text=True, check=True).stdout
    assert "--source file" in cmd and "--data-path some/test.jsonl" in cmd and "--task gsm8k" in cmd


# ---- the verdict: gain over the baseline, repeated timings, why a speedup is below 1 -----------------

def test_repeat_summary_reports_the_median_and_flags_a_spread_beyond_the_tolerance():
    """The reported speedup is the median of the repeats (1.0 here, not the mean 1.2, so one disturbed
    repeat does not move it) and repeats spreading (1.6 - 1.0) / 1.0 = 60% > 10% are flagged; repeats
    within 5% agree; a single repeat never claims agreement (its noise is unknown)."""
    noisy = evaluate.repeat_summary([1.0, 1.6, 1.0], tolerance=0.1)
    assert noisy["speedup_measured"] == 1.0 and noisy["speedup_spread"] == pytest.approx(0.6)
    assert not noisy["speedup_agree"]
    calm = evaluate.repeat_summary([1.40, 1.45, 1.47], tolerance=0.1)
    assert calm["speedup_measured"] == 1.45 and calm["speedup_spread"] == pytest.approx(0.07 / 1.45)
    assert calm["speedup_agree"] and (calm["speedup_min"], calm["speedup_max"]) == (1.40, 1.47)
    assert not evaluate.repeat_summary([1.5])["speedup_agree"]


def test_paired_gain_is_the_mean_of_per_prompt_differences_over_prompts_both_have():
    """The gain over the baseline pairs each prompt's two values: prompts where either drafted nothing are
    left out (here only prompt 0 remains: 0.5 - 0.4 = 0.1, not the difference of the means 0.7 - 0.25)."""
    g = evaluate.paired_gain([0.5, 0.9, None], [0.4, None, 0.1], n_boot=100)
    assert (g["mean"], g["lo"], g["hi"], g["n_prompts"]) == pytest.approx((0.1, 0.1, 0.1, 1))


def test_paired_gain_cancels_the_spread_between_prompts():
    """Two drafts on the same prompts share the prompts' difficulty: a constant +0.05 on prompts whose values
    range from 0 to 0.9 has a paired interval of width 0 around 0.05, where an unpaired comparison of the
    two means could not tell them apart (each mean's interval is several points wide)."""
    base = list(np.random.default_rng(0).uniform(0.0, 0.9, size=64))
    g = evaluate.paired_gain([b + 0.05 for b in base], base, n_boot=500)
    assert (g["lo"], g["hi"]) == pytest.approx((0.05, 0.05))
    _, lo, hi = evaluate.bootstrap_ci(base, n_boot=500)
    assert hi - lo > 0.1
    with pytest.raises(ValueError, match="same prompts"):
        evaluate.paired_gain([0.1, 0.2], [0.1])


def _fake_generators(monkeypatch, seconds: dict, tokens: dict):
    """specdec's two generators replaced by fakes that return `tokens[side]` tokens per row and report
    `seconds[side]` per call; every call is logged as (side, seed, rows)."""
    import specdec
    calls = []

    def fake(side):
        def gen(*args, seed, **kw):
            prompts = args[-1]
            calls.append((side, seed, len(prompts)))
            return specdec.GenerationResult(tokens=[[1] * tokens[side]] * len(prompts),
                                            stats={"wall_time_s": seconds[side], "target_calls": 3,
                                                   "draft_calls": 15})
        return gen
    monkeypatch.setattr(specdec, "autoregressive_generate", fake("target"))
    monkeypatch.setattr(specdec, "speculative_generate", fake("draft"))
    return calls


def test_time_speedup_alternates_the_two_sides_and_divides_tokens_per_second(monkeypatch):
    """Each repeat times the target alone and speculative decoding on every batch in turns (target first in
    even repeats, draft first in odd ones, so a drift in machine load hits both), both seeded seed + the
    batch's first prompt, as the acceptance pass is; a repeat's speedup is draft tokens/s over target
    tokens/s: (2 rows x 8 tokens / 0.5 s) / (2 x 6 / 1.0 s) = 32 / 12 (not seconds alone: 2.0). The speculative
    side's batched rounds and draft steps are summed over the batches (round_overhead divides by their cost)."""
    calls = _fake_generators(monkeypatch, {"target": 1.0, "draft": 0.5}, {"target": 6, "draft": 8})
    t = evaluate.time_speedup("T", "D", [[1], [2], [3], [4]], batch_size=2, seed=10, repeats=2, gamma=5)
    assert calls == [("target", 10, 2), ("draft", 10, 2), ("target", 12, 2), ("draft", 12, 2),
                     ("draft", 10, 2), ("target", 10, 2), ("draft", 12, 2), ("target", 12, 2)]
    assert t["timings"][0] == {"target_s": 2.0, "target_tokens": 24, "draft_s": 1.0, "draft_tokens": 32,
                               "speedup": pytest.approx(32 / 24 * 2.0 / 1.0), "draft_rounds": 6, "draft_steps": 30}
    assert t["speedup_measured"] == pytest.approx((32 / 1.0) / (24 / 2.0))
    assert (t["target_tokens_per_s"], t["draft_tokens_per_s"]) == pytest.approx((12.0, 32.0))
    assert t["speedup_agree"] and (t["batch_size"], t["prompts"]) == (2, 4)


def test_why_slower_names_the_break_even_cost_ratio_or_the_batch():
    """Theory below 1: the draft is too dear. With alpha 0.8 and gamma 5 a round yields E = 3.69 tokens and
    costs gamma c + 1 = 4.2 target steps at c = 0.64, so it pays only for c < (E - 1) / gamma = 0.54. Theory
    above 1 but measured below: the sentence blames what the formula leaves out at that batch size."""
    dear = evaluate.why_slower(0.8, 5, 0.64, evaluate.theoretical_speedup(0.8, 5, 0.64), 16)
    assert "c = 0.64" in dear and "4.2 target steps for 3.7 tokens" in dear and "c < 0.54" in dear
    batch = evaluate.why_slower(0.8, 5, 0.1, evaluate.theoretical_speedup(0.8, 5, 0.1), 32)
    assert "theory predicts 2.46x" in batch and "at batch 32" in batch


def _timing(measured, repeats, c, theory, batch):
    return {"batch_size": batch, **evaluate.repeat_summary(repeats), "speedup_measured": measured,
            "cost_ratio": c, "speedup_theoretical": theory}


def test_verdict_states_gain_interval_speedups_and_flags_noise():
    """A verdict line per draft: the baseline is the reference; a draft whose paired interval excludes 0 is
    'above the baseline', with the points and interval; each speedup is given measured and predicted at
    both batch sizes; repeats that disagree are flagged NOISY instead of standing as a lone number; a
    speedup below 1 says why."""
    summary = lambda m: {"token_acceptance": {"mean": m}}                      # noqa: E731
    base = {"name": "baseline", "summary": summary(0.52), "pooled_alpha": 0.79, "gain": None,
            "speedup": _timing(0.55, [0.5, 0.55, 0.6], 0.64, 0.86, 16), "batch1": None}
    draft = {"name": "rkl-s0", "divergence": "rkl", "summary": summary(0.61), "pooled_alpha": 0.84,
             "gain": {"mean": 0.085, "lo": 0.07, "hi": 0.10, "n_prompts": 128},
             "speedup": _timing(1.45, [1.44, 1.45, 1.47], 0.15, 2.2, 16),
             "batch1": _timing(1.6, [1.0, 1.6, 1.9], 0.14, 2.3, 1)}
    b, d = evaluate.verdict_lines([base, draft], gamma=5)
    assert "(the reference)" in b and "batch 16: 0.55x measured" in b and "0.86x predicted" in b
    assert "NOISY" in b and "slower than the target alone because" in b and "c < 0.52" in b   # alpha 0.79
    assert "+8.5 points [+7.0, +10.0] over the baseline (paired bootstrap over 128 prompts): above" in d
    assert "batch 16: 1.45x measured (3 repeats 1.44-1.47, within 10%), 2.20x predicted (c = 0.15)" in d
    assert "batch 1: 1.60x measured (NOISY: 3 repeats 1.00-1.90 differ by 56%" in d
    assert "slower" not in d


# ---- drafts given by path; runs and results of one data set in one task folder ----------------------

def write_fake_run(run_dir: Path, model_dir, div="rkl", seed=0, beta=0.5, task="gsm8k"):
    """A distill.py run directory anywhere: config.json (div, seed, task) and final/ + best/ model folders."""
    shutil.copytree(model_dir, run_dir / "final")
    shutil.copytree(model_dir, run_dir / "best")
    (run_dir / "config.json").write_text(json.dumps({"div": div, "seed": seed, "beta": beta, "task": task}))
    return run_dir


def test_drafts_by_path_are_labelled_by_their_runs_config(pair, tmp_path):
    """--drafts takes run directories and model folders from anywhere (a run stored outside runs/<preset>/<task>/
    could only be passed as --student, where it was labelled "baseline"): a run directory and its best/ are named
    by the run's config.json (div, seed), not by where they are stored, a model folder outside any run by its
    folder name; the baseline stays the preset's (here --student) student, and no run under runs/ is added."""
    jsd = write_fake_run(tmp_path / "elsewhere" / "my-experiment", pair[1], div="jsd", seed=3, beta=0.9)
    rkl = write_fake_run(tmp_path / "other" / "try2", pair[1], div="rkl", seed=1)
    loose = tmp_path / "drafts" / "distilled-copy"
    shutil.copytree(pair[1], loose)
    args = evaluate.parse_args(["--task", "gsm8k", "--teacher", pair[0], "--student", pair[1], "--n-prompts", "2",
                                "--drafts", str(jsd), str(rkl / "best"), str(loose)])
    inputs = evaluate.check_task_inputs(args, "gsm8k")
    assert inputs["drafts"] == [("baseline", "baseline (no distillation)", pair[1]),
                                ("jsd-s3", "jsd(beta=0.9)", str(jsd / "final")),
                                ("rkl-s1-best", "rkl", str(rkl / "best")),
                                ("distilled-copy", "?", str(loose))]


def test_drafts_of_the_same_name_are_kept_apart(pair, tmp_path):
    """Two runs with the same divergence and seed (stored in two places) are two drafts: the second is named
    '#2', not written over the first in the results (which are keyed by name)."""
    a = write_fake_run(tmp_path / "a" / "run", pair[1])
    b = write_fake_run(tmp_path / "b" / "run", pair[1])
    args = evaluate.parse_args(["--task", "gsm8k", "--drafts", str(a), str(b)])
    assert [d["name"] for d in args.drafts] == ["rkl-s0", "rkl-s0#2"]


def test_drafts_give_the_task_when_none_is_passed(pair, tmp_path):
    """Without --task, the drafts' runs name it (a run trained on cnndm is evaluated on cnndm)."""
    run = write_fake_run(tmp_path / "run", pair[1], task="cnndm")
    assert evaluate.parse_args(["--drafts", str(run)]).task == "cnndm"


@pytest.mark.parametrize("make_argv, word", [
    (lambda run, tmp: ["--drafts", str(tmp / "missing")], r"--drafts .*missing: no such folder"),
    (lambda run, tmp: ["--drafts", str(tmp)], r"neither a run directory \(holding final/\) nor a model folder"),
    (lambda run, tmp: ["--drafts", str(run), "--runs", str(tmp)], "--drafts and --runs"),
    (lambda run, tmp: ["--task", "cnndm", "--drafts", str(run)], "trained on task gsm8k, not cnndm"),
])
def test_bad_drafts_are_named_before_any_model_loads(pair, tmp_path, make_argv, word):
    """A --drafts folder that holds no model, a second way to pick drafts, or a draft of another task: one line
    naming it, before any model loads."""
    run = write_fake_run(tmp_path / "run", pair[1])
    with pytest.raises(ValueError, match=word):
        evaluate.main(make_argv(run, tmp_path) + ["--student", str(tmp_path / "no-student")])


def test_training_on_a_train_file_and_evaluating_on_its_test_file_share_a_task_folder(pair, tmp_path, monkeypatch):
    """`make train DATA=d/gsm8k/train.jsonl` then `make eval DATA=d/gsm8k/test.jsonl` (two files, not a folder)
    put the runs in runs/tiny/gsm8k-file-train and looked for them in gsm8k-file-test: make eval found no draft.
    The two files of one data set name one task folder, the same as the folder itself."""
    import distill
    from plumbing import train_checks
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "d" / "gsm8k"
    folder.mkdir(parents=True)
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text(json.dumps({"question": "How many?", "answer": "Two.\n#### 2"}) + "\n")
    trained = train_checks.resolve_config(distill.parse_args(["--task", "gsm8k", "--teacher", pair[0],
                                                              "--student", pair[1], "--data-path", str(folder / "train.jsonl")]))
    evaluated = evaluate.parse_args(["--task", "gsm8k", "--data-path", str(folder / "test.jsonl")])
    group = evaluate.task_group(evaluated, "gsm8k")
    assert Path(trained.out).parent == Path("runs") / "tiny" / group
    assert group == evaluate.task_group(evaluate.parse_args(["--task", "gsm8k", "--data-path", str(folder)]), "gsm8k")


def test_a_speedup_difference_inside_the_repeats_spread_is_called_noise():
    """make eval said a draft was '+4.0 points above the baseline' while measuring it at 2.11x against the
    baseline draft's 2.22x, implying it was slower: with repeats 2.02-2.20 vs 2.10-2.31 the difference is inside
    the timing noise and the verdict must say so; only repeats that do not overlap make one draft faster or
    slower, and one repeat per side shows no noise at all, so it claims nothing."""
    summary = lambda m: {"token_acceptance": {"mean": m}}                      # noqa: E731
    base = {"name": "baseline", "summary": summary(0.52), "pooled_alpha": 0.79, "gain": None,
            "speedup": _timing(2.22, [2.10, 2.22, 2.31], 0.1, 2.5, 16), "batch1": _timing(1.5, [1.5], 0.1, 2, 1)}
    gain = {"mean": 0.04, "lo": 0.02, "hi": 0.06, "n_prompts": 64}
    close = {"name": "rkl-s0", "divergence": "rkl", "summary": summary(0.56), "pooled_alpha": 0.8, "gain": gain,
             "speedup": _timing(2.11, [2.02, 2.11, 2.20], 0.1, 2.6, 16), "batch1": _timing(1.4, [1.4], 0.1, 2, 1)}
    apart = dict(close, name="fkl-s0", speedup=_timing(2.60, [2.55, 2.60, 2.66], 0.1, 2.6, 16))
    _, c, a = evaluate.verdict_lines([base, close, apart], gamma=5)
    assert ("batch 16: 2.11x vs the baseline draft's 2.22x: the difference (-0.11x) is inside the timing noise "
            "(repeats 2.02-2.20 vs 2.10-2.31 overlap), so neither draft is measured faster") in c
    assert "batch 1: 1.40x vs the baseline draft's 1.50x: one repeat, the timing noise is unknown" in c
    assert "batch 16: 2.60x, faster than the baseline draft's 2.22x (repeats 2.55-2.66 vs 2.10-2.31: apart)" in a


def test_a_speedup_far_below_the_prediction_names_the_measured_causes():
    """The verdict blamed c alone when the measured speedup was far below the predicted one (0.22x vs 0.52x on
    the real model). It must name what the data shows: rounds yielding fewer tokens than the formula's
    (1 - a^6) / (1 - a) = 1.30 at alpha 0.232 (1.05 measured), acceptance falling with position (30% -> 1%), and
    rounds costing 1.80x their draft steps + one target step timed alone."""
    timing = {"batch_size": 16, **evaluate.repeat_summary([0.21, 0.22, 0.23]), "cost_ratio": 0.5,
              "speedup_theoretical": 0.52, "round_overhead": 1.8}
    phrase = evaluate.speedup_phrase(timing, 0.232, 5, {"accepted_length": 1.05,
                                                        "per_position": [0.3, 0.1, 0.05, 0.02, 0.01]})
    assert "c = 0.50 of a target step" in phrase                      # c still named (theory below 1)
    assert "rounds yielded 1.05 tokens, not the 1.30 the formula expects from alpha 0.23" in phrase
    assert "acceptance falls with position, 30% at position 1 to 1% at position 5" in phrase
    assert "a round took 1.80x the time of its draft steps and one target step timed alone" in phrase


def test_round_overhead_divides_the_measured_time_by_the_rounds_cost_at_the_step_costs():
    """round_overhead = speculative seconds / (draft steps x draft_step_s + rounds x target_step_s), median over
    repeats: 2 s for 10 rounds of 40 draft steps at 0.01 s and 10 target steps at 0.1 s (1.4 s) is 1.43x."""
    t = {"draft_step_s": 0.01, "target_step_s": 0.1,
         "timings": [{"draft_s": s, "draft_rounds": 10, "draft_steps": 40} for s in (1.4, 2.0, 2.8)]}
    assert evaluate.round_overhead(t) == pytest.approx(2.0 / 1.4)


def test_pooled_per_position_acceptance_weighs_by_tested_counts():
    """Across prompts the rate at position i is sum accepted / sum tested there: (1 x 4 + 0 x 1) / 5 = 0.8 at
    position 1, not the mean of the two prompts' rates (0.5); a position no prompt tested has no rate."""
    rows = [{"per_position_acceptance": [1.0, math.nan], "per_position_tested": [4, 0]},
            {"per_position_acceptance": [0.0, math.nan], "per_position_tested": [1, 0]}]
    rates = evaluate.pooled_per_position(rows)
    assert rates[0] == pytest.approx(0.8) and math.isnan(rates[1])
