"""data.py: stand-in generators, real-format readers, chat prompts, errors."""
import json
import random
import re
import shutil
from pathlib import Path

import pytest

import data


@pytest.fixture(scope="module")
def tokenizer():
    """A small project tokenizer with the ChatML template (as the tiny pair ships)."""
    import models
    texts = [e.prompt + "\n" + e.reference for t in data.TASKS
             for e in data.load_examples(t, "train", n=100, max_article_tokens=None)]
    texts += list(data.SYSTEM_PROMPTS.values())
    return models.train_tokenizer(texts + ["system user assistant"], vocab_size=400)


# ---- stand-ins ----------------------------------------------------------------------------

@pytest.mark.parametrize("task", data.TASKS)
def test_standin_is_deterministic(task):
    """WHY: runs, tiny pairs and eval prompts must be reproducible from the seed alone."""
    a = data.load_examples(task, "train", n=50, seed=3, max_article_tokens=None)
    b = data.load_examples(task, "train", n=50, seed=3, max_article_tokens=None)
    c = data.load_examples(task, "train", n=50, seed=4, max_article_tokens=None)
    assert a == b
    assert a != c


@pytest.mark.parametrize("task", data.TASKS)
def test_standin_splits_are_disjoint(task):
    """WHY: eval prompts the teacher or the student trained on would inflate the acceptance."""
    train = {e.prompt for e in data.load_examples(task, "train", n=2000, max_article_tokens=None)}
    for seed in (0, 1):   # the split is a function of the prompt, so also across seeds
        ev = {e.prompt for e in data.load_examples(task, "eval", n=200, seed=seed, max_article_tokens=None)}
        assert len(ev) == 200
        assert not train & ev


def test_gsm8k_standin_solution_follows_from_question():
    """WHY: the low-entropy end of the study needs exactly one right continuation: every
    step's arithmetic is correct, uses numbers of the question or earlier steps, and the boxed
    answer is the last result."""
    for ex in data.load_examples("gsm8k", "eval", n=100):
        known = set(re.findall(r"\d+", ex.prompt)) | {"2"}
        last = None
        for a, op, b, *rest in re.findall(r"(\d+) ([-+*/]) (\d+)(?: \+ (\d+))? = (\d+)", ex.reference):
            operands = [a, b] + [x for x in rest[:-1] if x]
            assert set(operands) <= known, (ex.prompt, ex.reference)
            value = eval(f" {op} ".join(operands).replace("/", "//"))
            assert value == int(rest[-1]), ex.reference
            known.add(rest[-1])
            last = rest[-1]
        assert last is not None
        assert data.gsm8k_final_answer(ex.reference) == last


def test_cnndm_standin_has_many_valid_summaries():
    """WHY: the high-entropy end of the study needs many equally good continuations: one
    article admits many summaries (facts, order, wording), each built only from its facts."""
    facts, article = data.cnndm_article(random.Random(7))
    summaries = {data.cnndm_summary(facts, random.Random(i)) for i in range(60)}
    assert len(summaries) >= 30
    for s in summaries:
        assert facts["city"] in s and facts["project"] in s     # the main fact is always there
        for number in re.findall(r"\d+", s):
            assert number in article


# ---- readers in the real formats ----------------------------------------------------------

GSM8K_ROWS = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
               "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"},
    {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
                 "How much did she earn?",
     "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n"
               "Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"},
]
CNNDM_ROWS = [
    {"article": "LONDON, England (Reuters) -- Harry Potter star Daniel Radcliffe gains access to a reported "
                "20 million fortune as he turns 18 on Monday.",
     "highlights": "Harry Potter star Daniel Radcliffe gets 20M fortune as he turns 18 Monday .\n"
                   "Young actor says he has no plans to fritter his cash away .",
     "id": "42c027e4ff9730fbb3de84c1af0d2c506e8cc6a0"},
    {"article": " ".join(["word"] * 600),            # longer than 512 tokens: dropped as in the seed
     "highlights": "Too long .", "id": "0"},
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


FIXTURES = Path(__file__).parent / "fixtures" / "gsm8k"   # the first rows of the official files (MIT)


def _official_rows(name):
    return [json.loads(line) for line in (FIXTURES / name).read_text(encoding="utf-8").splitlines()]


def test_gsm8k_jsonl_reader(tmp_path):
    """WHY: users bring the real GSM8k files; question is the user turn, the answer is kept whole."""
    f = _write_jsonl(tmp_path / "train.jsonl", GSM8K_ROWS)
    exs = data.load_examples("gsm8k", "train", source="file", path=f)
    assert [e.prompt for e in exs] == [r["question"] for r in GSM8K_ROWS]
    assert exs[0].reference == GSM8K_ROWS[0]["answer"]
    assert data.gsm8k_final_answer(exs[1].reference) == "10"
    assert data.strip_calculator(exs[0].reference).startswith("Natalia sold 48/2 = 24 clips")


def test_gsm8k_official_folder_reads_each_test_question_once():
    """WHY: the official folder holds test.jsonl beside test_socratic.jsonl (the same questions, other
    answers); reading both by prefix doubled every question and mixed two answer formats."""
    exs = data.load_examples("gsm8k", "eval", source="file", path=FIXTURES)
    test = _official_rows("test.jsonl")
    assert [e.prompt for e in exs] == [r["question"].strip() for r in test]
    assert [e.reference for e in exs] == [r["answer"].strip() for r in test]
    train = data.load_examples("gsm8k", "train", source="file", path=FIXTURES)
    assert [e.prompt for e in train] == [r["question"].strip() for r in _official_rows("train.jsonl")]


def test_a_folder_with_only_the_socratic_file_is_refused(tmp_path):
    """WHY: the socratic configuration is never read without asking: the refusal names the file."""
    shutil.copy(FIXTURES / "test_socratic.jsonl", tmp_path)
    with pytest.raises(data.DataError, match="test_socratic.jsonl.*another configuration"):
        data.load_examples("gsm8k", "eval", source="file", path=tmp_path)
    assert len(data.load_examples("gsm8k", "eval", source="file", path=tmp_path / "test_socratic.jsonl")) == 3


def test_hub_parquet_layout_reads_the_main_configuration(tmp_path):
    """WHY: the hub's gsm8k copy is main/ + socratic/ Parquet folders; only main/ may be read."""
    test = _official_rows("test.jsonl")
    for config, rows in (("main", test), ("socratic", _official_rows("test_socratic.jsonl"))):
        (tmp_path / config).mkdir()
        _write_parquet(tmp_path / config / "test-00000-of-00001.parquet", rows)
    exs = data.load_examples("gsm8k", "eval", source="file", path=tmp_path)
    assert [e.reference for e in exs] == [r["answer"].strip() for r in test]


def test_cnndm_parquet_shards_and_the_length_filter(tmp_path, tokenizer, capsys):
    """WHY: the hub's CNN/DM Parquet layout (test-*.parquet for eval) must read as is, and
    articles over 512 tokens are dropped as the seed did, and counted where the user sees it."""
    _write_parquet(tmp_path / "test-00000-of-00001.parquet", CNNDM_ROWS)
    _write_parquet(tmp_path / "train-00000-of-00002.parquet", CNNDM_ROWS[:1] * 3)
    _write_parquet(tmp_path / "train-00001-of-00002.parquet", CNNDM_ROWS[:1] * 2)
    exs = data.load_examples("cnndm", "eval", source="file", path=tmp_path, tokenizer=tokenizer, verbose=True)
    assert exs == [data.Example(CNNDM_ROWS[0]["article"], CNNDM_ROWS[0]["highlights"])]
    assert "kept 1 of 2 articles, dropped 1 longer than 512 tokens" in capsys.readouterr().out
    assert len(data.load_examples("cnndm", "train", source="file", path=tmp_path, tokenizer=tokenizer)) == 5


def test_cnndm_validation_is_the_eval_split_without_a_test_file(tmp_path, tokenizer, capsys):
    """WHY: CNN/DM ships a validation split; without a test file it is the eval split, said aloud."""
    _write_jsonl(tmp_path / "validation.jsonl", CNNDM_ROWS[:1])
    _write_jsonl(tmp_path / "train.jsonl", CNNDM_ROWS[:1] * 2)
    exs = data.load_examples("cnndm", "eval", source="file", path=tmp_path, tokenizer=tokenizer, verbose=True)
    assert len(exs) == 1
    assert "validation.jsonl (no test file: the validation split is the eval split)" in capsys.readouterr().out


def test_length_filter_counts_tokens_of_the_given_tokenizer(tokenizer):
    """WHY: the 512 limit is in tokens of the run's teacher (as in the seed), not whitespace words:
    an article of exactly the limit is kept, one token more is dropped, whatever its word count."""
    ex = data.Example(" ".join(["Bramley"] * 300), "x")
    n_tokens = len(tokenizer(ex.prompt, add_special_tokens=False)["input_ids"])
    assert n_tokens != 300                                   # tokens, not words
    assert data.length_filter("cnndm", [ex], tokenizer, max_tokens=n_tokens) == ([ex], 0)
    assert data.length_filter("cnndm", [ex], tokenizer, max_tokens=n_tokens - 1) == ([], 1)
    assert data.length_filter("gsm8k", [ex], tokenizer, max_tokens=1) == ([ex], 0)
    with pytest.raises(ValueError, match="tokenizer"):        # never a silent fallback to words
        data.length_filter("cnndm", [ex], None)


def test_bom_jsonl_and_json_arrays_load(tmp_path):
    """WHY: files saved by Windows tools start with a UTF-8 BOM, and `.json` exports are often one array."""
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in GSM8K_ROWS).encode())
    arr = tmp_path / "rows.json"
    arr.write_text(json.dumps(GSM8K_ROWS, indent=2))
    for f in (bom, arr):
        exs = data.load_examples("gsm8k", "train", source="file", path=f)
        assert [e.prompt for e in exs] == [r["question"] for r in GSM8K_ROWS]


GOOD = json.dumps(GSM8K_ROWS[0])


def _bad(tmp_path, text, name="train.jsonl"):
    f = tmp_path / name
    f.write_text(text)
    return f


# (what is written, the message it must give): each names the file, the 1-based line and what is wrong
BAD_ROWS = {
    "empty file": ("", r"train\.jsonl: the file is empty"),
    "blank file": ("\n  \n", r"train\.jsonl: the file is blank"),
    "truncated line": (GOOD + "\n" + GOOD[:-20] + "\n", r"train\.jsonl, line 2: invalid JSON"),
    "not an object": (GOOD + "\n" + json.dumps(["a", "b"]) + "\n", r"train\.jsonl, line 2: the row is a JSON list"),
    "missing column": (json.dumps({"question": "q?"}) + "\n", r"line 1: no column 'answer'"),
    "null column": (json.dumps({"question": None, "answer": "#### 1"}) + "\n", r"line 1: column 'question' is null"),
    "blank column": ("\n" + json.dumps({"question": " \t", "answer": "#### 1"}), r"line 2: column 'question' is blank"),
    "number column": (json.dumps({"question": 7, "answer": "#### 1"}), r"line 1: column 'question' is a int"),
    "no final answer": (json.dumps({"question": "q?", "answer": "it is 4"}), r"line 1: column 'answer' has no final"),
    "empty array": ("[]", r"no rows"),
    # issue 31: json.loads turns the escape into a lone surrogate, which crashed the tokenizer later
    "lone surrogate": (GOOD + "\n" + json.dumps({"question": "x\ud800y", "answer": "#### 1"}) + "\n",
                       r"train\.jsonl, line 2: column 'question' holds a lone surrogate '\\ud800' at character 2"),
}


@pytest.mark.parametrize("kind", BAD_ROWS)
def test_bad_rows_name_file_line_column_and_problem(tmp_path, kind):
    """WHY: a bad row used to become the prompt "None" or "", or fail with a bare JSONDecodeError; each
    kind must stop the run with the file, the line, the column and the problem."""
    text, match = BAD_ROWS[kind]
    f = _bad(tmp_path, text, "train.json" if text.startswith("[") else "train.jsonl")
    with pytest.raises(data.DataError, match=match) as e:
        data.load_examples("gsm8k", "train", source="file", path=f)
    assert str(f) in str(e.value)
    assert isinstance(e.value, ValueError)


def test_parquet_with_the_wrong_columns(tmp_path):
    """WHY: a CNN/DM Parquet passed as GSM8k must fail naming the file and the missing columns."""
    f = _write_parquet(tmp_path / "test-00000-of-00001.parquet", CNNDM_ROWS)
    with pytest.raises(data.DataError, match=r"test-00000-of-00001\.parquet: no column 'question', 'answer'"):
        data.load_examples("gsm8k", "eval", source="file", path=f)


def test_parquet_bad_row_names_the_row(tmp_path):
    """WHY: Parquet rows are numbered 1-based in the message, as JSONL lines are."""
    f = _write_parquet(tmp_path / "train.parquet", GSM8K_ROWS + [{"question": None, "answer": "#### 3"}])
    with pytest.raises(data.DataError, match=r"train\.parquet, row 3: column 'question' is null"):
        data.load_examples("gsm8k", "train", source="file", path=f)


@pytest.mark.parametrize("layout, match", [
    ({"train.jsonl": 1}, r"no test or validation file for the eval split"),
    ({"test.jsonl": 1, "test.parquet": 1}, r"holds the test split twice \(test\.jsonl, test\.parquet\)"),
    ({"test-00000-of-00002.parquet": 1}, r"not one complete set"),
    ({"a/test.jsonl": 1, "b/test.jsonl": 1}, r"several configurations \(a/, b/\)"),
])
def test_bad_folders_are_refused(tmp_path, layout, match):
    """WHY: a folder without the split, with the split twice, with missing shards or with several
    configurations must never be read half or doubled."""
    for name in layout:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".parquet"):
            _write_parquet(tmp_path / name, GSM8K_ROWS)
        else:
            _write_jsonl(tmp_path / name, GSM8K_ROWS)
    with pytest.raises(data.DataError, match=match):
        data.load_examples("gsm8k", "eval", source="file", path=tmp_path)


@pytest.mark.parametrize("source, path, default, expected", [
    (None, None, "hub", ("hub", None)),             # the preset's default
    (None, None, None, ("standin", None)),
    (None, "d/x.jsonl", "hub", ("file", "d/x.jsonl")),  # a path alone means file
    ("file", "d", None, ("file", "d")),
    ("standin", None, "hub", ("standin", None)),
])
def test_resolve_source_rule(source, path, default, expected):
    """WHY: distill.py, evaluate.py and report.py share this one rule, so a path is never ignored."""
    assert data.resolve_source(source, path, default) == expected


@pytest.mark.parametrize("source, path, match", [
    ("file", None, "--source file needs --data-path"),
    ("hub", "x.jsonl", "only read with --source file"),
    ("web", None, "standin, file, hub"),
])
def test_resolve_source_errors(source, path, match):
    """WHY: --data-path with another source used to be silently ignored; file without a path is unusable."""
    with pytest.raises(ValueError, match=match):
        data.resolve_source(source, path, "standin")


def test_missing_files_say_how_to_get_them(tmp_path):
    """WHY: offline users need the download command, not a bare FileNotFoundError."""
    with pytest.raises(data.DataError, match="huggingface-cli download openai/gsm8k"):
        data.load_examples("gsm8k", "eval", source="file", path=tmp_path / "missing")
    with pytest.raises(data.DataError, match="no .jsonl, .json or .parquet files"):
        data.load_examples("gsm8k", "eval", source="file", path=tmp_path)


def test_hub_offline_says_how_to_get_files():
    """WHY: source='hub' without network must fail early and name the offline alternative."""
    with pytest.raises(RuntimeError, match="abisee/cnn_dailymail.*--data-path data/cnndm"):
        data.load_examples("cnndm", "eval", source="hub")


# ---- prompts ------------------------------------------------------------------------------

@pytest.mark.parametrize("task", data.TASKS)
def test_prompt_has_system_prompt_and_opens_assistant_turn(tokenizer, task):
    """WHY: the seed prompts with its system prompt, and generation must start inside the
    assistant turn, or the models continue the user turn."""
    ex = data.load_examples(task, "eval", n=1, tokenizer=tokenizer)[0]
    text = tokenizer.decode(data.build_prompt_ids(tokenizer, task, ex))
    assert data.SYSTEM_PROMPTS[task] in text
    assert ex.prompt in text
    assert text.endswith("<|im_start|>assistant\n")


def test_task_prompts_are_ids(tokenizer):
    """WHY: specdec and the training loop take lists of token ids, one per prompt."""
    prompts = data.task_prompts("gsm8k", tokenizer, n=5)
    assert len(prompts) == 5 and all(isinstance(i, int) for p in prompts for i in p)
    assert len(set(map(tuple, prompts))) == 5


# ---- errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("call, match", [
    (lambda: data.check_task("mmlu"), "gsm8k, cnndm"),
    (lambda: data.load_examples("gsm8k", "dev"), "train, eval"),
    (lambda: data.load_examples("gsm8k", "train", source="web"), "standin, file, hub"),
])
def test_bad_names_list_valid_ones(call, match):
    """WHY: a typo must name the valid choices."""
    with pytest.raises(ValueError, match=match):
        call()


# ---- the scripts: one rule, data before models ------------------------------------------------

class _ModelsLoaded(Exception):
    """Raised instead of loading models: everything before it ran on the data alone."""


def _model_folder(folder, tokenizer):
    """A one-layer model folder (config.json, safetensors) with `tokenizer`: passes the scripts' folder checks."""
    from transformers import LlamaConfig, LlamaForCausalLM
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=4096)
                     ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_distill_and_evaluate_keep_the_same_cnndm_rows(tmp_path, tokenizer, monkeypatch, capsys):
    """WHY: the length filter once counted words in training and tokens in evaluation; both scripts must
    keep the same articles of the same file with the same (teacher's) tokenizer, print the counts, and do
    it before any model loads."""
    import distill
    from study import evaluate
    import models

    tok_dir = _model_folder(tmp_path / "teacher", tokenizer)
    n_tok = len(tokenizer("Bramley council", add_special_tokens=False)["input_ids"])
    rows = [{"article": " ".join(["Bramley council"] * (k * 512 // n_tok // 4)), "highlights": f"h{k}"}
            for k in range(1, 9)]                                       # ~128 .. ~1024 tokens
    (tmp_path / "data").mkdir()
    _write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    _write_jsonl(tmp_path / "data" / "test.jsonl", rows)
    kept = []
    real_filter = data.length_filter
    monkeypatch.setattr(data, "length_filter", lambda *a, **k: kept.append(real_filter(*a, **k)) or kept[-1])
    monkeypatch.setattr(models, "load_pair", lambda *a, **k: (_ for _ in ()).throw(_ModelsLoaded()))
    common = ["--task", "cnndm", "--teacher", str(tok_dir), "--student", str(tok_dir),
              "--data-path", str(tmp_path / "data")]
    with pytest.raises(_ModelsLoaded):
        distill.main(common + ["--out", str(tmp_path / "run"), "--lr", "1e-4"])   # not a tiny pair: --lr chosen
    with pytest.raises(_ModelsLoaded):
        evaluate.main(common + ["--results", str(tmp_path / "res")])
    (train_kept, train_dropped), (eval_kept, eval_dropped) = kept
    assert train_kept == eval_kept and 0 < len(train_kept) < len(rows) and train_dropped == eval_dropped
    out = capsys.readouterr().out
    line = f"kept {len(train_kept)} of {len(rows)} articles, dropped {train_dropped} longer than 512 tokens"
    assert f"cnndm train: {line}" in out and f"cnndm eval: {line}" in out


def test_distill_refuses_bad_rows_before_loading_models(tmp_path, tokenizer):
    """WHY: an empty or broken file used to load both models and then die with ZeroDivisionError."""
    import distill
    tok_dir = tmp_path / "teacher"
    tokenizer.save_pretrained(tok_dir)
    empty = tmp_path / "train.jsonl"
    empty.write_text("")
    with pytest.raises(data.DataError, match=r"train\.jsonl: the file is empty"):
        distill.main(["--task", "gsm8k", "--teacher", str(tok_dir), "--student", str(tmp_path / "no-student"),
                      "--data-path", str(empty), "--out", str(tmp_path / "run"), "--lr", "1e-4"])
    with pytest.raises(ValueError, match="--source file needs --data-path"):
        distill.main(["--task", "gsm8k", "--source", "file", "--out", str(tmp_path / "run")])


def test_the_first_n_cnndm_examples_are_counted_after_the_length_filter(tmp_path, tokenizer):
    """n asks for the first n USABLE articles: an article over MAX_ARTICLE_TOKENS tokens must be left out
    whether or not n is given (issue 19: with n=64 the filter was skipped and a 1,800-token article came back)."""
    rows = [{"article": "Bramley council " * 600, "highlights": "long"},
            {"article": "Bramley council met.", "highlights": "a"},
            {"article": "The council met again.", "highlights": "b"}]
    f = _write_jsonl(tmp_path / "train.jsonl", rows)
    exs = data.load_examples("cnndm", "train", source="file", path=f, n=2, tokenizer=tokenizer)
    assert [e.reference for e in exs] == ["a", "b"]


# ----------------------------------------------------------------------------- validation prompts (held out)

def test_standin_validation_prompts_are_disjoint_from_training_and_the_eval_split():
    """distill.py --eval-every validates on train-split prompts training never sees: none of them is a
    training prompt, none is in the eval split evaluate.py scores (its whole first 200 prompts checked, and the
    hash rule for all), and the training examples are exactly those of a run without validation."""
    train, val = data.held_out_split("gsm8k", 64, 16, seed=3)
    assert len(val) == 16 and train == data.load_examples("gsm8k", "train", n=64, seed=3)
    assert not {e.prompt for e in val} & {e.prompt for e in train}
    assert not {e.prompt for e in val} & {e.prompt for e in data.load_examples("gsm8k", "eval", n=200)}
    assert all(data._split_of(e.prompt) == "train" for e in val)


def test_file_validation_prompts_are_the_last_train_rows_and_training_stops_before_them(tmp_path):
    """With files, the validation prompts are the last K train rows and training takes rows before them (at
    most n_train): the two never share a row, and the eval file's rows are checked against."""
    train, val = data.held_out_split("gsm8k", 100, 5, source="file", path=FIXTURES)
    rows = data.load_examples("gsm8k", "train", source="file", path=FIXTURES)
    assert val == rows[-5:] and train == rows[:-5]
    train, _ = data.held_out_split("gsm8k", 10, 5, source="file", path=FIXTURES)
    assert train == rows[:10]


def test_validation_rows_shared_with_the_eval_file_are_refused(tmp_path):
    """A train file whose last rows are also in the test file would validate on evaluation prompts: refused,
    naming the problem, before any model loads."""
    shutil.copy(FIXTURES / "test.jsonl", tmp_path / "test.jsonl")
    train_rows = (FIXTURES / "train.jsonl").read_text().splitlines()
    test_rows = (FIXTURES / "test.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(train_rows + test_rows[:2]) + "\n")
    with pytest.raises(data.DataError, match="in the eval split too"):
        data.held_out_split("gsm8k", None, 4, source="file", path=tmp_path)
    with pytest.raises(data.DataError, match="too few"):
        data.held_out_split("gsm8k", None, 40, source="file", path=FIXTURES)


def test_the_length_filter_drops_a_huge_article_without_tokenizing_it_whole(tokenizer, monkeypatch):
    """Issue 31: counting a 50 MB row's tokens took minutes and gigabytes; an article whose prefix already
    holds more tokens than the filter keeps is dropped on that prefix, and the others are counted as before."""
    real = data.article_tokens

    def counted(examples, tok, chunk=1000):
        assert all(len(e.prompt) < 100_000 for e in examples), "a huge article was tokenized whole"
        return real(examples, tok, chunk)
    monkeypatch.setattr(data, "article_tokens", counted)
    short = data.Example(prompt="A short article.", reference="Short.")
    huge = data.Example(prompt="word " * 200_000, reference="Long.")
    kept, dropped = data.length_filter("cnndm", [huge, short], tokenizer, max_tokens=100)
    assert (kept, dropped) == ([short], 1)


# ---- DialogSum, the vendored open-ended task ------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def _dialogsum(split: str) -> list:
    return data.load_examples("dialogsum", split, source="file", path=REPO / "data" / "dialogsum",
                              max_article_tokens=None)


def test_dialogsum_files_hold_500_dialogues_per_split():
    """WHY: the real open-ended task is only worth running with the whole vendored split, every row valid
    (a row lost or renamed would change every number measured on it)."""
    train, test = _dialogsum("train"), _dialogsum("eval")
    assert (len(train), len(test)) == (500, 500)
    assert all(e.prompt.startswith("#Person1#:") and e.reference for e in train + test)


def test_dialogsum_splits_share_no_dialogue():
    """WHY: a draft distilled on a dialogue it is then evaluated on would inflate the held-out acceptance."""
    train = {e.prompt for e in _dialogsum("train")}
    test = {e.prompt for e in _dialogsum("eval")}
    assert len(train) == 500 and len(test) == 500
    assert not train & test


def test_dialogsum_is_disjoint_from_spec_bench():
    """WHY: issue 29 asks for open-ended prompts disjoint from Spec-Bench's questions, so that the two
    measurements are independent."""
    questions = (REPO / "data" / "spec_bench" / "question.jsonl").read_text()
    assert not [e.where for e in _dialogsum("train") + _dialogsum("eval") if e.prompt[:80] in questions]


def test_dialogsum_long_dialogues_are_dropped_and_counted(tokenizer, capsys):
    """WHY: the 512-token filter of the summary tasks must apply to dialogues too, counted where a user sees it."""
    exs = data.load_examples("dialogsum", "eval", source="file", path=REPO / "data" / "dialogsum",
                             tokenizer=tokenizer, max_article_tokens=300, verbose=True)
    out = capsys.readouterr().out
    kept, total = map(int, re.search(r"kept (\d+) of (\d+) dialogues", out).groups())
    assert (len(exs), total) == (kept, 500) and 0 < kept < total
    assert all(len(tokenizer(e.prompt)["input_ids"]) <= 300 for e in exs)


def test_dialogsum_standin_is_a_dialogue_with_a_summary_of_its_facts():
    """WHY: offline runs without the files use the stand-in; it must look like the task (two speakers) and
    its reference must state facts the dialogue holds."""
    for ex in data.load_examples("dialogsum", "eval", n=20, max_article_tokens=None):
        lines = ex.prompt.split("\n")
        assert [line.split(":")[0] for line in lines[:2]] == ["#Person1#", "#Person2#"]
        numbers = set(re.findall(r"\d+", ex.reference))
        assert numbers <= set(re.findall(r"\d+", ex.prompt))
