"""Benchmark: batched speculative decoding (specdec.py) vs the target alone vs HF assisted generation.

p = target, q = draft. Both are tiny Llama decoders that this script builds and trains itself, on a
synthetic "phrase chain" language: 64 fixed random phrases (4-10 tokens, distinct first tokens) chained
by a Markov chain over phrases (3 successors with probabilities 0.6 / 0.3 / 0.1). Text is deterministic
inside a phrase and uncertain at phrase boundaries, so a good model is confident most of the time and a
weaker draft loses acceptance mostly where it has not memorised a phrase: alpha is non-trivial. The target
(hidden 384, 4 layers, ~6.5M parameters) is ~90x the draft (hidden 64, 1 layer); both see the same
training batches. The trained pair is cached under checkpoints/bench_specdec/ (--retrain rebuilds it).

For batch sizes 1, 8, 32 and gamma 3, 5 (sampling at temperature 0.7 with top-p 0.95 as the evaluator does,
jagged prompts, max_new_tokens tokens per row, no stop id; batch 1 = 8 prompts one after the other)
it prints tokens/s of
  spec      our speculative_generate(target, draft)
  ar        our autoregressive_generate(target)       (same machinery without drafting)
  generate  target.generate(do_sample=True)           (the target alone, Hugging Face)
  assisted  target.generate(assistant_model=draft)    (Hugging Face assisted generation, batch 1 only)
with alpha (mean sum_x min(p, q)), the acceptance rate (accepted / drafted), the mean accepted length
(tokens per target call), c = (draft step time) / (target step time) measured as
tokens/s(ar target) / tokens/s(ar draft) at the same batch size, the theoretical speedup
(1 - alpha^(gamma+1)) / ((1 - alpha)(gamma c + 1)) and the measured ones, spec / generate and spec / ar.
The textbook formula assumes verifying gamma+1 tokens costs one target step (a memory-bound GPU). On a CPU
the target is compute-bound, so the script also measures v = (target call on gamma+1 tokens) / (target
call on 1 token) at each batch size and prints theory(v) = (1 - alpha^(gamma+1)) / ((1 - alpha)(gamma c + v)).
Both are per-row formulas; a batch of rows runs until its slowest row is done, so the script also prints the
straggler factor s = rounds the batch ran / rounds its average row needed. Where a round costs the same whatever
the number of rows still in it (a GPU running small models is bound by kernel launches), the batch's speedup is
about theory(v) / s.
Each timing is the best of --repeats runs, all methods interleaved round-robin (the machine may be shared). CPU, one thread by default;
--device cuda times a GPU (synchronising before and after each timed call). --target-layers N trains and caches a deeper target
(same width) for a smaller c.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from plumbing.kv_cache import forward, left_pad  # noqa: E402
from specdec import autoregressive_generate, speculative_generate  # noqa: E402


@dataclass
class Config:
    vocab: int = 256
    n_phrases: int = 64
    seq_len: int = 64
    train_steps: int = 120
    train_batch: int = 8
    lr: float = 3e-3
    batch_sizes: tuple = (1, 8, 32)
    gammas: tuple = (3, 5)
    max_new_tokens: int = 64
    temperature: float = 0.7  # the evaluator's sampling (cnndm temperature, nucleus 0.95)
    top_p: float = 0.95
    repeats: int = 3
    batch1_prompts: int = 8  # batch 1 is timed over this many prompts, one at a time
    stream_factor: int = 4  # the continuous-batching table streams stream_factor * B prompts through B slots
    threads: int = 1
    device: str = "cpu"
    target_layers: int = 4
    cache_dir: str = "checkpoints/bench_specdec"
    seed: int = 0


# ----------------------------------------------------------------------------- synthetic language

class PhraseChain:
    """Random phrases chained by a Markov chain over phrases: deterministic inside, uncertain at boundaries."""

    def __init__(self, cfg: Config):
        g = torch.Generator().manual_seed(cfg.seed)
        starts = torch.randperm(cfg.vocab, generator=g)[: cfg.n_phrases]
        self.phrases = [[int(s)] + torch.randint(0, cfg.vocab, (int(torch.randint(3, 10, (1,), generator=g)),),
                                                 generator=g).tolist() for s in starts]
        self.successors = torch.randint(0, cfg.n_phrases, (cfg.n_phrases, 3), generator=g)  # (P, 3)
        self.probs = torch.tensor([0.6, 0.3, 0.1])
        self.g = g

    def sample(self, length: int) -> list[int]:
        phrase = int(torch.randint(0, len(self.phrases), (1,), generator=self.g))
        out = self.phrases[phrase][int(torch.randint(0, len(self.phrases[phrase]), (1,), generator=self.g)):]
        while len(out) < length:
            phrase = int(self.successors[phrase, torch.multinomial(self.probs, 1, generator=self.g)])
            out = out + self.phrases[phrase]
        return out[:length]


def make_model(vocab, hidden, layers, heads, kv_heads, inter, seed):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, intermediate_size=inter, max_position_embeddings=512,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(config)


def train_pair(cfg: Config, lang: PhraseChain):
    """Train target and draft on the same batches (next-token cross-entropy, AdamW)."""
    target = make_model(cfg.vocab, 384, cfg.target_layers, 6, 2, 1024, cfg.seed).to(cfg.device)
    draft = make_model(cfg.vocab, 64, 1, 2, 1, 128, cfg.seed + 1).to(cfg.device)
    opts = [torch.optim.AdamW(m.parameters(), lr=cfg.lr) for m in (target, draft)]
    for step in range(cfg.train_steps):
        batch = torch.tensor([lang.sample(cfg.seq_len) for _ in range(cfg.train_batch)], device=cfg.device)  # (B, T)
        losses = []
        for model, opt in zip((target, draft), opts):
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        if step % 25 == 0 or step == cfg.train_steps - 1:
            print(f"  train step {step:4d}  loss target {losses[0]:.3f}  draft {losses[1]:.3f}", flush=True)
    return target.eval(), draft.eval()


def load_or_train(cfg: Config, lang: PhraseChain, retrain: bool):
    root = Path(cfg.cache_dir) / ("" if cfg.target_layers == 4 else f"target{cfg.target_layers}")
    if not retrain and (root / "target").exists() and (root / "draft").exists():
        return (LlamaForCausalLM.from_pretrained(root / "target", use_safetensors=True).eval().to(cfg.device),
                LlamaForCausalLM.from_pretrained(root / "draft", use_safetensors=True).eval().to(cfg.device))
    print(f"training the benchmark pair ({cfg.train_steps} steps) ...", flush=True)
    target, draft = train_pair(cfg, lang)
    target.save_pretrained(root / "target")
    draft.save_pretrained(root / "draft")
    return target, draft


# ----------------------------------------------------------------------------- timing

def synchronize():
    """Wait for queued GPU work, so that a wall-clock timing covers it (a no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def best_of(repeats, fn):
    """(min wall seconds, last result) over `repeats` calls."""
    best, result = float("inf"), None
    for _ in range(repeats):
        synchronize()
        t0 = time.perf_counter()
        result = fn()
        synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, result


def interleaved_best(repeats, jobs):
    """Min wall seconds and last result of every job, running the jobs round-robin `repeats` times so that
    load changes on a shared machine hit every method alike."""
    best, results = {name: float("inf") for name in jobs}, {}
    for _ in range(repeats):
        for name, fn in jobs.items():
            synchronize()
            t0 = time.perf_counter()
            results[name] = fn()
            synchronize()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best, results


def hf_generate(model, prompts, cfg, **kwargs):
    """target.generate on a left-padded batch, exactly max_new_tokens sampled tokens per row."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=model.device)  # (B, T)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    torch.manual_seed(cfg.seed)  # one fixed sampled path per call, as speculative_generate(seed=...) has: a best-of
    with torch.no_grad():        # several timings must not pick generate's luckiest acceptance run
        return model.generate(ids, attention_mask=mask, do_sample=True, temperature=cfg.temperature, top_k=0,
                              top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.max_new_tokens,
                              eos_token_id=None, pad_token_id=0, **kwargs)


def hf_assisted(target, draft, prompts, cfg, gamma):
    """HF assisted generation with exactly gamma drafts per round. The candidate generator reads these settings
    from the ASSISTANT's generation config (default: 20 tokens, adaptive), not from generate()'s kwargs."""
    gc = draft.generation_config
    gc.num_assistant_tokens, gc.num_assistant_tokens_schedule, gc.assistant_confidence_threshold = gamma, "constant", 0.0
    return hf_generate(target, prompts, cfg, assistant_model=draft)


def pooled(stats_list):
    """alpha, accepted / drafted and tokens per target call pooled over several speculative_generate calls, and the
    straggler factor s = rounds the batch ran / rounds its average row needed (1 for one row; a batch runs until
    its slowest row has its max_new_tokens)."""
    stats_list = list(stats_list)
    rows = [r for stats in stats_list for r in stats["per_row"]]
    drafted = sum(r["drafted"] for r in rows)
    mean_row_rounds = sum(sum(r["target_calls"] for r in st["per_row"]) / len(st["per_row"]) for st in stats_list)
    return {"alpha": sum(r["alpha"] * r["drafted"] for r in rows) / drafted,
            "acceptance_rate": sum(r["accepted"] for r in rows) / drafted,
            "mean_accepted_length": sum(r["generated"] for r in rows) / sum(r["target_calls"] for r in rows),
            "straggle": sum(st["target_calls"] for st in stats_list) / mean_row_rounds}


def theoretical_speedup(alpha, gamma, c, v=1.0):
    """Expected tokens per round / cost of a round in target steps. v = 1 is the textbook formula (verifying
    gamma+1 tokens costs one target step, true when the target is memory-bound, e.g. on a GPU)."""
    return (1 - alpha ** (gamma + 1)) / ((1 - alpha) * (gamma * c + v))


@torch.no_grad()
def verify_cost_ratio(target, prompts, gamma, repeats=5):
    """v = seconds of one cached target call on gamma+1 new tokens per row / seconds of one on 1 new token.
    On a CPU the target is compute-bound, so v grows with gamma+1 and with the batch size."""
    ids, mask = left_pad(prompts, target.device)
    cache = DynamicCache()
    forward(target, ids, mask, (mask.cumsum(1) - 1).clamp(min=0), cache, logits_to_keep=1)
    n_seq = mask.sum(1)
    seconds = {}
    for n in (1, gamma + 1):
        x = ids[:, -1:].expand(-1, n)  # (B, n) any tokens will do
        full = torch.cat([mask, torch.ones_like(x)], 1)
        positions = n_seq[:, None] + torch.arange(n, device=target.device)

        def call():
            forward(target, x, full, positions, cache)
            cache.crop(-n)
        seconds[n] = best_of(repeats, call)[0]
    return seconds[gamma + 1] / seconds[1]


def run(cfg: Config, retrain: bool = False) -> str:
    torch.set_num_threads(cfg.threads)
    lang = PhraseChain(cfg)
    target, draft = load_or_train(cfg, lang, retrain)
    n_t = sum(p.numel() for p in target.parameters())
    n_d = sum(p.numel() for p in draft.parameters())
    sample_kw = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                     eos_token_id=[])
    rows, streams = [], []
    for B in cfg.batch_sizes:
        prompts = [lang.sample(8 + (13 * i) % 25) for i in range(max(B, cfg.batch1_prompts))]  # jagged: 8..32
        # batch 1: several prompts one after the other (one sampled path is too noisy); else one batch of B
        groups = [[p] for p in prompts[: cfg.batch1_prompts]] if B == 1 else [prompts[:B]]
        n_tokens = sum(len(grp) for grp in groups) * cfg.max_new_tokens
        each = lambda fn: (lambda: [fn(grp) for grp in groups])  # noqa: E731  one job = every group
        speculative_generate(target, draft, prompts[:2], gamma=3, max_new_tokens=8, seed=0)  # warm-up
        jobs = {"ar": each(lambda grp: autoregressive_generate(target, grp, seed=0, **sample_kw)),
                "ar_draft": each(lambda grp: autoregressive_generate(draft, grp, seed=0, **sample_kw)),
                "generate": each(lambda grp: hf_generate(target, grp, cfg))}
        for gamma in cfg.gammas:
            jobs[f"spec{gamma}"] = each(lambda grp, g=gamma: speculative_generate(target, draft, grp, gamma=g, seed=0,
                                                                                  **sample_kw))
            if B == 1:
                jobs[f"assisted{gamma}"] = each(lambda grp, g=gamma: hf_assisted(target, draft, grp, cfg, g))
        seconds, results = interleaved_best(cfg.repeats, jobs)
        c = seconds["ar_draft"] / seconds["ar"]  # draft step cost / target step cost (same number of tokens)
        tps = {name: n_tokens / t for name, t in seconds.items()}
        for gamma in cfg.gammas:
            s, v = pooled(r.stats for r in results[f"spec{gamma}"]), verify_cost_ratio(target, groups[0], gamma)
            rows.append(dict(B=B, gamma=gamma, spec=tps[f"spec{gamma}"], ar=tps["ar"], gen=tps["generate"],
                             asst=tps.get(f"assisted{gamma}"), alpha=s["alpha"], rate=s["acceptance_rate"],
                             mal=s["mean_accepted_length"], c=c, theory=theoretical_speedup(s["alpha"], gamma, c),
                             v=v, theory_v=theoretical_speedup(s["alpha"], gamma, c, v), s=s["straggle"],
                             vs_gen=seconds["generate"] / seconds[f"spec{gamma}"],
                             vs_ar=seconds["ar"] / seconds[f"spec{gamma}"]))
            print(f"  B={B:3d} gamma={gamma}  spec {tps[f'spec{gamma}']:8.1f} tok/s  generate {tps['generate']:8.1f} "
                  f"tok/s  alpha {s['alpha']:.3f}", flush=True)
        if B > 1:
            streams.extend(stream_rows(cfg, lang, target, draft, B, sample_kw))

    where = (torch.cuda.get_device_name() if target.device.type == "cuda"
             else f"{torch.get_num_threads()} CPU thread(s)")
    head = (f"target {n_t / 1e6:.2f}M params (Llama 384x{cfg.target_layers}), draft {n_d / 1e6:.2f}M (Llama 64x1); "
            f"{cfg.max_new_tokens} new tokens per row, temperature {cfg.temperature}, top-p {cfg.top_p}, "
            f"{where}, torch {torch.__version__}, best of {cfg.repeats}. theory = (1 - alpha^(gamma+1)) / "
            f"((1 - alpha)(gamma c + 1)); theory(v) replaces the 1 by v, the measured cost of verifying gamma+1 "
            f"tokens in target steps. s = rounds the batch ran / rounds its "
            f"average row needed (the batch waits for its slowest row; theory is per row).\n\n")
    lines = ["| B | gamma | spec tok/s | ar tok/s | generate tok/s | assisted tok/s | alpha | accepted/drafted | "
             "mean acc. len | c | theory | v | theory(v) | s | spec/generate | spec/ar |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        asst = f"{r['asst']:.1f}" if r["asst"] else "-"
        lines.append(f"| {r['B']} | {r['gamma']} | {r['spec']:.1f} | {r['ar']:.1f} | {r['gen']:.1f} | {asst} | "
                     f"{r['alpha']:.3f} | {r['rate']:.3f} | {r['mal']:.2f} | {r['c']:.3f} | {r['theory']:.2f} | "
                     f"{r['v']:.2f} | {r['theory_v']:.2f} | {r['s']:.2f} | {r['vs_gen']:.2f} | {r['vs_ar']:.2f} |")
    stream_head = (f"\n\nContinuous batching: {cfg.stream_factor} x B prompts through B slots "
                   f"(speculative_generate(batch_size=B)) vs generate on the same prompts in batches of B; "
                   f"s = rounds run / (row-rounds needed / B).\n\n")
    stream_lines = ["| B | prompts | gamma | spec tok/s | generate tok/s | alpha | s | spec/generate |",
                    "|---|---|---|---|---|---|---|---|"]
    for r in streams:
        stream_lines.append(f"| {r['B']} | {r['n']} | {r['gamma']} | {r['spec']:.1f} | {r['gen']:.1f} | "
                            f"{r['alpha']:.3f} | {r['s']:.2f} | {r['vs_gen']:.2f} |")
    return head + "\n".join(lines) + stream_head + "\n".join(stream_lines) + "\n"


def stream_rows(cfg: Config, lang: PhraseChain, target, draft, B: int, sample_kw: dict) -> list[dict]:
    """stream_factor * B prompts (the batch's own first) through B slots with continuous batching, against
    generate on the same prompts in static batches of B."""
    prompts = [lang.sample(8 + (13 * i) % 25) for i in range(cfg.stream_factor * B)]
    chunks = [prompts[i:i + B] for i in range(0, len(prompts), B)]
    jobs = {"generate": lambda: [hf_generate(target, chunk, cfg) for chunk in chunks]}
    for gamma in cfg.gammas:
        jobs[f"spec{gamma}"] = (lambda g=gamma: speculative_generate(target, draft, prompts, gamma=g, seed=0,
                                                                     batch_size=B, **sample_kw))
    seconds, results = interleaved_best(cfg.repeats, jobs)
    n_tokens = len(prompts) * cfg.max_new_tokens
    out = []
    for gamma in cfg.gammas:
        stats = results[f"spec{gamma}"].stats
        row_rounds = sum(r["target_calls"] for r in stats["per_row"])
        out.append(dict(B=B, n=len(prompts), gamma=gamma, spec=n_tokens / seconds[f"spec{gamma}"],
                        gen=n_tokens / seconds["generate"], alpha=stats["alpha"],
                        s=stats["target_calls"] * B / row_rounds, vs_gen=seconds["generate"] / seconds[f"spec{gamma}"]))
        print(f"  stream B={B:3d} gamma={gamma}  spec {out[-1]['spec']:8.1f} tok/s  generate {out[-1]['gen']:8.1f} tok/s",
              flush=True)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--retrain", action="store_true", help="rebuild the cached benchmark pair")
    parser.add_argument("--repeats", type=int, default=Config.repeats)
    parser.add_argument("--threads", type=int, default=Config.threads)
    parser.add_argument("--max-new-tokens", type=int, default=Config.max_new_tokens)
    parser.add_argument("--device", default=Config.device, help="cpu or cuda")
    parser.add_argument("--target-layers", type=int, default=Config.target_layers,
                        help="depth of the target (the draft has 1 layer); not 4 -> its own cached pair")
    parser.add_argument("--train-steps", type=int, default=Config.train_steps)
    parser.add_argument("--lr", type=float, default=Config.lr)
    parser.add_argument("--out", default=None, help="also write the markdown table to this file")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = Config(repeats=args.repeats, threads=args.threads, max_new_tokens=args.max_new_tokens, device=args.device,
                 target_layers=args.target_layers, train_steps=args.train_steps, lr=args.lr)
    table = run(cfg, retrain=args.retrain)
    print()
    print(table)
    if args.out:
        Path(args.out).write_text(table)


if __name__ == "__main__":
    main()
