"""Benchmark: the cost of the acceptance objectives (nla, lk) and of the train_alpha statistic in the loss sweep.

divergences.divergence_sum forward + backward into float32 student logits (positions, V) at Qwen's vocabulary,
per kind: alone, with return_teacher_entropy (what distill.py asked for before issue 21), and with
return_alpha too (what it asks for every step now: train_alpha).
lk makes a first, values-only pass over the blocks for its w (the call's mean alpha): its extra cost is that pass.
Time = the best of --repeats runs, in one process (inputs allocated once; every case computes the same shape).

    .venv/bin/python bench/bench_objectives.py [--positions 512] [--vocab 151936] [--repeats 3]
"""
import argparse
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/

import torch  # noqa: E402

import divergences  # noqa: E402


from bench_paper import best as best_time  # noqa: E402  (minimum wall time of `repeats` calls)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--positions", type=int, default=512)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kinds", nargs="+", default=["rkl", "fkl", "tvd", "nla", "lk"])
    a = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    student = torch.randn(a.positions, a.vocab, generator=g) * 4
    teacher = torch.randn(a.positions, a.vocab, generator=g) * 4
    mask = torch.ones(a.positions, dtype=torch.bool)

    def step(kind, entropy=False, alpha=False):
        x = student.clone().requires_grad_()
        out = divergences.divergence_sum(x, teacher, mask, divergences.Divergence(kind, temperature=0.6),
                                         return_teacher_entropy=entropy, return_alpha=alpha)
        out.total.backward()

    print(f"{a.positions} positions x V = {a.vocab}, float32, T 0.6, {torch.get_num_threads()} threads, "
          f"{platform.machine()}, best of {a.repeats}\n")
    print("| kind | loss + backward (s) | + teacher entropy (s) | + entropy + train_alpha (s) | alpha's extra |")
    print("|---|---:|---:|---:|---:|")
    for kind in a.kinds:
        plain = best_time(lambda: step(kind), a.repeats)
        ent = best_time(lambda: step(kind, entropy=True), a.repeats)
        both = best_time(lambda: step(kind, entropy=True, alpha=True), a.repeats)
        print(f"| {kind} | {plain:.3f} | {ent:.3f} | {both:.3f} | {100 * (both / ent - 1):+.0f}% |", flush=True)


if __name__ == "__main__":
    main()
