"""report.py: the bootstrap, the table built from eval JSON, the generated sentences, and the refusal
to write a partial report. No training here: the table-building is pure over loaded eval JSON."""
import numpy as np
import pytest

from study import report as R


def _entry(acc, alpha=None, length=None):
    acc = list(acc)
    return {"per_prompt": {"token_acceptance": acc, "alpha": alpha or acc,
                           "mean_accepted_length": length or [1 + 5 * a for a in acc]}}


def _evals(tasks=("gsm8k",), divs=R.DIVS, seeds=(0, 1), value=0.5):
    return {t: {R.run_name(d, s): _entry([value] * 4) for d in divs for s in (seeds if d != "baseline" else (None,))}
            for t in tasks}


def _row(task, div, mean, lo, hi):
    return R.Row(task, div, 3, 10, {m: (mean, lo, hi) for m in R.METRICS})


# ----------------------------------------------------------------------------- table from eval JSON

def test_collect_runs_raises_naming_every_missing_run():
    """A missing run must stop the report (never a partial table), and the message must list every
    missing run so one fix covers them all."""
    evals = _evals(seeds=(0, 1))
    del evals["gsm8k"]["rkl-s1"], evals["gsm8k"]["baseline"]
    with pytest.raises(R.MissingRunError, match=r"2 expected run\(s\).*gsm8k/baseline.*gsm8k/rkl-s1"):
        R.collect_runs(evals, seeds=(0, 1))


def test_build_table_has_one_row_per_task_and_divergence_with_the_data_means():
    """Each (task, div) cell averages its seeds' per-prompt values; the baseline uses one run."""
    evals = _evals(tasks=("gsm8k", "cnndm"), seeds=(0, 1))
    evals["cnndm"]["rkl-s0"] = _entry([0.2, 0.4])
    evals["cnndm"]["rkl-s1"] = _entry([0.6, 0.6, 0.6])
    rows = R.build_table(R.collect_runs(evals, seeds=(0, 1)), n_boot=200)
    assert len(rows) == 2 * len(R.DIVS)
    cell = next(r for r in rows if (r.task, r.div) == ("cnndm", "rkl"))
    assert cell.stats["token_acceptance"][0] == pytest.approx((0.3 + 0.6) / 2) and cell.n_seeds == 2
    assert next(r for r in rows if r.div == "baseline").n_seeds == 1


def test_table_markdown_bolds_the_best_mean_per_task():
    """The reader's eye goes to the best cell of each task: exactly one bold per task and metric."""
    rows = [_row("gsm8k", "rkl", 0.6, 0.5, 0.7), _row("gsm8k", "fkl", 0.5, 0.4, 0.6)]
    md = R.table_markdown(rows)
    rkl_line = next(line for line in md.splitlines() if "| rkl |" in line)
    assert rkl_line.count("**") == 2 * len(R.METRICS) and md.count("**") == 2 * len(R.METRICS)


# ----------------------------------------------------------------------------- sentences

def test_findings_say_the_seed_ordering_reproduces_when_it_does():
    """RKL best on gsm8k with a separated interval: the sentence says the claim reproduces."""
    rows = [_row("gsm8k", "rkl", 0.60, 0.58, 0.62), _row("gsm8k", "jsd", 0.50, 0.48, 0.52),
            _row("gsm8k", "baseline", 0.40, 0.38, 0.42)]
    text = " ".join(R.findings(rows))
    assert "the seed's ordering (rkl best) reproduces" in text and "does not overlap" in text


def test_findings_say_plainly_when_ajsd_is_worse():
    """ajsd below the best fixed divergence with non-overlapping intervals must be said plainly."""
    rows = [_row("cnndm", "jsd", 0.60, 0.58, 0.62), _row("cnndm", "ajsd", 0.50, 0.48, 0.52)]
    text = " ".join(R.findings(rows))
    assert "ajsd is NOT as good as the best fixed divergence" in text and "jsd" in text


def test_findings_do_not_call_an_overlapping_ordering_reproduced():
    """JSD best on cnndm by the mean only, its interval overlapping RKL's: that is not the seed's
    ordering reproduced, and the sentence must say it holds in the means only."""
    rows = [_row("cnndm", "jsd", 0.55, 0.45, 0.65), _row("cnndm", "rkl", 0.54, 0.44, 0.64)]
    text = " ".join(R.findings(rows))
    assert "holds in the means only" in text and "reproduces" not in text


# ----------------------------------------------------------------------------- the generator

def test_report_raises_and_writes_nothing_when_a_run_is_missing(tmp_path, monkeypatch):
    """End to end with training and evaluation stubbed: one run absent from the eval JSON ->
    MissingRunError, and no REPORT.md (not even a partial one) is written."""
    import json

    def fake_eval(cfg, task):
        evals = _evals(tasks=(task,), seeds=cfg.seeds)[task]
        evals.pop("tvd-s0")
        path = tmp_path / task / "eval.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"runs": evals}))
        return path

    monkeypatch.setattr(R, "train_all", lambda *a, **k: None)
    monkeypatch.setattr(R, "tune_ajsd", lambda cfg, task, log: {"grid": {(0.5, 1.0): (0.5, 0.4, 0.6)},
                                                               "selected": (0.5, 1.0), "n_val": 4})
    monkeypatch.setattr(R, "evaluate_task", fake_eval)
    out = tmp_path / "REPORT.md"
    with pytest.raises(R.MissingRunError, match="tvd-s0"):
        R.main(["--quick", "--tasks", "gsm8k", "--out", str(out)])
    assert not out.exists()


def test_profile_sentence_flags_a_broken_premise():
    """The study assumes gsm8k is the low-entropy task; if the teachers say otherwise, say so."""
    prof = lambda mean: {"n": 10, "mean": mean, "quantiles": {0.5: mean}}  # noqa: E731
    assert "as the study assumes" in R.profile_sentence({"gsm8k": prof(0.1), "cnndm": prof(1.0)})
    assert "NOT lower" in R.profile_sentence({"gsm8k": prof(1.0), "cnndm": prof(0.1)})


def test_report_reads_the_json_evaluate_writes(tmp_path):
    """The table is built from evaluate.py's real output format: write a doc with evaluate's own
    writer (a prompt with nothing drafted becomes null) and read it back; that prompt is left
    out of the mean, not counted as 0 (the seed's defect)."""
    from study import evaluate

    def stats(drafted, accepted):
        return {"drafted": drafted, "tested": drafted, "accepted": accepted, "acceptance_rate": accepted / drafted if drafted else float("nan"),
                "alpha": 0.5, "mean_accepted_length": 2.0, "generated": 4, "wall_time_s": 0.1}

    pp = evaluate.per_prompt([stats(10, 4), stats(0, 0), stats(10, 8)])
    timing = {"batch_size": 16, **evaluate.repeat_summary([1.5, 1.5]), "cost_ratio": 0.1, "speedup_theoretical": 1.7,
              "target_tokens_per_s": 2.0}
    speed = {"speedup": timing, "batch1": None, "gain": None, "verdict": "v"}
    runs = {R.run_name(d, 0): {"name": R.run_name(d, 0), "divergence": d, "per_prompt": pp, "tokens_per_s": 1.0,
                               "summary": evaluate.summarize(pp, 10, 0), **speed} for d in R.DIVS}
    evaluate.write_results({"preset": "tiny", "task": "gsm8k", "teacher": "t", "runs": runs,
                            "protocol": {"gamma": 5, "top_p": 0.95, "temperature": 0.6, "max_new_tokens": 8,
                                         "n_prompts": 3, "seed": 0, "n_boot": 10, "source": "standin",
                                         "data_path": None, "batch_size": 16, "speedup_repeats": 2}}, tmp_path)
    evals = {"gsm8k": R.load_eval(tmp_path / "tiny" / "gsm8k" / "eval.json")}
    rows = R.build_table(R.collect_runs(evals, seeds=(0,)), n_boot=100)
    assert rows[0].stats["token_acceptance"][0] == pytest.approx(0.6)


def test_bin_differences_are_per_bin_rate_differences():
    """Bin 0: the draft accepts 4 of 4 tokens, the baseline 2 of 4 -> +0.5; bin 1: both 1 of 2 -> 0."""
    n = np.array([[2.0, 1.0], [2.0, 1.0]])
    counts = {"baseline": [(n, np.array([[1.0, 1.0], [1.0, 0.0]]))],
              "rkl": [(n, np.array([[2.0, 0.0], [2.0, 1.0]]))]}
    m, lo, hi = R.bin_differences(counts, "baseline", n_boot=200)["rkl"]
    assert m == pytest.approx([0.5, 0.0])


def test_differences_use_the_best_fixed_divergence_as_reference():
    """The best fixed divergence is the highest mean among fkl/rkl/jsd/tvd (never ajsd or the
    baseline), and every other divergence is compared to it."""
    by_div = R.collect_runs(_evals(seeds=(0, 1)), seeds=(0, 1))["gsm8k"]
    by_div["jsd"] = [R.per_prompt_metrics(_entry([0.7] * 4))] * 2
    by_div["ajsd"] = [R.per_prompt_metrics(_entry([0.9] * 4))] * 2
    d = R.differences(by_div, n_boot=100)
    assert d["best"] == "jsd" and d["rows"]["jsd"]["best"] is None
    assert d["rows"]["ajsd"]["best"][0] == pytest.approx(0.2) and d["rows"]["rkl"]["baseline"][0] == pytest.approx(0)


def test_acceptance_objectives_are_compared_with_the_best_fixed_divergence_not_counted_as_one():
    """nla and lk join the study but not the fixed set: a high nla never becomes the reference, and the
    findings state nla - best and lk - best with their intervals, per task."""
    by_div = R.collect_runs(_evals(seeds=(0, 1)), seeds=(0, 1))["gsm8k"]
    by_div["tvd"] = [R.per_prompt_metrics(_entry([0.6] * 4))] * 2
    by_div["nla"] = [R.per_prompt_metrics(_entry([0.8] * 4))] * 2
    d = R.differences(by_div, n_boot=100)
    assert d["best"] == "tvd" and d["rows"]["nla"]["best"][0] == pytest.approx(0.2)
    text = R.objective_sentences({"gsm8k": d})
    assert len(text) == 2 and "nla - tvd = +20.00 points [+20.00, +20.00]" in text[0] and "separated" in text[0]
    assert "lk - tvd = -10.00 points" in text[1]


def test_headline_compares_the_seed_claims():
    """gsm8k: rkl vs jsd; cnndm: jsd vs fkl; the sentence names the pair and the difference."""
    by_div = R.collect_runs(_evals(tasks=("cnndm",), seeds=(0,)), seeds=(0,))["cnndm"]
    by_div["jsd"] = [R.per_prompt_metrics(_entry([0.6] * 4))]
    a, b, diff, text = R.headline(by_div, "cnndm", n_boot=100)
    assert (a, b) == ("jsd", "fkl") and diff[0] == pytest.approx(0.1) and "jsd - fkl = +10.00 points" in text


# ----------------------------------------------------------------------------- ajsd tuning

def test_select_ajsd_takes_the_best_validation_mean_and_the_table_bolds_it():
    grid = {(0.25, 0.3): (0.50, 0.4, 0.6), (0.5, 1.0): (0.62, 0.5, 0.7), (0.75, 3.0): (0.61, 0.5, 0.7)}
    assert R.select_ajsd(grid) == (0.5, 1.0)
    md = R.grid_markdown(grid, (0.5, 1.0))
    assert md.count("**") == 2 and "**0.620 [0.500, 0.700]**" in md


def test_validation_prompts_are_neither_eval_nor_training_prompts():
    """ajsd is tuned on prompts that no training run of the study sees and that are not in the eval
    split: the selection may not peek at the prompts the table is computed on."""
    import data

    cfg = R.ReportConfig(n_val=64)
    val = R.validation_examples(cfg, "cnndm", used_seeds=(0, 1))
    prompts = {e.prompt for e in val}
    assert len(prompts) == 64
    for seed in (0, 1):
        train = data.load_examples("cnndm", "train", n=960, seed=seed, max_article_tokens=None)
        assert not prompts & {e.prompt for e in train}
    assert not prompts & {e.prompt for e in data.load_examples("cnndm", "eval", n=400, max_article_tokens=None)}


# ----------------------------------------------------------------------------- entropy analysis

def _recorded_entry(rng, n_prompts, acc_prob):
    """An eval entry with records: 3 rounds of gamma 2 per prompt, H = 0 on 60% of positions."""
    rows, pos, acc, hp, ht = [], [], [], [], []
    for r in range(n_prompts):
        for _ in range(3):
            for i in (1, 2):
                zero = rng.random() < 0.6
                rows.append(r), pos.append(i), acc.append(bool(rng.random() < acc_prob))
                t = float(rng.exponential(0.8)) + 0.01
                hp.append(0.0 if zero else t / 2), ht.append(t)
    per = {"token_acceptance": [0.5] * n_prompts, "alpha": [0.5] * n_prompts,
           "mean_accepted_length": [2.0] * n_prompts}
    return {"per_prompt": per, "records": {"row": rows, "position": pos, "accepted": acc, "teacher_entropy": hp,
                                           "teacher_entropy_tempered": ht, "acceptance_prob": [0.5] * len(rows)}}


def test_entropy_analysis_fills_every_bin_and_compares_to_the_baseline():
    """Both views get data-filled bins (the processed one with its '0' bin, every bin with tokens
    for every divergence), and a draft that accepts more than the baseline everywhere shows a
    positive per-bin difference."""
    rng = np.random.default_rng(0)
    cfg = R.ReportConfig(divs=("baseline", "rkl", "jsd"), seeds=(0, 1), n_bins=3, n_boot=200)
    evals = {"baseline": _recorded_entry(rng, 100, 0.3)}
    evals.update({R.run_name(d, s): _recorded_entry(rng, 100, 0.8) for d in ("rkl", "jsd") for s in (0, 1)})
    by_div = R.collect_runs({"gsm8k": evals}, cfg.divs, cfg.seeds)["gsm8k"]
    an = R.entropy_analysis(cfg, "gsm8k", evals, by_div)
    assert set(an) == {"processed", "tempered"}
    assert an["processed"]["labels"][0] == "0" and an["tempered"]["labels"][0] != "0"
    for view in an.values():
        assert all(b.count > 0 for bins in view["bins"].values() for b in bins)
        m, lo, hi = view["vs_baseline"]["rkl"]
        assert (lo > 0).all() and np.allclose(m, 0.5, atol=0.2)
    assert "rkl in" in " ".join(R.gain_sentences("gsm8k", an))


def test_report_end_to_end_with_stubbed_runs_writes_every_section(tmp_path, monkeypatch):
    """Training, evaluation and the teacher profile stubbed with synthetic recorded runs: the report
    is written with the headline statement, the tuned ajsd grid, both entropy views, per-bin
    difference tables and one difference plot per task (files that exist)."""
    import json

    rng = np.random.default_rng(1)

    def fake_eval(cfg, task):
        runs = {R.run_name(d, s): _recorded_entry(rng, 12, 0.4 if d == "baseline" else 0.7)
                for d in cfg.divs for s in (cfg.seeds if d != "baseline" else (None,))}
        path = tmp_path / "res" / task / "eval.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"runs": runs, "protocol": {"gamma": 5, "top_p": 0.95}}))
        return path

    monkeypatch.setattr(R, "train_all", lambda *a, **k: None)
    monkeypatch.setattr(R, "tune_ajsd", lambda cfg, task, log: {
        "grid": {(f, c): (0.5 + f / 10, 0.4, 0.7) for f in cfg.ajsd_floors for c in cfg.ajsd_scales},
        "selected": (cfg.ajsd_floors[-1], cfg.ajsd_scales[0]), "n_val": 8})
    monkeypatch.setattr(R, "evaluate_task", fake_eval)
    monkeypatch.setattr(R, "teacher_profile", lambda cfg, task: {
        "processed": np.r_[np.zeros(30), rng.exponential(0.3, 20)], "tempered": rng.exponential(1.0, 50)})
    out = R.main(["--quick", "--tasks", "gsm8k", "--out", str(tmp_path / "REPORT.md")])
    md = out.read_text()
    for text in ("the headline comparison: rkl - jsd", "selected floor 0.75, scale 0.3", "processed view",
                 "tempered view", "minus the baseline", "minus the best fixed divergence", "| 0 |"):
        assert text in md, text
    assert (tmp_path / "figures" / "diff_baseline_gsm8k.png").exists() and "figures/diff_baseline_gsm8k.png" in md


def test_findings_use_the_paired_difference_when_given():
    """Level intervals that overlap can still hide a clear paired difference: with the paired
    best - runner-up excluding 0, the sentence calls the ordering reproduced, and says the
    difference includes 0 when it does."""
    rows = [_row("gsm8k", "rkl", 0.60, 0.58, 0.62), _row("gsm8k", "jsd", 0.59, 0.57, 0.61)]
    sep = " ".join(R.findings(rows, paired={"gsm8k": ("rkl", "jsd", (0.01, 0.004, 0.016))}))
    assert "excludes 0" in sep and "the seed's ordering (rkl best) reproduces" in sep
    tie = " ".join(R.findings(rows, paired={"gsm8k": ("rkl", "jsd", (0.01, -0.004, 0.02))}))
    assert "includes 0" in tie and "holds in the means only" in tie


def test_best_vs_runner_up_is_the_paired_difference_of_the_top_two():
    by_div = R.collect_runs(_evals(seeds=(0,)), seeds=(0,))["gsm8k"]
    by_div["tvd"] = [R.per_prompt_metrics(_entry([0.8] * 4))]
    by_div["fkl"] = [R.per_prompt_metrics(_entry([0.6] * 4))]
    best, runner, d = R.best_vs_runner_up(by_div, n_boot=100)
    assert (best, runner) == ("tvd", "fkl") and d[0] == pytest.approx(0.2)
# ----------------------------------------------------------------------------- the data options

GSM8K_FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures" / "gsm8k"


@pytest.mark.parametrize("argv, match", [
    (["--data-path", str(GSM8K_FIXTURES)], "one task's data: pass --tasks"),
    (["--tasks", "gsm8k", "--data-path", str(GSM8K_FIXTURES / "test.jsonl")], "not a folder"),
    (["--tasks", "gsm8k", "--source", "file"], "--source file needs --data-path"),
    (["--tasks", "gsm8k", "--source", "hub", "--data-path", str(GSM8K_FIXTURES)], "only read with --source file"),
])
def test_data_options_are_checked(argv, match):
    """The report takes distill/evaluate's --source/--data-path; a path holds one task's two splits."""
    with pytest.raises(ValueError, match=match):
        R.parse_args(argv)


def test_data_options_reach_training_and_evaluation(tmp_path, monkeypatch):
    """--source/--data-path are handed to every distill.py and evaluate.py call, so the report never
    trains on one data set and evaluates on another."""
    import distill
    from study import evaluate
    calls = []
    monkeypatch.setattr(distill, "main", lambda argv: calls.append(argv))
    monkeypatch.setattr(evaluate, "main", lambda argv: calls.append(argv))
    cfg = R.parse_args(["--quick", "--tasks", "gsm8k", "--divs", "baseline", "rkl", "--data-path",
                        str(GSM8K_FIXTURES)])
    cfg.runs, cfg.results = str(tmp_path / "runs"), str(tmp_path / "results")
    R.train_all(cfg, "gsm8k", log=lambda msg: None)
    R.evaluate_task(cfg, "gsm8k")
    assert len(calls) == len(cfg.seeds) + 1      # one training run per seed, one evaluation
    for argv in calls:
        assert argv[argv.index("--data-path") + 1] == str(GSM8K_FIXTURES)


def test_bad_rows_stop_the_report_before_training(tmp_path, monkeypatch):
    """A bad eval row must fail before an hour of training, not after it."""
    import distill
    monkeypatch.setattr(distill, "main",
                        lambda argv: pytest.fail("trained before the data was checked"))
    (tmp_path / "train.jsonl").write_text((GSM8K_FIXTURES / "train.jsonl").read_text())
    (tmp_path / "test.jsonl").write_text('{"question": "q?", "answer": "no final line"}\n')
    with pytest.raises(ValueError, match=r"test\.jsonl, line 1: column 'answer' has no final answer"):
        R.main(["--quick", "--tasks", "gsm8k", "--data-path", str(tmp_path), "--out", str(tmp_path / "R.md")])


def test_hub_source_offline_is_one_line_before_training(tmp_path, monkeypatch, capsys):
    """Audit: `report.py --source hub --tasks gsm8k` offline (HF_HUB_OFFLINE=1) ended in a
    traceback: the data check ran outside the script's checks (cli.before_the_work), so its error
    was not taken as the user's. The user reads one line, exit status 2, before anything trains:
    the hub cannot be reached offline, and what to use instead (--source standin, or downloaded
    files with --source file)."""
    from plumbing import cli
    import distill
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(distill, "main",
                        lambda argv: pytest.fail("trained before the data was checked"))
    with pytest.raises(SystemExit) as e:
        cli.script_main(R.main, ["--quick", "--tasks", "gsm8k", "--source", "hub",
                                 "--out", str(tmp_path / "R.md")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --source hub reads openai/gsm8k"), err
    assert all(w in err[0] for w in ("cannot be reached", "HF_HUB_OFFLINE", "--source standin",
                                     "--source file --data-path data/gsm8k")), err


def test_reuse_reads_an_eval_only_when_it_holds_exactly_this_studys_drafts(tmp_path):
    """--reuse may skip decoding only for an eval.json of the same drafts, prompt count and data: an
    evaluation of other seeds or fewer prompts must never stand in for this study's."""
    import json as _json
    cfg = R.ReportConfig(seeds=(0, 1), divs=("baseline", "rkl"), n_prompts=4, reuse=True)
    runs = {n: {"records": {}} for n in ("baseline", "rkl-s0", "rkl-s1")}
    path = tmp_path / "eval.json"
    path.write_text(_json.dumps({"runs": runs, "protocol": {"n_prompts": 4, "data_path": None}}))
    assert R.reusable_eval(cfg, "gsm8k", path)
    path.write_text(_json.dumps({"runs": runs, "protocol": {"n_prompts": 8, "data_path": None}}))
    assert not R.reusable_eval(cfg, "gsm8k", path)
    path.write_text(_json.dumps({"runs": {"baseline": {"records": {}}, "rkl-s0": {"records": {}}},
                                 "protocol": {"n_prompts": 4, "data_path": None}}))
    assert not R.reusable_eval(cfg, "gsm8k", path)
    assert not R.reusable_eval(cfg, "gsm8k", tmp_path / "missing.json")


def test_beating_the_baseline_needs_the_lower_bound_above_the_baselines_upper_bound():
    """'beat the baseline with non-overlapping intervals' is a claim about the intervals: a draft whose
    mean clears the baseline's interval but whose own interval reaches into it (fkl here) has not beaten
    it; only rkl, whose lower bound lies above the baseline's upper bound, counts."""
    rows = [_row("gsm8k", "baseline", 0.40, 0.38, 0.42), _row("gsm8k", "fkl", 0.45, 0.41, 0.49),
            _row("gsm8k", "rkl", 0.60, 0.58, 0.62)]
    text = " ".join(R.findings(rows))
    assert "1 of 2 distilled drafts beat the baseline" in text and "(rkl)." in text


def test_source_commit_names_the_start_and_flags_edits_to_tracked_files(tmp_path, monkeypatch):
    """The report's header names the commit it ran from. source_commit is read before the work, because the
    run rewrites tracked outputs (REPORT.md, figures): read at the end, every clean run said "+ uncommitted
    changes". Here: a clean checkout gives the bare commit, an edited tracked file the flag."""
    import subprocess
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True, text=True)  # noqa: E731
    git("init", "-q")
    (tmp_path / "REPORT.md").write_text("old\n")
    git("add", "REPORT.md")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    head = git("rev-parse", "--short", "HEAD").stdout.strip()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "untracked.txt").write_text("ignored: not tracked\n")
    assert R.source_commit() == head
    (tmp_path / "REPORT.md").write_text("new\n")
    assert R.source_commit() == head + " + uncommitted changes"


@pytest.mark.parametrize("argv, match", [
    (["--preset", "huge"], r"unknown preset 'huge'; valid presets: paper, tiny"),
    (["--n-prompts", "0"], r"--n-prompts 0 is not allowed; --n-prompts must be >= 1"),
    (["--quick", "--steps", "0"], r"--steps 0 is not allowed; --steps must be >= 1"),
    (["--seeds", "-1"], r"--seeds -1 is not allowed; --seeds must be an integer >= 0 and <= 4294967295"),
    (["--seeds", "0", "0"], r"--seeds \[0, 0\]: need distinct integers"),
])
def test_study_options_are_refused_before_any_training(argv, match):
    """Issue 31: --preset huge, --n-prompts 0, --quick --steps 0 and --seeds -1 failed only after training
    had started (minutes of work lost, a traceback); each is the user's to fix and is said at once."""
    with pytest.raises(ValueError, match=match):
        R.parse_args(argv)


def _study_parse(script):
    from study import curve
    return {"report": R.parse_args, "curve": curve.parse_args}[script]


@pytest.mark.parametrize("script", ["report", "curve"])
def test_out_a_folder_is_refused_before_the_study(script, tmp_path):
    """Issue 31: report.py --out <a folder> crashed with IsADirectoryError after the whole study, leaving
    <out>.md.tmp behind; the place of the file is checked with the other options."""
    with pytest.raises(ValueError, match=r"--out .* is a folder; pass the Markdown file to write in it"):
        _study_parse(script)(["--quick", "--out", str(tmp_path)])


@pytest.mark.parametrize("script", ["report", "curve"])
def test_out_a_file_the_script_did_not_write_is_refused_and_kept(script, tmp_path):
    """Issue 31: an existing --out file (someone's notes) was silently replaced, with figures/ written beside
    it. Only a report of the script's own (its title on the first line) may be replaced; anything else is
    refused, naming what is there, and left as it was."""
    notes = tmp_path / "notes.md"
    notes.write_text("my notes\n")
    with pytest.raises(ValueError, match=r"notes\.md exists and is not a file this script wrote .*'my notes'"):
        _study_parse(script)(["--quick", "--out", str(notes)])
    assert notes.read_text() == "my notes\n"


@pytest.mark.parametrize("script", ["report", "curve"])
def test_out_an_earlier_report_of_the_script_is_accepted(script, tmp_path):
    """Rerunning the study updates its own report in place (`make report` rewrites results/REPORT.md): the
    check that refuses foreign files must accept the script's own."""
    from study import curve
    heading = {"report": R.HEADING, "curve": curve.HEADING}[script]
    old = tmp_path / "OLD.md"
    old.write_text(heading + " (tiny preset)\n\nold numbers\n")
    assert str(_study_parse(script)(["--quick", "--out", str(old)]).out) == str(old)


@pytest.mark.parametrize("script", ["report", "curve"])
def test_out_under_a_file_is_refused_before_the_study(script, tmp_path):
    """An --out that cannot be created (a file where its folder should be) is said at once, not after hours."""
    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match=r"cannot be created: .*afile is a file, not a folder"):
        _study_parse(script)(["--quick", "--out", str(tmp_path / "afile" / "REPORT.md")])
