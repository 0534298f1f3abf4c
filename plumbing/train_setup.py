"""distill.py's set-up and tear-down around the loop: the models, the optimiser, the run directory.

distill.train calls set_up before the first step (it calls load_models, make_optimizer and
open_run_dir in that order and returns a Run: everything the loop needs, under one name) and finish
after the last. What a run writes, file by file: docs/training-run.md. The Config is distill's:
these functions take it as an argument (no import of distill, no cycle).
"""
from __future__ import annotations

import gc
import math
import os
import shutil
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from transformers import get_cosine_schedule_with_warmup

import models
from plumbing import checkpoints, rundir, sharding, train_checks

if TYPE_CHECKING:
    from distill import Config


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
    best: checkpoints.Best              # the best validation so far (<out>/best/)
    fsdp: bool = False                  # teacher and student sharded over the ranks (FSDP2)


def set_up(cfg: Config, inputs: train_checks.Inputs) -> Run:
    """Everything before the first step, in this order (the RNG seeds are set before any model
    exists): process and device, models, optimiser and schedule (restored on --resume), the run
    directory."""
    rank, world, device = train_checks.set_up_process(cfg)
    out, master = Path(cfg.out), rank == 0
    examples, prompts, ckpt = inputs.examples, inputs.prompts, inputs.ckpt
    teacher, student, tokenizer = load_models(cfg, device, ckpt)
    if cfg.fsdp:                    # before the optimizer: AdamW then holds each rank's pieces only
        sharding.shard_models(cfg, teacher, student, device)
    else:                           # each lm_head one the loss can project with
        models.lm_head_weight(teacher, "teacher")
        models.lm_head_weight(student, "student")
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

    optimizer, scheduler, start = make_optimizer(cfg, student, ckpt, device)
    ddp = world > 1 and not cfg.fsdp
    model = torch.nn.parallel.DistributedDataParallel(student) if ddp else student
    # rank 0: best/ of a resumed run, config.json, metrics.jsonl open for appending
    best, metrics = (open_run_dir(cfg, out, ckpt, start) if master
                     else (checkpoints.Best(), None))
    return Run(rank, world, device, out, master, teacher, student, model, tokenizer, protocol,
               stop_ids, tokenizer.pad_token_id, protocol.vocab_size, autocast, prompts, references,
               optimizer, scheduler, start, metrics, inputs.val_prompts, best, cfg.fsdp)


def load_models(cfg: Config, device, ckpt: Path | None):
    """The frozen teacher (eval, no grad) and the trainable student (--resume: from the checkpoint,
    named here). -> teacher, student, tokenizer. The caller checks that each lm_head is one the loss
    can project with (models.lm_head_weight)."""
    if ckpt is not None and int(os.environ.get("RANK", "0")) == 0:
        print(f"resuming from {ckpt} (step {rundir.checkpoint_step(ckpt)})", flush=True)
    student_path = str(ckpt) if ckpt else cfg.student
    if cfg.fsdp:
        teacher, student, tokenizer = sharding.load_pair_to_shard(
            cfg, student_path, device, int(os.environ.get("RANK", "0")) == 0)
    else:
        teacher, student, tokenizer = models.load_pair(
            cfg.teacher, student_path, device=device, load_in_8bit=cfg.teacher_8bit,
            teacher_dtype=train_checks.DTYPES[cfg.dtype], student_dtype=torch.float32)
    teacher.eval().requires_grad_(False)
    if not cfg.fsdp:                # --fsdp: float32 already, placed piece by piece by shard_models
        student.to(device=device, dtype=torch.float32)    # fp32 master weights; bf16 via autocast
    student.train()
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    return teacher, student, tokenizer


def make_optimizer(cfg: Config, student, ckpt: Path | None, device):
    """AdamW and its schedule (linear warm-up, then cosine to 0), restored with the RNG states from
    a checkpoint. -> optimizer, scheduler, the first step to run."""
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup * cfg.steps), cfg.steps)
    if ckpt is None:
        return optimizer, scheduler, 0
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True,
                       map_location="cpu" if cfg.fsdp else device)
    if cfg.fsdp:                        # the full, name-keyed state: each rank keeps its pieces
        sharding.load_optimizer_state(student, optimizer, state["optimizer"])
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    checkpoints.set_rng_state(state["rng"])
    return optimizer, scheduler, state["step"]


def open_run_dir(cfg: Config, out: Path, ckpt: Path | None, start: int):
    """Rank 0's run directory before the first step: best/ of a resumed run (before the clean-up),
    the interrupted writes of a killed run removed, config.json written, and metrics.jsonl open for
    appending. -> best so far (checkpoints.Best), the open log."""
    best = checkpoints.load_best(out, start) if ckpt else checkpoints.Best()
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp"):                         # interrupted writes of a killed run
        shutil.rmtree(stale, ignore_errors=True)
    rundir.write_config(out, asdict(cfg))
    # append-only log: a resumed run first drops the rows after its checkpoint (atomically); a fresh
    # one starts empty
    return best, rundir.open_log(out, start if ckpt else None)


def finish(run: Run) -> Path:
    """After the last step: close the log, write <out>/final (rank 0), end the process group."""
    state_dict = sharding.full_state_dict(run.student) if run.fsdp else None   # FSDP: a collective
    if run.master:
        run.metrics.close()
        final = checkpoints.save_final(run.out, run.student, run.tokenizer, state_dict)
        print(f"final student: {final}")
    if dist.is_initialized():
        # the DDP wrapper goes first: destroyed after its process group, its reducer could wait
        # forever on a rank that has already exited (a hang seen in about 1 run in 10 on gloo)
        run.model = run.student
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    return run.out
