"""Training throughput and peak memory: our loop (distill.py) vs TRL's GKDTrainer, same work, side by side.

Same tiny pair, same prompts (the task's chat-templated train prompts), same batch size, same
generation length and sampling temperature, same divergence (reverse KL: TRL beta = 1, ours --div rkl),
purely on-policy (lmbda = 1), the same number of optimizer steps. Each side runs in its own fresh
process so that its peak memory is its own:

    completion tokens / s   completion tokens trained on / wall time of the training steps (sampling,
                            teacher + student forwards, backward, optimizer; the first step is warm-up
                            and not counted; model loading and checkpoint writing are not counted)
    peak memory             CUDA: torch.cuda.max_memory_allocated (models included); CPU: the process's
                            peak RSS, and its growth over the RSS at the first sampling call (the
                            training's own share: activations, logits, gradients, optimizer state)

TRL is a test/benchmark-only dependency: only this file and tests/ import it.
Run:  python bench/bench_train.py [--task gsm8k] [--steps 6] [--batch-size 8] [--max-new-tokens 64] [--scale full|test]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def rss_mib() -> float:
    """Current resident set size of this process (Linux), MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # Linux: KiB


def run_ours(a, teacher, student, out) -> dict:
    import torch
    import distill
    mark = {}
    real_generate = distill.specdec.autoregressive_generate

    def marking_generate(*args, **kw):                 # the first sampling call = the start of training
        mark.setdefault("rss", rss_mib())
        return real_generate(*args, **kw)

    distill.specdec.autoregressive_generate = marking_generate
    distill.main(["--task", a.task, "--div", "rkl", "--teacher", teacher, "--student", student, "--out", out,
                  "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--max-new-tokens", str(a.max_new_tokens),
                  "--temperature", str(a.temperature), "--lr", "1e-4", "--warmup", "0", "--save-every", "100000",
                  "--n-train", str(a.steps * a.batch_size), "--threads", str(torch.get_num_threads())])
    rows = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")][1:]       # drop the warm-up step
    tokens = sum(r["completion_len"] * a.batch_size for r in rows)
    seconds = sum(r["completion_len"] * a.batch_size / r["tokens_per_s"] for r in rows)
    return {"tokens": tokens, "seconds": seconds, "rss_before_mib": mark["rss"]}


def run_trl(a, teacher, student, out) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer
    import data
    import models

    t_model, s_model, tok = models.load_pair(teacher, student)
    s_model.float().train()
    examples = data.load_examples(a.task, "train", n=a.steps * a.batch_size, tokenizer=tok)
    rows = [{"messages": data.chat_messages(a.task, ex) + [{"role": "assistant", "content": ex.reference}]}
            for ex in examples]
    cfg = GKDConfig(output_dir=out, beta=1.0, lmbda=1.0, temperature=a.temperature, max_new_tokens=a.max_new_tokens,
                    per_device_train_batch_size=a.batch_size, max_steps=a.steps, learning_rate=1e-4,
                    lr_scheduler_type="constant", warmup_steps=0, report_to=[], save_strategy="no",
                    logging_strategy="no", use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available(),
                    max_length=4096, dataloader_drop_last=True)
    trainer = GKDTrainer(model=s_model, teacher_model=t_model, args=cfg, train_dataset=Dataset.from_list(rows),
                         processing_class=tok)
    trainer.generation_config.eos_token_id = models.stop_ids(tok)

    counted = {"tokens": 0, "seconds": 0.0, "step": 0}
    real_generate = GKDTrainer.generate_on_policy_outputs

    def counting_generate(model, inputs, generation_config):
        counted.setdefault("rss", rss_mib())           # the first sampling call = the start of training
        ids, attn, labels = real_generate(model, inputs, generation_config)
        counted["last_tokens"] = int((labels != -100).sum())
        return ids, attn, labels

    trainer.generate_on_policy_outputs = counting_generate

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            counted["t0"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            counted["step"] += 1
            if counted["step"] > 1:                                   # the first step is warm-up
                counted["seconds"] += time.perf_counter() - counted["t0"]
                counted["tokens"] += counted["last_tokens"]

    trainer.add_callback(Timer())
    trainer.train()
    return {"tokens": counted["tokens"], "seconds": counted["seconds"], "rss_before_mib": counted["rss"]}


def child(a):
    import torch
    torch.manual_seed(0)
    import models
    root = models.ensure_tiny_pair(a.task, scale=a.scale) if a.scale != "full" else models.ensure_tiny_pair(a.task)
    teacher, student = str(Path(root) / "teacher"), str(Path(root) / "student")
    with tempfile.TemporaryDirectory() as out:
        res = (run_ours if a.side == "ours" else run_trl)(a, teacher, student, out)
    res["peak_rss_mib"] = peak_rss_mib()
    if torch.cuda.is_available():
        res["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(res), flush=True)


def run_sides(command_of) -> dict:
    """Run each loop ("ours", "trl") in a fresh process (command_of(side) -> argv) and collect the JSON
    after its "RESULT " line: each side's peak memory is then its own."""
    results = {}
    for side in ("ours", "trl"):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run(command_of(side), capture_output=True, text=True, env=env, cwd=REPO)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"{side} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        results[side] = json.loads(line[-1][7:])
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description="our training loop vs TRL GKDTrainer: tokens/s and peak memory")
    p.add_argument("--task", default="gsm8k")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--scale", default="full", help="tiny pair size: full (make models) or test")
    p.add_argument("--side", default=None, help=argparse.SUPPRESS)   # internal: run one side in this process
    a = p.parse_args(argv)
    if a.side:
        return child(a)
    results = run_sides(lambda side: [sys.executable, __file__, "--side", side] + list(argv or sys.argv[1:]))
    names = {"ours": "distill.py (ours)", "trl": "TRL GKDTrainer"}
    print(f"\n{a.task} tiny pair ({a.scale}), batch {a.batch_size}, max_new_tokens {a.max_new_tokens}, "
          f"T {a.temperature}, rkl, {a.steps} steps (first = warm-up)\n")
    cuda = "peak_cuda_mib" in results["ours"]
    print("| loop | completion tokens | seconds | completion tokens/s | peak RSS (MiB) | RSS growth in training (MiB) |"
          + (" peak CUDA (MiB) |" if cuda else ""))
    print("|---|---|---|---|---|---|" + ("---|" if cuda else ""))
    for side, r in results.items():
        print(f"| {names[side]} | {r['tokens']:.0f} | {r['seconds']:.2f} | {r['tokens'] / r['seconds']:.1f} | "
              f"{r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] - r['rss_before_mib']:.0f} |"
              + (f" {r['peak_cuda_mib']:.0f} |" if cuda else ""))
    return results


if __name__ == "__main__":
    main()
