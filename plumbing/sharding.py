"""Sharding the teacher (target p) and the student (draft q) across ranks with FSDP2, for `distill.py --fsdp`.

Under torchrun with N ranks, `fully_shard` (torch.distributed.fsdp) splits every parameter along its first
dimension into N pieces (DTensor, Shard(0)); rank r keeps piece r. A "unit" is one decoder layer, plus the
root (embeddings, final norm, lm_head). Before a unit runs, its pieces are all-gathered into the whole
weights; after it runs (reshard_after_forward), the whole weights are freed again. So each rank holds

    sharded:      teacher weights / N,  student weights / N,  student gradients / N,  AdamW m and v / N
    not sharded:  gathered weights: the root's for the whole forward (V x d for the lm_head), and one decoder
                  layer's at a time (two while the next one is prefetched); the activations and the loss's working set of the rank's own micro-batch,
                  and, while the student samples, the student's gathered weights (once per step, below).

How each model is used:
    teacher   inference only: requires_grad False, every unit gathered for its forward and freed after it.
    student   trained: forward as the teacher, backward gathers each unit again, and reduce-scatters the
              gradients (averaged over the ranks, in float32), so each rank updates its own piece with AdamW.
              On-policy sampling decodes token by token: gathering per token would all-gather every unit
              once per decoded token, so `gathered` all-gathers the student once per step, decodes with
              plain whole weights (no collective, so ranks may finish decoding at different times), then
              frees them. (bench/bench_fsdp_sampling.py, tiny student, 2 CPU ranks x 4 prompts, 64 new
              tokens: per token 192 unit gathers and 0.45 s a call, gathered once 3 and 0.13 s; a plain copy
              refreshed from the full state each call, 0.11 s, but it keeps a second set of weights;
              docs/benchmarks.md.)
    mixed precision (CUDA, bf16): the units compute in bfloat16 (param_dtype), gradients are reduced in
              float32 and AdamW updates the float32 pieces (the master weights). On the CPU: float32.

Loading (`empty_model`, shard(..., from_rank0=True)): only rank 0 reads the weights (into CPU memory); the
other ranks build the same model on the meta device (no memory), every rank shards, and rank 0's whole
weights are broadcast piece by piece (set_model_state_dict, broadcast_from_rank0): one copy in host memory
(rank 0's), not one per rank (a 70B teacher in bf16 is 141 GB). An 8-bit teacher is loaded by every rank.

Checkpoints stay plain Hugging Face folders: `full_state_dict` gathers the whole float32 student onto
rank 0's CPU (get_model_state_dict, full_state_dict=True, cpu_offload=True) for save_pretrained, and
`full_optimizer_state` the whole AdamW state, FQN-keyed, for trainer_state.pt (torch.save of plain tensors,
checksummed with the checkpoint, loaded with weights_only=True). Why gathered rather than sharded
(torch.distributed.checkpoint): the student is the small model (a 1B draft's AdamW state is 8 GB in
float32), and one self-contained folder keeps rundir.py's rules (atomic rename, checksums, last two kept)
as they are. `load_optimizer_state` gives each rank its piece back.

Also distill.py's processes: the process group (init_distributed), the sums over ranks
(all_reduce_sum), the pair loaded and sharded for --fsdp, and <out>/sharding.json.
"""
from __future__ import annotations

import json
import os
import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from plumbing import rundir

if TYPE_CHECKING:
    from distill import Config
    from plumbing.train_setup import Run


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a Hugging Face causal LM (model.model.layers for Llama, Qwen, SmolLM, ...)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"--fsdp shards per decoder layer, but {type(model).__name__} has no model.layers "
                         f"ModuleList (a Hugging Face decoder-only causal LM has one)")
    return layers


def mixed_precision(device: torch.device, bf16: bool) -> MixedPrecisionPolicy:
    """bf16 compute with float32 gradient reduction (and float32 master pieces) on CUDA; float32 elsewhere."""
    if device.type == "cuda" and bf16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def empty_model(path, dtype: torch.dtype) -> torch.nn.Module:
    """The model of a Hugging Face folder on the meta device: its shapes and dtypes, no memory (the ranks
    other than 0 under shard(..., from_rank0=True))."""
    from transformers import AutoConfig, AutoModelForCausalLM
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)


def shard(model: torch.nn.Module, mp_policy: MixedPrecisionPolicy | None = None, *, from_rank0: bool = False,
          device: torch.device | None = None) -> torch.nn.Module:
    """fully_shard every decoder layer, then the root (the rest: embeddings, final norm, lm_head), in place.
    Every unit frees its gathered weights after its forward. Parameters on the CPU move to the device of the
    default mesh (cuda:<local rank> under torchrun with CUDA), piece by piece.
    from_rank0: rank 0 holds the loaded weights, the other ranks an empty_model; after sharding, rank 0's
    weights and buffers are broadcast, so every rank ends with its pieces (`device`: where they live)."""
    full = model.state_dict() if from_rank0 and dist.get_rank() == 0 else {}      # rank 0's whole weights
    kw = {"mp_policy": mp_policy or MixedPrecisionPolicy(), "reshard_after_forward": True}
    for layer in decoder_layers(model):
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    if from_rank0:
        if any(p.is_meta for p in model.parameters()):
            model.to_empty(device=device)
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        del full
        for buffer in model.buffers():                 # not in the state dict (rotary inv_freq): rank 0's too
            dist.broadcast(buffer, src=0)
    # Gather and free each unit once here, outside inference mode: the first all-gather allocates the
    # buffers of the whole weights, and buffers made under torch.inference_mode (specdec's sampling) would
    # be inference tensors that later all-gathers may not write into.
    for unit in units(model):
        unit.unshard()
    for unit in units(model):
        unit.reshard()
    return model


def units(model: torch.nn.Module) -> list[FSDPModule]:
    """The fully_shard units of a model (its layers and its root)."""
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


@contextmanager
def gathered(model: torch.nn.Module):
    """All of `model`'s weights whole on every rank inside the block (one all-gather per unit), freed after.
    For on-policy sampling: the forwards inside need no collective. A model that is not sharded: no-op."""
    if not is_sharded(model):
        yield model
        return
    all_units = units(model)
    for unit in all_units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield model
    finally:
        for unit in all_units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


# The fused loss asks the models for no logits column (logits_to_keep = an empty index): HF returns an empty
# view, which FSDP2 warns about once per process in case of an in-place op on it. No code writes into it.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


@contextmanager
def head_kept(model: torch.nn.Module):
    """Inside the block the root unit (embeddings, final norm, lm_head) stays whole after its forward, so that
    the fused loss (divergences.hidden_divergence_sum) can read lm_head.weight: FSDP would otherwise free it
    at the end of the forward, and the loss projects the hidden states itself. For the student the backward
    runs inside the block: FSDP's end-of-backward reduce-scatters the head's gradient (the loss's included)
    into the pieces and frees the whole weights; for the frozen teacher, the block's end frees them (reshard).
    One root gather per micro-batch, as the forward makes anyway. A model that is not sharded: no-op."""
    if not is_sharded(model):
        yield model
        return
    model.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        model.reshard()                          # a no-op after the student's backward (FSDP freed it)
        model.set_reshard_after_forward(True, recurse=False)


def to_float(x) -> float:
    """A scalar that may be a DTensor (clip_grad_norm_ over sharded gradients returns one)."""
    return float(x.full_tensor() if isinstance(x, DTensor) else x)


# ----------------------------------------------------------------------------- what each rank holds

def local_bytes(tensors) -> int:
    """Bytes this rank stores for `tensors`: a DTensor's local piece, a plain tensor whole."""
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors if t is not None)


def full_bytes(tensors) -> int:
    """Bytes of the whole tensors (a DTensor's global shape)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list:
    """The optimizer's state tensors that scale with the parameters (AdamW: exp_avg, exp_avg_sq)."""
    return [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]


def memory_record(teacher, student, optimizer) -> dict:
    """This rank's bytes of teacher weights, student weights, student gradients and optimizer state, local
    (what it stores) and full (the whole), measured from the tensors (DTensor.to_local for the pieces)."""
    groups = {"teacher_params": list(teacher.parameters()), "student_params": list(student.parameters()),
              "student_grads": [p.grad for p in student.parameters()],
              "optimizer_state": optimizer_tensors(optimizer)}
    rec = {}
    for name, tensors in groups.items():
        rec[f"{name}_bytes"] = local_bytes(tensors)
        rec[f"{name}_full_bytes"] = full_bytes(tensors)
    return rec


def gather_records(record: dict, world: int) -> list[dict]:
    """Every rank's record, in rank order (on every rank)."""
    if world == 1:
        return [record]
    out = [None] * world
    dist.all_gather_object(out, record)
    return out


# ----------------------------------------------------------------------------- checkpoints

FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state_dict(model) -> dict:
    """The whole model state (float32, CPU) on rank 0, {} on the other ranks. A collective: every rank calls."""
    return get_model_state_dict(model, options=FULL_ON_RANK0)


def full_optimizer_state(model, optimizer) -> dict:
    """The whole optimizer state, keyed by parameter names (CPU) on rank 0, {} elsewhere. Collective."""
    return get_optimizer_state_dict(model, optimizer, options=FULL_ON_RANK0)


def load_optimizer_state(model, optimizer, state: dict):
    """Restore a full_optimizer_state dict (held by every rank): each rank keeps its pieces."""
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


# ----------------------------------------------------------------------------- distill.py's processes

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


def load_pair_to_shard(cfg: Config, student_path: str, device, master: bool):
    """--fsdp: rank 0 reads both models into CPU memory (the teacher in the dtype the device computes in,
    bf16 on CUDA), the other ranks build them empty (meta device); shard_models then broadcasts rank 0's
    weights piece by piece. An 8-bit teacher is read and quantised on the device by every rank, whole."""
    from plumbing.train_checks import DTYPES   # imported here: no cycle
    import models                               # models imports this module lazily too
    teacher_dtype = DTYPES[cfg.dtype]
    if master:                                 # load_pair checks the pair (tokenizers, lm_heads) once
        teacher, student, tokenizer = models.load_pair(
            cfg.teacher, student_path, device=device if cfg.teacher_8bit else "cpu", teacher_dtype=teacher_dtype,
            load_in_8bit=cfg.teacher_8bit)
        return teacher, student.to("cpu", torch.float32), tokenizer
    tokenizer = models.load_tokenizer(cfg.teacher)
    teacher = (models.load_model(cfg.teacher, device=device, load_in_8bit=True) if cfg.teacher_8bit
               else empty_model(cfg.teacher, teacher_dtype))
    return teacher, empty_model(student_path, torch.float32), tokenizer


def shard_models(cfg: Config, teacher, student, device):
    """--fsdp: both models sharded per decoder layer (sharding.shard). The student computes in bf16 on CUDA
    with float32 master pieces and reduction; the teacher in the dtype it was loaded in (bf16 on CUDA). An
    8-bit teacher (bitsandbytes' Int8Params cannot be split into DTensor pieces) stays whole on every rank."""
    if not cfg.teacher_8bit:
        shard(teacher, from_rank0=True, device=device)
    shard(student, mixed_precision(device, cfg.dtype == "bfloat16"), from_rank0=True, device=device)


def write_sharding_record(run: Run):
    """<out>/sharding.json: every rank's bytes of teacher weights, student weights, gradients and AdamW
    state (local pieces, sharding.memory_record), measured after the first optimizer step of the process."""
    records = gather_records(memory_record(run.teacher, run.student, run.optimizer), run.world)
    if run.master:
        rundir.write_atomic(run.out / "sharding.json", json.dumps({"world_size": run.world, "ranks": records},
                                                                  indent=1))
