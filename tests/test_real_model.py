"""The real pair (PRESET=smollm2): SmolLM2-135M-Instruct from the installed GGUF file, and its early-exit draft.

p = the target (SmolLM2-135M-Instruct, 30 layers), q = the draft (its first k layers + final norm + tied head).
These tests run the real pretrained weights offline: the conversion is exact, greedy speculative decoding is
the target's own greedy decoding token for token, the loss on the real logits is TRL's, generation stops at
the model's real stop ids, and prompts go through the model's own chat template.
"""
import os

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.experimental.gkd import GKDTrainer  # noqa: E402

import data  # noqa: E402
import divergences  # noqa: E402
import models  # noqa: E402
import specdec  # noqa: E402

K = 2                    # a shallow draft keeps these tests quick; the preset's depth is models.SMOLLM2_DRAFT_LAYERS
GSM8K = models.REPO / "data" / "gsm8k"


@pytest.fixture(scope="module")
def real_pair():
    """(target, draft, tokenizer) of the real pair, float32 on the CPU."""
    target_dir, draft_dir = models.ensure_smollm2_pair(K)
    target, draft, tok = models.load_pair(target_dir, draft_dir, device="cpu")
    return target, draft, tok


@pytest.fixture(scope="module")
def gsm8k_prompts(real_pair):
    """Five real GSM8k test questions through the model's chat template (lengths differ: a jagged batch)."""
    tok = real_pair[2]
    return data.task_prompts("gsm8k", tok, split="eval", n=5, source="file", path=GSM8K)


def test_converted_folder_equals_direct_gguf_load(real_pair, gsm8k_prompts):
    """The safetensors folder must be the GGUF model itself: its logits on real prompts equal those of
    transformers' direct GGUF load (both dequantize the same 4-bit weights to float32)."""
    direct, _ = models.load_gguf(models.smollm2_gguf())
    target = real_pair[0]
    ids = torch.tensor([gsm8k_prompts[0]])
    with torch.no_grad():
        torch.testing.assert_close(target(ids).logits, direct(ids).logits, rtol=0, atol=0)


def test_draft_is_the_targets_first_layers(real_pair):
    """The early-exit draft holds exactly the target's embedding, first K layers and final norm."""
    target, draft, _ = real_pair
    assert draft.config.num_hidden_layers == K
    t = target.state_dict()
    for name, w in draft.state_dict().items():
        assert torch.equal(w, t[name]), name


def test_the_budgets_target_depth_is_the_real_models(real_pair):
    """REAL.md's GPU estimate prices each target step by its layers: real_study.TARGET_LAYERS must be the
    real target's depth, not a number typed once."""
    from study import real_study

    assert real_pair[0].config.num_hidden_layers == real_study.TARGET_LAYERS


def test_chat_template_is_the_models_own(real_pair):
    """Prompts must be rendered by SmolLM2's own ChatML template (with the seed's system prompt), not ours."""
    tok = real_pair[2]
    ex = data.Example(prompt="What is 2 + 3?", reference="5\n#### 5")
    text = data.prompt_text(tok, "gsm8k", ex)
    assert text == (f"<|im_start|>system\n{data.SYSTEM_PROMPTS['gsm8k']}<|im_end|>\n"
                    "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")


def test_stop_ids_are_the_models_own(real_pair):
    """Generation must end on <|im_end|> (id 2, the end of an assistant turn) and <|endoftext|> (id 0)."""
    target, _, tok = real_pair
    protocol = models.decoding_protocol("smollm2", tok, target, task="gsm8k")
    assert set(protocol.stop_ids) == {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}
    assert set(protocol.stop_ids) == {0, 2}
    assert protocol.vocab_size == 49152


def test_generation_stops_at_the_real_stop_id(real_pair, gsm8k_prompts):
    """A completion ends at the first stop id the model emits (nothing after it), or fills the budget; and the
    real model does finish real answers with its own stop id (at least one of five within 160 tokens)."""
    target, _, tok = real_pair
    protocol = models.decoding_protocol("smollm2", tok, target, task="gsm8k", max_new_tokens=160)
    res = specdec.autoregressive_generate(target, gsm8k_prompts, seed=0, **protocol.generate_kwargs())
    stops = set(protocol.stop_ids)
    finished = [tokens for tokens in res.tokens if tokens[-1] in stops]
    assert finished
    for tokens in res.tokens:
        assert not set(tokens[:-1]) & stops
        assert tokens[-1] in stops or len(tokens) == 160


def hf_greedy(model, prompt, n, stops):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                         eos_token_id=stops, pad_token_id=1)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("batch", [1, 5])
def test_greedy_speculative_equals_targets_generate(real_pair, gsm8k_prompts, batch):
    """Speculative decoding is exact: at temperature 0 it must emit the target's own greedy tokens (transformers'
    generate), token for token, alone and in a jagged batch of real prompts."""
    target, draft, _ = real_pair
    prompts = gsm8k_prompts[:batch]
    stops = [2, 0]
    res = specdec.speculative_generate(target, draft, prompts, gamma=5, max_new_tokens=40, temperature=0,
                                       eos_token_id=stops, vocab_size=49152)
    assert res.tokens == [hf_greedy(target, p, 40, stops) for p in prompts]


@pytest.mark.parametrize("kind,beta", [("fkl", 0.0), ("rkl", 1.0), ("jsd", 0.5)])
def test_loss_on_real_logits_equals_trl(real_pair, gsm8k_prompts, kind, beta):
    """The loss the loop runs (from hidden states, the real tied 49152 x 576 heads) must equal TRL's
    generalized_jsd_loss on the real pair's logits of a real prompt (mean over the tokens)."""
    target, draft, _ = real_pair
    ids = torch.tensor([gsm8k_prompts[0]])
    with torch.no_grad():
        t_out = target(ids, output_hidden_states=True)
        s_out = draft(ids, output_hidden_states=True)
    t_hidden, s_hidden = t_out.hidden_states[-1][0], s_out.hidden_states[-1][0]        # (T, 576), after the norm
    ours = divergences.hidden_divergence_sum((s_hidden, draft.lm_head.weight), (t_hidden, target.lm_head.weight),
                                             None, divergences.Divergence(kind, beta=beta, temperature=0.6))
    ours = ours.total / ids.shape[1]
    ref = GKDTrainer.generalized_jsd_loss(s_out.logits, t_out.logits, beta=beta, temperature=0.6,
                                          reduction="batchmean") / ids.shape[1]
    torch.testing.assert_close(ours.float(), ref.float(), rtol=2e-4, atol=1e-6)


def test_a_corrupt_gguf_is_refused_in_one_line(tmp_path):
    """A file that is not GGUF (a cut-off download, another format) is named before anything loads."""
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        models.check_gguf_paths(teacher=str(bad))
    with pytest.raises(ValueError, match="does not exist"):
        models.check_gguf_paths(student=str(tmp_path / "missing.gguf"))


def test_a_draft_deeper_than_the_target_is_refused(real_pair, tmp_path):
    """k must leave the draft shallower than the target (1..depth-1): a k of 30 or more is an error naming k."""
    target_dir, _ = models.ensure_smollm2_pair(K)
    with pytest.raises(ValueError, match="k = 30 layers from a target of 30"):
        models.truncated_draft(target_dir, 30, tmp_path / "d")


def test_a_gguf_path_is_read_as_its_converted_folder(real_pair):
    """--teacher / --student may name a .gguf file: it is read through a safetensors folder converted once
    (checkpoints/gguf/<name>-<sha>), holding the same weights as the preset's target."""
    folder = models.model_folder(str(models.smollm2_gguf()))
    assert folder.endswith(f"{models.smollm2_gguf().stem}-" + models._file_stamp(models.smollm2_gguf())["sha256"][:12])
    converted = models.load_model(folder, device="cpu").state_dict()
    target = real_pair[0].state_dict()
    assert converted.keys() == target.keys() and all(torch.equal(converted[k], target[k]) for k in target)
