"""evaluate.py: bootstrap intervals, per-prompt metrics, and the eval files report.py reads."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

import evaluate
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
    rows = [{"drafted": 4, "accepted": 2, "acceptance_rate": 0.5, "alpha": 0.6, "mean_accepted_length": 2.0,
             "generated": 6, "wall_time_s": 0.1},
            {"drafted": 0, "accepted": 0, "acceptance_rate": 0.0, "alpha": 0.0, "mean_accepted_length": 1.0,
             "generated": 1, "wall_time_s": 0.1}]
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
                          "--n-boot", "200", "--batch-size", "4"])
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
    rows = [{"drafted": 4, "accepted": 1, "generated": 3, "alpha": 0.5},
            {"drafted": 6, "accepted": 6, "generated": 9, "alpha": 1.0}]
    assert evaluate.pooled_acceptance(rows) == pytest.approx(0.7)
    assert evaluate.pooled_alpha(rows) == pytest.approx((0.5 * 4 + 1.0 * 6) / 10)
    assert math.isnan(evaluate.pooled_acceptance([{"drafted": 0, "accepted": 0}]))


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
    results = tmp_path / "results" / "tiny" / "gsm8k-file-test"     # off the preset's data: its own folder
    doc = json.loads((results / "eval.json").read_text())
    assert doc["protocol"]["source"] == "file" and doc["protocol"]["n_prompts"] == 3
    base = doc["runs"]["baseline"]
    pp, alone = base["per_prompt"], base["target_alone"]
    assert base["pooled_acceptance"] == pytest.approx(sum(pp["accepted"]) / sum(pp["drafted"]))
    assert (alone["batches"], alone["prompts"]) == (1, 2) and alone["generated_tokens"] > 0
    assert base["speedup_measured"] == pytest.approx(alone["draft_tokens_per_s"] / alone["tokens_per_s"])
    assert base["speedup_theoretical"] == pytest.approx(evaluate.theoretical_speedup(
        base["pooled_alpha"], doc["protocol"]["gamma"], base["cost_ratio"]))
    assert base["cost_ratio"] == pytest.approx(base["draft_step_s"] / base["target_step_s"])
    md = (results / "eval.md").read_text()
    assert "speedup measured" in md and "target alone tokens/s" in md
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
