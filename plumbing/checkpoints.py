"""distill.py's checkpoints and best/: written atomically with checksums, resumed exactly.

ckpt-<step>/ holds the student (safetensors), the tokenizer, and trainer_state.pt (the optimizer,
the schedule and every RNG state), so that --resume reproduces the uninterrupted run; the newest
two are kept (rundir.KEEP_CHECKPOINTS). final/ and best/ are plain Hugging Face model folders.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from plumbing import rundir, sharding

if TYPE_CHECKING:
    from plumbing.train_setup import Run


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


def save_checkpoint(out: Path, step: int, student, tokenizer, optimizer, scheduler, *,
                    model_state=None, optimizer_state=None):
    """Write ckpt-<step> atomically: everything, and the checksums of its files, into a temporary
    directory, then one rename; then keep the newest two (rundir.KEEP_CHECKPOINTS), so that a
    damaged newest one has a predecessor. A crash at any point leaves the previous checkpoints
    intact. Under --fsdp, model_state / optimizer_state are the gathered full states
    (sharding.full_state_dict, sharding.full_optimizer_state): the folder is the same plain Hugging
    Face one."""
    final = out / f"ckpt-{step:07d}"
    tmp = out / f".ckpt-{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_model(student, tmp, model_state)                     # safetensors
        tokenizer.save_pretrained(tmp)
        if optimizer_state is None:
            optimizer_state = optimizer.state_dict()
        state = {"step": step, "optimizer": optimizer_state,
                 "scheduler": scheduler.state_dict(), "rng": rng_state()}
        torch.save(state, tmp / "trainer_state.pt")               # plain tensors / dicts only
        rundir.write_checksums(tmp)                               # verified by --resume
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)          # give back the space a full disk needs
        full = rundir.disk_full(e, tmp)
        if full is not None:
            raise full from e
        raise
    # only a damaged ckpt-<step> (skipped by --resume) is in the way
    rundir.set_aside(final)
    os.replace(tmp, final)
    rundir.fsync_dir(out)
    rundir.prune_checkpoints(out)
    return final


def save_model(student, path: Path, state_dict=None):
    """save_pretrained (safetensors) of the student, or of a gathered full state under --fsdp (the
    config then names the model's own class, not FSDP's wrapper class)."""
    if state_dict is None:
        student.save_pretrained(path)
        return
    # the gathered copies of tied weights (lm_head = embed_tokens) are separate tensors: keep the
    # first name, as save_pretrained does for the model's own (shared) parameters
    aliases = ({n for n, _ in student.named_parameters(remove_duplicate=False)}
               - {n for n, _ in student.named_parameters()})
    student.save_pretrained(path,
                            state_dict={k: v for k, v in state_dict.items() if k not in aliases})
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = [a.removeprefix("FSDP") for a in config.get("architectures") or []]
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_final(out: Path, student, tokenizer, state_dict=None) -> Path:
    """<out>/final: a plain Hugging Face model directory (from_pretrained, assistant_model)."""
    final, tmp = out / "final", out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(student, tmp, state_dict)
    tokenizer.save_pretrained(tmp)
    rundir.write_checksums(tmp)     # verified wherever final/ is loaded (models.check_model_files)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


@dataclass
class Best:
    """The best validation so far: its step and val_acceptance_rate (-inf before the first)."""
    step: int = 0
    value: float = -math.inf


def save_best(out: Path, step: int, student, tokenizer, val: dict) -> Best:
    """<out>/best: the student (a plain Hugging Face directory), best.json {step, val_*},
    checksums.json; written to a temporary directory and renamed over the old best/ (a crash leaves
    the old or the new)."""
    best, tmp, old = out / "best", out / ".best.tmp", out / ".best-old.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "best.json").write_text(json.dumps({"step": step, **val}, indent=1))
    rundir.write_checksums(tmp)
    if best.exists():
        os.replace(best, old)           # two renames: no moment without a whole best (old or new)
    os.replace(tmp, best)
    rundir.fsync_dir(out)
    shutil.rmtree(old, ignore_errors=True)
    return Best(step, val["val_acceptance_rate"])


def load_best(out: Path, start: int) -> Best:
    """The best so far of a resumed run: <out>/best's step and value when it verifies and is not
    newer than the checkpoint resumed from (it cannot be, unless the newest checkpoint was damaged);
    otherwise best/ is removed, saying why, and the next validation makes it again."""
    best = out / "best"
    if not best.exists():
        old = out / ".best-old.tmp"     # killed between best/'s two renames: the old one is whole
        if not old.exists():
            return Best()
        os.replace(old, best)
    problem = rundir.verify_checkpoint(best)
    info = json.loads((best / "best.json").read_text()) if problem is None else {}
    if problem is None and info["step"] <= start:
        return Best(info["step"], info["val_acceptance_rate"])
    why = problem or (f"it is from step {info['step']}, after the checkpoint resumed from "
                      f"(step {start})")
    rundir.say(f"{best} removed: {why}; the next validation writes it again")
    shutil.rmtree(best)
    return Best()


def gather_for_checkpoint(run: Run):
    """(model state, optimizer state) gathered whole on rank 0 under --fsdp (every rank must call),
    else (None, None): save_checkpoint then reads the plain student and optimizer."""
    if not run.fsdp:
        return None, None
    return (sharding.full_state_dict(run.student),
            sharding.full_optimizer_state(run.student, run.optimizer))


def save_step(run: Run, step: int, best_val: dict | None):
    """The loop's checkpoint after `step` steps (every rank calls: under --fsdp the state is gathered
    first); best_val, the validation row of a new best, also writes <out>/best/ (never under --fsdp:
    train_checks.check_options refuses --eval-every there)."""
    model_state, optimizer_state = gather_for_checkpoint(run)
    if run.master:
        save_checkpoint(run.out, step, run.student, run.tokenizer, run.optimizer, run.scheduler,
                        model_state=model_state, optimizer_state=optimizer_state)
        if best_val is not None:
            run.best = save_best(run.out, step, run.student, run.tokenizer, best_val)
    if run.world > 1:
        torch.distributed.barrier()
