"""The study's question as a curve: which divergence distils the best draft, as a function of the
teacher's entropy, in a task family whose entropy is set by one knob.

p = target/teacher, q = draft/student. H(p) = -sum_x p(x) log p(x) in nats, of the PROCESSED p
(temperature, then top-p: the p verification uses, entropy.processed_entropy).

The task family ("choice-k", ``family_examples``): a fixed-structure text. The prompt (the user turn)
holds N_NOTES distractor keys and a start key, each one of N_KEYS words; the completion walks N_ITEMS
steps through the keys on a fixed cycle (key -> key + STRIDE mod N_KEYS) from the start key and writes
each step as one of its key's K equally valid words, uniformly at random, then stops:

    prompt      "Notes: apple piano river tiger apple rocket. Start: candle"
    completion  "bip mur mop den pug sib sal vut tos nep"    step j: one of the first K of WORDS[key_j]

Every word is one token of the family's tokenizer, so a teacher that learnt the data has
H(p) = log K at each of the N_ITEMS word positions and 0 at the stop token:
    mean processed H(p) ~ N_ITEMS / (N_ITEMS + 1) * log K          (measured, not assumed: `measure_entropy`)
K = 1 is a deterministic lookup (H = 0, like GSM8k's "one right answer"); K = 16 gives ~2.5 nats
(many right answers, like CNN/DM). Everything else is fixed across settings: the prompts (the same
prompt set for every K), the completion length, ONE tokenizer (trained on the K = K_MAX text, so every
word of every setting is in it), the architectures, the model sizes and every training budget. Each
setting K gets its own teacher and its own baseline draft (the same recipe as models.ensure_tiny_pair:
SFT on prompt + completion, the draft smaller and trained for fewer steps), cached under
checkpoints/curve[-test]/k<K>/{teacher,student}.

The rows are written in CNN/DM's columns (article = the prompt, highlights = the completion) and use
its system prompt ("Write a very short summary ..."): the completion is a "summary" of the walk with
K equally good wordings per step. So distill.py trains the drafts unchanged (``--task cnndm --source
file --data-path <k>/train.jsonl --teacher ... --student ...``) and evaluate.evaluate_draft scores them
with the study's protocol (gamma 5, top-p 0.95, the family's temperature).

The curve (``make curve``; ``make curve QUICK=1`` is the CI smoke run): at every setting, the baseline
and a draft distilled with each divergence for several seeds; per (setting, divergence) token
acceptance and mean accepted length as the mean over seeds of the per-seed mean over prompts, with a
95% interval from the crossed bootstrap over seeds and prompts (stats.metric_bootstrap, as report.py);
each divergence minus the best (highest mean) at each setting, paired by prompt; where the winner
changes between settings; and whether the seed's claim (rkl best at low entropy, jsd at high) holds.
Written to results/CURVE.md with figures results/figures/curve_*.png.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from plumbing import cli
import data
import divergences
import models
from study import stats

REPO = Path(__file__).resolve().parents[1]
TASK = "cnndm"          # the row format and system prompt the family is read through (see the docstring)

# ----------------------------------------------------------------------------- the family

N_KEYS = 12             # keys: each has K_MAX words
N_NOTES = 6             # distractor keys before the start key (they make the prompts many and varied)
N_ITEMS = 10            # words per completion = steps of the walk
STRIDE = 5              # the walk key -> key + STRIDE (mod N_KEYS); 5 and 12 coprime: one cycle
K_MAX = 16              # the largest setting: the tokenizer is trained on its text
KEYS = ("apple", "river", "stone", "cloud", "tiger", "chair", "lemon", "piano", "ocean", "candle", "forest",
        "rocket")


def _words() -> list[list[str]]:
    """K_MAX made-up consonant-vowel-consonant words per key, all distinct (a fixed shuffle)."""
    sylls = [a + b + c for a in "bdfgklmnprstvz" for b in "aeiou" for c in "bdgklmnprst"]
    random.Random(0).shuffle(sylls)
    return [sylls[g * K_MAX:(g + 1) * K_MAX] for g in range(N_KEYS)]


WORDS = _words()


def check_k(k) -> int:
    if not isinstance(k, int) or not 1 <= k <= K_MAX:
        raise ValueError(f"setting k={k!r} is not allowed; k (equally valid words per step) must be an integer "
                         f"in 1..{K_MAX}")
    return k


def family_prompt(rng: random.Random) -> tuple[int, str]:
    """(the start key, the prompt text) of one example: N_NOTES distractor keys, then the start key."""
    notes = [KEYS[rng.randrange(N_KEYS)] for _ in range(N_NOTES)]
    start = rng.randrange(N_KEYS)
    return start, f"Notes: {' '.join(notes)}. Start: {KEYS[start]}"


def next_key(key: int) -> int:
    """The fixed walk over the keys: key -> key + STRIDE (mod N_KEYS), one cycle through all of them."""
    return (key + STRIDE) % N_KEYS


def family_completion(start: int, k: int, rng: random.Random) -> str:
    """One of the k ** N_ITEMS equally valid completions: N_ITEMS steps of the walk from the start key,
    each step written as one of its key's first k words."""
    check_k(k)
    key, words = start, []
    for _ in range(N_ITEMS):
        words.append(WORDS[key][rng.randrange(k)])
        key = next_key(key)
    return " ".join(words)


def family_examples(k: int, split: str, n: int, seed: int = 0) -> list[data.Example]:
    """n examples of setting k. The prompts depend on (split, n, seed) only, never on k: every setting
    shares one prompt set; a prompt's split is data.py's hash rule, so train and eval never share one."""
    check_k(k), data.check_split(split)
    prompts, seen = random.Random(f"curve-prompts/{seed}"), set()
    words = random.Random(f"curve-words/{seed}/{k}/{split}")
    out = []
    while len(out) < n:
        start, prompt = family_prompt(prompts)
        if prompt in seen or data._split_of(prompt) != split:
            continue
        seen.add(prompt)
        out.append(data.Example(prompt=prompt, reference=family_completion(start, k, words)))
    return out


def write_rows(path: Path, examples) -> Path:
    """The examples as CNN/DM-column JSON lines (article, highlights), atomically: distill.py's --data-path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"article": e.prompt, "highlights": e.reference}) + "\n" for e in examples))
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------- the pairs (one per setting)

# The family's own sizes and budgets, the same for every setting (chosen for the curve's hour on 2 cores).
SCALES = {
    "full": {"n_train": 3000,
             "teacher": {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "ffn": 192,
                         "steps": 600, "batch_size": 32, "lr": 3e-3},
             "student": {"hidden": 32, "layers": 1, "heads": 2, "kv_heads": 1, "ffn": 64,
                         "steps": 150, "batch_size": 16, "lr": 3e-3}},
    "test": {"n_train": 600,
             "teacher": {"hidden": 32, "layers": 1, "heads": 2, "kv_heads": 1, "ffn": 64,
                         "steps": 150, "batch_size": 16, "lr": 5e-3},
             "student": {"hidden": 16, "layers": 1, "heads": 1, "kv_heads": 1, "ffn": 32,
                         "steps": 30, "batch_size": 16, "lr": 5e-3}},
}
# The decoding protocol of every setting: the study's gamma and top-p; temperature 1, so the processed
# H(p) is the learnt distribution's (after top-p); room for N_ITEMS words, a stop token and a spare.
PROTOCOL = {"temperature": 1.0, "top_p": 0.95, "top_k": 0, "gamma": 5, "max_new_tokens": N_ITEMS + 4}
TOKENIZER_TEXTS, TOKENIZER_VOCAB = 3000, 1024
FAMILY_VERSION = 1      # bump when the recipe changes: cached pairs of another version are rebuilt


def pair_dir(k: int, root="checkpoints", scale: str = "full") -> Path:
    """checkpoints/curve/k<k> (checkpoints/curve-test/k<k> at the test scale)."""
    root = Path(root) if Path(root).is_absolute() else REPO / root
    return root / ("curve" if scale == "full" else f"curve-{scale}") / f"k{check_k(k)}"


def _stamp(k: int, scale: str) -> dict:
    return {"family": "choice-k", "k": k, "scale": scale, "version": FAMILY_VERSION}


def _is_built(d: Path, k: int, scale: str) -> bool:
    try:
        info = json.loads((d / "build.json").read_text())
    except (OSError, ValueError):
        return False
    return all(info.get(key) == v for key, v in _stamp(k, scale).items())


def family_tokenizer():
    """The family's one tokenizer (models.train_tokenizer, deterministic), the same at every setting and
    scale: trained on TOKENIZER_TEXTS examples of the K_MAX setting, which hold every word of every
    setting, each then one token (the first word of a completion, without its space, too)."""
    exs = family_examples(K_MAX, "train", TOKENIZER_TEXTS)
    corpus = [f"system\n{data.SYSTEM_PROMPTS[TASK]}\nuser\n{e.prompt}\nassistant\n{e.reference}\n" for e in exs]
    return models.train_tokenizer(corpus, TOKENIZER_VOCAB)


def build_family_pair(k: int, out: Path, scale: str = "full") -> dict:
    """Tokenizer, teacher and baseline draft of setting k, as models.build_tiny_pair builds a tiny pair
    (SFT on prompt + completion, loss on the completion), with the family's fixed sizes and budgets."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    sc = SCALES[scale]
    t0, cpu0 = time.time(), time.process_time()
    tok = family_tokenizer()
    examples = family_examples(k, "train", sc["n_train"])
    seqs = models.sft_sequences(tok, TASK, examples)
    info = {**_stamp(k, scale), "real_vocab": len(tok), "mean_tokens": sum(len(s) for s, _ in seqs) / len(seqs)}
    for role, seed in (("teacher", 0), ("student", 1)):
        size = sc[role]
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(models.model_config(TASK, size, tok))
        info[f"{role}_loss"] = models.train_lm(model, seqs, steps=size["steps"], batch_size=size["batch_size"],
                                               lr=size["lr"], seed=seed, pad_id=tok.pad_token_id,
                                               desc=f"curve k={k} {role}")
        info[f"{role}_params"] = sum(p.numel() for p in model.parameters())
        model.generation_config = GenerationConfig(
            do_sample=True, temperature=PROTOCOL["temperature"], top_p=PROTOCOL["top_p"],
            max_new_tokens=PROTOCOL["max_new_tokens"], eos_token_id=models.stop_ids(tok),
            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
        model.save_pretrained(out / role)              # safetensors
        tok.save_pretrained(out / role)
    info["build_s"], info["build_cpu_s"] = round(time.time() - t0, 1), round(time.process_time() - cpu0, 1)
    (out / "build.json").write_text(json.dumps(info, indent=1))
    return info


def ensure_family_pair(k: int, root="checkpoints", scale: str = "full") -> Path:
    """The folder holding teacher/ and student/ of setting k, built on first use under a lock in a
    temporary folder and renamed into place (as models.ensure_tiny_pair): never half a pair."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; valid scales: {', '.join(SCALES)}")
    d = pair_dir(k, root, scale)
    if _is_built(d, k, scale):
        return d
    d.parent.mkdir(parents=True, exist_ok=True)
    with models._BuildLock(d.parent / f".{d.name}.lock"):
        if _is_built(d, k, scale):                     # built by another process while we waited
            return d
        tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}-", dir=d.parent))
        try:
            build_family_pair(k, tmp, scale)
            if d.exists():                             # a stale pair from an older recipe
                shutil.rmtree(d)
            os.replace(tmp, d)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return d


# ----------------------------------------------------------------------------- config

CURVE_DIVS = ("fkl", "rkl", "jsd", "tvd", "nla", "lk")   # the issue's list; jsd: beta = 0.5 (distill's default)
DIVS = ("baseline",) + CURVE_DIVS
METRICS = ("token_acceptance", "mean_accepted_length")
SEED_CLAIM = ("rkl", "jsd")     # the seed project: rkl best at low teacher entropy, jsd at high


@dataclass
class CurveConfig:
    settings: tuple = (1, 2, 3, 5, 8, 12, 16)   # K: equally valid words per step (H ~ log K per word)
    divs: tuple = DIVS
    seeds: tuple = (0, 1, 2, 3)
    steps: int = 60                  # distillation steps per draft, every setting and divergence
    batch_size: int = 16             # prompts per step
    lr: float = 2e-3
    n_train: int = 960               # distillation prompts (train split)
    n_prompts: int = 256             # eval prompts per draft (the same prompts at every setting)
    n_boot: int = 2000
    scale: str = "full"              # the pairs' sizes and budgets (SCALES)
    root: str = "checkpoints"        # the pairs: <root>/curve[-test]/k<K>
    runs: str = "runs/curve"         # the drafts: <runs>/k<K>/<div>-s<seed>
    out: str = "results/CURVE.md"
    reuse: bool = False              # read back a draft's evaluation where it was made with these settings
    quick: bool = False
    threads: int = cli.DEFAULT_THREADS   # CPU threads of every build, training and evaluation


QUICK = dict(settings=(1, 4, 16), seeds=(0, 1), steps=4, n_train=32, n_prompts=16, n_boot=500, scale="test",
             runs="runs/curve-quick", out="results/quick/CURVE.md")


def run_name(div: str, seed) -> str:
    return "baseline" if div == "baseline" else f"{div}-s{seed}"


# ----------------------------------------------------------------------------- measuring (I/O)

@torch.no_grad()
def teacher_entropy_per_prompt(teacher, prompts, protocol) -> tuple[np.ndarray, np.ndarray]:
    """(sum of processed H(p), number of tokens) per prompt, along the teacher's own samples under the
    protocol: entropy.teacher_sample_entropies, kept per prompt so the mean gets a bootstrap interval."""
    import entropy

    rows = entropy.teacher_sample_entropies(teacher, prompts, seed=0, per_row=True, **protocol.generate_kwargs())
    sums = np.array([r.sum() for r in rows], dtype=np.float64)                      # (P,)
    counts = np.array([r.size for r in rows], dtype=np.float64)                     # (P,)
    return sums, counts


def measure_entropy(sums, counts, n_boot: int = 2000) -> tuple[float, float, float]:
    """Mean processed H(p) over every sampled token, (mean, lo, hi): the ratio sum H / tokens with a
    bootstrap over prompts (stats.crossed_bootstrap with one 'seed': the teacher)."""
    return stats.crossed_bootstrap([np.asarray(sums, float)], [np.asarray(counts, float)], n_boot=n_boot)


def distill_argv(cfg: CurveConfig, k: int, div: str, seed: int, pair: Path, train_rows: Path, out: Path) -> list:
    """distill.py's command line for one draft: the setting's pair and rows, the family's protocol and the
    curve's budget (the same at every setting and for every divergence)."""
    return ["--task", TASK, "--div", div, "--seed", str(seed), "--out", str(out),
            "--teacher", str(pair / "teacher"), "--student", str(pair / "student"),
            "--data-path", str(train_rows), "--n-train", str(cfg.n_train),
            "--temperature", str(PROTOCOL["temperature"]), "--top-p", str(PROTOCOL["top_p"]),
            "--max-new-tokens", str(PROTOCOL["max_new_tokens"]), "--steps", str(cfg.steps),
            "--batch-size", str(cfg.batch_size), "--lr", str(cfg.lr), "--save-every", str(cfg.steps),
            "--threads", str(cfg.threads)]


def _fingerprint(cfg: CurveConfig, k: int, div: str, seed) -> dict:
    """What a draft's evaluation depends on: --reuse reads one back only when all of it matches."""
    return {"family_version": FAMILY_VERSION, "k": k, "div": div, "seed": seed, "scale": cfg.scale,
            "steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "n_train": cfg.n_train,
            "n_prompts": cfg.n_prompts, "protocol": PROTOCOL}


def evaluate_setting(cfg: CurveConfig, k: int, log) -> dict:
    """Build (or load) setting k's pair, measure its teacher's entropy, then train and evaluate every
    (divergence, seed) draft. -> {"entropy": (mean, lo, hi), "tempered": float, "build": build.json,
    "per_prompt": {run_name: evaluate_draft's per-prompt metrics}}"""
    import distill
    from study import evaluate

    pair = ensure_family_pair(k, cfg.root, cfg.scale)
    teacher, student, tok = models.load_pair(pair / "teacher", pair / "student")
    protocol = models.decoding_protocol(PROTOCOL, tok, teacher)
    prompts = [data.build_prompt_ids(tok, TASK, e) for e in family_examples(k, "eval", cfg.n_prompts)]
    sums, counts = teacher_entropy_per_prompt(teacher, prompts, protocol)
    out = {"entropy": measure_entropy(sums, counts, cfg.n_boot), "teacher_tokens": int(counts.sum()),
           "build": json.loads((pair / "build.json").read_text()), "per_prompt": {}}
    log(f"k={k}: measured mean processed teacher entropy {out['entropy'][0]:.3f} nats "
        f"[{out['entropy'][1]:.3f}, {out['entropy'][2]:.3f}] over {out['teacher_tokens']} tokens")
    setting_dir = Path(cfg.runs) / f"k{k}"
    train_rows = write_rows(setting_dir / "train.jsonl", family_examples(k, "train", cfg.n_train))
    kwargs = dict(batch_size=64, seed=0, record=False, **protocol.speculative_kwargs())   # acceptance only
    jobs = [("baseline", None)] + [(d, s) for d in cfg.divs if d != "baseline" for s in cfg.seeds]
    for i, (div, seed) in enumerate(jobs, 1):
        t0, name = time.time(), run_name(div, seed)
        run_dir = setting_dir / name
        saved, want = run_dir / "curve_eval.json", _fingerprint(cfg, k, div, seed)
        if cfg.reuse and saved.exists() and json.loads(saved.read_text()).get("fingerprint") == want:
            out["per_prompt"][name] = json.loads(saved.read_text())["per_prompt"]
            log(f"k={k}: reused {name} ({i}/{len(jobs)})")
            continue
        if div == "baseline":
            draft = student
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
            distill.main(distill_argv(cfg, k, div, seed, pair, train_rows, run_dir))
            draft = models.load_model(run_dir / "final", device=teacher.device)
        res = evaluate.evaluate_draft(teacher, draft.eval(), prompts, desc=f"k{k}/{name}", **kwargs)
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = saved.with_suffix(".tmp")
        tmp.write_text(json.dumps({"fingerprint": want, "per_prompt": res["per_prompt"]}))
        tmp.replace(saved)
        out["per_prompt"][name] = res["per_prompt"]
        acc = np.nanmean(np.asarray(res["per_prompt"]["token_acceptance"], dtype=float))
        log(f"k={k}: {name} ({i}/{len(jobs)}) token acceptance {acc:.3f} in {time.time() - t0:.1f}s")
    return out


# ----------------------------------------------------------------------------- the curve (pure)

def collect(per_prompt: dict, divs=DIVS, seeds=(0, 1, 2, 3)) -> dict:
    """{k: {run_name: per-prompt metrics}} -> {k: {div: [per-seed metric arrays]}} (report.per_prompt_metrics).
    Raises report.MissingRunError naming EVERY missing draft: the curve is never drawn from part of it."""
    from study import report

    missing, out = [], {}
    for k, runs in per_prompt.items():
        out[k] = {}
        for div in divs:
            names = [run_name(div, s) for s in ((None,) if div == "baseline" else seeds)]
            absent = [n for n in names if n not in runs]
            missing += [f"k{k}/{n}" for n in absent]
            if not absent:
                out[k][div] = [report.per_prompt_metrics({"per_prompt": runs[n]}) for n in names]
    if missing:
        raise report.MissingRunError(f"no evaluation for {len(missing)} expected draft(s): {', '.join(missing)}")
    return out


def best_of(levels_k: dict, metric: str) -> str:
    """The trained divergence (not the baseline) with the highest mean `metric` at one setting."""
    trained = {d: s[metric][0] for d, s in levels_k.items() if d != "baseline"}
    if not trained:
        raise ValueError("best_of needs at least one trained divergence")
    return max(trained, key=trained.get)


def separated(diff) -> bool:
    """Does the 95% interval of a difference (mean, lo, hi) exclude 0?"""
    return diff is not None and (diff[1] > 0 or diff[2] < 0)


@dataclass
class Curve:
    """The curve's numbers, each (mean, lo, hi) with a 95% crossed-bootstrap interval.
    order: the settings sorted by measured entropy; entropy[k]: measured mean processed H(p);
    levels[k][div][metric]; best[metric][k]: the best trained divergence; to_best[metric][k][div]:
    div minus the best (paired by prompt; None for the best itself); ties[metric][k]: the divergences
    whose difference to the best is not separated from 0 (the best included); claim[k]: rkl - jsd."""
    order: list
    entropy: dict
    levels: dict
    best: dict = field(default_factory=dict)
    to_best: dict = field(default_factory=dict)
    ties: dict = field(default_factory=dict)
    claim: dict = field(default_factory=dict)
    knob: str = "K"                       # how the settings are named in tables and sentences ("T" in real_study.py)
    family: str = "this controlled family"     # what the settings are, for the sentences


def build_curve(collected: dict, entropies: dict, n_boot: int = 2000) -> Curve:
    """Levels, differences to the best and rkl - jsd at every setting, from per-seed per-prompt metrics
    (collect) and the measured entropies {k: (mean, lo, hi)}."""
    order = sorted(collected, key=lambda k: entropies[k][0])
    levels = {k: {d: {m: stats.metric_bootstrap(seeds, m, n_boot) for m in METRICS} for d, seeds in by_div.items()}
              for k, by_div in collected.items()}
    c = Curve(order=order, entropy=dict(entropies), levels=levels)
    for m in METRICS:
        c.best[m], c.to_best[m], c.ties[m] = {}, {}, {}
        for k, by_div in collected.items():
            best = c.best[m][k] = best_of(levels[k], m)
            c.to_best[m][k] = {d: (None if d == best else stats.metric_bootstrap(seeds, m, n_boot, vs=by_div[best]))
                               for d, seeds in by_div.items() if d != "baseline"}
            c.ties[m][k] = [d for d, x in c.to_best[m][k].items() if x is None or not separated(x)]
    a, b = SEED_CLAIM
    for k, by_div in collected.items():
        if a in by_div and b in by_div:
            c.claim[k] = stats.metric_bootstrap(by_div[a], "token_acceptance", n_boot, vs=by_div[b])
    return c


def ranking_changes(c: Curve, metric: str = "token_acceptance") -> list[dict]:
    """Where the best divergence changes between neighbouring settings (in entropy order): the two
    winners and, at each of the two settings, the paired difference old winner - new winner.
    resolved: both differences are separated in the direction of the change (the old winner better
    below, the new one better above); otherwise the change is in the means only."""
    out = []
    for lo_k, hi_k in zip(c.order, c.order[1:]):
        old, new = c.best[metric][lo_k], c.best[metric][hi_k]
        if old == new:
            continue
        below = c.to_best[metric][lo_k][new]          # new - old at the lower setting
        above = c.to_best[metric][hi_k][old]          # old - new at the higher setting
        below = tuple(-x for x in (below[0], below[2], below[1]))     # old - new
        out.append({"from": old, "to": new, "lo_k": lo_k, "hi_k": hi_k, "below": below, "above": above,
                    "resolved": below[1] > 0 and above[2] < 0})
    return out


def claim_verdict(c: Curve) -> dict:
    """The seed's claim in this family: rkl beats jsd at the lowest measured entropy AND jsd beats rkl at
    the highest, each separated (95% interval of rkl - jsd excludes 0 on the right side).
    low_best / high_best: rkl (jsd) is among the best at the lowest (highest) setting (not separated
    from the best). -> {"low": k, "high": k, "low_diff", "high_diff", "low_ok", "high_ok", "holds",
    "contradicted", "low_best", "high_best"}"""
    if not c.claim:
        raise ValueError(f"the claim needs both {SEED_CLAIM[0]} and {SEED_CLAIM[1]} at every setting")
    low, high = c.order[0], c.order[-1]
    ld, hd = c.claim[low], c.claim[high]
    a, b = SEED_CLAIM
    return {"low": low, "high": high, "low_diff": ld, "high_diff": hd,
            "low_ok": ld[1] > 0, "high_ok": hd[2] < 0, "holds": ld[1] > 0 and hd[2] < 0,
            "contradicted": ld[2] < 0 or hd[1] > 0,
            "low_best": a in c.ties["token_acceptance"][low], "high_best": b in c.ties["token_acceptance"][high]}


# ----------------------------------------------------------------------------- plots

METRIC_NAMES = {"token_acceptance": "token acceptance", "mean_accepted_length": "mean accepted length"}


def _series_style(div: str, j: int) -> dict:
    return (dict(color="0.4", ls="--", marker="s") if div == "baseline" else
            dict(color=f"C{j % 10}", ls="-", marker="o"))


def plot_levels(c: Curve, metric: str, path, size_px=(900, 520), dpi: int = 100) -> Path:
    """`metric` vs measured teacher entropy, one line per divergence (baseline dashed), 95% bars on both
    axes (entropy: bootstrap over prompts; metric: over seeds and prompts). PNG of size_px."""
    import entropy

    plt = entropy._pyplot()
    fig, ax = plt.subplots(figsize=(size_px[0] / dpi, size_px[1] / dpi), dpi=dpi)
    divs = all_divs(c.levels)
    span = max(c.entropy[c.order[-1]][0] - c.entropy[c.order[0]][0], 1e-9)
    for j, div in enumerate(divs):
        dx = span * 0.008 * (j - (len(divs) - 1) / 2)     # side by side, so the bars do not hide each other
        ks = [k for k in c.order if div in c.levels[k]]
        x = np.array([c.entropy[k][0] for k in ks]) + dx
        xe = np.array([[c.entropy[k][0] - c.entropy[k][1], c.entropy[k][2] - c.entropy[k][0]] for k in ks]).T
        m, lo, hi = (np.array([c.levels[k][div][metric][i] for k in ks]) for i in range(3))
        ax.errorbar(x, m, yerr=[np.clip(m - lo, 0, None), np.clip(hi - m, 0, None)], xerr=np.clip(xe, 0, None),
                    ms=4, lw=1.2, capsize=2, label=div, **_series_style(div, j))
    ax.set_xlabel("measured mean teacher entropy H(p), nats (processed: temperature + top-p)")
    ax.set_ylabel(f"{METRIC_NAMES[metric]} (95% bootstrap over seeds and prompts)")
    ax.set_title(f"{METRIC_NAMES[metric]} vs teacher entropy, per divergence", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return entropy._save_png(plt, fig, path, dpi)


def plot_to_best(c: Curve, path, metric: str = "token_acceptance", size_px=(900, 520), dpi: int = 100) -> Path:
    """Each divergence minus the best at each setting (points of `metric` x 100 for rates), 95% bars; the
    best of a setting sits on the zero line. PNG of size_px."""
    import entropy

    plt = entropy._pyplot()
    fig, ax = plt.subplots(figsize=(size_px[0] / dpi, size_px[1] / dpi), dpi=dpi)
    scale = 100.0 if metric == "token_acceptance" else 1.0
    divs = all_divs(c.to_best[metric])
    span = max(c.entropy[c.order[-1]][0] - c.entropy[c.order[0]][0], 1e-9)
    for j, div in enumerate(divs, 1):
        dx = span * 0.008 * (j - (len(divs) + 1) / 2)
        ks = [k for k in c.order if div in c.to_best[metric][k]]
        x = np.array([c.entropy[k][0] for k in ks]) + dx
        d = [c.to_best[metric][k][div] or (0.0, 0.0, 0.0) for k in ks]
        m, lo, hi = (scale * np.array([v[i] for v in d]) for i in range(3))
        ax.errorbar(x, m, yerr=[np.clip(m - lo, 0, None), np.clip(hi - m, 0, None)], ms=4, lw=1.2, capsize=2,
                    label=div, **_series_style(div, j))
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xlabel("measured mean teacher entropy H(p), nats")
    unit = "points" if scale == 100 else "tokens"
    ax.set_ylabel(f"{METRIC_NAMES[metric]} minus the best's ({unit}, 95% paired bootstrap)")
    ax.set_title("each divergence minus the best divergence at that entropy (0 = the best)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return entropy._save_png(plt, fig, path, dpi)


def plot_claim(c: Curve, path, size_px=(900, 450), dpi: int = 100) -> Path:
    """rkl - jsd token acceptance (points) vs measured entropy with its 95% band: the seed's claim is
    above 0 at low entropy and below 0 at high entropy. PNG of size_px."""
    import entropy

    plt = entropy._pyplot()
    fig, ax = plt.subplots(figsize=(size_px[0] / dpi, size_px[1] / dpi), dpi=dpi)
    ks = [k for k in c.order if k in c.claim]
    x = np.array([c.entropy[k][0] for k in ks])
    m, lo, hi = (100 * np.array([c.claim[k][i] for k in ks]) for i in range(3))
    ax.fill_between(x, lo, hi, color="C1", alpha=0.25, label="95% interval")
    ax.plot(x, m, "o-", color="C1", label=f"{SEED_CLAIM[0]} - {SEED_CLAIM[1]}")
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xlabel("measured mean teacher entropy H(p), nats")
    ax.set_ylabel("token acceptance difference (points)")
    ax.set_title(f"the seed's claim: {SEED_CLAIM[0]} - {SEED_CLAIM[1]} > 0 at low entropy, < 0 at high", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return entropy._save_png(plt, fig, path, dpi)


def plot_knob(c: Curve, path, size_px=(700, 450), dpi: int = 100) -> Path:
    """The knob K vs the measured mean teacher entropy (95% bars), with the ideal teacher's
    N_ITEMS / (N_ITEMS + 1) log K. PNG of size_px."""
    import entropy

    plt = entropy._pyplot()
    fig, ax = plt.subplots(figsize=(size_px[0] / dpi, size_px[1] / dpi), dpi=dpi)
    ks = sorted(c.entropy)
    m, lo, hi = (np.array([c.entropy[k][i] for k in ks]) for i in range(3))
    ax.errorbar(ks, m, yerr=[np.clip(m - lo, 0, None), np.clip(hi - m, 0, None)], fmt="o", capsize=3,
                label="measured (teacher's own samples)")
    grid = np.linspace(1, max(ks), 200)
    ax.plot(grid, ideal_entropy(grid), "k--", lw=1, label=f"ideal teacher: {N_ITEMS}/{N_ITEMS + 1} log K")
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K: equally valid words per step (the knob)")
    ax.set_ylabel("mean processed teacher entropy (nats)")
    ax.set_title("the entropy knob", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return entropy._save_png(plt, fig, path, dpi)


def ideal_entropy(k):
    """Mean H(p) of a teacher that learnt the family exactly: log K at the N_ITEMS words, 0 at the stop."""
    return N_ITEMS / (N_ITEMS + 1) * np.log(np.asarray(k, dtype=np.float64))


# ----------------------------------------------------------------------------- CURVE.md

def _lvl(stat, digits=3) -> str:
    return f"{stat[0]:.{digits}f} [{stat[1]:.{digits}f}, {stat[2]:.{digits}f}]"


def _pts(stat) -> str:
    return "best" if stat is None else f"{100 * stat[0]:+.1f} [{100 * stat[1]:+.1f}, {100 * stat[2]:+.1f}]"


def _tok(stat) -> str:
    return "best" if stat is None else f"{stat[0]:+.2f} [{stat[1]:+.2f}, {stat[2]:+.2f}]"


def _h(c: Curve, k) -> str:
    return f"{c.entropy[k][0]:.2f}"


def all_divs(by_setting: dict) -> list:
    """The divergences of every setting, in first-seen order (a study may train some at one setting only)."""
    return list(dict.fromkeys(d for per_div in by_setting.values() for d in per_div))


def levels_markdown(c: Curve, metric: str) -> str:
    """Settings (entropy order) as rows, divergences as columns: mean [95% CI]; the best trained one bold."""
    divs = all_divs(c.levels)
    digits = 3 if metric == "token_acceptance" else 2
    lines = [f"| {c.knob} | teacher H(p), nats | " + " | ".join(divs) + " |", "|---:|---:|" + "---|" * len(divs)]
    for k in c.order:
        cells = [("-" if d not in c.levels[k] else f"**{_lvl(c.levels[k][d][metric], digits)}**"
                  if d == c.best[metric][k] else _lvl(c.levels[k][d][metric], digits)) for d in divs]
        lines.append(f"| {k} | {_lvl(c.entropy[k], 2)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_best_markdown(c: Curve, metric: str = "token_acceptance") -> str:
    """Per setting: the best divergence and each one's difference to it (points for rates, tokens for the
    length), 95% paired interval; '(tied)' marks a difference whose interval includes 0."""
    fmt = _pts if metric == "token_acceptance" else _tok
    divs = all_divs(c.to_best[metric])
    lines = [f"| {c.knob} | teacher H(p) | best | " + " | ".join(divs) + " |", "|---:|---:|---|" + "---|" * len(divs)]
    for k in c.order:
        cells = []
        for d in divs:
            if d not in c.to_best[metric][k]:
                cells.append("-")
                continue
            x = c.to_best[metric][k][d]
            cells.append(fmt(x) + (" (tied)" if x is not None and not separated(x) else ""))
        lines.append(f"| {k} | {_h(c, k)} | {c.best[metric][k]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _direction(diff, claimed: int) -> str:
    """What a difference's interval says about a claimed sign (+1: > 0, -1: < 0)."""
    if not separated(diff):
        return "not separated, the interval includes 0"
    return "separated as claimed" if (diff[1] > 0) == (claimed > 0) else "separated AGAINST the claim"


def answer_sentences(c: Curve) -> list[str]:
    """The plain answer: the best divergence at each entropy with what it is tied with, where the ranking
    changes (with its intervals), and the seed's claim."""
    m = "token_acceptance"
    out = []
    for k in c.order:
        best, ties = c.best[m][k], [d for d in c.ties[m][k] if d != c.best[m][k]]
        others = [d for d in c.to_best[m][k] if d != best]
        runner = max(others, key=lambda d: c.to_best[m][k][d][0]) if others else None
        text = (f"At {c.knob} = {k} (teacher entropy {_lvl(c.entropy[k], 2)} nats) the best draft is {best}'s, token "
                f"acceptance {_lvl(c.levels[k][best][m])}")
        if runner is not None:
            text += f"; the runner-up {runner} is {_pts(c.to_best[m][k][runner])} points"
        if ties:
            text += f"; not separated from the best (95% interval includes 0): {', '.join(ties)}"
        elif others:
            text += "; every other divergence is separated below it"
        else:
            text += " (the only divergence measured there)"
        out.append(text + ".")
    if len(c.order) < 2:                  # one setting: nothing changes along the knob, and no claim to test
        return out
    changes = ranking_changes(c, m)
    if not changes:
        out.append(f"The best divergence is the same ({c.best[m][c.order[0]]}) at every setting: the ranking's top "
                   f"does not change with the teacher's entropy in {c.family}.")
    for ch in changes:
        what = ("a resolved change (both differences separated)" if ch["resolved"] else
                "a change in the means only (at least one difference's interval includes 0)")
        out.append(f"Between {c.knob} = {ch['lo_k']} ({_h(c, ch['lo_k'])} nats) and {c.knob} = {ch['hi_k']} ({_h(c, ch['hi_k'])} "
                   f"nats) the best changes from {ch['from']} to {ch['to']}: {ch['from']} - {ch['to']} = "
                   f"{_pts(ch['below'])} points below, {_pts(ch['above'])} above; {what}.")
    if c.claim:
        v = claim_verdict(c)
        a, b = SEED_CLAIM
        verdict = ("HOLDS" if v["holds"] else "is CONTRADICTED" if v["contradicted"] else "is NOT SUPPORTED")
        out.append(
            f"The seed's claim ({a} best at low entropy, {b} at high) {verdict} in {c.family}: "
            f"{a} - {b} = {_pts(v['low_diff'])} points at the lowest entropy ({c.knob} = {v['low']}, {_h(c, v['low'])} nats: "
            f"{_direction(v['low_diff'], +1)}) and {_pts(v['high_diff'])} at the highest ({c.knob} = {v['high']}, "
            f"{_h(c, v['high'])} nats: {_direction(v['high_diff'], -1)}); {a} is {'' if v['low_best'] else 'not '}"
            f"among the best at the lowest, {b} is {'' if v['high_best'] else 'not '}among the best at the highest.")
    return out


def write_curve(cfg: CurveConfig, c: Curve, builds: dict, plots: dict, meta: dict) -> Path:
    """results/CURVE.md (QUICK: results/quick/CURVE.md), written atomically."""
    md = [HEADING + (" (QUICK smoke run)" if cfg.quick else ""), ""]
    md += [f"Written by `{meta['command']}` on {meta['date']} ({meta['machine']}), commit {meta['commit']}, in "
           f"{meta['minutes']:.1f} min. Every number below was computed by that invocation"
           + (" (--reuse: drafts whose evaluation matched these settings were read back)." if cfg.reuse else "."),
           ""]
    if cfg.quick:
        md += ["**QUICK run: test-scale pairs, few settings, seeds and steps. A smoke test of the pipeline, not a "
               "result.**", ""]
    md += ["## Answer", ""] + [f"- {x}" for x in answer_sentences(c)] + [""]
    md += [f"![token acceptance vs teacher entropy]({plots['token_acceptance']})", "",
           f"![difference to the best]({plots['to_best']})", ""]
    if "claim" in plots:
        md += [f"![the seed's claim]({plots['claim']})", ""]
    md += ["## The task family and its entropy knob", "",
           f"One stand-in generator (curve.py, `family_examples`): the prompt holds {N_NOTES} distractor keys and a "
           f"start key (of {N_KEYS}); the completion walks {N_ITEMS} steps through the keys on a fixed cycle from the "
           f"start key and writes each step as one of its key's first K words (each one token), uniformly at random, "
           f"then stops. K is the only thing that changes: the prompts (the same {cfg.n_prompts} eval prompts at "
           f"every K), the completion length, the tokenizer (one, trained on the K = {K_MAX} text), the "
           f"architectures, the sizes and every training budget are the same at every "
           f"setting. A teacher and a baseline draft are trained per setting (SCALES['{cfg.scale}']). Measured: the "
           f"mean processed H(p) (temperature {PROTOCOL['temperature']:g}, top-p {PROTOCOL['top_p']:g}) over every "
           f"token the teacher sampled on its own for the eval prompts, 95% bootstrap over prompts; the ideal "
           f"teacher's is {N_ITEMS}/{N_ITEMS + 1} log K.", "",
           "| K | measured H(p), nats [95% CI] | ideal | teacher tokens | teacher / draft SFT loss |",
           "|---:|---|---:|---:|---|"]
    for k in sorted(c.entropy):
        b = builds[k]
        md.append(f"| {k} | {_lvl(c.entropy[k], 3)} | {float(ideal_entropy(k)):.3f} | {b['teacher_tokens']} | "
                  f"{b['teacher_loss']:.3f} / {b['student_loss']:.3f} |")
    md += ["", f"![the entropy knob]({plots['knob']})", ""]
    md += ["## Token acceptance per setting and divergence", "",
           f"Batched speculative decoding (gamma {PROTOCOL['gamma']}, top-p {PROTOCOL['top_p']:g}, temperature "
           f"{PROTOCOL['temperature']:g}) of {cfg.n_prompts} held-out prompts; drafts distilled with distill.py for "
           f"{cfg.steps} steps of {cfg.batch_size} prompts (lr {cfg.lr:g}, purely on-policy), training seeds "
           f"{', '.join(map(str, cfg.seeds))}. Mean over seeds of the per-seed mean over prompts, 95% interval from "
           f"the crossed bootstrap over seeds and prompts ({cfg.n_boot} resamples, stats.py, as in REPORT.md). Rows "
           "in order of measured entropy; the best trained divergence of a row in bold.", "",
           levels_markdown(c, "token_acceptance"), "",
           "## Mean accepted length (tokens per target call, bonus included)", "",
           levels_markdown(c, "mean_accepted_length"), "",
           f"![mean accepted length vs teacher entropy]({plots['mean_accepted_length']})", "",
           "## Each divergence minus the best at each setting", "",
           "Token acceptance, in points, paired by prompt (one prompt draw shared by both sides), 95% interval; "
           "'(tied)': the interval includes 0.", "", to_best_markdown(c, "token_acceptance"), "",
           "Mean accepted length, in tokens:", "", to_best_markdown(c, "mean_accepted_length"), ""]
    if c.claim:
        a, b = SEED_CLAIM
        md += [f"## The seed's claim: {a} - {b} at every setting", "",
               "| K | teacher H(p) | " + f"{a} - {b}, token acceptance points [95% CI] |", "|---:|---:|---|"]
        md += [f"| {k} | {_h(c, k)} | {_pts(c.claim[k])}{'' if separated(c.claim[k]) else ' (tied)'} |"
               for k in c.order]
        md.append("")
    return cli.write_markdown(cfg.out, md)


# ----------------------------------------------------------------------------- command line

def parse_args(argv=None) -> CurveConfig:
    p = cli.ArgumentParser(prog="python -m study.curve", description=cli.description(__doc__))
    p.add_argument("--quick", action="store_true", help="test-scale pairs, 3 settings, 2 seeds, few steps (CI)")
    p.add_argument("--settings", nargs="+", type=int, default=None, help=f"values of K in 1..{K_MAX}")
    p.add_argument("--divs", nargs="+", default=None, help="baseline and divergences of distill.py --div")
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--n-prompts", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--reuse", action="store_true", help="read back each draft's evaluation where it was made "
                   "with exactly these settings (<runs>/k<K>/<draft>/curve_eval.json)")
    cli.add_threads_option(p)
    a = p.parse_args(argv)
    cfg = CurveConfig(quick=a.quick, reuse=a.reuse, threads=cli.check_threads(a.threads))
    cli.apply_overrides(cfg, a, QUICK if a.quick else None, sequences=("settings", "divs", "seeds"),
                        values=("steps", "n_prompts", "out"))
    check_config(cfg)
    return cfg


HEADING = "# The curve: which divergence distils the best draft at which teacher entropy"   # CURVE.md's first line


def check_config(cfg: CurveConfig):
    """Every value checked before anything is built (ValueError naming it and what is allowed)."""
    for k in cfg.settings:
        check_k(k)
    if len(set(cfg.settings)) != len(cfg.settings) or len(cfg.settings) < 2:
        raise ValueError(f"--settings {list(cfg.settings)}: need at least 2 distinct values of K")
    allowed = ("baseline",) + tuple(divergences.DIVERGENCES)
    bad = [d for d in cfg.divs if d not in allowed]
    if bad:
        raise ValueError(f"unknown --divs {bad}; valid: {', '.join(allowed)}")
    if len([d for d in cfg.divs if d != "baseline"]) < 1:
        raise ValueError("--divs needs at least one trained divergence besides the baseline")
    for name in ("steps", "n_prompts"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ValueError(f"--seeds {list(cfg.seeds)}: need distinct integers >= 0")
    for seed in cfg.seeds:
        cli.check_seed(seed, "--seeds")
    cli.check_markdown_out(cfg.out, HEADING, CurveConfig.out)            # written at the very end: checked before the study


def main(argv=None) -> Path:
    from study import report

    argv = sys.argv[1:] if argv is None else list(argv)
    with cli.before_the_work():
        cfg = parse_args(argv)
    cli.set_threads(cfg.threads)
    t0, commit = time.time(), report.source_commit()
    log = lambda msg: print(f"[curve {time.time() - t0:6.0f}s] {msg}", flush=True)  # noqa: E731
    n_train = len([d for d in cfg.divs if d != "baseline"]) * len(cfg.seeds)
    log(f"plan: {len(cfg.settings)} settings K = {', '.join(map(str, cfg.settings))} x {n_train} drafts "
        f"({cfg.steps} steps each) + the baseline; {cfg.n_prompts} eval prompts per draft")
    results = {k: evaluate_setting(cfg, k, log) for k in cfg.settings}
    collected = collect({k: r["per_prompt"] for k, r in results.items()}, cfg.divs, cfg.seeds)
    c = build_curve(collected, {k: r["entropy"] for k, r in results.items()}, cfg.n_boot)
    out_dir = Path(cfg.out).parent
    fig = out_dir / "figures"
    plots = {m: plot_levels(c, m, fig / f"curve_{m}.png") for m in METRICS}
    plots["to_best"] = plot_to_best(c, fig / "curve_to_best.png")
    plots["knob"] = plot_knob(c, fig / "curve_entropy_knob.png")
    if c.claim:
        plots["claim"] = plot_claim(c, fig / "curve_seed_claim.png")
    plots = {key: p.relative_to(out_dir).as_posix() for key, p in plots.items()}
    meta = report._meta(t0, argv, commit)
    meta["command"] = " ".join(["python -m study.curve", *argv])
    builds = {k: {**r["build"], "teacher_tokens": r["teacher_tokens"]} for k, r in results.items()}
    out = write_curve(cfg, c, builds, plots, meta)
    log(f"wrote {out}")
    return out


if __name__ == "__main__":
    cli.script_main(main)
