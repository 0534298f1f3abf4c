"""report.py: the bootstrap, the table built from eval JSON, the generated sentences, and the refusal
to write a partial report. No training here: the table-building is pure over loaded eval JSON."""
import numpy as np
import pytest

import report as R


def _entry(acc, alpha=None, length=None):
    acc = list(acc)
    return {"per_prompt": {"token_acceptance": acc, "alpha": alpha or acc,
                           "mean_accepted_length": length or [1 + 5 * a for a in acc]}}


def _evals(tasks=("gsm8k",), divs=R.DIVS, seeds=(0, 1), value=0.5):
    return {t: {R.run_name(d, s): _entry([value] * 4) for d in divs for s in (seeds if d != "baseline" else (None,))}
            for t in tasks}


def _row(task, div, mean, lo, hi):
    return R.Row(task, div, 3, 10, {m: (mean, lo, hi) for m in R.METRICS})


# ----------------------------------------------------------------------------- bootstrap

def test_bootstrap_of_constant_data_is_a_point():
    """No variation anywhere -> every resample has the same mean: the interval is the value."""
    assert R.hierarchical_bootstrap([np.full(5, 0.4), np.full(7, 0.4)], n_boot=200) == pytest.approx((0.4, 0.4, 0.4))


def test_bootstrap_point_weighs_seeds_equally():
    """The estimate is the mean over seeds of per-seed prompt means, so a seed evaluated on more
    prompts does not count more: (0.2 + 0.8) / 2 = 0.5, not the pooled 0.65."""
    mean, _, _ = R.hierarchical_bootstrap([np.full(2, 0.2), np.full(6, 0.8)], n_boot=100)
    assert mean == pytest.approx(0.5)


def test_bootstrap_interval_includes_seed_to_seed_variation():
    """Seeds whose students differ (0.3 vs 0.7) with no prompt noise: resampling seeds must widen
    the interval to cover both (a prompts-only bootstrap would give a zero-width interval)."""
    _, lo, hi = R.hierarchical_bootstrap([np.full(50, 0.3), np.full(50, 0.7)], n_boot=2000)
    assert lo <= 0.31 and hi >= 0.69


def test_bootstrap_interval_narrows_with_more_prompts():
    """With one seed it is an ordinary bootstrap over prompts: 16x the prompts -> ~1/4 the width."""
    rng = np.random.default_rng(0)
    widths = []
    for n in (50, 800):
        _, lo, hi = R.hierarchical_bootstrap([rng.random(n)], n_boot=2000)
        widths.append(hi - lo)
    assert 0.15 < widths[1] / widths[0] < 0.4


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

    monkeypatch.setattr(R, "train_all", lambda cfg, task, log: None)
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
    import evaluate

    def stats(drafted, accepted):
        return {"drafted": drafted, "accepted": accepted, "acceptance_rate": accepted / drafted if drafted else float("nan"),
                "alpha": 0.5, "mean_accepted_length": 2.0, "generated": 4, "wall_time_s": 0.1}

    pp = evaluate.per_prompt([stats(10, 4), stats(0, 0), stats(10, 8)])
    speed = {"cost_ratio": 0.1, "speedup_measured": 1.5, "speedup_theoretical": 1.7, "target_alone": {"tokens_per_s": 2.0}}
    runs = {R.run_name(d, 0): {"name": R.run_name(d, 0), "divergence": d, "per_prompt": pp, "tokens_per_s": 1.0,
                               "summary": evaluate.summarize(pp, 10, 0), **speed} for d in R.DIVS}
    evaluate.write_results({"preset": "tiny", "task": "gsm8k", "teacher": "t", "runs": runs,
                            "protocol": {"gamma": 5, "top_p": 0.95, "temperature": 0.6, "max_new_tokens": 8,
                                         "n_prompts": 3, "seed": 0, "n_boot": 10, "source": "standin",
                                         "data_path": None, "batch_size": 16}}, tmp_path)
    evals = {"gsm8k": R.load_eval(tmp_path / "tiny" / "gsm8k" / "eval.json")}
    rows = R.build_table(R.collect_runs(evals, seeds=(0,)), n_boot=100)
    assert rows[0].stats["token_acceptance"][0] == pytest.approx(0.6)


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
    import evaluate
    calls = []
    monkeypatch.setattr(distill, "main", lambda argv: calls.append(argv))
    monkeypatch.setattr(evaluate, "main", lambda argv: calls.append(argv))
    cfg = R.parse_args(["--quick", "--tasks", "gsm8k", "--divs", "baseline", "rkl", "--data-path",
                        str(GSM8K_FIXTURES)])
    cfg.runs, cfg.results = str(tmp_path / "runs"), str(tmp_path / "results")
    R.train_all(cfg, "gsm8k", log=lambda msg: None)
    R.evaluate_task(cfg, "gsm8k")
    assert len(calls) == 2
    for argv in calls:
        assert argv[argv.index("--data-path") + 1] == str(GSM8K_FIXTURES)


def test_bad_rows_stop_the_report_before_training(tmp_path, monkeypatch):
    """A bad eval row must fail before an hour of training, not after it."""
    import distill
    monkeypatch.setattr(distill, "main", lambda argv: pytest.fail("trained before the data was checked"))
    (tmp_path / "train.jsonl").write_text((GSM8K_FIXTURES / "train.jsonl").read_text())
    (tmp_path / "test.jsonl").write_text('{"question": "q?", "answer": "no final line"}\n')
    with pytest.raises(ValueError, match=r"test\.jsonl, line 1: column 'answer' has no final answer"):
        R.main(["--quick", "--tasks", "gsm8k", "--data-path", str(tmp_path), "--out", str(tmp_path / "R.md")])
