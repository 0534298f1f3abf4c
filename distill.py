"""On-policy distillation of a speculative-decoding draft (the student q) from a frozen target
(the teacher p).

The objective is GKD's (Agarwal et al. 2024, arXiv 2306.13649):

    L(theta) = (1 - lmbda) * E_{(x, y) ~ data}[ D(x, y) ]
               + lmbda * E_{x ~ prompts, y ~ q_theta(.|x)}[ D(x, y) ]

    D(x, y) = sum_t  d( p(. | x, y_<t), q_theta(. | x, y_<t) )   summed over the completion
                                                                   tokens y_t,

and no gradient flows through the sampling of y (the samples are data, drawn under torch.no_grad).
lmbda = 1 (the default, as in the seed project) is purely on-policy and needs no dataset answers
("zero-label"). The off-policy share (1 - lmbda) uses the dataset's reference answers, or, with
--off-policy teacher, completions sampled from the teacher (sequence-level KD).
--off-policy-warmup W makes the first W steps all off-policy: a draft far from its target (the real
preset's truncated SmolLM2) samples degenerate text that the teacher also predicts, so on-policy
steps would teach it little until it has learnt from real answers.

The per-token divergence d is chosen with --div (implemented in divergences.py; p = teacher,
q = student):
    fkl   forward KL   KL(p || q) = sum_x p log(p / q)    mean-seeking: q must cover all of p's mass
    rkl   reverse KL   KL(q || p) = sum_x q log(q / p)    mode-seeking: q may drop p's minor modes
    jsd   generalized JSD(beta) = beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q
          (TRL's convention: beta = 0 is exactly fkl, beta = 1 exactly rkl)
    tvd   total variation  0.5 * sum_x |p - q|  = 1 - sum_x min(p, q)
          = 1 - (the acceptance probability)
    ajsd  JSD with a per-token beta that falls with the teacher's entropy (see divergences.py)
    nla   -log alpha, alpha = sum_x min(p, q): the acceptance probability itself
          (LK losses' "alpha")
    lk    w KL(p || q) + (1 - w)(1 - alpha), w = lk_scale exp(-lk_decay mean alpha):
          KL -> TV as alpha grows

Both distributions are softmax(logits / tau) with tau = --loss-temperature. Default: tau = the
sampling temperature (the task's, e.g. 0.6 for gsm8k). Why: speculative decoding is evaluated at
that temperature, and the acceptance probability of a drafted token is sum_x min(p_tau, q_tau), so
the distributions the draft must match are the tempered ones; also the on-policy samples come from
q_tau, so with tau equal to the sampling temperature E_{y ~ q_tau}[KL(q_tau || p_tau)] is exactly
the sequence-level reverse KL of the distributions being sampled. (TRL's GKDTrainer samples at T but
computes the loss at 1.0 - an accident.) With sampling temperature 0 (greedy) the default falls
back to tau = 1. Top-p is not applied in the loss.

Loss normaliser: the sum of d over every completion token of the whole optimizer step (all
gradient-accumulation micro-batches, all ranks), divided by the number of those tokens. Every token
weighs the same however the batch is split; per-micro-batch means (TRL) weigh short
micro-batches more. Under DDP each rank samples its own shard of the step's prompts; the token
count is all-reduced first.

Each step: sample -> build the batch (left-padded prompt | completion, loss only on the completion,
its first stop token included) -> teacher forward (frozen, no grad) -> student forward -> loss ->
backward -> clip -> AdamW -> warm-up + cosine schedule. Both forwards stop at the last hidden state;
the loss (divergences.hidden_divergence_sum) projects it through each lm_head itself, in float32,
a block of positions at a time, so neither model's (B, C, V) logits exist and a bf16 model's loss
is not read from bf16-rounded logits (divergences.py, "bf16 logits").

What a run writes -- see docs/training-run.md for each file and metrics.jsonl column by column:
  - Precision (--dtype): float32, or bfloat16 autocast over float32 master weights (the default on
    CUDA); the loss, the sampling logits and AdamW's state stay float32.
  - <out>/ckpt-<step> (atomic, checksummed, the last two kept; plumbing/checkpoints.py) and
    <out>/final, a plain Hugging Face model directory. Every step's batch is a pure function of
    (seed, step), and each prompt's sample has its own generator, so --resume reproduces the
    uninterrupted run exactly on the CPU, and 1, 2 or N processes train the same way.
  - <out>/metrics.jsonl, one row per step: loss, lr, grad_norm, the training-time acceptance
    estimates (train_alpha, train_accepted_length) and the health of the samples.
  - Validation (--eval-every N, off by default): exact speculative decoding of the current student
    on held-out prompts adds val_* columns to that step's row; <out>/best/ keeps the best student.
Sampling uses models.decoding_protocol: the same temperature, top-p, stop ids and vocabulary
(len(tokenizer)) as evaluate.py and report.py.

Run:  python distill.py --task gsm8k --div rkl
          (one process; the offline tiny pair by default)
      torchrun --nproc_per_node=2 distill.py --task gsm8k --div rkl
          (DDP: each rank samples its shard)
      torchrun --nproc_per_node=2 distill.py --fsdp --task gsm8k --div rkl
          (FSDP2: both models sharded, plumbing/sharding.py; README "Several devices")
"""
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from tqdm import tqdm

import data
import divergences
import models
import specdec
from plumbing import checkpoints, cli, rundir, sharding, train_checks, train_setup


# ----------------------------------------------------------------------------- config

def option(default, help: str, *, preset: bool = False, fallback=None, flag: bool = True):
    """A Config field and its --help text ("%(default)s" = the default). preset=True: None means the
    preset's value (models.preset_config, the key named as the field), else `fallback`
    (train_checks.resolve_config fills it). flag=False: not an option but a fact of the launch
    (train_checks.resolve_config fills it), recorded all the same."""
    return field(default=default,
                 metadata={"help": help, "preset": preset, "fallback": fallback, "flag": flag})


@dataclass
class Config:
    """Every option of a run, in one table: each field is a flag (parse_args), its help next to it;
    the fields marked preset=True take the preset's value when unset, then their fallback.
    config.json saves these names, and --resume compares them (rundir.check_same_run): renaming a
    field breaks old runs."""
    # what to distil
    task: str = option("gsm8k", "task: gsm8k (low teacher entropy), cnndm or dialogsum (high); default "
                                "%(default)s")
    div: str = option("rkl", "per-token divergence d(p, q): fkl, rkl, jsd, tvd, ajsd, nla or lk "
                             "(see divergences.py); default %(default)s")
    beta: float = option(0.5, "jsd only: weight toward reverse KL, 0 = fkl, 1 = rkl; default "
                              "%(default)s")
    ajsd_scale: float = option(1.0, "ajsd only: entropy scale (nats) of beta = floor + (1 - floor) "
                                    "exp(-H / scale); default %(default)s")
    ajsd_floor: float = option(0.5, "ajsd only: the beta of a very uncertain teacher (0.5 = "
                                    "symmetric JSD); default %(default)s")
    lk_scale: float = option(1.0, "lk only: w = lk_scale exp(-lk_decay mean alpha), the KL weight; "
                                  "default %(default)s")
    lk_decay: float = option(1.0, "lk only: how fast w falls as the mean alpha grows; default "
                                  "%(default)s")
    preset: str = option("tiny", "models, lr, temperature, lengths and steps: tiny (offline pair), "
                                 "smollm2 (the real SmolLM2-135M-Instruct, offline) or paper (hub "
                                 "models); default %(default)s")
    teacher: str | None = option(None, "teacher (target p) path, .gguf file or hub id; default: "
                                       "the preset's")
    student: str | None = option(None, "student (draft q) to start from, path, .gguf file or hub "
                                       "id; default: the preset's")
    seed: int = option(0, "run seed: prompt order, sampling and initial RNG state; default "
                          "%(default)s")
    out: str | None = option(None, "run directory (ckpt-*, final/); default "
                                   "runs/<preset>/<task>/<div>-s<seed> (<task>: e.g. "
                                   "gsm8k-file-<data name> on data other than the preset's, "
                                   "rundir.task_group)")
    resume: bool = option(False, "continue from the newest checkpoint in --out (reproduces the "
                                 "uninterrupted run)")
    overwrite: bool = option(False, "start from scratch in an --out that already holds a run, "
                                    "deleting its checkpoints and log")
    check: bool = option(False, "check everything that is checked before a model loads (options, "
                                "data, model folders, --out), say what would run, and exit without "
                                "writing a run; make train NPROC=N runs it before torchrun starts "
                                "its ranks")
    # data: the GKD mixture
    lmbda: float | None = option(None, "share of steps whose batch the student samples (1 = purely "
                                       "on-policy); default: the preset's (1 if unset)",
                                 preset=True, fallback=1.0)
    off_policy: str | None = option(None, "the other (1 - lmbda) batches: dataset answers or "
                                          "teacher samples (seq-KD); default: the preset's "
                                          "(dataset if unset)", preset=True, fallback="dataset")
    off_policy_warmup: int | None = option(None, "first steps whose batches all come from "
                                                 "--off-policy (a draft far from the target "
                                                 "samples degenerate text: it learns on real "
                                                 "answers first); default: the preset's (0 if "
                                                 "unset)", preset=True, fallback=0)
    source: str | None = option(None, "training prompts: standin, file or hub; default: file with "
                                      "--data-path, else the preset's (standin if it has none: "
                                      "data.resolve_source)")
    data_path: str | None = option(None, "a .jsonl/.json/.parquet file or a folder (its train.* "
                                         "files, README 'Data'); implies --source file")
    n_train: int | None = option(None, "number of training prompts; default: the preset's (all if "
                                       "unset)", preset=True)
    # sampling
    temperature: float | None = option(None, "sampling temperature (0 = greedy); default: the "
                                             "preset's (the task's)", preset=True, fallback=1.0)
    top_p: float | None = option(None, "sampling nucleus top-p; default: the preset's",
                                 preset=True, fallback=1.0)
    max_new_tokens: int | None = option(None, "most tokens sampled per completion; default: the "
                                              "preset's", preset=True, fallback=128)
    loss_temperature: float | None = option(None, "temperature tau of both distributions in the "
                                                  "loss; default: the sampling temperature (1 when "
                                                  "it is 0; see the docstring)")
    # optimisation
    steps: int | None = option(None, "optimizer steps; default: the preset's, else --epochs over "
                                     "the prompts", preset=True)
    batch_size: int | None = option(None, "prompts per optimizer step, summed over ranks and "
                                          "micro-batches; default: the preset's",
                                    preset=True, fallback=8)
    grad_accum: int | None = option(None, "micro-batches per optimizer step on each rank; default: "
                                          "the preset's (1 if unset)", preset=True, fallback=1)
    epochs: float | None = option(None, "passes over the prompts, used only when --steps is unset "
                                        "(steps = epochs x prompts / batch size); default: the "
                                        "preset's (1 if unset)", preset=True, fallback=1)
    lr: float | None = option(None, "peak AdamW learning rate; default: the preset's",
                              preset=True, fallback=5e-5)
    warmup: float | None = option(None, "fraction of the steps with linear warm-up before the "
                                        "cosine decay to 0; default: the preset's (0.1 if unset)",
                                  preset=True, fallback=0.1)
    weight_decay: float = option(0.0, "AdamW weight decay; default %(default)s")
    max_grad_norm: float = option(1.0, "gradient-norm clipping threshold; default %(default)s")
    # system
    device: str | None = option(None, "torch device: cpu, cuda (= cuda:<local rank>) or cuda:N; "
                                      "default cuda:<local rank> if CUDA is available, else cpu")
    dtype: str | None = option(None, "precision of the forward passes: float32, or bfloat16 (bf16 "
                                     "autocast over float32 master weights, the teacher's weights "
                                     "in bf16; the loss, sampling and optimizer state stay "
                                     "float32); default bfloat16 on CUDA, float32 on the CPU")
    gradient_checkpointing: bool = option(False, "recompute the student's activations in backward "
                                                 "to save memory; default off")
    teacher_8bit: bool = option(False, "load the teacher in 8 bits with bitsandbytes (CUDA, or CPU "
                                       "where it runs); default off")
    fsdp: bool = option(False, "under torchrun: shard the teacher and the student over the ranks "
                               "with FSDP2, per decoder layer (plumbing/sharding.py); an 8-bit "
                               "teacher stays whole on every rank; default off (DDP: every "
                               "rank holds both models whole)")
    save_every: int | None = option(None, "checkpoint every N steps (and always at the end); "
                                          "default: the preset's (50 if unset)",
                                    preset=True, fallback=50)
    threads: int = option(cli.DEFAULT_THREADS, "CPU threads of torch per process (README "
                                               "'Threads'; on the CPU a run is exact only at the "
                                               "same count); default %(default)s")
    # validation by exact speculative decoding
    eval_every: int = option(0, "validate every N steps (and after the last) by speculative "
                                "decoding on held-out prompts, keeping <out>/best/; 0 = off (the "
                                "default)")
    eval_prompts: int = option(32, "validation prompts (train-split prompts training never sees); "
                                   "default %(default)s")
    # the launch (not options): recorded in config.json, so that --resume can refuse another one
    world_size: int | None = option(None, "processes of the run (torchrun --nproc_per_node; "
                                          "WORLD_SIZE)", flag=False)
    data_sha256: str | None = option(None, "sha256 of the rows the run trains and validates on "
                                           "(data_fingerprint): --resume refuses other data",
                                     flag=False)


def parse_args(argv=None) -> Config:
    """Every Config field with flag=True is an option: --max-new-tokens 64, --resume / --no-resume."""
    return cli.parse_dataclass(Config, argv, description="On-policy distillation of a "
                               "speculative-decoding draft.",
                               epilog="example: python distill.py --task gsm8k --div rkl --seed 0")


# ----------------------------------------------------------------------------- the loop

def main(argv=None):
    """Check everything before any model loads (bad input: cli.BadInput, one line from the command
    line), claim the run directory (rundir.claimed: its lock; a fresh run that stops before its
    first logged step leaves nothing behind; Ctrl-C says how to resume), train."""
    master = int(os.environ.get("RANK", "0")) == 0
    with cli.before_the_work():
        cfg = parse_args(argv)
        unset = [f.name for f in fields(Config)
                 if f.metadata["preset"] and getattr(cfg, f.name) is None]
        cfg = train_checks.resolve_config(cfg)
        if master:
            print(train_checks.preset_settings_line(cfg, unset), flush=True)
        inputs = train_checks.check_inputs(cfg, master)
    if cfg.check:
        if master:
            print(train_checks.check_summary(cfg, inputs), flush=True)
        return 0
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    with rundir.claimed(Path(cfg.out), argv, master=master, fresh=not cfg.resume,
                        overwrite=cfg.overwrite):
        return train(cfg, inputs)


def train(cfg: Config, inputs: train_checks.Inputs):
    """The training loop of a checked config (main) in its claimed run directory."""
    run = train_setup.set_up(cfg, inputs)
    bar = tqdm(range(run.start, cfg.steps), initial=run.start, total=cfg.steps,
               disable=not run.master, desc=f"{cfg.task}/{cfg.div}")
    for step in bar:
        t0 = time.perf_counter()
        # 1) sample: this rank's micro-batches; completions from the student (prob. lmbda), else
        #    from the dataset or the teacher. No gradient flows through sampling.
        source, micro_batches = sample_step(cfg, run, step)

        # 2) the normaliser: completion tokens in the whole step (all micro-batches, all ranks)
        n_tokens = sum(int(b["loss_mask"].sum()) for b in micro_batches)
        n_tokens = sharding.all_reduce_sum(n_tokens, run.world, run.device)
        denom = max(n_tokens, 1.0)           # 1 where every completion is empty

        # 3) teacher and student forwards, loss = sum of d / denom, backward: per micro-batch
        sums = step_loss(cfg, run, micro_batches, denom)

        # 4) clip, AdamW step, schedule (under FSDP each rank clips and updates its own pieces)
        grad_norm = torch.nn.utils.clip_grad_norm_(run.student.parameters(), cfg.max_grad_norm)
        grad_norm = sharding.to_float(grad_norm)
        lr = run.scheduler.get_last_lr()[0]
        run.optimizer.step()
        run.scheduler.step()
        if run.fsdp and step == run.start:    # what each rank holds, once the AdamW state exists
            sharding.write_sharding_record(run)
        run.optimizer.zero_grad(set_to_none=True)
        dt = sharding.all_reduce_sum(time.perf_counter() - t0, run.world, run.device) / run.world

        # 5) validate the updated student (rank 0): exact speculative decoding on held-out prompts
        final_step = step + 1 == cfg.steps
        due = cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or final_step)
        val = validate(run) if run.master and due else {}
        new_best = (val.get("val_acceptance_rate") is not None
                    and val["val_acceptance_rate"] > run.best.value)
        # every rank checkpoints with it
        new_best = sharding.all_reduce_sum(float(new_best), run.world, run.device) > 0

        # 6) log: the global mean loss per completion token, tokens/s of the whole step (sampling
        #    included, validation not), the training-time acceptance estimates, the samples' health
        train_alpha = sums.alpha / denom
        health = sharding.all_reduce_sum(sum(b["health"] for b in micro_batches), run.world,
                                         run.device)                            # (4,) the step's
        row = dict(step=step + 1, loss=sums.total / denom, lr=lr, grad_norm=grad_norm,
                   completion_len=n_tokens / cfg.batch_size,
                   loss_teacher_entropy=sums.teacher_entropy / denom, train_alpha=train_alpha,
                   train_accepted_length=specdec.expected_accepted_length(train_alpha,
                                                                          run.protocol.gamma),
                   tokens_per_s=n_tokens / dt, source=source,
                   sample_stop_rate=float(health[0] / max(health[1], 1)),
                   sample_repetition=float(health[2] / max(health[3], 1)), **val)
        if run.master:
            write_row(run, row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")

        # 7) checkpoint (atomic), every save_every steps, at the end and at a new best; then best/
        if (step + 1) % cfg.save_every == 0 or final_step or new_best:
            checkpoints.save_step(run, step + 1, val if new_best else None)
    return train_setup.finish(run)


def write_row(run: train_setup.Run, row: dict):
    """Append the step's row to metrics.jsonl (rank 0), warning first when the student's samples
    are loops (data.sample_health): train_alpha then measures agreement on loops."""
    if row["source"] == "student" and row["sample_repetition"] > data.DEGENERATE_REPETITION:
        tqdm.write(f"warning: step {row['step']}: the student's samples degenerate "
                   f"({row['sample_repetition']:.0%} repeated 4-grams, "
                   f"{row['sample_stop_rate']:.0%} stopped), so train_alpha "
                   f"{row['train_alpha']:.2f} is measured on loops the teacher predicts too and "
                   f"overstates the acceptance; give the draft more off-policy steps first "
                   f"(--off-policy-warmup, a lower --lmbda) and watch val_alpha (--eval-every)")
    run.metrics.write(json.dumps(row) + "\n")
    run.metrics.flush()


# -------------------------------------------------------------------- 1) sample: the step's batches

def sample_step(cfg: Config, run: train_setup.Run, step: int) -> tuple[str, list[dict]]:
    """The step's source ("student", "dataset" or "teacher": one seeded coin per step, the same on
    every rank) and this rank's grad_accum micro-batches (data.build_batch dicts on the device) of
    its shard of the step's prompts. Every choice is a pure function of (seed, step) and of each
    prompt's position in the step's batch (its sampling generator), so --resume reproduces it and
    the split over ranks and micro-batches does not change it."""
    batch_rows = data.step_prompt_indices(step, cfg.batch_size, len(run.prompts), cfg.seed)
    shard = batch_rows[run.rank::run.world]
    coin = torch.rand(1, generator=torch.Generator().manual_seed(cfg.seed * 7919 + step)).item()
    # the warm-up's steps are all off-policy
    on_policy = step >= cfg.off_policy_warmup and coin < cfg.lmbda
    source = "student" if on_policy else cfg.off_policy
    # this shard's places in the step's batch
    positions = list(range(cfg.batch_size))[run.rank::run.world]
    micro = cfg.batch_size // run.world // cfg.grad_accum             # prompts per micro-batch
    sampler = {"student": run.student, "teacher": run.teacher}.get(source)
    micro_batches = []
    # a sharded student is gathered once for all of the step's sampling (sharding.gathered), not
    # per token
    with sharding.gathered(sampler) if sampler is run.student else nullcontext():
        for m in range(cfg.grad_accum):
            rows = shard[m * micro:(m + 1) * micro]                     # indices into run.prompts
            prompt_ids = [run.prompts[r] for r in rows]
            if sampler is None:
                completions = [run.references[r] for r in rows]
            else:
                gens = [data.prompt_generator(cfg.seed, step, k, run.device)
                        for k in positions[m * micro:(m + 1) * micro]]
                sampler.eval()
                with torch.no_grad(), run.autocast:
                    completions = specdec.autoregressive_generate(
                        sampler, prompt_ids, generator=gens,
                        **run.protocol.generate_kwargs()).tokens
                run.student.train()
            completions = [data.cut_at_stop(c, run.stop_ids, cfg.max_new_tokens)
                           for c in completions]
            batch = {k: (v.to(run.device) if torch.is_tensor(v) else v)
                     for k, v in data.build_batch(prompt_ids, completions, run.pad_id).items()}
            batch["health"] = data.sample_health(completions, run.stop_ids)
            micro_batches.append(batch)
    return source, micro_batches


# ------------------------------------------------------ 3) the loss: hidden states in, sum of d out

def step_loss(cfg: Config, run: train_setup.Run, micro_batches: list[dict],
              denom: float) -> divergences.LossSums:
    """Every micro-batch of the step through loss_and_backward, its gradient scaled by 1 / denom
    (the step's completion tokens, all ranks; at least 1). -> the step's sums over all ranks, as floats: of d,
    of H(p_T) and of alpha at the loss temperature (from the loss's own sweep)."""
    totals = [0.0, 0.0, 0.0]                      # of d, H(p_T), alpha
    for m, batch in enumerate(micro_batches):
        # DDP: all-reduce the gradients once, after the last micro-batch. FSDP reduce-scatters
        # after every micro-batch, so that no rank ever holds the whole gradient.
        last = m == cfg.grad_accum - 1
        sync = nullcontext() if run.world == 1 or last or run.fsdp else run.model.no_sync()
        # DDP and FSDP average gradients over ranks; * world turns that average into the global sum
        with sync:
            sums = loss_and_backward(cfg, run, batch, scale=run.world / denom)
        totals = [total + float(x) for total, x in zip(totals, sums)]
    return divergences.LossSums(*(sharding.all_reduce_sum(x, run.world, run.device)
                                  for x in totals))


def loss_and_backward(cfg: Config, run: train_setup.Run, batch: dict,
                      scale: float) -> divergences.LossSums:
    """One micro-batch's loss: the frozen teacher and the student run to their last hidden states,
    the loss projects them through both lm_heads itself, in float32, a block of positions at a time
    (no (B, C, V) logits), and (sum of d) * scale is backpropagated. -> (sum of d, sum of H(p_T),
    sum of alpha), detached. Under --fsdp each root unit stays whole until the loss has read its
    lm_head (sharding.head_kept): the teacher's until the loss's forward sweep is done, the
    student's through the backward."""
    mask = batch["loss_mask"][:, batch["prompt_width"]:]                        # (B, C)
    student, teacher = run.student, run.teacher
    with sharding.head_kept(student):
        with sharding.head_kept(teacher):
            with torch.no_grad(), run.autocast:
                t_hidden = models.teacher_hidden(teacher, batch)            # (B, C, H_t)
            with run.autocast:
                s_hidden = models.completion_hidden(run.model, batch)       # (B, C, H_s)
            div_sum, ent, alpha = divergences.hidden_divergence_sum(
                divergences.HiddenAndHead(s_hidden, models.lm_head_weight(student)),
                divergences.HiddenAndHead(t_hidden, models.lm_head_weight(teacher)), mask,
                loss_divergence(cfg), vocab_size=run.vocab, return_teacher_entropy=True,
                return_alpha=True)
            del t_hidden                           # not needed by the backward: freed before it
        (div_sum * scale).backward()
    return divergences.LossSums(div_sum.detach(), ent, alpha)


def loss_divergence(cfg: Config) -> divergences.Divergence:
    """The per-token divergence d of the loss: --div with its options, at the loss temperature."""
    return divergences.Divergence(cfg.div, cfg.beta, cfg.loss_temperature, cfg.ajsd_scale,
                                  cfg.ajsd_floor, cfg.lk_scale, cfg.lk_decay)


# ------------------------------------------------------ 5) validation by exact speculative decoding

VAL_KEYS = ("val_acceptance_rate", "val_alpha", "val_mean_accepted_length",
            "val_per_position_acceptance")


VAL_SAMPLING_SEED = 0


def validate(run: train_setup.Run) -> dict:
    """The val_* keys of a row: exact speculative decoding of the current student drafting for the
    teacher on the validation prompts, with the decoding protocol and one fixed sampling seed (the
    same at every validation, so the rows differ by the student only); pooled over the prompts
    (specdec's batch stats). NaN (nothing drafted) is written as null, and a null acceptance is
    never a new best."""
    run.student.eval()
    t0 = time.perf_counter()
    with torch.no_grad(), run.autocast:
        stats = specdec.speculative_generate(run.teacher, run.student, run.val_prompts,
                                             seed=VAL_SAMPLING_SEED,
                                             **run.protocol.speculative_kwargs()).stats
    run.student.train()
    clean = lambda x: None if isinstance(x, float) and math.isnan(x) else x   # noqa: E731
    val = {f"val_{k}": stats[k] for k in ("acceptance_rate", "alpha", "mean_accepted_length")}
    val = {k: clean(v) for k, v in val.items()}
    val["val_per_position_acceptance"] = [clean(x) for x in stats["per_position_acceptance"]]
    val["val_seconds"] = time.perf_counter() - t0
    return val


if __name__ == "__main__":
    cli.script_main(main)                       # bad input: one line, exit 2; Ctrl-C: exit 130
