"""Tasks, prompts and data: GSM8k (low teacher entropy) and CNN/DailyMail (high teacher entropy).

The study asks how the teacher's next-token entropy H(p) (p = target/teacher, q = draft/student)
changes which divergence distils the best draft. Two tasks sit at the two ends:

- ``gsm8k``: math word problems. Given the question, the worked solution is nearly determined,
  so the teacher is confident: H(p) is low at most positions.
- ``cnndm``: news summarisation. Many summaries are equally good (which facts, in which order,
  in which words), so the teacher spreads its mass: H(p) is high at many positions.

Every example is an ``Example(prompt, reference)``: ``prompt`` is the user turn (the question /
the article), ``reference`` the dataset's answer (GSM8k ``answer`` with its ``<<a*b=c>>``
calculator notes and final ``#### N``; CNN/DM ``highlights``). On-policy distillation never trains
on the reference; the tiny offline teacher (models.py) does, to learn the task.

Sources (``load_examples(..., source=...)``):

- ``"standin"`` (default, offline): generated here, deterministically from a seed, with the same
  entropy contrast. GSM8k-like: multi-step arithmetic word problems whose worked solution is a
  fixed function of the question (one right wording, one right answer). CNN/DM-like: short
  "articles" of facts whose reference summary picks 2-3 facts, orders them at random and words
  each one in one of several equivalent ways (many right answers). An example belongs to the
  eval split iff a hash of its prompt says so, so train and eval can never share a prompt.
- ``"file"``: local JSONL or Parquet files in the real column formats (a file, or a folder whose
  files start with the split name, e.g. ``train-00000-of-00001.parquet``, ``test.jsonl``).
- ``"hub"``: the real datasets through the optional ``datasets`` package and the network.

Prompts are the seed's: a system prompt (``SYSTEM_PROMPTS``, the one place the text lives) and the
user turn, rendered by the tokenizer's own chat template with the assistant turn opened
(``add_generation_prompt=True``). CNN/DM articles longer than 512 tokens are dropped, as in the seed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

TASKS = ("gsm8k", "cnndm")
SPLITS = ("train", "eval")
SOURCES = ("standin", "file", "hub")

# The seed's system prompts, verbatim. The only place the prompt text lives.
SYSTEM_PROMPTS = {
    "gsm8k": "In math word problem given by the user, reason step by step and put your final answer within \\boxed{}.",
    "cnndm": "Write a very short summary for the user's article.",
}

# The real datasets: hub id, config, the two columns (user turn, reference), split names.
HUB_DATASETS = {
    "gsm8k": {"id": "openai/gsm8k", "config": "main", "prompt": "question", "reference": "answer",
              "splits": {"train": "train", "eval": "test"}},
    "cnndm": {"id": "abisee/cnn_dailymail", "config": "3.0.0", "prompt": "article", "reference": "highlights",
              "splits": {"train": "train", "eval": "test"}},
}
MAX_ARTICLE_TOKENS = 512           # the seed drops CNN/DM articles longer than this
STANDIN_SIZES = {"train": 2000, "eval": 200}   # default n for the generated stand-ins
EVAL_SHARE = 5                     # 1 in EVAL_SHARE generated prompts belongs to the eval split


@dataclass(frozen=True)
class Example:
    prompt: str      # the user turn: the question / the article
    reference: str   # the dataset's answer / highlights (never used by on-policy training)


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    return task


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    return split


# --------------------------------------------------------------------------------------------
# GSM8k helpers (real format: "...<<3*4=12>>12 ...\n#### 12")
# --------------------------------------------------------------------------------------------

def strip_calculator(answer: str) -> str:
    """Drop GSM8k's calculator annotations: '3*4=<<3*4=12>>12' -> '3*4=12'."""
    return re.sub(r"<<[^>]*>>", "", answer)


def gsm8k_final_answer(text: str) -> str | None:
    """The final number of a GSM8k answer ('#### 1,234' -> '1234') or of a model's '\\boxed{..}'."""
    m = re.search(r"####\s*([-\d.,]+)", text) or re.search(r"\\boxed\{([^}]*)\}", text)
    return m.group(1).replace(",", "").strip() if m else None


# --------------------------------------------------------------------------------------------
# Stand-in generators (offline, deterministic). One function per task: rng -> Example.
# --------------------------------------------------------------------------------------------

_NAMES = ["Anna", "Ben", "Carla", "David", "Emma", "Felix", "Grace", "Hugo", "Ida", "Jack",
          "Kira", "Leo", "Maya", "Noah", "Olga", "Paul", "Rosa", "Sam", "Tara", "Victor"]
_ITEMS = ["apples", "pencils", "cookies", "stickers", "marbles", "books", "cards", "shells",
          "stamps", "candies", "coins", "eggs"]
_BOXES = ["bags", "boxes", "jars", "baskets", "packs"]
_SHOPS = ["bakery", "shop", "market", "kiosk", "store"]


def _gsm8k_standin(rng: random.Random) -> Example:
    """One multi-step word problem; its solution (wording and numbers) follows from the question."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    kind = rng.randrange(4)
    if kind == 0:   # multiply, then subtract
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        c = rng.randint(1, min(9, a * b - 1))
        box = rng.choice(_BOXES)
        q = (f"{name} has {a} {box} of {item}. Each of the {box} has {b} {item}. "
             f"{name} gives {c} {item} to a friend. How many {item} does {name} have now?")
        r = a * b - c
        steps = [f"{name} has {a} * {b} = {a * b} {item}.",
                 f"After giving {c} away, {name} has {a * b} - {c} = {r} {item}."]
    elif kind == 1:  # add, then multiply
        a, b, c = rng.randint(1, 6), rng.randint(1, 6), rng.randint(2, 5)
        shop = rng.choice(_SHOPS)
        q = (f"A {shop} sells {a} {item} in the morning and {b} {item} in the afternoon. "
             f"Each of the {item} costs {c} dollars. How many dollars does the {shop} earn?")
        r = (a + b) * c
        steps = [f"The {shop} sells {a} + {b} = {a + b} {item}.",
                 f"It earns {a + b} * {c} = {r} dollars."]
    elif kind == 2:  # three additions
        a, b = rng.randint(2, 9), rng.randint(1, 9)
        q = (f"{name} reads {a} pages on Monday. On Tuesday {name} reads {b} more pages than on Monday. "
             f"On Wednesday {name} reads 2 times as many pages as on Monday. "
             f"How many pages does {name} read in total?")
        t, w = a + b, 2 * a
        r = a + t + w
        steps = [f"On Tuesday {name} reads {a} + {b} = {t} pages.",
                 f"On Wednesday {name} reads 2 * {a} = {w} pages.",
                 f"In total {name} reads {a} + {t} + {w} = {r} pages."]
    else:           # divide, then subtract
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        c = rng.randint(1, b - 1)
        q = (f"{name} has {a * b} {item} and shares them equally among {a} friends. "
             f"Each friend then uses {c} of them. How many {item} does each friend have left?")
        r = b - c
        steps = [f"Each friend gets {a * b} / {a} = {b} {item}.",
                 f"After using {c}, each friend has {b} - {c} = {r} {item}."]
    return Example(prompt=q, reference="\n".join(steps) + f"\nThe answer is \\boxed{{{r}}}.")


_CITIES = ["Ashford", "Bramley", "Corwen", "Dunmore", "Elmstead", "Fairport", "Glenrock", "Hollis",
           "Ivybridge", "Kestrel", "Lakemoor", "Milton", "Northam", "Oakridge", "Pinehurst", "Redcliff"]
_PROJECTS = ["park", "library", "bridge", "school", "hospital", "stadium", "museum", "station"]
_GROUPS = ["council", "board", "committee"]
_TITLES = ["Mayor", "Governor", "Chief", "Director"]
_MONTHS = ["January", "March", "April", "May", "June", "July", "September", "October"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
_FILLER = ["The weather was cold and wet all week.",
           "Local shops stayed open late on the same day.",
           "A music festival is also planned for the summer.",
           "The town hall was painted last year.",
           "Traffic on the main road was slow in the morning.",
           "Some people watched the meeting online.",
           "The local team won its game on the weekend.",
           "Schools in the area are closed for a holiday."]

# Each fact of an article can be summarised in several equally good ways ({slots} from the article).
_FACT_WORDINGS = {
    "main": ["{city} will build a new {project}.",
             "The {group} of {city} approved a new {project}.",
             "A new {project} is coming to {city}.",
             "{city} voted for a new {project}."],
    "cost": ["It will cost {cost} million dollars.",
             "The {project} costs {cost} million dollars.",
             "The price is {cost} million dollars.",
             "Officials put the cost at {cost} million dollars."],
    "month": ["Work starts in {month}.",
              "Building begins in {month}.",
              "Construction will start in {month}.",
              "The work is set for {month}."],
    "person": ["{title} {person} backed the plan.",
               "{title} {person} supported the {project}.",
               "The plan has the support of {title} {person}.",
               "{person} said the {project} is good news."],
    "crowd": ["About {crowd} residents came to the meeting.",
              "The meeting drew {crowd} residents.",
              "{crowd} people attended the vote.",
              "Around {crowd} residents were there."],
}


def cnndm_article(rng: random.Random) -> tuple[dict, str]:
    """The facts (slot -> value) of one short news article, and its text."""
    s = {"city": rng.choice(_CITIES), "project": rng.choice(_PROJECTS), "group": rng.choice(_GROUPS),
         "title": rng.choice(_TITLES), "person": rng.choice(_NAMES), "month": rng.choice(_MONTHS),
         "day": rng.choice(_DAYS), "cost": str(rng.randint(2, 90)), "crowd": str(rng.randint(20, 300))}
    sentences = [
        "{city} -- The {group} of {city} voted on {day} to build a new {project}.",
        "The {project} will cost {cost} million dollars, officials said.",
        "{title} {person} said the {project} is good news for the town.",
        "Work on the {project} is expected to start in {month}.",
        "About {crowd} residents came to the meeting on {day}.",
    ]
    body = [x.format(**s) for x in sentences]
    for f in rng.sample(_FILLER, 2):               # two off-topic sentences at random places
        body.insert(rng.randint(1, len(body)), f)
    return s, " ".join(body)


def cnndm_summary(facts: dict, rng: random.Random) -> str:
    """One of many equally good summaries: the main fact plus 1-2 others, any order, any wording."""
    chosen = ["main"] + rng.sample(["cost", "month", "person", "crowd"], rng.randint(1, 2))
    rng.shuffle(chosen)
    return "\n".join(rng.choice(_FACT_WORDINGS[f]).format(**facts) for f in chosen)


def _cnndm_standin(rng: random.Random) -> Example:
    facts, article = cnndm_article(rng)
    return Example(prompt=article, reference=cnndm_summary(facts, rng))


_STANDIN = {"gsm8k": _gsm8k_standin, "cnndm": _cnndm_standin}


def _split_of(prompt: str) -> str:
    """Stable split assignment by content: the same prompt is always in the same split."""
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
    return "eval" if h % EVAL_SHARE == 0 else "train"


def standin_examples(task: str, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
    """n distinct generated examples of the split, the same for the same (task, split, n, seed)."""
    check_task(task), check_split(split)
    n = STANDIN_SIZES[split] if n is None else n
    rng = random.Random(f"{task}/{seed}")
    out, seen = [], set()
    for _ in range(200 * n + 1000):                 # the problem spaces are far larger than any n
        if len(out) >= n:
            break
        ex = _STANDIN[task](rng)
        if ex.prompt not in seen and _split_of(ex.prompt) == split:
            seen.add(ex.prompt)
            out.append(ex)
    if len(out) < n:
        raise ValueError(f"the {task} stand-in has fewer than n={n} distinct {split} prompts")
    return out


# --------------------------------------------------------------------------------------------
# Real data: local files (JSONL / Parquet) or the hub
# --------------------------------------------------------------------------------------------

def _get_instructions(task: str) -> str:
    d = HUB_DATASETS[task]
    return (f"download the {task} files once with network access, e.g. "
            f"`huggingface-cli download {d['id']} --repo-type dataset --local-dir data/{task}` "
            f"(the Parquet files lie under {d['config']}/), then pass source='file', "
            f"path='data/{task}/{d['config']}' (a JSONL or Parquet file, or a folder of them), "
            f"with columns {d['prompt']!r} and {d['reference']!r}")


def _read_rows(file: Path) -> list[dict]:
    if file.suffix in (".jsonl", ".json"):
        with open(file, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq               # installed with datasets / pandas
        return pq.read_table(file).to_pylist()
    raise ValueError(f"unsupported data file {str(file)!r}; use .jsonl, .json (JSON lines) or .parquet")


def _data_files(path: Path, task: str, split: str) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no data file or folder at {str(path)!r}; {_get_instructions(task)}")
    names = {split, HUB_DATASETS[task]["splits"][split]}
    files = sorted(f for f in path.iterdir() if f.suffix in (".jsonl", ".json", ".parquet")
                   and any(f.name.startswith(s) for s in names))
    if not files:
        raise FileNotFoundError(f"no {'/'.join(sorted(names))}*.jsonl|.parquet files in {str(path)!r}; "
                                f"{_get_instructions(task)}")
    return files


def _rows_to_examples(rows, task: str) -> list[Example]:
    d = HUB_DATASETS[task]
    out = []
    for i, row in enumerate(rows):
        if d["prompt"] not in row or d["reference"] not in row:
            raise ValueError(f"{task} row {i} lacks the columns {d['prompt']!r}/{d['reference']!r}: "
                             f"has {sorted(row)}")
        out.append(Example(prompt=str(row[d["prompt"]]).strip(), reference=str(row[d["reference"]]).strip()))
    return out


def file_examples(task: str, split: str, path: str | os.PathLike) -> list[Example]:
    """Rows of local GSM8k (question/answer) or CNN/DM (article/highlights) JSONL/Parquet files."""
    rows = [r for f in _data_files(Path(path), task, split) for r in _read_rows(f)]
    return _rows_to_examples(rows, task)


def hub_examples(task: str, split: str) -> list[Example]:
    """The real dataset from the hub (needs the optional `datasets` package and the network)."""
    d = HUB_DATASETS[task]
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise RuntimeError(f"source='hub' but HF_HUB_OFFLINE is set; {_get_instructions(task)}")
    try:
        import datasets
    except ImportError as e:
        raise RuntimeError(f"source='hub' needs `pip install datasets`; or {_get_instructions(task)}") from e
    try:
        ds = datasets.load_dataset(d["id"], d["config"], split=d["splits"][split])
    except Exception as e:                          # offline, no cache, hub down ...
        raise RuntimeError(f"could not load {d['id']} ({d['config']}) from the hub: {e}; "
                           f"{_get_instructions(task)}") from e
    return _rows_to_examples(ds, task)


def too_long(task: str, example: Example, tokenizer=None, max_tokens: int = MAX_ARTICLE_TOKENS) -> bool:
    """The seed's CNN/DM filter: an article longer than max_tokens tokens (whitespace words
    stand in for tokens when no tokenizer is given). GSM8k questions are never dropped."""
    if task != "cnndm":
        return False
    if tokenizer is None:
        return len(example.prompt.split()) > max_tokens
    return len(tokenizer(example.prompt, add_special_tokens=False)["input_ids"]) > max_tokens


def load_examples(task: str, split: str, *, source: str = "standin", path=None, n: int | None = None,
                  seed: int = 0, tokenizer=None, max_article_tokens: int = MAX_ARTICLE_TOKENS) -> list[Example]:
    """The first n examples of a split (all when n is None; stand-ins default to STANDIN_SIZES).
    CNN/DM articles over max_article_tokens (counted with tokenizer if given) are dropped first."""
    check_task(task), check_split(split)
    if source == "standin":
        exs = standin_examples(task, split, n=n, seed=seed)
    elif source == "file":
        if path is None:
            raise ValueError(f"source='file' needs path=...; {_get_instructions(task)}")
        exs = file_examples(task, split, path)
    elif source == "hub":
        exs = hub_examples(task, split)
    else:
        raise ValueError(f"unknown source {source!r}; valid sources: {', '.join(SOURCES)}")
    exs = [e for e in exs if not too_long(task, e, tokenizer, max_article_tokens)]
    return exs if n is None else exs[:n]


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------

def chat_messages(task: str, example: Example) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPTS[check_task(task)]},
            {"role": "user", "content": example.prompt}]


def prompt_text(tokenizer, task: str, example: Example) -> str:
    """The chat-template rendering, ending with the opened assistant turn."""
    messages = chat_messages(task, example)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:                          # templates without a system role (e.g. Gemma)
        if "system" not in str(e).lower():
            raise
        merged = [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}]
        return tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)


def build_prompt_ids(tokenizer, task: str, example: Example) -> list[int]:
    """Token ids of the prompt (system + user turn + opened assistant turn), no extra BOS/EOS:
    the chat template already writes every special token it wants."""
    return list(tokenizer(prompt_text(tokenizer, task, example), add_special_tokens=False)["input_ids"])


def task_prompts(task: str, tokenizer, split: str = "eval", n: int = 64, source: str = "standin",
                 path=None, seed: int = 0) -> list[list[int]]:
    """n prompt id lists, ready for generate / speculative_generate."""
    exs = load_examples(task, split, source=source, path=path, n=n, seed=seed, tokenizer=tokenizer)
    return [build_prompt_ids(tokenizer, task, e) for e in exs]


def main(argv=None):
    ap = argparse.ArgumentParser(description="Print a few examples of a task.")
    ap.add_argument("--task", default="gsm8k", choices=TASKS)
    ap.add_argument("--split", default="eval", choices=SPLITS)
    ap.add_argument("--source", default="standin", choices=SOURCES)
    ap.add_argument("--path", default=None)
    ap.add_argument("-n", type=int, default=3)
    args = ap.parse_args(argv)
    for e in load_examples(args.task, args.split, source=args.source, path=args.path, n=args.n):
        print(f"--- prompt:\n{e.prompt}\n--- reference:\n{e.reference}\n")


if __name__ == "__main__":
    main()
