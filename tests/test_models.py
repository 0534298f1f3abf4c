"""models.py: presets, the tiny pair (built at test scale), the loader, the summary math."""
import math

import pytest
import torch

from plumbing import cli
import data
import models
import specdec


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt")


@pytest.fixture(scope="module")
def pairs(root):
    """Both tiny pairs at test scale (seconds), built once for the module."""
    return {task: models.ensure_tiny_pair(task, root=root, scale="test") for task in models.preset_tasks("tiny")}


# ---- presets ------------------------------------------------------------------------------

def test_paper_preset_is_the_seeds():
    """WHY: users with a GPU must get exactly the seed's models and hyper-parameters."""
    g, c = models.preset_config("paper", "gsm8k"), models.preset_config("paper", "cnndm")
    assert (g["teacher"], g["student"]) == ("Qwen/Qwen3-4B-Instruct-2507", "Qwen/Qwen3-0.6B")
    assert (c["teacher"], c["student"]) == ("HuggingFaceTB/SmolLM-1.7B-Instruct", "HuggingFaceTB/SmolLM-360M-Instruct")
    assert (g["lr"], g["temperature"], g["max_new_tokens"]) == (5e-5, 0.6, 312)
    assert (c["lr"], c["temperature"], c["max_new_tokens"]) == (7e-5, 0.7, 128)
    assert g["top_p"] == c["top_p"] == 0.95 and g["gamma"] == c["gamma"] == 5


def test_preset_config_is_a_copy():
    """WHY: a caller overriding a value must not change the table for everyone else."""
    models.preset_config("tiny", "gsm8k")["stop_tokens"].append("x")
    models.preset_config("tiny", "gsm8k")["lr"] = 1.0
    assert "x" not in models.preset_config("tiny", "gsm8k")["stop_tokens"]
    assert models.preset_config("tiny", "gsm8k")["lr"] == models.PRESETS["tiny"]["gsm8k"]["lr"]


@pytest.mark.parametrize("call, match", [
    (lambda: models.preset_config("huge", "gsm8k"), "paper, tiny"),
    (lambda: models.preset_config("tiny", "squad"), "gsm8k, cnndm"),
    (lambda: models.resolve_pair("squad", "tiny"), "gsm8k, cnndm"),
    (lambda: models.ensure_tiny_pair("gsm8k", scale="huge"), "full, test"),
])
def test_bad_names_list_valid_ones(call, match):
    """WHY: a typo must name the valid choices, before any model is built or downloaded."""
    with pytest.raises(ValueError, match=match):
        call()


def test_paper_preset_offline_fails_early_naming_files(monkeypatch):
    """WHY: offline, the paper preset must stop at once and say what to download, not hang
    in from_pretrained retries (conftest sets HF_HUB_OFFLINE=1; the cache is treated as empty)."""
    monkeypatch.setattr(models, "_cached", lambda repo_id: False)
    with pytest.raises(RuntimeError, match=r"Qwen/Qwen3-4B-Instruct-2507.*safetensors.*huggingface-cli download"):
        models.resolve_pair("gsm8k", "paper")


# ---- the tiny pair ------------------------------------------------------------------------

@pytest.mark.parametrize("task, model_type", [("gsm8k", "qwen3"), ("cnndm", "llama")])
def test_tiny_pair_reloads_as_plain_hf_models(pairs, task, model_type):
    """WHY: the rest of the project treats the tiny pair like hub models (Auto* classes,
    safetensors), in the paper pair's architecture family; the student is the smaller one."""
    from transformers import AutoModelForCausalLM
    d = pairs[task]
    assert (d / "teacher" / "model.safetensors").exists()
    t = AutoModelForCausalLM.from_pretrained(d / "teacher")
    s = AutoModelForCausalLM.from_pretrained(d / "student")
    assert t.config.model_type == s.config.model_type == model_type
    assert sum(p.numel() for p in s.parameters()) < sum(p.numel() for p in t.parameters())


def test_tiny_tokenizer_has_distinct_pad_and_stop_ids(pairs):
    """WHY: pad == eos made the seed's TRL mask every EOS, so its student never learned to
    stop; the chat template and stop ids must also survive save/load."""
    tok = models.load_tokenizer(pairs["gsm8k"] / "teacher")
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    stops = models.stop_ids(tok)
    assert tok.convert_tokens_to_ids("<|im_end|>") in stops and tok.pad_token_id not in stops
    t = models.load_model(pairs["gsm8k"] / "teacher")
    assert set(t.generation_config.eos_token_id) == set(stops)


def test_tiny_pair_shares_tokenizer_and_covers_vocab(pairs):
    """WHY: speculative decoding compares p and q token by token: one vocabulary, and both
    lm_heads wide enough for it (padded beyond it, as Qwen's are)."""
    t, s, tok = models.load_pair(pairs["cnndm"] / "teacher", pairs["cnndm"] / "student")
    assert models.same_tokenizer(tok, models.load_tokenizer(pairs["cnndm"] / "student"))
    for m in (t, s):
        assert m.config.vocab_size % 64 == 0 and m.config.vocab_size >= len(tok)


def test_tiny_pair_generates(pairs):
    """WHY: the student samples on-policy and the teacher verifies: both must generate from a
    chat prompt with transformers' own generate."""
    t, s, tok = models.load_pair(pairs["gsm8k"] / "teacher", pairs["gsm8k"] / "student")
    prompt = torch.tensor([data.task_prompts("gsm8k", tok, n=1)[0]])        # (1, P)
    for m in (t, s):
        out = m.generate(prompt, max_new_tokens=5, do_sample=False, min_new_tokens=5)
        assert out.shape == (1, prompt.shape[1] + 5)


def test_tiny_pair_is_cached(pairs, root):
    """WHY: built on first use only; later calls must reuse the folder, not retrain."""
    stamp = (pairs["gsm8k"] / "teacher" / "model.safetensors").stat().st_mtime_ns
    assert models.ensure_tiny_pair("gsm8k", root=root, scale="test") == pairs["gsm8k"]
    assert (pairs["gsm8k"] / "teacher" / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_pair_built_with_other_sizes_is_not_reused(pairs, root, monkeypatch):
    """WHY: a checkpoints/ folder from before a change of the pair's shapes or budgets must be rebuilt, not
    silently evaluated as the new pair: the build stamp holds SCALES[scale], so a different depth (or step
    count) no longer matches, while the unchanged sizes still do."""
    d = pairs["gsm8k"]
    assert models._is_built(d, "gsm8k", 0, "test")
    bigger = {**models.SCALES["test"], "teacher": {**models.SCALES["test"]["teacher"], "layers": 3}}
    monkeypatch.setitem(models.SCALES, "test", bigger)
    assert not models._is_built(d, "gsm8k", 0, "test")


def test_the_full_pair_is_shaped_for_speculative_decoding():
    """WHY: on a CPU these small models cost mostly per-call overhead, which grows with depth: speculative
    decoding pays only if the draft's step is far cheaper than the target's, so the draft has a single layer
    and the teacher many (issue 19: the old 4-layer / 2-layer pair had c = 0.6 and ran at 0.5-0.6x)."""
    full = models.SCALES["full"]
    assert full["student"]["layers"] == 1 and full["teacher"]["layers"] >= 8 * full["student"]["layers"]


def test_tiny_pair_is_reproducible(pairs, tmp_path):
    """WHY: a result must be reproducible from the seed: a rebuild gives the same weights."""
    from safetensors.torch import load_file
    again = models.ensure_tiny_pair("cnndm", root=tmp_path, scale="test")
    a = load_file(pairs["cnndm"] / "student" / "model.safetensors")
    b = load_file(again / "student" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- the loader ---------------------------------------------------------------------------

def test_load_pair_rejects_different_tokenizers(pairs):
    """WHY: a draft over another vocabulary cannot be verified token by token."""
    with pytest.raises(ValueError, match="different tokenizers"):
        models.load_pair(pairs["gsm8k"] / "teacher", pairs["cnndm"] / "student")


def test_load_pair_accepts_lm_heads_of_different_widths(pairs, tmp_path):
    """WHY: real pairs pad their lm_heads differently (Qwen2.5: 151936 vs 152064 rows); the
    pair is still valid, compared on the first len(tokenizer) logits."""
    from transformers import AutoModelForCausalLM
    s = AutoModelForCausalLM.from_pretrained(pairs["gsm8k"] / "student")
    s.resize_token_embeddings(s.config.vocab_size + 64)
    s.save_pretrained(tmp_path / "wide")
    models.load_tokenizer(pairs["gsm8k"] / "student").save_pretrained(tmp_path / "wide")
    t, s, tok = models.load_pair(pairs["gsm8k"] / "teacher", tmp_path / "wide")
    ids = torch.tensor([data.task_prompts("gsm8k", tok, n=1)[0]])
    wt, ws = t(ids).logits.shape[-1], s(ids).logits.shape[-1]
    assert ws == wt + 64 and min(wt, ws) >= len(tok)


def test_8bit_teacher_matches_float(pairs):
    """WHY: the seed ran its teacher in 8 bits; the bitsandbytes path must load and give
    nearly the float model's next-token distribution."""
    d = pairs["gsm8k"] / "teacher"
    tok = models.load_tokenizer(d)
    ids = torch.tensor(data.task_prompts("gsm8k", tok, n=2)[0][:40])[None]    # (1, T)
    f = models.load_model(d)
    q = models.load_model(d, load_in_8bit=True)
    assert any("8bit" in type(m).__name__ for m in q.modules())
    with torch.no_grad():
        lf, lq = f(ids).logits, q(ids).logits                                # (1, T, V)
    assert (lf - lq).abs().max() < 0.05 * lf.abs().max()
    pf, pq = lf.softmax(-1), lq.softmax(-1)
    assert (1 - specdec.acceptance_prob(pf, pq)).max() < 0.05                 # TVD


def test_missing_tiny_checkpoint_says_how_to_build(tmp_path):
    """WHY: loading a tiny path before it is built must say `make models`, not a hub error."""
    with pytest.raises(FileNotFoundError, match="make models"):
        models.load_model(models.preset_config("tiny", "gsm8k")["teacher"].replace("gsm8k", "nope"))


# ---- the summary math ---------------------------------------------------------------------

def test_process_logits_top_p_keeps_the_nucleus():
    """WHY: entropy and alpha are measured on p after temperature and top-p, as sampled."""
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    p = specdec.process_logits(logits, 1.0, top_p=0.8)
    assert torch.allclose(p, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    assert torch.allclose(specdec.process_logits(logits, 1.0), torch.tensor([0.5, 0.3, 0.15, 0.05]))


def test_entropy_and_overlap_limits():
    """WHY: H(uniform over V) = log V, and beta = sum min(p, q) is 1 iff p == q, 0 if disjoint."""
    u = torch.full((7,), 1 / 7)
    assert math.isclose(specdec.entropy(u).item(), math.log(7), rel_tol=1e-6)
    a, b = torch.tensor([1.0, 0, 0]), torch.tensor([0, 0.5, 0.5])
    assert specdec.acceptance_prob(u, u).item() == pytest.approx(1.0)
    assert specdec.acceptance_prob(a, b).item() == 0.0


def test_self_draft_has_alpha_one(pairs):
    """WHY: a draft identical to the target is always accepted: the summary's alpha must be 1
    (catches off-by-one positions between sampled tokens and their distributions)."""
    t, _, tok = models.load_pair(pairs["gsm8k"] / "teacher", pairs["gsm8k"] / "student")
    protocol = models.decoding_protocol("tiny", tok, t, task="gsm8k", max_new_tokens=8)
    s = models.pair_summary(t, t, tok, "gsm8k", protocol, n_prompts=3)
    assert s["alpha"] == pytest.approx(1.0, abs=1e-5)
    assert 0 < s["teacher_entropy"] <= math.log(len(tok))


def test_pad_equal_to_eos_is_replaced(pairs, tmp_path):
    """WHY: hub tokenizers that pad with eos (SmolLM-Instruct) reproduce the seed's bug:
    masking pads masks every EOS. The loader must pick a pad that is no stop id."""
    tok = models.load_tokenizer(pairs["cnndm"] / "teacher")
    tok.pad_token = tok.eos_token
    tok.save_pretrained(tmp_path)
    again = models.load_tokenizer(tmp_path)
    assert again.pad_token_id != again.eos_token_id
    assert again.pad_token_id not in models.stop_ids(again)


# ---- interrupted builds, --threads ----------------------------------------------------------

def test_leftover_build_folders_are_removed_unless_a_build_runs(pairs, root):
    """An interrupted `make report` (a build killed before its clean-up) left empty .cnndm-XXXXXXXX folders
    in checkpoints/tiny/ forever. The next use of the pair removes them; while a build holds the lock, its
    folder is not a leftover and stays."""
    d = models.tiny_dir("cnndm", root, scale="test")
    leftover = d.parent / ".cnndm-k1l2m3n4"
    leftover.mkdir()
    with models._BuildLock(d.parent / f".{d.name}.lock"):        # a build of cnndm is running
        assert models.ensure_tiny_pair("cnndm", root=root, scale="test") == d
        assert leftover.exists()
    assert models.ensure_tiny_pair("cnndm", root=root, scale="test") == d
    assert not leftover.exists() and (d / "teacher").is_dir()


def test_models_py_takes_threads_like_every_script(capsys):
    """The README says every script takes --threads; models.py refused it as an unknown option. It takes it,
    and a bad count is the one-line error naming what is allowed."""
    with pytest.raises(SystemExit) as e:
        cli.script_main(models.main, ["--threads", "0", "--build-only"])
    assert e.value.code == 2
    assert "--threads 0 is not allowed; --threads must be an integer >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("k", [30, 31])
def test_draft_layers_the_target_lacks_are_refused_before_the_build(k, tmp_path, monkeypatch,
                                                                   capsys):
    """Audit: `models.py --preset smollm2 --draft-layers 31` converted the 30-layer target, then
    failed in truncated_draft with a traceback (leaving a lock file behind). The draft is the
    target's first k layers: k must leave the target at least one more, and the target's depth is
    read from its GGUF header, so a k outside 1..29 is the one line naming the target's 30 layers,
    with nothing built."""
    monkeypatch.setattr(models, "ensure_smollm2_pair",
                        lambda *a, **kw: pytest.fail("built before --draft-layers was checked"))
    with pytest.raises(SystemExit) as e:
        cli.script_main(models.main, ["--preset", "smollm2", "--draft-layers", str(k),
                                      "--root", str(tmp_path / "ckpt")])
    assert e.value.code == 2
    assert capsys.readouterr().err == (f"error: --draft-layers {k} is not allowed; the smollm2 "
                                       f"target has 30 layers and the draft is its first k: "
                                       f"--draft-layers must be in 1..29\n")
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("argv, match", [
    (["--root", "FILE"], r"--root .*afile is a file, not a directory"),
    (["--n-prompts", "0"], r"--n-prompts 0 is not allowed; --n-prompts must be >= 1"),
    (["--n-prompts", "-5"], r"--n-prompts -5 is not allowed; --n-prompts must be >= 1"),
    (["--seed", "-1"], r"--seed -1 is not allowed; --seed must be an integer >= 0 and <= 4294967295"),
    (["--seed", str(2**64)], r"--seed 18446744073709551616 is not allowed"),
])
def test_models_py_refuses_bad_options_before_building(argv, match, tmp_path, monkeypatch):
    """Issue 31: `models.py --root <a file>` and `--n-prompts 0` / `-5` ended in tracebacks (the latter with a
    wrong message about article lengths) after the pairs were built or loaded; they are the user's to fix."""
    def no_build(*a, **k):
        raise AssertionError("a pair was built or loaded before the options were checked")
    monkeypatch.setattr(models, "ensure_tiny_pair", no_build)
    monkeypatch.setattr(models, "build_in_parallel", no_build)
    (tmp_path / "afile").write_text("")
    argv = [str(tmp_path / "afile") if a == "FILE" else a for a in argv]
    with pytest.raises(ValueError, match=match):
        models.main(["--task", "gsm8k", "--root", str(tmp_path / "ckpt"), *argv])
