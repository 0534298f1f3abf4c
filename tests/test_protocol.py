"""models.decoding_protocol: one decoding protocol for training, evaluation, the summary and the report.

p = target/teacher, q = draft/student. Every place that samples or verifies must see the same temperature,
top-p, top-k, stop ids and vocabulary (len(tokenizer): an lm_head's padding rows are not tokens)."""
import shutil
from pathlib import Path

import pytest
import torch

import data
import distill
from study import evaluate
import models
from study import report
import specdec

KEYS = ("temperature", "top_p", "top_k", "max_new_tokens", "eos_token_id", "vocab_size")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(teacher_dir, student_dir) of the reduced tiny gsm8k pair (lm_heads padded to a multiple of 64)."""
    root = models.ensure_tiny_pair("gsm8k", root=tmp_path_factory.mktemp("ckpt"), scale="test")
    return str(Path(root) / "teacher"), str(Path(root) / "student")


@pytest.fixture(scope="module")
def wide(tiny, tmp_path_factory):
    """The same pair with lm_heads of two different widths, both wider than the tokenizer (Qwen3-4B and
    Qwen3-0.6B pad 151669 tokens to 151936 rows; other pairs pad differently): teacher +64, student +128."""
    from transformers import AutoModelForCausalLM
    root = tmp_path_factory.mktemp("wide")
    out = []
    for role, src, extra in (("teacher", tiny[0], 64), ("student", tiny[1], 128)):
        m = AutoModelForCausalLM.from_pretrained(src)
        m.resize_token_embeddings(m.config.vocab_size + extra)
        m.save_pretrained(root / role)
        models.load_tokenizer(src).save_pretrained(root / role)
        shutil.copy(Path(src) / "generation_config.json", root / role / "generation_config.json")
        out.append(str(root / role))
    return tuple(out)


def test_protocol_reads_every_decoding_key_of_the_preset(tiny):
    """The preset's decoding keys (gamma, temperature, top_p, top_k, max_new_tokens, stop_tokens) are what the
    protocol holds, overrides replace them, and None keeps the preset's (an unset command-line flag)."""
    teacher, _, tok = models.load_pair(*tiny)
    cfg = models.preset_config("tiny", "gsm8k")
    p = models.decoding_protocol(cfg, tok, teacher)
    assert (p.gamma, p.temperature, p.top_p, p.top_k, p.max_new_tokens) == (
        cfg["gamma"], cfg["temperature"], cfg["top_p"], cfg["top_k"], cfg["max_new_tokens"])
    assert p.vocab_size == len(tok) < teacher.get_output_embeddings().weight.shape[0]
    assert tok.convert_tokens_to_ids("<|im_end|>") in p.stop_ids
    assert models.decoding_protocol("tiny", tok, teacher, task="gsm8k") == p
    q = models.decoding_protocol(cfg, tok, teacher, gamma=3, top_p=None, temperature=0.0)
    assert (q.gamma, q.top_p, q.temperature) == (3, cfg["top_p"], 0.0)
    only_eos = dict(cfg, stop_tokens=["<|im_end|>"])  # the preset's stop_tokens is read
    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    teacher.generation_config.eos_token_id = tok.eos_token_id
    try:
        assert bos in models.decoding_protocol(cfg, tok, teacher).stop_ids
        assert bos not in models.decoding_protocol(only_eos, tok, teacher).stop_ids
    finally:
        teacher.generation_config.eos_token_id = models.stop_ids(tok)


def test_protocol_kwargs_are_those_of_specdec(tiny):
    """The protocol's keyword arguments are accepted by specdec's two generators as they are (gamma only by
    speculative_generate), so no caller re-assembles them."""
    teacher, student, tok = models.load_pair(*tiny)
    p = models.decoding_protocol("tiny", tok, teacher, task="gsm8k", max_new_tokens=3)
    prompts = data.task_prompts("gsm8k", tok, n=2)
    assert set(p.speculative_kwargs()) - set(p.generate_kwargs()) == {"gamma"}
    specdec.autoregressive_generate(student, prompts, seed=0, **p.generate_kwargs())
    specdec.speculative_generate(teacher, student, prompts, seed=0, **p.speculative_kwargs())


def test_bad_protocol_input_is_named(tiny):
    """An unknown override, or a model whose lm_head cannot hold the tokenizer, fails with a clear error."""
    teacher, _, tok = models.load_pair(*tiny)
    with pytest.raises(ValueError, match=r"unknown decoding override.*top_q.*valid: gamma"):
        models.decoding_protocol("tiny", tok, teacher, task="gsm8k", top_q=0.9)
    small = models.load_tokenizer(tiny[0])
    small.add_tokens([f"<extra{i}>" for i in range(200)])
    with pytest.raises(ValueError, match="fewer than the"):
        models.decoding_protocol("tiny", small, teacher, task="gsm8k")


@pytest.mark.parametrize("which", ["tiny", "wide"])
def test_training_evaluation_summary_and_report_decode_alike(which, tiny, wide, tmp_path, monkeypatch):
    """Training's on-policy sampling, evaluate.py's speculative decoding, the pair summary and the report's
    teacher profile pass specdec the same temperature, top-p, top-k, max_new_tokens, stop ids and vocabulary
    (len(tokenizer), below every lm_head width), and the loss compares the same len(tokenizer) logits: a draft
    is never trained on one vocabulary and evaluated on another, for the tiny pair and a wider-headed pair."""
    pair = tiny if which == "tiny" else wide
    seen, probing = {}, []

    def spy(name, fn):
        def wrapped(*args, **kw):
            seen.setdefault("cost probe" if probing else name, []).append({k: kw.get(k) for k in KEYS})
            return fn(*args, **kw)
        return wrapped

    def probe(fn):      # evaluate.cost_ratio times fixed-length steps (no stop ids, 1 or 17 tokens)
        def wrapped(*args, **kw):
            probing.append(1)
            try:
                return fn(*args, **kw)
            finally:
                probing.pop()
        return wrapped

    monkeypatch.setattr(evaluate, "cost_ratio", probe(evaluate.cost_ratio))

    monkeypatch.setattr(specdec, "autoregressive_generate", spy("sample", specdec.autoregressive_generate))
    monkeypatch.setattr(specdec, "speculative_generate", spy("verify", specdec.speculative_generate))
    loss_vocab = []                       # the loop projects inside the loss: the vocabulary it is told to keep
    sum_fn = distill.divergences.hidden_divergence_sum
    monkeypatch.setattr(distill.divergences, "hidden_divergence_sum",
                        lambda *a, **k: loss_vocab.append(k["vocab_size"]) or sum_fn(*a, **k))

    distill.main(["--task", "gsm8k", "--teacher", pair[0], "--student", pair[1], "--out", str(tmp_path / "run"),
                  "--steps", "1", "--batch-size", "2", "--n-train", "2", "--save-every", "1",
                  "--lr", "2e-3"])                   # the pair is built here, not a tiny pair: the lr is chosen
    (tmp_path / "none").mkdir()
    evaluate.main(["--task", "gsm8k", "--teacher", pair[0], "--student", pair[1], "--runs", str(tmp_path / "none"),
                   "--results", str(tmp_path / "res"), "--n-prompts", "2"])
    teacher, student, tok = models.load_pair(*pair)
    p = models.decoding_protocol("tiny", tok, teacher, task="gsm8k")
    seen["summary"] = []
    monkeypatch.setattr(specdec, "speculative_generate", spy("summary", specdec.speculative_generate))
    models.specdec_summary(teacher, student, tok, "gsm8k", p, n_prompts=2)
    monkeypatch.setattr(models, "resolve_pair", lambda task, preset: pair)
    report.teacher_profile(report.ReportConfig(n_profile=2), "gsm8k")  # samples through specdec too

    expected = {**p.generate_kwargs(), "eos_token_id": list(p.stop_ids)}
    assert p.vocab_size == len(tok) < min(m.get_output_embeddings().weight.shape[0] for m in (teacher, student))
    assert set(seen) == {"sample", "verify", "summary", "cost probe"} and len(seen["sample"]) >= 2
    for call in seen.pop("cost probe"):   # the timing probe samples the same distribution, for fixed lengths
        assert {k: call[k] for k in ("temperature", "top_p", "top_k", "vocab_size")} == {
            k: expected[k] for k in ("temperature", "top_p", "top_k", "vocab_size")}
    for name, calls in seen.items():
        for call in calls:
            assert {k: (sorted(v) if k == "eos_token_id" else v) for k, v in call.items()} == expected, name
    assert loss_vocab and all(v == len(tok) for v in loss_vocab)
