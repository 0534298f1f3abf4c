"""Golden outputs of the two central functions, for refactors that must not change a single token.

`python tests/golden.py --write` saves two small pairs (tests/fixtures/golden/<task>/{teacher,student}) and
records, for fixed seeds, what `speculative_generate`, `autoregressive_generate` and a few `distill.py` steps
produce (tests/fixtures/golden/expected.json). tests/test_golden.py recomputes them and demands equality:
tokens, counts, records and positions exactly; losses and other floats to 1e-6 relative. Wall-clock fields
are left out (they are timings, not outputs).
"""
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import distill  # noqa: E402
import models  # noqa: E402
import specdec  # noqa: E402

GOLDEN = HERE / "fixtures" / "golden"
TIMINGS = ("wall_time_s", "tokens_per_s")

# (name, task, speculative_generate keyword arguments)
SPEC_CASES = [
    ("greedy", "gsm8k", dict(gamma=4, max_new_tokens=24, temperature=0.0)),
    ("top_p_top_k_record", "gsm8k", dict(gamma=5, max_new_tokens=20, temperature=0.8, top_p=0.9, top_k=40,
                                         seed=1, record=True)),
    ("streaming", "cnndm", dict(gamma=3, max_new_tokens=16, temperature=1.0, seed=2, batch_size=2)),
    ("llama_top_p", "cnndm", dict(gamma=2, max_new_tokens=12, temperature=0.7, top_p=0.95, seed=3)),
    ("llama_greedy_streaming", "cnndm", dict(gamma=5, max_new_tokens=20, temperature=0.0, batch_size=3,
                                             record=True)),
    ("plain_sampling_record", "gsm8k", dict(gamma=3, max_new_tokens=18, temperature=1.0, seed=5, record=True,
                                            batch_size=4)),
]
AR_CASES = [
    ("ar_sampling", "gsm8k", dict(max_new_tokens=16, temperature=0.9, top_p=0.9, seed=4)),
    ("ar_greedy", "cnndm", dict(max_new_tokens=12, temperature=0.0)),
]
TRAIN_CASES = [("rkl", []), ("jsd", ["--beta", "0.3"]), ("ajsd", ["--lmbda", "0.5", "--grad-accum", "2"])]


def pair_dir(task: str) -> Path:
    return GOLDEN / task


def save_pairs():
    """Build the reduced tiny pairs once and keep them as fixtures (safetensors + tokenizer)."""
    import shutil
    for task in ("gsm8k", "cnndm"):
        with tempfile.TemporaryDirectory() as tmp:
            root = models.ensure_tiny_pair(task, root=tmp, scale="test")
            for role in ("teacher", "student"):
                shutil.rmtree(pair_dir(task) / role, ignore_errors=True)
                shutil.copytree(Path(root) / role, pair_dir(task) / role)


def prompts_for(tok, task: str, n: int = 5):
    import data
    return data.task_prompts(task, tok, split="eval", n=n)


def strip_timings(x):
    if isinstance(x, dict):
        return {k: strip_timings(v) for k, v in x.items() if k not in TIMINGS}
    if isinstance(x, list):
        return [strip_timings(v) for v in x]
    return x


def compute() -> dict:
    out = {}
    pairs = {task: models.load_pair(pair_dir(task) / "teacher", pair_dir(task) / "student")
             for task in ("gsm8k", "cnndm")}
    for name, task, kw in SPEC_CASES:
        t, s, tok = pairs[task]
        res = specdec.speculative_generate(t, s, prompts_for(tok, task), **kw)
        rec = {k: v.tolist() for k, v in res.records.items()} if res.records else None
        out[name] = {"tokens": res.tokens, "stats": strip_timings(res.stats), "records": rec}
    for name, task, kw in AR_CASES:
        t, _, tok = pairs[task]
        res = specdec.autoregressive_generate(t, prompts_for(tok, task), **kw)
        out[name] = {"tokens": res.tokens, "stats": strip_timings(res.stats)}
    for div, extra in TRAIN_CASES:
        with tempfile.TemporaryDirectory() as tmp:
            distill.main(["--task", "gsm8k", "--div", div, "--teacher", str(pair_dir("gsm8k") / "teacher"),
                          "--student", str(pair_dir("gsm8k") / "student"), "--out", str(Path(tmp) / "run"),
                          "--steps", "3", "--batch-size", "4", "--max-new-tokens", "10", "--n-train", "12",
                          "--lr", "1e-3", "--save-every", "2", *extra])
            rows = [json.loads(line) for line in open(Path(tmp) / "run" / "metrics.jsonl")]
        out[f"train_{div}"] = [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]
    return out


def diff(a, b, path="") -> list[str]:
    """Every place where b differs from a: exact for ints/str/bool, 1e-6 relative for floats."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = set(a) | set(b)
        return [d for k in sorted(keys) for d in (diff(a.get(k), b.get(k), f"{path}.{k}")
                                                  if k in a and k in b else [f"{path}.{k}: missing"])]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in diff(x, y, f"{path}[{i}]")]
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None:
            return [] if a is b else [f"{path}: {a} != {b}"]
        if math.isnan(a) and math.isnan(b):
            return []
        return [] if math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) else [f"{path}: {a} != {b}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--write" in argv:
        if "--keep-pairs" not in argv:
            save_pairs()
        torch.manual_seed(0)
        (GOLDEN / "expected.json").write_text(json.dumps(compute(), indent=0, allow_nan=True))
        print(f"wrote {GOLDEN / 'expected.json'}")


if __name__ == "__main__":
    main()
