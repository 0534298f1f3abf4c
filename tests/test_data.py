"""data.py: stand-in generators, real-format readers, chat prompts, errors."""
import json
import random
import re

import pytest

import data


@pytest.fixture(scope="module")
def tokenizer():
    """A small project tokenizer with the ChatML template (as the tiny pair ships)."""
    import models
    texts = [e.prompt + "\n" + e.reference for t in data.TASKS for e in data.load_examples(t, "train", n=100)]
    texts += list(data.SYSTEM_PROMPTS.values())
    return models.train_tokenizer(texts + ["system user assistant"], vocab_size=400)


# ---- stand-ins ----------------------------------------------------------------------------

@pytest.mark.parametrize("task", data.TASKS)
def test_standin_is_deterministic(task):
    """WHY: runs, tiny pairs and eval prompts must be reproducible from the seed alone."""
    a = data.load_examples(task, "train", n=50, seed=3)
    b = data.load_examples(task, "train", n=50, seed=3)
    c = data.load_examples(task, "train", n=50, seed=4)
    assert a == b
    assert a != c


@pytest.mark.parametrize("task", data.TASKS)
def test_standin_splits_are_disjoint(task):
    """WHY: eval prompts the teacher or the student trained on would inflate the acceptance."""
    train = {e.prompt for e in data.load_examples(task, "train", n=2000)}
    for seed in (0, 1):   # the split is a function of the prompt, so also across seeds
        ev = {e.prompt for e in data.load_examples(task, "eval", n=200, seed=seed)}
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


def test_gsm8k_jsonl_reader(tmp_path):
    """WHY: users bring the real GSM8k files; question is the user turn, the answer is kept whole."""
    f = _write_jsonl(tmp_path / "train.jsonl", GSM8K_ROWS)
    exs = data.load_examples("gsm8k", "train", source="file", path=f)
    assert [e.prompt for e in exs] == [r["question"] for r in GSM8K_ROWS]
    assert exs[0].reference == GSM8K_ROWS[0]["answer"]
    assert data.gsm8k_final_answer(exs[1].reference) == "10"
    assert data.strip_calculator(exs[0].reference).startswith("Natalia sold 48/2 = 24 clips")


def test_cnndm_parquet_folder_reader_filters_long_articles(tmp_path):
    """WHY: the hub's CNN/DM Parquet layout (test-*.parquet for eval) must read as is, and
    articles over 512 tokens are dropped as the seed did."""
    _write_parquet(tmp_path / "test-00000-of-00001.parquet", CNNDM_ROWS)
    _write_parquet(tmp_path / "train-00000-of-00003.parquet", CNNDM_ROWS[:1] * 3)
    exs = data.load_examples("cnndm", "eval", source="file", path=tmp_path)
    assert exs == [data.Example(CNNDM_ROWS[0]["article"], CNNDM_ROWS[0]["highlights"])]
    assert len(data.load_examples("cnndm", "train", source="file", path=tmp_path)) == 3


def test_long_article_filter_counts_tokens(tokenizer):
    """WHY: with a tokenizer the 512 limit is in tokens (as in the seed), not words."""
    ex = data.Example(" ".join(["Bramley"] * 300), "x")
    n_tokens = len(tokenizer(ex.prompt)["input_ids"])
    assert data.too_long("cnndm", ex, tokenizer, max_tokens=n_tokens - 1)
    assert not data.too_long("cnndm", ex, tokenizer, max_tokens=n_tokens)
    assert not data.too_long("gsm8k", ex, tokenizer, max_tokens=1)


def test_reader_rejects_wrong_columns(tmp_path):
    """WHY: a CNN/DM file passed as GSM8k must fail loudly, not give empty prompts."""
    f = _write_jsonl(tmp_path / "train.jsonl", CNNDM_ROWS[:1])
    with pytest.raises(ValueError, match="question"):
        data.load_examples("gsm8k", "train", source="file", path=f)


def test_missing_files_say_how_to_get_them(tmp_path):
    """WHY: offline users need the download command, not a bare FileNotFoundError."""
    with pytest.raises(FileNotFoundError, match="huggingface-cli download openai/gsm8k"):
        data.load_examples("gsm8k", "eval", source="file", path=tmp_path)


def test_hub_offline_says_how_to_get_files():
    """WHY: source='hub' without network must fail early and name the offline alternative."""
    with pytest.raises(RuntimeError, match="abisee/cnn_dailymail.*source='file'"):
        data.load_examples("cnndm", "eval", source="hub")


# ---- prompts ------------------------------------------------------------------------------

@pytest.mark.parametrize("task", data.TASKS)
def test_prompt_has_system_prompt_and_opens_assistant_turn(tokenizer, task):
    """WHY: the seed prompts with its system prompt, and generation must start inside the
    assistant turn, or the models continue the user turn."""
    ex = data.load_examples(task, "eval", n=1)[0]
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
