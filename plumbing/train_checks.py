"""distill.py's checks before any model loads, and the process it runs in.

Every option is checked, and the blanks filled from the preset, before the first model loads
(resolve_config); then the data, the model folders, the checkpoint to resume and every prompt's
length (check_inputs). Bad input is one ValueError naming the option and what is allowed
(cli.before_the_work turns it into one `error:` line). The Config is distill.Config: these
functions take it as an argument (no import of distill, no cycle).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch

import data
import divergences
import models
from plumbing import cli, rundir, sharding

if TYPE_CHECKING:
    from distill import Config

OFF_POLICY = ("dataset", "teacher")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}   # --dtype


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
    # the largest local rank: every rank's device is checked on each (rank 0 says it,
    # cli.report_bad_input)
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
    for f in fields(cfg):
        if f.metadata["preset"] and getattr(cfg, f.name) is None:
            value = preset.get(f.name)
            setattr(cfg, f.name, f.metadata["fallback"] if value is None else value)
    if cfg.loss_temperature is None:
        cfg.loss_temperature = cfg.temperature if cfg.temperature > 0 else 1.0
    for name in ("loss_temperature", "lr"):
        if not getattr(cfg, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")
    if cfg.temperature < 0 or not 0 < cfg.top_p <= 1:
        raise ValueError(f"need --temperature >= 0 and 0 < --top-p <= 1, "
                         f"got {cfg.temperature}, {cfg.top_p}")
    if cfg.off_policy_warmup < 0:
        raise ValueError(f"--off-policy-warmup must be >= 0 steps, got {cfg.off_policy_warmup}")
    for name in ("steps", "batch_size", "grad_accum", "max_new_tokens", "n_train", "save_every"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    cli.check_threads(cfg.threads)
    cfg.world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.batch_size % (cfg.world_size * cfg.grad_accum):
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by world size "
                         f"{cfg.world_size} x --grad-accum {cfg.grad_accum}")
    if cfg.out is None:
        tag = cfg.div if cfg.div != "jsd" or cfg.beta == 0.5 else f"jsd{cfg.beta:g}"
        # the task, or e.g. gsm8k-file-x
        group = rundir.task_group(cfg.task, cfg.source, cfg.data_path, preset_source)
        cfg.out = str(Path("runs") / cfg.preset / group / f"{tag}-s{cfg.seed}")
    check_options(cfg)
    if cfg.resume:
        rundir.check_resumable(Path(cfg.out))
    check_run_dir(cfg)
    return cfg


# the optimisation a preset tunes
SCHEDULE_FIELDS = ("lr", "warmup", "steps", "epochs", "batch_size", "grad_accum")


def check_models_fit_preset(cfg: Config, preset: dict):
    """The tiny preset's learning rate and schedule are tuned for its own offline pair (a 1-layer
    student of a few hundred thousand weights: lr 2e-3), far too hot for a real model. A --teacher /
    --student outside the tiny pairs (a folder models.py built, marked by its build.json) under
    --preset tiny, --preset left at its default included, is refused unless --lr is given: the user
    then chose the learning rate."""
    if cfg.preset != "tiny" or cfg.lr is not None:
        return
    for role in ("teacher", "student"):
        model = getattr(cfg, role)
        local = Path(str(model)).expanduser()
        if model is None or (local.is_dir() and not (local / "config.json").is_file()):
            continue             # not a model folder: check_inputs names what is wrong with it
        if not models.is_tiny_pair_model(model):
            raise ValueError(f"--{role} {model} is not a tiny pair's model, and --preset tiny (the "
                             f"default) would train it with the tiny preset's lr "
                             f"{preset.get('lr'):g} and schedule, tuned for the offline tiny pair: "
                             f"pass --lr (and --steps / --warmup as wanted), or --preset smollm2 / "
                             f"paper")


def preset_settings_line(cfg: Config, unset: list[str]) -> str:
    """Which preset's optimisation settings this run takes, and which of them came from it (unset:
    the preset fields no flag set), e.g. "[distill] settings of the tiny preset: lr 0.002, warmup
    0.1, steps 300; --batch-size given"."""
    taken = [f"{name} {getattr(cfg, name):g}" for name in SCHEDULE_FIELDS
             if name in unset and getattr(cfg, name) is not None]
    given = ["--" + name.replace("_", "-") for name in SCHEDULE_FIELDS if name not in unset]
    return (f"[distill] settings of the {cfg.preset} preset: " + (", ".join(taken) or "none")
            + (f"; {', '.join(given)} given" if given else "")
            + (" (the tiny preset is tuned for its offline pair; --preset paper for real models)"
               if cfg.preset == "tiny" else ""))


def check_options(cfg: Config):
    """The value checks resolve_config leaves out: ranges that would train the wrong way silently (a
    negative clip threshold ascends the gradient) and non-finite numbers (nan passes every < test).
    """
    def bad(name, allowed):
        flag = "--" + name.replace("_", "-")
        raise ValueError(f"{flag} {getattr(cfg, name)!r} is not allowed; {flag} must be {allowed}")
    finite = lambda v: isinstance(v, (int, float)) and math.isfinite(v)   # noqa: E731
    for name in ("beta", "ajsd_scale", "ajsd_floor", "lk_scale", "lk_decay", "lmbda", "temperature",
                 "top_p", "loss_temperature",
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
        raise ValueError("--resume continues the run in --out and --overwrite deletes it: "
                         "pass one of them")
    if cfg.fsdp and "WORLD_SIZE" not in os.environ:
        raise ValueError("--fsdp shards the models over torchrun's processes: launch with "
                         "torchrun --nproc_per_node=N distill.py --fsdp ...")
    if cfg.fsdp and cfg.eval_every:
        raise ValueError(f"--eval-every {cfg.eval_every} is not supported with --fsdp yet "
                         "(validation decodes with the whole student on rank 0): drop "
                         "--eval-every, or validate the checkpoints with python -m study.evaluate")
    if cfg.fsdp and cfg.lmbda < 1 and cfg.off_policy == "teacher":
        raise ValueError("--off-policy teacher is not allowed with --fsdp: sampling from the "
                         "sharded teacher would all-gather it once per decoded token, in lock-step "
                         "over the ranks; use --off-policy dataset (or --lmbda 1)")


def check_run_dir(cfg: Config):
    """--out: a writable directory, not written by another process; a fresh run does not replace a
    run silently; a resumed run keeps the settings that change the result (rundir.py). Rank 0 only:
    it is the rank that writes (the others would see its lock)."""
    rundir.check_out_dir(Path(cfg.out))
    if int(os.environ.get("RANK", "0")) != 0:
        return
    rundir.check_unlocked(Path(cfg.out))
    if cfg.resume:
        # the thread count changes floating-point sums on the CPU only (CUDA kernels do not use
        # the pool)
        default = "cuda" if torch.cuda.is_available() else "cpu"
        on_cuda = torch.device(cfg.device or default).type == "cuda"
        rundir.check_same_run(Path(cfg.out), asdict(cfg), may_change={"threads"} if on_cuda else ())
    else:
        rundir.check_fresh(Path(cfg.out), cfg.overwrite)


@dataclass
class Inputs:
    """What main checks before any model loads, for train_setup.set_up: the data, its prompts, the checkpoint.
    """
    examples: list[data.Example]
    prompts: list[list[int]]            # chat-templated prompt ids, each within the models' context
    ckpt: Path | None                   # --resume: the newest verified checkpoint
    val_prompts: list[list[int]]        # --eval-every: the held-out validation prompts (else [])


def check_inputs(cfg: Config, master: bool) -> Inputs:
    """The pair (the preset's, built on first use), the training rows (checked; CNN/DM's length
    filter counted with the teacher's tokenizer), the model folders (config.json, safetensors
    headers, one tokenizer), the checkpoint to resume, --teacher-8bit on the device, every prompt +
    --max-new-tokens within both models' context. Loads no model. With --eval-every, the validation
    prompts are held out of the train split (data.held_out_split)."""
    if cfg.teacher is None or cfg.student is None:
        teacher_id, student_id = models.resolve_pair(cfg.task, cfg.preset)
        cfg.teacher, cfg.student = cfg.teacher or teacher_id, cfg.student or student_id
    # a .gguf: one line if it is not one
    models.check_gguf_paths(teacher=cfg.teacher, student=cfg.student)
    cfg.teacher, cfg.student = models.model_folder(cfg.teacher), models.model_folder(cfg.student)
    tokenizer = models.load_tokenizer(cfg.teacher, "teacher")
    if cfg.eval_every:
        try:
            examples, val_examples = data.held_out_split(
                cfg.task, cfg.n_train, cfg.eval_prompts, source=cfg.source, path=cfg.data_path,
                seed=cfg.seed, tokenizer=tokenizer, verbose=master)
        except data.DataError as e:
            if "validation prompts asked" not in str(e):
                raise
            raise data.DataError(f"--eval-prompts {cfg.eval_prompts} is too many: {e}") from None
    else:
        examples = data.load_examples(cfg.task, "train", source=cfg.source, path=cfg.data_path,
                                      n=cfg.n_train, seed=cfg.seed, tokenizer=tokenizer,
                                      verbose=master)
        val_examples = []
    cfg.data_sha256 = data_fingerprint(examples, val_examples)
    if cfg.resume and master:
        rundir.check_same_data(Path(cfg.out), cfg.data_sha256, data_origin(cfg), len(examples))
    ckpt = rundir.resume_checkpoint(Path(cfg.out)) if cfg.resume else None
    folders = {"teacher": cfg.teacher, "student": str(ckpt) if ckpt else cfg.student}
    for role, path in folders.items():
        models.check_model_files(path, role)
    models.check_tokenizers(*folders.values())
    for role, path in folders.items():     # the lm_heads cover the tokenizer, read from config.json
        models.check_vocabulary(path, tokenizer, role)
    device = run_device(cfg, int(os.environ.get("LOCAL_RANK", "0")))
    # CUDA, and CPU with bitsandbytes >= 0.45
    if cfg.teacher_8bit and (why := models.int8_unsupported(device)):
        raise ValueError(f"--teacher-8bit needs bitsandbytes' 8-bit matmul on device {device}: "
                         f"{why}")
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
    return (f"checked: {cfg.div} on {len(inputs.prompts)} {cfg.task} prompts, teacher "
            f"{cfg.teacher}, student {cfg.student}, {cfg.world_size} process(es); {start}. "
            f"Nothing was written.")


def data_fingerprint(examples: list[data.Example], val_examples: list[data.Example]) -> str:
    """sha256 of the rows a run uses, in order: the training rows and the held-out validation rows
    (prompt and reference each). The same data file, --n-train and --seed give the same rows; an
    edited file does not."""
    h = hashlib.sha256()
    for part, rows in (("train", examples), ("val", val_examples)):
        for ex in rows:
            row = json.dumps([part, ex.prompt, ex.reference])
            h.update(row.encode("utf-8", "surrogatepass") + b"\n")
    return h.hexdigest()


def data_origin(cfg: Config) -> str:
    """Where the training rows come from, in words (for messages)."""
    if cfg.source == "file":
        return f"--data-path {cfg.data_path}"
    return f"the {cfg.source} data of {cfg.task}"


def run_device(cfg: Config, local_rank: int) -> torch.device:
    """This process's device: --device, where `cuda` without an index means this process's GPU,
    cuda:<local rank> (torch.cuda.set_device needs an index; under torchrun each rank has its own
    GPU); by default cuda:<local rank> when CUDA is available, else the CPU."""
    if cfg.device is None:
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(cfg.device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank)
    return device


def check_device(name: str | None, local_rank: int = 0):
    """--device must name a device this machine has (ValueError naming it and what there is): cpu;
    cuda or cuda:N with CUDA available and N (cuda: cuda:<local_rank>, run_device; resolve_config
    passes the largest local rank of the machine's processes) below the GPU count; mps where
    available. A device that is not there failed in torch.cuda.set_device, after the data had
    loaded."""
    if name is None:
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; valid: cpu, cuda (this process's "
                         f"GPU: cuda:<local rank>) or cuda:N") from None
    if device.type == "cpu":
        return
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name} is not available: torch sees no CUDA GPU on this "
                             f"machine (torch {torch.__version__}, CUDA build "
                             f"{torch.version.cuda}); use --device cpu")
        index = local_rank if device.index is None else device.index
        count = torch.cuda.device_count()
        if index >= count and device.index is None:
            raise ValueError(f"--device {name} gives each of the {local_rank + 1} processes on "
                             f"this machine its own GPU (cuda:<local rank>), but it has {count}: "
                             f"start at most {count} processes")
        if index >= count:
            raise ValueError(f"--device {name} is cuda:{index}, but this machine has {count} CUDA "
                             f"GPU(s): cuda:0 to cuda:{count - 1}")
        return
    if device.type == "mps" and torch.backends.mps.is_available():
        return
    raise ValueError(f"--device {name} is not available here; valid: cpu, cuda or cuda:N (with a "
                     f"CUDA GPU)")


def set_up_process(cfg: Config):
    """(rank, world size, device) of this process; checks what depends on them; seeds the RNGs."""
    rank, world, local_rank = sharding.init_distributed(cfg.fsdp)
    device = run_device(cfg, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cli.set_threads(cfg.threads)
    if rank != 0:                         # one set of progress bars: rank 0's (the loop's, below)
        import transformers
        transformers.utils.logging.disable_progress_bar()
    random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed + rank)
    return rank, world, device
