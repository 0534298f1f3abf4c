"""Spec-Bench (Xia et al., ACL 2024 Findings) on our target and drafts, written in Spec-Bench's own format.

Notation: p = the target (SmolLM2-135M-Instruct for the smollm2 preset), q = a draft (the preset's early-exit
baseline draft, or a draft distilled by distill.py, runs/<preset>/<task>/<run>/final).

The benchmark: 480 questions (data/spec_bench/question.jsonl, copied from hemingkx/Spec-Bench), 13 categories in
the leaderboard's 6 columns: Multi-turn Conversation (MT-bench's 8 categories x 10 questions, 2 user turns each),
Translation, Summarization, Question Answering, Mathematical Reasoning (GSM8k), Retrieval-aug. Generation (80 each).
Every turn goes through the target's own chat template; MT-bench's second turn is conditioned on the method's OWN
first answer (as Spec-Bench's fastchat loop does: the answer text is put back into the conversation). Greedy
(temperature 0) at batch 1, as Spec-Bench; --temperature / --top-p give a sampled protocol beside it.

Methods (one answer file each, per repeat):
  vanilla      the target alone, token by token (specdec.autoregressive_generate): the speed baseline
  sps          Hugging Face assisted generation, target.generate(assistant_model=baseline draft), gamma drafts
               per round (constant schedule): the leaderboard's "SpS" row
  specdec-X    our exact speculative decoding (specdec.speculative_generate) with draft X: the baseline draft
               ("specdec-baseline") and every distilled draft ("specdec-<run>")

Answer file (Spec-Bench's format, JSON lines, one per question, sorted by question_id):
  question_id, category, answer_id (a uuid5 hex of model_id, question_id and tstamp), model_id
  ("<preset>-<method>-float32-temp-<T>"), tstamp (unix seconds the journal recorded the answer at: a rewrite of
  the files from the journal gives the same bytes), choices: [{index: 0, turns: [answer text per turn],
  decoding_steps: [target forwards per turn], new_tokens: [generated tokens per turn, the stop token included],
  wall_time: [seconds per turn],
  accept_lengths: [for every target forward of every turn, the tokens it produced = accepted drafts + 1]}]
  (vanilla: every accept length is 1). Written under <results>/<preset>/specbench/run_<r>/<model_id>.jsonl, the
  layout of Spec-Bench's own mean-of-3-runs report. Spec-Bench's tools read them: evaluation/speed.py and
  evaluation/equal.py. Measured exactly: for our decoders from specdec's stats (per-row accept_lengths); for HF
  assisted generation by a forward hook on the target (one entry per target forward) and a stopping criterion
  that sees the sequence after every round (the tokens that round added): both must agree, or the run stops.

Spec-Bench's numbers from answer files (`spec_bench_speed`, as evaluation/speed.py computes them):
  speed of a question        s = sum_turns new_tokens / sum_turns wall_time
  tokens/s of a method       mean over the questions of s
  speedup                    tokens/s of the method / tokens/s of vanilla (same questions, same repeat)
  #Mean accepted tokens      mean of every accept_lengths entry (= tokens per target forward)
(speed.py re-counts the baseline's tokens by re-tokenizing its answer text, len(ids) - 1 per turn, the -1 for
Vicuna's BOS; we use the baseline's recorded new_tokens, the exact count; the two differ by the stop token and
the re-tokenization.) Repeats: the leaderboard reports the mean of 3 runs; we report that mean and flag runs whose
overall speedups spread more than evaluate.SPEEDUP_TOLERANCE (evaluate.repeat_summary), as `make eval` does.
The methods alternate question by question (the order rotating), so load from other jobs hits each alike.

Beside the leaderboard numbers (results/SPECBENCH.md):
  H(p)               the target's entropy -sum_x p(x) log p(x) (nats), p = softmax(logits / T) (T = 1 when greedy:
                     greedy's processed p is one-hot, H = 0) along its own vanilla answer, averaged per question,
                     then over questions with a 95% bootstrap interval (evaluate.bootstrap_ci)
  token acceptance   accepted drafts / drafted tokens per question (all turns, all repeats), mean over questions
                     with a 95% bootstrap interval; distilled drafts vs the baseline draft and vs sps as paired
                     differences (evaluate.paired_gain)
  equality           answers whose turns equal vanilla's (greedy: exact methods must reproduce it); every mismatch
                     explained by the target's logit gap between the two tokens where the answers first part (a
                     float32 near-tie when tiny: a block verification rounds differently from a one-token step)
  batched            our decoder at batch 16 over every turn (second turns conditioned on vanilla's first answer),
                     the prompts sorted by length into chunks of 16
                     vs the target alone at batch 16, the two alternated chunk by chunk (no leaderboard method
                     runs batched; HF assisted generation is batch 1 only)

Over several sessions (a full run takes ~15 h on 2 busy CPU cores, docs/benchmarks.md): the journal,
<results>/<preset>/specbench/journal.jsonl, gets one JSON line per finished item, appended, flushed and fsynced as
soon as it is done: every (repeat, method, question) with its turns' Turn fields (tokens, prompt, accept lengths,
drafted / accepted, wall time) and every (repeat, chunk, method) of the batched table. Its first line holds a
fingerprint of everything the records depend on: the selected questions, the sha256 of the target's and each
draft's files, the decoding settings (gamma, temperature, top-p, top-k, max_new_tokens, the preset's stop tokens:
with the target's tokenizer and generation config they fix the stop ids), repeats, batch size, seed, threads and torch's
and transformers' versions. The decoding code (specdec.py and plumbing/, study/specbench.py, models.py) is recorded per session
instead: a commit that changes it mid-run is continued with a warning and the report counts the versions. A rerun with the same settings continues it: what the journal holds is read back, the rest
runs in the same order, and the answer files and the report are written from the journal, the same records as an
uninterrupted run (wall times aside; the report's run time sums the sessions). A journal of other settings is
refused in one line naming what changed, before any model loads (a draft distilled after the run began is
added instead: its method's answers are decoded from then on, the journal records it; so is a raised --repeats:
`--repeats 1` gives a first whole report, `--repeats 3` later adds runs 2 and 3); --fresh starts over (it deletes the journal and
the answer files specbench wrote, nothing else). A last line cut off mid-write (kill -9) is dropped with a warning
and its item redone. Ctrl-C / SIGTERM: one line with the command that continues. Progress lines count the items
done and read back, with an ETA at the rate measured in this session. One run at a time per results folder (a lock).

Run:  python -m study.specbench [--quick] [--preset smollm2] [--max-new-tokens 64] [--repeats 3] [--threads 1] [--fresh]
      make specbench [QUICK=1] [ARGS=--fresh]
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shlex
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from plumbing import cli
import data
import entropy
from study import evaluate
import models
from study import report
from plumbing import rundir
import specdec

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = REPO / "data" / "spec_bench" / "question.jsonl"
MT_BENCH = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
CATEGORIES = MT_BENCH + ("translation", "summarization", "qa", "math_reasoning", "rag")
SUBTASKS = {   # the leaderboard's columns, in its order -> the categories each pools (speed.py's task names)
    "Multi-turn Conversation": MT_BENCH, "Translation": ("translation",), "Summarization": ("summarization",),
    "Question Answering": ("qa",), "Mathematical Reasoning": ("math_reasoning",),
    "Retrieval-aug. Generation": ("rag",), "Overall": CATEGORIES,
}
DEFAULT_MAX_NEW_TOKENS = 64     # Spec-Bench uses 1024; at ~15 tokens/s of the 135M target on one CPU thread a full
                                # run of 560 turns x 4 methods x 3 repeats at 1024 would take days (see --help)
NEAR_TIE = 1e-3                 # a logit gap below this between two tokens is a float32 near-tie
HEADING = "# Spec-Bench on the"  # the report's first line: a --report file without it is not ours


# ----------------------------------------------------------------------------- configuration

@dataclass
class Config:
    """Everything a run depends on (the command line, or QUICK's values, fills it)."""
    preset: str = "smollm2"
    task: str = "gsm8k"                         # whose distilled drafts are benchmarked: runs/<preset>/<task>/*/final
    questions: str = str(QUESTIONS)
    per_category: int | None = None             # the first N questions of each category (None: all)
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0                    # 0: greedy, Spec-Bench's protocol
    top_p: float = 1.0
    gamma: int | None = None                    # draft tokens per round (None: the preset's)
    repeats: int = 3
    batch_size: int = 16                        # the batched table's batch
    seed: int = 0
    n_boot: int = 2000
    teacher: str | None = None
    student: str | None = None
    runs: str = "runs"
    results: str = "results"
    report: str | None = None                   # default <results>/SPECBENCH.md
    threads: int = cli.DEFAULT_THREADS
    quick: bool = False
    fresh: bool = False                         # delete the journal and the answer files first (start over)


QUICK = dict(per_category=1, max_new_tokens=8, repeats=1, n_boot=500)   # CI's smoke run: ~4 min on 2 busy cores


# ----------------------------------------------------------------------------- questions (pure)

def check_question(row, where: str) -> dict:
    """One question row -> the row, or data.DataError naming `where` (file, line) and the problem."""
    if not isinstance(row, dict):
        raise data.DataError(f"{where}: a question must be a JSON object, got {type(row).__name__}")
    for key in ("question_id", "category", "turns"):
        if key not in row:
            raise data.DataError(f"{where}: missing field {key!r} (a question needs question_id, category, turns)")
    if not isinstance(row["question_id"], int) or isinstance(row["question_id"], bool):
        raise data.DataError(f"{where}: question_id must be an integer, got {row['question_id']!r}")
    if row["category"] not in CATEGORIES:
        raise data.DataError(f"{where}: unknown category {row['category']!r}; Spec-Bench's categories: "
                             f"{', '.join(CATEGORIES)}")
    turns = row["turns"]
    if not isinstance(turns, list) or not turns:
        raise data.DataError(f"{where}: turns must be a non-empty list of user turns, got {turns!r}")
    for i, turn in enumerate(turns, 1):
        if not isinstance(turn, str) or not turn.strip():
            raise data.DataError(f"{where}: turn {i} must be a non-empty string, got {turn!r}")
    return row


def read_questions(path) -> list[dict]:
    """Every row of a Spec-Bench question file (.jsonl), checked; a duplicate question_id is refused too."""
    path = Path(path)
    if path.suffix != ".jsonl":
        raise data.DataError(f"--questions {path}: Spec-Bench's questions are a .jsonl file (question.jsonl)")
    if not path.is_file():
        raise data.DataError(f"--questions {path}: no such file")
    rows, seen = [], {}
    for where, row in data.read_rows(path, task=None):      # task names Parquet columns only
        row = check_question(row, where)
        if row["question_id"] in seen:
            raise data.DataError(f"{where}: question_id {row['question_id']} repeats {seen[row['question_id']]}")
        seen[row["question_id"]] = where
        rows.append(row)
    return rows


def select_questions(questions: list[dict], per_category: int | None) -> list[dict]:
    """The first per_category questions of each category, in file order (None: all)."""
    if per_category is None:
        return list(questions)
    taken = {c: 0 for c in CATEGORIES}
    out = []
    for q in questions:
        if taken[q["category"]] < per_category:
            taken[q["category"]] += 1
            out.append(q)
    return out


# ----------------------------------------------------------------------------- conversations

def conversation(turns: list[str], answers: list[str]) -> list[dict]:
    """Chat messages for the next turn: user turn 1, the method's own answer 1, ..., user turn len(answers) + 1."""
    messages = []
    for i, user in enumerate(turns[:len(answers) + 1]):
        messages.append({"role": "user", "content": user})
        if i < len(answers):
            messages.append({"role": "assistant", "content": answers[i]})
    return messages


def prompt_ids(tokenizer, turns: list[str], answers: list[str]) -> list[int]:
    """The next turn's prompt through the tokenizer's own chat template, the assistant turn opened."""
    text = tokenizer.apply_chat_template(conversation(turns, answers), tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def answer_text(tokenizer, tokens: list[int], stop_ids) -> str:
    """Spec-Bench's answer text: the ids up to the first stop id, decoded without special tokens, stripped."""
    cut = next((i for i, t in enumerate(tokens) if t in set(stop_ids)), len(tokens))
    return tokenizer.decode(tokens[:cut], skip_special_tokens=True).strip()


# ----------------------------------------------------------------------------- one turn of each method

@dataclass
class Turn:
    """One generated turn: the ids (stop id included), the tokens each target forward produced, the drafts."""
    tokens: list[int]
    accept_lengths: list[int]   # per target forward; sums to len(tokens)
    seconds: float
    drafted: int = 0
    accepted: int = 0
    prompt: list[int] = field(default_factory=list, repr=False)


@dataclass
class Answer:
    """One method's answer to one question, as the journal keeps it: its turns and when it was finished."""
    turns: list[Turn]
    at: float                   # unix seconds: the answer file's tstamp


@dataclass
class Method:
    """A decoding method: kind 'vanilla' | 'sps' (HF assisted) | 'specdec'; draft: a loaded model or None."""
    name: str
    kind: str
    draft: object = None
    label: str = ""


def vanilla_turn(target, draft, prompt, protocol, seed) -> Turn:
    """The target alone, one token per forward."""
    t0 = time.perf_counter()
    res = specdec.autoregressive_generate(target, [prompt], seed=seed, **protocol.generate_kwargs())
    seconds = time.perf_counter() - t0
    return Turn(res.tokens[0], [1] * len(res.tokens[0]), seconds, prompt=prompt)


def specdec_turn(target, draft, prompt, protocol, seed) -> Turn:
    """Our exact speculative decoding at batch 1; specdec's per-row stats hold the accept lengths."""
    t0 = time.perf_counter()
    res = specdec.speculative_generate(target, draft, [prompt], seed=seed, **protocol.speculative_kwargs())
    seconds = time.perf_counter() - t0
    row = res.stats["per_row"][0]
    return Turn(res.tokens[0], row["accept_lengths"], seconds, row["drafted"], row["accepted"], prompt=prompt)


class _SequenceLengths:
    """A stopping criterion that stops nothing: it records the sequence length after every round of generate."""

    def __init__(self):
        self.lengths = []

    def __call__(self, input_ids, scores, **kwargs):
        self.lengths.append(input_ids.shape[1])
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def configure_assistant(draft, gamma: int):
    """HF's candidate generator reads its settings from the ASSISTANT's generation config (default: 20 tokens,
    adapted every round): exactly gamma drafts per round, as our decoder, and no confidence cut-off."""
    gc = draft.generation_config
    gc.num_assistant_tokens, gc.num_assistant_tokens_schedule, gc.assistant_confidence_threshold = gamma, "constant", 0.0


def sps_turn(target, draft, prompt, protocol, seed) -> Turn:
    """Hugging Face assisted generation at batch 1. A forward pre-hook on the target counts its forwards and the
    width of each input (the first: prompt + candidates; later: last token + candidates, the cache holding the
    rest); the stopping criterion sees the sequence after each round. Produced per forward = length differences;
    drafted = input width - prompt (first) or - 1 (later); accepted = produced - 1."""
    widths, seen = [], _SequenceLengths()
    hook = target.register_forward_pre_hook(lambda m, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                            with_kwargs=True)
    ids = torch.tensor([prompt], device=target.device)
    sampled = protocol.temperature > 0
    torch.manual_seed(seed)
    try:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = target.generate(ids, attention_mask=torch.ones_like(ids), assistant_model=draft, do_sample=sampled,
                                  temperature=protocol.temperature if sampled else None,
                                  top_p=protocol.top_p if sampled else None, top_k=None,
                                  max_new_tokens=protocol.max_new_tokens, eos_token_id=list(protocol.stop_ids),
                                  pad_token_id=target.generation_config.pad_token_id, stopping_criteria=[seen])
        seconds = time.perf_counter() - t0
    finally:
        hook.remove()
    tokens = out[0, len(prompt):].tolist()
    produced = np.diff([len(prompt)] + seen.lengths).tolist()
    if len(widths) != len(produced) or sum(produced) != len(tokens):
        raise RuntimeError(f"HF assisted generation: {len(widths)} target forwards but {len(produced)} rounds seen "
                           f"({sum(produced)} tokens of {len(tokens)}): its accept lengths cannot be measured exactly")
    drafted = [widths[0] - len(prompt)] + [w - 1 for w in widths[1:]]
    return Turn(tokens, produced, seconds, sum(drafted), sum(n - 1 for n in produced), prompt=prompt)


TURN = {"vanilla": vanilla_turn, "sps": sps_turn, "specdec": specdec_turn}


def answer_question(method: Method, target, tokenizer, question: dict, protocol, seed: int) -> list[Turn]:
    """Every turn of a question; each later turn sees the method's own earlier answers (as text, as Spec-Bench)."""
    turns, answers = [], []
    for j in range(len(question["turns"])):
        prompt = prompt_ids(tokenizer, question["turns"], answers)
        turn = TURN[method.kind](target, method.draft, prompt, protocol, seed + j)
        turns.append(turn)
        answers.append(answer_text(tokenizer, turn.tokens, protocol.stop_ids))
    return turns


# ----------------------------------------------------------------------------- Spec-Bench's answer files

def model_id(preset: str, method: str, temperature: float) -> str:
    return f"{preset}-{method}-float32-temp-{temperature:.1f}"


def answer_record(question: dict, model: str, texts: list[str], turns: list[Turn], at: float) -> dict:
    """One line of a Spec-Bench answer file (the fields of evaluation/eval.py's answer files), answered at `at`."""
    choice = {"index": 0, "turns": texts, "decoding_steps": [len(t.accept_lengths) for t in turns],
              "new_tokens": [len(t.tokens) for t in turns], "wall_time": [t.seconds for t in turns],
              "accept_lengths": [n for t in turns for n in t.accept_lengths]}
    return {"question_id": question["question_id"], "category": question["category"],
            "answer_id": uuid.uuid5(uuid.NAMESPACE_URL, f"{model}/{question['question_id']}/{at!r}").hex,
            "model_id": model, "choices": [choice], "tstamp": at}


def write_answers(path: Path, records: list[dict]) -> Path:
    """JSON lines sorted by question_id (Spec-Bench's reorg_answer_file), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in sorted(records, key=lambda r: r["question_id"])))
    tmp.replace(path)
    return path


def read_answers(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- Spec-Bench's numbers (pure)

def question_speed(record: dict) -> float:
    """Tokens/s of one answer: sum of new_tokens over the turns / sum of wall_time (speed.py)."""
    choice = record["choices"][0]
    return sum(choice["new_tokens"]) / sum(choice["wall_time"])


def spec_bench_speed(records: list[dict], baseline: list[dict], categories=CATEGORIES) -> dict:
    """speed.py's numbers for the questions of `categories`: tokens/s (mean over questions of question_speed), the
    baseline's, their ratio (the speedup) and the mean of every accept length (#Mean accepted tokens)."""
    mine = [r for r in records if r["category"] in categories]
    base = [r for r in baseline if r["category"] in categories]
    if not mine or not base:                                # a column none of the questions falls in
        return dict.fromkeys(("tokens_per_s", "baseline_tokens_per_s", "speedup", "mean_accepted_tokens"), math.nan)
    speed = float(np.mean([question_speed(r) for r in mine]))
    base_speed = float(np.mean([question_speed(r) for r in base]))
    lengths = [n for r in mine for n in r["choices"][0]["accept_lengths"]]
    return {"tokens_per_s": speed, "baseline_tokens_per_s": base_speed, "speedup": speed / base_speed,
            "mean_accepted_tokens": float(np.mean(lengths))}


# ----------------------------------------------------------------------------- the journal (a run over sessions)

JOURNAL = "journal.jsonl"
JOURNAL_VERSION = 1
CODE = ("specdec.py", "plumbing/cpu_memory.py", "plumbing/decoding_args.py", "plumbing/kv_cache.py",
        "plumbing/topp.py", "study/specbench.py", "models.py")   # the decoding code: per session (code_versions)
SUMMARY = "specbench.json"


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def model_sha256(path) -> str:
    """sha256 over every file of a local model folder (weights, config, tokenizer, generation config: what loading
    it reads), by name; dot files (locks) aside. ~0.6 s for the 135M target. A hub id: the id itself."""
    d = Path(str(path))
    if not d.is_dir():
        return f"hub id {path}"
    h = hashlib.sha256()
    for f in sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith(".")):
        h.update(f"{f.name}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


DECODING = ("gamma", "temperature", "top_p", "top_k", "max_new_tokens")


def requested_protocol(cfg: Config) -> dict:
    """The decoding settings as models.decoding_protocol resolves them (the preset's, overridden by the flags) and
    the preset's stop tokens: with the target's files (its tokenizer and generation config) they fix the protocol,
    stop ids and vocabulary included, so the journal can be checked before any model loads."""
    preset = models.preset_config(cfg.preset, cfg.task)
    values = {k: preset.get(k, 0 if k == "top_k" else None) for k in DECODING}
    values.update({k: v for k, v in ((k, getattr(cfg, k, None)) for k in DECODING) if v is not None})
    return {**values, "stop_tokens": list(preset.get("stop_tokens", []))}


def fingerprint(cfg: Config, questions: list[dict], inputs: dict) -> dict:
    """Everything the journal's records depend on: the selected questions, the target's and each draft's files,
    the protocol (requested_protocol), repeats, the batched table's batch, seed, threads (torch is bit-exact only
    at the same count) and the libraries that run it. JSON-normalized (what the header holds). The decoding code is
    not in it: a run of ~15 h spans sessions in which the code is edited (its tokens are pinned by the golden
    tests), so each session records its version instead (code_versions) and the report says how many there were."""
    import transformers

    rows = "".join(json.dumps(q, sort_keys=True) + "\n" for q in questions)
    fp = {"version": JOURNAL_VERSION, "preset": cfg.preset,
          "questions": {"n": len(questions), "sha256": hashlib.sha256(rows.encode()).hexdigest()},
          "target": model_sha256(inputs["teacher"]),
          "drafts": {name: model_sha256(path) for name, _, path in inputs["drafts"]},
          "protocol": requested_protocol(cfg), "repeats": cfg.repeats, "batch_size": cfg.batch_size, "seed": cfg.seed,
          "threads": cfg.threads,
          "libraries": {"torch": torch.__version__, "transformers": transformers.__version__}}
    return json.loads(json.dumps(fp))


def code_versions() -> dict:
    """sha256 of each file of the decoding code (CODE), recorded in every session line of the journal."""
    return {f: file_sha256(REPO / f) for f in CODE}


def fingerprint_changes(old: dict, new: dict) -> list[str]:
    """What differs between two fingerprints, in words (the refusal names it)."""
    out = []
    for key in sorted(set(old) | set(new), key=lambda k: list(new).index(k) if k in new else len(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key == "questions":
            out.append(f"the questions ({a['n']} -> {b['n']} selected)" if isinstance(a, dict) and a.get("n") != b["n"]
                       else "the questions' text")
        elif key == "target":
            out.append("the target's files")
        elif key == "drafts" and isinstance(a, dict):
            out += [f"draft {n} added" for n in b if n not in a] + [f"draft {n} gone" for n in a if n not in b]
            out += [f"draft {n}'s files" for n in b if n in a and a[n] != b[n]]
        elif key == "code" and isinstance(a, dict):
            out += [f"{f} changed" for f in b if a.get(f) != b[f]]
        elif key in ("protocol", "libraries") and isinstance(a, dict):
            out += [f"{k} {a.get(k)} -> {b.get(k)}" for k in b if a.get(k) != b.get(k)]
        else:
            out.append(f"{key} {a} -> {b}")
    return out


def written_files(root: Path, preset: str) -> list[Path]:
    """What specbench writes under <results>/<preset>/specbench/ (--fresh deletes these and nothing else): the
    journal, specbench.json and the answer files run_<r>/<preset>-<method>-float32-temp-<T>.jsonl (.tmp: one cut
    off mid-write)."""
    found = [root / JOURNAL, root / SUMMARY] + sorted(root.glob(f"run_*/{preset}-*-float32-temp-*.jsonl"))
    found += sorted(root.glob(f"run_*/{preset}-*-float32-temp-*.tmp"))
    return [f for f in found if f.is_file()]


def remove_written(root: Path, preset: str) -> int:
    """Delete written_files, then the run_<r> folders they leave empty. -> how many files went."""
    files = written_files(root, preset)
    for f in files:
        f.unlink()
    for d in sorted(root.glob("run_*")):
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
    return len(files)


def duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def progress_line(what: str, done_now: int, read_back: int, total: int, elapsed: float) -> str:
    """`done`/`total` items, how many were read back from the journal, the rate measured on the items done in this
    session and the ETA of the rest at that rate."""
    done = done_now + read_back
    rate = elapsed / done_now if done_now else math.nan
    return (f"{done}/{total} {what} done ({read_back} read back from the journal), "
            f"{rate:.3g} s each, ETA {duration((total - done) * rate) if done < total else '0 s'}")


class Journal:
    """The run's record, <results>/<preset>/specbench/journal.jsonl: a header line holding the fingerprint, then
    one JSON line per finished item, appended, flushed and fsynced as soon as it is done: {"kind": "answer",
    repeat, method, question_id, turns: [the Turn fields of every turn]} and {"kind": "batched", repeat, chunk,
    method, seconds, tokens, per_row} (tokens and per_row in repeat 1 only, the only ones the table reads); a
    "session" line at every start and an "end" line at every stop (the report's run time sums the sessions).
    path None: kept in memory only."""

    def __init__(self, path: Path | None = None):
        self.path = path
        self.answers: dict[tuple, Answer] = {}          # (repeat, method, question_id) -> turns, time
        self.batched: dict[tuple, dict] = {}            # (repeat, chunk, method) -> seconds, tokens, per_row
        self.earlier_seconds = 0.0                      # the earlier sessions' time (from their lines)
        self.sessions = 1
        self.code = []                                  # the decoding code of every session (code_versions)
        self.read_back = (0, 0)                         # answers, batched items
        self.drafts_added = {}                          # drafts this session adds to the run: name -> sha256
        self.repeats_raised = 0                         # the runs this session raises the run to (0: unchanged)

    def append(self, row: dict):
        if self.path is None:
            return
        with open(self.path, "a") as f:               # one write of one whole line: a kill cuts the last line only
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def add_answer(self, repeat: int, method: str, question_id: int, turns: list[Turn]):
        at = time.time()
        self.append({"kind": "answer", "repeat": repeat, "method": method, "question_id": question_id,
                     "at": at, "turns": [asdict(t) for t in turns]})
        self.answers[(repeat, method, question_id)] = Answer(turns, at)

    def add_batched(self, repeat: int, chunk: int, method: str, item: dict):
        self.append({"kind": "batched", "repeat": repeat, "chunk": chunk, "method": method, "at": time.time(), **item})
        self.batched[(repeat, chunk, method)] = item

    def start_session(self, argv: list[str]):
        code = code_versions()
        added = {"drafts_added": self.drafts_added} if self.drafts_added else {}
        added.update({"repeats": self.repeats_raised} if self.repeats_raised else {})
        self.append({"kind": "session", "at": time.time(), "argv": argv, "code": code, **added})
        if code not in self.code:
            self.code.append(code)

    def end_session(self, how: str):
        self.append({"kind": "end", "at": time.time(), "how": how})


def read_journal(path: Path, warn) -> list[dict]:
    """The journal's lines. A last line cut off mid-write (no newline: a kill -9 or a crash while appending) or not
    JSON is dropped from the file with one warning: its item is redone. Any other line that is not a JSON object:
    the journal is damaged, refused."""
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1
    lines = raw[:end].split(b"\n")[:-1]
    torn = len(raw) - end
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not an object")
        except ValueError as e:
            if n < len(lines) or torn:
                raise cli.BadInput(f"{path}, line {n}: not a journal line ({e}); the journal is damaged: start over "
                                   f"with --fresh (deletes it and the answer files)") from None
            end -= len(line) + 1
            torn += len(line) + 1
            break
        rows.append(row)
    if torn:
        with open(path, "r+b") as f:
            f.truncate(end)
            os.fsync(f.fileno())
        warn(f"{path}: its last line was cut off mid-write ({torn} bytes, a run killed while writing): dropped, "
             f"that item is redone")
    return rows


def journal_drafts(rows: list[dict]) -> dict:
    """{draft name: sha256} of a journal: its header's drafts and those later sessions added."""
    known = dict(rows[0]["fingerprint"].get("drafts", {}))
    for row in rows[1:]:
        if row.get("kind") == "session" and isinstance(row.get("drafts_added"), dict):
            known.update(row["drafts_added"])
    return known


def journal_repeats(rows: list[dict]) -> int:
    """How many runs a journal's records are for: its header's, or as many as a later session raised it to."""
    runs = int(rows[0]["fingerprint"].get("repeats", 0))
    for row in rows[1:]:
        if row.get("kind") == "session" and isinstance(row.get("repeats"), int):
            runs = max(runs, row["repeats"])
    return runs


def open_journal(root: Path, fp: dict, cfg: Config, answer_keys: set, batched_keys: set, argv, warn) -> Journal:
    """The journal of this run: a new one (no journal yet, or --fresh: first the files specbench wrote there go, so
    no answer file of an earlier run is left beside these), or the one there, continued, if its header holds the
    same fingerprint; another fingerprint is refused, naming what changed. Its items must be items of this run."""
    path = root / JOURNAL
    journal = Journal(path)
    rows = read_journal(path, warn) if path.is_file() and not cfg.fresh else []
    if rows:
        header = rows[0]
        if header.get("kind") != "header" or not isinstance(header.get("fingerprint"), dict):
            raise cli.BadInput(f"{path}, line 1: not a specbench journal header; start over with --fresh (deletes "
                               f"it and the answer files)")
        known, runs = journal_drafts(rows), journal_repeats(rows)
        added = {n: sha for n, sha in fp["drafts"].items() if n not in known}
        held = {**header["fingerprint"], "drafts": known, "repeats": runs}
        if held != {**fp, "drafts": {n: fp["drafts"].get(n) for n in known}, "repeats": min(fp["repeats"], runs)}:
            changed = fingerprint_changes(held, fp)
            changed = [c for c in changed if not c.endswith(" added") and not (
                c.startswith("repeats ") and fp["repeats"] > runs)] or ["the journal's version"]
            raise cli.BadInput(f"{path} holds a run with other settings ({'; '.join(changed)}); rerun with its "
                               f"settings to continue it (a draft gone: train it again, bit-identical by its "
                               f"seed), or pass --fresh to start over (deletes the journal and the answer files "
                               f"under {root})")
        if added:
            warn(f"{path}: draft(s) {', '.join(added)} added since the journal began: their answers are decoded "
                 f"from now on, beside the other methods' (kept)")
            journal.drafts_added = added
        if fp["repeats"] > runs:
            warn(f"{path}: runs raised from {runs} to {fp['repeats']}: the answers of the first {runs} are kept, "
                 f"the others are decoded now")
            journal.repeats_raised = fp["repeats"]
        spans = []                                      # [first, last] time of every earlier session
        for n, row in enumerate(rows[1:], 2):
            kind = row.get("kind")
            try:
                if kind == "answer":
                    key = (row["repeat"], row["method"], row["question_id"])
                    if key not in answer_keys or key in journal.answers:
                        raise ValueError(f"{'a second' if key in journal.answers else 'no'} answer {key} of this run")
                    journal.answers[key] = Answer([Turn(**t) for t in row["turns"]], float(row["at"]))
                elif kind == "batched":
                    key = (row["repeat"], row["chunk"], row["method"])
                    if key not in batched_keys or key in journal.batched:
                        raise ValueError(f"{'a second' if key in journal.batched else 'no'} batched item {key} of "
                                         f"this run")
                    journal.batched[key] = {k: row[k] for k in ("seconds", "tokens", "per_row")}
                elif kind == "session":
                    spans.append([float(row["at"])] * 2)
                    if row.get("code") not in journal.code:
                        journal.code.append(row.get("code"))
                elif kind != "end":
                    raise ValueError(f"unknown kind {kind!r}")
                if spans:
                    spans[-1][1] = max(spans[-1][1], float(row["at"]))
            except (KeyError, TypeError, ValueError) as e:
                raise cli.BadInput(f"{path}, line {n}: not an item of this run ({type(e).__name__}: {e}); the "
                                   f"journal is damaged: start over with --fresh") from None
        journal.sessions = len(spans) + 1
        journal.earlier_seconds = sum(last - first for first, last in spans)
        journal.read_back = (len(journal.answers), len(journal.batched))
        if journal.code and code_versions() not in journal.code:
            changed = sorted({f for c in journal.code if c for f in CODE if c.get(f) != code_versions()[f]})
            warn(f"{path}: the decoding code changed since its last session ({', '.join(changed)}); its answers are "
                 f"kept and the rest are decoded by the new code (the report counts the code versions)")
    else:
        root.mkdir(parents=True, exist_ok=True)
        remove_written(root, cfg.preset)
        journal.append({"kind": "header", "version": JOURNAL_VERSION, "at": time.time(), "fingerprint": fp})
    journal.start_session(argv)
    return journal


def continue_command(argv: list[str]) -> str:
    """The command that continues an interrupted run: the same one, less --fresh."""
    return shlex.join(["python", "-m", "study.specbench", *[a for a in argv if a != "--fresh"]])


# ----------------------------------------------------------------------------- the run

def load_inputs(cfg: Config) -> dict:
    """Every check before any model loads: the questions, the pair's folders, each draft's folder."""
    questions = select_questions(read_questions(cfg.questions), cfg.per_category)
    teacher, student = cfg.teacher, cfg.student
    if teacher is None or student is None:
        t, s = models.resolve_pair(cfg.task, cfg.preset)
        teacher, student = teacher or t, student or s
    drafts = [("baseline", "baseline draft (no distillation)", student)]
    drafts += [(final.parent.name, evaluate.divergence_label(final.parent), str(final))
               for final in evaluate.trained_runs(Path(cfg.runs), cfg.preset, cfg.task)]
    models.check_model_files(teacher, "target")
    for name, _, path in drafts:
        models.check_model_files(path, f"draft {name}")
        models.check_tokenizers(teacher, path)
    check_question_lengths(questions, models.load_tokenizer(teacher),
                           models.context_length(teacher, *(path for _, _, path in drafts)),
                           cfg.max_new_tokens)
    return {"questions": questions, "teacher": teacher, "drafts": drafts}


def check_question_lengths(questions: list[dict], tokenizer, context: int | None,
                           max_new_tokens: int):
    """Every question must fit the models' context (None: no limit known), checked before any model
    loads: its last turn's prompt (every user turn, the chat template, the earlier answers empty)
    plus max_new_tokens per turn, the most its answers can add. A question that does not fit failed
    in the middle of the run (the tiny pair's 1024 positions hold no Spec-Bench summary)."""
    if context is None:
        return
    too_long = []
    for q in questions:
        turns = q["turns"]
        prompt = prompt_ids(tokenizer, turns, [""] * (len(turns) - 1))
        need = len(prompt) + len(turns) * max_new_tokens
        if need > context:
            too_long.append((q, need))
    if too_long:
        (q, need), n = too_long[0], len(too_long)
        raise data.DataError(
            f"{n} of the {len(questions)} questions do not fit the models' context of {context} "
            f"positions (max_position_embeddings), e.g. question {q['question_id']} "
            f"({q['category']}, {len(q['turns'])} turn(s)): its prompt (chat template included) "
            f"and --max-new-tokens {max_new_tokens} per turn need {need}; use models with a longer "
            f"context (--preset smollm2), fewer questions (--questions, --per-category) or a lower "
            f"--max-new-tokens")


def build_methods(drafts: list[tuple], loaded: dict, gamma: int | None) -> list[Method]:
    """vanilla, sps (HF assisted, baseline draft), specdec-<draft> for every draft. gamma None: the plan only, before
    any model loads (loaded: None per draft), the names and kinds the journal is checked against."""
    base = loaded["baseline"]
    if gamma is not None:
        configure_assistant(base, gamma)
    methods = [Method("vanilla", "vanilla", None, "target alone"),
               Method("sps", "sps", base, "HF assisted generation, baseline draft")]
    methods += [Method(f"specdec-{name}", "specdec", loaded[name], f"our speculative decoding, {label}")
                for name, label, _ in drafts]
    return methods


def rotated(methods: list, k: int) -> list:
    """The methods in turn order k: each question starts with another method, so none always runs first."""
    k %= len(methods)
    return methods[k:] + methods[:k]


def answer_keys(cfg: Config, methods, questions) -> list[tuple]:
    """Every (repeat, method, question_id) of the batch-1 runs, in the order they run: repeat by repeat, question by
    question, the methods rotating (rotated)."""
    return [(r, m.name, q["question_id"]) for r in range(cfg.repeats) for i, q in enumerate(questions)
            for m in rotated(methods, i + r)]


def run_repeats(cfg: Config, methods, target, tokenizer, questions, protocol, log, journal=None) -> dict:
    """Every repeat: every question with every method, alternating. -> {repeat: {method: [(question, turns)]}}
    Each answer goes to the journal as soon as it is done; what the journal already holds is not run again."""
    journal = journal if journal is not None else Journal()
    total = cfg.repeats * len(questions) * len(methods)
    read_back = sum(key in journal.answers for key in answer_keys(cfg, methods, questions))
    if read_back < total:
        for m in methods:                                    # warm-up, as Spec-Bench's (not recorded)
            TURN[m.kind](target, m.draft, prompt_ids(tokenizer, questions[0]["turns"], []), protocol, cfg.seed)
    t0, done_now = time.time(), 0
    for r in range(cfg.repeats):
        for i, q in enumerate(questions):
            ran = False
            for m in rotated(methods, i + r):
                if (r, m.name, q["question_id"]) in journal.answers:
                    continue
                turns = answer_question(m, target, tokenizer, q, protocol, cfg.seed + q["question_id"])
                journal.add_answer(r, m.name, q["question_id"], turns)
                done_now, ran = done_now + 1, True
            if ran and ((i + 1) % 10 == 0 or i + 1 == len(questions)):
                log(f"repeat {r + 1}/{cfg.repeats}: {i + 1}/{len(questions)} questions; "
                    + progress_line("answers", done_now, read_back, total, time.time() - t0))
    return {r: {m.name: [(q, journal.answers[(r, m.name, q["question_id"])].turns) for q in questions]
                for m in methods} for r in range(cfg.repeats)}


def write_repeat_files(cfg: Config, results: dict, answers: dict, tokenizer, protocol) -> dict:
    """Each repeat's answer files -> {repeat: {method: records}} (what Spec-Bench's tools read back); `answers`:
    the journal's, for each answer's time."""
    root = Path(cfg.results) / cfg.preset / "specbench"
    files = {}
    for r, by_method in results.items():
        files[r] = {}
        for name, answered in by_method.items():
            mid = model_id(cfg.preset, name, cfg.temperature)
            records = [answer_record(q, mid, [answer_text(tokenizer, t.tokens, protocol.stop_ids) for t in turns],
                                     turns, answers[(r, name, q["question_id"])].at) for q, turns in answered]
            write_answers(root / f"run_{r + 1}" / f"{mid}.jsonl", records)
            files[r][name] = records
    return files


# ----------------------------------------------------------------------------- statistics per category

def per_question_acceptance(results: dict, method: str) -> dict[int, float]:
    """question_id -> accepted / drafted over all its turns and repeats (NaN where nothing was drafted)."""
    acc, drafted = {}, {}
    for by_method in results.values():
        for q, turns in by_method[method]:
            qid = q["question_id"]
            acc[qid] = acc.get(qid, 0) + sum(t.accepted for t in turns)
            drafted[qid] = drafted.get(qid, 0) + sum(t.drafted for t in turns)
    return {qid: acc[qid] / drafted[qid] if drafted[qid] else math.nan for qid in acc}


@torch.no_grad()
def teacher_entropies(target, vanilla: list, temperature: float, vocab_size: int) -> dict[int, float]:
    """question_id -> mean H(softmax(logits / T)) over the tokens of the target's own answer, all turns (T = 1 when
    greedy). One forward per turn over prompt + answer (entropy.completion_step_logits)."""
    T = temperature if temperature > 0 else 1.0
    out = {}
    for q, turns in vanilla:
        hs = [entropy.processed_entropy(logits, T).cpu().numpy() for t in turns
              for _, logits in entropy.completion_step_logits(target, [t.prompt], [t.tokens], vocab_size=vocab_size)]
        out[q["question_id"]] = float(np.concatenate(hs).mean()) if hs else math.nan
    return out


def by_subtask(values: dict[int, float], questions: list[dict], n_boot: int, seed: int) -> dict[str, tuple]:
    """Per leaderboard column: (mean, lo, hi) over its questions' values, bootstrap 95% interval."""
    return {name: evaluate.bootstrap_ci([values[q["question_id"]] for q in questions if q["category"] in cats],
                                        n_boot=n_boot, seed=seed)
            for name, cats in SUBTASKS.items()}


def paired_by_subtask(a: dict, b: dict, questions: list[dict], n_boot: int, seed: int) -> dict[str, dict]:
    """Per leaderboard column: a - b over the same questions, paired bootstrap (evaluate.paired_gain)."""
    out = {}
    for name, cats in SUBTASKS.items():
        ids = [q["question_id"] for q in questions if q["category"] in cats]
        out[name] = evaluate.paired_gain([a[i] for i in ids], [b[i] for i in ids], n_boot=n_boot, seed=seed)
    return out


@torch.no_grad()
def explain_mismatch(target, tokenizer, question, mine: list[Turn], ref: list[Turn], vocab_size: int) -> str:
    """Where an answer first parts from vanilla's, and the target's logit gap there between the two tokens."""
    for j, (a, b) in enumerate(zip(mine, ref)):
        if a.tokens == b.tokens:
            continue
        i = next((k for k, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y), min(len(a.tokens), len(b.tokens)))
        where = f"question {question['question_id']} ({question['category']}), turn {j + 1}, token {i + 1}"
        if i >= min(len(a.tokens), len(b.tokens)):
            return f"{where}: one answer is a prefix of the other ({len(a.tokens)} vs {len(b.tokens)} tokens)"
        logits = target(torch.tensor([b.prompt + b.tokens[:i]], device=target.device)).logits[0, -1, :vocab_size]
        gap = float(logits[b.tokens[i]] - logits[a.tokens[i]])
        kind = "a float32 near-tie" if abs(gap) < NEAR_TIE else "NOT a near-tie: look for a bug"
        return (f"{where}: vanilla {tokenizer.decode([b.tokens[i]])!r}, this method {tokenizer.decode([a.tokens[i]])!r}; "
                f"the target's logits differ by {gap:.2e} ({kind})")
    return f"question {question['question_id']}: the tokens agree but the texts differ (decoding)"


def equality(results: dict, method: str, tokenizer, target, protocol) -> dict:
    """Repeat 1: per leaderboard column, how many answers' turns equal vanilla's; each mismatch explained."""
    mine, ref = results[0][method], results[0]["vanilla"]
    equal = {name: [0, 0] for name in SUBTASKS}
    notes = []
    for (q, turns), (_, ref_turns) in zip(mine, ref):
        same = ([answer_text(tokenizer, t.tokens, protocol.stop_ids) for t in turns]
                == [answer_text(tokenizer, t.tokens, protocol.stop_ids) for t in ref_turns])
        for name, cats in SUBTASKS.items():
            if q["category"] in cats:
                equal[name][0] += same
                equal[name][1] += 1
        if not same:
            notes.append(explain_mismatch(target, tokenizer, q, turns, ref_turns, protocol.vocab_size))
    return {"equal": equal, "mismatches": notes}


# ----------------------------------------------------------------------------- the batched table

def batched_prompts(vanilla: list) -> list[list[int]]:
    """Every turn of every question, shortest prompt first (a chunk's rows are left-padded to its longest prompt:
    RAG's ~1700-token prompts beside a 30-token question would pay a 1700-token prefill each); a second turn is
    conditioned on vanilla's (the target's own) first answer."""
    return sorted((t.prompt for _, turns in vanilla for t in turns), key=len)


def batched_chunks(prompts: list, batch_size: int) -> list[list]:
    return [prompts[s:s + batch_size] for s in range(0, len(prompts), batch_size)]


def batched_methods(methods) -> list:
    return [m for m in methods if m.kind in ("vanilla", "specdec")]


def batched_run(cfg: Config, methods, target, prompts, protocol, log, journal=None) -> dict:
    """vanilla (specdec.autoregressive_generate) and each specdec method at batch cfg.batch_size, the methods
    alternated chunk by chunk, cfg.repeats times: tokens/s per repeat, accept lengths, drafts, tokens. Each
    (repeat, chunk, method) goes to the journal as soon as it is done; what the journal holds is not run again."""
    journal = journal if journal is not None else Journal()
    chosen = batched_methods(methods)
    out = {m.name: {"seconds": [0.0] * cfg.repeats, "tokens": [], "per_row": []} for m in chosen}
    chunks = batched_chunks(prompts, cfg.batch_size)
    total = cfg.repeats * len(chunks) * len(chosen)
    read_back = sum((r, c, m.name) in journal.batched for r in range(cfg.repeats) for c in range(len(chunks))
                    for m in chosen)
    t0, done_now, logged = time.time(), 0, 0
    for r in range(cfg.repeats):
        for c, chunk in enumerate(chunks):
            for m in rotated(chosen, c + r):
                item = journal.batched.get((r, c, m.name))
                if item is None:
                    t1 = time.perf_counter()
                    if m.kind == "vanilla":
                        res = specdec.autoregressive_generate(target, chunk, seed=cfg.seed + c,
                                                              **protocol.generate_kwargs())
                    else:
                        res = specdec.speculative_generate(target, m.draft, chunk, seed=cfg.seed + c,
                                                           **protocol.speculative_kwargs())
                    item = {"seconds": time.perf_counter() - t1, "tokens": res.tokens if r == 0 else None,
                            "per_row": res.stats["per_row"] if r == 0 else None}
                    journal.add_batched(r, c, m.name, item)
                    done_now += 1
                out[m.name]["seconds"][r] += item["seconds"]
                if r == 0:
                    out[m.name]["tokens"] += item["tokens"]
                    out[m.name]["per_row"] += item["per_row"]
            if done_now > logged and ((c + 1) % 10 == 0 or c + 1 == len(chunks)):
                logged = done_now
                log(f"batched: repeat {r + 1}/{cfg.repeats}: {c + 1}/{len(chunks)} chunks; "
                    + progress_line("chunk runs", done_now, read_back, total, time.time() - t0))
    rows = []
    base = out["vanilla"]
    n_tokens = {name: sum(map(len, o["tokens"])) for name, o in out.items()}
    for m in chosen:
        o = out[m.name]
        tps = [n_tokens[m.name] / s for s in o["seconds"]]
        row = {"method": m.name, "tokens_per_s": float(np.median(tps)),
               "equal_to_vanilla": sum(a == b for a, b in zip(o["tokens"], base["tokens"])), "n": len(prompts)}
        if m.kind == "specdec":
            speedups = [t / (n_tokens["vanilla"] / s) for t, s in zip(tps, base["seconds"])]
            lengths = [n for pr in o["per_row"] for n in pr["accept_lengths"]]
            row.update(evaluate.repeat_summary(speedups), mean_accepted_tokens=float(np.mean(lengths)),
                       token_acceptance=evaluate.pooled_acceptance(o["per_row"]))
        rows.append(row)
    return {"rows": rows, "batch_size": cfg.batch_size, "n_prompts": len(prompts)}


# ----------------------------------------------------------------------------- the report

def leaderboard(files: dict, methods) -> list[dict]:
    """Per speculative method: speedup per column (mean over repeats, as the leaderboard), #Mean accepted tokens
    (over all repeats), and the overall speedup's repeats through evaluate.repeat_summary (the noise flag)."""
    rows = []
    for m in methods:
        if m.kind == "vanilla":
            continue
        per_repeat = [{name: spec_bench_speed(files[r][m.name], files[r]["vanilla"], cats)
                       for name, cats in SUBTASKS.items()} for r in files]
        lengths = [n for r in files for rec in files[r][m.name] for n in rec["choices"][0]["accept_lengths"]]
        rows.append({"method": m.name, "label": m.label,
                     "speedup": {name: float(np.mean([p[name]["speedup"] for p in per_repeat])) for name in SUBTASKS},
                     "tokens_per_s": float(np.mean([p["Overall"]["tokens_per_s"] for p in per_repeat])),
                     "mean_accepted_tokens": float(np.mean(lengths)),
                     "noise": evaluate.repeat_summary([p["Overall"]["speedup"] for p in per_repeat])})
    return rows


def _ci(t, scale=1.0, digits=2) -> str:
    mean, lo, hi = t
    return "-" if math.isnan(mean) else f"{mean * scale:.{digits}f} [{lo * scale:.{digits}f}, {hi * scale:.{digits}f}]"


def _x(speedup: float) -> str:
    return "-" if math.isnan(speedup) else f"{speedup:.2f}x"


def _noise(n: dict) -> str:
    k = len(n["speedup_repeats"])
    if k == 1:
        return "1 run: its noise is unknown"
    word = "within" if n["speedup_agree"] else "NOISY, beyond"
    return f"{k} runs {n['speedup_min']:.2f}-{n['speedup_max']:.2f}x ({n['speedup_spread']:.0%}, {word} {n['tolerance']:.0%})"


def report_markdown(doc: dict) -> str:
    cols = [c for c in SUBTASKS if c != "Overall"]
    p = doc["protocol"]
    decoding = "greedy" if p["temperature"] == 0 else f"T {p['temperature']}, top-p {p['top_p']}"
    md = [f"{HEADING} {doc['preset']} pair",
          "",
          f"Written by `{doc['command']}` on {doc['date']} ({doc['machine']}, {doc['threads']} torch thread(s)), "
          f"commit {doc['commit']}, run time {doc['minutes']:.1f} min"
          + (f" over {doc['sessions']} sessions" if doc.get("sessions", 1) > 1 else "")
          + (f" with {doc['code_versions']} versions of the decoding code (specdec.py and plumbing/, specbench.py, models.py; "
             f"tokens pinned by the golden tests, timings may differ)" if doc.get("code_versions", 1) > 1 else "")
          + f". {doc['n_questions']} questions "
          f"({doc['n_turns']} turns) of data/spec_bench/question.jsonl, {doc['repeats']} run(s), "
          f"{decoding}, batch 1, gamma "
          f"{p['gamma']}, max_new_tokens {p['max_new_tokens']} (Spec-Bench: 1024), float32 on the CPU. Target "
          f"`{doc['teacher']}`; drafts: " + ", ".join(f"`{n}` ({path})" for n, _, path in doc["drafts"]) + ".",
          "",
          f"Answer files (Spec-Bench's format, for its evaluation/speed.py and equal.py): "
          f"`{doc['answers']}/run_<r>/<model_id>.jsonl`. Speedup = mean over questions of tokens/s, over the same of "
          f"vanilla (the target alone, token by token), mean over runs; #Mean Accepted Tokens = mean of every "
          f"accept_lengths entry (tokens per target forward).",
          "",
          "## Leaderboard layout (speedup over vanilla)",
          "",
          "| Method | " + " | ".join(cols) + " | #Mean Accepted Tokens | Overall | runs (overall speedup) |",
          "|---|" + "---|" * (len(cols) + 3)]
    for row in doc["leaderboard"]:
        md.append(f"| {row['method']} | " + " | ".join(_x(row["speedup"][c]) for c in cols)
                  + f" | {row['mean_accepted_tokens']:.2f} | {row['speedup']['Overall']:.2f}x | {_noise(row['noise'])} |")
    md += ["", f"vanilla: {doc['vanilla_tokens_per_s']:.1f} tokens/s (mean over questions and runs).", "",
           "## Per category: teacher entropy and token acceptance (95% bootstrap intervals over questions)", "",
           "H(p): the target's entropy (nats) of softmax(logits / T) (T = 1 when greedy) along its own vanilla answer, "
           "per question; token acceptance: accepted / drafted tokens per question (all turns and runs), in %.", "",
           "| Category | questions | H(p) | " + " | ".join(f"{m} acceptance (%)" for m in doc["acceptance"]) + " |",
           "|---|---|---|" + "---|" * len(doc["acceptance"])]
    for c in SUBTASKS:
        md.append(f"| {c} | {doc['n_by_subtask'][c]} | {_ci(doc['entropy'][c])} | "
                  + " | ".join(_ci(doc["acceptance"][m][c], 100, 1) for m in doc["acceptance"]) + " |")
    if doc["gains"]:
        md += ["", "## Distilled drafts vs the baseline draft and vs sps (token acceptance, points, paired 95% interval)",
               "", "| Draft | vs | " + " | ".join(SUBTASKS) + " |", "|---|---|" + "---|" * len(SUBTASKS)]
        for name, by_ref in doc["gains"].items():
            for ref, g in by_ref.items():
                md.append(f"| {name} | {ref} | " + " | ".join(
                    "-" if math.isnan(g[c]["mean"]) else
                    f"{g[c]['mean'] * 100:+.1f} [{g[c]['lo'] * 100:+.1f}, {g[c]['hi'] * 100:+.1f}]" for c in SUBTASKS) + " |")
    if doc["equality"]:
        md += ["", "## Equality with vanilla's greedy answers (run 1; Spec-Bench's equal.py compares the same text)", "",
               "| Method | " + " | ".join(SUBTASKS) + " |", "|---|" + "---|" * len(SUBTASKS)]
        for m, eq in doc["equality"].items():
            md.append(f"| {m} | " + " | ".join(f"{a}/{n}" for a, n in (eq["equal"][c] for c in SUBTASKS)) + " |")
        notes = [f"- {m}: {note}" for m, eq in doc["equality"].items() for note in eq["mismatches"]]
        md += ["", "Mismatches (where each answer first parts from vanilla's):" if notes else "Every answer is equal.", *notes]
    b = doc["batched"]
    md += ["", f"## Batched: our decoder at batch {b['batch_size']} ({b['n_prompts']} turns, second turns after the "
           f"target's own first answer; median of {doc['repeats']} run(s))", "",
           "None of the leaderboard's methods runs batched (HF assisted generation is batch 1 only).", "",
           "| Method | tokens/s | speedup over vanilla at the same batch | #Mean Accepted Tokens | token acceptance | "
           "equal to vanilla |", "|---|---|---|---|---|---|"]
    for row in b["rows"]:
        if row["method"] == "vanilla":
            md.append(f"| vanilla | {row['tokens_per_s']:.1f} | 1 | 1 | - | - |")
        else:
            md.append(f"| {row['method']} | {row['tokens_per_s']:.1f} | {row['speedup_measured']:.2f}x "
                      f"({_noise(row)}) | {row['mean_accepted_tokens']:.2f} | {row['token_acceptance'] * 100:.1f}% "
                      f"| {row['equal_to_vanilla']}/{row['n']} |")
    return "\n".join(md) + "\n"


# ----------------------------------------------------------------------------- command line

def parse_args(argv=None) -> Config:
    p = cli.ArgumentParser(prog="python -m study.specbench", description=__doc__.split("\n")[0],
                           epilog="example: python -m study.specbench --quick  (CI's smoke run: a few minutes on 2 "
                           "cores). A run can be "
                           "stopped (Ctrl-C, SIGTERM, a crash) and continued: every finished answer is in "
                           "<results>/<preset>/specbench/journal.jsonl, and the same command goes on from there "
                           "(--fresh starts over)")
    p.add_argument("--quick", action="store_true", help=f"CI's smoke run: {QUICK}")
    p.add_argument("--preset", default="smollm2", help=f"one of {', '.join(models.PRESETS)} (default %(default)s)")
    p.add_argument("--task", default="gsm8k", help="whose distilled drafts to run: <runs>/<preset>/<task>/*/final "
                   "(default %(default)s)")
    p.add_argument("--questions", default=str(QUESTIONS.relative_to(REPO)), help="Spec-Bench's question.jsonl "
                   "(default %(default)s)")
    p.add_argument("--per-category", type=int, default=None, help="the first N questions of each category (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=None, help=f"per turn (default {DEFAULT_MAX_NEW_TOKENS} on the "
                   "CPU; Spec-Bench uses 1024, about 16x the time)")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy, Spec-Bench's protocol (default 0)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus of the sampled protocol (default 1)")
    p.add_argument("--gamma", type=int, default=None, help="draft tokens per round (default: the preset's)")
    p.add_argument("--repeats", type=int, default=None, help="runs of every method (default 3, as the leaderboard)")
    p.add_argument("--batch-size", type=int, default=None, help="the batched table's batch (default 16)")
    p.add_argument("--teacher", default=None, help="override the preset's target (a model folder)")
    p.add_argument("--student", default=None, help="override the preset's baseline draft (a model folder)")
    p.add_argument("--runs", default=None, help="root of distill.py's runs (default runs)")
    p.add_argument("--results", default=None, help="answer files under <results>/<preset>/specbench/ (default results)")
    p.add_argument("--report", default=None, help="the markdown report (default <results>/SPECBENCH.md)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--n-boot", type=int, default=None)
    p.add_argument("--fresh", action="store_true", help="start over: delete the journal and the answer files "
                   "specbench wrote under <results>/<preset>/specbench/ (nothing else) before the run. Without it a "
                   "run continues the journal there (the same settings: what it holds is read back, not rerun); a "
                   "journal of other settings is refused, naming what changed")
    cli.add_threads_option(p)
    args = p.parse_args(argv)
    cfg = Config(threads=cli.check_threads(args.threads), quick=args.quick, fresh=args.fresh)
    cli.apply_overrides(cfg, args, QUICK if args.quick else None,
                        values=("preset", "task", "questions", "per_category", "max_new_tokens", "temperature", "top_p",
                                "gamma", "repeats", "batch_size", "teacher", "student", "runs", "results", "report",
                                "seed", "n_boot"))
    models.check_preset(cfg.preset)
    data.check_task(cfg.task)
    for name in ("per_category", "max_new_tokens", "gamma", "repeats", "batch_size", "n_boot"):
        v = getattr(cfg, name)
        if v is not None and v < 1:
            raise cli.BadInput(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if not (math.isfinite(cfg.temperature) and cfg.temperature >= 0):
        raise cli.BadInput(f"--temperature {cfg.temperature} is not allowed; it must be >= 0 (0 = greedy)")
    if not (math.isfinite(cfg.top_p) and 0 < cfg.top_p <= 1):
        raise cli.BadInput(f"--top-p {cfg.top_p} is not allowed; it must be in (0, 1]")
    cli.check_seed(cfg.seed)
    rundir.check_out_dir(Path(cfg.results), flag="--results")
    cli.check_runs_root(cfg.runs, given=args.runs is not None)
    cli.check_markdown_out(report_path(cfg), HEADING, "results/SPECBENCH.md", flag="--report",
                           figures=False)          # written at the very end: checked before the run
    return cfg


def report_path(cfg: Config) -> Path:
    """--report, else <results>/SPECBENCH.md."""
    return Path(cfg.report or Path(cfg.results) / "SPECBENCH.md")


def main(argv=None) -> dict:
    """Check the questions and models (bad input: one line, before any model loads), load the models, open the
    journal (a journal of other settings: one line), then run what the journal lacks and report. Ctrl-C / SIGTERM:
    one line saying how far the run got and the command that continues it (then the KeyboardInterrupt goes on)."""
    t0 = time.time()
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    with cli.before_the_work():
        cfg = parse_args(argv)
        inputs = load_inputs(cfg)
        questions = inputs["questions"]
        answers_root = Path(cfg.results) / cfg.preset / "specbench"
        fp = fingerprint(cfg, questions, inputs)
        lock = rundir.RunLock(answers_root)
        try:
            lock.acquire()
        except rundir.RunDirError as e:
            raise cli.BadInput(str(e).replace("pass another --out", "pass another --results")) from None
    try:
        return journaled_run(cfg, argv, inputs, fp, answers_root, t0)
    finally:
        lock.release()


def journaled_run(cfg: Config, argv: list[str], inputs: dict, fp: dict, answers_root: Path, t0: float) -> dict:
    """Under the lock of answers_root: open the journal (bad input: one line, before any model loads), load the
    models, run what the journal lacks, report; an interrupt says how to continue."""
    questions = inputs["questions"]
    methods = build_methods(inputs["drafts"], {name: None for name, _, _ in inputs["drafts"]}, None)
    keys = answer_keys(cfg, methods, questions)
    n_chunks = len(batched_chunks(range(sum(len(q["turns"]) for q in questions)), cfg.batch_size))
    batched_keys = {(r, c, m.name) for r in range(cfg.repeats) for c in range(n_chunks)
                    for m in batched_methods(methods)}
    warn = lambda msg: print(f"warning: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    commit = report.source_commit()     # before the journal gets this session's line: the run's own writes
    with cli.before_the_work():         # must not make its header say "+ uncommitted changes"
        journal = open_journal(answers_root, fp, cfg, set(keys), batched_keys, argv, warn)
    how = "failed"
    try:
        doc = loaded_run(cfg, argv, inputs, journal, commit, len(keys), len(batched_keys), t0)
        how = "completed"
        return doc
    except KeyboardInterrupt as e:
        how = "terminated (SIGTERM)" if isinstance(e, cli.Terminated) else "interrupted"
        print(f"{how} after {len(journal.answers)}/{len(keys)} answers and {len(journal.batched)}/"
              f"{len(batched_keys)} batched chunk runs, every finished one kept in {journal.path}; continue with: "
              f"{continue_command(argv)}", file=sys.stderr, flush=True)
        raise
    finally:
        try:
            journal.end_session(how)
        except OSError:
            pass


def loaded_run(cfg: Config, argv, inputs, journal: Journal, commit: str, n_answers: int, n_batched: int,
               t0: float) -> dict:
    cli.set_threads(cfg.threads)
    log = lambda msg: print(f"[specbench {time.time() - t0:6.0f}s] {msg}", flush=True)  # noqa: E731
    target = models.load_model(inputs["teacher"], device="cpu")
    tokenizer = models.load_tokenizer(inputs["teacher"])
    loaded = {name: models.load_model(path, device="cpu") for name, _, path in inputs["drafts"]}
    protocol = models.decoding_protocol(cfg.preset, tokenizer, target, task=cfg.task, gamma=cfg.gamma,
                                        temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens)
    methods = build_methods(inputs["drafts"], loaded, protocol.gamma)
    log(f"{len(inputs['questions'])} questions, methods {', '.join(m.name for m in methods)}, {cfg.repeats} run(s), "
        f"max_new_tokens {protocol.max_new_tokens}; journal {journal.path}"
        + (f": {journal.read_back[0]}/{n_answers} answers and {journal.read_back[1]}/{n_batched} batched chunk runs "
           f"read back (session {journal.sessions})" if journal.sessions > 1 else " (new)"))
    return run_and_report(cfg, argv, inputs, methods, target, tokenizer, protocol, journal, commit, t0, log)


def run_and_report(cfg: Config, argv, inputs, methods, target, tokenizer, protocol, journal, commit, t0, log) -> dict:
    """The work: the batch-1 answers and the batched table (what the journal lacks), then the answer files and the
    report, written from the journal's records."""
    questions = inputs["questions"]
    answers_root = Path(cfg.results) / cfg.preset / "specbench"
    results = run_repeats(cfg, methods, target, tokenizer, questions, protocol, log, journal)
    files = write_repeat_files(cfg, results, journal.answers, tokenizer, protocol)
    spec = [m.name for m in methods if m.kind != "vanilla"]
    acceptance = {m: per_question_acceptance(results, m) for m in spec}
    gains = {m.name: {"specdec-baseline": paired_by_subtask(acceptance[m.name], acceptance["specdec-baseline"],
                                                             questions, cfg.n_boot, cfg.seed),
                      "sps": paired_by_subtask(acceptance[m.name], acceptance["sps"], questions, cfg.n_boot, cfg.seed)}
             for m in methods if m.kind == "specdec" and m.name != "specdec-baseline"}
    log("teacher entropy, equality")
    entropies = teacher_entropies(target, results[0]["vanilla"], cfg.temperature, protocol.vocab_size)
    eq = ({m: equality(results, m, tokenizer, target, protocol) for m in spec} if cfg.temperature == 0 else {})
    batched = batched_run(cfg, methods, target, batched_prompts(results[0]["vanilla"]), protocol, log, journal)
    doc = {"preset": cfg.preset, "command": " ".join(["python -m study.specbench", *argv]),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}", "threads": cfg.threads,
           "commit": commit, "minutes": math.nan, "sessions": journal.sessions, "code_versions": len(journal.code), "n_questions": len(questions),
           "n_turns": sum(len(q["turns"]) for q in questions), "repeats": cfg.repeats,
           "protocol": protocol.as_dict(), "teacher": inputs["teacher"], "drafts": inputs["drafts"],
           "answers": str(answers_root),
           "leaderboard": leaderboard(files, methods),
           "vanilla_tokens_per_s": float(np.mean([np.mean([question_speed(r) for r in files[k]["vanilla"]]) for k in files])),
           "n_by_subtask": {c: sum(q["category"] in cats for q in questions) for c, cats in SUBTASKS.items()},
           "entropy": by_subtask(entropies, questions, cfg.n_boot, cfg.seed),
           "acceptance": {m: by_subtask(acceptance[m], questions, cfg.n_boot, cfg.seed) for m in spec},
           "gains": gains, "equality": eq, "batched": batched, "config": asdict(cfg)}
    doc["minutes"] = (journal.earlier_seconds + time.time() - t0) / 60
    out = report_path(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report_markdown(doc))
    (answers_root / "specbench.json").write_text(json.dumps(doc, indent=1, default=str))
    print(report_markdown(doc))
    log(f"-> {out}, {answers_root}/run_*/")
    return doc


if __name__ == "__main__":
    cli.script_main(main)
