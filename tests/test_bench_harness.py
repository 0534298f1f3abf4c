"""bench/harness.py, the pieces bench_train.py, bench_paper.py and bench_real.py share: the process harness
(each side's RESULT line; an optional side that fails is reported, a required one stops the run) and the phase
profiler of one distill.py step (every phase timed, the tokens of the step counted)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import harness  # noqa: E402
import models  # noqa: E402


def side_command(side):
    if side == "broken":
        return [sys.executable, "-c", "import sys; print('loading'); sys.exit('no such trainer')"]
    return [sys.executable, "-c", f"import json; print('noise'); print('RESULT ' + json.dumps({{'side': '{side}'}}))"]


def test_run_sides_collects_results_and_reports_an_optional_failure():
    results = harness.run_sides(side_command, ("ours", "trl", "broken"), optional=("broken",))
    assert results["ours"] == {"side": "ours"} and results["trl"] == {"side": "trl"}
    assert results["broken"] == {"error": "no such trainer"}


def test_run_sides_stops_at_a_required_failure():
    with pytest.raises(SystemExit):
        harness.run_sides(side_command, ("ours", "broken"))


def test_step_phases_times_every_phase_of_a_step(tmp_path):
    root = models.ensure_tiny_pair("gsm8k", root=tmp_path, scale="test")
    teacher, student, tok = models.load_pair(root / "teacher", root / "student", device="cpu")
    prompts = [[5, 6, 7], [8, 9]]
    mean, tokens = harness.step_phases(teacher, student, prompts, new_tokens=4, repeats=1, vocab_size=len(tok),
                                       pad_id=tok.pad_token_id)
    assert list(mean) == ["sampling", "teacher forward", "student forward", "loss + logged teacher entropy",
                          "backward", "optimizer"]
    assert all(seconds > 0 for seconds in mean.values())
    assert tokens == 2 * 4                      # no stop id: every row samples exactly new_tokens
    table = harness.phase_table(mean, tokens)
    assert table.count("\n") == len(mean) + 2 and "completion tokens/s" in table
