"""Tasks, prompts and data: GSM8k (low teacher entropy), CNN/DailyMail and DialogSum (high teacher entropy).

The study asks how the teacher's next-token entropy H(p) (p = target/teacher, q = draft/student)
changes which divergence distils the best draft. Two tasks sit at the two ends:

- ``gsm8k``: math word problems. Given the question, the worked solution is nearly determined,
  so the teacher is confident: H(p) is low at most positions.
- ``cnndm``: news summarisation. Many summaries are equally good (which facts, in which order,
  in which words), so the teacher spreads its mass: H(p) is high at many positions.
- ``dialogsum``: summaries of everyday spoken dialogues (DialogSum, Chen et al. 2021), the same kind
  of open-ended task as ``cnndm``, and the real one this project can ship: its files are vendored in
  data/dialogsum/ (CC BY-NC-SA 4.0; data/dialogsum/README.md), where CNN/DM must be brought by the user.

Every example is an ``Example(prompt, reference)``: ``prompt`` is the user turn (the question /
the article), ``reference`` the dataset's answer (GSM8k ``answer`` with its ``<<a*b=c>>``
calculator notes and final ``#### N``; CNN/DM ``highlights``; DialogSum ``summary``). On-policy distillation never trains
on the reference; the tiny offline teacher (models.py) does, to learn the task.

Sources (``load_examples(..., source=...)``):

- ``"standin"`` (default, offline): generated here, deterministically from a seed, with the same
  entropy contrast. GSM8k-like: multi-step arithmetic word problems whose worked solution is a
  fixed function of the question (one right wording, one right answer). CNN/DM-like: short
  "articles" of facts whose reference summary picks 2-3 facts, orders them at random and words
  each one in one of several equivalent ways (many right answers). DialogSum-like: the same facts
  told in a two-person conversation, summarised the same way. An example belongs to the
  eval split iff a hash of its prompt says so, so train and eval can never share a prompt.
- ``"file"``: local files in the datasets' own columns: ``.jsonl`` (a UTF-8 BOM is fine), ``.json``
  (JSON lines or one array of objects) or ``.parquet``. A file path is read as given (for either
  split). A folder is read split by split (``data_files``): train <- ``train.*``, eval <- ``test.*``
  (CNN/DM: ``validation.*`` when there is no test file), each one whole file or the hub's complete
  shard set ``test-00000-of-0000n.parquet``. Other configurations are never merged in: GSM8k's
  ``test_socratic.jsonl`` beside ``test.jsonl`` is left out (a folder with only the socratic file is
  refused), and of the hub's config folders (gsm8k ``main/`` + ``socratic/``, cnn_dailymail
  ``3.0.0/``) the task's main one is read.
- ``"hub"``: the real datasets through the optional ``datasets`` package and the network.

``resolve_source`` is the one rule behind every script's ``--source`` / ``--data-path``.
Strict rows (``row_example``): every row must be an object whose task columns (GSM8k ``question``,
``answer`` ending in ``#### <number>``; CNN/DM ``article``, ``highlights``; DialogSum ``dialogue``,
``summary``) are non-empty strings;
anything else raises ``DataError`` (a ValueError) naming the file, the 1-based line / item / row,
the column and the problem, before any model is loaded. Zero rows is an error too.

Prompts are the seed's: a system prompt (``SYSTEM_PROMPTS``, the one place the text lives) and the
user turn, rendered by the tokenizer's own chat template with the assistant turn opened
(``add_generation_prompt=True``). One length filter (``length_filter``): CNN/DM articles (and
DialogSum dialogues) longer than 512 tokens of the run's teacher's tokenizer are left out, as in the
seed, in training, evaluation and the report alike, and the kept/dropped counts are printed.

Training batches (distill.py's sample phase): ``build_batch`` lays out one row per sample as
[pad | prompt | completion | pad], prompts left-padded so that every completion starts at the same
column, the loss mask on the completion tokens only. Which prompts a step draws
(``step_prompt_indices``) and each prompt's sampling generator (``prompt_generator``) are pure
functions of (seed, step, position), so a resumed or multi-process run draws the same batches.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from plumbing import cli

TASKS = ("gsm8k", "cnndm", "dialogsum")
SUMMARY_TASKS = {"cnndm": "article", "dialogsum": "dialogue"}   # the user turn is a text to summarise (what
                                                                # it is called): the length filter applies
SPLITS = ("train", "eval")
SOURCES = ("standin", "file", "hub")

# The seed's system prompts, verbatim (dialogsum: the seed has none; its cnndm prompt with "article" read
# "dialogue"). The only place the prompt text lives.
SYSTEM_PROMPTS = {
    "gsm8k": "In math word problem given by the user, reason step by step and put your final answer within \\boxed{}.",
    "cnndm": "Write a very short summary for the user's article.",
    "dialogsum": "Write a very short summary for the user's dialogue.",
}

# The real datasets: hub id, config, the two columns (user turn, reference), split names.
HUB_DATASETS = {
    "gsm8k": {"id": "openai/gsm8k", "config": "main", "prompt": "question", "reference": "answer",
              "splits": {"train": "train", "eval": "test"}},
    "cnndm": {"id": "abisee/cnn_dailymail", "config": "3.0.0", "prompt": "article", "reference": "highlights",
              "splits": {"train": "train", "eval": "test"}},
    "dialogsum": {"id": "knkarthick/dialogsum", "config": None, "prompt": "dialogue", "reference": "summary",
                  "splits": {"train": "train", "eval": "test"}},
}
MAX_ARTICLE_TOKENS = 512           # the seed drops CNN/DM articles longer than this
STANDIN_SIZES = {"train": 2000, "eval": 200}   # default n for the generated stand-ins
EVAL_SHARE = 5                     # 1 in EVAL_SHARE generated prompts belongs to the eval split


@dataclass(frozen=True)
class Example:
    prompt: str      # the user turn: the question / the article
    reference: str   # the dataset's answer / highlights (never used by on-policy training)
    where: str = field(default="", compare=False)   # "<file>, line <n>" for read rows: named by later checks


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


_DIALOGUE = [   # the stand-in conversation: #Person1# asks, #Person2# tells the article's facts
    "Did you hear that the {group} of {city} voted on {day}?",
    "Yes, they are going to build a new {project}.",
    "How much will the {project} cost?",
    "About {cost} million dollars, I read.",
    "And when does the work start?",
    "In {month}. {title} {person} says it is good news for the town.",
    "Were many people at the meeting?",
    "About {crowd} residents came.",
]


def _dialogsum_standin(rng: random.Random) -> Example:
    facts, _ = cnndm_article(rng)
    lines = [f"#Person{i % 2 + 1}#: {line.format(**facts)}" for i, line in enumerate(_DIALOGUE)]
    return Example(prompt="\n".join(lines), reference=cnndm_summary(facts, rng))


_STANDIN = {"gsm8k": _gsm8k_standin, "cnndm": _cnndm_standin, "dialogsum": _dialogsum_standin}


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
# Naming the data: one rule for distill.py, evaluate.py and report.py
# --------------------------------------------------------------------------------------------

class DataError(ValueError):
    """A data file, folder or row that cannot be used. The message names the file, the 1-based
    line (JSONL), item (JSON array) or row (Parquet), the column and what is wrong."""


def resolve_source(source: str | None, data_path: str | None,
                   default: str | tuple | None = None) -> tuple[str, str | None]:
    """The one rule behind --source / --data-path (and Make's SOURCE= / DATA=) in every script:
    a path alone means source 'file'; source 'file' needs a path; a path with another source is an
    error (it would be ignored); neither -> the preset's default: a source ('standin' if it has none) or
    a (source, path) pair (models.preset_data: the smollm2 preset reads its vendored files).
    -> (source, path)."""
    if isinstance(default, tuple):
        if source is None and data_path is None:
            return default[0], default[1]
        default = default[0]
    if source is not None and source not in SOURCES:
        raise ValueError(f"unknown --source {source!r}; valid sources: {', '.join(SOURCES)}")
    if data_path is not None and str(data_path).strip() == "":
        raise DataError("--data-path is empty; give a data file or folder")
    if source is None:
        source = "file" if data_path is not None else (default or "standin")
    if source == "file" and data_path is None:
        raise DataError(f"--source file needs --data-path PATH (a .jsonl, .json or .parquet file, or a folder "
                        f"of them; see README.md, 'Data')")
    if source != "file" and data_path is not None:
        raise DataError(f"--data-path {str(data_path)!r} is only read with --source file, not --source {source}; "
                        f"drop --source (a path alone means file) or the path")
    return source, (None if data_path is None else str(data_path))


# --------------------------------------------------------------------------------------------
# Real data: local files (JSONL / JSON array / Parquet) or the hub
# --------------------------------------------------------------------------------------------

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
# File names each split is read from, in order of preference: CNN/DM's validation split stands in
# for the eval split when a folder has no test file (load_examples prints which one it read).
FILE_SPLITS = {"train": ("train",), "eval": ("test", "validation")}
_GSM8K_FINAL = re.compile(r"####\s*-?[\d,]*\.?\d")   # the final answer line '#### 1,234'


def _hub_name(task: str) -> str:
    """'openai/gsm8k (main)': the hub dataset and its configuration, where it has one."""
    d = HUB_DATASETS[task]
    return d["id"] + (f" ({d['config']})" if d["config"] else "")


def _get_instructions(task: str) -> str:
    d = HUB_DATASETS[task]
    where = f" (the Parquet files lie under {d['config']}/)" if d["config"] else ""
    return (f"download the {task} files once with network access, e.g. "
            f"`huggingface-cli download {d['id']} --repo-type dataset --local-dir data/{task}`"
            f"{where}, then pass --source file --data-path "
            f"data/{task} (a .jsonl, .json or .parquet file, or a folder of them) with columns "
            f"{d['prompt']!r} and {d['reference']!r}")


def _has_data(folder: Path) -> bool:
    return any(f.is_file() and f.suffix in DATA_SUFFIXES for f in folder.iterdir())


def _config_folder(path: Path, task: str) -> tuple[Path, str]:
    """The folder holding the split files: `path` itself when it holds data files, else its subfolder of
    the task's main configuration (the hub's gsm8k main/ beside socratic/, cnn_dailymail 3.0.0/), else
    its only subfolder with data files. Never two configurations. -> (folder, note)"""
    if _has_data(path):
        return path, ""
    subs = sorted(d for d in path.iterdir() if d.is_dir() and _has_data(d))
    config = HUB_DATASETS[task]["config"]
    if any(d.name == config for d in subs):
        others = [d.name + "/" for d in subs if d.name != config]
        left_out = f"; left out {', '.join(others)}" if others else ""
        return path / config, f"the {config}/ configuration{left_out}"
    if len(subs) == 1:
        return subs[0], f"the only data folder, {subs[0].name}/"
    if not subs:
        raise DataError(f"no .jsonl, .json or .parquet files in {str(path)!r} or its subfolders; "
                        f"{_get_instructions(task)}")
    raise DataError(f"{str(path)!r} holds several configurations ({', '.join(d.name + '/' for d in subs)})"
                    + (f" and no {config}/ folder" if config else "")
                    + "; pass the folder of the one you mean as --data-path")


def _split_files(folder: Path, name: str) -> tuple[list[Path], list[Path]]:
    """(files of split `name`, other files starting with it). A split is one file `<name>.jsonl|.json|.parquet`
    or the hub's shards `<name>-00000-of-00003.parquet`; `test_socratic.jsonl` is another configuration."""
    files, others = [], []
    for f in sorted(folder.iterdir()):
        if not (f.is_file() and f.suffix in DATA_SUFFIXES and f.name.startswith(name)):
            continue
        (files if re.fullmatch(rf"{re.escape(name)}(-\d+-of-\d+)?", f.stem) else others).append(f)
    whole = [f for f in files if f.stem == name]
    if len(whole) > 1 or (whole and len(files) > len(whole)):
        raise DataError(f"{str(folder)!r} holds the {name} split twice ({', '.join(f.name for f in files)}); "
                        f"pass the one file you mean as --data-path")
    if files and not whole:                         # shards: all n of them, or a clear error
        n = {int(f.stem.rsplit("-of-", 1)[1]) for f in files}
        if len(n) != 1 or len(files) != n.pop():
            raise DataError(f"{str(folder)!r}: the {name} shards {', '.join(f.name for f in files)} are not one "
                            f"complete set (x-of-n); a download was interrupted?")
    return files, others


def data_files(path, task: str, split: str) -> tuple[list[Path], str]:
    """The files one split is read from, and a note saying which (for the printed summary). A file path is
    read as given; a folder is read as README.md's 'Data' section says."""
    path = Path(path)
    if path.is_file():
        return [path], str(path)
    if not path.exists():
        raise DataError(f"no data file or folder at {str(path)!r}; {_get_instructions(task)}")
    folder, note = _config_folder(path, task)
    names = FILE_SPLITS[split]
    for name in names:
        files, others = _split_files(folder, name)
        if files:
            what = ", ".join(str(f) for f in files)
            if name != names[0]:
                what += f" (no {names[0]} file: the {name} split is the {split} split)"
            if note:
                what += f" ({note})"
            if others:
                what += f" (left out {', '.join(f.name for f in others)}: another configuration)"
            return files, what
        if others:
            raise DataError(f"{str(folder)!r} has no {name} file of the main configuration, only "
                            f"{', '.join(f.name for f in others)} (another configuration, never read without "
                            f"asking); pass that file itself as --data-path to use it")
    raise DataError(f"no {' or '.join(names)} file for the {split} split in {str(folder)!r} "
                    f"(looked for {names[0]}.jsonl, {names[0]}.json, {names[0]}.parquet or "
                    f"{names[0]}-*-of-*.parquet); {_get_instructions(task)}")


def _columns(task: str) -> tuple[str, str]:
    d = HUB_DATASETS[task]
    return d["prompt"], d["reference"]


def read_rows(file: Path, task: str) -> list[tuple[str, object]]:
    """(where, row) for every row of one file; `where` is 'FILE, line N' (JSONL), 'FILE, item N' (a JSON
    array) or 'FILE, row N' (Parquet), 1-based. JSONL may start with a UTF-8 BOM; blank lines are not rows."""
    file = Path(file)
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq               # installed with datasets / pandas
        try:
            table = pq.read_table(file)
        except Exception as e:                      # not Parquet, truncated, ...
            raise DataError(f"{file}: not a readable Parquet file ({e})") from e
        missing = [c for c in _columns(task) if c not in table.column_names]
        if missing:
            raise DataError(f"{file}: no column {', '.join(map(repr, missing))} (it has {table.column_names}); "
                            f"{task} rows need {' and '.join(map(repr, _columns(task)))}")
        rows = table.select(list(_columns(task))).to_pylist()
        return [(f"{file}, row {i}", r) for i, r in enumerate(rows, 1)]
    if file.suffix not in (".jsonl", ".json"):
        raise DataError(f"unsupported data file {str(file)!r}; use .jsonl, .json (JSON lines or one array) "
                        f"or .parquet")
    raw = file.read_bytes()
    if not raw:
        raise DataError(f"{file}: the file is empty")
    try:
        text = raw.decode("utf-8-sig")              # utf-8-sig: a leading BOM is dropped, not part of line 1
    except UnicodeDecodeError as e:
        raise DataError(f"{file}: not UTF-8 text ({e})") from e
    if not text.strip():
        raise DataError(f"{file}: the file is blank (only whitespace), no rows")
    if file.suffix == ".json" and text.lstrip().startswith("["):   # one JSON array of row objects
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{file}, line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from e
        return [(f"{file}, item {i}", r) for i, r in enumerate(items, 1)]
    rows = []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit inside a JSON string
        if not line.strip():
            continue
        try:
            rows.append((f"{file}, line {n}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{file}, line {n}: invalid JSON ({e.msg} at column {e.colno}); "
                            f"a truncated or broken line?") from e
    return rows


def row_example(task: str, row, where: str) -> Example:
    """One row -> Example, or a DataError naming `where`, the column and the problem: the row must be an
    object whose two task columns are non-empty strings (GSM8k's answer ends in '#### <number>')."""
    cols = _columns(task)
    if not isinstance(row, dict):
        raise DataError(f"{where}: the row is a JSON {type(row).__name__}, not an object with "
                        f"{' and '.join(map(repr, cols))}")
    values = []
    for col in cols:
        if col not in row:
            raise DataError(f"{where}: no column {col!r} (the row has {sorted(row)}); "
                            f"{task} rows need {' and '.join(map(repr, cols))}")
        v = row[col]
        if v is None:
            raise DataError(f"{where}: column {col!r} is null")
        if not isinstance(v, str):
            raise DataError(f"{where}: column {col!r} is a {type(v).__name__} ({str(v)[:40]!r}), not a string")
        if not v.strip():
            raise DataError(f"{where}: column {col!r} is blank")
        try:                        # JSON's "\ud800" escape decodes to a lone surrogate, which no tokenizer encodes
            v.encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(f"{where}: column {col!r} holds a lone surrogate {v[e.start]!r} at character {e.start + 1} "
                            f"(a \\ud800-\\udfff escape without its pair), which is not text; fix or drop the "
                            f"row") from None
        values.append(v.strip())
    if task == "gsm8k" and not _GSM8K_FINAL.search(values[1]):
        raise DataError(f"{where}: column 'answer' has no final answer line '#### <number>'")
    return Example(prompt=values[0], reference=values[1], where=where)


def file_examples(task: str, split: str, path, *, verbose: bool = False) -> list[Example]:
    """Every row of the split's local files, each checked (row_example); zero rows is an error."""
    files, what = data_files(path, task, split)
    exs = [row_example(task, row, where) for f in files for where, row in read_rows(f, task)]
    if not exs:
        raise DataError(f"{what}: no rows")
    if verbose:
        print(f"[data] {task} {split}: {len(exs)} rows from {what}", flush=True)
    return exs


def hub_examples(task: str, split: str) -> list[Example]:
    """The real dataset from the hub (needs the optional `datasets` package and the network)."""
    d = HUB_DATASETS[task]
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise RuntimeError(f"--source hub reads {_hub_name(task)} from the Hugging Face "
                           f"hub, which cannot be reached: HF_HUB_OFFLINE is set (offline). Use "
                           f"--source standin (generated stand-in prompts), or local files: "
                           f"{_get_instructions(task)}")
    try:
        import datasets
    except ImportError as e:
        raise RuntimeError(f"source='hub' needs `pip install datasets`; or {_get_instructions(task)}") from e
    try:
        ds = datasets.load_dataset(d["id"], d["config"], split=d["splits"][split])
    except Exception as e:                          # offline, no cache, hub down ...
        raise RuntimeError(f"could not load {_hub_name(task)} from the hub: {e}; "
                           f"{_get_instructions(task)}") from e
    return [row_example(task, row, f"{_hub_name(task)}, {d['splits'][split]} split, row {i}")
            for i, row in enumerate(ds, 1)]


# --------------------------------------------------------------------------------------------
# The one length filter
# --------------------------------------------------------------------------------------------

def article_tokens(examples, tokenizer, chunk: int = 1000) -> list[int]:
    """Tokens of each article (the user turn alone, no special tokens), counted with `tokenizer`, `chunk`
    articles per call: one call over CNN/DM's 287k training articles would hold all their ids at once
    (~140 bytes a token, tens of GB)."""
    return [len(ids) for i in range(0, len(examples), chunk)
            for ids in tokenizer([e.prompt for e in examples[i:i + chunk]], add_special_tokens=False)["input_ids"]]


def length_filter(task: str, examples: list[Example], tokenizer,
                  max_tokens: int | None = MAX_ARTICLE_TOKENS) -> tuple[list[Example], int]:
    """(kept, number dropped): CNN/DM articles (DialogSum dialogues) over max_tokens tokens of the teacher's tokenizer are left
    out, as in the seed; training, evaluation and the report all call this with the teacher's tokenizer,
    so they keep the same rows. max_tokens=None keeps everything (only for building tokenizers)."""
    if task not in SUMMARY_TASKS or max_tokens is None:
        return examples, 0
    if tokenizer is None:
        raise ValueError(f"the {task} length filter counts tokens of the run's teacher: pass tokenizer=... "
                         "(or max_article_tokens=None to keep every article)")
    # a huge article is found on a prefix (over_tokens), not tokenized whole; the rest are counted in chunks
    short = [e for e in examples if not over_tokens(tokenizer, e.prompt, max_tokens)]
    kept = [e for e, n in zip(short, article_tokens(short, tokenizer)) if n <= max_tokens]
    return kept, len(examples) - len(kept)


def load_examples(task: str, split: str, *, source: str = "standin", path=None, n: int | None = None,
                  seed: int = 0, tokenizer=None, max_article_tokens: int | None = MAX_ARTICLE_TOKENS,
                  verbose: bool = False) -> list[Example]:
    """The first n examples of a split (all when n is None; stand-ins default to STANDIN_SIZES), every
    row checked. CNN/DM articles over max_article_tokens tokens of `tokenizer` (the teacher's; required
    for cnndm unless max_article_tokens is None) are left out first and counted; verbose prints the
    files read and the kept/dropped counts."""
    check_task(task), check_split(split)
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; valid sources: {', '.join(SOURCES)}")
    if source != "file" and path is not None:
        raise DataError(f"path={str(path)!r} is only read with source='file', not source={source!r}")
    if source == "standin":
        exs = standin_examples(task, split, n=n, seed=seed)
        if verbose:
            print(f"[data] {task} {split}: {len(exs)} generated stand-in examples (seed {seed})", flush=True)
    elif source == "file":
        if path is None:
            raise DataError(f"source='file' needs a path; {_get_instructions(task)}")
        exs = file_examples(task, split, path, verbose=verbose)
    else:
        exs = hub_examples(task, split)
        if verbose:
            print(f"[data] {task} {split}: {len(exs)} rows from {HUB_DATASETS[task]['id']}", flush=True)
    kept, dropped = length_filter(task, exs, tokenizer, max_article_tokens)
    if verbose and task in SUMMARY_TASKS and max_article_tokens is not None:
        print(f"[data] {task} {split}: kept {len(kept)} of {len(exs)} {SUMMARY_TASKS[task]}s, dropped {dropped} longer than "
              f"{max_article_tokens} tokens (the teacher's tokenizer)", flush=True)
    if not kept:
        raise DataError(f"{task} {split}: every one of the {len(exs)} {SUMMARY_TASKS.get(task, 'prompt')}s is longer than "
                        f"{max_article_tokens} tokens; nothing left to use")
    return kept if n is None else kept[:n]


# --------------------------------------------------------------------------------------------
# Validation: train-split prompts that training never sees
# --------------------------------------------------------------------------------------------

VAL_SEED = 10_000                  # the stand-in stream validation prompts are drawn from
VAL_POOL = STANDIN_SIZES["train"]  # the stand-in's validation prompts: the first VAL_POOL of that stream


def unused_standins(task: str, n: int, used_prompts) -> list[Example]:
    """The first n of the stand-in's validation pool (the first VAL_POOL train-split stand-ins of the stream
    of seed VAL_SEED) whose prompt is not in used_prompts. The pool is finite so that asking for more than
    it holds is refused at once, saying how many there are (--eval-prompts 100000 decoded for minutes)."""
    used = set(used_prompts)
    free = [e for e in standin_examples(task, "train", n=VAL_POOL, seed=VAL_SEED) if e.prompt not in used]
    if len(free) < n:
        raise DataError(f"{n} validation prompts asked, but the {task} stand-in has {len(free)}: its {VAL_POOL} "
                        f"validation prompts less the {VAL_POOL - len(free)} that training uses too; ask for at "
                        f"most {len(free)}")
    return free[:n]


def held_out_split(task: str, n_train: int | None, n_val: int, *, source: str = "standin", path=None,
                   seed: int = 0, tokenizer=None, verbose: bool = False) -> tuple[list[Example], list[Example]]:
    """(training examples, n_val validation examples), both from the TRAIN split and disjoint, the validation
    ones also disjoint from the eval split that evaluate.py scores (checked: check_held_out).
    Stand-ins: training = load_examples(train, n_train, seed) (the same as without validation), validation =
    unused_standins. A file or the hub: validation = the LAST n_val train rows, training = the first
    min(n_train, rows - n_val) rows before them (said when that is fewer than asked)."""
    if source == "standin":
        train = load_examples(task, "train", source=source, n=n_train, seed=seed, tokenizer=tokenizer,
                              verbose=verbose)
        val = unused_standins(task, n_val, (e.prompt for e in train))
    else:
        rows = load_examples(task, "train", source=source, path=path, seed=seed, tokenizer=tokenizer,
                             verbose=verbose)
        if len(rows) <= n_val:
            raise DataError(f"{n_val} validation prompts asked, but the {task} train split has {len(rows)} rows, "
                            f"too few to hold out {n_val} and train on the rest; ask for at most {len(rows) - 1}")
        n = len(rows) - n_val if n_train is None else min(n_train, len(rows) - n_val)
        if verbose or (n_train is not None and n < n_train):
            print(f"[data] {task}: the last {n_val} train rows are the validation prompts; training on the "
                  f"first {n}" + (f" (not {n_train})" if n_train is not None and n < n_train else ""), flush=True)
        train, val = rows[:n], rows[-n_val:]
    check_held_out(task, train, val, source=source, path=path, tokenizer=tokenizer)
    return train, val


def check_held_out(task: str, train: list[Example], val: list[Example], *, source: str = "standin", path=None,
                   tokenizer=None):
    """Raise DataError unless no validation prompt is a training prompt or a prompt of the eval split (the
    stand-ins' split is the prompt hash, so membership is checked by it; files / the hub: the eval split's
    rows are read)."""
    train_prompts = {e.prompt for e in train}
    if any(e.prompt in train_prompts for e in val):
        raise DataError(f"{task}: a validation prompt is also a training prompt (the data repeats a row)")
    if source == "standin":
        in_eval = [e for e in val if _split_of(e.prompt) == "eval"]
    else:
        eval_prompts = {e.prompt for e in load_examples(task, "eval", source=source, path=path, tokenizer=tokenizer)}
        in_eval = [e for e in val if e.prompt in eval_prompts]
    if in_eval:
        raise DataError(f"{task}: {len(in_eval)} validation prompt(s) are in the eval split too (the train and "
                        f"eval files share rows), e.g. {in_eval[0].prompt[:60]!r}")


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)                     # once per tokenizer: over_tokens runs once per row
def longest_token_chars(tokenizer) -> int:
    """The most characters any token of the vocabulary is written with (byte-level BPE: one per byte, so never
    fewer than the characters of text it stands for)."""
    return max(map(len, tokenizer.get_vocab()), default=1)


def prefix_over_tokens(tokenizer, text: str, limit: int) -> tuple[int, int] | None:
    """(tokens, characters) of a prefix of `text` that holds more than `limit` tokens, found without
    tokenizing the whole text: a text of more than (limit + 1) x longest_token_chars characters is cut there
    and the cut is counted. Tokenizing a 50 MB row whole took minutes and 12 GB before its length was refused.
    None: not settled this way (short enough to be counted whole, or a normalizer that shrinks the text)."""
    cut = (limit + 1) * longest_token_chars(tokenizer)
    if len(text) <= cut:
        return None
    n = len(tokenizer(text[:cut], add_special_tokens=False)["input_ids"])
    return (n, cut) if n > limit else None


def over_tokens(tokenizer, text: str, limit: int) -> bool:
    """True when prefix_over_tokens settles that `text` has more than `limit` tokens."""
    return prefix_over_tokens(tokenizer, text, limit) is not None


def check_prompt_chars(tokenizer, task: str, examples: list[Example], context: int | None, max_new_tokens: int = 0):
    """check_prompt_lengths before the prompts are tokenized: a prompt (chat template included) that over_tokens
    finds longer than the context leaves for it is refused at once, naming the row, without tokenizing it whole."""
    if context is None:
        return
    room = context - max_new_tokens
    for i, ex in enumerate(examples):
        text = prompt_text(tokenizer, task, ex)
        found = prefix_over_tokens(tokenizer, text, room)
        if found:
            raise DataError(f"{ex.where or f'prompt {i + 1}'}: the prompt has {found[0]} tokens in its first "
                            f"{found[1]} of {len(text)} characters (chat template included); with --max-new-tokens "
                            f"{max_new_tokens} that exceeds the models' context of {context} positions "
                            f"(max_position_embeddings); shorten or drop the row, or lower --max-new-tokens")


def check_prompt_lengths(prompts: list[list[int]], examples: list[Example], context: int | None,
                         max_new_tokens: int = 0):
    """Every prompt (chat template included) + max_new_tokens must fit the models' context (None: no limit
    known), or generation would fail in the middle of the work: DataError naming the row and the numbers."""
    if context is None:
        return
    for i, (ids, ex) in enumerate(zip(prompts, examples)):
        if len(ids) + max_new_tokens > context:
            raise DataError(f"{ex.where or f'prompt {i + 1}'}: the prompt has {len(ids)} tokens (chat template "
                            f"included); with --max-new-tokens {max_new_tokens} that exceeds the models' context "
                            f"of {context} positions (max_position_embeddings); shorten or drop the row, or lower "
                            f"--max-new-tokens")


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
                 path=None, seed: int = 0, verbose: bool = False) -> list[list[int]]:
    """n prompt id lists, ready for generate / speculative_generate (CNN/DM filtered with `tokenizer`)."""
    exs = load_examples(task, split, source=source, path=path, n=n, seed=seed, tokenizer=tokenizer,
                        verbose=verbose)
    return [build_prompt_ids(tokenizer, task, e) for e in exs]


# --------------------------------------------------------------------------------------------
# Training batches: left-padded prompt | completion (distill.py's sample phase)
# --------------------------------------------------------------------------------------------

def step_prompt_indices(step: int, batch_size: int, n_prompts: int, seed: int) -> list[int]:
    """The global batch of prompt indices for an optimizer step: consecutive slices of one seeded
    permutation per epoch. A pure function of the step, so a resumed run sees the same batches."""
    out = []
    start = step * batch_size
    for k in range(start, start + batch_size):
        epoch, i = divmod(k, n_prompts)
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        perm = torch.randperm(n_prompts, generator=gen)
        out.append(int(perm[i]))
    return out


def prompt_generator(seed: int, step: int, position: int, device) -> torch.Generator:
    """The sampling RNG of one prompt: (run seed, step, the prompt's position in the step's global
    batch). Reproducible across --resume without replaying, and the same whichever rank and
    micro-batch sample it."""
    key = ((seed * 1_000_003 + step) * 1009 + position) % 2**63
    return torch.Generator(device=device).manual_seed(key)


def cut_at_stop(tokens: list[int], stop_ids, max_new_tokens: int) -> list[int]:
    """Keep tokens up to and including the first stop id, and at most max_new_tokens of them."""
    tokens = list(tokens)[:max_new_tokens]
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[: i + 1]
    return tokens


def build_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict:
    """One row per sample: [pad ... pad | prompt | completion | pad ... pad].

    Prompts are left-padded to width P and completions right-padded to width C, so every completion
    starts at column P. loss_mask is True exactly on the completion tokens (the stop token included,
    nothing after it); position_ids count real tokens only, so padding never shifts a row.
    """
    B = len(prompts)
    P = max(len(p) for p in prompts)
    C = max(1, max(len(c) for c in completions))
    input_ids = torch.full((B, P + C), pad_id, dtype=torch.long)   # (B, P + C)
    attention_mask = torch.zeros((B, P + C), dtype=torch.long)
    loss_mask = torch.zeros((B, P + C), dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[i, P - len(p): P] = torch.tensor(p, dtype=torch.long)
        attention_mask[i, P - len(p): P + len(c)] = 1
        if c:
            input_ids[i, P: P + len(c)] = torch.tensor(c, dtype=torch.long)
            loss_mask[i, P: P + len(c)] = True
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    return dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                loss_mask=loss_mask, prompt_width=P)


DEGENERATE_REPETITION = 0.5      # above this share of repeated 4-grams, on-policy samples are loops


def repeated_ngrams(tokens: list[int], n: int = 4) -> tuple[int, int]:
    """(n-grams that already occurred earlier in the same completion, all n-grams): a completion
    stuck in a loop (" ( ( (") repeats nearly every n-gram; fluent text almost none."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) - len(set(grams)), len(grams)


def sample_health(completions: list[list[int]], stop_ids) -> torch.Tensor:
    """(completions that stopped, completions, repeated 4-grams, 4-grams) of a micro-batch's
    samples, summed: the loop logs sample_stop_rate and sample_repetition from them and warns when
    the student's samples degenerate (a draft far from its target loops and never stops, and the
    teacher, which predicts the loop too, then agrees with it: train_alpha rises while the real
    acceptance does not)."""
    stops = set(stop_ids)
    stopped = sum(bool(c) and c[-1] in stops for c in completions)
    counts = [repeated_ngrams(c) for c in completions]            # (repeated, all) per completion
    repeated, grams = map(sum, zip(*counts)) if counts else (0, 0)
    return torch.tensor([stopped, len(completions), repeated, grams], dtype=torch.float64)


def main(argv=None):
    """Check a task's data: every row, CNN/DM's length filter (with --tokenizer), and with a model folder as
    --tokenizer (or --context) every prompt + --max-new-tokens against the model's context. Bad input is one
    `error:` line, exit 2 (plumbing/cli.py)."""
    ap = cli.ArgumentParser(description="Check a task's data and print a few examples.")
    ap.add_argument("--task", default="gsm8k", choices=TASKS)
    ap.add_argument("--split", default="eval", choices=SPLITS)
    ap.add_argument("--source", default=None, choices=SOURCES,
                    help="default: file with --data-path, else standin")
    ap.add_argument("--data-path", default=None, help="a .jsonl/.json/.parquet file or a folder (README: Data)")
    ap.add_argument("--tokenizer", default=None,
                    help="the teacher's tokenizer (path), for the CNN/DM length filter and the prompt lengths")
    ap.add_argument("--context", type=int, default=None, help="the models' context in tokens (default: "
                    "max_position_embeddings of the --tokenizer folder's config.json, if it has one)")
    ap.add_argument("--max-new-tokens", type=int, default=0,
                    help="tokens each prompt must leave room for within the context (default %(default)s)")
    ap.add_argument("-n", type=int, default=3)
    with cli.before_the_work():
        args = ap.parse_args(argv)
        source, path = resolve_source(args.source, args.data_path)
        tok, context = None, args.context
        if args.tokenizer is not None:
            from transformers import AutoConfig, AutoTokenizer
            tok = AutoTokenizer.from_pretrained(args.tokenizer)
            if context is None and (Path(args.tokenizer) / "config.json").exists():
                context = AutoConfig.from_pretrained(args.tokenizer).max_position_embeddings
        exs = load_examples(args.task, args.split, source=source, path=path, tokenizer=tok, verbose=True,
                            max_article_tokens=MAX_ARTICLE_TOKENS if tok is not None else None)
        if tok is not None and context is not None:
            check_prompt_chars(tok, args.task, exs, context, args.max_new_tokens)   # before tokenizing a huge row
            prompts = [build_prompt_ids(tok, args.task, e) for e in exs]
            check_prompt_lengths(prompts, exs, context, args.max_new_tokens)
            print(f"[data] {args.task} {args.split}: the longest prompt has {max(map(len, prompts))} tokens, "
                  f"within the context of {context} (with {args.max_new_tokens} new tokens)", flush=True)
    for e in exs[:args.n]:
        print(f"--- prompt:\n{e.prompt}\n--- reference:\n{e.reference}\n")


if __name__ == "__main__":
    cli.script_main(main)
