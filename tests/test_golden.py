"""Golden test: for fixed seeds on saved pairs, the two central functions and the training loop produce
exactly what they produced when tests/fixtures/golden/expected.json was recorded (tests/golden.py --write).

Why it must hold: refactors of specdec.speculative_generate and distill.main (issue 15) are meant to be pure.
Any changed token, count, record or loss means the refactor changed the algorithm, not just its shape."""
import json

import pytest

import golden

EXPECTED = json.loads((golden.GOLDEN / "expected.json").read_text())


@pytest.fixture(scope="module")
def computed():
    return golden.compute()


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_outputs_equal_the_recorded_ones(case, computed):
    """Same tokens, stats, records and losses as recorded, case by case."""
    differences = golden.diff(EXPECTED[case], computed[case], case)
    assert not differences, "\n".join(differences[:20])
