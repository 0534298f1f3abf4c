"""Benchmark: our generalized_jsd_loss against TRL's, forward + backward, at Qwen's vocabulary.

Both losses get the same float32 logits (positions, V) and compute batchmean over all positions, then
backward into the student logits. Each (implementation, beta) case runs in a fresh Python process, so that
one case's freed memory cannot hide another's peak:

    peak extra memory = peak resident memory (VmHWM) during loss + backward  -  resident memory just before
                        (inputs already allocated), so the student gradient (one (N, V) tensor) counts for both;
    time              = wall clock of loss + backward (the best of --repeats runs).

Values: the printed losses and gradient norms of the two implementations must agree (relative differences
are printed). TRL is the reference here, as in the tests; nothing outside bench/ and tests/ imports it.

    .venv/bin/python bench/bench_loss.py                    # 2048 positions x 151936, beta 0 / 0.5 / 1
    .venv/bin/python bench/bench_loss.py --positions 1024   # on a machine with less than ~21 GiB free:
                                                            # TRL's JSD holds 15 (N, V) float32 tensors at its
                                                            # peak (17.4 GiB at N = 2048), plus the inputs
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_bytes(field):
    """VmRSS (current) or VmHWM (peak) of this process, in bytes, from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status (Linux only)")


def reset_peak():
    """Make VmHWM start again from the current resident size (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker(impl, beta, positions, vocab, repeats, chunk_size, seed, temperature=1.0):
    """One case in this process: returns a dict with peak extra bytes, seconds, loss and gradient norm."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch

    sys.path.insert(0, ROOT)
    if impl == "trl":
        from trl.experimental.gkd import GKDTrainer

        def loss_fn(s, t):
            return GKDTrainer.generalized_jsd_loss(s, t, beta=beta, temperature=temperature,
                                                   reduction="batchmean")
    else:
        from divergences import generalized_jsd_loss

        def loss_fn(s, t):
            return generalized_jsd_loss(s, t, beta=beta, temperature=temperature, reduction="batchmean",
                                        chunk_size=chunk_size)

    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(positions, vocab, generator=gen).mul_(2.0).requires_grad_()  # (N, V)
    teacher = torch.randn(positions, vocab, generator=gen).mul_(2.0)  # (N, V)
    times, peak = [], None
    for _ in range(repeats):
        student.grad = None
        reset_peak()
        before = rss_bytes("VmRSS")
        start = time.perf_counter()
        loss = loss_fn(student, teacher)
        loss.backward()
        times.append(time.perf_counter() - start)
        extra = rss_bytes("VmHWM") - before
        peak = extra if peak is None else max(peak, extra)
    return {"impl": impl, "beta": beta, "peak_extra_bytes": peak, "seconds": min(times),
            "loss": loss.item(), "grad_norm": student.grad.norm().item(), "threads": torch.get_num_threads()}


def run_case(impl, beta, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--beta", str(beta),
           "--positions", str(args.positions), "--vocab", str(args.vocab), "--repeats", str(args.repeats),
           "--seed", str(args.seed), "--temperature", str(args.temperature)] + (
               ["--chunk-size", str(args.chunk_size)] if args.chunk_size else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--positions", type=int, default=2048,
                   help="B * T positions (rows of the logits); 2048 needs ~21 GiB free for TRL's JSD")
    p.add_argument("--vocab", type=int, default=151936, help="vocabulary size V (Qwen's lm_head width)")
    p.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    p.add_argument("--repeats", type=int, default=1, help="runs per case; time is the best, memory the worst")
    p.add_argument("--chunk-size", type=int, default=None, help="our positions per block (default: ~4M logits)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0, help="loss temperature of both (default 1)")
    p.add_argument("--impls", nargs="+", choices=["trl", "ours"], default=["trl", "ours"],
                   help="which implementations to run (ours alone: e.g. to compare two versions of it)")
    p.add_argument("--worker", choices=["trl", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--beta", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.beta, args.positions, args.vocab, args.repeats,
                                args.chunk_size, args.seed, args.temperature)))
        return
    if args.impls != ["trl", "ours"]:  # one implementation: its numbers, no ratios
        print(f"{' '.join(args.impls)} only, {args.positions} x {args.vocab}, temperature {args.temperature}")
        for beta in args.betas:
            for impl in args.impls:
                r = run_case(impl, beta, args)
                print(f"  {impl} beta={beta:.2f}: peak extra {r['peak_extra_bytes'] / 2**30:.2f} GiB, "
                      f"{r['seconds']:.2f} s, loss {r['loss']:.6f}, grad norm {r['grad_norm']:.6e}")
        return

    full = args.positions * args.vocab * 4 / 2**30
    print(f"generalized_jsd_loss, forward + backward, float32 logits ({args.positions} x {args.vocab}, "
          f"one such tensor = {full:.2f} GiB), batchmean, temperature {args.temperature}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    header = (f"{'beta':>5} | {'TRL peak GiB':>12} {'ours peak GiB':>13} {'ratio':>6} | {'TRL s':>7} {'ours s':>7} "
              f"{'ratio':>6} | {'loss (TRL)':>12} {'rel diff':>8} {'grad rel':>8}")
    rows = []
    for beta in args.betas:
        trl, ours = run_case("trl", beta, args), run_case("ours", beta, args)
        rows.append((beta, trl, ours))
        print(f"  done beta={beta}: TRL {trl['seconds']:.2f} s, ours {ours['seconds']:.2f} s", file=sys.stderr)
    print(f"torch threads: {rows[0][1]['threads']}")
    print(header)
    print("-" * len(header))
    for beta, trl, ours in rows:
        gib = lambda r: r["peak_extra_bytes"] / 2**30  # noqa: E731
        rel = abs(ours["loss"] - trl["loss"]) / max(abs(trl["loss"]), 1e-30)
        grel = abs(ours["grad_norm"] - trl["grad_norm"]) / max(abs(trl["grad_norm"]), 1e-30)
        print(f"{beta:>5.2f} | {gib(trl):>12.2f} {gib(ours):>13.2f} {gib(ours) / gib(trl):>6.3f} | "
              f"{trl['seconds']:>7.2f} {ours['seconds']:>7.2f} {ours['seconds'] / trl['seconds']:>6.3f} | "
              f"{trl['loss']:>12.6f} {rel:>8.1e} {grel:>8.1e}")


if __name__ == "__main__":
    main()
