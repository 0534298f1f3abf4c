"""stats.py: the bootstraps over seeds and prompts and the sentence a difference supports, shared by
report.py and curve.py (one implementation, imported by both)."""
import numpy as np
import pytest

from study import curve
from study import report
from study import stats as S


def test_report_and_curve_use_the_one_implementation():
    """A second user imports the bootstrap, never a copy: report.py's and curve.py's names are stats'."""
    for name in ("crossed_bootstrap", "metric_bootstrap", "difference_statement"):
        assert getattr(report, name) is getattr(S, name)
    assert curve.stats is S


# ----------------------------------------------------------------------------- bootstrap

def test_bootstrap_of_constant_data_is_a_point():
    """No variation anywhere -> every resample has the same mean: the interval is the value."""
    assert S.hierarchical_bootstrap([np.full(5, 0.4), np.full(7, 0.4)], n_boot=200) == pytest.approx((0.4, 0.4, 0.4))


def test_bootstrap_point_weighs_seeds_equally():
    """The estimate is the mean over seeds of per-seed prompt means, so a seed evaluated on more
    prompts does not count more: (0.2 + 0.8) / 2 = 0.5, not the pooled 0.65."""
    mean, _, _ = S.hierarchical_bootstrap([np.full(2, 0.2), np.full(6, 0.8)], n_boot=100)
    assert mean == pytest.approx(0.5)


def test_bootstrap_interval_includes_seed_to_seed_variation():
    """Seeds whose students differ (0.3 vs 0.7) with no prompt noise: resampling seeds must widen
    the interval to cover both (a prompts-only bootstrap would give a zero-width interval)."""
    _, lo, hi = S.hierarchical_bootstrap([np.full(50, 0.3), np.full(50, 0.7)], n_boot=2000)
    assert lo <= 0.31 and hi >= 0.69


def test_bootstrap_interval_narrows_with_more_prompts():
    """With one seed it is an ordinary bootstrap over prompts: 16x the prompts -> ~1/4 the width."""
    rng = np.random.default_rng(0)
    widths = []
    for n in (50, 800):
        _, lo, hi = S.hierarchical_bootstrap([rng.random(n)], n_boot=2000)
        widths.append(hi - lo)
    assert 0.15 < widths[1] / widths[0] < 0.4


# ----------------------------------------------------------------------------- crossed bootstrap, differences

def _ones(n, seeds=1):
    return [np.ones(n)] * seeds


def test_crossed_bootstrap_of_constant_data_is_a_point():
    """No variation in prompts or seeds: every replicate gives the value."""
    assert S.crossed_bootstrap(_ones(6, 2), _ones(6, 2)) == pytest.approx((1.0, 1.0, 1.0))


def test_crossed_bootstrap_point_is_the_mean_of_per_seed_ratios():
    """Per seed sum(num) / sum(den) over prompts (e.g. accepted / tested tokens of a bin), then the
    mean over seeds: (1/4 + 3/4) / 2 = 0.5 here, not a mean of per-prompt ratios."""
    mean, _, _ = S.crossed_bootstrap([np.array([1.0, 0.0]), np.array([3.0, 0.0])],
                                     [np.array([2.0, 2.0]), np.array([2.0, 2.0])], n_boot=100)
    assert mean == pytest.approx(0.5)


def test_paired_difference_cancels_the_shared_prompt_difficulty():
    """Both drafts decode the same prompts: B = A + 0.02 on every prompt, A varying widely from
    prompt to prompt. Paired by prompt the interval is (almost) the point 0.02; an unpaired
    comparison would be as wide as the prompt spread."""
    rng = np.random.default_rng(0)
    a = rng.random(64)
    m, lo, hi = S.crossed_bootstrap([a + 0.02], _ones(64), [a], _ones(64), n_boot=500)
    assert m == pytest.approx(0.02) and hi - lo < 1e-9


def test_crossed_bootstrap_difference_includes_seed_to_seed_variation():
    """Seeds of A at 0.3 and 0.7 (no prompt noise), B flat at 0.5: resampling A's seeds must make
    the interval of A - B reach both -0.2 and +0.2."""
    m, lo, hi = S.crossed_bootstrap([np.full(20, 0.3), np.full(20, 0.7)], _ones(20, 2),
                                    [np.full(20, 0.5)], _ones(20), n_boot=2000)
    assert m == pytest.approx(0.0, abs=1e-12) and lo <= -0.19 and hi >= 0.19


def test_crossed_bootstrap_rejects_runs_on_different_prompts():
    """A paired comparison needs the same prompts on both sides."""
    with pytest.raises(ValueError, match="same prompts"):
        S.crossed_bootstrap(_ones(5), _ones(5), _ones(6), _ones(6))


def test_per_prompt_ratio_leaves_out_prompts_with_nothing_drafted():
    """A NaN prompt (nothing drafted) counts neither as 0 nor at all: the ratio is the mean of the rest."""
    num, den = S.per_prompt_ratio([0.5, np.nan, 1.0])
    assert S.crossed_bootstrap([num], [den], n_boot=50)[0] == pytest.approx(0.75)


@pytest.mark.parametrize("diff, words", [((0.03, 0.01, 0.05), "separated, rkl is better than jsd"),
                                         ((-0.03, -0.05, -0.01), "separated, jsd is better than rkl"),
                                         ((0.002, -0.01, 0.012), "equivalent within +/- 1.5 points"),
                                         ((0.002, -0.03, 0.02), "bound the difference to +/- 3.00 points")])
def test_difference_statement_says_what_the_interval_supports(diff, words):
    """Separated only when the interval excludes 0; equivalent only when it lies within the margin;
    otherwise the bound the data do give."""
    text = S.difference_statement("rkl", "jsd", diff)
    assert words in text
    assert ("equivalent" in text) == (words.startswith("equivalent"))
