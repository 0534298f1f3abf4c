"""The real pair's early-exit drafts: baseline acceptance and cost ratio c for several depths k.

For each k, the draft is the first k layers of SmolLM2-135M-Instruct plus its final norm and tied head
(models.ensure_smollm2_pair). On --n-prompts held-out GSM8k test prompts under the smollm2 preset's
protocol (gamma 5, T 0.6, top-p 0.95) it measures, by exact speculative decoding: token acceptance
(accepted / drafted), alpha (mean sum_x min(p, q) over drafted positions), the mean accepted length, and
c = draft step / target step (evaluate.cost_ratio, batch 1 and batch 8). From c it prints the textbook
speedup (1 - a^(g+1)) / ((1 - a)(g c + 1)) at the measured alpha and at alphas a distilled draft could
reach, and the alpha at which the draft breaks even. One process, the rows side by side.

Run:  python bench/bench_real_drafts.py [--ks 1 2 3 4 6] [--n-prompts 32] [--max-new-tokens 128]
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402

import data  # noqa: E402
from study import evaluate  # noqa: E402
import models  # noqa: E402
import specdec  # noqa: E402


def break_even_alpha(gamma: int, c: float) -> float:
    """The alpha where the textbook speedup equals 1 (bisection: the speedup grows with alpha)."""
    lo, hi = 0.0, 0.999999
    if evaluate.theoretical_speedup(hi, gamma, c) < 1:
        return float("nan")
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if evaluate.theoretical_speedup(mid, gamma, c) < 1 else (lo, mid)
    return hi


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3, 4, 6])
    ap.add_argument("--n-prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    target_dir, _ = models.ensure_smollm2_pair(a.ks[0])
    cfg = models.preset_config("smollm2", "gsm8k")
    tok = models.load_tokenizer(target_dir)
    target = models.load_model(target_dir, device="cpu")
    protocol = models.decoding_protocol(cfg, tok, target, max_new_tokens=a.max_new_tokens)
    prompts = data.task_prompts("gsm8k", tok, split="eval", n=a.n_prompts, source="file", path=cfg["data_path"])
    kw = protocol.speculative_kwargs()
    sampling = protocol.generate_kwargs()
    print(f"# {a.n_prompts} GSM8k test prompts, gamma {protocol.gamma}, T {protocol.temperature}, top-p "
          f"{protocol.top_p}, max_new_tokens {a.max_new_tokens}, batch {a.batch_size}, {a.threads} threads")
    print("| k | draft params | token acceptance | alpha | mean accepted length | c (batch 1) | c (batch 8) "
          "| speedup at measured alpha (b1) | at alpha 0.6 / 0.7 / 0.8 (b1) | break-even alpha (b1) | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for k in a.ks:
        t0 = time.time()
        _, draft_dir = models.ensure_smollm2_pair(k)
        draft = models.load_model(draft_dir, device="cpu")
        per_row, gen, calls = [], 0, 0
        for s in range(0, len(prompts), a.batch_size):
            res = specdec.speculative_generate(target, draft, prompts[s:s + a.batch_size], seed=s, **kw)
            per_row += res.stats["per_row"]
        acc = evaluate.pooled_acceptance(per_row)
        alpha = evaluate.pooled_alpha(per_row)
        mal = sum(r["generated"] for r in per_row) / max(1, sum(r["target_calls"] for r in per_row))
        c1 = evaluate.cost_ratio(draft, target, prompts[:1], **sampling)["cost_ratio"]
        c8 = evaluate.cost_ratio(draft, target, prompts[:8], **sampling)["cost_ratio"]
        th = lambda al: evaluate.theoretical_speedup(al, protocol.gamma, c1)  # noqa: E731
        params = sum(p.numel() for p in draft.parameters()) / 1e6
        print(f"| {k} | {params:.1f}M | {acc:.1%} | {alpha:.3f} | {mal:.2f} | {c1:.3f} | {c8:.3f} | {th(alpha):.2f}x "
              f"| {th(0.6):.2f}x / {th(0.7):.2f}x / {th(0.8):.2f}x | {break_even_alpha(protocol.gamma, c1):.2f} "
              f"| {time.time() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
