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

--suite fused (issue 23; `make bench-loss` runs both suites): the loss from hidden states, at the paper's
widths (student hidden 1024 = Qwen3-0.6B, teacher 2560 = Qwen3-4B, V = 151936), N = 1024 and 4096 tokens,
float32 and bfloat16 inputs (hidden states and lm_head weights), forward KL at T 0.6, gradients for the
student's hidden states AND head. Four implementations, each case in a fresh process:

    fused        divergences.hidden_divergence_sum (projects a block of positions at a time in float32)
    logits       the old loop: logits = hidden @ head^T in the inputs' dtype (bf16 inputs -> bf16 logits, as a
                 bf16 lm_head returns them), then divergences.divergence_sum
    trl-chunked  trl.kernels.chunked_divergence.ChunkedDivergenceFunction (TRL's DistillationTrainer kernel)
    trl-gkd      the same logits, then GKDTrainer.generalized_jsd_loss (not run where its ~15 (N, V) float32
                 temporaries cannot fit: N = 4096 needs ~37 GiB)

The inputs put the distributions close (KL ~ 5e-6 nats per token: where a good draft lives): the student's
head is the teacher's first 1024 columns and its hidden states the teacher's first 1024 entries, so the
logits differ only by the teacher's small remaining 1536 entries (exact in bf16 too). The relative error
of each loss is against the float64 computation from the same (upcast) values.
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
    cmd = [sys.executable, os.path.abspath(__file__), "--suite", "logits", "--worker", impl, "--beta", str(beta),
           "--positions", str(args.positions), "--vocab", str(args.vocab), "--repeats", str(args.repeats),
           "--seed", str(args.seed), "--temperature", str(args.temperature)] + (
               ["--chunk-size", str(args.chunk_size)] if args.chunk_size else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ --suite fused
FUSED_IMPLS = ("fused", "logits", "trl-chunked", "trl-gkd")


def hidden_inputs(positions, vocab, h_s, h_t, dtype, tail, seed):
    """(student hidden (N, H_s), student head (V, H_s), teacher hidden (N, H_t), teacher head (V, H_t)) in
    `dtype`: logits of std ~4; the student is the teacher without its last H_t - H_s hidden entries, which
    are scaled by `tail` (the only difference between the two models' logits)."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    t_head = (torch.randn(vocab, h_t, generator=gen) * (4 / h_s**0.5)).to(dtype)  # (V, H_t)
    t_hidden = torch.randn(positions, h_t, generator=gen)  # (N, H_t)
    t_hidden[:, h_s:] *= tail
    t_hidden = t_hidden.to(dtype)
    s_head = t_head[:, :h_s].contiguous()  # (V, H_s)
    s_hidden = t_hidden[:, :h_s].contiguous()  # (N, H_s)
    return s_hidden, s_head, t_hidden, t_head


def fused_worker(impl, a):
    """One case in this process: peak extra bytes, seconds, mean loss per token (or the float64 reference)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch

    sys.path.insert(0, ROOT)
    import divergences

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[a.dtype]
    s_h, s_w, t_h, t_w = hidden_inputs(a.positions, a.vocab, a.h_student, a.h_teacher, dtype, a.tail, a.seed)
    beta, temp, n = a.beta, a.temperature, a.positions
    kind = "fkl" if beta == 0 else "rkl" if beta == 1 else "jsd"
    divergence = divergences.Divergence(kind, beta, temp)
    if impl == "float64":  # the reference: the same values, upcast; value only
        with torch.no_grad():
            loss = divergences.hidden_divergence_sum((s_h.double(), s_w.double()), (t_h.double(), t_w.double()),
                                                     None, divergence).total / n
        return {"impl": impl, "loss": loss.item()}

    def run(s_h, s_w, t_h, t_w):
        n = s_h.shape[0]
        if impl == "fused":
            return divergences.hidden_divergence_sum((s_h, s_w), (t_h, t_w), None, divergence).total / n
        if impl == "trl-chunked":
            from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
            per_token, _entropy = ChunkedDivergenceFunction.apply(s_h, s_w, None, t_h, t_w, None, beta, temp)
            return per_token.mean()
        s_logits = s_h @ s_w.t()  # (N, V) in the inputs' dtype, as the lm_head returns it
        with torch.no_grad():
            t_logits = t_h @ t_w.t()  # (N, V)
        if impl == "logits":
            return divergences.divergence_sum(s_logits, t_logits, None, divergence).total / n
        from trl.experimental.gkd import GKDTrainer
        return GKDTrainer.generalized_jsd_loss(s_logits, t_logits, beta=beta, temperature=temp, reduction="batchmean")

    s_h.requires_grad_(), s_w.requires_grad_()
    run(s_h[:8], s_w, t_h[:8], t_w).backward()  # warm-up on 8 positions: first-call costs (imports) not counted
    times, peak = [], None
    for _ in range(a.repeats):
        s_h.grad = s_w.grad = None
        reset_peak()
        before = rss_bytes("VmRSS")
        start = time.perf_counter()
        loss = run(s_h, s_w, t_h, t_w)
        loss.backward()
        times.append(time.perf_counter() - start)
        extra = rss_bytes("VmHWM") - before
        peak = extra if peak is None else max(peak, extra)
        value = loss.item()
        del loss
    return {"impl": impl, "peak_extra_bytes": peak, "seconds": min(times), "loss": value,
            "grad_hidden_norm": s_h.grad.float().norm().item(), "grad_head_norm": s_w.grad.float().norm().item(),
            "threads": torch.get_num_threads()}


def run_fused_case(impl, positions, dtype, a):
    cmd = [sys.executable, os.path.abspath(__file__), "--suite", "fused", "--worker", impl, "--positions",
           str(positions), "--dtype", dtype, "--vocab", str(a.vocab), "--h-student", str(a.h_student),
           "--h-teacher", str(a.h_teacher), "--beta", str(a.beta), "--temperature", str(a.temperature),
           "--tail", str(a.tail), "--repeats", str(a.repeats), "--seed", str(a.seed)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def gkd_fits(positions, vocab, free_bytes):
    """TRL's generalized_jsd_loss holds ~15 (N, V) float32 tensors at its peak (measured: 17.4 GiB at 2048)."""
    return 15 * positions * vocab * 4 < 0.8 * free_bytes


def main_fused(a):

    print(f"loss from hidden states, forward + backward (grads for the student's hidden states and head), V = "
          f"{a.vocab}, hidden {a.h_student} / {a.h_teacher}, {'fkl' if a.beta == 0 else f'beta {a.beta}'}, "
          f"T {a.temperature}, tail {a.tail}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    rows = []
    for positions in a.positions_list:
        for dtype in a.dtypes:
            ref = run_fused_case("float64", positions, dtype, a)["loss"]
            for impl in a.impls:
                if impl == "trl-gkd" and not gkd_fits(positions, a.vocab, free):
                    rows.append((positions, dtype, impl, None, ref))
                    print(f"  skip {impl} N={positions}: needs ~{15 * positions * a.vocab * 4 / 2**30:.0f} GiB",
                          file=sys.stderr)
                    continue
                r = run_fused_case(impl, positions, dtype, a)
                rows.append((positions, dtype, impl, r, ref))
                print(f"  done N={positions} {dtype} {impl}: {r['seconds']:.1f} s, "
                      f"{r['peak_extra_bytes'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    print(f"torch threads: {next(r for *_, r, _ in rows if r)['threads']}")
    print("| N | inputs | implementation | peak extra GiB | x TRL chunked | seconds | x TRL chunked | "
          "loss per token | rel. error vs float64 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for positions, dtype, impl, r, ref in rows:
        base = next((x for p, d, i, x, _ in rows if (p, d, i) == (positions, dtype, "trl-chunked")), None)
        if r is None:
            print(f"| {positions} | {dtype} | {impl} | not run (~{15 * positions * a.vocab * 4 / 2**30:.0f} GiB) "
                  f"| | | | | |")
            continue
        gib = r["peak_extra_bytes"] / 2**30
        mem = f"{r['peak_extra_bytes'] / base['peak_extra_bytes']:.2f}" if base else ""
        sec = f"{r['seconds'] / base['seconds']:.2f}" if base else ""
        err = abs(r["loss"] - ref) / abs(ref)
        print(f"| {positions} | {dtype} | {impl} | {gib:.2f} | {mem} | {r['seconds']:.1f} | {sec} | "
              f"{r['loss']:.4e} | {err:.1e} |")
    return rows


def main(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    if "--suite" in argv and argv[argv.index("--suite") + 1] == "logits":
        return logits_cli(argv)
    return fused_cli(argv)


def fused_cli(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=["fused", "logits"])
    p.add_argument("--positions", dest="positions_list", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"])
    p.add_argument("--impls", nargs="+", choices=FUSED_IMPLS, default=list(FUSED_IMPLS))
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--h-student", type=int, default=1024)
    p.add_argument("--h-teacher", type=int, default=2560)
    p.add_argument("--beta", type=float, default=0.0, help="0 = forward KL (default), 1 = reverse KL, else JSD")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--tail", type=float, default=6e-4, help="scale of the teacher's extra hidden entries "
                                                           "(sets the KL: 6e-4 gives ~5e-6 nats per token)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", choices=FUSED_IMPLS + ("float64",), help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        a.positions = a.positions_list[0]
        print(json.dumps(fused_worker(a.worker, a)))
        return None
    return main_fused(a)


# ----------------------------------------------------------------------------------- --suite logits
def logits_cli(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=["fused", "logits"])
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
