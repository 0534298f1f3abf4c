"""The real pair (SmolLM2-135M-Instruct and its early-exit draft), side by side in one run: decoding speed,
the training step against TRL, and where our step's time goes.

The pair is the smollm2 preset's: models.resolve_pair("gsm8k", "smollm2") -> the target (30 layers) and the
baseline draft (its first 4 layers + final norm + tied head); --draft PATH (repeatable) adds a distilled draft,
labelled by its folder. Prompts: the official GSM8k test (decoding) and train (training) files the preset reads,
chat-templated with the model's own template.

1. Speculative decoding at batch 1, greedy and sampled (the preset's protocol: gamma 5, T 0.6, top-p 0.95,
   stop ids <|im_end|> / <|endoftext|>, up to max_new_tokens), three methods on the same prompts:
     ours      specdec.speculative_generate(target, draft)
     assisted  target.generate(assistant_model=draft), Hugging Face assisted generation, gamma drafts per round
               (num_assistant_tokens, constant schedule, no confidence cut-off) -- the same draft
     generate  target.generate(), the target alone
   Each prompt is run by every method in turn (the order rotated from prompt to prompt), the whole pass repeated
   --repeats times; a repeat's tokens/s = tokens generated / seconds over all prompts. The table gives the
   median over repeats and [min, max]; ratios are per repeat, then median [min, max]. Every sampled call of a
   prompt uses the same seed in every repeat (one fixed path per method: the repeats measure time, not luck).
   Greedy: the count of prompts whose three outputs are equal token for token (exact methods must agree).
2. The training step: distill.py (ours) vs TRL's GKDTrainer vs TRL's DistillationTrainer (where it runs) at the
   same batch, max_new_tokens, T 0.6, reverse KL, purely on-policy, lr 1e-4: seconds per step after a warm-up
   step, completion tokens/s, peak RSS and its growth during training (harness.py: each loop in a fresh process).
3. One distill.py step by phase (harness.step_phases: sampling, teacher forward, student forward, loss,
   backward, optimizer) on the real pair and real train prompts, exactly max_new_tokens per row.

CPU, one torch thread by default (a shared 2-core machine: 2 threads collapse under a competing job).
Run:  python bench/bench_real.py [--quick] [--draft runs/smollm2/gsm8k/rkl-s0/final] [--sections 123]
      (or: make bench-real [QUICK=1] [ARGS="--draft PATH"])
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")          # before torch starts its pool (children inherit it)
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402

import harness  # noqa: E402

TASK, PRESET = "gsm8k", "smollm2"


@dataclass(frozen=True)
class Config:
    decode_prompts: int = 8           # GSM8k test prompts, batch 1, one after the other
    decode_new_tokens: int = 96       # at most, per prompt (a stop id ends it earlier)
    repeats: int = 3                  # passes over the prompts, every method in each
    train_batch: int = 8
    train_new_tokens: int = 96
    train_steps: int = 3              # the first is warm-up, not timed
    phase_steps: int = 2              # phase profile: mean of this many steps after a warm-up
    temperature: float = 0.6          # sampled decoding and training (the preset's)
    top_p: float = 0.95
    threads: int = 1


QUICK = Config(decode_prompts=4, decode_new_tokens=32, repeats=2, train_batch=4, train_new_tokens=32,
               train_steps=2, phase_steps=1)


def machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch thread(s), "
            f"python {platform.python_version()}, torch {torch.__version__}")


def commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=REPO).stdout.strip()


# ----------------------------------------------------------------------------- 1. decoding

def hf_generate(target, prompt, protocol, greedy: bool, seed: int, assistant=None) -> list[int]:
    """target.generate on one prompt (batch 1, no padding), the protocol's stop ids and budget; the new tokens."""
    ids = torch.tensor([prompt])
    sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=protocol.temperature,
                                                         top_p=protocol.top_p, top_k=0)
    if assistant is not None:   # the candidate generator reads these from the ASSISTANT's generation config
        gc = assistant.generation_config
        gc.num_assistant_tokens, gc.num_assistant_tokens_schedule = protocol.gamma, "constant"
        gc.assistant_confidence_threshold = 0.0
    torch.manual_seed(seed)
    with torch.no_grad():
        out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=protocol.max_new_tokens,
                              eos_token_id=list(protocol.stop_ids), pad_token_id=target.generation_config.pad_token_id,
                              assistant_model=assistant, **sampling)
    return out[0, len(prompt):].tolist()


def decode_methods(target, draft, protocol, greedy: bool):
    """name -> fn(prompt, seed) -> (new tokens, speculative stats or None)."""
    import specdec
    kw = protocol.speculative_kwargs()
    if greedy:
        kw["temperature"] = 0.0

    def ours(prompt, seed):
        res = specdec.speculative_generate(target, draft, [prompt], seed=seed, **kw)
        return res.tokens[0], res.stats

    return {"ours": ours,
            "assisted": lambda prompt, seed: (hf_generate(target, prompt, protocol, greedy, seed, assistant=draft),
                                              None),
            "generate": lambda prompt, seed: (hf_generate(target, prompt, protocol, greedy, seed), None)}


def median_range(values, fmt="{:.1f}") -> str:
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}, {fmt.format(max(values))}]"


def time_decoding(methods, prompts, repeats) -> dict:
    """Every method on every prompt, the order rotated from prompt to prompt, `repeats` passes.
    -> {method: {"seconds": [per repeat], "tokens": [per repeat], "outputs": last pass's tokens, "stats": [...]}}"""
    names = list(methods)
    out = {m: {"seconds": [], "tokens": [], "outputs": [], "stats": []} for m in names}
    for r in range(repeats):
        for m in names:
            out[m]["seconds"].append(0.0)
            out[m]["tokens"].append(0)
            out[m]["outputs"], out[m]["stats"] = [], []
        for i, prompt in enumerate(prompts):
            for m in names[i % len(names):] + names[:i % len(names)]:
                t0 = time.perf_counter()
                tokens, stats = methods[m](prompt, i)
                out[m]["seconds"][-1] += time.perf_counter() - t0
                out[m]["tokens"][-1] += len(tokens)
                out[m]["outputs"].append(tokens)
                out[m]["stats"].append(stats)
        print(f"    repeat {r + 1}/{repeats}: " + ", ".join(
            f"{m} {out[m]['tokens'][-1] / out[m]['seconds'][-1]:.1f} tok/s" for m in names), flush=True)
    return out


def bench_decoding(cfg: Config, target_dir: str, drafts: dict, prompts, tok) -> str:
    import models
    target = models.load_model(target_dir, device="cpu").eval()
    protocol = models.decoding_protocol(PRESET, tok, target, task=TASK, max_new_tokens=cfg.decode_new_tokens,
                                        temperature=cfg.temperature, top_p=cfg.top_p)
    hf_generate(target, prompts[0], replace(protocol, max_new_tokens=4), True, 0)                 # warm-up
    rows, agreement = [], []
    for label, path in drafts.items():
        models.check_tokenizers(target_dir, path)
        draft = models.load_model(path, device="cpu").eval()
        for greedy in (True, False):
            mode = "greedy" if greedy else f"sampled (T {protocol.temperature}, top-p {protocol.top_p})"
            print(f"  decoding: draft {label}, {mode}", flush=True)
            res = time_decoding(decode_methods(target, draft, protocol, greedy), prompts, cfg.repeats)
            tps = {m: [n / s for n, s in zip(r["tokens"], r["seconds"])] for m, r in res.items()}
            ratio = lambda a, b: [x / y for x, y in zip(tps[a], tps[b])]  # noqa: E731
            per_row = [row for st in res["ours"]["stats"] for row in st["per_row"]]
            accepted = sum(r["accepted"] for r in per_row) / max(1, sum(r["drafted"] for r in per_row))
            per_call = sum(r["generated"] for r in per_row) / max(1, sum(r["target_calls"] for r in per_row))
            rows.append(f"| {label} | {mode} | {median_range(tps['ours'])} | {median_range(tps['assisted'])} | "
                        f"{median_range(tps['generate'])} | {median_range(ratio('ours', 'generate'), '{:.2f}')} | "
                        f"{median_range(ratio('assisted', 'generate'), '{:.2f}')} | "
                        f"{median_range(ratio('ours', 'assisted'), '{:.2f}')} | {accepted:.1%} | {per_call:.2f} | "
                        f"{sum(res['generate']['tokens']) // cfg.repeats} |")
            if greedy:
                outs = [res[m]["outputs"] for m in ("ours", "assisted", "generate")]
                equal = sum(a == b == c for a, b, c in zip(*outs))
                agreement.append(f"{label}: {equal} of {len(prompts)} prompts give equal greedy outputs "
                                 f"(ours = assisted = generate)")
        del draft
    head = (f"batch 1, {len(prompts)} GSM8k test prompts, at most {protocol.max_new_tokens} new tokens (stop ids "
            f"{list(protocol.stop_ids)}), gamma {protocol.gamma}, {cfg.repeats} repeats: median [min, max] over "
            f"repeats\n\n")
    table = ["| draft | decoding | ours tok/s | HF assisted tok/s | target generate tok/s | ours / generate | "
             "assisted / generate | ours / assisted | ours: accepted / drafted | ours: tokens per target call | "
             "tokens per pass |", "|---|---|---|---|---|---|---|---|---|---|---|"] + rows
    return head + "\n".join(table) + "\n\n" + "\n".join(f"- {line}" for line in agreement) + "\n"


# ----------------------------------------------------------------------------- 2. training loops

def run_distillation_trainer(a, teacher, student, out) -> dict:
    """TRL's DistillationTrainer (the promoted, GRPO-style on-policy trainer): beta 1 (reverse KL), on-policy
    completions of max_completion_length tokens, same batch, temperature, top-p, lr and stop ids as run_ours;
    no gradient checkpointing and float32 (its defaults differ), as the other two loops."""
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer
    import data
    import models

    t_model, s_model, tok = models.load_pair(teacher, student)
    s_model.float().train()
    stops = models.generation_stop_ids(tok, t_model, models.preset_config(PRESET, TASK)["stop_tokens"])
    rows = [{"prompt": r["messages"][:-1]} for r in harness.train_rows(a, tok)]
    cfg = DistillationConfig(output_dir=out, beta=1.0, temperature=a.temperature, top_p=0.95,
                             max_completion_length=a.max_new_tokens, per_device_train_batch_size=a.batch_size,
                             max_steps=a.steps, learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0,
                             report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, bf16=False,
                             gradient_checkpointing=False, dataloader_drop_last=True,
                             generation_kwargs={"eos_token_id": stops})
    trainer = DistillationTrainer(model=s_model, teacher_model=t_model, args=cfg, train_dataset=Dataset.from_list(rows),
                                  processing_class=tok)
    timer = harness.StepTimer()
    real = trainer._generate_and_score_completions

    def counting(inputs):
        timer.counted.setdefault("rss", harness.rss_mib())     # the first sampling call = the start of training
        batch = real(inputs)
        timer.counted["last_tokens"] = int(batch["completion_mask"].sum())
        return batch

    trainer._generate_and_score_completions = counting
    trainer.add_callback(timer.callback())
    trainer.train()
    return timer.result()


def loop_child(a):
    """One side of section 2, in its own process (its peak RSS is its own)."""
    import models
    torch.manual_seed(0)
    teacher, student = models.resolve_pair(TASK, PRESET)
    a.task, a.preset = TASK, PRESET
    run = {"ours": harness.run_ours, "trl": harness.run_trl, "distillation": run_distillation_trainer}[a.side]
    with tempfile.TemporaryDirectory() as out:
        res = run(a, teacher, student, out)
    res["peak_rss_mib"] = harness.peak_rss_mib()
    print("RESULT " + json.dumps(res), flush=True)


def bench_loops(cfg: Config) -> str:
    sides = ("ours", "trl", "distillation")
    results = harness.run_sides(lambda side: [
        sys.executable, str(Path(__file__).resolve()), "--side", side, "--threads", str(cfg.threads),
        "--batch-size", str(cfg.train_batch), "--max-new-tokens", str(cfg.train_new_tokens),
        "--steps", str(cfg.train_steps), "--temperature", str(cfg.temperature)], sides, optional=("distillation",))
    names = {"ours": "distill.py (ours)", "trl": "TRL GKDTrainer", "distillation": "TRL DistillationTrainer"}
    timed = cfg.train_steps - 1
    lines = [f"batch {cfg.train_batch}, max_new_tokens {cfg.train_new_tokens}, T {cfg.temperature}, rkl, on-policy, "
             f"lr 1e-4, {cfg.train_steps} steps (the first is warm-up; {timed} timed)\n",
             "| loop | completion tokens | s / step | completion tokens/s | peak RSS (MiB) | RSS growth in training "
             "(MiB) | step time / ours | peak RSS / ours |", "|---|---|---|---|---|---|---|---|"]
    o = results["ours"]
    for side in sides:
        r = results[side]
        if "error" in r:
            lines.append(f"| {names[side]} | did not run: {r['error']} | | | | | | |")
            continue
        lines.append(f"| {names[side]} | {r['tokens']:.0f} | {r['seconds'] / timed:.2f} | "
                     f"{r['tokens'] / r['seconds']:.1f} | {r['peak_rss_mib']:.0f} | "
                     f"{r['peak_rss_mib'] - r['rss_before_mib']:.0f} | {r['seconds'] / o['seconds']:.2f} | "
                     f"{r['peak_rss_mib'] / o['peak_rss_mib']:.2f} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- 3. phases

def bench_phases(cfg: Config, target_dir: str, draft_dir: str, tok) -> str:
    import data
    import models
    teacher, student, _ = models.load_pair(target_dir, draft_dir, device="cpu")
    source, path = models.preset_data(PRESET, TASK)
    prompts = data.task_prompts(TASK, tok, split="train", n=cfg.train_batch, source=source, path=path)
    mean, tokens = harness.step_phases(teacher, student, prompts, new_tokens=cfg.train_new_tokens,
                                       repeats=cfg.phase_steps, vocab_size=len(tok), pad_id=tok.pad_token_id,
                                       temperature=cfg.temperature, top_p=cfg.top_p)
    return (f"batch {cfg.train_batch} x {cfg.train_new_tokens} new tokens (no stop id), rkl, T {cfg.temperature}, "
            f"top-p {cfg.top_p}, mean of {cfg.phase_steps} step(s) after a warm-up\n\n" + harness.phase_table(mean, tokens)
            + "\n")


# ----------------------------------------------------------------------------- main

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a few-minute smoke run: " + str(QUICK))
    p.add_argument("--draft", action="append", default=[], metavar="PATH",
                   help="a distilled draft folder to decode with too (repeatable; labelled by its folder)")
    p.add_argument("--sections", default="123", help="which sections to run: 1 decoding, 2 loops, 3 phases")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=Config.threads)
    p.add_argument("--out", default=None, help="also write the report (markdown) to this file")
    # internal: one loop of section 2 in this process
    p.add_argument("--side", default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--max-new-tokens", type=int, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--temperature", type=float, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(a.threads)
    if a.side:
        return loop_child(a)
    import data
    import models
    cfg = QUICK if a.quick else Config()
    cfg = replace(cfg, threads=a.threads, repeats=a.repeats or cfg.repeats)
    for path in a.draft:
        if not Path(path).is_dir():
            sys.exit(f"--draft {path}: not a folder")
    target_dir, baseline_dir = models.resolve_pair(TASK, PRESET)
    tok = models.load_tokenizer(target_dir)
    drafts = {f"baseline ({Path(baseline_dir).name})": baseline_dir}
    drafts.update({Path(d).name if Path(d).name not in ("final", "best") else "/".join(Path(d).parts[-2:]): d
                   for d in a.draft})
    report = [f"# bench-real: SmolLM2-135M-Instruct (30 layers) and its drafts; {machine()}; commit {commit()}; "
              f"{'--quick ' if a.quick else ''}{cfg}\n"]
    print(report[0], flush=True)
    if "1" in a.sections:
        source, path = models.preset_data(PRESET, TASK)
        prompts = data.task_prompts(TASK, tok, split="eval", n=cfg.decode_prompts, source=source, path=path)
        report.append("## 1. speculative decoding, batch 1: ours vs HF assisted generation vs the target's "
                      "generate\n\n" + bench_decoding(cfg, target_dir, drafts, prompts, tok))
        print(report[-1], flush=True)
    if "2" in a.sections:
        report.append("## 2. the training step: distill.py vs TRL (each loop in its own process)\n\n"
                      + bench_loops(cfg))
        print(report[-1], flush=True)
    if "3" in a.sections:
        report.append("## 3. one distill.py step by phase (baseline draft)\n\n"
                      + bench_phases(cfg, target_dir, baseline_dir, tok))
        print(report[-1], flush=True)
    if a.out:
        Path(a.out).write_text("\n".join(report))


if __name__ == "__main__":
    main()
