"""Benchmark: the teacher entropy distill.py logs per step (loss_teacher_entropy), at Qwen's vocabulary.

Side by side in one process, forward + backward of divergence_sum (rkl, float32 logits (N, V), a mask):
    loss              divergence_sum alone;
    loss + in-sweep H divergence_sum(..., return_teacher_entropy=True): H(p_T) from the loss's own log-probs;
    loss + re-read H  the removed distill.entropy_sum: copy the masked teacher rows, then log_probs and
                      -sum p log p in blocks of 1024 rows (a second pass over the teacher logits).
Prints the best-of-`--repeats` seconds of each and the ratios to `loss`, and checks the two entropies agree.

    .venv/bin/python bench/bench_entropy_log.py [--positions 512] [--vocab 151936]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import divergences  # noqa: E402


def reread_entropy_sum(logits, mask, temperature, rows=1024):
    """distill.entropy_sum as it was before the entropy moved into the loss sweep."""
    total = 0.0
    for block in logits[mask].split(rows):  # (N, V) copy of the masked rows first
        t = divergences.log_probs(block, temperature)  # (rows, V)
        total += float(-(t.exp() * t).sum())  # the plain formula the removed function used
    return total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--positions", type=int, default=512)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    student = (torch.randn(args.positions, args.vocab, generator=g) * 3).requires_grad_()  # (N, V)
    teacher = torch.randn(args.positions, args.vocab, generator=g) * 3  # (N, V)
    mask = torch.rand(args.positions, generator=g) < 0.8  # (N,)
    T = args.temperature
    rkl = divergences.Divergence("rkl", temperature=T)

    def loss_only():
        divergences.divergence_sum(student, teacher, mask, rkl).total.backward()

    def in_sweep():
        total, h, _ = divergences.divergence_sum(student, teacher, mask, rkl, return_teacher_entropy=True)
        total.backward()
        return float(h)

    def reread():
        loss_only()
        return reread_entropy_sum(teacher, mask, T)

    cases = {"loss": loss_only, "loss + in-sweep H": in_sweep, "loss + re-read H": reread}
    best = {k: float("inf") for k in cases}
    for _ in range(args.repeats):  # interleaved, so load changes hit every case alike
        for name, fn in cases.items():
            student.grad = None
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    h_new, h_old = in_sweep(), reread()
    print(f"divergence_sum rkl, forward + backward, {args.positions} x {args.vocab} float32, T {T}, "
          f"best of {args.repeats}, {torch.get_num_threads()} threads")
    for name, s in best.items():
        print(f"  {name:<18} {s:7.3f} s   ratio to loss {s / best['loss']:.3f}")
    rel = abs(h_new - h_old) / h_old
    print(f"  entropy sums: in-sweep {h_new:.6f}, re-read {h_old:.6f}, rel diff {rel:.1e}")


if __name__ == "__main__":
    main()
