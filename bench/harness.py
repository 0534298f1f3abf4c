"""Pieces the training benchmarks share (bench_train.py, bench_paper.py, bench_real.py): memory readings, the
"each loop in its own process" harness, our loop and TRL's GKDTrainer as one side each, and the phase profiler
of one distill.py step.

    rss_mib / peak_rss_mib   this process's resident set now / at its peak (Linux), MiB
    run_sides                run each side in a fresh process and collect the JSON of its "RESULT " line
    run_ours / run_trl       one side: distill.main or GKDTrainer on a pair, timing the steps after the first
    step_phases              one distill.py step split into its phases, timed with distill.py's own functions

A side's options object `a` carries task, steps, batch_size, max_new_tokens, temperature and, optionally,
preset (default "tiny"): the preset whose data (source, path) and stop tokens both loops use.
TRL is a test/benchmark-only dependency: only bench/ and tests/ import it.
"""
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def rss_mib() -> float:
    """Current resident set size of this process (Linux), MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # Linux: KiB


def run_sides(command_of, sides=("ours", "trl"), optional=()) -> dict:
    """Run each side in a fresh process (command_of(side) -> argv) and collect the JSON after its "RESULT "
    line: each side's peak memory is then its own. A failed side stops the benchmark, unless it is in
    `optional`: then its result is {"error": the last line it printed}."""
    results = {}
    for side in sides:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run(command_of(side), capture_output=True, text=True, env=env, cwd=REPO)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            if side in optional:
                last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
                results[side] = {"error": last[:300]}
                continue
            sys.exit(f"{side} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        results[side] = json.loads(line[-1][7:])
    return results


def preset_of(a) -> str:
    return getattr(a, "preset", None) or "tiny"


def train_rows(a, tokenizer) -> list[dict]:
    """The first steps * batch_size train examples of the preset's data, as TRL's conversational rows."""
    import data
    import models
    source, path = models.preset_data(preset_of(a), a.task)
    examples = data.load_examples(a.task, "train", source=source, path=path, n=a.steps * a.batch_size,
                                  tokenizer=tokenizer)
    return [{"messages": data.chat_messages(a.task, ex) + [{"role": "assistant", "content": ex.reference}]}
            for ex in examples]


def run_ours(a, teacher, student, out) -> dict:
    """distill.main on the pair, purely on-policy (lmbda 1), reverse KL; -> completion tokens and seconds of the
    steps after the first, and the RSS at the first sampling call (the start of training)."""
    import torch
    import distill
    mark = {}
    real_generate = distill.specdec.autoregressive_generate

    def marking_generate(*args, **kw):                 # the first sampling call = the start of training
        mark.setdefault("rss", rss_mib())
        return real_generate(*args, **kw)

    distill.specdec.autoregressive_generate = marking_generate
    distill.main(["--task", a.task, "--preset", preset_of(a), "--div", "rkl", "--lmbda", "1",
                  "--teacher", teacher, "--student", student, "--out", out,
                  "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--max-new-tokens", str(a.max_new_tokens),
                  "--temperature", str(a.temperature), "--lr", "1e-4", "--warmup", "0", "--save-every", "100000",
                  "--n-train", str(a.steps * a.batch_size), "--threads", str(torch.get_num_threads())])
    rows = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")][1:]       # drop the warm-up step
    tokens = sum(r["completion_len"] * a.batch_size for r in rows)
    seconds = sum(r["completion_len"] * a.batch_size / r["tokens_per_s"] for r in rows)
    return {"tokens": tokens, "seconds": seconds, "rss_before_mib": mark["rss"]}


class StepTimer:
    """A transformers TrainerCallback factory: seconds and completion tokens of every step after the first.
    `counted["last_tokens"]` must be set by the side's generation wrapper during each step."""

    def __init__(self):
        self.counted = {"tokens": 0, "seconds": 0.0, "step": 0}

    def callback(self):
        from transformers import TrainerCallback
        counted = self.counted

        class Timer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                counted["t0"] = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                counted["step"] += 1
                if counted["step"] > 1:                                   # the first step is warm-up
                    counted["seconds"] += time.perf_counter() - counted["t0"]
                    counted["tokens"] += counted["last_tokens"]
        return Timer()

    def result(self) -> dict:
        c = self.counted
        return {"tokens": c["tokens"], "seconds": c["seconds"], "rss_before_mib": c["rss"]}


def run_trl(a, teacher, student, out) -> dict:
    """TRL's GKDTrainer on the pair: beta 1 (reverse KL), lmbda 1 (on-policy), same batch, lengths, temperature,
    learning rate and stop ids as run_ours."""
    import torch
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer
    import models

    t_model, s_model, tok = models.load_pair(teacher, student)
    s_model.float().train()
    cfg = GKDConfig(output_dir=out, beta=1.0, lmbda=1.0, temperature=a.temperature, max_new_tokens=a.max_new_tokens,
                    per_device_train_batch_size=a.batch_size, max_steps=a.steps, learning_rate=1e-4,
                    lr_scheduler_type="constant", warmup_steps=0, report_to=[], save_strategy="no",
                    logging_strategy="no", use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available(),
                    max_length=4096, dataloader_drop_last=True)
    trainer = GKDTrainer(model=s_model, teacher_model=t_model, args=cfg,
                         train_dataset=Dataset.from_list(train_rows(a, tok)), processing_class=tok)
    trainer.generation_config.eos_token_id = models.generation_stop_ids(
        tok, t_model, models.preset_config(preset_of(a), a.task)["stop_tokens"])

    timer = StepTimer()
    real_generate = GKDTrainer.generate_on_policy_outputs

    def counting_generate(model, inputs, generation_config):
        timer.counted.setdefault("rss", rss_mib())     # the first sampling call = the start of training
        ids, attn, labels = real_generate(model, inputs, generation_config)
        timer.counted["last_tokens"] = int((labels != -100).sum())
        return ids, attn, labels

    trainer.generate_on_policy_outputs = counting_generate
    trainer.add_callback(timer.callback())
    trainer.train()
    return timer.result()


def step_phases(teacher, student, prompts, *, new_tokens: int, repeats: int, vocab_size: int, pad_id: int,
                div: str = "rkl", temperature: float = 0.6, top_p: float = 0.95) -> tuple[dict, int]:
    """One distill.py step by its phases, with distill.py's own functions (as its loop calls them): sampling
    (the student, exactly new_tokens per row, no stop id), teacher forward, student forward, loss (with the
    logged teacher entropy), backward, optimizer. Models as distill.py holds them: teacher frozen, student
    float32 in train mode. -> (mean seconds of each phase over `repeats` steps after one warm-up step,
    completion tokens per step)."""
    import torch
    import data
    import divergences
    import models
    import specdec
    teacher.eval().requires_grad_(False)
    student.float().train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    phases = {k: [] for k in ("sampling", "teacher forward", "student forward", "loss + logged teacher entropy",
                              "backward", "optimizer")}
    tokens = 0
    for step in range(repeats + 1):
        t = time.perf_counter

        def lap(name, t0):
            if step:                                            # step 0 is warm-up
                phases[name].append(t() - t0)
            return t()

        t0 = t()
        student.eval()
        with torch.no_grad():
            c = specdec.autoregressive_generate(student, prompts, max_new_tokens=new_tokens, temperature=temperature,
                                                top_p=top_p, eos_token_id=[], seed=step, vocab_size=vocab_size).tokens
        student.train()
        b = data.build_batch(prompts, c, pad_id)
        mask = b["loss_mask"][:, b["prompt_width"]:]
        t0 = lap("sampling", t0)
        with torch.no_grad():
            t_hidden = models.teacher_hidden(teacher, b)                # (B, C, H_t): no logits
        t0 = lap("teacher forward", t0)
        s_hidden = models.completion_hidden(student, b)                 # (B, C, H_s)
        t0 = lap("student forward", t0)
        div_sum, _, _ = divergences.hidden_divergence_sum(               # as distill.train: lm_heads fused in
            (s_hidden, models.lm_head_weight(student)), (t_hidden, models.lm_head_weight(teacher)), mask,
            divergences.Divergence(div, 0.5, temperature), vocab_size=vocab_size, return_teacher_entropy=True)
        loss = div_sum / mask.sum()
        t0 = lap("loss + logged teacher entropy", t0)
        loss.backward()
        t0 = lap("backward", t0)
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lap("optimizer", t0)
        tokens = int(mask.sum())
        del t_hidden, s_hidden, loss, div_sum
    return {k: sum(v) / len(v) for k, v in phases.items()}, tokens


def phase_table(mean: dict, tokens: int) -> str:
    """step_phases' result as a markdown table: seconds and share of each phase, the step's total."""
    total = sum(mean.values())
    lines = ["| phase | seconds | share |", "|---|---|---|"]
    lines += [f"| {k} | {v:.3f} | {v / total:.0%} |" for k, v in mean.items()]
    lines.append(f"| **step** | **{total:.3f}** | {tokens / total:.1f} completion tokens/s |")
    return "\n".join(lines)
