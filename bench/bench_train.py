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

Both sides, the memory readings and the process harness are bench/harness.py's (bench_paper.py and
bench_real.py use them too). TRL is a test/benchmark-only dependency: only bench/ and tests/ import it.
Run:  python bench/bench_train.py [--task gsm8k] [--steps 6] [--batch-size 8] [--max-new-tokens 64] [--scale full|test]
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

from harness import peak_rss_mib, run_ours, run_sides, run_trl   # bench/ is this script's folder


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
