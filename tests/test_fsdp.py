"""distill.py --fsdp (sharding.py): 2 CPU processes (gloo) with FSDP2-sharded teacher and student train exactly
as one process does, hold half of each model, and resume exactly after kill -9.

Why exact agreement with one process can hold: every step's prompts are a function of (seed, step) and each
prompt samples from its own generator (seed, step, its place in the step's batch), so 1 process and 2 ranks
sample the same completions; the loss normaliser is the step's global token count; FSDP averages the
reduce-scattered gradients over the ranks, which the loop undoes (x world). What differs is float rounding
(other batch shapes, a sum split over ranks): 1e-5 relative.

The runs (reduced tiny gsm8k pair, 4 steps of 4 prompts, 8 new tokens) mix on-policy and dataset steps
(--lmbda 0.7: steps 1, 3, 4 sampled by the student, step 2 dataset answers) and accumulate 2 micro-batches
per rank (--grad-accum 2), so lmbda < 1 and grad_accum > 1 are covered by every comparison below."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

import data
import distill
import models
import reference
from plumbing import sharding, train_checks
import specdec
from test_distill import REPO, free_port, read_losses, read_metric, run_args, state

sys.path.insert(0, str(REPO / "bench"))
import memory_plan  # noqa: E402

MIX = ("--lmbda", 0.7, "--grad-accum", 2, "--save-every", 1)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = models.ensure_tiny_pair("gsm8k", root=tmp_path_factory.mktemp("ckpt"), scale="test")
    return str(Path(root) / "teacher"), str(Path(root) / "student")


def torchrun(args, cwd, nproc=2, **popen):
    """distill.py under torchrun (gloo on the CPU); Popen, so a test can kill it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "TORCH_GLOO_TIMEOUT": "300"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           str(REPO / "distill.py"), *map(str, args)]
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **popen)


def children(pid: int) -> list[int]:
    """The pids whose parent is `pid` (torchrun starts each rank in a session of its own, so killing
    torchrun's process group would leave the ranks running)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def finished(proc):
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.fixture(scope="module")
def runs(pair, tmp_path_factory):
    """The same run three ways: one process, and 2 processes with --fsdp (and, for the 8-bit check,
    --fsdp with an 8-bit teacher next to its one-process twin: 2 steps)."""
    tmp = tmp_path_factory.mktemp("runs")
    fsdp = torchrun(run_args(pair, tmp / "fsdp", "--fsdp", *MIX), tmp)
    one = distill.main(run_args(pair, tmp / "one", *MIX))
    finished(fsdp)
    return {"one": one, "fsdp": tmp / "fsdp", "tmp": tmp}


def test_fsdp_losses_equal_the_one_process_run(runs):
    """Same samples (completion lengths exactly, sources exactly), same losses and gradient norms (1e-5)."""
    one, fsdp = runs["one"], runs["fsdp"]
    assert read_metric(fsdp, "source") == read_metric(one, "source") == ["student", "dataset", "student", "student"]
    assert read_metric(fsdp, "completion_len") == read_metric(one, "completion_len")
    assert read_losses(fsdp) == pytest.approx(read_losses(one), rel=1e-5)
    assert read_metric(fsdp, "grad_norm") == pytest.approx(read_metric(one, "grad_norm"), rel=1e-5)
    assert read_metric(fsdp, "loss_teacher_entropy") == pytest.approx(read_metric(one, "loss_teacher_entropy"),
                                                                      rel=1e-5)


def test_fsdp_final_weights_equal_the_one_process_run_in_a_plain_hf_folder(runs):
    """final/ and every ckpt-*/ of the sharded run are plain Hugging Face folders (safetensors, the model's
    own class in config.json, checksummed checkpoints, the last two kept) holding the weights of the
    one-process run: the gathered full state, not one rank's half."""
    one, fsdp = runs["one"], runs["fsdp"]
    a, b = state(one / "final"), state(fsdp / "final")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5)
    assert json.loads((fsdp / "final" / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    assert sorted(p.name for p in (fsdp / "final").iterdir()) == sorted(p.name for p in (one / "final").iterdir())
    ckpts = sorted(p.name for p in fsdp.glob("ckpt-*"))
    assert ckpts == ["ckpt-0000003", "ckpt-0000004"]
    assert all(distill.rundir.verify_checkpoint(fsdp / c) is None for c in ckpts)
    c = state(fsdp / "ckpt-0000004")
    assert all(torch.equal(c[k], b[k]) for k in b)


def test_each_rank_holds_half_of_every_sharded_tensor(runs, pair):
    """sharding.json (measured from each rank's DTensor.to_local pieces after the first step): teacher
    weights, student weights, student gradients and AdamW state are each 1/2 of the whole on each of the
    2 ranks, and the whole is what the unsharded models hold (so the record is not of the wrong tensors)."""
    rec = json.loads((runs["fsdp"] / "sharding.json").read_text())
    assert rec["world_size"] == 2 and len(rec["ranks"]) == 2
    teacher, student, _ = models.load_pair(*pair, device="cpu")
    whole = {"teacher_params": sum(p.nbytes for p in teacher.parameters()),
             "student_params": sum(p.nbytes for p in student.parameters())}
    whole["student_grads"] = whole["student_params"]
    whole["optimizer_state"] = 2 * whole["student_params"]                    # AdamW: m and v, float32
    for r in rec["ranks"]:
        for name, full in whole.items():
            assert r[f"{name}_full_bytes"] == full, name
            assert r[f"{name}_bytes"] == full // 2, name


def test_resume_refuses_another_world_size_or_sharding(runs, pair, monkeypatch):
    """config.json records world_size and fsdp; --resume with a different one is refused naming it (the
    optimizer state and the batches would be split another way)."""
    saved = json.loads((runs["fsdp"] / "config.json").read_text())
    assert saved["world_size"] == 2 and saved["fsdp"] is True
    args = run_args(pair, runs["fsdp"], *MIX, "--resume")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="--fsdp: True -> False"):
        train_checks.resolve_config(distill.parse_args(args))
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match=r"world size .*: 2 -> 1"):
        train_checks.resolve_config(distill.parse_args(args + ["--fsdp"]))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train_checks.resolve_config(distill.parse_args(args + ["--fsdp"])).fsdp


def test_kill_9_at_a_random_step_and_resume_under_fsdp_equals_the_uninterrupted_run(runs, pair):
    """kill -9 of torchrun and both ranks once a random number of steps is logged, then --resume under
    --fsdp: the same losses and exactly the same final weights as the run that was never interrupted (the
    gathered optimizer state is given back piece by piece, the samples are a function of the step)."""
    out, tmp = runs["tmp"] / "killed", runs["tmp"]
    kill_after = random.randint(1, 3)
    proc = torchrun(run_args(pair, out, "--fsdp", *MIX), tmp)
    log = out / "metrics.jsonl"
    deadline = time.time() + 600
    while not (log.exists() and len(log.read_text().splitlines()) >= kill_after) and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.02)
    ranks = children(proc.pid)
    for pid in [*ranks, proc.pid]:                       # both ranks, then torchrun: kill -9, no clean-up
        os.kill(pid, signal.SIGKILL)
    proc.communicate()
    assert len(ranks) == 2, ranks
    assert not (out / "final").exists(), f"the run finished before the kill (after {kill_after} steps)"
    finished(torchrun(run_args(pair, out, "--fsdp", *MIX, "--resume"), tmp))
    assert read_losses(out) == read_losses(runs["fsdp"]), f"killed after {kill_after} logged steps"
    a, b = state(runs["fsdp"] / "final"), state(out / "final")
    assert all(torch.equal(a[k], b[k]) for k in a), f"killed after {kill_after} logged steps"


def test_fsdp_with_an_8bit_teacher_equals_one_process(pair, tmp_path):
    """--fsdp --teacher-8bit: bitsandbytes' int8 teacher cannot be cut into DTensor pieces, so it stays whole
    on every rank (sharding.json says so: local = full) while the student is sharded; the losses are the
    one-process 8-bit run's."""
    args = ("--teacher-8bit", "--device", "cpu", "--steps", 2)
    fsdp = torchrun(run_args(pair, tmp_path / "fsdp", "--fsdp", *args), tmp_path)
    one = distill.main(run_args(pair, tmp_path / "one", *args))
    finished(fsdp)
    assert read_losses(tmp_path / "fsdp") == pytest.approx(read_losses(one), rel=1e-5)
    rec = json.loads((tmp_path / "fsdp" / "sharding.json").read_text())["ranks"][0]
    assert rec["teacher_params_bytes"] == rec["teacher_params_full_bytes"]
    assert rec["student_params_bytes"] == rec["student_params_full_bytes"] // 2


# ----------------------------------------------------------------------------- in one process

@pytest.fixture
def one_rank_group(tmp_path):
    """A 1-process gloo group in this process (FSDP's collectives run, trivially), destroyed after."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_sampling_gathers_the_student_once_not_per_token(pair, one_rank_group, monkeypatch):
    """sharding.gathered: one gather per unit (decoder layers + root) for a whole sampling call, where the
    sharded model alone gathers every layer again at every decoded token; the tokens are the unsharded
    model's. (Counted as FSDP's unshards of a unit whose weights are not whole: with one rank the gather
    is a copy, with N an all-gather; the 2-rank runs above sample through the same code.)"""
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
    _, student, tok = models.load_pair(*pair, device="cpu")
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    kw = dict(max_new_tokens=10, temperature=1.0, eos_token_id=[], vocab_size=len(tok))
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(2)]              # noqa: E731
    plain = specdec.autoregressive_generate(student, prompts, generator=gens(), **kw).tokens
    sharding.shard(student)
    calls = []
    real = FSDPParamGroup.unshard

    def counting(group, *a, **k):                        # a real gather: the unit's weights are not whole yet
        if not group.is_unsharded and group._all_gather_result is None:
            calls.append(1)
        return real(group, *a, **k)

    monkeypatch.setattr(FSDPParamGroup, "unshard", counting)
    with sharding.gathered(student):
        assert specdec.autoregressive_generate(student, prompts, generator=gens(), **kw).tokens == plain
    n_units = len(sharding.units(student))
    assert n_units == len(student.model.layers) + 1 and len(calls) == n_units
    calls.clear()
    assert specdec.autoregressive_generate(student, prompts, generator=gens(), **kw).tokens == plain
    assert len(calls) >= 10 * len(student.model.layers)                # without: every layer, every token


def test_the_fused_loss_under_fsdp_reads_whole_heads_and_builds_no_logits(pair, one_rank_group, monkeypatch):
    """Under --fsdp the loop's loss is the fused one too (distill.loss_and_backward): each root unit is kept
    whole until the loss has read its lm_head (sharding.head_kept), no (B, C, V) logits are built, and loss and
    gradients equal the unsharded models' (with one rank FSDP's collectives are copies; the 2-rank runs above
    go through the same code). Afterwards the roots are sharded again: nothing stays gathered."""
    from torch.distributed.tensor import DTensor
    teacher, student, tok = models.load_pair(*pair, device="cpu")
    _, plain, _ = models.load_pair(*pair, device="cpu")
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    batch = data.build_batch(prompts, [[13, 14, 2], [15]], tok.pad_token_id)
    cfg = distill.Config(div="jsd", beta=0.5, loss_temperature=0.6)
    ref = distill.loss_and_backward(cfg, SimpleNamespace(student=plain, teacher=teacher, model=plain,
                                                         autocast=nullcontext(), vocab=len(tok)), batch, scale=1.0)
    sharding.shard(teacher)
    sharding.shard(student)
    monkeypatch.setattr(reference, "completion_logits", lambda *a, **k: pytest.fail("logits built under --fsdp"))
    got = distill.loss_and_backward(cfg, SimpleNamespace(student=student, teacher=teacher, model=student,
                                                         autocast=nullcontext(), vocab=len(tok)), batch, scale=1.0)
    for a, b in zip(got, ref):
        torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=1e-5, atol=1e-7)
    grads = {n: p.grad for n, p in plain.named_parameters()}
    for name, p in student.named_parameters():
        assert isinstance(p, DTensor) and isinstance(p.grad, DTensor), name      # sharded again, grads too
        torch.testing.assert_close(p.grad.full_tensor(), grads[name], rtol=1e-4, atol=1e-7)
    assert all(isinstance(p, DTensor) for p in teacher.parameters())


@pytest.mark.parametrize("extra, env, words", [
    (["--fsdp"], {}, ["--fsdp", "torchrun --nproc_per_node"]),
    (["--fsdp", "--lmbda", "0.5", "--off-policy", "teacher"], {"WORLD_SIZE": "2"}, ["--off-policy teacher",
                                                                                    "--fsdp"]),
])
def test_fsdp_misuse_stops_before_any_work(pair, tmp_path, monkeypatch, extra, env, words):
    """--fsdp outside torchrun, and teacher sampling from a sharded teacher, fail at once naming the option."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError) as e:
        distill.main(run_args(pair, tmp_path / "run") + extra)
    assert all(w in str(e.value) for w in words), str(e.value)
    assert not (tmp_path / "run").exists()


def test_on_policy_samples_do_not_depend_on_micro_batching(pair, tmp_path):
    """Per-prompt generators: one process with 2 micro-batches samples exactly the completions of one
    micro-batch of 4 (the step's batch is split differently, each prompt keeps its own generator), so the
    on-policy update is the same (the split over ranks is the same property; test_fsdp_losses_... above)."""
    one = distill.main(run_args(pair, tmp_path / "one", "--steps", 2))
    two = distill.main(run_args(pair, tmp_path / "two", "--steps", 2, "--grad-accum", 2))
    assert read_metric(one, "source") == ["student", "student"]
    assert read_metric(one, "completion_len") == read_metric(two, "completion_len")
    assert read_losses(one) == pytest.approx(read_losses(two), rel=1e-5)


# ----------------------------------------------------------------------------- the memory plan (README)

def test_memory_plan_predicts_the_measured_per_rank_bytes(runs, pair):
    """bench/memory_plan.py's formulas, from the models' config.json alone, give the bytes each rank holds in
    the 2-process run (sharding.json, from the DTensor pieces): teacher weights 4 P_T / N (float32 on the CPU),
    student weights + gradients + AdamW 16 P_S / N; and the parameter count is the models' own."""
    teacher, student, _ = models.load_pair(*pair, device="cpu")
    t, s = memory_plan.Shape.of(teacher.config), memory_plan.Shape.of(student.config)
    assert t.params() == sum(p.numel() for p in teacher.parameters())
    assert s.params() == sum(p.numel() for p in student.parameters())
    for r in json.loads((runs["fsdp"] / "sharding.json").read_text())["ranks"]:
        assert r["teacher_params_bytes"] == memory_plan.teacher_bytes(t, 2, False, dtype_bytes=4)
        measured = r["student_params_bytes"] + r["student_grads_bytes"] + r["optimizer_state_bytes"]
        assert measured == memory_plan.student_bytes(s, 2)


def test_memory_plan_activation_count_is_what_autograd_saves():
    """The per-token, per-layer count of saved activation elements in the plan equals what autograd saves in a
    training forward of Qwen3 models of five shapes (two of them not used to find the formula)."""
    for shape, measured, formula in memory_plan.check():
        assert measured == formula, shape


def test_memory_plan_counts_the_papers_models():
    """The plan's parameter counts are the published sizes of the models it names, and its Qwen3-4B shape is
    the one in the real config.json (tests/fixtures/qwen3)."""
    sizes = {memory_plan.QWEN3_4B: 4.02e9, memory_plan.QWEN3_0_6B: 0.596e9, memory_plan.SMOLLM_1_7B: 1.71e9,
             memory_plan.SMOLLM_360M: 0.362e9, memory_plan.QWEN3_32B: 32.8e9, memory_plan.LLAMA_70B: 70.6e9,
             memory_plan.LLAMA_1B: 1.24e9}
    for shape, size in sizes.items():
        assert shape.params() == pytest.approx(size, rel=0.005), shape.name
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(REPO / "tests" / "fixtures" / "qwen3" / "instruct-2507")
    assert memory_plan.Shape.of(config, memory_plan.QWEN3_4B.name) == memory_plan.QWEN3_4B


def test_the_readme_shows_the_plan_this_code_computes():
    """The README's memory-plan table is bench/memory_plan.py's output, character for character: a change of
    a formula or a shape that is not carried into the README fails here."""
    assert memory_plan.table() in (REPO / "README.md").read_text()
