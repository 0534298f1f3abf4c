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
import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
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
    task: str = option("gsm8k", "task: gsm8k (low teacher entropy) or cnndm (high); default "
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
                               "with FSDP2, per decoder layer (plumbing/sharding.py); an 8-bit teacher "
                               "stays whole on every rank; default off (DDP: every rank holds both "
                               "models whole)")
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
    """Every Config field is a flag: --max-new-tokens 64, --resume / --no-resume."""
    p = cli.ArgumentParser(description="On-policy distillation of a speculative-decoding draft.",
                           epilog="example: python distill.py --task gsm8k --div rkl --seed 0")
    for f in fields(Config):
        if not f.metadata["flag"]:
            continue
        flag, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.type is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                           help=help)
        else:                                     # `int | None` -> int
            typ = next(a for a in getattr(f.type, "__args__", (f.type,)) if a is not type(None))
            p.add_argument(flag, type=typ, default=f.default, help=help)
    return Config(**vars(p.parse_args(argv)))


# ----------------------------------------------------------------------------- the loop

def main(argv=None):
    """Check everything before any model loads (bad input: cli.BadInput, one line from the command
    line), take the run directory's lock (rank 0), train. A fresh run that stops before its first
    logged step leaves nothing behind that would block a retry. Ctrl-C: one line saying where the
    run stopped and the command that resumes it (then the KeyboardInterrupt goes on)."""
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
    out = Path(cfg.out)
    lock = rundir.RunLock(out) if master else None
    # a run that started on this --out since the check: one line
    with cli.before_the_work():
        if lock is not None:
            lock.acquire()
    try:
        # checked again under the lock (another run may have written)
        with cli.before_the_work():
            if master and not cfg.resume:
                rundir.start_fresh(out, cfg.overwrite)
        try:
            return train(cfg, inputs)
        except BaseException:
            if master and not cfg.resume:
                try:
                    rundir.discard_unstarted(out)
                except OSError:      # an unwritable directory: what is there stays, said below
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


def train(cfg: Config, inputs: train_checks.Inputs):
    """The training loop of a checked config (main) in its locked run directory (set-up: set_up)."""
    run = set_up(cfg, inputs)
    student, model, world = run.student, run.model, run.world
    bar = tqdm(range(run.start, cfg.steps), initial=run.start, total=cfg.steps,
               disable=not run.master, desc=f"{cfg.task}/{cfg.div}")
    for step in bar:
        t0 = time.perf_counter()
        # 1) sample: this rank's micro-batches; completions from the student (prob. lmbda), else
        #    from the dataset or the teacher. No gradient flows through sampling.
        source, micro_batches = sample_step(cfg, run, step)

        # 2) the normaliser: completion tokens in the whole step (all micro-batches, all ranks)
        n_tokens = sum(int(b["loss_mask"].sum()) for b in micro_batches)
        n_tokens = sharding.all_reduce_sum(n_tokens, world, run.device)

        # 3) teacher forward (frozen) and student forward to the last hidden states; the loss
        #    projects them through both lm_heads itself, in float32, a block of positions at a time
        #    (no (B, C, V) logits, under --fsdp too); loss = sum of d / n_tokens, backward
        loss_sum, ent_sum, alpha_sum = 0.0, 0.0, 0.0
        for m, batch in enumerate(micro_batches):
            # DDP: all-reduce the gradients once, after the last micro-batch. FSDP reduce-scatters
            # after every micro-batch, so that no rank ever holds the whole gradient.
            last = m == cfg.grad_accum - 1
            sync = nullcontext() if world == 1 or last or run.fsdp else model.no_sync()
            # DDP and FSDP average gradients over ranks; * world turns that average into the
            # global sum
            with sync:
                div_sum, ent, alpha = loss_and_backward(cfg, run, batch,
                                                        scale=world / max(n_tokens, 1.0))
            loss_sum += float(div_sum)
            ent_sum += float(ent)         # H(p_T) at the loss temperature, from the loss's sweep
            alpha_sum += float(alpha)     # sum_x min(p_T, q_T) at the loss temperature, likewise

        # 4) clip, AdamW step, schedule (under FSDP each rank clips and updates its own pieces)
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)
        grad_norm = sharding.to_float(grad_norm)
        lr = run.scheduler.get_last_lr()[0]
        run.optimizer.step()
        run.scheduler.step()
        if run.fsdp and step == run.start:    # what each rank holds, once the AdamW state exists
            sharding.write_sharding_record(run)
        run.optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0             # the step's time, without validation

        # 5) validate the updated student (rank 0): exact speculative decoding on held-out prompts
        final_step = step + 1 == cfg.steps
        due = cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or final_step)
        val = validate(run) if run.master and due else {}
        new_best = (val.get("val_acceptance_rate") is not None
                    and val["val_acceptance_rate"] > run.best.value)
        # every rank checkpoints with it
        new_best = sharding.all_reduce_sum(float(new_best), world, run.device) > 0

        # 6) log: global mean loss per completion token, tokens/s of the whole step (sampling
        #    included)
        loss_sum = sharding.all_reduce_sum(loss_sum, world, run.device)
        ent_sum = sharding.all_reduce_sum(ent_sum, world, run.device)
        train_alpha = sharding.all_reduce_sum(alpha_sum, world, run.device) / max(n_tokens, 1.0)
        dt = sharding.all_reduce_sum(dt, world, run.device) / world
        health = sum(b["health"] for b in micro_batches)                 # (4,) the step's
        health = sharding.all_reduce_sum(health, world, run.device)
        accepted = specdec.expected_accepted_length(train_alpha, run.protocol.gamma)   # estimate
        row = dict(step=step + 1, loss=loss_sum / max(n_tokens, 1.0), lr=lr, grad_norm=grad_norm,
                   completion_len=n_tokens / cfg.batch_size,
                   loss_teacher_entropy=ent_sum / max(n_tokens, 1.0), train_alpha=train_alpha,
                   train_accepted_length=accepted, tokens_per_s=n_tokens / dt, source=source,
                   sample_stop_rate=float(health[0] / max(health[1], 1)),
                   sample_repetition=float(health[2] / max(health[3], 1)), **val)
        if run.master and source == "student" and row["sample_repetition"] > DEGENERATE_REPETITION:
            tqdm.write(f"warning: step {step + 1}: the student's samples degenerate "
                       f"({row['sample_repetition']:.0%} repeated 4-grams, "
                       f"{row['sample_stop_rate']:.0%} stopped), so train_alpha "
                       f"{train_alpha:.2f} is measured on loops the teacher predicts too and "
                       f"overstates the acceptance; give the draft more off-policy steps first "
                       f"(--off-policy-warmup, a lower --lmbda) and watch val_alpha (--eval-every)")
        if run.master:
            run.metrics.write(json.dumps(row) + "\n")
            run.metrics.flush()
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")

        # 7) checkpoint (atomic), every save_every steps, at the end and at a new best; then best/
        if (step + 1) % cfg.save_every == 0 or final_step or new_best:
            # under FSDP a collective: every rank gathers
            model_state, optimizer_state = checkpoints.gather_for_checkpoint(run)
            if run.master:
                checkpoints.save_checkpoint(run.out, step + 1, student, run.tokenizer,
                                            run.optimizer, run.scheduler, model_state=model_state,
                                            optimizer_state=optimizer_state)
                # never under --fsdp (train_checks.check_options refuses --eval-every)
                if new_best:
                    run.best = checkpoints.save_best(run.out, step + 1, student, run.tokenizer, val)
            if world > 1:
                dist.barrier()
    return train_setup.finish(run)


# -------------------------------------------------------------------- 1) sample: the step's batches

def sample_step(cfg: Config, run, step: int) -> tuple[str, list[dict]]:
    """The step's source ("student", "dataset" or "teacher": one seeded coin per step, the same on
    every rank) and this rank's grad_accum micro-batches (build_batch dicts on the device) of its
    shard of the step's prompts. Every choice is a pure function of (seed, step) and of each
    prompt's position in the step's batch (its sampling generator), so --resume reproduces it and
    the split over ranks and micro-batches does not change it."""
    batch_rows = step_prompt_indices(step, cfg.batch_size, len(run.prompts), cfg.seed)
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
                gens = [prompt_generator(cfg.seed, step, k, run.device)
                        for k in positions[m * micro:(m + 1) * micro]]
                sampler.eval()
                with torch.no_grad(), run.autocast:
                    completions = specdec.autoregressive_generate(
                        sampler, prompt_ids, generator=gens,
                        **run.protocol.generate_kwargs()).tokens
                run.student.train()
            completions = [cut_at_stop(c, run.stop_ids, cfg.max_new_tokens) for c in completions]
            batch = {k: (v.to(run.device) if torch.is_tensor(v) else v)
                     for k, v in build_batch(prompt_ids, completions, run.pad_id).items()}
            batch["health"] = sample_health(completions, run.stop_ids)
            micro_batches.append(batch)
    return source, micro_batches


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


# ------------------------------------------------------ 3) the loss: hidden states in, sum of d out

def loss_and_backward(cfg: "Config", run: "Run", batch: dict, scale: float):
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
                t_hidden = teacher_hidden(teacher, batch)                        # (B, C, H_t)
            with run.autocast:
                s_hidden = completion_hidden(run.model, batch)                   # (B, C, H_s)
            div_sum, ent, alpha = divergences.hidden_divergence_sum(
                divergences.HiddenAndHead(s_hidden, lm_head_weight(student)),
                divergences.HiddenAndHead(t_hidden, lm_head_weight(teacher)), mask,
                loss_divergence(cfg), vocab_size=run.vocab, return_teacher_entropy=True,
                return_alpha=True)
            del t_hidden                           # not needed by the backward: freed before it
        (div_sum * scale).backward()
    return div_sum.detach(), ent, alpha


def loss_divergence(cfg: "Config") -> divergences.Divergence:
    """The per-token divergence d of the loss: --div with its options, at the loss temperature."""
    return divergences.Divergence(cfg.div, cfg.beta, cfg.loss_temperature, cfg.ajsd_scale,
                                  cfg.ajsd_floor, cfg.lk_scale, cfg.lk_decay)


def completion_hidden(model, batch: dict):
    """The last hidden states (after the final norm) at the columns that predict the completion
    tokens: (B, C, H). Column P - 1 + j predicts completion token j.

    The model's own forward -- through a DDP wrapper, which must see it to all-reduce the
    gradients -- with no logits column kept (logits_to_keep = an empty index): the lm_head projects
    nothing, the loss does it (divergences.hidden_divergence_sum). output_hidden_states returns
    every layer's output, which autograd keeps for the student's backward anyway; the frozen teacher
    runs its decoder alone (teacher_hidden)."""
    P = batch["prompt_width"]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=no_logits_column(batch),
                output_hidden_states=True, use_cache=False)
    return out.hidden_states[-1][:, P - 1:-1]                      # (B, C, H)


def teacher_hidden(teacher, batch: dict):
    """completion_hidden of the frozen teacher, from its decoder (get_decoder()) alone: under
    no_grad no layer's output is kept, so none is collected either. (B, C, H_t)
    Under --fsdp the root's own forward must run (it gathers the embeddings and the final norm): the
    whole model with no logits column kept, the decoder's last hidden state read as it leaves the
    decoder."""
    P = batch["prompt_width"]
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              position_ids=batch["position_ids"], use_cache=False)
    decoder = teacher.get_decoder()
    if not sharding.is_sharded(teacher):
        return decoder(**kw).last_hidden_state[:, P - 1:-1]       # (B, C, H_t)
    seen = {}
    hook = decoder.register_forward_hook(
        lambda module, args, out: seen.update(hidden=out.last_hidden_state))
    try:
        teacher(**kw, logits_to_keep=no_logits_column(batch))
    finally:
        hook.remove()
    return seen["hidden"][:, P - 1:-1]                              # (B, C, H_t)


def no_logits_column(batch: dict) -> torch.Tensor:
    """logits_to_keep = an empty index: the lm_head projects no position (the loss does it)."""
    return torch.empty(0, dtype=torch.long, device=batch["input_ids"].device)


def lm_head_weight(model, name: str = "model") -> torch.Tensor:
    """The lm_head weight (V, H) that hidden_divergence_sum projects with (tied: the embedding
    matrix itself, so its gradient lands on that one parameter). Refused, naming why, where a plain
    projection of the last hidden state is not the model's logits: a bias, a logit scale or a final
    soft-capping."""
    head = model.get_output_embeddings()
    cfg = getattr(model, "config", None)
    extra = [k for k in ("final_logit_softcapping", "logit_scale")
             if getattr(cfg, k, None) not in (None, 1.0)]
    if getattr(head, "bias", None) is not None:
        extra.append("an lm_head bias")
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or extra:
        raise ValueError(f"the {name}'s lm_head is not a plain float projection "
                         f"({', '.join(extra) or type(head)}): "
                         "the loss computes logits as hidden @ weight^T")
    return head.weight


def batch_divergence_sum(student_logits, teacher_logits, mask, divergence: divergences.Divergence,
                         vocab_size: int | None = None, return_teacher_entropy: bool = False,
                         return_alpha: bool = False) -> divergences.LossSums:
    """Sum of the per-token divergence d(p, q) over the masked completion tokens (LossSums.total, a
    scalar). vocab_size: compare only the tokenizer's real tokens (lm_heads may carry padding rows).
    return_teacher_entropy=True / return_alpha=True (passed on to divergences.divergence_sum) also
    fill the sums of H(p_T) and of alpha at the loss temperature, without top-p: logged as
    loss_teacher_entropy and train_alpha."""
    if vocab_size is not None or student_logits.shape[-1] != teacher_logits.shape[-1]:
        student_logits, teacher_logits = divergences.shared_vocab(student_logits, teacher_logits,
                                                                  vocab_size)
    return divergences.divergence_sum(student_logits, teacher_logits, mask, divergence,
                                      return_teacher_entropy=return_teacher_entropy,
                                      return_alpha=return_alpha)


# ------------------------------------------------------ 5) validation by exact speculative decoding

VAL_KEYS = ("val_acceptance_rate", "val_alpha", "val_mean_accepted_length",
            "val_per_position_acceptance")


VAL_SAMPLING_SEED = 0


def validate(run) -> dict:
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


# --------------------------------------------------------- set-up: everything before the first step

@dataclass
class Run:
    """What the loop needs, built by set_up: the process, models, data, optimiser and log."""
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
    references: list[list[int]]         # dataset answers + a stop token (off-policy batches)
    optimizer: torch.optim.Optimizer
    scheduler: object
    start: int                          # the first step to run (the checkpoint's on --resume)
    metrics: object                     # <out>/metrics.jsonl, open to append (rank 0; else None)
    val_prompts: list[list[int]]        # held-out validation prompts ([] without --eval-every)
    best: "Best"                        # the best validation so far (<out>/best/)
    fsdp: bool = False                  # teacher and student sharded over the ranks (FSDP2)


def set_up(cfg: Config, inputs: train_checks.Inputs) -> Run:
    """Everything before the first step, in this order (the RNG seeds are set before any model
    exists): process and device, models, optimiser and schedule (restored on --resume), the run
    directory."""
    rank, world, device = train_checks.set_up_process(cfg)
    out, master = Path(cfg.out), rank == 0
    examples, prompts, ckpt = inputs.examples, inputs.prompts, inputs.ckpt
    teacher, student, tokenizer = train_setup.load_models(cfg, device, ckpt)
    if cfg.fsdp:                    # before the optimizer: AdamW then holds each rank's pieces only
        sharding.shard_models(cfg, teacher, student, device)
    else:                           # each lm_head one the loss can project with
        lm_head_weight(teacher, "teacher")
        lm_head_weight(student, "student")
    # one decoding protocol (models.decoding_protocol) for sampling here and for evaluate.py /
    # report.py
    protocol = models.decoding_protocol(models.preset_config(cfg.preset, cfg.task), tokenizer,
                                        teacher, temperature=cfg.temperature, top_p=cfg.top_p,
                                        max_new_tokens=cfg.max_new_tokens)
    stop_ids = list(protocol.stop_ids)
    # --dtype bfloat16: the forwards (sampling included) under bf16 autocast on every device; the
    # loss projects in float32 itself, sampling processes the logits in float32, AdamW's state is
    # float32
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.dtype == "bfloat16"
                else nullcontext())

    # -- for dataset batches, the reference answers + a stop token (the prompts:
    #    train_checks.check_inputs)
    end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else stop_ids[:1]
    references = [tokenizer.encode(ex.reference, add_special_tokens=False) + end for ex in examples]
    if cfg.steps is None:                         # the paper preset: epochs over the prompts
        cfg.steps = max(1, math.ceil(cfg.epochs * len(prompts) / cfg.batch_size))

    optimizer, scheduler, start = train_setup.make_optimizer(cfg, student, ckpt, device)
    ddp = world > 1 and not cfg.fsdp
    model = torch.nn.parallel.DistributedDataParallel(student) if ddp else student
    # rank 0: best/ of a resumed run, config.json, metrics.jsonl open for appending
    best, metrics = (train_setup.open_run_dir(cfg, out, ckpt, start) if master
                     else (checkpoints.Best(), None))
    return Run(rank, world, device, out, master, teacher, student, model, tokenizer, protocol,
               stop_ids, tokenizer.pad_token_id, protocol.vocab_size, autocast, prompts, references,
               optimizer, scheduler, start, metrics, inputs.val_prompts, best, cfg.fsdp)


if __name__ == "__main__":
    cli.script_main(main)                       # bad input: one line, exit 2; Ctrl-C: exit 130
