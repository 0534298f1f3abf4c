"""On-policy distillation of a speculative-decoding draft (the student q) from a frozen target (the teacher p).

The objective is GKD's (Agarwal et al. 2024, arXiv 2306.13649):

    L(theta) = (1 - lmbda) * E_{(x, y) ~ data}[ D(x, y) ]  +  lmbda * E_{x ~ prompts, y ~ q_theta(.|x)}[ D(x, y) ]

    D(x, y) = sum_t  d( p(. | x, y_<t), q_theta(. | x, y_<t) )   summed over the completion tokens y_t,

and no gradient flows through the sampling of y (the samples are data, drawn under torch.no_grad).
lmbda = 1 (the default, as in the seed project) is purely on-policy and needs no dataset answers
("zero-label"). The off-policy share (1 - lmbda) uses the dataset's reference answers, or, with
--off-policy teacher, completions sampled from the teacher (sequence-level KD). --off-policy-warmup W makes
the first W steps all off-policy: a draft far from its target (the real preset's truncated SmolLM2) samples
degenerate text that the teacher also predicts, so on-policy steps would teach it little until it has
learnt from real answers.

The per-token divergence d is chosen with --div (implemented in divergences.py; p = teacher, q = student):
    fkl   forward KL   KL(p || q) = sum_x p log(p / q)    mean-seeking: q must cover all of p's mass
    rkl   reverse KL   KL(q || p) = sum_x q log(q / p)    mode-seeking: q may drop p's minor modes
    jsd   generalized JSD(beta) = beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q
          (TRL's convention: beta = 0 is exactly fkl, beta = 1 exactly rkl)
    tvd   total variation  0.5 * sum_x |p - q|  = 1 - sum_x min(p, q) = 1 - (the acceptance probability)
    ajsd  JSD with a per-token beta that falls with the teacher's entropy (see divergences.py)
    nla   -log alpha, alpha = sum_x min(p, q): the acceptance probability itself (LK losses' "alpha")
    lk    w KL(p || q) + (1 - w)(1 - alpha), w = lk_scale exp(-lk_decay mean alpha): KL -> TV as alpha grows

Both distributions are softmax(logits / tau) with tau = --loss-temperature. Default: tau = the sampling
temperature (the task's, e.g. 0.6 for gsm8k). Why: speculative decoding is evaluated at that temperature,
and the acceptance probability of a drafted token is sum_x min(p_tau, q_tau), so the distributions the
draft must match are the tempered ones; also the on-policy samples come from q_tau, so with tau equal to
the sampling temperature E_{y ~ q_tau}[KL(q_tau || p_tau)] is exactly the sequence-level reverse KL of the
distributions being sampled. (TRL's GKDTrainer samples at T but computes the loss at 1.0 - an accident.)
With sampling temperature 0 (greedy) the default falls back to tau = 1. Top-p is not applied in the loss.

Loss normaliser: the sum of d over every completion token of the whole optimizer step (all
gradient-accumulation micro-batches, all ranks), divided by the number of those tokens. Every token
weighs the same however the batch is split; per-micro-batch means (TRL) weigh short micro-batches more.
Under DDP each rank samples its own shard of the step's prompts; the token count is all-reduced first.

Each step: sample -> build the batch (left-padded prompt | completion, loss only on the completion, its
first stop token included) -> teacher forward (frozen, no grad) -> student forward -> loss -> backward ->
clip -> AdamW -> warm-up + cosine schedule. Both forwards stop at the last hidden state; the loss
(divergences.hidden_divergence_sum) projects it through each lm_head itself, in float32, a block of
positions at a time, so neither model's (B, C, V) logits exist and a bf16 model's loss is not read from
bf16-rounded logits (divergences.py, "bf16 logits").

Precision (--dtype): float32 runs everything in float32. bfloat16 (the default on CUDA) runs the forward
passes, sampling included, under bf16 autocast on any device, with the student's float32 master weights
and the teacher's weights in bf16; the loss, the processing of the sampling logits (specdec) and AdamW's
state stay float32. config.json records the resolved value and --resume refuses another. Checkpoints <out>/ckpt-<step> (student via save_pretrained,
optimizer/scheduler/step/RNG via torch.save of plain tensors, loaded with weights_only=True) are written
atomically with checksums, the last two kept (the run directory's rules: rundir.py). Every step's batch is
a pure function of (seed, step), and each prompt's sample of (seed, step, the prompt's position in the
step's batch): its own generator, whichever rank or micro-batch it lands in. So --resume reproduces the
uninterrupted run exactly on the CPU, and 1, 2 or N processes (DDP or --fsdp) sample the same completions
and train the same way (up to float rounding). <out>/final is a plain Hugging Face model directory.
<out>/metrics.jsonl, one row per step: loss, lr, grad_norm, completion_len, tokens_per_s, source and
loss_teacher_entropy = the mean over completion tokens of H(p_T) at the loss temperature tau WITHOUT top-p
(computed inside the loss sweep) -- not the processed H(p) (temperature + top-p) of evaluate.py's records;
train_alpha = the mean over the step's completion tokens (all micro-batches, all ranks) of
alpha = sum_x min(p_tau, q_tau), again at tau without top-p and from the loss's own sweep, and
train_accepted_length = (1 - a^(gamma+1)) / (1 - a) at a = train_alpha and the protocol's gamma: an ESTIMATE
of the mean accepted length (it assumes i.i.d. acceptances at the training tokens' mean alpha, on the
student's own samples, without top-p); the validation rows below measure the real thing.
sample_stop_rate = the share of the step's completions that ended with a stop id, sample_repetition = the share
of their 4-grams that already occurred earlier in the same completion: when a student's own samples loop
(above DEGENERATE_REPETITION) the loop warns, since the teacher predicts the loop too and train_alpha on such
samples says nothing about acceptance on real text.
Validation (--eval-every N, off by default): after every N-th optimizer step and after the last, rank 0 runs
exact speculative decoding (specdec.speculative_generate, the decoding protocol, one fixed sampling seed) of the
current student against the teacher on --eval-prompts K held-out validation prompts: train-split prompts that
training never sees and that are not in evaluate.py's eval split (data.held_out_split; checked). That step's
row gets val_acceptance_rate (accepted / drafted), val_alpha (mean sum_x min(p, q) over TESTED positions:
those up to and including each round's first rejection, the processed p and q), val_mean_accepted_length
(tokens per target call), val_per_position_acceptance (at draft positions 1..gamma: accepted / tested there,
i.e. the acceptance given every earlier draft of the round accepted), all pooled over the K prompts (specdec's
alpha and per_position_acceptance), and val_seconds. <out>/best/ holds the student
of the highest val_acceptance_rate so far (the first on ties) and best.json (its step and val row), written
atomically with checksums; a checkpoint of that step is written first, so best/ is never newer than the
checkpoint a --resume starts from, and the resumed run keeps it.
Sampling uses models.decoding_protocol: the same temperature, top-p, stop ids and vocabulary (len(tokenizer))
as evaluate.py and report.py.

Run:  python distill.py --task gsm8k --div rkl            (one process; the offline tiny pair by default)
      torchrun --nproc_per_node=2 distill.py --task gsm8k --div rkl     (DDP: each rank samples its shard)
      torchrun --nproc_per_node=2 distill.py --fsdp --task gsm8k --div rkl   (FSDP2: both models sharded,
                                                                     sharding.py; README "Several devices")
"""
import argparse
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from plumbing import cli
import data
import divergences
import models
from plumbing import rundir
from plumbing import sharding
import specdec

OFF_POLICY = ("dataset", "teacher")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}   # --dtype


# ----------------------------------------------------------------------------- config

def option(default, help: str, *, preset: bool = False, fallback=None, flag: bool = True):
    """A Config field and its --help text ("%(default)s" = the default). preset=True: None means the preset's
    value (models.preset_config, the key named as the field), else `fallback` (resolve_config fills it).
    flag=False: not an option but a fact of the launch (resolve_config fills it), recorded all the same."""
    return field(default=default, metadata={"help": help, "preset": preset, "fallback": fallback, "flag": flag})


@dataclass
class Config:
    """Every option of a run, in one table: each field is a flag (parse_args), its help next to it; the fields
    marked preset=True take the preset's value when unset, then their fallback. config.json saves these
    names, and --resume compares them (rundir.check_same_run): renaming a field breaks old runs."""
    # what to distil
    task: str = option("gsm8k", "task: gsm8k (low teacher entropy) or cnndm (high); default %(default)s")
    div: str = option("rkl", "per-token divergence d(p, q): fkl, rkl, jsd, tvd, ajsd, nla or lk (see "
                             "divergences.py); default %(default)s")
    beta: float = option(0.5, "jsd only: weight toward reverse KL, 0 = fkl, 1 = rkl; default %(default)s")
    ajsd_scale: float = option(1.0, "ajsd only: entropy scale (nats) of beta = floor + (1 - floor) "
                                    "exp(-H / scale); default %(default)s")
    ajsd_floor: float = option(0.5, "ajsd only: the beta of a very uncertain teacher (0.5 = symmetric JSD); "
                                    "default %(default)s")
    lk_scale: float = option(1.0, "lk only: w = lk_scale exp(-lk_decay mean alpha), the KL weight; "
                                  "default %(default)s")
    lk_decay: float = option(1.0, "lk only: how fast w falls as the mean alpha grows; default %(default)s")
    preset: str = option("tiny", "models, lr, temperature, lengths and steps: tiny (offline pair), smollm2 "
                                 "(the real SmolLM2-135M-Instruct, offline) or paper (hub models); "
                                 "default %(default)s")
    teacher: str | None = option(None, "teacher (target p) path, .gguf file or hub id; default: the preset's")
    student: str | None = option(None, "student (draft q) to start from, path, .gguf file or hub id; "
                                       "default: the preset's")
    seed: int = option(0, "run seed: prompt order, sampling and initial RNG state; default %(default)s")
    out: str | None = option(None, "run directory (ckpt-*, final/); "
                                   "default runs/<preset>/<task>/<div>-s<seed> (<task>: e.g. gsm8k-file-<data "
                                   "name> on data other than the preset's, rundir.task_group)")
    resume: bool = option(False, "continue from the newest checkpoint in --out "
                                 "(reproduces the uninterrupted run)")
    overwrite: bool = option(False, "start from scratch in an --out that already holds a run, deleting its "
                                    "checkpoints and log")
    check: bool = option(False, "check everything that is checked before a model loads (options, data, model "
                                "folders, --out), say what would run, and exit without writing a run; "
                                "make train NPROC=N runs it before torchrun starts its ranks")
    # data: the GKD mixture
    lmbda: float | None = option(None, "share of steps whose batch the student samples (1 = purely on-policy); "
                                       "default: the preset's (1 if unset)", preset=True, fallback=1.0)
    off_policy: str | None = option(None, "the other (1 - lmbda) batches: dataset answers or teacher samples "
                                          "(seq-KD); default: the preset's (dataset if unset)",
                                    preset=True, fallback="dataset")
    off_policy_warmup: int | None = option(None, "first steps whose batches all come from --off-policy (a draft "
                                                 "far from the target samples degenerate text: it learns on "
                                                 "real answers first); default: the preset's (0 if unset)",
                                           preset=True, fallback=0)
    source: str | None = option(None, "training prompts: standin, file or hub; default: file with "
                                      "--data-path, else the preset's (standin if it has none: "
                                      "data.resolve_source)")
    data_path: str | None = option(None, "a .jsonl/.json/.parquet file or a folder (its train.* files, "
                                         "README 'Data'); implies --source file")
    n_train: int | None = option(None, "number of training prompts; default: the preset's (all if unset)",
                                 preset=True)
    # sampling
    temperature: float | None = option(None, "sampling temperature (0 = greedy); default: the preset's (the "
                                             "task's)", preset=True, fallback=1.0)
    top_p: float | None = option(None, "sampling nucleus top-p; default: the preset's",
                                 preset=True, fallback=1.0)
    max_new_tokens: int | None = option(None, "most tokens sampled per completion; default: the preset's",
                                        preset=True, fallback=128)
    loss_temperature: float | None = option(None, "temperature tau of both distributions in the loss; "
                                                  "default: the sampling temperature (1 when it is 0; see "
                                                  "the docstring)")
    # optimisation
    steps: int | None = option(None, "optimizer steps; default: the preset's, else --epochs over the prompts",
                               preset=True)
    batch_size: int | None = option(None, "prompts per optimizer step, summed over ranks and micro-batches; "
                                          "default: the preset's", preset=True, fallback=8)
    grad_accum: int | None = option(None, "micro-batches per optimizer step on each rank; default: the "
                                          "preset's (1 if unset)", preset=True, fallback=1)
    epochs: float | None = option(None, "passes over the prompts, used only when --steps is unset (steps = "
                                        "epochs x prompts / batch size); default: the preset's (1 if unset)",
                                  preset=True, fallback=1)
    lr: float | None = option(None, "peak AdamW learning rate; default: the preset's",
                              preset=True, fallback=5e-5)
    warmup: float | None = option(None, "fraction of the steps with linear warm-up before the cosine "
                                        "decay to 0; default: the preset's (0.1 if unset)",
                                  preset=True, fallback=0.1)
    weight_decay: float = option(0.0, "AdamW weight decay; default %(default)s")
    max_grad_norm: float = option(1.0, "gradient-norm clipping threshold; default %(default)s")
    # system
    device: str | None = option(None, "torch device: cpu, cuda (= cuda:<local rank>) or cuda:N; default "
                                      "cuda:<local rank> if CUDA is available, else cpu")
    dtype: str | None = option(None, "precision of the forward passes: float32, or bfloat16 (bf16 autocast "
                                     "over float32 master weights, the teacher's weights in bf16; the loss, "
                                     "sampling and optimizer state stay float32); default bfloat16 on CUDA, "
                                     "float32 on the CPU")
    gradient_checkpointing: bool = option(False, "recompute the student's activations in backward to save "
                                                 "memory; default off")
    teacher_8bit: bool = option(False, "load the teacher in 8 bits with bitsandbytes (CUDA, or CPU where it "
                                       "runs); default off")
    fsdp: bool = option(False, "under torchrun: shard the teacher and the student over the ranks with FSDP2, "
                               "per decoder layer (sharding.py); an 8-bit teacher stays whole on every rank; "
                               "default off (DDP: every rank holds both models whole)")
    save_every: int | None = option(None, "checkpoint every N steps (and always at the end); default: the "
                                          "preset's (50 if unset)", preset=True, fallback=50)
    threads: int = option(cli.DEFAULT_THREADS, "CPU threads of torch per process (README 'Threads'; on the CPU "
                                               "a run is exact only at the same count); default %(default)s")
    # validation by exact speculative decoding
    eval_every: int = option(0, "validate every N steps (and after the last) by speculative decoding on "
                                "held-out prompts, keeping <out>/best/; 0 = off (the default)")
    eval_prompts: int = option(32, "validation prompts (train-split prompts training never sees); "
                                   "default %(default)s")
    # the launch (not options): recorded in config.json, so that --resume can refuse another one
    world_size: int | None = option(None, "processes of the run (torchrun --nproc_per_node; WORLD_SIZE)",
                                    flag=False)
    data_sha256: str | None = option(None, "sha256 of the rows the run trains and validates on (data_fingerprint): "
                                           "--resume refuses other data", flag=False)


def parse_args(argv=None) -> Config:
    """Every Config field is a flag: --max-new-tokens 64, --resume / --no-resume."""
    p = cli.ArgumentParser(description="On-policy distillation of a speculative-decoding draft.",
                           epilog="example: python distill.py --task gsm8k --div rkl --seed 0")
    for f in fields(Config):
        if not f.metadata["flag"]:
            continue
        flag, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.type is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help)
        else:                                     # `int | None` -> int
            typ = next(a for a in getattr(f.type, "__args__", (f.type,)) if a is not type(None))
            p.add_argument(flag, type=typ, default=f.default, help=help)
    return Config(**vars(p.parse_args(argv)))


def resolve_config(cfg: Config) -> Config:
    """Check every user value (ValueError naming it and the valid choices), then fill the blanks
    from the preset. Runs before any model is built or loaded."""
    data.check_task(cfg.task)
    if cfg.div not in divergences.DIVERGENCES:
        raise ValueError(f"unknown --div {cfg.div!r}; valid: {', '.join(divergences.DIVERGENCES)}")
    for name in ("beta", "lmbda"):
        v = getattr(cfg, name)
        if v is not None and not 0.0 <= v <= 1.0:
            raise ValueError(f"--{name} {v} is outside [0, 1]")
    if cfg.off_policy is not None and cfg.off_policy not in OFF_POLICY:
        raise ValueError(f"unknown --off-policy {cfg.off_policy!r}; valid: {', '.join(OFF_POLICY)}")
    # the largest local rank: every rank's device is checked on each (rank 0 says it, cli.report_bad_input)
    check_device(cfg.device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")) - 1)
    if cfg.dtype is None:                     # the device's natural precision, recorded as resolved
        cuda = torch.device(cfg.device).type == "cuda" if cfg.device else torch.cuda.is_available()
        cfg.dtype = "bfloat16" if cuda else "float32"
    if cfg.dtype not in DTYPES:
        raise ValueError(f"unknown --dtype {cfg.dtype!r}; valid: {', '.join(DTYPES)}")
    if cfg.preset not in models.PRESETS:
        raise ValueError(f"unknown --preset {cfg.preset!r}; valid: {', '.join(models.PRESETS)}")
    preset = dict(models.preset_config(cfg.preset, cfg.task))
    check_models_fit_preset(cfg, preset)
    preset_source = models.preset_data(cfg.preset, cfg.task)
    cfg.source, cfg.data_path = data.resolve_source(cfg.source, cfg.data_path, preset_source)
    for f in fields(Config):
        if f.metadata["preset"] and getattr(cfg, f.name) is None:
            value = preset.get(f.name)
            setattr(cfg, f.name, f.metadata["fallback"] if value is None else value)
    if cfg.loss_temperature is None:
        cfg.loss_temperature = cfg.temperature if cfg.temperature > 0 else 1.0
    for name in ("loss_temperature", "lr"):
        if not getattr(cfg, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")
    if cfg.temperature < 0 or not 0 < cfg.top_p <= 1:
        raise ValueError(f"need --temperature >= 0 and 0 < --top-p <= 1, got {cfg.temperature}, {cfg.top_p}")
    if cfg.off_policy_warmup < 0:
        raise ValueError(f"--off-policy-warmup must be >= 0 steps, got {cfg.off_policy_warmup}")
    for name in ("steps", "batch_size", "grad_accum", "max_new_tokens", "n_train", "save_every"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    cli.check_threads(cfg.threads)
    cfg.world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.batch_size % (cfg.world_size * cfg.grad_accum):
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by world size {cfg.world_size} "
                         f"x --grad-accum {cfg.grad_accum}")
    if cfg.out is None:
        tag = cfg.div if cfg.div != "jsd" or cfg.beta == 0.5 else f"jsd{cfg.beta:g}"
        group = rundir.task_group(cfg.task, cfg.source, cfg.data_path, preset_source)   # the task, or e.g. gsm8k-file-x
        cfg.out = str(Path("runs") / cfg.preset / group / f"{tag}-s{cfg.seed}")
    check_options(cfg)
    if cfg.resume:
        rundir.check_resumable(Path(cfg.out))
    check_run_dir(cfg)
    return cfg


SCHEDULE_FIELDS = ("lr", "warmup", "steps", "epochs", "batch_size", "grad_accum")   # the optimisation a preset tunes


def check_models_fit_preset(cfg: Config, preset: dict):
    """The tiny preset's learning rate and schedule are tuned for its own offline pair (a 1-layer student of a
    few hundred thousand weights: lr 2e-3), far too hot for a real model. A --teacher / --student outside the
    tiny pairs (a folder models.py built, marked by its build.json) under --preset tiny, --preset left at its
    default included, is refused unless --lr is given: the user then chose the learning rate."""
    if cfg.preset != "tiny" or cfg.lr is not None:
        return
    for role in ("teacher", "student"):
        model = getattr(cfg, role)
        local = Path(str(model)).expanduser()
        if model is None or (local.is_dir() and not (local / "config.json").is_file()):
            continue                                 # not a model folder: check_inputs names what is wrong with it
        if not models.is_tiny_pair_model(model):
            raise ValueError(f"--{role} {model} is not a tiny pair's model, and --preset tiny (the default) would "
                             f"train it with the tiny preset's lr {preset.get('lr'):g} and schedule, tuned for the "
                             f"offline tiny pair: pass --lr (and --steps / --warmup as wanted), or --preset smollm2 / "
                             f"paper")


def preset_settings_line(cfg: Config, unset: list[str]) -> str:
    """Which preset's optimisation settings this run takes, and which of them came from it (unset: the preset
    fields no flag set), e.g. "[distill] settings of the tiny preset: lr 0.002, warmup 0.1, steps 300; --batch-size
    given"."""
    taken = [f"{name} {getattr(cfg, name):g}" for name in SCHEDULE_FIELDS
             if name in unset and getattr(cfg, name) is not None]
    given = ["--" + name.replace("_", "-") for name in SCHEDULE_FIELDS if name not in unset]
    return (f"[distill] settings of the {cfg.preset} preset: " + (", ".join(taken) or "none")
            + (f"; {', '.join(given)} given" if given else "")
            + (" (the tiny preset is tuned for its offline pair; --preset paper for real models)"
               if cfg.preset == "tiny" else ""))


def check_options(cfg: Config):
    """The value checks resolve_config leaves out: ranges that would train the wrong way silently
    (a negative clip threshold ascends the gradient) and non-finite numbers (nan passes every < test)."""
    def bad(name, allowed):
        flag = "--" + name.replace("_", "-")
        raise ValueError(f"{flag} {getattr(cfg, name)!r} is not allowed; {flag} must be {allowed}")
    finite = lambda v: isinstance(v, (int, float)) and math.isfinite(v)   # noqa: E731
    for name in ("beta", "ajsd_scale", "ajsd_floor", "lk_scale", "lk_decay", "lmbda", "temperature", "top_p",
                 "loss_temperature",
                 "lr", "warmup", "weight_decay", "max_grad_norm", "epochs"):
        if getattr(cfg, name) is not None and not finite(getattr(cfg, name)):
            bad(name, "a finite number")
    if not cfg.max_grad_norm > 0:
        bad("max_grad_norm", "> 0 (the gradient-norm clipping threshold)")
    if not 0 <= cfg.warmup < 1:
        bad("warmup", "in [0, 1) (a fraction of the steps)")
    cli.check_seed(cfg.seed)
    if cfg.weight_decay < 0:
        bad("weight_decay", ">= 0")
    if not cfg.epochs > 0:
        bad("epochs", "> 0")
    if cfg.ajsd_scale < 0:
        bad("ajsd_scale", ">= 0 (nats; 0 = beta is the floor everywhere)")
    if not 0 <= cfg.ajsd_floor <= 1:
        bad("ajsd_floor", "in [0, 1] (the beta of a very uncertain teacher)")
    for name in ("lk_scale", "lk_decay"):
        if getattr(cfg, name) < 0:
            bad(name, ">= 0 (lk's KL weight w = lk_scale exp(-lk_decay mean alpha))")
    if cfg.eval_every < 0:
        bad("eval_every", ">= 0 (0 = no validation)")
    if cfg.eval_prompts < 1:
        bad("eval_prompts", ">= 1")
    if cfg.overwrite and cfg.resume:
        raise ValueError("--resume continues the run in --out and --overwrite deletes it: pass one of them")
    if cfg.fsdp and "WORLD_SIZE" not in os.environ:
        raise ValueError("--fsdp shards the models over torchrun's processes: launch with "
                         "torchrun --nproc_per_node=N distill.py --fsdp ...")
    if cfg.fsdp and cfg.eval_every:
        raise ValueError(f"--eval-every {cfg.eval_every} is not supported with --fsdp yet (validation decodes "
                         "with the whole student on rank 0): drop --eval-every, or validate the checkpoints with "
                         "python -m study.evaluate")
    if cfg.fsdp and cfg.lmbda < 1 and cfg.off_policy == "teacher":
        raise ValueError("--off-policy teacher is not allowed with --fsdp: sampling from the sharded teacher "
                         "would all-gather it once per decoded token, in lock-step over the ranks; use "
                         "--off-policy dataset (or --lmbda 1)")


def check_run_dir(cfg: Config):
    """--out: a writable directory, not written by another process; a fresh run does not replace a run
    silently; a resumed run keeps the settings that change the result (rundir.py). Rank 0 only: it is
    the rank that writes (the others would see its lock)."""
    rundir.check_out_dir(Path(cfg.out))
    if int(os.environ.get("RANK", "0")) != 0:
        return
    rundir.check_unlocked(Path(cfg.out))
    if cfg.resume:
        # the thread count changes floating-point sums on the CPU only (CUDA kernels do not use the pool)
        on_cuda = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")).type == "cuda"
        rundir.check_same_run(Path(cfg.out), asdict(cfg), may_change={"threads"} if on_cuda else ())
    else:
        rundir.check_fresh(Path(cfg.out), cfg.overwrite)


# ----------------------------------------------------------------------------- small pure helpers

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


def no_logits_column(batch: dict) -> torch.Tensor:
    """logits_to_keep = an empty index: the model's lm_head projects no position (the loss does it)."""
    return torch.empty(0, dtype=torch.long, device=batch["input_ids"].device)


def completion_hidden(model, batch: dict):
    """The last hidden states (after the final norm) at the columns that predict the completion tokens:
    (B, C, H). Column P - 1 + j predicts completion token j.

    The model's own forward -- through a DDP wrapper, which must see it to all-reduce the gradients -- with
    no logits column kept (logits_to_keep = an empty index): the lm_head projects nothing, the loss does it
    (divergences.hidden_divergence_sum). output_hidden_states returns every layer's output, which autograd
    keeps for the student's backward anyway; the frozen teacher runs its decoder alone (teacher_hidden)."""
    P = batch["prompt_width"]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=no_logits_column(batch), output_hidden_states=True,
                use_cache=False)
    return out.hidden_states[-1][:, P - 1:-1]                      # (B, C, H)


def teacher_hidden(teacher, batch: dict):
    """completion_hidden of the frozen teacher, from its decoder (get_decoder()) alone: under no_grad no
    layer's output is kept, so none is collected either. (B, C, H_t)
    Under --fsdp the root's own forward must run (it gathers the embeddings and the final norm): the whole
    model with no logits column kept, the decoder's last hidden state read as it leaves the decoder."""
    P = batch["prompt_width"]
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              position_ids=batch["position_ids"], use_cache=False)
    decoder = teacher.get_decoder()
    if not sharding.is_sharded(teacher):
        return decoder(**kw).last_hidden_state[:, P - 1:-1]       # (B, C, H_t)
    seen = {}
    hook = decoder.register_forward_hook(lambda module, args, out: seen.update(hidden=out.last_hidden_state))
    try:
        teacher(**kw, logits_to_keep=no_logits_column(batch))
    finally:
        hook.remove()
    return seen["hidden"][:, P - 1:-1]                              # (B, C, H_t)


def lm_head_weight(model, name: str = "model") -> torch.Tensor:
    """The lm_head weight (V, H) that hidden_divergence_sum projects with (tied: the embedding matrix itself,
    so its gradient lands on that one parameter). Refused, naming why, where a plain projection of the last
    hidden state is not the model's logits: a bias, a logit scale or a final soft-capping."""
    head = model.get_output_embeddings()
    cfg = getattr(model, "config", None)
    extra = [k for k in ("final_logit_softcapping", "logit_scale") if getattr(cfg, k, None) not in (None, 1.0)]
    if getattr(head, "bias", None) is not None:
        extra.append("an lm_head bias")
    if not isinstance(getattr(head, "weight", None), torch.Tensor) or not head.weight.is_floating_point() or extra:
        raise ValueError(f"the {name}'s lm_head is not a plain float projection ({', '.join(extra) or type(head)}): "
                         "the loss computes logits as hidden @ weight^T")
    return head.weight


def completion_logits(model, batch: dict):
    """Logits that predict the completion tokens: (B, C, V) -- the reference path the tests compare the loop's
    (completion_hidden + hidden_divergence_sum) against.

    Column P - 1 + j predicts completion token j, so only the last C + 1 columns are kept
    (logits_to_keep: no (B, P, V) logits for the prompt) and the very last one is dropped."""
    C = batch["input_ids"].shape[1] - batch["prompt_width"]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=C + 1, use_cache=False)
    return out.logits[:, :-1]                                      # (B, C, V)


def loss_and_backward(cfg: "Config", run: "Run", batch: dict, scale: float):
    """One micro-batch's loss: the frozen teacher and the student run to their last hidden states, the loss
    projects them through both lm_heads itself, in float32, a block of positions at a time (no (B, C, V)
    logits), and (sum of d) * scale is backpropagated. -> (sum of d, sum of H(p_T), sum of alpha), detached.
    Under --fsdp each root unit stays whole until the loss has read its lm_head (sharding.head_kept): the
    teacher's until the loss's forward sweep is done, the student's through the backward."""
    mask = batch["loss_mask"][:, batch["prompt_width"]:]                        # (B, C)
    student, teacher = run.student, run.teacher
    with sharding.head_kept(student):
        with sharding.head_kept(teacher):
            with torch.no_grad(), run.autocast:
                t_hidden = teacher_hidden(teacher, batch)                        # (B, C, H_t)
            with run.autocast:
                s_hidden = completion_hidden(run.model, batch)                   # (B, C, H_s)
            div_sum, ent, alpha = divergences.hidden_divergence_sum(
                divergences.HiddenAndHead(s_hidden, lm_head_weight(student)),
                divergences.HiddenAndHead(t_hidden, lm_head_weight(teacher)), mask, loss_divergence(cfg),
                vocab_size=run.vocab, return_teacher_entropy=True, return_alpha=True)
            del t_hidden                                   # not needed by the backward: freed before it
        (div_sum * scale).backward()
    return div_sum.detach(), ent, alpha


def loss_divergence(cfg: "Config") -> divergences.Divergence:
    """The per-token divergence d of the loss: --div with its options, at the loss temperature."""
    return divergences.Divergence(cfg.div, cfg.beta, cfg.loss_temperature, cfg.ajsd_scale, cfg.ajsd_floor,
                                  cfg.lk_scale, cfg.lk_decay)


def batch_divergence_sum(student_logits, teacher_logits, mask, divergence: divergences.Divergence,
                         vocab_size: int | None = None, return_teacher_entropy: bool = False,
                         return_alpha: bool = False) -> divergences.LossSums:
    """Sum of the per-token divergence d(p, q) over the masked completion tokens (LossSums.total, a scalar).
    vocab_size: compare only the tokenizer's real tokens (lm_heads may carry padding rows).
    return_teacher_entropy=True / return_alpha=True (passed on to divergences.divergence_sum) also fill the
    sums of H(p_T) and of alpha at the loss temperature, without top-p: logged as loss_teacher_entropy and
    train_alpha."""
    if vocab_size is not None or student_logits.shape[-1] != teacher_logits.shape[-1]:
        student_logits, teacher_logits = divergences.shared_vocab(student_logits, teacher_logits, vocab_size)
    return divergences.divergence_sum(student_logits, teacher_logits, mask, divergence,
                                      return_teacher_entropy=return_teacher_entropy, return_alpha=return_alpha)


def step_prompt_indices(step: int, batch_size: int, n_prompts: int, seed: int) -> list[int]:
    """The global batch of prompt indices for an optimizer step: consecutive slices of one seeded
    permutation per epoch. A pure function of the step, so a resumed run sees the same batches."""
    out = []
    start = step * batch_size
    for k in range(start, start + batch_size):
        epoch, i = divmod(k, n_prompts)
        perm = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perm[i]))
    return out


def prompt_generator(seed: int, step: int, position: int, device) -> torch.Generator:
    """The sampling RNG of one prompt: (run seed, step, the prompt's position in the step's global batch).
    Reproducible across --resume without replaying, and the same whichever rank and micro-batch sample it."""
    return torch.Generator(device=device).manual_seed(((seed * 1_000_003 + step) * 1009 + position) % 2**63)


# ----------------------------------------------------------------------------- checkpoints

def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint (ckpt-<step>; a .tmp directory is an interrupted write)."""
    done = sorted(p for p in out.glob("ckpt-*") if (p / "trainer_state.pt").exists())
    return done[-1] if done else None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: Path, step: int, student, tokenizer, optimizer, scheduler, *, model_state=None,
                    optimizer_state=None):
    """Write ckpt-<step> atomically: everything, and the checksums of its files, into a temporary
    directory, then one rename; then keep the newest two (rundir.KEEP_CHECKPOINTS), so that a damaged
    newest one has a predecessor. A crash at any point leaves the previous checkpoints intact.
    Under --fsdp, model_state / optimizer_state are the gathered full states (sharding.full_state_dict,
    sharding.full_optimizer_state): the folder is the same plain Hugging Face one."""
    final = out / f"ckpt-{step:07d}"
    tmp = out / f".ckpt-{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_model(student, tmp, model_state)                     # safetensors
        tokenizer.save_pretrained(tmp)
        state = {"step": step, "optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
                 "scheduler": scheduler.state_dict(), "rng": rng_state()}
        torch.save(state, tmp / "trainer_state.pt")               # plain tensors / dicts only
        rundir.write_checksums(tmp)                               # verified by --resume
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)                    # give back the space a full disk needs
        full = rundir.disk_full(e, tmp)
        if full is not None:
            raise full from e
        raise
    rundir.set_aside(final)                   # only a damaged ckpt-<step> (skipped by --resume) is in the way
    os.replace(tmp, final)
    rundir.fsync_dir(out)
    rundir.prune_checkpoints(out)
    return final


def save_model(student, path: Path, state_dict=None):
    """save_pretrained (safetensors) of the student, or of a gathered full state under --fsdp (the config
    then names the model's own class, not FSDP's wrapper class)."""
    if state_dict is None:
        student.save_pretrained(path)
        return
    # the gathered copies of tied weights (lm_head = embed_tokens) are separate tensors: keep the first name,
    # as save_pretrained does for the model's own (shared) parameters
    aliases = ({n for n, _ in student.named_parameters(remove_duplicate=False)}
               - {n for n, _ in student.named_parameters()})
    student.save_pretrained(path, state_dict={k: v for k, v in state_dict.items() if k not in aliases})
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = [a.removeprefix("FSDP") for a in config.get("architectures") or []]
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_final(out: Path, student, tokenizer, state_dict=None) -> Path:
    """<out>/final: a plain Hugging Face model directory (from_pretrained, assistant_model)."""
    final, tmp = out / "final", out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(student, tmp, state_dict)
    tokenizer.save_pretrained(tmp)
    rundir.write_checksums(tmp)               # verified wherever final/ is loaded (models.check_model_files)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


# ----------------------------------------------------------------------------- validation and best/

VAL_KEYS = ("val_acceptance_rate", "val_alpha", "val_mean_accepted_length", "val_per_position_acceptance")


def validate(run) -> dict:
    """The val_* keys of a row: exact speculative decoding of the current student drafting for the teacher on
    the validation prompts, with the decoding protocol and one fixed sampling seed (the same at every
    validation, so the rows differ by the student only); pooled over the prompts (specdec's batch stats).
    NaN (nothing drafted) is written as null, and a null acceptance is never a new best."""
    run.student.eval()
    t0 = time.perf_counter()
    with torch.no_grad(), run.autocast:
        stats = specdec.speculative_generate(run.teacher, run.student, run.val_prompts, seed=VAL_SAMPLING_SEED,
                                             **run.protocol.speculative_kwargs()).stats
    run.student.train()
    clean = lambda x: None if isinstance(x, float) and math.isnan(x) else x   # noqa: E731
    val = {f"val_{k}": stats[k] for k in ("acceptance_rate", "alpha", "mean_accepted_length")}
    val = {k: clean(v) for k, v in val.items()}
    val["val_per_position_acceptance"] = [clean(x) for x in stats["per_position_acceptance"]]
    val["val_seconds"] = time.perf_counter() - t0
    return val


VAL_SAMPLING_SEED = 0


@dataclass
class Best:
    """The best validation so far: its step and val_acceptance_rate (-inf before the first)."""
    step: int = 0
    value: float = -math.inf


def save_best(out: Path, step: int, student, tokenizer, val: dict) -> Best:
    """<out>/best: the student (a plain Hugging Face directory), best.json {step, val_*}, checksums.json;
    written to a temporary directory and renamed over the old best/ (a crash leaves the old or the new)."""
    best, tmp, old = out / "best", out / ".best.tmp", out / ".best-old.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "best.json").write_text(json.dumps({"step": step, **val}, indent=1))
    rundir.write_checksums(tmp)
    if best.exists():
        os.replace(best, old)                 # two renames: no moment without a whole best (old or new)
    os.replace(tmp, best)
    rundir.fsync_dir(out)
    shutil.rmtree(old, ignore_errors=True)
    return Best(step, val["val_acceptance_rate"])


def load_best(out: Path, start: int) -> Best:
    """The best so far of a resumed run: <out>/best's step and value when it verifies and is not newer than
    the checkpoint resumed from (it cannot be, unless the newest checkpoint was damaged); otherwise best/ is
    removed, saying why, and the next validation makes it again."""
    best = out / "best"
    if not best.exists():
        old = out / ".best-old.tmp"                # killed between best/'s two renames: the old one is whole
        if not old.exists():
            return Best()
        os.replace(old, best)
    problem = rundir.verify_checkpoint(best)
    info = json.loads((best / "best.json").read_text()) if problem is None else {}
    if problem is None and info["step"] <= start:
        return Best(info["step"], info["val_acceptance_rate"])
    why = problem or f"it is from step {info['step']}, after the checkpoint resumed from (step {start})"
    rundir.say(f"{best} removed: {why}; the next validation writes it again")
    shutil.rmtree(best)
    return Best()


# ----------------------------------------------------------------------------- distributed

def init_distributed(fsdp: bool = False):
    """(rank, world_size, local_rank); initialises the process group under torchrun (for --fsdp also with
    one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not fsdp:
        return 0, 1, 0
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))


def all_reduce_sum(x, world: int, device):
    """The sum over the ranks of a number (-> float) or a tensor of counts (-> float64 tensor on the CPU)."""
    if world == 1:
        return x
    t = (x if torch.is_tensor(x) else torch.tensor([x])).to(device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return t.cpu() if torch.is_tensor(x) else float(t)


# ----------------------------------------------------------------------------- the loop

def main(argv=None):
    """Check everything before any model loads (bad input: cli.BadInput, one line from the command line),
    take the run directory's lock (rank 0), train. A fresh run that stops before its first logged step
    leaves nothing behind that would block a retry. Ctrl-C: one line saying where the run stopped and
    the command that resumes it (then the KeyboardInterrupt goes on)."""
    master = int(os.environ.get("RANK", "0")) == 0
    with cli.before_the_work():
        cfg = parse_args(argv)
        unset = [f.name for f in fields(Config) if f.metadata["preset"] and getattr(cfg, f.name) is None]
        cfg = resolve_config(cfg)
        if master:
            print(preset_settings_line(cfg, unset), flush=True)
        inputs = check_inputs(cfg, master)
    if cfg.check:
        if master:
            print(check_summary(cfg, inputs), flush=True)
        return 0
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    out = Path(cfg.out)
    lock = rundir.RunLock(out) if master else None
    with cli.before_the_work():              # a run that started on this --out since the check: one line
        if lock is not None:
            lock.acquire()
    try:
        with cli.before_the_work():          # checked again under the lock (another run may have written)
            if master and not cfg.resume:
                rundir.start_fresh(out, cfg.overwrite)
        try:
            return train(cfg, inputs)
        except BaseException:
            if master and not cfg.resume:
                try:
                    rundir.discard_unstarted(out)
                except OSError:              # an unwritable directory: what is there stays, said below
                    pass
            raise
    except KeyboardInterrupt as e:
        if master:
            how = "terminated (SIGTERM)" if isinstance(e, cli.Terminated) else "interrupted"
            print(rundir.interrupted_message(out, argv, how), file=sys.stderr, flush=True)
        raise
    except OSError as e:
        message = rundir.write_failure(e, out, argv) if master else None
        if message is None:
            raise
        failure = rundir.RunDirError(message)
        failure.bad_input = True             # not a bug: one line (cli.script_main), exit 2
        raise failure from e
    finally:
        if lock is not None:
            lock.release()


@dataclass
class Inputs:
    """What main checks before any model loads, for set_up: the data, its prompts, the checkpoint."""
    examples: list[data.Example]
    prompts: list[list[int]]            # chat-templated prompt ids, each within the models' context
    ckpt: Path | None                   # --resume: the newest verified checkpoint
    val_prompts: list[list[int]]        # --eval-every: the held-out validation prompts (else [])


def check_inputs(cfg: Config, master: bool) -> Inputs:
    """The pair (the preset's, built on first use), the training rows (checked; CNN/DM's length filter
    counted with the teacher's tokenizer), the model folders (config.json, safetensors headers, one
    tokenizer), the checkpoint to resume, --teacher-8bit on the device, every prompt + --max-new-tokens
    within both models' context. Loads no model.
    With --eval-every, the validation prompts are held out of the train split (data.held_out_split)."""
    if cfg.teacher is None or cfg.student is None:
        teacher_id, student_id = models.resolve_pair(cfg.task, cfg.preset)
        cfg.teacher, cfg.student = cfg.teacher or teacher_id, cfg.student or student_id
    models.check_gguf_paths(teacher=cfg.teacher, student=cfg.student)       # a .gguf: one line if it is not one
    cfg.teacher, cfg.student = models.model_folder(cfg.teacher), models.model_folder(cfg.student)
    tokenizer = models.load_tokenizer(cfg.teacher, "teacher")
    if cfg.eval_every:
        try:
            examples, val_examples = data.held_out_split(cfg.task, cfg.n_train, cfg.eval_prompts, source=cfg.source,
                                                         path=cfg.data_path, seed=cfg.seed, tokenizer=tokenizer,
                                                         verbose=master)
        except data.DataError as e:
            if "validation prompts asked" not in str(e):
                raise
            raise data.DataError(f"--eval-prompts {cfg.eval_prompts} is too many: {e}") from None
    else:
        examples = data.load_examples(cfg.task, "train", source=cfg.source, path=cfg.data_path, n=cfg.n_train,
                                      seed=cfg.seed, tokenizer=tokenizer, verbose=master)
        val_examples = []
    cfg.data_sha256 = data_fingerprint(examples, val_examples)
    if cfg.resume and master:
        rundir.check_same_data(Path(cfg.out), cfg.data_sha256, data_origin(cfg), len(examples))
    ckpt = rundir.resume_checkpoint(Path(cfg.out)) if cfg.resume else None
    folders = {"teacher": cfg.teacher, "student": str(ckpt) if ckpt else cfg.student}
    for role, path in folders.items():
        models.check_model_files(path, role)
    models.check_tokenizers(*folders.values())
    for role, path in folders.items():             # the lm_heads cover the tokenizer, read from config.json
        models.check_vocabulary(path, tokenizer, role)
    device = run_device(cfg, int(os.environ.get("LOCAL_RANK", "0")))
    if cfg.teacher_8bit and (why := models.int8_unsupported(device)):   # CUDA, and CPU with bitsandbytes >= 0.45
        raise ValueError(f"--teacher-8bit needs bitsandbytes' 8-bit matmul on device {device}: {why}")
    context = models.context_length(*folders.values())
    for rows in (examples, val_examples):      # a huge row is refused before it is tokenized whole
        data.check_prompt_chars(tokenizer, cfg.task, rows, context, cfg.max_new_tokens)
    prompts = [data.build_prompt_ids(tokenizer, cfg.task, ex) for ex in examples]
    val_prompts = [data.build_prompt_ids(tokenizer, cfg.task, ex) for ex in val_examples]
    data.check_prompt_lengths(prompts, examples, context, cfg.max_new_tokens)
    data.check_prompt_lengths(val_prompts, val_examples, context, cfg.max_new_tokens)
    return Inputs(examples, prompts, ckpt, val_prompts)


def check_summary(cfg: Config, inputs: Inputs) -> str:
    """--check's one line: what the checked run would do, and that nothing was written."""
    start = f"resume from {inputs.ckpt}" if inputs.ckpt else f"a fresh run in {cfg.out}"
    return (f"checked: {cfg.div} on {len(inputs.prompts)} {cfg.task} prompts, teacher {cfg.teacher}, student "
            f"{cfg.student}, {cfg.world_size} process(es); {start}. Nothing was written.")


def data_fingerprint(examples: list[data.Example], val_examples: list[data.Example]) -> str:
    """sha256 of the rows a run uses, in order: the training rows and the held-out validation rows (prompt and
    reference each). The same data file, --n-train and --seed give the same rows; an edited file does not."""
    h = hashlib.sha256()
    for part, rows in (("train", examples), ("val", val_examples)):
        for ex in rows:
            h.update(json.dumps([part, ex.prompt, ex.reference]).encode("utf-8", "surrogatepass") + b"\n")
    return h.hexdigest()


def data_origin(cfg: Config) -> str:
    """Where the training rows come from, in words (for messages)."""
    if cfg.source == "file":
        return f"--data-path {cfg.data_path}"
    return f"the {cfg.source} data of {cfg.task}"


def train(cfg: Config, inputs: Inputs):
    """The training loop of a checked config (main) in its locked run directory (set-up: `set_up`)."""
    run = set_up(cfg, inputs)
    student, model, world = run.student, run.model, run.world
    bar = tqdm(range(run.start, cfg.steps), initial=run.start, total=cfg.steps, disable=not run.master,
               desc=f"{cfg.task}/{cfg.div}")
    for step in bar:
        t0 = time.perf_counter()
        # 1) sample: this rank's micro-batches; completions from the student (prob. lmbda), else from the
        #    dataset or the teacher. No gradient flows through sampling.
        source, micro_batches = sample_step(cfg, run, step)

        # 2) the normaliser: completion tokens in the whole step (all micro-batches, all ranks)
        n_tokens = all_reduce_sum(sum(int(b["loss_mask"].sum()) for b in micro_batches), world, run.device)

        # 3) teacher forward (frozen) and student forward to the last hidden states; the loss projects them
        #    through both lm_heads itself, in float32, a block of positions at a time (no (B, C, V) logits,
        #    under --fsdp too); loss = sum of d / n_tokens, backward
        loss_sum, ent_sum, alpha_sum = 0.0, 0.0, 0.0
        for m, batch in enumerate(micro_batches):
            # DDP: all-reduce the gradients once, after the last micro-batch. FSDP reduce-scatters after
            # every micro-batch, so that no rank ever holds the whole gradient.
            last = m == cfg.grad_accum - 1
            sync = nullcontext() if world == 1 or last or run.fsdp else model.no_sync()
            # DDP and FSDP average gradients over ranks; * world turns that average into the global sum
            with sync:
                div_sum, ent, alpha = loss_and_backward(cfg, run, batch, scale=world / max(n_tokens, 1.0))
            loss_sum += float(div_sum)
            ent_sum += float(ent)                 # H(p_T) at the loss temperature, from the loss's own sweep
            alpha_sum += float(alpha)             # sum_x min(p_T, q_T) at the loss temperature, likewise

        # 4) clip, AdamW step, schedule (under FSDP each rank clips and updates its own pieces)
        grad_norm = sharding.to_float(torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm))
        lr = run.scheduler.get_last_lr()[0]
        run.optimizer.step()
        run.scheduler.step()
        if run.fsdp and step == run.start:           # what each rank holds, once the AdamW state exists
            write_sharding_record(run)
        run.optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0             # the step's time, without validation

        # 5) validate the updated student (rank 0): exact speculative decoding on the held-out prompts
        final_step = step + 1 == cfg.steps
        due = cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or final_step)
        val = validate(run) if run.master and due else {}
        new_best = val.get("val_acceptance_rate") is not None and val["val_acceptance_rate"] > run.best.value
        new_best = all_reduce_sum(float(new_best), world, run.device) > 0      # every rank checkpoints with it

        # 6) log: global mean loss per completion token, tokens/s of the whole step (sampling included)
        loss_sum = all_reduce_sum(loss_sum, world, run.device)
        ent_sum = all_reduce_sum(ent_sum, world, run.device)
        train_alpha = all_reduce_sum(alpha_sum, world, run.device) / max(n_tokens, 1.0)
        dt = all_reduce_sum(dt, world, run.device) / world
        health = all_reduce_sum(sum(b["health"] for b in micro_batches), world, run.device)   # (4,) the step's
        row = dict(step=step + 1, loss=loss_sum / max(n_tokens, 1.0), lr=lr, grad_norm=grad_norm,
                   completion_len=n_tokens / cfg.batch_size, loss_teacher_entropy=ent_sum / max(n_tokens, 1.0),
                   train_alpha=train_alpha,
                   train_accepted_length=specdec.expected_accepted_length(train_alpha, run.protocol.gamma),
                   tokens_per_s=n_tokens / dt, source=source,
                   sample_stop_rate=float(health[0] / max(health[1], 1)),
                   sample_repetition=float(health[2] / max(health[3], 1)), **val)
        if run.master and source == "student" and row["sample_repetition"] > DEGENERATE_REPETITION:
            tqdm.write(f"warning: step {step + 1}: the student's samples degenerate ({row['sample_repetition']:.0%} "
                       f"repeated 4-grams, {row['sample_stop_rate']:.0%} stopped), so train_alpha "
                       f"{train_alpha:.2f} is measured on loops the teacher predicts too and overstates the "
                       f"acceptance; give the draft more off-policy steps first (--off-policy-warmup, a lower "
                       f"--lmbda) and watch val_alpha (--eval-every)")
        if run.master:
            run.metrics.write(json.dumps(row) + "\n")
            run.metrics.flush()
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")

        # 7) checkpoint (atomic), every save_every steps, at the end and at a new best; then best/
        if (step + 1) % cfg.save_every == 0 or final_step or new_best:
            model_state, optimizer_state = gather_for_checkpoint(run)          # FSDP: a collective
            if run.master:
                save_checkpoint(run.out, step + 1, student, run.tokenizer, run.optimizer, run.scheduler,
                                model_state=model_state, optimizer_state=optimizer_state)
                if new_best:                      # never under --fsdp (check_options refuses --eval-every)
                    run.best = save_best(run.out, step + 1, student, run.tokenizer, val)
            if world > 1:
                dist.barrier()
    return finish(run)


def sample_step(cfg: Config, run, step: int) -> tuple[str, list[dict]]:
    """The step's source ("student", "dataset" or "teacher": one seeded coin per step, the same on every
    rank) and this rank's grad_accum micro-batches (build_batch dicts on the device) of its shard of the
    step's prompts. Every choice is a pure function of (seed, step) and of each prompt's position in the
    step's batch (its sampling generator), so --resume reproduces it and the split over ranks and micro-batches
    does not change it."""
    shard = step_prompt_indices(step, cfg.batch_size, len(run.prompts), cfg.seed)[run.rank::run.world]
    coin = torch.rand(1, generator=torch.Generator().manual_seed(cfg.seed * 7919 + step)).item()
    on_policy = step >= cfg.off_policy_warmup and coin < cfg.lmbda      # the warm-up's steps are all off-policy
    source = "student" if on_policy else cfg.off_policy
    positions = list(range(cfg.batch_size))[run.rank::run.world]     # this shard's places in the step's batch
    micro = cfg.batch_size // run.world // cfg.grad_accum             # prompts per micro-batch
    sampler = {"student": run.student, "teacher": run.teacher}.get(source)
    micro_batches = []
    # a sharded student is gathered once for all of the step's sampling (sharding.gathered), not per token
    with sharding.gathered(sampler) if sampler is run.student else nullcontext():
        for m in range(cfg.grad_accum):
            rows = shard[m * micro:(m + 1) * micro]                     # indices into run.prompts
            prompt_ids = [run.prompts[r] for r in rows]
            if sampler is None:
                completions = [run.references[r] for r in rows]
            else:
                gens = [prompt_generator(cfg.seed, step, k, run.device)
                        for k in positions[m * micro:(m + 1) * micro]]
                sampler.eval()
                with torch.no_grad(), run.autocast:
                    completions = specdec.autoregressive_generate(sampler, prompt_ids, generator=gens,
                                                                  **run.protocol.generate_kwargs()).tokens
                run.student.train()
            completions = [cut_at_stop(c, run.stop_ids, cfg.max_new_tokens) for c in completions]
            batch = {k: (v.to(run.device) if torch.is_tensor(v) else v)
                     for k, v in build_batch(prompt_ids, completions, run.pad_id).items()}
            batch["health"] = sample_health(completions, run.stop_ids)
            micro_batches.append(batch)
    return source, micro_batches


DEGENERATE_REPETITION = 0.5      # above this share of repeated 4-grams, on-policy samples are loops


def repeated_ngrams(tokens: list[int], n: int = 4) -> tuple[int, int]:
    """(n-grams that already occurred earlier in the same completion, all n-grams): a completion stuck in a
    loop (" ( ( (") repeats nearly every n-gram; fluent text almost none."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) - len(set(grams)), len(grams)


def sample_health(completions: list[list[int]], stop_ids) -> torch.Tensor:
    """(completions that stopped, completions, repeated 4-grams, 4-grams) of a micro-batch's samples, summed:
    the loop logs sample_stop_rate and sample_repetition from them and warns when the student's samples
    degenerate (a draft far from its target loops and never stops, and the teacher, which predicts the loop
    too, then agrees with it: train_alpha rises while the real acceptance does not)."""
    stops = set(stop_ids)
    stopped = sum(bool(c) and c[-1] in stops for c in completions)
    repeated, grams = map(sum, zip(*(repeated_ngrams(c) for c in completions))) if completions else (0, 0)
    return torch.tensor([stopped, len(completions), repeated, grams], dtype=torch.float64)


@dataclass
class Run:
    """What the loop needs, built by set_up: the process, the models, the data, the optimiser, the log."""
    rank: int
    world: int
    device: torch.device
    out: Path
    master: bool
    teacher: torch.nn.Module            # frozen target p (--fsdp: sharded, sharding.py)
    student: torch.nn.Module            # trainable draft q (fp32 master weights; --fsdp: sharded)
    model: torch.nn.Module              # the student, wrapped in DDP when world > 1 without --fsdp
    tokenizer: object
    protocol: models.DecodingProtocol   # sampling settings shared with evaluate.py / report.py
    stop_ids: list[int]
    pad_id: int
    vocab: int                          # len(tokenizer): no lm_head padding rows
    autocast: object                    # bf16 autocast (--dtype bfloat16, any device), else a no-op
    prompts: list[list[int]]            # chat-templated prompt ids
    references: list[list[int]]         # dataset answers + a stop token (off-policy dataset batches)
    optimizer: torch.optim.Optimizer
    scheduler: object
    start: int                          # the first step to run (the checkpoint's on --resume)
    metrics: object                     # <out>/metrics.jsonl, open for appending (rank 0; else None)
    val_prompts: list[list[int]]        # held-out validation prompts ([] without --eval-every)
    best: "Best"                        # the best validation so far (<out>/best/)
    fsdp: bool = False                  # teacher and student sharded over the ranks (FSDP2)


def set_up(cfg: Config, inputs: Inputs) -> Run:
    """Everything before the first step, in this order (the RNG seeds are set before any model exists):
    process and device, models, optimiser and schedule (restored on --resume), the run directory."""
    rank, world, device = set_up_process(cfg)
    out, master = Path(cfg.out), rank == 0
    examples, prompts, ckpt = inputs.examples, inputs.prompts, inputs.ckpt
    teacher, student, tokenizer = load_models(cfg, device, ckpt)
    if cfg.fsdp:                             # before the optimizer: AdamW then holds each rank's pieces only
        shard_models(cfg, teacher, student, device)
    # one decoding protocol (models.decoding_protocol) for sampling here and for evaluate.py / report.py
    protocol = models.decoding_protocol(models.preset_config(cfg.preset, cfg.task), tokenizer, teacher,
                                        temperature=cfg.temperature, top_p=cfg.top_p,
                                        max_new_tokens=cfg.max_new_tokens)
    stop_ids = list(protocol.stop_ids)
    # --dtype bfloat16: the forwards (sampling included) under bf16 autocast on every device; the loss
    # projects in float32 itself, sampling processes the logits in float32, AdamW's state is float32
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.dtype == "bfloat16"
                else nullcontext())

    # -- for dataset batches, the reference answers + a stop token (the prompts: check_inputs)
    end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else stop_ids[:1]
    references = [tokenizer.encode(ex.reference, add_special_tokens=False) + end for ex in examples]
    if cfg.steps is None:                                          # the paper preset: epochs over the prompts
        cfg.steps = max(1, math.ceil(cfg.epochs * len(prompts) / cfg.batch_size))

    optimizer, scheduler, start = make_optimizer(cfg, student, ckpt, device)
    model = torch.nn.parallel.DistributedDataParallel(student) if world > 1 and not cfg.fsdp else student
    best = load_best(out, start) if master and ckpt else Best()   # best/ of a resumed run, before the clean-up
    if master:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".*.tmp"):                         # interrupted writes of a killed run
            shutil.rmtree(stale, ignore_errors=True)
        rundir.write_config(out, asdict(cfg))
    # append-only log: a resumed run first drops the rows after its checkpoint (atomically); a fresh one
    # starts empty
    metrics = rundir.open_log(out, start if ckpt else None) if master else None
    return Run(rank, world, device, out, master, teacher, student, model, tokenizer, protocol, stop_ids,
               tokenizer.pad_token_id, protocol.vocab_size, autocast, prompts, references, optimizer,
               scheduler, start, metrics, inputs.val_prompts, best, cfg.fsdp)


def run_device(cfg: Config, local_rank: int) -> torch.device:
    """This process's device: --device, where `cuda` without an index means this process's GPU,
    cuda:<local rank> (torch.cuda.set_device needs an index; under torchrun each rank has its own GPU);
    by default cuda:<local rank> when CUDA is available, else the CPU."""
    if cfg.device is None:
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(cfg.device)
    return torch.device("cuda", local_rank) if device.type == "cuda" and device.index is None else device


def check_device(name: str | None, local_rank: int = 0):
    """--device must name a device this machine has (ValueError naming it and what there is): cpu; cuda or
    cuda:N with CUDA available and N (cuda: cuda:<local_rank>, run_device; resolve_config passes the largest
    local rank of the machine's processes) below the GPU count; mps where available. A device that is not
    there failed in torch.cuda.set_device, after the data had loaded."""
    if name is None:
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; valid: cpu, cuda (this process's GPU: "
                         f"cuda:<local rank>) or cuda:N") from None
    if device.type == "cpu":
        return
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name} is not available: torch sees no CUDA GPU on this machine "
                             f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use --device cpu")
        index, count = local_rank if device.index is None else device.index, torch.cuda.device_count()
        if index >= count and device.index is None:
            raise ValueError(f"--device {name} gives each of the {local_rank + 1} processes on this machine its "
                             f"own GPU (cuda:<local rank>), but it has {count}: start at most {count} processes")
        if index >= count:
            raise ValueError(f"--device {name} is cuda:{index}, but this machine has {count} CUDA GPU(s): "
                             f"cuda:0 to cuda:{count - 1}")
        return
    if device.type == "mps" and torch.backends.mps.is_available():
        return
    raise ValueError(f"--device {name} is not available here; valid: cpu, cuda or cuda:N (with a CUDA GPU)")


def set_up_process(cfg: Config):
    """(rank, world size, device) of this process; checks what depends on them; seeds the RNGs."""
    rank, world, local_rank = init_distributed(cfg.fsdp)
    device = run_device(cfg, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cli.set_threads(cfg.threads)
    if rank != 0:                             # one set of progress bars: rank 0's (the loop's, below)
        import transformers
        transformers.utils.logging.disable_progress_bar()
    random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed + rank)
    return rank, world, device


def load_models(cfg: Config, device, ckpt: Path | None):
    """The frozen teacher (eval, no grad) and the trainable student (--resume: from the checkpoint, named
    here). -> teacher, student, tokenizer."""
    if ckpt is not None and int(os.environ.get("RANK", "0")) == 0:
        print(f"resuming from {ckpt} (step {rundir.checkpoint_step(ckpt)})", flush=True)
    student_path = str(ckpt) if ckpt else cfg.student
    if cfg.fsdp:
        teacher, student, tokenizer = load_pair_to_shard(cfg, student_path, device,
                                                         int(os.environ.get("RANK", "0")) == 0)
    else:
        teacher, student, tokenizer = models.load_pair(cfg.teacher, student_path, device=device,
                                                       load_in_8bit=cfg.teacher_8bit, teacher_dtype=DTYPES[cfg.dtype],
                                                       student_dtype=torch.float32)
    teacher.eval().requires_grad_(False)
    if not cfg.fsdp:                              # --fsdp: float32 already, placed piece by piece by shard_models
        student.to(device=device, dtype=torch.float32)            # fp32 master weights; bf16 via autocast
        for name, model in (("teacher", teacher), ("student", student)):
            lm_head_weight(model, name)                            # a head the loss can project with
    student.train()
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    return teacher, student, tokenizer


def load_pair_to_shard(cfg: Config, student_path: str, device, master: bool):
    """--fsdp: rank 0 reads both models into CPU memory (the teacher in the dtype the device computes in,
    bf16 on CUDA), the other ranks build them empty (meta device); shard_models then broadcasts rank 0's
    weights piece by piece. An 8-bit teacher is read and quantised on the device by every rank, whole."""
    teacher_dtype = DTYPES[cfg.dtype]
    if master:                                 # load_pair checks the pair (tokenizers, lm_heads) once
        teacher, student, tokenizer = models.load_pair(
            cfg.teacher, student_path, device=device if cfg.teacher_8bit else "cpu", teacher_dtype=teacher_dtype,
            load_in_8bit=cfg.teacher_8bit)
        return teacher, student.to("cpu", torch.float32), tokenizer
    tokenizer = models.load_tokenizer(cfg.teacher)
    teacher = (models.load_model(cfg.teacher, device=device, load_in_8bit=True) if cfg.teacher_8bit
               else sharding.empty_model(cfg.teacher, teacher_dtype))
    return teacher, sharding.empty_model(student_path, torch.float32), tokenizer


def make_optimizer(cfg: Config, student, ckpt: Path | None, device):
    """AdamW and its schedule (linear warm-up, then cosine to 0), restored with the RNG states from a
    checkpoint. -> optimizer, scheduler, the first step to run."""
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup * cfg.steps), cfg.steps)
    if ckpt is None:
        return optimizer, scheduler, 0
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True, map_location="cpu" if cfg.fsdp else device)
    if cfg.fsdp:                               # the full, name-keyed state: each rank keeps its pieces
        sharding.load_optimizer_state(student, optimizer, state["optimizer"])
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return optimizer, scheduler, state["step"]


def shard_models(cfg: Config, teacher, student, device):
    """--fsdp: both models sharded per decoder layer (sharding.shard). The student computes in bf16 on CUDA
    with float32 master pieces and reduction; the teacher in the dtype it was loaded in (bf16 on CUDA). An
    8-bit teacher (bitsandbytes' Int8Params cannot be split into DTensor pieces) stays whole on every rank."""
    if not cfg.teacher_8bit:
        sharding.shard(teacher, from_rank0=True, device=device)
    sharding.shard(student, sharding.mixed_precision(device, cfg.dtype == "bfloat16"), from_rank0=True, device=device)


def gather_for_checkpoint(run: Run):
    """(model state, optimizer state) gathered whole on rank 0 under --fsdp (every rank must call), else
    (None, None): save_checkpoint then reads the plain student and optimizer."""
    if not run.fsdp:
        return None, None
    return sharding.full_state_dict(run.student), sharding.full_optimizer_state(run.student, run.optimizer)


def write_sharding_record(run: Run):
    """<out>/sharding.json: every rank's bytes of teacher weights, student weights, gradients and AdamW
    state (local pieces, sharding.memory_record), measured after the first optimizer step of the process."""
    records = sharding.gather_records(sharding.memory_record(run.teacher, run.student, run.optimizer), run.world)
    if run.master:
        rundir.write_atomic(run.out / "sharding.json", json.dumps({"world_size": run.world, "ranks": records},
                                                                  indent=1))


def finish(run: Run) -> Path:
    """After the last step: close the log, write <out>/final (rank 0), end the process group."""
    state_dict = sharding.full_state_dict(run.student) if run.fsdp else None     # FSDP: a collective
    if run.master:
        run.metrics.close()
        final = save_final(run.out, run.student, run.tokenizer, state_dict)
        print(f"final student: {final}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return run.out


if __name__ == "__main__":
    cli.script_main(main)                       # bad input: one line, exit 2; Ctrl-C: exit 130
