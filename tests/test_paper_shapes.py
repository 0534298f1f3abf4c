"""The paper preset end to end on paper-shaped pairs: the real Qwen3 tokenizer (151669 tokens, two real
chat templates, stop ids 151645 and 151643) and the real lm_head width (151936 rows, 267 of them padding),
with random weights of small depth and width (models.build_paper_shaped_pair). p = teacher, q = student.

What only the real files exercise: the prompt ids are the teacher's chat template (also for a student
whose own template is Qwen3-0.6B's hybrid-thinking one), Qwen3's two stop ids, and padding rows that the
tiny pairs' tests never see at this width. Everything offline, from tests/fixtures/.
"""
import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import data
import distill
from study import evaluate
import models
from plumbing import rundir
import reference
import specdec

FIXTURES = Path(__file__).parent / "fixtures"
GSM8K = FIXTURES / "gsm8k"
V_TOKENS, V_ROWS = 151669, 151936
IM_END, ENDOFTEXT = 151645, 151643


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A paper-shaped teacher (Instruct-2507 template) and student (Qwen3-0.6B's hybrid template)."""
    return models.build_paper_shaped_pair(tmp_path_factory.mktemp("paper"), student_template="hybrid")


@pytest.fixture(scope="module")
def loaded(pair):
    return models.load_pair(*pair)


def test_paper_shaped_pair_has_the_real_token_side(pair, loaded):
    """The helper must give what the paper's models have: 151669 tokenizer tokens over a 151936-row tied
    lm_head, stop ids (151645, 151643) and pad 151643 from the real generation_config.json, bos 151643."""
    teacher, student, tok = loaded
    assert len(tok) == V_TOKENS
    for model in (teacher, student):
        assert model.get_output_embeddings().weight.shape[0] == V_ROWS
        assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
        assert model.generation_config.eos_token_id == [IM_END, ENDOFTEXT]
        assert model.generation_config.pad_token_id == ENDOFTEXT
    assert models.generation_stop_ids(tok, teacher) == [ENDOFTEXT, IM_END]
    assert (tok.eos_token_id, tok.pad_token_id) == (IM_END, ENDOFTEXT)


def test_prompts_use_the_teacher_template_for_both_models(pair, loaded):
    """The thinking-mode rule: prompts are rendered once, with the TEACHER's chat template, and the student
    reads the same ids. Qwen3-0.6B's hybrid template with thinking on renders a single-turn prompt
    byte-identically (so the rule changes nothing for it); its enable_thinking=False rendering appends an
    empty <think></think> block that the Instruct-2507 teacher never writes, and is NOT what either model
    sees. Fails if load_pair handed back the student's tokenizer or a thinking-off rendering."""
    _, _, tok = loaded
    teacher_tok = AutoTokenizer.from_pretrained(str(pair[0]))
    student_tok = AutoTokenizer.from_pretrained(str(pair[1]))
    assert teacher_tok.chat_template != student_tok.chat_template and "enable_thinking" in student_tok.chat_template
    for ex in data.file_examples("gsm8k", "train", GSM8K)[:3]:
        msgs = data.chat_messages("gsm8k", ex)
        ids = data.build_prompt_ids(tok, "gsm8k", ex)
        teacher_ids = teacher_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        assert ids == teacher_tok(teacher_ids, add_special_tokens=False)["input_ids"]
        assert ids == data.build_prompt_ids(student_tok, "gsm8k", ex)  # hybrid, thinking on: same bytes
        no_think = student_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False,
                                                   enable_thinking=False)
        assert no_think.endswith("<think>\n\n</think>\n\n") and student_tok(no_think)["input_ids"] != ids
        assert tok.convert_ids_to_tokens(ids[-3:]) == ["<|im_start|>", "assistant", "Ċ"]


def test_first_stop_id_is_kept_in_the_loss_and_nothing_after(loaded):
    """Qwen3 stops on either 151645 or 151643, and 151643 is also the pad id: the completion must be cut
    after the FIRST stop id (whichever it is), that stop token must be in the loss mask (the student must
    learn to stop), and the padding that follows (the same id 151643) must not be."""
    teacher, _, tok = loaded
    stop = models.generation_stop_ids(tok, teacher)
    for first in (IM_END, ENDOFTEXT):
        c = data.cut_at_stop([11, 22, first, 33, IM_END], stop, 10)
        assert c == [11, 22, first]
        batch = data.build_batch([[1, 2, 3], [4]], [c, [11]], tok.pad_token_id)
        P = batch["prompt_width"]
        assert batch["loss_mask"][0, P:].tolist() == [True, True, True]
        assert batch["input_ids"][0, P + 2] == first
        assert batch["loss_mask"][1, P:].tolist() == [True, False, False]  # padded with 151643, not in the loss


def _with_loud_padding_rows(model, scale: float):
    """A copy of a model whose 267 padding rows of the (tied) lm_head are replaced by large random vectors:
    any code that let them into a softmax would now see them dominate."""
    loud = copy.deepcopy(model)
    with torch.no_grad():
        w = loud.get_output_embeddings().weight
        w[V_TOKENS:] = scale * torch.randn(w.shape[0] - V_TOKENS, w.shape[1],
                                           generator=torch.Generator().manual_seed(0))
    return loud


def test_padding_rows_get_no_probability_in_sampling_or_verification(loaded):
    """With vocab_size = len(tokenizer), neither autoregressive sampling nor speculative verification may give
    the 267 padding rows any probability: the generated tokens (same seeds) must be identical whether those
    rows are random-small or loud (scale 50, they would win every softmax), and all ids < 151669."""
    teacher, student, tok = loaded
    prompts = [[9707, 11, 1879], [785, 4226]]
    rules = dict(max_new_tokens=4, temperature=1.0, top_p=0.95, eos_token_id=[], vocab_size=len(tok))
    outs = []
    for t, s in ((teacher, student), (_with_loud_padding_rows(teacher, 50.0), _with_loud_padding_rows(student, 50.0))):
        ar = specdec.autoregressive_generate(t, prompts, seed=0, **rules).tokens
        sd = specdec.speculative_generate(t, s, prompts, gamma=2, seed=0, **rules).tokens
        outs.append((ar, sd))
        assert max(max(row) for row in ar + sd) < V_TOKENS
    assert outs[0] == outs[1]


def test_padding_rows_never_enter_the_loss(loaded):
    """The loss compares the real 151669 tokens only: setting the padding columns of both logits to +100
    (they would take nearly all the mass) must leave every divergence unchanged."""
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, V_ROWS, generator=gen), torch.randn(2, 3, V_ROWS, generator=gen)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    for div in ("fkl", "rkl", "jsd", "tvd"):
        divergence = distill.divergences.Divergence(div, 0.5, 0.6)
        base = reference.batch_divergence_sum(s, t, mask, divergence, V_TOKENS).total
        s2, t2 = s.clone(), t.clone()
        s2[..., V_TOKENS:], t2[..., V_TOKENS:] = 100.0, 100.0
        assert torch.allclose(reference.batch_divergence_sum(s2, t2, mask, divergence, V_TOKENS).total, base)


def test_paper_preset_end_to_end(pair, tmp_path, monkeypatch):
    """`distill.py --preset paper` on the paper-shaped pair and local GSM8k rows for 2 steps, then the
    distilled student evaluated as a draft (evaluate.evaluate_draft) and used as `assistant_model` in
    transformers' generate. The sampler must be fed the teacher-template prompt ids and Qwen3's two stop
    ids, and must only emit real tokens; the run must write 2 finite metric rows and a final student whose
    saved tokenizer carries the teacher's template."""
    teacher_dir, student_dir = pair
    seen = []
    real_generate = specdec.autoregressive_generate

    def spy(model, prompts, **kw):
        res = real_generate(model, prompts, **kw)
        seen.append((prompts, kw["eos_token_id"], kw["vocab_size"], res.tokens))
        return res

    monkeypatch.setattr(specdec, "autoregressive_generate", spy)
    group = rundir.task_group("gsm8k", "file", GSM8K, "hub")          # the paper preset's own data: the hub
    out = tmp_path / "runs" / "paper" / group / "rkl-s0"             # where evaluate.py looks for drafts
    distill.main(["--preset", "paper", "--task", "gsm8k", "--teacher", str(teacher_dir), "--student",
                  str(student_dir), "--source", "file", "--data-path", str(GSM8K), "--steps", "2",
                  "--batch-size", "2", "--max-new-tokens", "8", "--out", str(out), "--device", "cpu"])
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["loss_teacher_entropy"], r["grad_norm"]])).all() for r in rows)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["preset"], cfg["temperature"], cfg["top_p"]) == ("paper", 0.6, 0.95)

    teacher_tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    exs = data.file_examples("gsm8k", "train", GSM8K)
    expected_prompts = {tuple(data.build_prompt_ids(teacher_tok, "gsm8k", ex)) for ex in exs}
    assert len(seen) == 2
    for prompts, stop_ids, vocab, tokens in seen:
        assert all(tuple(p) in expected_prompts for p in prompts)
        assert stop_ids == [ENDOFTEXT, IM_END] and vocab == V_TOKENS
        assert all(0 <= t < V_TOKENS for row in tokens for t in row)

    final = out / "final"
    assert AutoTokenizer.from_pretrained(str(final)).chat_template == teacher_tok.chat_template
    # evaluate.py as a user runs it offline: --preset paper --teacher DIR --student DIR --data-path PATH
    docs = evaluate.main(["--preset", "paper", "--task", "gsm8k", "--teacher", str(teacher_dir), "--student",
                          str(student_dir), "--data-path", str(GSM8K), "--runs", str(tmp_path / "runs"),
                          "--results", str(tmp_path / "results"), "--n-prompts", "2", "--max-new-tokens", "6",
                          "--gamma", "3", "--batch-size", "2", "--record"])
    doc = docs["gsm8k"]
    assert set(doc["runs"]) == {"baseline", "rkl-s0"}
    assert doc["protocol"]["stop_ids"] == [ENDOFTEXT, IM_END] and doc["protocol"]["vocab_size"] == V_TOKENS
    res = doc["runs"]["rkl-s0"]
    assert len(res["per_prompt"]["drafted"]) == 2 and res["generated_tokens"] > 0
    assert 0.0 <= res["pooled_acceptance"] <= 1.0
    assert all(0 <= h <= torch.log(torch.tensor(float(V_TOKENS))) + 1e-4 for h in res["records"]["teacher_entropy"])
    teacher, draft, tok = models.load_pair(teacher_dir, final)
    test_prompts = [data.build_prompt_ids(tok, "gsm8k", ex) for ex in data.file_examples("gsm8k", "eval", GSM8K)[:2]]

    ids = torch.tensor([test_prompts[0]])
    out_ids = teacher.generate(ids, attention_mask=torch.ones_like(ids), assistant_model=draft, do_sample=False,
                               max_new_tokens=5, min_new_tokens=5, pad_token_id=tok.pad_token_id)
    plain = teacher.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=5,
                             min_new_tokens=5, pad_token_id=tok.pad_token_id)
    assert torch.equal(out_ids, plain)  # greedy assisted generation is exactly the teacher's greedy output
