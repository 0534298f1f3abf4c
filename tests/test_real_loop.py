"""The training loop on the real pair (PRESET=smollm2): what holds on the tiny pairs holds on SmolLM2 too.

A few short steps of distill.py with the real SmolLM2-135M-Instruct target and its early-exit draft: a resumed
run equals the uninterrupted one, bf16 autocast and validation with best/ run, 2 FSDP processes equal 1, and
final/ is a draft transformers' assisted generation accepts.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import distill
import models
from test_distill import REPO, free_port, read_losses, read_metric

SHORT = ("--preset", "smollm2", "--task", "gsm8k", "--div", "rkl", "--steps", "3", "--batch-size", "2",
         "--max-new-tokens", "8", "--n-train", "8", "--off-policy-warmup", "1", "--lmbda", "0.5")


def args(out, *extra):
    return [*SHORT, "--out", str(out), *map(str, extra)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Three steps in one go, a checkpoint after every step."""
    out = tmp_path_factory.mktemp("real") / "straight"
    distill.main(args(out, "--save-every", 1))
    return out


def test_a_resumed_real_run_equals_the_uninterrupted_one(straight, tmp_path, monkeypatch):
    """A run killed in step 3 and resumed must reproduce the uninterrupted run exactly (the CPU, one thread):
    same sources, same sampled lengths, same losses."""
    out, real, calls = tmp_path / "resumed", distill.sample_step, {"n": 0}

    def dies_in_step_3(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(distill, "sample_step", dies_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        distill.main(args(out, "--save-every", 1))
    monkeypatch.setattr(distill, "sample_step", real)
    assert len(read_losses(out)) == 2
    distill.main(args(out, "--save-every", 1, "--resume"))
    for key in ("source", "completion_len", "loss"):
        assert read_metric(out, key) == read_metric(straight, key)


def test_the_warm_up_steps_are_off_policy(straight):
    """--off-policy-warmup 1: the first step learns from dataset answers whatever the lmbda coin says."""
    assert read_metric(straight, "source")[0] == "dataset"


def test_bf16_validation_and_best_on_the_real_pair(tmp_path):
    """--dtype bfloat16 with --eval-every: every validated step logs val_acceptance_rate and best/ holds a
    loadable Hugging Face draft with best.json naming its step."""
    out = tmp_path / "bf16"
    distill.main(args(out, "--steps", 2, "--dtype", "bfloat16", "--eval-every", 1, "--eval-prompts", 2))
    rates = read_metric(out, "val_acceptance_rate")
    assert len(rates) == 2 and all(0 <= r <= 1 for r in rates)
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["step"] in (1, 2)
    assert models.load_model(out / "best", device="cpu").config.num_hidden_layers == models.SMOLLM2_DRAFT_LAYERS


def test_two_fsdp_processes_equal_one_on_the_real_pair(straight, tmp_path):
    """FSDP2 over 2 CPU processes samples the same completions and reaches the same losses (1e-5) as one."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "TORCH_GLOO_TIMEOUT": "300"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO / "distill.py"), "--fsdp", *args(tmp_path / "fsdp", "--save-every", 1)]
    r = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert read_metric(tmp_path / "fsdp", "completion_len") == read_metric(straight, "completion_len")
    assert read_losses(tmp_path / "fsdp") == pytest.approx(read_losses(straight), rel=1e-5)


def test_the_distilled_real_draft_works_as_assistant_model(straight):
    """final/ is a plain Hugging Face folder: transformers' assisted generation with it as assistant_model
    gives the target's own greedy tokens."""
    target_dir, _ = models.resolve_pair("gsm8k", "smollm2")
    target = models.load_model(target_dir, device="cpu")
    draft = models.load_model(Path(straight) / "final", device="cpu")
    tok = models.load_tokenizer(target_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 12 times 3?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id)
    assert torch.equal(target.generate(ids, assistant_model=draft, **kw), target.generate(ids, **kw))


def test_repeated_ngrams_counts_a_loop_and_not_fluent_text():
    """A completion stuck in a loop repeats nearly every 4-gram; one with no repeated 4-gram repeats none."""
    assert data.repeated_ngrams([7, 8] * 10) == (15, 17)
    assert data.repeated_ngrams(list(range(20))) == (0, 17)
    assert data.repeated_ngrams([1, 2, 3]) == (0, 0)


def test_sample_health_counts_stopped_and_repeated_samples():
    """(stopped, completions, repeated 4-grams, 4-grams): only a completion whose last token is a stop id
    stopped (cut_at_stop keeps the stop id last)."""
    health = data.sample_health([[5, 6, 7, 2], [9, 9, 9, 9, 9, 9], []], stop_ids=[2, 0])
    assert health.tolist() == [1, 3, 2, 4]


def test_every_row_logs_the_samples_health(straight):
    """sample_stop_rate and sample_repetition are shares in [0, 1] on every logged step."""
    for key in ("sample_stop_rate", "sample_repetition"):
        assert all(0 <= v <= 1 for v in read_metric(straight, key))
