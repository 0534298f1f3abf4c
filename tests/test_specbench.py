"""specbench.py: Spec-Bench's answer-file format, its speed arithmetic, exactness, question checks, conversations.

p = target, q = draft. Most tests share one end-to-end run on the tiny test pair (seconds): three short questions
(one two-turn MT-bench question), vanilla, HF assisted generation, our decoder with the baseline draft and with a
fake distilled run whose draft is the target itself (found under <runs>/tiny/gsm8k/self-s0/final).
"""
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import data
import models
import specbench

QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a short poem about numbers.",
                                                         "Now rewrite it so that every line starts with A."]},
    {"question_id": 1001, "category": "translation", "turns": ["Translate to English: Guten Morgen."]},
    {"question_id": 2001, "category": "math_reasoning", "turns": ["Tom has 3 apples and buys 4 more. How many?"]},
]
ANSWER_FIELDS = {"question_id", "category", "answer_id", "model_id", "choices", "tstamp"}
CHOICE_FIELDS = {"index", "turns", "decoding_steps", "new_tokens", "wall_time", "accept_lengths"}


def write_questions(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = models.ensure_tiny_pair("gsm8k", root=tmp_path_factory.mktemp("ckpt"), scale="test")
    return str(Path(root) / "teacher"), str(Path(root) / "student")


@pytest.fixture(scope="module")
def bench(pair, tmp_path_factory):
    """One greedy run of main() -> (doc, results folder)."""
    tmp = tmp_path_factory.mktemp("specbench")
    run = tmp / "runs" / "tiny" / "gsm8k" / "self-s0"
    shutil.copytree(pair[0], run / "final")                  # a "distilled" draft that is the target itself
    (run / "config.json").write_text(json.dumps({"div": "rkl"}))
    questions = write_questions(tmp / "question.jsonl", QUESTIONS)
    doc = specbench.main(["--preset", "tiny", "--teacher", pair[0], "--student", pair[1], "--runs", str(tmp / "runs"),
                          "--results", str(tmp / "results"), "--questions", str(questions), "--max-new-tokens", "8",
                          "--repeats", "2", "--batch-size", "2", "--n-boot", "100"])
    return doc, tmp / "results"


def answer_files(results: Path) -> dict:
    """{(run, model_id): records} of every answer file."""
    return {(f.parent.name, f.stem): specbench.read_answers(f)
            for f in sorted((results / "tiny" / "specbench").glob("run_*/*.jsonl"))}


def test_answer_files_have_spec_bench_fields_and_meanings(bench):
    """Spec-Bench's speed.py and equal.py read these exact fields: one line per question sorted by question_id, one
    choice with one entry per turn in turns / decoding_steps / new_tokens / wall_time, accept_lengths holding one
    entry per target forward (so its length is the sum of decoding_steps), all 1 for vanilla; one file per method
    and run, named by its model_id, in run_<r>/ folders as Spec-Bench's mean-of-runs report expects."""
    files = answer_files(bench[1])
    methods = ("vanilla", "sps", "specdec-baseline", "specdec-self-s0")
    assert set(files) == {(f"run_{r}", f"tiny-{m}-float32-temp-0.0") for r in (1, 2) for m in methods}
    for (run, mid), records in files.items():
        assert [r["question_id"] for r in records] == [81, 1001, 2001]
        for rec, q in zip(records, QUESTIONS):
            assert set(rec) == ANSWER_FIELDS and rec["model_id"] == mid and rec["category"] == q["category"]
            (choice,) = rec["choices"]
            assert set(choice) == CHOICE_FIELDS and choice["index"] == 0
            n = len(q["turns"])
            assert all(len(choice[k]) == n for k in ("turns", "decoding_steps", "new_tokens", "wall_time"))
            assert all(isinstance(t, str) for t in choice["turns"]) and all(s > 0 for s in choice["wall_time"])
            assert len(choice["accept_lengths"]) == sum(choice["decoding_steps"])
            if "vanilla" in mid:
                assert set(choice["accept_lengths"]) == {1}


def test_accept_lengths_sum_to_new_tokens_per_turn(bench):
    """Every target forward's accept length counts the tokens it produced, so a turn's accept lengths (the next
    decoding_steps entries) must add up to exactly its new_tokens, for every method, our decoder and HF's alike."""
    for records in answer_files(bench[1]).values():
        for rec in records:
            choice, start = rec["choices"][0], 0
            for steps, new in zip(choice["decoding_steps"], choice["new_tokens"]):
                assert sum(choice["accept_lengths"][start:start + steps]) == new
                start += steps


def test_spec_bench_speed_averages_per_question_tokens_per_second():
    """speed.py's speed is the MEAN over questions of (sum new_tokens / sum wall_time), not pooled tokens over pooled
    seconds, and its #Mean accepted tokens is the mean of every accept_lengths entry of every question."""
    def rec(cat, new, wall, lengths):
        return {"category": cat, "choices": [{"new_tokens": new, "wall_time": wall, "accept_lengths": lengths}]}
    method = [rec("qa", [10], [1.0], [4, 4, 2]), rec("qa", [30, 10], [1.0, 1.0], [2] * 20)]
    base = [rec("qa", [10], [2.0], [1] * 10), rec("qa", [40], [4.0], [1] * 40)]
    s = specbench.spec_bench_speed(method, base, ("qa",))
    assert s["tokens_per_s"] == pytest.approx((10 / 1 + 40 / 2) / 2)          # 15, where pooled would give 50/3
    assert s["baseline_tokens_per_s"] == pytest.approx((10 / 2 + 40 / 4) / 2)
    assert s["speedup"] == pytest.approx(2.0)
    assert s["mean_accepted_tokens"] == pytest.approx((4 + 4 + 2 + 2 * 20) / 23)


def test_greedy_methods_reproduce_vanillas_answers(bench):
    """Greedy speculative decoding is exact: our decoder (with either draft) and HF assisted generation must give
    vanilla's answers turn for turn (the equality counts say so, with no mismatch to explain), at batch 1 and in
    the batched table."""
    doc = bench[0]
    for method, eq in doc["equality"].items():
        assert eq["mismatches"] == [], method
        assert eq["equal"]["Overall"] == [3, 3], method
    for row in doc["batched"]["rows"]:
        if row["method"] != "vanilla":
            assert row["equal_to_vanilla"] == row["n"] == 4


def test_our_greedy_turn_equals_the_autoregressive_turn(pair):
    """The unit under the equality counts: one turn of specdec_turn and of vanilla_turn give the same ids, with a
    draft that is rejected often (the untrained baseline) and one accepted always (the target itself)."""
    target, draft, tok = models.load_pair(*pair, device="cpu")
    protocol = models.decoding_protocol("tiny", tok, target, task="gsm8k", temperature=0, max_new_tokens=12)
    for q in QUESTIONS:
        prompt = specbench.prompt_ids(tok, q["turns"], [])
        ar = specbench.vanilla_turn(target, None, prompt, protocol, 0)
        for d in (draft, target):
            assert specbench.specdec_turn(target, d, prompt, protocol, 0).tokens == ar.tokens


def test_distilled_runs_are_found_and_a_perfect_draft_accepts_everything(bench):
    """A draft under <runs>/<preset>/<task>/<run>/final becomes a method of its own; the target drafting for itself
    must have every draft accepted (token acceptance 100%, more than one token per target forward) and is
    compared with the baseline draft and with sps by paired intervals."""
    doc = bench[0]
    assert [name for name, _, _ in doc["drafts"]] == ["baseline", "self-s0"]
    assert doc["acceptance"]["specdec-self-s0"]["Overall"][0] == pytest.approx(1.0)
    row = next(r for r in doc["leaderboard"] if r["method"] == "specdec-self-s0")
    assert row["mean_accepted_tokens"] > 1
    assert set(doc["gains"]["specdec-self-s0"]) == {"specdec-baseline", "sps"}


def test_hf_assisted_accept_lengths_are_counted_per_target_forward(pair):
    """HF assisted generation's accept lengths come from a hook on the target, not from a formula: with the target
    as its own assistant and a constant gamma, every forward but the last produces gamma + 1 tokens, and there are
    exactly as many entries as target forwards."""
    target, _, tok = models.load_pair(*pair, device="cpu")
    protocol = models.decoding_protocol("tiny", tok, target, task="gsm8k", temperature=0, max_new_tokens=11, gamma=3)
    assistant = models.load_model(pair[0], device="cpu")
    specbench.configure_assistant(assistant, protocol.gamma)
    calls = []
    hook = target.register_forward_pre_hook(lambda *a: calls.append(1))
    prompt = specbench.prompt_ids(tok, ["Tom has 3 apples."], [])
    try:
        turn = specbench.sps_turn(target, assistant, prompt, dataclasses.replace(protocol, stop_ids=()), 0)
    finally:
        hook.remove()
    assert turn.accept_lengths == [4, 4, 3] and len(calls) == 3
    assert turn.accepted == 3 + 3 + 2 and sum(turn.accept_lengths) == len(turn.tokens) == 11


@pytest.mark.parametrize("row, words", [
    ({"category": "qa", "turns": ["x"]}, "missing field 'question_id'"),
    ({"question_id": 1, "turns": ["x"]}, "missing field 'category'"),
    ({"question_id": 1, "category": "poetry", "turns": ["x"]}, "unknown category 'poetry'"),
    ({"question_id": 1, "category": "qa", "turns": []}, "turns must be a non-empty list"),
    ({"question_id": 1, "category": "qa", "turns": ["  "]}, "turn 1 must be a non-empty string"),
    ({"question_id": 81, "category": "qa", "turns": ["x"]}, "question_id 81 repeats"),
    ('{"question_id": 1, "category": "qa"', "invalid JSON"),
])
def test_bad_question_files_are_refused_before_any_model_loads(row, words, tmp_path, monkeypatch):
    """A broken question file must be one error naming the file and the line (here line 2), raised before any model
    loads: --teacher points nowhere and loading a model fails the test, so only the question check can speak."""
    path = write_questions(tmp_path / "question.jsonl", [QUESTIONS[0], row])
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    with pytest.raises(data.DataError) as e:
        specbench.main(["--questions", str(path), "--teacher", str(tmp_path / "none"), "--student", str(tmp_path)])
    assert f"{path}, line 2" in str(e.value) and words in str(e.value)


def test_bad_question_file_is_one_line_and_exit_status_2(tmp_path):
    """From the command line the same refusal is the project's one `error:` line with exit status 2 (cli.py)."""
    path = write_questions(tmp_path / "question.jsonl", [{"question_id": 1, "category": "qa", "turns": []}])
    proc = subprocess.run([sys.executable, "specbench.py", "--questions", str(path)], cwd=specbench.REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {path}, line 1: turns must be a non-empty list of user "
                                                f"turns, got []"]


def test_second_turn_is_conditioned_on_the_methods_own_first_answer(monkeypatch):
    """MT-bench's second turn must see the method's OWN first answer (as Spec-Bench's conversation loop): the prompt
    of turn 2 is the real target's chat template over user turn 1, that answer as the assistant's turn, user turn 2."""
    target_dir, _ = models.resolve_pair("gsm8k", "smollm2")
    tok = models.load_tokenizer(target_dir)
    first = tok("The answer is seven.", add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    prompts = []

    def fake_turn(target, draft, prompt, protocol, seed):
        prompts.append(prompt)
        return specbench.Turn(first if len(prompts) == 1 else [5], [1], 0.1)

    monkeypatch.setitem(specbench.TURN, "fake", fake_turn)
    protocol = type("P", (), {"stop_ids": (0, 2)})()
    turns = specbench.answer_question(specbench.Method("fake", "fake"), None, tok, QUESTIONS[0], protocol, 0)
    assert len(turns) == 2
    text = tok.decode(prompts[1])
    assert text.endswith("<|im_start|>user\nWrite a short poem about numbers.<|im_end|>\n<|im_start|>assistant\n"
                         "The answer is seven.<|im_end|>\n<|im_start|>user\nNow rewrite it so that every line starts "
                         "with A.<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(prompts[0]).endswith("<|im_start|>user\nWrite a short poem about numbers.<|im_end|>\n"
                                           "<|im_start|>assistant\n")


def test_methods_take_turns_going_first():
    """Timings alternate: over as many questions as methods, each method runs first exactly once, so load from
    other jobs does not always fall on the same method."""
    methods = ["vanilla", "sps", "specdec-baseline"]
    firsts = [specbench.rotated(methods, i)[0] for i in range(3)]
    assert sorted(firsts) == sorted(methods)
    assert all(sorted(specbench.rotated(methods, i)) == sorted(methods) for i in range(5))


def test_shipped_questions_are_spec_benchs_480():
    """The vendored question file is Spec-Bench's: 480 valid questions, 13 categories, 80 two-turn MT-bench ones."""
    qs = specbench.read_questions(specbench.QUESTIONS)
    assert len(qs) == 480 and {q["category"] for q in qs} == set(specbench.CATEGORIES)
    assert sum(len(q["turns"]) == 2 for q in qs) == 80
    assert len(specbench.select_questions(qs, 2)) == 26

