"""distill.py's set-up and tear-down around the loop: the models, the optimiser, the run directory.

distill.set_up calls these in order before the first step (load_models, make_optimizer,
open_run_dir); distill.train calls finish after the last. What a run writes, file by file:
docs/training-run.md. The Config and Run are distill's: these functions take them as arguments
(no import of distill, no cycle).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from transformers import get_cosine_schedule_with_warmup

import models
from plumbing import checkpoints, rundir, sharding, train_checks

if TYPE_CHECKING:
    from distill import Config, Run


def load_models(cfg: Config, device, ckpt: Path | None):
    """The frozen teacher (eval, no grad) and the trainable student (--resume: from the checkpoint,
    named here). -> teacher, student, tokenizer. The caller checks that each lm_head is one the loss
    can project with (distill.lm_head_weight)."""
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
        dist.barrier()
        dist.destroy_process_group()
    return run.out
