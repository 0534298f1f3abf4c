"""How many CPU threads, and which OpenMP wait policy, survive a competing process?

The unit of work: processing + sampling one token of 4 rows at the real vocabulary V = 151936
(specdec.process_logits at temperature 0.6, top-p 0.95, then specdec.sample), the O(V) part of every
decoding step. Each configuration runs in its own fresh process (the OpenMP wait policy is read once, when
libgomp loads with torch), `--reps` calls after a warm-up, median and 90th percentile in ms.

Configurations:   1 thread | 2 threads (libgomp's default wait policy: spin, then sleep) |
                  2 threads with OMP_WAIT_POLICY=passive (idle threads sleep at once)
Competitors:      none | one single-threaded busy loop | one 2-thread torch matmul loop
Every configuration is measured once per round, in turns, for `--rounds` rounds, so all see the same
machine load; the table gives the median over rounds of each run's median.

With --train the unit is instead a few steps of `distill.py` on the offline tiny gsm8k pair (rkl, the
preset's batch and lengths, --steps 6): completion tokens/s of steps 2-6 from its metrics.jsonl, i.e.
what `make train` gets (sampling, both forwards, backward, optimizer).

Run:  flock /tmp/heavy.lock python bench/bench_threads.py [--rounds 3] [--reps 60] [--train]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, sys, time
import torch
sys.path.insert(0, {repo!r})
import specdec
from plumbing.cpu_memory import reuse_freed_memory
threads, reps = {threads}, {reps}
torch.set_num_threads(threads)
reuse_freed_memory()
g = torch.Generator().manual_seed(0)
logits = torch.randn(4, 151936, generator=g) * 3                      # (4, V)
times = []
for i in range(reps + 5):
    t0 = time.perf_counter()
    probs = specdec.process_logits(logits, 0.6, 0, 0.95)              # (4, V)
    specdec.sample(probs, generator=g)                                # (4,)
    if i >= 5:
        times.append(time.perf_counter() - t0)
times.sort()
print(json.dumps({{"median_ms": 1e3 * times[len(times) // 2], "p90_ms": 1e3 * times[int(len(times) * 0.9)]}}))
"""

COMPETITORS = {
    "none": None,
    "busy loop (1 thread)": "while True: pass",
    "torch matmul (2 threads)": ("import torch\ntorch.set_num_threads(2)\na = torch.randn(512, 512)\n"
                                 "while True: a @ a"),
}
CONFIGS = {
    "1 thread": (1, {}),
    "2 threads": (2, {}),
    "2 threads, OMP_WAIT_POLICY=passive": (2, {"OMP_WAIT_POLICY": "passive"}),
}


def measure(threads: int, env_extra: dict, reps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.update(env_extra)
    code = WORKER.format(repo=str(REPO), threads=threads, reps=reps)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {"value": r["median_ms"], "aux": r["p90_ms"]}          # median ms, p90 ms


def measure_train(threads: int, env_extra: dict, steps: int = 6) -> dict:
    """tokens/s of distill.py's steps 2..steps (the first is warm-up) on the tiny gsm8k pair."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.update(env_extra, HF_HUB_OFFLINE="1")
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, str(REPO / "distill.py"), "--task", "gsm8k", "--div", "rkl", "--steps",
                        str(steps), "--out", out + "/run", "--threads", str(threads), "--save-every", "1000"],
                       env=env, cwd=REPO, capture_output=True, text=True, check=True)
        rows = [json.loads(line) for line in open(out + "/run/metrics.jsonl")][1:]
    tokens = sum(r["completion_len"] for r in rows)                 # per prompt: * batch size both sides
    seconds = sum(r["completion_len"] / r["tokens_per_s"] for r in rows)
    return {"value": tokens / seconds, "aux": tokens / seconds}       # completion tokens/s of the steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=60)
    p.add_argument("--train", action="store_true", help="time distill.py steps instead of the sampler")
    a = p.parse_args(argv)
    results = {(c, k): [] for c in COMPETITORS for k in CONFIGS}
    for comp, code in COMPETITORS.items():
        rival = None if code is None else subprocess.Popen([sys.executable, "-c", code])
        try:
            time.sleep(1.0 if rival else 0)                 # let the competitor start spinning
            for _ in range(a.rounds):
                for name, (threads, env) in CONFIGS.items():
                    results[comp, name].append(measure_train(threads, env) if a.train
                                               else measure(threads, env, a.reps))
        finally:
            if rival is not None:
                rival.kill()
                rival.wait()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    what = ("distill.py steps 2-6, tiny gsm8k pair, rkl: completion tokens/s" if a.train else
            f"process + sample one token, 4 rows, V = 151936, {a.reps} calls: median ms (p90)")
    print(f"# bench-threads: {what}; commit {commit}, {os.cpu_count()} CPUs, {a.rounds} rounds, "
          f"load average {os.getloadavg()[0]:.2f}")
    print("| competitor | " + " | ".join(CONFIGS) + " |")
    print("|---|" + "---|" * len(CONFIGS))
    for comp in COMPETITORS:
        cells = []
        for name in CONFIGS:
            med = statistics.median(r["value"] for r in results[comp, name])
            p90 = statistics.median(r["aux"] for r in results[comp, name])
            cells.append(f"{med:.0f} tokens/s" if a.train else f"{med:.1f} ms (p90 {p90:.1f})")
        print(f"| {comp} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
