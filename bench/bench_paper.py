"""The paper's shapes on the CPU: the real Qwen3 tokenizer and vocabulary width (lm_head 151936 rows),
random weights of small depth and width (models.build_paper_shaped_pair), everything side by side in one run.

1. Sampling one token for a batch of 4 rows at V = 151936 (temperature 0.6, top-p 0.95): the old sampler
   (a full torch.sort for top-p + torch.multinomial, kept here as the reference) vs specdec's
   (top-p from the 256 most likely tokens or a radix select, + float64 inverse CDF), on near-uniform rows
   (random weights) and peaked rows.
2. One training step of distill.py split into its phases (sampling, teacher forward, student forward, loss,
   backward, optimizer), timed with the project's own functions on one batch.
3. The whole training loop vs TRL's GKDTrainer on the same paper-shaped models, prompts, batch and
   lengths (harness.py, as bench_train.py: each side in its own process, peak RSS, completion tokens/s).
4. speculative_generate vs autoregressive_generate vs transformers' generate at batch 1, 8, 32, with the
   cost ratio c = (draft forward time) / (target forward time) and the per-round overhead (the round's wall
   time minus its draft and target forwards). Random weights: acceptance means nothing here (both models
   are near-uniform, so they "agree" by accident); only the costs are the point.
5. A round's work besides the models: speculative_generate's wall time minus the time inside the two models'
   forwards (timed by forward hooks), per round, at batch 1, 8, 32 with and without records, for specdec.py as
   it was before issue 13 (sort + multinomial sampler), as it was after issue 13's sampler (commit c75d92a),
   and as it is now; the old versions are read from git (`git show COMMIT:specdec.py`) and run on the same
   pair, prompts and seeds in this process.

Run:  flock /tmp/heavy.lock python bench/bench_paper.py [--threads 2] [--quick]      (or: make bench-paper)
"""
import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402

V = 151936


def best(fn, repeats):
    """Minimum wall time of `repeats` calls (the least disturbed by other jobs on a shared machine), seconds."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def old_process_and_sample(logits, temperature, top_p, gen):
    """The sampler before this benchmark's change (HF's TopPLogitsWarper verbatim + torch.multinomial)."""
    logits = logits.float() / temperature
    sorted_logits, order = torch.sort(logits, dim=-1)
    drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
    drop[..., -1] = False
    probs = logits.masked_fill(drop.scatter(-1, order, drop), -math.inf).softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def bench_sampling(repeats):
    import specdec
    from plumbing.cpu_memory import reuse_freed_memory
    reuse_freed_memory()      # as speculative_generate / autoregressive_generate do (both sides gain)
    gen = torch.Generator().manual_seed(0)
    print("\n## 1. processing + sampling one token, batch 4, V = 151936, T 0.6, top-p 0.95 (best of "
          f"{repeats})\n")
    print("| logits | old: sort + multinomial (ms) | new: candidates or radix top-p + inverse CDF (ms) | old / new |")
    print("|---|---|---|---|")
    for name, scale in (("near-uniform (random weights)", 0.02), ("Gaussian, std 3", 3.0), ("peaked, std 12", 12.0)):
        x = torch.randn(4, V, generator=torch.Generator().manual_seed(1)) * scale
        t_old = best(lambda: old_process_and_sample(x, 0.6, 0.95, gen), repeats)
        t_new = best(lambda: specdec.sample(specdec.process_logits(x, 0.6, 0, 0.95), gen), repeats)
        print(f"| {name} | {t_old * 1e3:.1f} | {t_new * 1e3:.1f} | {t_old / t_new:.1f} |")


def bench_phases(teacher_dir, student_dir, batch, new_tokens, repeats):
    """One distill.py step by its phases (harness.step_phases: distill.py's own functions)."""
    import data
    import models
    from harness import phase_table, step_phases
    teacher, student, tok = models.load_pair(teacher_dir, student_dir, device="cpu")
    prompts = [data.build_prompt_ids(tok, "gsm8k", ex) for ex in data.load_examples("gsm8k", "train", n=batch)]
    mean, tokens = step_phases(teacher, student, prompts, new_tokens=new_tokens, repeats=repeats, vocab_size=len(tok),
                               pad_id=tok.pad_token_id)
    print(f"\n## 2. one distill.py step by phase: batch {batch} x {new_tokens} new tokens, rkl, T 0.6, top-p 0.95 "
          f"(mean of {repeats} steps after a warm-up)\n")
    print(phase_table(mean, tokens))


def bench_loops(teacher_dir, student_dir, batch, new_tokens, steps):
    """harness.py's loops (each in a fresh process) on the paper-shaped pair."""
    from harness import run_sides                    # bench/ is this script's folder

    results = run_sides(lambda side: [sys.executable, str(REPO / "bench" / "bench_paper.py"), "--side", side,
                                      "--pair", teacher_dir, student_dir, "--batch-size", str(batch),
                                      "--max-new-tokens", str(new_tokens), "--steps", str(steps)])
    print(f"\n## 3. the training loop vs TRL GKDTrainer: same paper-shaped pair, batch {batch}, "
          f"max_new_tokens {new_tokens}, T 0.6, rkl, on-policy, {steps} steps (first = warm-up)\n")
    print("| loop | completion tokens | seconds | completion tokens/s | s / step | peak RSS (MiB) | "
          "RSS growth in training (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for side, name in (("ours", "distill.py (ours)"), ("trl", "TRL GKDTrainer")):
        r = results[side]
        print(f"| {name} | {r['tokens']:.0f} | {r['seconds']:.2f} | {r['tokens'] / r['seconds']:.1f} | "
              f"{r['seconds'] / (steps - 1):.2f} | {r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] - r['rss_before_mib']:.0f} |")
    o, t = results["ours"], results["trl"]
    print(f"\nours / TRL: step time {o['seconds'] / t['seconds']:.2f}x, training RSS growth "
          f"{(o['peak_rss_mib'] - o['rss_before_mib']) / max(1.0, t['peak_rss_mib'] - t['rss_before_mib']):.2f}x, "
          f"peak RSS {o['peak_rss_mib'] / t['peak_rss_mib']:.2f}x")


def loop_child(a):
    """One side of section 3, in its own process (its peak RSS is its own)."""
    import harness
    torch.manual_seed(0)
    a.task, a.temperature = "gsm8k", 0.6
    with tempfile.TemporaryDirectory() as out:
        res = (harness.run_ours if a.side == "ours" else harness.run_trl)(a, a.pair[0], a.pair[1], out)
    res["peak_rss_mib"] = harness.peak_rss_mib()
    print("RESULT " + json.dumps(res), flush=True)


def decoding_setup(teacher_dir, student_dir, n_prompts, new_tokens):
    """Sections 4 and 5: the pair, n_prompts GSM8k eval prompts (teacher template) and the sampling rules."""
    import data
    import models
    teacher, draft, tok = models.load_pair(teacher_dir, student_dir, device="cpu")
    prompts = [data.build_prompt_ids(tok, "gsm8k", ex) for ex in data.load_examples("gsm8k", "eval", n=n_prompts)]
    rules = dict(max_new_tokens=new_tokens, temperature=0.6, top_p=0.95, eos_token_id=[], vocab_size=len(tok))
    return teacher, draft, tok, prompts, rules


def bench_specdec(teacher_dir, student_dir, batches, new_tokens, gamma, repeats):
    import specdec
    from plumbing import kv_cache
    teacher, draft, tok, all_prompts, rules = decoding_setup(teacher_dir, student_dir, max(batches), new_tokens)
    print(f"\n## 4. speculative decoding at the real vocabulary: gamma {gamma}, {new_tokens} new tokens per row, "
          f"T 0.6, top-p 0.95 (best of {repeats}; random weights: acceptance is meaningless)\n")
    print("| batch | generate (s) | autoregressive_generate (s) | speculative_generate (s) | spec / AR | "
          "c = t_q / t_p | per-round overhead (ms) | mean accepted length |")
    print("|---|---|---|---|---|---|---|---|")
    for B in batches:
        prompts = all_prompts[:B]
        ids, mask = kv_cache.left_pad(prompts, "cpu")
        hf = best(lambda: teacher.generate(ids, attention_mask=mask, do_sample=True, temperature=0.6, top_p=0.95,
                                           top_k=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                           pad_token_id=tok.pad_token_id), repeats)
        res = {}
        t_ar = best(lambda: res.__setitem__("p", specdec.autoregressive_generate(teacher, prompts, seed=0, **rules)),
                    repeats)
        t_q = best(lambda: res.__setitem__("q", specdec.autoregressive_generate(draft, prompts, seed=0, **rules)),
                   repeats)
        t_sd = best(lambda: res.__setitem__("sd", specdec.speculative_generate(teacher, draft, prompts, gamma=gamma,
                                                                               seed=0, **rules)), repeats)
        p_call = t_ar / res["p"].stats["target_calls"]          # one target call (one token per row)
        q_call = t_q / res["q"].stats["target_calls"]           # one draft call
        st = res["sd"].stats
        overhead = (t_sd - st["draft_calls"] * q_call - st["target_calls"] * p_call) / st["target_calls"]
        print(f"| {B} | {hf:.2f} | {t_ar:.2f} | {t_sd:.2f} | {t_sd / t_ar:.2f} | {q_call / p_call:.2f} | "
              f"{overhead * 1e3:.1f} | {st['mean_accepted_length']:.2f} |")


ROUND_WORK_COMMITS = (("before issue 13", "740dfa1"), ("issue 13 sampler", "c75d92a"))


def specdec_at(commit, tmp):
    """specdec.py as it was at `commit`, imported under another name (read with git show)."""
    import importlib.util
    src = subprocess.run(["git", "show", f"{commit}:specdec.py"], capture_output=True, text=True, cwd=REPO,
                         check=True).stdout
    path = Path(tmp) / f"specdec_{commit}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"specdec_{commit}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module                     # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class ForwardClock:
    """Seconds spent inside the forwards of some models (forward pre-hook -> forward hook)."""

    def __init__(self, *models):
        self.seconds = 0.0
        for m in models:
            m.register_forward_pre_hook(self._start)
            m.register_forward_hook(self._stop)

    def _start(self, module, args):
        self._t0 = time.perf_counter()

    def _stop(self, module, args, out):
        self.seconds += time.perf_counter() - self._t0


def sharpen(model, prompt_ids, logit_std):
    """Scale the model's final norm so its logits have about this standard deviation over the vocabulary
    (random weights give ~0.1: near-uniform rows; a trained model's rows are peaked)."""
    with torch.no_grad():
        std = model(input_ids=torch.tensor([prompt_ids])).logits[0].std(-1).mean().item()
        model.model.norm.weight.mul_(logit_std / std)


def bench_round_work(teacher_dir, student_dir, batches, new_tokens, gamma, repeats):
    import specdec
    from plumbing.cpu_memory import reuse_freed_memory
    reuse_freed_memory()      # process-wide: the old versions gain from it too (their best case)
    teacher, draft, _, all_prompts, rules = decoding_setup(teacher_dir, student_dir, max(batches), new_tokens)
    clock = ForwardClock(teacher, draft)
    with tempfile.TemporaryDirectory() as tmp:
        versions = [(name, specdec_at(commit, tmp)) for name, commit in ROUND_WORK_COMMITS]
    versions.append(("now", specdec))
    print(f"\n## 5. a round's work besides the two models' forwards (ms per round): gamma {gamma}, {new_tokens} new "
          f"tokens per row, T 0.6, top-p 0.95, best of {repeats}. Flat rows: the random pair as built; peaked "
          f"rows: the same pair with its final norms scaled so the logits have std ~4 over the vocabulary (as "
          f"a trained model's)\n")
    print("| rows | batch | records | " + " | ".join(f"{name} ({commit})" for name, commit in ROUND_WORK_COMMITS)
          + " | now | before / now | issue 13 sampler / now | forwards per round, now (ms) |")
    print("|---|---|---|" + "---|" * (len(versions) + 3))
    for rows in ("flat", "peaked"):
        if rows == "peaked":
            for model in (teacher, draft):
                sharpen(model, all_prompts[0], 4.0)
        for B in batches:
            prompts = all_prompts[:B]
            for record in (False, True):
                work, fwd = {}, {}
                for name, module in versions:
                    runs = []
                    for _ in range(repeats):
                        clock.seconds = 0.0
                        t0 = time.perf_counter()
                        res = module.speculative_generate(teacher, draft, prompts, gamma=gamma, seed=0,
                                                          record=record, **rules)
                        wall = time.perf_counter() - t0
                        rounds = res.stats["target_calls"]
                        runs.append(((wall - clock.seconds) / rounds, clock.seconds / rounds))
                    work[name], fwd[name] = min(runs)
                first, second = (work[name] for name, _ in ROUND_WORK_COMMITS)
                print(f"| {rows} | {B} | {'yes' if record else 'no'} | "
                      + " | ".join(f"{work[name] * 1e3:.1f}" for name, _ in versions)
                      + f" | {first / work['now']:.1f}x | {second / work['now']:.1f}x | {fwd['now'] * 1e3:.1f} |",
                      flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="fewer repeats and shorter generations (a smoke run)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--sections", default="12345", help="which sections to run, e.g. 5 or 145 (default: all)")
    p.add_argument("--side", default=None, help=argparse.SUPPRESS)       # internal: one loop of section 3
    p.add_argument("--pair", nargs=2, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.side:
        return loop_child(a)
    import models
    repeats = 2 if a.quick else 5
    print(f"# bench-paper: torch {torch.__version__}, {a.threads} threads, commit "
          + subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip())
    if "1" in a.sections:
        bench_sampling(repeats * 4)
    with tempfile.TemporaryDirectory() as tmp:
        teacher_dir, student_dir = (str(d) for d in models.build_paper_shaped_pair(tmp))
        print(f"\npaper-shaped pair: teacher {models.SMALL_TEACHER}, student {models.SMALL_STUDENT}, "
              f"vocab_size {V} (tied), real Qwen3 tokenizer")
        if "2" in a.sections:
            bench_phases(teacher_dir, student_dir, a.batch_size, a.max_new_tokens, 1 if a.quick else 2)
        if "3" in a.sections:
            bench_loops(teacher_dir, student_dir, a.batch_size, a.max_new_tokens, a.steps)
        if "4" in a.sections:
            bench_specdec(teacher_dir, student_dir, (1, 8, 32), 16 if a.quick else 32, 5, 1 if a.quick else 2)
        if "5" in a.sections:
            bench_round_work(teacher_dir, student_dir, (1, 8, 32), 16 if a.quick else 32, 5, 1 if a.quick else 2)


if __name__ == "__main__":
    main()
