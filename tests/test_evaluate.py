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
             "generated": 6},
            {"drafted": 0, "accepted": 0, "acceptance_rate": 0.0, "alpha": 0.0, "mean_accepted_length": 1.0,
             "generated": 1}]
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
        evaluate.main(["--runs", str(tmp_path / "none")])


@pytest.mark.parametrize("argv, word", [(["--task", "mnist"], "mnist"), (["--preset", "huge"], "huge"),
                                        (["--n-prompts", "0"], "n-prompts")])
def test_bad_input_names_the_value(argv, word):
    with pytest.raises(ValueError, match=word):
        evaluate.main(argv)
