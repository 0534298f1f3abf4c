"""estimates.py: the training-time acceptance estimates of a run vs the alpha make eval measures, from the
runs' metrics.jsonl and eval.json entries (no training here)."""
import json
import math

import pytest

from study import estimates as E


def write_run(tmp_path, name, train_alphas, val_alphas):
    """A run directory with a metrics.jsonl: one row per step, val_alpha on some of them (None = no val)."""
    run = tmp_path / name
    (run / "final").mkdir(parents=True)
    with open(run / "metrics.jsonl", "w") as f:
        for step, (a, v) in enumerate(zip(train_alphas, val_alphas), 1):
            f.write(json.dumps({"step": step, "train_alpha": a, **({} if v is None else {"val_alpha": v})}) + "\n")
    return run


def test_run_estimates_take_the_last_tenth_of_steps_and_the_last_validation(tmp_path):
    """train_alpha of a run = the mean over its last 10% of steps (the student near its end; the first
    steps are a different student), val_alpha = the LAST validation row (the final student's)."""
    alphas = [0.1] * 18 + [0.7, 0.9]
    vals = [None] * 9 + [0.3] + [None] * 9 + [0.6]
    got = E.run_estimates(write_run(tmp_path, "rkl-s0", alphas, vals))
    assert got["train_alpha"] == pytest.approx(0.8) and got["val_alpha"] == 0.6


def test_a_run_without_validation_has_no_val_alpha(tmp_path):
    got = E.run_estimates(write_run(tmp_path, "fkl-s0", [0.5, 0.5], [None, None]))
    assert got["train_alpha"] == 0.5 and math.isnan(got["val_alpha"])


def test_collect_uses_the_pooled_eval_alpha_and_skips_the_baseline(tmp_path):
    """The eval side is evaluate.py's pooled alpha (mean over every tested position, like val_alpha), not
    the macro-mean over prompts of the summary; the untrained baseline has no run and is left out."""
    run = write_run(tmp_path, "nla-s0", [0.5] * 10, [None] * 9 + [0.55])
    entries = {"baseline": {"path": str(tmp_path / "none" / "final"), "pooled_alpha": 0.3},
               "nla-s0": {"path": str(run / "final"), "pooled_alpha": 0.52,
                          "summary": {"alpha": {"mean": 0.49}}}}
    assert E.collect_estimates(entries) == [{"name": "nla-s0", "eval_alpha": 0.52, "train_alpha": 0.5,
                                             "val_alpha": 0.55}]


def test_compare_gives_bias_absolute_difference_and_correlation():
    """bias = mean(estimate - eval), mae = mean |estimate - eval|, r = Pearson across runs (NaN below 3 runs)."""
    pts = [{"eval_alpha": e, "train_alpha": e + 0.1, "val_alpha": v} for e, v in ((0.5, 0.45), (0.6, 0.65), (0.7, 0.7))]
    s = E.compare(pts)
    assert s["train_alpha"]["bias"] == pytest.approx(0.1) and s["train_alpha"]["mae"] == pytest.approx(0.1)
    assert s["train_alpha"]["r"] == pytest.approx(1.0)
    assert s["val_alpha"]["bias"] == pytest.approx(0.0) and s["val_alpha"]["mae"] == pytest.approx(1 / 30)
    assert math.isnan(E.compare(pts[:2])["val_alpha"]["r"])
    text = E.estimate_sentences("gsm8k", s)[0]
    assert "val_alpha" in text and "3.3 points" in text and "+10.0" in text


def test_plot_and_markdown_are_written(tmp_path):
    pts = {"gsm8k": [{"name": "a", "eval_alpha": 0.5, "train_alpha": 0.6, "val_alpha": 0.52},
                     {"name": "b", "eval_alpha": 0.6, "train_alpha": 0.7, "val_alpha": math.nan}]}
    path = E.plot_estimates(pts, tmp_path / "fig" / "estimates.png")
    assert path.exists() and path.stat().st_size > 1000
    md = "\n".join(E.estimates_markdown({"gsm8k": E.compare(pts["gsm8k"])}, "fig/estimates.png"))
    assert "| gsm8k | train_alpha | 2 | +10.0 | 10.0 |" in md and "| gsm8k | val_alpha | 1 |" in md
