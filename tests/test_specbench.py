"""specbench.py: Spec-Bench's answer-file format, its speed arithmetic, exactness, question checks, conversations.

p = target, q = draft. Most tests share one end-to-end run on the tiny test pair (seconds): three short questions
(one two-turn MT-bench question), vanilla, HF assisted generation, our decoder with the baseline draft and with a
fake distilled run whose draft is the target itself (found under <runs>/tiny/gsm8k/self-s0/final).
"""
import dataclasses
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from plumbing import cli
import data
import models
from study import specbench
import specdec

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
    write_questions(tmp / "question.jsonl", QUESTIONS)
    doc = specbench.main(bench_argv(pair, tmp, tmp / "results"))
    return doc, tmp / "results"


def bench_argv(pair, tmp: Path, results: Path) -> list[str]:
    """The bench fixture's command line (questions and runs under tmp), its answers under `results`."""
    return ["--preset", "tiny", "--teacher", pair[0], "--student", pair[1], "--runs", str(tmp / "runs"),
            "--results", str(results), "--questions", str(tmp / "question.jsonl"), "--max-new-tokens", "8",
            "--repeats", "2", "--batch-size", "2", "--n-boot", "100"]


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
    proc = subprocess.run([sys.executable, "-m", "study.specbench", "--questions", str(path)], cwd=specbench.REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {path}, line 1: turns must be a non-empty list of user "
                                                f"turns, got []"]


def no_model(monkeypatch, what: str):
    """Loading a model fails the test: the check of `what` should have come first."""
    monkeypatch.setattr(models, "load_model",
                        lambda *a, **k: pytest.fail(f"a model loaded before {what} was checked"))


def test_a_seed_beyond_64_bits_is_refused_in_one_line(pair, tmp_path, monkeypatch, capsys):
    """Audit: `specbench.py --seed 1180591620717411303424` (2^70) reached torch's generator after
    the models had loaded: 'Overflow when unpacking long long', a traceback. The seed takes the
    shared check (cli.check_seed: 0..2^32 - 1, so that seed + question_id fits torch's 64 bits
    too), as distill.py's and evaluate.py's do: one line, exit status 2, before any model loads."""
    write_questions(tmp_path / "question.jsonl", QUESTIONS[1:2])
    (tmp_path / "runs").mkdir()
    no_model(monkeypatch, "--seed")
    with pytest.raises(SystemExit) as e:
        cli.script_main(specbench.main, bench_argv(pair, tmp_path, tmp_path / "results")
                        + ["--seed", str(2**70)])
    assert e.value.code == 2
    assert capsys.readouterr().err == (f"error: --seed {2**70} is not allowed; --seed must be an "
                                       f"integer >= 0 and <= {cli.MAX_SEED} (2^32 - 1)\n")


@pytest.mark.parametrize("kind, match", [
    ("a folder", r"--report \S+ is a folder; pass the Markdown file to write in it"),
    ("under a file", r"--report \S+notes\.md/SPECBENCH\.md cannot be created: \S+notes\.md is a "
                     r"file"),
    ("another file", r"--report \S+notes\.md exists and is not a file this script wrote"),
])
def test_a_report_path_that_cannot_take_the_report_is_refused_before_any_model(
        pair, tmp_path, monkeypatch, kind, match):
    """Audit: --report was first used once the whole run had decoded: a folder (IsADirectoryError)
    and a path under a file (mkdir's error) ended in a traceback after hours of work, and a file of
    another kind (the user's notes) was silently replaced. It is checked before the work, as
    report.py checks its --out (cli.check_markdown_out), and the file is left as it was."""
    notes = tmp_path / "notes.md"
    notes.write_text("my notes\n")
    report = {"a folder": tmp_path, "under a file": notes / "SPECBENCH.md",
              "another file": notes}[kind]
    write_questions(tmp_path / "question.jsonl", QUESTIONS[1:2])
    (tmp_path / "runs").mkdir()
    no_model(monkeypatch, "--report")
    with pytest.raises(cli.BadInput, match=match):
        specbench.main(bench_argv(pair, tmp_path, tmp_path / "results") + ["--report", str(report)])
    assert notes.read_text() == "my notes\n" and not (tmp_path / "results").exists()


def test_questions_longer_than_the_models_context_are_refused_before_any_model(pair, tmp_path,
                                                                               monkeypatch):
    """Audit: `specbench.py --preset tiny --quick` ended in specdec's traceback ('prompt 0 has 2186
    tokens ... exceeds the model's context of 1024 positions') once the models had loaded: the tiny
    pair's context holds none of Spec-Bench's summarization and RAG questions. Every question (its
    prompt, plus --max-new-tokens for each turn) is checked against the models' context before any
    model loads, in one line saying how many do not fit and naming one."""
    long = {"question_id": 2002, "category": "summarization",
            "turns": ["Summarize: " + "the cat sat on the mat. " * 400]}
    write_questions(tmp_path / "question.jsonl", [QUESTIONS[1], long])
    (tmp_path / "runs").mkdir()
    no_model(monkeypatch, "the questions' lengths")
    with pytest.raises(data.DataError, match=r"1 of the 2 questions do not fit the models' context "
                                             r"of 1024 positions .*question 2002 \(summarization, "
                                             r"1 turn"):
        specbench.main(bench_argv(pair, tmp_path, tmp_path / "results"))
    assert not (tmp_path / "results" / "tiny" / "specbench" / "journal.jsonl").exists()


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



# ----------------------------------------------------------------------------- the journal: a run over sessions

N_ANSWERS = 3 * 4 * 2       # the bench run's answers: questions x methods x repeats
N_BATCHED = 2 * 2 * 3       # its batched table's runs: repeats x chunks (4 turns / batch 2) x methods


def same_answers(results: Path) -> dict:
    """Every answer file's records less what two runs of the same answers never share (wall_time, answer_id,
    tstamp): question ids, categories, model ids, turns text, new_tokens, decoding_steps, accept_lengths."""
    return {key: [(r["question_id"], r["category"], r["model_id"],
                   {k: v for k, v in r["choices"][0].items() if k != "wall_time"}) for r in records]
            for key, records in answer_files(results).items()}


def token_numbers(doc: dict) -> str:
    """What the report computes from tokens alone (no timing), as JSON text (NaN == NaN there)."""
    batched = [{k: row.get(k) for k in ("method", "equal_to_vanilla", "n", "mean_accepted_tokens", "token_acceptance")}
               for row in doc["batched"]["rows"]]
    return json.dumps([doc["acceptance"], doc["entropy"], doc["equality"], doc["gains"], batched], sort_keys=True)


def counted(monkeypatch, module, name, stop_after=None, exc=KeyboardInterrupt, only=lambda *a, **k: True):
    """Wrap module.name: count its calls (those `only` selects); with stop_after, the next such call raises exc."""
    real, calls = getattr(module, name), []

    def wrapper(*args, **kwargs):
        if only(*args, **kwargs):
            if stop_after is not None and len(calls) == stop_after:
                raise exc()
            calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def journal_rows(results: Path) -> list[dict]:
    return [json.loads(line) for line in (results / "tiny" / "specbench" / specbench.JOURNAL).read_text().splitlines()]


def interrupted_run(pair, bench, results: Path, answers: int) -> list[str]:
    """The bench run into `results`, stopped (Ctrl-C) after `answers` answers -> its command line."""
    argv = bench_argv(pair, bench[1].parent, results)
    with pytest.MonkeyPatch.context() as m:
        counted(m, specbench, "answer_question", stop_after=answers)
        with pytest.raises(KeyboardInterrupt):
            specbench.main(argv)
    return argv


def test_an_interrupted_run_continued_writes_the_same_answers(bench, pair, tmp_path, monkeypatch):
    """The point of the journal: a run stopped twice (among the batch-1 answers, then inside the batched table) and
    continued must write the very answer files and token-derived numbers of a run that was never stopped, each
    item decoded once: what the journal holds is read back, the rest runs in the same order with the same seeds."""
    argv = interrupted_run(pair, bench, tmp_path / "results", answers=5)
    with monkeypatch.context() as m:
        answered = counted(m, specbench, "answer_question")
        counted(m, specdec, "speculative_generate", stop_after=1, only=lambda t, d, prompts, **k: len(prompts) > 1)
        with pytest.raises(KeyboardInterrupt):
            specbench.main(argv)
    assert len(answered) == N_ANSWERS - 5
    answered = counted(monkeypatch, specbench, "answer_question")
    batched = counted(monkeypatch, specdec, "autoregressive_generate", only=lambda t, prompts, **k: len(prompts) > 1)
    doc = specbench.main(argv)
    assert answered == [] and len(batched) == 2 * 2 - 1     # the first batched item (vanilla, chunk 1) was kept
    assert same_answers(tmp_path / "results") == same_answers(bench[1])
    assert token_numbers(doc) == token_numbers(bench[0])
    assert doc["sessions"] == 3


def test_a_finished_journal_is_read_back_without_decoding(bench, pair, tmp_path, monkeypatch):
    """A rerun of a finished run with the same settings decodes nothing (the report is rewritten from the journal),
    so an interrupted report step, or a lost answer file, costs seconds, not the hours of the run."""
    shutil.copytree(bench[1], tmp_path / "results")
    for f in (tmp_path / "results" / "tiny" / "specbench").glob("run_1/*.jsonl"):
        f.unlink()
    for module, name in ((specbench, "answer_question"), (specdec, "autoregressive_generate"),
                         (specdec, "speculative_generate")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("decoded again"))
    doc = specbench.main(bench_argv(pair, bench[1].parent, tmp_path / "results"))
    assert same_answers(tmp_path / "results") == same_answers(bench[1])
    assert token_numbers(doc) == token_numbers(bench[0])


def test_answer_files_rewritten_from_the_journal_are_the_same_bytes(bench, pair, tmp_path):
    """The answer files are committed; a report rerun from a finished journal must not churn them: answer_id and
    tstamp come from the journal's record of each answer (not a fresh uuid4 and the clock), and ids stay unique."""
    shutil.copytree(bench[1], tmp_path / "results")
    specbench.main(bench_argv(pair, bench[1].parent, tmp_path / "results"))
    before = sorted((bench[1] / "tiny" / "specbench").glob("run_*/*.jsonl"))
    after = sorted((tmp_path / "results" / "tiny" / "specbench").glob("run_*/*.jsonl"))
    assert [f.read_bytes() for f in after] == [f.read_bytes() for f in before] and len(before) == 2 * 4
    ids = [r["answer_id"] for f in before for r in specbench.read_answers(f)]
    assert len(set(ids)) == len(ids)


def test_the_header_commit_is_read_before_this_session_writes_the_journal(bench, pair, tmp_path, monkeypatch):
    """The journal is a tracked file: read after this session's first journal line, the commit of a clean checkout
    would say "+ uncommitted changes" in every report, as the first full run's header did."""
    shutil.copytree(bench[1], tmp_path / "results")
    journal = tmp_path / "results" / "tiny" / "specbench" / specbench.JOURNAL
    lines_before = journal.read_text().count("\n")
    seen = []
    monkeypatch.setattr(specbench.report, "source_commit", lambda: seen.append(journal.read_text().count("\n")) or "c0")
    doc = specbench.main(bench_argv(pair, bench[1].parent, tmp_path / "results"))
    assert seen == [lines_before] and journal.read_text().count("\n") > lines_before
    assert doc["commit"] == "c0"


def test_an_interrupt_says_how_to_continue(bench, pair, tmp_path, capsys):
    """Ctrl-C or SIGTERM (cli.Terminated) mid-run ends with one line: how far the run got, where the finished items
    are, and the command that continues it (the same one, less --fresh, which would throw them away)."""
    argv = bench_argv(pair, bench[1].parent, tmp_path / "results") + ["--fresh"]
    with pytest.MonkeyPatch.context() as m:
        counted(m, specbench, "answer_question", stop_after=2, exc=cli.Terminated)
        with pytest.raises(cli.Terminated):
            specbench.main(argv)
    journal = tmp_path / "results" / "tiny" / "specbench" / specbench.JOURNAL
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"terminated (SIGTERM) after 2/{N_ANSWERS} answers and 0/{N_BATCHED} batched chunk runs, every finished one "
        f"kept in {journal}; continue with: python -m study.specbench {shlex.join(argv[:-1])}")
    assert journal_rows(tmp_path / "results")[-1]["how"] == "terminated (SIGTERM)"


def test_a_journal_of_other_settings_is_refused_in_one_line(bench, pair, tmp_path):
    """Answers of another protocol must never be mixed into this run's files: a journal whose fingerprint differs is
    refused from the command line with the one `error:` line, exit 2, before any model loads, naming what changed
    and how to start over, and it is left as it was."""
    argv = interrupted_run(pair, bench, tmp_path / "results", answers=2)
    journal = tmp_path / "results" / "tiny" / "specbench" / specbench.JOURNAL
    before = journal.read_bytes()
    argv[argv.index("--max-new-tokens") + 1] = "6"
    proc = subprocess.run([sys.executable, "-m", "study.specbench", *argv], cwd=specbench.REPO, capture_output=True,
                          text=True)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: {journal} holds a run with other settings (max_new_tokens 8 -> 6)")
    assert "--fresh to start over" in line
    assert journal.read_bytes() == before


def test_a_code_change_mid_run_is_continued_and_counted(bench, pair, tmp_path, monkeypatch, capsys):
    """A full run spans sessions in which the code is edited (its tokens are pinned by the golden tests): the journal
    is continued, not refused, with one warning naming the changed file, and the report counts the code versions."""
    argv = interrupted_run(pair, bench, tmp_path / "results", answers=3)
    edited = {**specbench.code_versions(), "specdec.py": "edited"}
    monkeypatch.setattr(specbench, "code_versions", lambda: edited)
    capsys.readouterr()
    answered = counted(monkeypatch, specbench, "answer_question")
    doc = specbench.main(argv)
    warnings = [w for w in capsys.readouterr().err.splitlines() if w.startswith("warning:")]
    assert len(warnings) == 1 and "specdec.py" in warnings[0]
    assert len(answered) == N_ANSWERS - 3 and doc["code_versions"] == 2
    assert same_answers(tmp_path / "results") == same_answers(bench[1])


def test_a_torn_last_journal_line_is_dropped_and_its_item_redone(bench, pair, tmp_path, monkeypatch, capsys):
    """kill -9 while a line is appended leaves half a line: the next run must drop it with one warning and redo that
    item (not refuse the journal, not lose or duplicate the item), and end with the same answers."""
    argv = interrupted_run(pair, bench, tmp_path / "results", answers=4)
    journal = tmp_path / "results" / "tiny" / "specbench" / specbench.JOURNAL
    lines = journal.read_text().splitlines(keepends=True)
    last = max(i for i, line in enumerate(lines) if '"kind": "answer"' in line)
    journal.write_text("".join(lines[:last]) + lines[last][:len(lines[last]) // 2])
    capsys.readouterr()
    answered = counted(monkeypatch, specbench, "answer_question")
    specbench.main(argv)
    warnings = [w for w in capsys.readouterr().err.splitlines() if w.startswith("warning:")]
    assert len(warnings) == 1 and "cut off mid-write" in warnings[0] and "redone" in warnings[0]
    assert len(answered) == N_ANSWERS - 3
    keys = [(r["repeat"], r["method"], r["question_id"]) for r in journal_rows(tmp_path / "results")
            if r["kind"] == "answer"]
    assert len(keys) == len(set(keys)) == N_ANSWERS
    assert same_answers(tmp_path / "results") == same_answers(bench[1])


def test_a_draft_distilled_after_the_run_began_joins_it(bench, pair, tmp_path, monkeypatch, capsys):
    """A full run outlasts a session; a draft distilled meanwhile must join the run (its answers decoded from then
    on, one warning) instead of forcing a restart of hours of the others' answers, and the result is the same as a
    run that had it from the start."""
    without = tmp_path / "without"
    (without / "runs").mkdir(parents=True)
    shutil.copy(bench[1].parent / "question.jsonl", without / "question.jsonl")
    argv = bench_argv(pair, without, tmp_path / "results")
    with monkeypatch.context() as m:
        counted(m, specbench, "answer_question", stop_after=4)
        with pytest.raises(KeyboardInterrupt):
            specbench.main(argv)
    shutil.copytree(bench[1].parent / "runs", without / "runs", dirs_exist_ok=True)
    capsys.readouterr()
    answered = counted(monkeypatch, specbench, "answer_question")
    specbench.main(argv)
    warnings = [w for w in capsys.readouterr().err.splitlines() if w.startswith("warning:")]
    assert len(warnings) == 1 and "self-s0 added" in warnings[0]
    assert len(answered) == N_ANSWERS - 4
    assert same_answers(tmp_path / "results") == same_answers(bench[1])


def test_a_run_of_one_repeat_is_raised_to_more_keeping_its_answers(bench, pair, tmp_path, monkeypatch, capsys):
    """A full run of 3 repeats takes days on a CPU: a first whole report from one repeat, then more repeats added to
    the same journal, must decode only the new repeats and end as the run that had them from the start."""
    argv = bench_argv(pair, bench[1].parent, tmp_path / "results")
    one = list(argv)
    one[one.index("--repeats") + 1] = "1"
    specbench.main(one)
    capsys.readouterr()
    answered = counted(monkeypatch, specbench, "answer_question")
    specbench.main(argv)
    warnings = [w for w in capsys.readouterr().err.splitlines() if w.startswith("warning:")]
    assert len(warnings) == 1 and "runs raised from 1 to 2" in warnings[0]
    assert len(answered) == N_ANSWERS // 2
    assert same_answers(tmp_path / "results") == same_answers(bench[1])
    with pytest.raises(cli.BadInput, match=r"repeats 2 -> 1"):
        specbench.main(one)


def test_a_draft_gone_from_the_run_is_refused(bench, pair, tmp_path):
    """Answers of a draft that is no longer there cannot be continued (nor silently dropped): refused in one line
    naming the draft, before any model loads."""
    shutil.copytree(bench[1].parent / "runs", tmp_path / "runs")
    shutil.copy(bench[1].parent / "question.jsonl", tmp_path / "question.jsonl")
    argv = interrupted_run(pair, (None, tmp_path / "runs"), tmp_path / "results", answers=2)
    shutil.rmtree(tmp_path / "runs" / "tiny" / "gsm8k" / "self-s0")
    with pytest.raises(cli.BadInput, match=r"draft self-s0 gone.*train it again"):
        specbench.main(argv)


def test_fresh_starts_over_deleting_only_what_specbench_wrote(bench, pair, tmp_path, monkeypatch):
    """--fresh throws the journal away and decodes everything again; it deletes the journal and the answer files
    specbench wrote (one of a method this run lacks included, so no stale file is left beside the new ones) and
    nothing else in the folder."""
    results = tmp_path / "results"
    shutil.copytree(bench[1], results)
    root = results / "tiny" / "specbench"
    stale = root / "run_3" / "tiny-old-float32-temp-0.0.jsonl"
    stale.parent.mkdir()
    stale.write_text("{}\n")
    (root / "notes.txt").write_text("mine\n")
    answered = counted(monkeypatch, specbench, "answer_question")
    specbench.main(bench_argv(pair, bench[1].parent, results) + ["--fresh"])
    assert len(answered) == N_ANSWERS
    assert not stale.parent.exists() and (root / "notes.txt").read_text() == "mine\n"
    assert [r["kind"] for r in journal_rows(results)].count("session") == 1
    assert same_answers(results) == same_answers(bench[1])


def test_fingerprint_changes_name_what_changed():
    """The refusal must say what changed, so the user can tell an intended change (start over) from a slip (rerun
    with the journal's settings): the setting and both values, the changed code file, the draft added."""
    old = {"protocol": {"gamma": 5, "max_new_tokens": 64}, "repeats": 3, "drafts": {"baseline": "a"},
           "code": {"specdec.py": "1", "specbench.py": "2"}}
    new = {"protocol": {"gamma": 4, "max_new_tokens": 64}, "repeats": 3, "drafts": {"baseline": "a", "fkl-s0": "b"},
           "code": {"specdec.py": "1", "specbench.py": "3"}}
    assert specbench.fingerprint_changes(old, new) == ["gamma 5 -> 4", "draft fkl-s0 added", "specbench.py changed"]
    assert specbench.fingerprint_changes(new, new) == []


def test_progress_line_counts_read_back_items_and_projects_the_rate():
    """The ETA must come from this session's measured rate over the items it decoded, not over those it read back
    from the journal (which took no time): 10 decoded in 50 s -> 5 s each, 60 left -> 5 min."""
    assert specbench.progress_line("answers", 10, 30, 100, 50.0) == \
        "40/100 answers done (30 read back from the journal), 5 s each, ETA 5 min"
