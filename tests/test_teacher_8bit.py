"""--teacher-8bit (bitsandbytes LLM.int8 teacher) where it runs, CPU included: bitsandbytes >= 0.45 (a
runtime requirement) has CPU kernels for the 8-bit matmul, so distill.py tries it instead of refusing
every device but CUDA. On the reduced tiny gsm8k pair (p = teacher, q = student)."""
import json
from pathlib import Path

import pytest

import data
import distill
import models
import reference


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = models.ensure_tiny_pair("gsm8k", root=tmp_path_factory.mktemp("ckpt"), scale="test")
    return str(Path(root) / "teacher"), str(Path(root) / "student")


def run(pair, out, *extra):
    return distill.main(["--task", "gsm8k", "--teacher", pair[0], "--student", pair[1], "--out", str(out),
                         "--steps", "2", "--batch-size", "2", "--max-new-tokens", "6", "--n-train", "8",
                         "--device", "cpu", *extra])


def test_int8_probe_finds_the_cpu_kernels():
    """bitsandbytes is a runtime requirement and runs 8-bit matmuls on the CPU: the probe must say so (None),
    else --teacher-8bit would be refused on every CPU machine again."""
    assert models.int8_unsupported("cpu") is None


def test_distill_with_an_8bit_teacher_on_the_cpu(pair, tmp_path, monkeypatch):
    """distill.py --teacher-8bit on the CPU must load an int8 teacher and train with it: same seeds, so the
    student's samples are the same as in the float run and the loss moves only by the teacher's
    quantisation error (within 10%, but not bitwise equal: the teacher really is the 8-bit one)."""
    loaded = []
    real_load_pair = models.load_pair

    def spy(*args, **kw):
        t, s, tok = real_load_pair(*args, **kw)
        loaded.append(any("8bit" in type(m).__name__ for m in t.modules()))
        return t, s, tok

    monkeypatch.setattr(models, "load_pair", spy)
    run(pair, tmp_path / "f32")
    run(pair, tmp_path / "int8", "--teacher-8bit")
    assert loaded == [False, True]
    f32, int8 = ([json.loads(r)["loss"] for r in open(tmp_path / d / "metrics.jsonl")] for d in ("f32", "int8"))
    assert f32[0] != int8[0] and abs(int8[0] - f32[0]) < 0.1 * abs(f32[0])


def test_8bit_teacher_refused_with_the_reason_where_bitsandbytes_cannot_run(pair, tmp_path, monkeypatch):
    """Where the probe fails, --teacher-8bit must stop before loading anything, naming the device and why."""
    monkeypatch.setattr(models, "int8_unsupported", lambda device: "no 8-bit kernel for this device (test)")
    with pytest.raises(ValueError, match=r"--teacher-8bit .*device cpu.*no 8-bit kernel"):
        run(pair, tmp_path / "x", "--teacher-8bit")


def test_bitsandbytes_cpu_notices_are_shown_once(pair, tmp_path, caplog):
    """bitsandbytes logs 'MatMul8bitLt: inputs will be cast ...' at every 8-bit matmul on the CPU (112 identical
    lines for 4 steps, issue 19), burying the progress bar: each message must reach the user once."""
    import logging
    for name in models.BNB_LOGGERS:                     # a fresh process: no message seen yet
        log = logging.getLogger(name)
        log.filters = [f for f in log.filters if not isinstance(f, models._OncePerMessage)]
    with caplog.at_level(logging.WARNING):
        run(pair, tmp_path / "run", "--teacher-8bit")
    casts = [r for r in caplog.records if r.getMessage().startswith("MatMul8bitLt: inputs will be cast")]
    assert len(casts) == 1


def test_8bit_teacher_keeps_a_float_lm_head_the_loss_projects_with(pair):
    """bitsandbytes quantises the teacher's linear layers but leaves the lm_head out: the loss projects the
    decoder's last hidden states with that float head, which must give the 8-bit model's own logits."""
    import torch
    teacher, _, tok = models.load_pair(*pair, device="cpu", load_in_8bit=True)
    assert any("8bit" in type(m).__name__ for m in teacher.modules())
    head = models.lm_head_weight(teacher, "teacher")
    assert head.is_floating_point()
    batch = data.build_batch([[5, 6, 7, 8], [9, 10]], [[11, 12], [13, 14, 15]], tok.pad_token_id)
    with torch.no_grad():
        hidden = models.teacher_hidden(teacher, batch)                # (B, C, H)
        logits = reference.completion_logits(teacher, batch)             # (B, C, V)
    torch.testing.assert_close(hidden.float() @ head.float().t(), logits.float(), rtol=1e-4, atol=1e-4)
