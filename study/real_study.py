"""The seed's question on a real target: which divergence distils the best draft of SmolLM2-135M-Instruct, as
the teacher's entropy changes. `make real-study` -> results/REAL.md (QUICK=1: CI's smoke run).

p = the target (teacher): SmolLM2-135M-Instruct, the smollm2 preset's real model (models.ensure_smollm2_pair).
q = a draft (student): the baseline is the target's first k = 4 decoder layers under its final norm and tied
head; every other draft is distilled from that baseline by distill.py with one divergence d(p, q) per token
(divergences.py):
    fkl  KL(p || q)           rkl  KL(q || p)          jsd  JSD_beta with beta = 0.5
    tvd  (1/2) sum_x |p - q|  nla, lk  the acceptance objectives (at the preset's temperature only: budget)

The knob is the sampling temperature T; one thing changes per setting. At each T, distill.py samples and scores
at T (--temperature T: the loss temperature follows) and evaluation decodes at T (top-p 0.95, gamma 5, 128 new
tokens: the preset's protocol otherwise). The teacher's entropy is measured, not assumed:
    H(p) = -sum_x p(x) log p(x)   (nats; p processed: temperature T, then top-p)
at every token the teacher samples on its own for the eval prompts (curve.teacher_entropy_per_prompt), the
mean over tokens with a 95% bootstrap over prompts.

Per (T, divergence), on the first N prompts of the task's test split (every draft decodes the same prompts with
the same sampling seed). The task: GSM8k (default; REAL.md), or --task dialogsum, the real open-ended one
(data/dialogsum: summaries of dialogues; its runs, ledger entries and report under <task>/ and REAL-dialogsum.md):
    token acceptance        accepted / drafted tokens, per prompt
    mean accepted length    tokens per target call (bonus included), per prompt
each the mean over training seeds of the per-seed mean over prompts, with a 95% interval from the crossed
bootstrap over seeds and prompts (stats.metric_bootstrap); each divergence minus the best at that T, paired by
prompt; rkl - jsd (the seed's claim: rkl best where the teacher is confident, jsd where it is not) at every T.
That analysis is curve.py's (`curve.build_curve`, `curve.claim_verdict`, its tables and plots): CURVE.md asks the
same question on a synthetic family with a controlled entropy knob; REAL.md on the real target. Beside it:
train_alpha and val_alpha (logged while training, estimates.py) against the measured alpha of each draft.

Budget and caching. On one CPU thread a draft costs ~35 min of training (80 steps of 8 prompts x 128 tokens) and
~N/10 min of evaluation, so the study (3 temperatures x 4 divergences x 2 seeds, + nla and lk at T = 0.6, + the
noise probe: WHOLE_STUDY) is a few dozen CPU hours. REAL.md's budget prices the rest of the study at the
measured means, and estimates one GPU's time by counting each run's sequential forward steps (a model this
small is launch-bound there; the step cost is the line through the project's two H100 measurements,
gpu_step_ms). --device cuda runs it on a GPU: the recipe (and so the ledger's fingerprint) is the same, its
seconds are kept apart from the CPU's (cost_key) and each ledger entry names its device. Everything is cached
under <runs>/T<T>/: <div>-s<seed>/ is distill.py's run (a killed run resumes from its newest checkpoint; once
final/ exists the intermediate checkpoints are removed), and its real_eval.json its evaluation, with a
fingerprint of everything the numbers depend on (read back only when all of it matches, else measured again).
A run found under another configuration is refused, naming the difference. So the study can be run a piece at a
time (--settings, --divs, --seeds) and completed over several sessions; the report covers the settings it is
given, and a missing draft stops it before anything is written.

The ledger. The drafts are hundreds of MB each and <runs> is not part of the repository, so a machine that is
lost loses them. What the report needs of a draft is small: its per-prompt metrics, pooled alpha, train_alpha,
val_alpha and cost. Each finished measurement is also written to the ledger, <ledger>/T<T>/<run>.json (default
results/real-study/, committed with the results), under a fingerprint of the command that trained the draft
(distill.py's options), the target's sha256, the prompts and the protocol. A ledger entry of the same
fingerprint is read back without the draft: the study continues on a new machine from what was committed, and
trains and evaluates only what the ledger lacks. The teacher's entropy per T is kept there too. --from-ledger
writes the report of the study so far and trains nothing: each temperature at the seeds the ledger holds for every
one of its drafts (the divergences of a row are compared over the same seeds), a temperature it cannot report yet
left out, and the header names what is missing.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from plumbing import cli
from study import curve
import data
import divergences
from study import estimates
import models

PRESET = "smollm2"
TASK_NAMES = {"gsm8k": "GSM8k", "dialogsum": "DialogSum"}   # the preset's tasks, as the report names them
PRESET_T = 0.6                       # the preset's temperature: where nla and lk are trained too
HEADING = "# The real target: which divergence distils the best draft of SmolLM2-135M-Instruct"


@dataclass
class StudyConfig:
    settings: tuple = (0.3, 0.6, 1.0)           # sampling temperatures T (training and evaluation)
    divs: tuple = ("baseline", "fkl", "rkl", "jsd", "tvd")     # at every T
    extra_divs: tuple = ("nla", "lk")           # at PRESET_T only
    seeds: tuple = (0, 1)                       # training seeds
    task: str = "gsm8k"                         # the smollm2 preset's task (dialogsum: the open-ended one)
    n_prompts: int = 256                        # the task's test prompts per evaluation
    steps: int | None = None                    # distill.py's options; None: the preset's
    batch_size: int | None = None
    max_new_tokens: int | None = None
    n_train: int | None = None
    off_policy_warmup: int | None = None
    val_prompts: int = 32                       # --eval-prompts of every run (its val_alpha)
    eval_batch: int = 16                        # prompts decoded together in evaluation
    n_boot: int = 2000
    runs: str = "runs/real-study"
    ledger: str = "results/real-study"          # the measurements, committed (see "The ledger" above)
    out: str = "results/REAL.md"
    specbench: str = "results/smollm2/specbench/specbench.json"    # specbench.py's full run, read if there
    quick: bool = False
    from_ledger: bool = False                   # report what the ledger holds; train and measure nothing
    threads: int = cli.DEFAULT_THREADS
    device: str = "cpu"                         # where the teacher, the training and the evaluation run


# The whole study of each task: what its report calls complete. GSM8k carries the knob, up to T = 1.0: at its
# noise probe, T = 1.3, the teacher's entropy is measured and the baseline draft evaluated, but no draft is
# distilled (its entropy there is several nats, more than half of ln V: a teacher spread that thin writes
# incoherent text, not solutions; REAL.md quotes the measured numbers). DialogSum is the real high-entropy task,
# studied at the preset's temperature: the knob is GSM8k's.
WHOLE_STUDY = {"gsm8k": {}, "dialogsum": dict(settings=(PRESET_T,), extra_divs=())}
NOISE_PROBE_T = {"gsm8k": 1.3}


def whole_study(task: str) -> StudyConfig:
    """StudyConfig of the task's whole study (WHOLE_STUDY): the defaults of `--task TASK`."""
    if task not in WHOLE_STUDY:
        raise cli.BadInput(f"unknown --task {task!r}; valid: {', '.join(TASK_NAMES)} (the smollm2 preset's tasks)")
    return StudyConfig(task=task, **WHOLE_STUDY[task])


# distill.py's options the study may set (StudyConfig's fields of the same names; None: the preset's)
DISTILL_OVERRIDES = ("steps", "batch_size", "max_new_tokens", "n_train", "off_policy_warmup")

QUICK = dict(settings=(0.6,), divs=("baseline", "rkl", "jsd"), extra_divs=(), seeds=(0,), n_prompts=6, steps=2,
             batch_size=2, max_new_tokens=12, n_train=16, off_policy_warmup=1, val_prompts=2, eval_batch=6,
             n_boot=200, runs="runs/real-study-quick", ledger="results/quick/real-study",
             out="results/quick/REAL.md", specbench="results/quick/specbench.json")


def divs_at(cfg: StudyConfig, t: float) -> tuple:
    """The drafts of setting T: the main divergences everywhere, the acceptance objectives at PRESET_T."""
    return cfg.divs + (tuple(d for d in cfg.extra_divs if d not in cfg.divs) if t == PRESET_T else ())


def task_folder(cfg: StudyConfig) -> str:
    """'' for GSM8k (the study's first task: <runs>/T<T>, <ledger>/T<T>), else '<task>/'."""
    return "" if cfg.task == "gsm8k" else f"{cfg.task}/"


def figure_prefix(cfg: StudyConfig) -> str:
    """The report's plots: figures/real_<plot>.png for GSM8k, figures/real-<task>_<plot>.png for another task (its
    report must not overwrite REAL.md's plots)."""
    return "real" if cfg.task == "gsm8k" else f"real-{cfg.task}"


def setting_dir(cfg: StudyConfig, t: float) -> Path:
    return Path(cfg.runs) / f"{task_folder(cfg)}T{t:g}"


def ledger_path(cfg: StudyConfig, t: float, name: str) -> Path:
    """<ledger>/[<task>/]T<T>/<name>.json: one measurement of setting T, kept with the results."""
    return Path(cfg.ledger) / f"{task_folder(cfg)}T{t:g}" / f"{name}.json"


# ----------------------------------------------------------------------------- training (distill.py, cached)

def distill_argv(cfg: StudyConfig, t: float, div: str, seed: int, out: Path) -> list[str]:
    """distill.py's command line for one draft: the preset's pair, data and recipe at temperature t; the study's
    budget where it sets one; validation of the final student for val_alpha."""
    steps = cfg.steps or models.preset_config(PRESET, cfg.task)["steps"]
    argv = ["--preset", PRESET, "--task", cfg.task, "--div", div, "--seed", str(seed), "--temperature", f"{t:g}",
            "--out", str(out), "--eval-every", str(steps), "--eval-prompts", str(cfg.val_prompts),
            "--save-every", str(min(20, steps)), "--threads", str(cfg.threads)]
    for name in DISTILL_OVERRIDES:
        if getattr(cfg, name) is not None:
            argv += ["--" + name.replace("_", "-"), str(getattr(cfg, name))]
    return argv + ["--device", cfg.device]


def config_differences(run_dir: Path, argv: list[str]) -> list[str]:
    """The options of `argv` whose value differs from the run's config.json (which distill.py wrote):
    a cached run is reused only for the very command the study would run (where it runs aside: a run begun on
    the CPU may be resumed on a GPU)."""
    import distill

    given = {a[2:].replace("-", "_") for a in argv if a.startswith("--")} - {"out", "save_every", "device"}
    wanted = asdict(distill.parse_args(argv))
    saved = json.loads((run_dir / "config.json").read_text())
    return [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {wanted[k]!r}" for k in sorted(given)
            if saved.get(k) != wanted[k]]


def train_draft(cfg: StudyConfig, t: float, div: str, seed: int, log) -> Path:
    """The run's final/ folder: trained now, resumed from its newest checkpoint, or found finished."""
    import distill
    from plumbing import checkpoints

    out = setting_dir(cfg, t) / curve.run_name(div, seed)
    argv = distill_argv(cfg, t, div, seed, out)
    if (out / "config.json").exists() and (diff := config_differences(out, argv)):
        raise cli.BadInput(f"{out} holds a run of another configuration ({'; '.join(diff)}): move it away, or "
                           f"pass another --runs")
    if out.exists():
        wait_while_in_use(out, log)
    if not (out / "final").exists():
        resumable = checkpoints.latest_checkpoint(out) if out.exists() else None
        if out.exists() and resumable is None:
            shutil.rmtree(out)               # a run that died before its first checkpoint: start it again
        t0 = time.time()
        log(f"T={t:g}: {'resuming' if resumable else 'training'} {out.name}")
        distill.main(argv + (["--resume"] if resumable else []))
        record_cost(out, cost_key("train", cfg.device), time.time() - t0)
    for ckpt in out.glob("ckpt-*"):          # final/ is the result; the resume points are no longer needed
        shutil.rmtree(ckpt)
    return out / "final"


def wait_while_in_use(out: Path, log, poll_s: float = 60.0):
    """A run another process is training (a second study, or distill.py started by hand) is waited for, then
    found finished or resumed: two writers of one run directory never run at once (rundir.RunLock)."""
    from plumbing import rundir

    said = False
    while True:
        try:
            rundir.RunLock(out).acquire().release()
            return
        except rundir.RunDirError as e:
            if not said:
                log(f"{e}: waiting for it")
                said = True
            time.sleep(poll_s)


def cost_key(phase: str, device: str) -> str:
    """The cost entry of a phase ("train", "eval", "entropy"): <phase>_s for CPU seconds (one thread),
    <phase>_gpu_s for seconds on an accelerator; the budget adds each kind up apart."""
    return f"{phase}_s" if on_cpu(device) else f"{phase}_gpu_s"


def on_cpu(device: str) -> bool:
    import torch

    return torch.device(device).type == "cpu"


def record_cost(run_dir: Path, key: str, seconds: float):
    """Add measured seconds to <run>/study_cost.json (the study's budget, summed over sessions)."""
    path = run_dir / "study_cost.json"
    cost = json.loads(path.read_text()) if path.exists() else {}
    cost[key] = cost.get(key, 0.0) + seconds
    write_json(path, cost)


def run_cost(run_dir: Path) -> dict:
    """{"train_s", "eval_s"} (or their GPU keys, cost_key) measured by the study; a run trained elsewhere (no
    training time of either kind) is timed by its files: config.json (written at the start) to final/ (the end)."""
    path = run_dir / "study_cost.json"
    cost = json.loads(path.read_text()) if path.exists() else {}
    timed = any(k in cost for k in (cost_key("train", "cpu"), cost_key("train", "cuda")))
    if not timed and (run_dir / "final").exists() and (run_dir / "config.json").exists():
        cost["train_s"] = (run_dir / "final").stat().st_mtime - (run_dir / "config.json").stat().st_mtime
    return cost


def write_json(path: Path, doc: dict):
    """Atomically: a crash leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    tmp.replace(path)


# ----------------------------------------------------------------------------- measuring (cached)

def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def cached(path: Path, fingerprint: dict):
    """The saved result at `path` if it was measured under exactly `fingerprint`, else None."""
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return doc["result"] if doc.get("fingerprint") == fingerprint else None


@dataclass
class Setting:
    """What every measurement of one temperature shares: the teacher, its prompts and protocol at T."""
    teacher: object
    prompts: list                # token ids of each eval prompt
    protocol: object             # models.DecodingProtocol at T
    target_sha: str
    baseline_dir: Path
    commit: str                  # the code's commit, recorded with each measurement


def load_setting(cfg: StudyConfig, t: float) -> Setting:
    target_dir, baseline_dir = models.ensure_smollm2_pair(models.preset_config(PRESET, cfg.task)["draft_layers"])
    teacher = models.load_model(target_dir, device=cfg.device).eval()
    tok = models.load_tokenizer(target_dir)
    protocol = models.decoding_protocol(PRESET, tok, teacher, task=cfg.task, temperature=t,
                                        max_new_tokens=cfg.max_new_tokens)
    from study import report

    return Setting(teacher, eval_prompts(cfg, tok), protocol, file_sha256(target_dir / "model.safetensors"),
                   baseline_dir, report.source_commit())


def entropy_fingerprint(setting: Setting) -> dict:
    """What the teacher's entropy at T depends on: the target, the prompts, the protocol."""
    return {"target": setting.target_sha, "n_prompts": len(setting.prompts), "protocol": setting.protocol.as_dict()}


def measure_setting_entropy(cfg: StudyConfig, t: float, setting: Setting, log) -> dict:
    """The teacher's processed H(p) at T along its own samples: (mean, lo, hi) and the token count."""
    path = ledger_path(cfg, t, "teacher_entropy")
    fp = entropy_fingerprint(setting)
    for known in (path, setting_dir(cfg, t) / "teacher_entropy.json"):   # the ledger, then the runs' cache
        if (hit := cached(known, fp)) is not None:
            if known != path:
                write_json(path, {"fingerprint": fp, "result": hit})
            return hit
    if cfg.from_ledger:
        raise RuntimeError(f"--from-ledger measures nothing, but {path} is not in the ledger")
    t0 = time.time()
    sums, counts = curve.teacher_entropy_per_prompt(setting.teacher, setting.prompts, setting.protocol)
    result = {"entropy": list(curve.measure_entropy(sums, counts, cfg.n_boot)), "tokens": int(counts.sum()),
              "seconds" if on_cpu(cfg.device) else "gpu_seconds": time.time() - t0}
    write_json(path, {"fingerprint": fp, "result": result, "commit": setting.commit, "device": cfg.device})
    log(f"T={t:g}: teacher entropy {result['entropy'][0]:.3f} nats over {result['tokens']} tokens")
    return result


def evaluate_one(cfg: StudyConfig, t: float, name: str, draft_dir: Path, setting: Setting, log) -> dict:
    """One draft's per-prompt metrics and pooled alpha at T (evaluate.evaluate_draft), cached by fingerprint."""
    from study import evaluate

    run_dir = setting_dir(cfg, t) / name
    path = run_dir / "real_eval.json"
    fp = {"target": setting.target_sha, "draft": file_sha256(draft_dir / "model.safetensors"),
          "n_prompts": len(setting.prompts), "protocol": setting.protocol.as_dict(), "batch": cfg.eval_batch,
          "seed": 0}
    if (hit := cached(path, fp)) is not None:
        return hit
    t0 = time.time()
    draft = models.load_model(draft_dir, device=setting.teacher.device).eval()
    res = evaluate.evaluate_draft(setting.teacher, draft, setting.prompts, batch_size=cfg.eval_batch, seed=0,
                                  record=False, desc=f"T{t:g}/{name}", **setting.protocol.speculative_kwargs())
    result = {"per_prompt": res["per_prompt"], "pooled_alpha": res["pooled_alpha"]}
    write_json(path, {"fingerprint": fp, "result": result})
    record_cost(run_dir, cost_key("eval", cfg.device), time.time() - t0)
    acc = np.nanmean(np.asarray(res["per_prompt"]["token_acceptance"], dtype=float))
    log(f"T={t:g}: {name} token acceptance {acc:.3f} ({time.time() - t0:.0f} s)")
    return result


def run_setting(cfg: StudyConfig, t: float, log, setting: Setting | None = None) -> dict:
    """Every draft of setting T and the teacher's entropy there: read from the ledger, or trained (or found)
    and measured now.
    -> {"entropy", "tokens", "seeds", "per_prompt": {run: metrics}, "points": [estimates], "cost": {run: seconds}}"""
    s = setting or load_setting(cfg, t)
    out = {**measure_setting_entropy(cfg, t, s, log), "seeds": tuple(cfg.seeds), "per_prompt": {}, "points": [],
           "cost": {}}
    jobs = [(d, None if d == "baseline" else s) for d in divs_at(cfg, t)
            for s in (cfg.seeds if d != "baseline" else (0,))]
    for div, seed in jobs:
        name = curve.run_name(div, seed)
        fp = draft_fingerprint(cfg, t, div, seed, len(s.prompts), s.protocol, s.target_sha)
        res = cached(ledger_path(cfg, t, name), fp)
        if res is None and cfg.from_ledger:
            raise RuntimeError(f"--from-ledger measures nothing, but {ledger_path(cfg, t, name)} is not in the ledger")
        if res is None:                      # not in the ledger: train (or find) the draft and measure it
            res = measure_draft(cfg, t, div, seed, s, log)
            write_json(ledger_path(cfg, t, name), {"fingerprint": fp, "result": res, "commit": s.commit,
                                                   "device": cfg.device})    # where it ran: not in the fingerprint
        out["per_prompt"][name] = res["per_prompt"]
        out["cost"][name] = res["cost"]
        if div != "baseline":
            out["points"].append({"name": f"T{t:g}/{name}", "eval_alpha": float(res["pooled_alpha"]),
                                  **res["estimates"]})
    return out


def draft_fingerprint(cfg: StudyConfig, t: float, div: str, seed, n_prompts: int, protocol,
                      target_sha: str) -> dict:
    """What a ledger entry's numbers depend on: the draft's recipe (distill.py's options, where it is written
    and with how many threads aside; the baseline: its layer count), the target, the prompts, the protocol."""
    if div == "baseline":
        recipe = {"baseline_layers": models.preset_config(PRESET, cfg.task)["draft_layers"]}
    else:
        argv = distill_argv(cfg, t, div, seed, Path("."))
        skip = {"--out", "--threads", "--save-every", "--device"}   # where it ran: not what it is
        recipe = {"distill": [a for i, a in enumerate(argv) if a not in skip and argv[i - 1] not in skip]}
    return {**recipe, "target": target_sha, "n_prompts": n_prompts, "protocol": protocol.as_dict(),
            "batch": cfg.eval_batch, "seed": 0}


def in_ledger(cfg: StudyConfig, t: float, div: str, seed, setting: Setting) -> bool:
    """Whether the ledger holds this draft's measurement at T under its fingerprint."""
    fp = draft_fingerprint(cfg, t, div, seed, len(setting.prompts), setting.protocol, setting.target_sha)
    return cached(ledger_path(cfg, t, curve.run_name(div, seed)), fp) is not None


def setting_seeds(cfg: StudyConfig, r: dict) -> tuple:
    """The seeds a setting's result is reported at: its own (run_setting; --from-ledger may give fewer), else
    cfg.seeds."""
    return tuple(r.get("seeds", cfg.seeds))


def ledger_seeds(cfg: StudyConfig, t: float, setting: Setting) -> tuple:
    """The seeds of cfg.seeds at which the ledger holds EVERY distilled draft of T, when it also holds T's teacher
    entropy and baseline draft: what --from-ledger reports of T (every divergence of a row over the same seeds,
    so the rows compare like with like). (): nothing of T can be reported yet."""
    if (cached(ledger_path(cfg, t, "teacher_entropy"), entropy_fingerprint(setting)) is None
            or not in_ledger(cfg, t, "baseline", None, setting)):
        return ()
    trained = [d for d in divs_at(cfg, t) if d != "baseline"]
    return tuple(seed for seed in cfg.seeds if all(in_ledger(cfg, t, d, seed, setting) for d in trained))


def measure_draft(cfg: StudyConfig, t: float, div: str, seed, setting: Setting, log) -> dict:
    """One draft trained (or found) and evaluated at T -> its ledger entry: {"per_prompt", "pooled_alpha",
    "estimates" (train_alpha, val_alpha; None for the baseline), "cost", "draft_sha256"}."""
    name = curve.run_name(div, seed)
    final = setting.baseline_dir if div == "baseline" else train_draft(cfg, t, div, seed, log)
    res = evaluate_one(cfg, t, name, final, setting, log)
    run_dir = setting_dir(cfg, t) / name
    return {**res, "cost": run_cost(run_dir), "draft_sha256": file_sha256(final / "model.safetensors"),
            "estimates": None if div == "baseline" else estimates.run_estimates(run_dir)}


def eval_prompts(cfg: StudyConfig, tokenizer) -> list[list[int]]:
    """The first n_prompts of the task's test split, through the chat template (make eval's prompts)."""
    preset = models.preset_config(PRESET, cfg.task)
    examples = data.load_examples(cfg.task, "eval", source="file", path=preset["data_path"], n=cfg.n_prompts,
                                  tokenizer=tokenizer)
    if len(examples) < cfg.n_prompts:               # the 512-token filter of a summary task left fewer
        raise cli.BadInput(f"--n-prompts {cfg.n_prompts} is more than the {len(examples)} {TASK_NAMES[cfg.task]} "
                           f"test prompts of at most {data.MAX_ARTICLE_TOKENS} tokens")
    return [data.build_prompt_ids(tokenizer, cfg.task, e) for e in examples]


# ----------------------------------------------------------------------------- the analysis (pure)

def build(results: dict, cfg: StudyConfig) -> curve.Curve:
    """curve.Curve of the real study: settings T, each with its own divergences (collect raises on a missing draft)."""
    collected = {}
    for t, r in results.items():
        collected.update(curve.collect({t: r["per_prompt"]}, divs_at(cfg, t), setting_seeds(cfg, r)))
    c = curve.build_curve(collected, {t: tuple(r["entropy"]) for t, r in results.items()}, cfg.n_boot)
    c.knob, c.family = "T", f"the real target (SmolLM2-135M-Instruct on {TASK_NAMES[cfg.task]})"
    return c


def study_hours(results: dict, gpu: bool = False) -> tuple[float, float, float]:
    """(training, evaluation, entropy) CPU hours of the whole study, summed over every cached run (gpu=True:
    the hours measured on an accelerator instead, cost_key)."""
    device = "cuda" if gpu else "cpu"
    costs = [c for r in results.values() for c in r["cost"].values()]
    train = sum(c.get(cost_key("train", device), 0.0) for c in costs)
    evals = sum(c.get(cost_key("eval", device), 0.0) for c in costs)
    ent = sum(r.get("gpu_seconds" if gpu else "seconds", 0.0) for r in results.values())
    return train / 3600, evals / 3600, ent / 3600


def curve_verdict(path: Path) -> str | None:
    """The seed-claim sentence of CURVE.md (the synthetic family), to set beside the real target's."""
    if not path.exists():
        return None
    lines = [x[2:] for x in path.read_text().splitlines() if x.startswith("- The seed's claim")]
    return lines[0] if lines else None


def distilled_on(folder: str) -> str | None:
    """The task a draft was distilled on: its run's config.json (distill.py writes it beside final/) where that
    is on this machine, else its folder's path (runs/.../<task>/...); None when neither says."""
    config = Path(folder).parent / "config.json"
    task = json.loads(config.read_text()).get("task") if config.exists() else None
    task = task or next((part for part in Path(folder).parts if part in TASK_NAMES), None)
    return TASK_NAMES.get(task, task)


def specbench_sentence(path: Path, task_name: str) -> str:
    """What Spec-Bench's full run (specbench.json) says of the distilled drafts it ran: token acceptance minus the
    baseline draft's per leaderboard column, paired by question. Its protocol is Spec-Bench's (greedy), not a
    temperature of this study; a draft distilled on another task than this report's is named as such."""
    if not path.exists():
        return (f"- Spec-Bench's categories: its full run (specbench.py) has not been recorded yet, so these drafts "
                f"are measured on {task_name} only.")
    doc = json.loads(path.read_text())
    distilled = [(name, folder) for name, _, folder in doc["drafts"] if name != "baseline"]
    gains = "; ".join(f"{name}: " + ", ".join(f"{col} {curve._pts((g['mean'], g['lo'], g['hi']))}"
                                              for col, g in doc["gains"][f"specdec-{name}"]["specdec-baseline"].items())
                      for name, _ in distilled)
    def elsewhere(folder: str) -> str:
        task = distilled_on(folder)
        return "" if task in (None, task_name) else f", distilled on {task}, not {task_name}"

    return (f"- Spec-Bench's categories (SPECBENCH.md: greedy, batch 1, {doc['protocol']['max_new_tokens']} new "
            f"tokens per turn, so none of this study's temperatures) hold only the distilled draft(s) "
            f"{', '.join(f'{name} ({folder}{elsewhere(folder)})' for name, folder in distilled)}; token acceptance "
            f"minus the baseline draft's, points, paired by question: {gains}. This study's other drafts are not "
            f"yet run there.")


# ----------------------------------------------------------------------------- the budget: CPU measured, GPU estimated

TARGET_LAYERS = 30      # SmolLM2-135M-Instruct's depth (its config.json); the draft keeps its first draft_layers
# A forward step of a model this small on a GPU is bound by kernel launches, not by arithmetic: its time grows
# with the layers and hardly with the rows. The one GPU the project was lent (docs/benchmarks.md, "On a GPU":
# one H100, our autoregressive decoding at batch 8, final run) decoded 1306.2 tok/s with a 4-layer model and
# 850.0 with a 12-layer one: 6.12 and 9.41 ms per step, a line of 4.48 ms + 0.411 ms per layer.
H100_TOK_S_AT_BATCH_8 = {4: 1306.2, 12: 850.0}      # layers -> tokens/s


def gpu_step_ms(layers: int) -> float:
    """Estimated milliseconds of one forward step of a `layers`-deep model on one H100: the line through the
    two measured points (H100_TOK_S_AT_BATCH_8)."""
    (l1, tok1), (l2, tok2) = sorted(H100_TOK_S_AT_BATCH_8.items())
    ms1, ms2 = 8 / tok1 * 1000, 8 / tok2 * 1000
    return ms1 + (ms2 - ms1) / (l2 - l1) * (layers - l1)


@dataclass
class Steps:
    """Sequential forward steps of the draft and of the target: what a launch-bound GPU's time follows."""
    draft: float
    target: float

    def gpu_seconds(self, draft_layers: int) -> float:
        return (self.draft * gpu_step_ms(draft_layers) + self.target * gpu_step_ms(TARGET_LAYERS)) / 1000


def recipe(cfg: StudyConfig) -> dict:
    """The numbers a run's cost follows: the preset's recipe, with the study's overrides."""
    r = dict(models.preset_config(PRESET, cfg.task))
    r.update({k: getattr(cfg, k) for k in DISTILL_OVERRIDES if getattr(cfg, k) is not None})
    return r


def training_steps(r: dict) -> Steps:
    """One distill.py run: each on-policy step (after the warmup, a share lmbda of the steps) samples
    max_new_tokens tokens with the draft, one step each; every step scores its batch with the teacher once
    and runs the draft forward and backward (about 3 forward steps)."""
    on_policy = max(r["steps"] - r["off_policy_warmup"], 0) * r["lmbda"]
    return Steps(draft=on_policy * r["max_new_tokens"] + 3 * r["steps"], target=r["steps"])


def decoding_steps(per_prompt: dict, gamma: int, batch: int) -> Steps:
    """Batched speculative decoding of these prompts: a prompt needs generated / mean accepted length rounds;
    `batch` prompts share each round, which drafts gamma tokens (gamma draft steps) and verifies them (one
    target step). Slots are taken as always full, so this is a lower bound (no waiting for the slowest row)."""
    rounds = sum(g / m for g, m in zip(per_prompt["generated"], per_prompt["mean_accepted_length"])
                 if math.isfinite(m) and m > 0) / batch            # a row with no target call adds no round
    return Steps(draft=gamma * rounds, target=rounds)


def gpu_minutes(cfg: StudyConfig, per_prompt: dict, trained: bool) -> float:
    """One run's estimated minutes on one H100: its evaluation, and for a distilled draft its training and the
    validation decoding of its final student (--eval-prompts of the same prompts' cost per prompt)."""
    r = recipe(cfg)
    ev = decoding_steps(per_prompt, r["gamma"], cfg.eval_batch)
    seconds = ev.gpu_seconds(r["draft_layers"])
    if trained:
        n = len(per_prompt["generated"])
        seconds += training_steps(r).gpu_seconds(r["draft_layers"]) + seconds * cfg.val_prompts / n
    return seconds / 60


def entropy_gpu_minutes(cfg: StudyConfig, n_prompts: int) -> float:
    """The teacher's entropy (entropy.teacher_sample_entropies): it samples max_new_tokens tokens for all the eval
    prompts in one batch, then scores prompt + completion in one forward per 16 prompts."""
    r = recipe(cfg)
    return Steps(0, r["max_new_tokens"] + math.ceil(n_prompts / 16)).gpu_seconds(r["draft_layers"]) / 60


def full_grid(cfg: StudyConfig) -> list[tuple[float, str]]:
    """Every (T, run) of the whole study of this task (whole_study), the baselines included, and the noise
    probe's baseline."""
    full = whole_study(cfg.task)
    probe = [(NOISE_PROBE_T[cfg.task], "baseline")] if cfg.task in NOISE_PROBE_T else []
    return [(t, curve.run_name(d, None if d == "baseline" else s)) for t in full.settings
            for d in divs_at(full, t) for s in (full.seeds if d != "baseline" else (0,))] + probe


def entropy_settings(task: str) -> list[float]:
    """Every temperature of the task's whole study at which the teacher's entropy is measured (the probe too)."""
    return list(whole_study(task).settings) + ([NOISE_PROBE_T[task]] if task in NOISE_PROBE_T else [])


def priced_like_the_whole_study(cfg: StudyConfig) -> bool:
    """Whether this invocation's runs cost what the whole study's do: the preset's recipe and the whole study's
    prompts (a smoke run, or fewer steps or prompts, would price the rest of the study wrong)."""
    full = whole_study(cfg.task)
    return (not cfg.quick and cfg.n_prompts == full.n_prompts and cfg.eval_batch == full.eval_batch
            and all(getattr(cfg, k) is None for k in DISTILL_OVERRIDES))


@dataclass
class CpuMeans:
    """Measured CPU minutes per run, the means over the study's runs (one thread each)."""
    train: float                 # a distilled draft's training
    evaluation: float            # a distilled draft's evaluation
    baseline: float              # the baseline draft's evaluation
    entropy: float               # the teacher's entropy at one temperature
    n_drafts: int

    def run_minutes(self, name: str) -> float:
        return self.baseline if name == "baseline" else self.train + self.evaluation


def cpu_means(results: dict) -> CpuMeans | None:
    """The mean measured cost of each kind of run (None before any draft was trained on the CPU)."""
    costs = [(name, c) for r in results.values() for name, c in r["cost"].items()]
    drafts = [c for name, c in costs if name != "baseline" and "train_s" in c and "eval_s" in c]
    baselines = [c["eval_s"] for name, c in costs if name == "baseline" and "eval_s" in c]
    if not drafts:
        return None
    evaluation = np.mean([c["eval_s"] for c in drafts]) / 60
    return CpuMeans(train=np.mean([c["train_s"] for c in drafts]) / 60, evaluation=evaluation,
                    baseline=np.mean(baselines) / 60 if baselines else evaluation,
                    entropy=np.mean([r["seconds"] for r in results.values() if "seconds" in r] or [0.0]) / 60,
                    n_drafts=len(drafts))


def grid_hours(runs: list, n_settings: int, run_minutes, entropy_minutes: float) -> float:
    """Hours of these (T, run)s and of the teacher's entropy at n_settings temperatures."""
    return (sum(run_minutes(name) for _, name in runs) + entropy_minutes * n_settings) / 60


def budget_markdown(cfg: StudyConfig, results: dict) -> list[str]:
    """REAL.md's budget: what the runs cost on the CPU (measured), what the rest of the study would, and what
    one GPU would take (estimated from step counts). `results`: the study's settings (the probe's baseline,
    a cheaper run, is left out of the means)."""
    cpu = cpu_means(results)
    if cpu is None or not priced_like_the_whole_study(cfg):
        return []
    grid, n_settings, n_knob = full_grid(cfg), len(entropy_settings(cfg.task)), len(whole_study(cfg.task).settings)
    lacking = [(t, name) for t, name in grid if not ledger_path(cfg, t, name).exists()]
    unmeasured = [t for t in entropy_settings(cfg.task) if not ledger_path(cfg, t, "teacher_entropy").exists()]
    cpu_grid = grid_hours(grid, n_settings, cpu.run_minutes, cpu.entropy)
    cpu_rest = grid_hours(lacking, len(unmeasured), cpu.run_minutes, cpu.entropy)
    gpu = [(name, gpu_minutes(cfg, pp, name != "baseline")) for r in results.values()
           for name, pp in r["per_prompt"].items()]
    gpu_draft = np.mean([m for name, m in gpu if name != "baseline"])
    gpu_base = np.mean([m for name, m in gpu if name == "baseline"] or [gpu_draft])
    gpu_ent = entropy_gpu_minutes(cfg, cfg.n_prompts)
    gpu_grid = grid_hours(grid, n_settings, lambda name: gpu_base if name == "baseline" else gpu_draft, gpu_ent)
    r = recipe(cfg)
    k = r["draft_layers"]
    probe = f" and the noise probe at T = {NOISE_PROBE_T[cfg.task]:g}" if cfg.task in NOISE_PROBE_T else ""
    gpu_measured = sum(study_hours(results, gpu=True))
    measured_on_gpu = (f"{gpu_measured:.2f} GPU hours of this study's runs were measured on one (the header)"
                       if gpu_measured else "no run of this study was measured on one")
    return ["## Budget", "",
            f"Measured, one CPU thread per run: a distilled draft cost on average {cpu.train:.0f} CPU min of "
            f"training and {cpu.evaluation:.0f} of evaluation ({cpu.n_drafts} draft{'s' if cpu.n_drafts > 1 else ''}), "
            f"the baseline draft's evaluation {cpu.baseline:.0f}, the teacher's entropy {cpu.entropy:.0f} per "
            f"temperature. The whole study of this task ({n_knob} temperature{'s' if n_knob > 1 else ''}{probe}, "
            f"{len(grid)} runs with "
            f"the baselines) would cost about {cpu_grid:.0f} CPU hours; {len(lacking)} of its runs are not in the "
            f"ledger yet, about {cpu_rest:.0f} CPU hours more ({cpu_rest / 2:.0f} hours of wall time at two runs "
            f"at once on 2 cores).", "",
            f"One GPU: an estimate, not a measurement ({measured_on_gpu}). The study's models are small enough "
            f"that a GPU's forward step is bound by kernel launches, so its time follows the number of layers: "
            f"one H100 decoded at {gpu_step_ms(4):.2f} ms per step with 4 layers and {gpu_step_ms(12):.2f} with 12 "
            f"(docs/benchmarks.md, \"On a GPU\": bench_specdec's small Llama-shaped models, batch 8); on that "
            f"line, {gpu_step_ms(k):.1f} ms for the {k}-layer draft and {gpu_step_ms(TARGET_LAYERS):.1f} ms for the "
            f"{TARGET_LAYERS}-layer target. Counting the sequential steps of each run from its recipe and its "
            f"measured acceptance (training: ({r['steps']} - {r['off_policy_warmup']}) x {r['lmbda']:g} on-policy "
            f"steps of {r['max_new_tokens']} draft steps, plus a teacher and ~3 draft steps per step; evaluation: "
            f"generated / mean accepted length rounds per prompt, {cfg.eval_batch} prompts to a round, gamma = "
            f"{r['gamma']} draft steps + 1 target step each), a distilled draft would take about "
            f"{gpu_draft:.1f} GPU min (against {cpu.train + cpu.evaluation:.0f} CPU min measured), the "
            f"baseline's evaluation {gpu_base:.1f}, the teacher's entropy {60 * gpu_ent:.0f} GPU s per "
            f"temperature: the whole study about {gpu_grid:.1f} GPU hours on one H100, against {cpu_grid:.0f} CPU "
            f"hours. Left out: loading the models (seconds per run), the rounds a batch waits for its slowest row "
            f"(1.1-1.8x the rounds on that GPU), SmolLM2's wider layers, and the spread between machines "
            f"(absolute speeds moved up to 1.6x between fresh H100s): read it as a lower bound, good to a factor "
            f"of about 2. `--device cuda` runs the study there; the ledger keeps GPU seconds apart (train_gpu_s, "
            f"eval_gpu_s) and the header reports them.", ""]


# ----------------------------------------------------------------------------- REAL.md

def entropy_markdown(c: curve.Curve, results: dict) -> list[str]:
    lines = ["| T | measured H(p), nats [95% CI] | teacher tokens |", "|---:|---|---:|"]
    lines += [f"| {t:g} | {curve._lvl(c.entropy[t], 3)} | {results[t]['tokens']} |" for t in sorted(results)]
    return lines


def noise_probe_sentence(cfg: StudyConfig, c: curve.Curve, t: float, probe: dict) -> str:
    """Why the knob stops below the noise probe T: the teacher's measured entropy there, as exp(H) (the number
    of equally likely tokens with that entropy) beside the study's lowest setting and the most there is, ln V;
    and the baseline draft's acceptance there."""
    vocab = json.loads(ledger_path(cfg, t, "teacher_entropy").read_text())["fingerprint"]["protocol"]["vocab_size"]
    h, lo, hi = probe["entropy"]
    low = min(c.entropy, key=lambda s: c.entropy[s][0])
    acc = float(np.nanmean(np.asarray(probe["per_prompt"]["baseline"]["token_acceptance"], dtype=float)))
    return (f"The knob stops at T = {max(whole_study(cfg.task).settings):.1f}: at T = {t:g} the teacher's "
            f"entropy is {h:.2f} [{lo:.2f}, {hi:.2f}] nats: exp(H) = {math.exp(h):.0f} equally likely tokens per "
            f"step, against {math.exp(c.entropy[low][0]):.1f} at T = {low:g}, with ln V = {math.log(vocab):.2f} "
            f"nats the most there is (V = {vocab}). The study distils no draft on a teacher spread that thin (its "
            f"samples at that temperature read as incoherent text, not solutions: docs/benchmarks.md, session 15, "
            f"quotes two); the probe measures the teacher and the baseline draft only (token acceptance "
            f"{acc:.1%} over its {len(probe['per_prompt']['baseline']['token_acceptance'])} prompts).")


def write_report(cfg: StudyConfig, c: curve.Curve, results: dict, plots: dict, meta: dict,
                 probe: tuple | None = None) -> Path:
    measured = {**results, **dict([probe] if probe else [])}      # every run the report read, the probe's too
    train_h, eval_h, ent_h = study_hours(measured)
    points = [p for r in results.values() for p in r["points"]]
    md = [HEADING + (" (QUICK smoke run)" if cfg.quick else ""), "",
          f"Written by `{meta['command']}` on {meta['date']} ({meta['machine']}), commit {meta['commit']}; this "
          f"invocation {meta['minutes']:.1f} min. The study's runs (cached, measured over every session that ran "
          f"them) cost {_hours(train_h)} of training, {_hours(eval_h)} of evaluation and {_hours(ent_h)} of "
          f"entropy measurement, one CPU thread each{gpu_hours_clause(measured)}.", ""]
    if cfg.quick:
        md += ["**QUICK run: one setting, few steps, prompts and tokens. A smoke test of the pipeline, not a "
               "result.**", ""]
    elif (missing := missing_from_study(cfg, results)):
        md += [f"**Partial study: {'; '.join(missing)}. The rest is being measured (the ledger, "
               f"results/real-study/, grows session by session); read these numbers as a first look.**", ""]
    md += ["## Answer", ""] + [f"- {x}" for x in curve.answer_sentences(c)]
    synthetic = curve_verdict(Path(cfg.out).parent / "CURVE.md")
    if synthetic:
        md.append(f"- On the synthetic family (CURVE.md): {synthetic}")
    md += ["", f"![token acceptance vs teacher entropy]({plots['token_acceptance']})", "",
           f"![difference to the best]({plots['to_best']})", ""]
    md += ["## The setting", "",
           f"Target SmolLM2-135M-Instruct (the `smollm2` preset); baseline draft its first "
           f"{models.preset_config(PRESET, cfg.task)['draft_layers']} layers; drafts distilled with distill.py "
           f"(`python distill.py {command_template(cfg)}`), {seeds_clause(cfg, results)}"
           f"{f'; {and_list(cfg.extra_divs)} at T = {PRESET_T:g} only' if cfg.extra_divs else ''}. Evaluation: "
           f"batched speculative decoding of the first {cfg.n_prompts} {TASK_NAMES[cfg.task]} test prompts at the "
           f"setting's temperature, the preset's protocol otherwise. The teacher's entropy at each T, measured "
           f"along its own samples of the same prompts:", ""]
    md += entropy_markdown(c, results) + [""]
    if probe is not None:
        md += [noise_probe_sentence(cfg, c, *probe), ""]
    md += ["## Token acceptance per temperature and divergence", "",
           "Mean over seeds of the per-seed mean over prompts, 95% interval from the crossed bootstrap over seeds "
           f"and prompts ({cfg.n_boot} resamples, stats.py); rows in order of measured entropy; the best trained "
           "divergence of a row in bold; '-': not trained at that temperature.", "",
           curve.levels_markdown(c, "token_acceptance"), "",
           "## Mean accepted length (tokens per target call, bonus included)", "",
           curve.levels_markdown(c, "mean_accepted_length"), "",
           "## Each divergence minus the best at each temperature", "",
           "Token acceptance in points, paired by prompt, 95% interval; '(tied)': the interval includes 0.", "",
           curve.to_best_markdown(c, "token_acceptance"), "",
           "Mean accepted length, in tokens:", "", curve.to_best_markdown(c, "mean_accepted_length"), ""]
    if c.claim:
        a, b = curve.SEED_CLAIM
        md += [f"## The seed's claim: {a} - {b} at every temperature", "",
               f"| T | teacher H(p) | {a} - {b}, token acceptance points [95% CI] |", "|---:|---:|---|"]
        md += [f"| {t:g} | {curve._h(c, t)} | {curve._pts(c.claim[t])}"
               f"{'' if curve.separated(c.claim[t]) else ' (tied)'} |" for t in c.order]
        md.append("")
    summary = {"all temperatures": estimates.compare(points)}
    md += estimates.estimates_markdown(summary, plots.get("estimates"))
    md += estimates.estimate_sentences("the real target", summary["all temperatures"]) + [""]
    other = ("- The real open-ended task: no CNN/DM source could be brought in offline (allenai/natural-instructions' "
             "task 1553 sits in a 3.2 GB repository; yizhongw/self-instruct's 200 CNN/DM rows are truncated), but "
             "DialogSum could: 1,000 real dialogues to summarise, vendored in data/dialogsum/ (CC BY-NC-SA 4.0). "
             "Its study is a run of its own, `python -m study.real_study --task dialogsum` -> REAL-dialogsum.md; "
             "here the temperature knob raises the teacher's entropy on the same prompts and models."
             if cfg.task == "gsm8k" else
             "- GSM8k, the low-entropy task: its study is `python -m study.real_study` -> REAL.md.")
    md += budget_markdown(cfg, results)
    md += ["## Not in this study yet", "",
           specbench_sentence(Path(cfg.specbench), TASK_NAMES[cfg.task]), other, ""]
    return cli.write_markdown(cfg.out, md)


def missing_from_study(cfg: StudyConfig, results: dict | None = None) -> list[str]:
    """What this report lacks of its task's whole study (whole_study), in words: [] when complete. `results`: the
    settings it reports, each at its own seeds (--from-ledger leaves out a setting, or seeds of one, the ledger
    lacks)."""
    full, out = whole_study(cfg.task), []
    if results:
        cfg = replace(cfg, settings=tuple(sorted(results)), seeds=tuple(sorted(set().union(*(
            setting_seeds(cfg, r) for r in results.values())))))
    for name, what in (("settings", "temperatures"), ("divs", "divergences"), ("extra_divs",
                       f"acceptance objectives at T = {PRESET_T:g}"), ("seeds", "seeds")):
        lacking = [x for x in getattr(full, name) if x not in getattr(cfg, name)]
        if lacking:
            out.append(f"{what} {', '.join(f'{x:g}' if isinstance(x, float) else str(x) for x in lacking)} "
                       f"not yet in it")
    for t, r in sorted((results or {}).items()):
        if lacking := [str(x) for x in cfg.seeds if x not in setting_seeds(cfg, r)]:
            out.append(f"seed{'s' if len(lacking) > 1 else ''} {', '.join(lacking)} not yet at T = {t:g}")
    if cfg.n_prompts < full.n_prompts:
        out.append(f"{cfg.n_prompts} of {full.n_prompts} prompts")
    return out


def seeds_clause(cfg: StudyConfig, results: dict) -> str:
    """'seeds 0, 1', or each setting's own where they differ (--from-ledger): 'seeds 0, 1 at T = 0.6; seed 0 at
    T = 1'."""
    def named(seeds) -> str:
        return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"

    per_setting = {t: setting_seeds(cfg, r) for t, r in sorted(results.items())}
    if len(set(per_setting.values())) <= 1:
        return named(next(iter(per_setting.values()), cfg.seeds))
    return "; ".join(f"{named(seeds)} at T = {t:g}" for t, seeds in per_setting.items())


def gpu_hours_clause(results: dict) -> str:
    """', and X GPU hours of ...' where runs were measured on an accelerator (--device), else ''."""
    train_h, eval_h, ent_h = study_hours(results, gpu=True)
    if train_h + eval_h + ent_h == 0:
        return ""
    return (f"; and on a GPU (--device) {train_h:.2f} hours of training, {eval_h:.2f} of evaluation, "
            f"{ent_h:.2f} of entropy measurement")


def and_list(items) -> str:
    """'a', 'a and b', 'a, b and c'."""
    items = list(items)
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _hours(h: float) -> str:
    return f"{h:.1f} CPU hours" if h >= 1 else f"{60 * h:.1f} CPU minutes"


def command_template(cfg: StudyConfig) -> str:
    """distill_argv with the per-run values named: what every run of the study runs."""
    argv = distill_argv(cfg, PRESET_T, "DIV", 0, Path(cfg.runs) / f"{task_folder(cfg)}T<T>" / "DIV-s<SEED>")
    argv = argv[:argv.index("--device")]                 # where the runs ran is not the recipe (header, ledger)
    named = {"--temperature": "T", "--seed": "SEED"}
    return " ".join(named.get(argv[i - 1], a) if i else a for i, a in enumerate(argv))


# ----------------------------------------------------------------------------- command line

def parse_args(argv=None) -> StudyConfig:
    p = cli.ArgumentParser(prog="python -m study.real_study", description=cli.description(__doc__))
    p.add_argument("--quick", action="store_true", help="CI's smoke run: one temperature, rkl and jsd, one seed, "
                   "2 steps of 2 prompts, 6 eval prompts")
    p.add_argument("--settings", nargs="+", type=float, default=None, help="sampling temperatures T (> 0)")
    p.add_argument("--divs", nargs="+", default=None, help="baseline and divergences trained at every T")
    p.add_argument("--extra-divs", nargs="*", default=None, help=f"divergences trained at T = {PRESET_T:g} only")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="training seeds")
    p.add_argument("--task", default=None, help=f"the smollm2 preset's task: {', '.join(TASK_NAMES)} (default "
                   f"gsm8k; another task's runs, ledger and report: <runs>/<task>/, <ledger>/<task>/, REAL-<task>.md)")
    p.add_argument("--n-prompts", type=int, default=None, help="the task's test prompts per evaluation")
    p.add_argument("--steps", type=int, default=None, help="distill.py --steps (default: the preset's)")
    p.add_argument("--runs", default=None, help="the cache of runs and evaluations (default runs/real-study)")
    p.add_argument("--ledger", default=None, help="the measurements kept with the results, read back on any "
                   "machine (default results/real-study)")
    p.add_argument("--out", default=None, help="the report (default results/REAL.md; another task: REAL-<task>.md)")
    p.add_argument("--device", default=None, help="where the teacher, training and evaluation run: cpu, cuda or "
                   "cuda:N (default: cuda when torch sees a GPU, else cpu, as distill.py; the ledger's entries are "
                   "the same whatever the device, its seconds are kept apart)")
    p.add_argument("--from-ledger", action="store_true", help="report what the ledger holds, training and "
                   "measuring nothing: each temperature at the seeds it holds for all of its drafts, a temperature "
                   "it lacks left out (the header names what is missing)")
    cli.add_threads_option(p)
    a = p.parse_args(argv)
    cfg = whole_study(a.task or "gsm8k")
    cfg.quick, cfg.from_ledger = a.quick, a.from_ledger
    cfg.threads, cfg.device = cli.check_threads(a.threads), study_device(a.device)
    cli.apply_overrides(cfg, a, QUICK if a.quick else None, sequences=("settings", "divs", "extra_divs", "seeds"),
                        values=("task", "n_prompts", "steps", "runs", "ledger", "out"))
    if cfg.task != "gsm8k" and a.out is None:
        cfg.out = str(Path(cfg.out).with_name(f"REAL-{cfg.task}.md"))
    check_config(cfg)
    return cfg


def study_device(name: str | None) -> str:
    """--device checked (train_checks.check_device: a device this machine has), None: distill.py's default."""
    import torch

    from plumbing import train_checks

    try:
        train_checks.check_device(name)
    except ValueError as e:
        raise cli.BadInput(str(e)) from None
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def check_config(cfg: StudyConfig):
    """Every value checked before any model loads (cli.BadInput naming it and what is allowed)."""
    if not cfg.settings or any(not (math.isfinite(t) and t > 0) for t in cfg.settings):
        raise cli.BadInput(f"--settings {list(cfg.settings)}: temperatures must be > 0 (sampling, not greedy)")
    if len(set(cfg.settings)) != len(cfg.settings):
        raise cli.BadInput(f"--settings {list(cfg.settings)} repeats a temperature")
    allowed = ("baseline",) + tuple(divergences.DIVERGENCES)
    bad = [d for d in cfg.divs + cfg.extra_divs if d not in allowed]
    if bad:
        raise cli.BadInput(f"unknown --divs {bad}; valid: {', '.join(allowed)}")
    if not [d for d in cfg.divs if d != "baseline"]:
        raise cli.BadInput("--divs needs at least one trained divergence besides the baseline")
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise cli.BadInput(f"--seeds {list(cfg.seeds)}: need distinct integers >= 0")
    for seed in cfg.seeds:
        cli.check_seed(seed, "--seeds")
    for name in ("n_prompts", "steps"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise cli.BadInput(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    n_test = len(data.load_examples(cfg.task, "eval", source="file", max_article_tokens=None,
                                    path=models.preset_config(PRESET, cfg.task)["data_path"]))
    if cfg.n_prompts > n_test:
        raise cli.BadInput(f"--n-prompts {cfg.n_prompts} is more than the {n_test} {TASK_NAMES[cfg.task]} test prompts")
    models.smollm2_gguf()                   # the real model is installed (else: one line saying how)
    cli.check_markdown_out(cfg.out, HEADING, StudyConfig.out)


def wants_probe(cfg: StudyConfig) -> bool:
    """The noise probe is measured with the whole knob (every temperature of the whole study) and read back
    whenever the ledger holds it: a run of a few settings does not pay its hour."""
    t = NOISE_PROBE_T.get(cfg.task)
    if t is None or cfg.quick or t in cfg.settings:
        return False
    kept = all(ledger_path(cfg, t, name).exists() for name in ("teacher_entropy", "baseline"))
    return kept or (not cfg.from_ledger and set(whole_study(cfg.task).settings) <= set(cfg.settings))


def ledger_results(cfg: StudyConfig, settings, log) -> dict:
    """--from-ledger: each setting read back at the seeds the ledger holds for every one of its drafts
    (ledger_seeds); a setting it cannot report yet is left out, and the report's header names what is missing.
    Nothing is trained or measured, so a report of the study so far never starts hours of work."""
    results = {}
    for t in settings:
        s = load_setting(cfg, t)
        if seeds := ledger_seeds(cfg, t, s):
            results[t] = run_setting(replace(cfg, seeds=seeds), t, log, s)
        else:
            log(f"T={t:g}: left out, the ledger lacks its teacher entropy, its baseline or one of its drafts at "
                f"every seed of {list(cfg.seeds)}")
    if not results:
        raise cli.BadInput(f"--from-ledger: {cfg.ledger} holds no temperature of {list(cfg.settings)} with its "
                           f"teacher entropy, its baseline and every draft at one seed of {list(cfg.seeds)}; run "
                           f"without --from-ledger to measure them")
    return results


def main(argv=None) -> Path:
    from study import report

    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    with cli.before_the_work():
        cfg = parse_args(argv)
    cli.set_threads(cfg.threads)
    t0, commit = time.time(), report.source_commit()
    log = lambda msg: print(f"[real-study {time.time() - t0:6.0f}s] {msg}", flush=True)  # noqa: E731
    n = sum(len([d for d in divs_at(cfg, t) if d != "baseline"]) for t in cfg.settings) * len(cfg.seeds)
    log(f"plan: temperatures {', '.join(f'{t:g}' for t in cfg.settings)}; {n} distilled draft(s) + a baseline per "
        f"temperature, {cfg.n_prompts} eval prompts each; cached under {cfg.runs}")
    order = sorted(cfg.settings, key=lambda t: t != PRESET_T)      # the preset's temperature first: most drafts
    results = ledger_results(cfg, order, log) if cfg.from_ledger else {t: run_setting(cfg, t, log) for t in order}
    probe = None
    if wants_probe(cfg):                     # the teacher and the baseline only
        t = NOISE_PROBE_T[cfg.task]
        probe = (t, run_setting(replace(cfg, divs=("baseline",), extra_divs=()), t, log))
    c = build(results, cfg)
    out_dir = Path(cfg.out).parent
    fig = out_dir / "figures"
    prefix = figure_prefix(cfg)
    plots = {m: curve.plot_levels(c, m, fig / f"{prefix}_{m}.png") for m in curve.METRICS}
    plots["to_best"] = curve.plot_to_best(c, fig / f"{prefix}_to_best.png")
    plots["estimates"] = estimates.plot_estimates({"the real target": [p for r in results.values()
                                                                       for p in r["points"]]},
                                                  fig / f"{prefix}_estimates.png")
    plots = {key: Path(p).relative_to(out_dir).as_posix() for key, p in plots.items()}
    meta = report._meta(t0, argv, commit)
    meta["command"] = " ".join(["python -m study.real_study", *argv])
    out = write_report(cfg, c, results, plots, meta, probe)
    log(f"wrote {out}")
    return out


if __name__ == "__main__":
    cli.script_main(main)
