"""rundir.py and distill.py's use of it: a run directory survives crashes, has one writer, refuses
mistakes before any model loads, and resumes only from verified checkpoints.

Training runs use the reduced offline tiny pair (models.ensure_tiny_pair(scale="test")), a few steps
each; a real kill -9 runs in a subprocess."""
import errno
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import distill
import models
import rundir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = models.ensure_tiny_pair("gsm8k", root=tmp_path_factory.mktemp("ckpt"), scale="test")
    return str(Path(root) / "teacher"), str(Path(root) / "student")


def run_args(pair, out, *extra):
    """4 steps, a checkpoint every 2 (the test pair, on-policy sampling)."""
    return ["--task", "gsm8k", "--teacher", pair[0], "--student", pair[1], "--out", str(out),
            "--steps", "4", "--batch-size", "4", "--max-new-tokens", "8", "--n-train", "16",
            "--lr", "1e-3", "--save-every", "2", *map(str, extra)]


@pytest.fixture(scope="module")
def full(pair, tmp_path_factory):
    """The uninterrupted 4-step run every interrupted one must reproduce."""
    return distill.main(run_args(pair, tmp_path_factory.mktemp("full") / "run"))


def log_rows(out):
    return [json.loads(line) for line in open(Path(out) / rundir.LOG)]


def weights(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True).state_dict()


def same_run(a, b) -> bool:
    """Same logged losses and bitwise the same final weights."""
    wa, wb = weights(Path(a) / "final"), weights(Path(b) / "final")
    return ([r["loss"] for r in log_rows(a)] == [r["loss"] for r in log_rows(b)]
            and all(torch.equal(wa[k], wb[k]) for k in wa))


def killed_at_step_3(pair, out, monkeypatch):
    """A run interrupted in step 3 (after its step-2 checkpoint), like Ctrl-C."""
    real, calls = distill.specdec.autoregressive_generate, []

    def dies(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(distill.specdec, "autoregressive_generate", dies)
        with pytest.raises(KeyboardInterrupt):
            distill.main(run_args(pair, out))
    return Path(out)


@pytest.fixture
def no_models(monkeypatch):
    """Any attempt to load a model fails the test: refusals must come before."""
    def loads(*a, **k):
        raise AssertionError("a model was loaded before the bad input was refused")
    monkeypatch.setattr(models, "load_pair", loads)
    monkeypatch.setattr(models, "load_model", loads)
    monkeypatch.setattr(models, "resolve_pair", loads)


# ----------------------------------------------------------------------------- the log

def test_read_log_drops_a_torn_last_line(tmp_path):
    """A crash or a full disk mid-write leaves a partial last line; it is the only damage a crash can do,
    so it is recognised and dropped (not a JSONDecodeError on every later --resume)."""
    log = tmp_path / rundir.LOG
    log.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    rows, torn = rundir.read_log(log)
    assert [r["step"] for r in rows] == [1, 2] and torn == '{"step": 3, "lo'
    log.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}')          # valid json, no newline
    assert [r["step"] for r in rundir.read_log(log)[0]] == [1]


def test_damage_before_the_last_line_is_an_error_naming_the_line(tmp_path):
    """Only the last line can be torn by a crash; a bad line in the middle is reported, not skipped."""
    log = tmp_path / rundir.LOG
    log.write_text('{"step": 1}\ngarbage\n{"step": 3}\n')
    with pytest.raises(rundir.RunDirError, match="line 2"):
        rundir.read_log(log)


def test_truncate_log_keeps_the_rows_up_to_the_checkpoint(tmp_path):
    """--resume from step 2 drops the rows of steps 3.. (they will be logged again) and keeps 1..2."""
    log = tmp_path / rundir.LOG
    log.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 6)))
    assert [r["step"] for r in rundir.truncate_log(log, 2)] == [1, 2]
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_a_crash_while_truncating_leaves_the_old_log_whole(tmp_path, monkeypatch):
    """The log is replaced by a rename, never rewritten in place: dying before the rename leaves the old
    file exactly as it was."""
    log = tmp_path / rundir.LOG
    text = "".join(json.dumps({"step": s}) + "\n" for s in range(1, 6))
    log.write_text(text)

    def dies(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(rundir.os, "replace", dies)
    with pytest.raises(KeyboardInterrupt):
        rundir.truncate_log(log, 2)
    assert log.read_text() == text


def test_kill_9_in_the_first_resumed_step_keeps_the_log(pair, full, tmp_path, monkeypatch):
    """kill -9 (a real one, in a subprocess) during the first step after --resume: the log still has the
    rows up to the checkpoint, the stale lock of the dead process is taken over, and the next --resume
    reproduces the uninterrupted run (log and weights)."""
    out = killed_at_step_3(pair, tmp_path / "run", monkeypatch)
    script = ("import os, signal, sys; sys.path.insert(0, sys.argv[1]); import distill\n"
              "distill.specdec.autoregressive_generate = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
              "distill.main(sys.argv[2:])")
    proc = subprocess.run([sys.executable, "-c", script, str(REPO), *run_args(pair, out, "--resume")],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert [r["step"] for r in log_rows(out)] == [1, 2]
    assert (out / rundir.LOCK).exists()                          # left behind by the killed process
    distill.main(run_args(pair, out, "--resume"))
    assert same_run(out, full)


def test_resume_after_a_torn_last_line(pair, full, tmp_path, monkeypatch):
    """A torn last log line (a crash mid-write) no longer blocks --resume; the resumed run is exact."""
    out = killed_at_step_3(pair, tmp_path / "run", monkeypatch)
    with open(out / rundir.LOG, "a") as f:
        f.write('{"step": 3, "loss": 4.2')
    distill.main(run_args(pair, out, "--resume"))
    assert same_run(out, full)


# ----------------------------------------------------------------------------- one writer

def test_a_second_writer_is_refused_before_loading_models(pair, tmp_path, no_models):
    """While one process holds the run directory, another run on the same --out stops at once, naming
    the holder's pid, and writes nothing (no corrupted log, no config.json of another seed)."""
    with rundir.RunLock(tmp_path):
        with pytest.raises(ValueError, match=f"in use by process {os.getpid()}"):
            distill.main(run_args(pair, tmp_path, "--seed", 1))
        with pytest.raises(rundir.RunDirError, match="in use"):
            rundir.RunLock(tmp_path).acquire()
    assert sorted(os.listdir(tmp_path)) == []


def test_the_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    """A process killed with -9 cannot release its lock; the kernel drops its flock, so the next run takes
    the directory (and says so) instead of being locked out forever."""
    script = ("import os, signal, sys; sys.path.insert(0, sys.argv[1]); import rundir\n"
              "rundir.RunLock(sys.argv[2]).acquire(); os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", script, str(REPO), str(tmp_path)])
    assert proc.returncode == -signal.SIGKILL and (tmp_path / rundir.LOCK).exists()
    with rundir.RunLock(tmp_path):
        assert (tmp_path / rundir.LOCK).read_text() == f"{os.getpid()}\n"
    assert "stale lock" in capsys.readouterr().err
    assert not (tmp_path / rundir.LOCK).exists()                 # released on exit


def test_a_fresh_run_over_a_finished_one_is_refused_unless_overwrite(pair, full, tmp_path, no_models):
    """Starting without --resume where a run lives would delete its checkpoints and log: refused, the
    message names both ways on (--resume, --overwrite), and nothing is touched."""
    before = sorted(p.name for p in Path(full).iterdir())
    with pytest.raises(ValueError) as e:
        distill.main(run_args(pair, full))
    assert "--resume" in str(e.value) and "--overwrite" in str(e.value)
    assert sorted(p.name for p in Path(full).iterdir()) == before


def test_overwrite_starts_from_scratch(pair, tmp_path, monkeypatch):
    """--overwrite deletes the old run's files: a fresh log and only the new run's checkpoints."""
    out = killed_at_step_3(pair, tmp_path / "run", monkeypatch)
    (out / "ckpt-0000099").mkdir()                                   # a checkpoint the new run never writes
    distill.main(run_args(pair, out, "--steps", 1, "--overwrite"))
    assert [r["step"] for r in log_rows(out)] == [1]
    assert [p.name for p in rundir.checkpoints(out)] == ["ckpt-0000001"]


# ----------------------------------------------------------------------------- a resume is the same run

def test_a_resume_with_changed_settings_is_refused_naming_each(pair, tmp_path, monkeypatch):
    """--resume --div fkl --lr 0.5 on an rkl run would continue a mixed run labelled fkl: refused before any
    model loads, naming both fields; config.json is unchanged."""
    out = killed_at_step_3(pair, tmp_path / "run", monkeypatch)
    saved = (out / rundir.CONFIG).read_text()
    monkeypatch.setattr(models, "load_pair", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError) as e:
        distill.main(run_args(pair, out, "--resume", "--div", "fkl", "--lr", 0.5))
    assert "--div: 'rkl' -> 'fkl'" in str(e.value) and "--lr: 0.001 -> 0.5" in str(e.value)
    assert (out / rundir.CONFIG).read_text() == saved


def test_settings_that_do_not_change_the_result_may_change_on_resume():
    """How often to save and on which device do not change the trained weights; everything else does."""
    saved = {"div": "rkl", "lr": 1e-3, "save_every": 2, "device": None, "seed": 0}
    assert rundir.config_differences(saved, {**saved, "save_every": 5, "device": "cpu", "resume": True}) == []
    assert rundir.config_differences(saved, {**saved, "seed": 1}) == ["--seed: 0 -> 1"]


# ----------------------------------------------------------------------------- every option checked first

@pytest.mark.parametrize("extra, words", [
    (["--max-grad-norm", "-1"], ["--max-grad-norm -1.0", "> 0"]),
    (["--max-grad-norm", "0"], ["--max-grad-norm 0.0", "> 0"]),
    (["--warmup", "5"], ["--warmup 5.0", "[0, 1)"]),
    (["--seed", "-1"], ["--seed -1", ">= 0"]),
    (["--temperature", "nan"], ["--temperature nan", "finite"]),
    (["--loss-temperature", "inf"], ["--loss-temperature inf", "finite"]),
    (["--lr", "nan"], ["--lr", "nan"]),
    (["--source", "bogus"], ["--source 'bogus'", "standin", "file", "hub"]),
    (["--ajsd-floor", "2"], ["--ajsd-floor 2.0", "[0, 1]"]),
    (["--ajsd-scale", "-1"], ["--ajsd-scale -1.0", ">= 0"]),
    (["--weight-decay", "-0.1"], ["--weight-decay -0.1", ">= 0"]),
    (["--resume", "--overwrite"], ["--resume", "--overwrite"]),
])
def test_bad_options_are_refused_before_any_model_loads(pair, tmp_path, no_models, extra, words):
    """Each of these used to train the wrong way (gradient ascent with a negative clip) or fail only after
    both models loaded; now a ValueError names the value and what is allowed, and nothing is written."""
    with pytest.raises(ValueError) as e:
        distill.main(run_args(pair, tmp_path / "run") + extra)
    assert all(w in str(e.value) for w in words), str(e.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("make_out", [lambda t: t / "file", lambda t: t / "file" / "run"])
def test_an_out_that_cannot_be_a_directory_is_refused_first(pair, tmp_path, no_models, make_out):
    """--out must be a directory or creatable as one; a file there is found before any model loads."""
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ValueError, match="is a file"):
        distill.main(run_args(pair, make_out(tmp_path)))


# ----------------------------------------------------------------------------- verified checkpoints

def test_two_checkpoints_are_kept_with_checksums(full):
    """A damaged newest checkpoint needs a predecessor to fall back to; each lists its files' sha256."""
    ckpts = rundir.checkpoints(full)
    assert [p.name for p in ckpts] == ["ckpt-0000002", "ckpt-0000004"]
    for c in ckpts:
        sums = json.loads((c / rundir.CHECKSUMS).read_text())
        assert {"model.safetensors", "trainer_state.pt"} <= set(sums)
        assert rundir.verify_checkpoint(c) is None


def test_flipped_bytes_in_the_newest_checkpoint_fall_back_to_the_previous(pair, full, tmp_path, capsys):
    """Bytes flipped inside ckpt-4's weights used to resume silently with other weights. Now --resume names
    the damaged file, resumes from ckpt-2 and reproduces the uninterrupted run exactly."""
    out = tmp_path / "run"
    distill.main(run_args(pair, out))
    weights_file = out / "ckpt-0000004" / "model.safetensors"
    raw = bytearray(weights_file.read_bytes())
    raw[-100] ^= 0xFF
    weights_file.write_bytes(raw)
    distill.main(run_args(pair, out, "--resume"))
    err = capsys.readouterr().err
    assert f"{weights_file} does not match its checksum" in err
    assert same_run(out, full)
    assert rundir.verify_checkpoint(out / "ckpt-0000004") is None       # rewritten by the resumed run


def test_a_truncated_trainer_state_is_detected_naming_the_file(full, tmp_path):
    """A cut-off trainer_state.pt (a bare EOFError in torch.load) is found by its checksum."""
    import shutil
    ckpt = Path(shutil.copytree(Path(full) / "ckpt-0000004", tmp_path / "ckpt-0000004"))
    state = ckpt / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    assert rundir.verify_checkpoint(ckpt) == f"{state} does not match its checksum " \
                                             f"(damaged: flipped bytes or a cut-off copy)"


def test_a_checkpoint_without_checksums_is_used_with_a_warning(full, tmp_path, capsys):
    """Checkpoints written before checksums existed stay resumable (unverified, said so); a damaged one
    with checksums is skipped for its verified predecessor."""
    import shutil
    out = Path(shutil.copytree(full, tmp_path / "run"))
    (out / "ckpt-0000004" / rundir.CHECKSUMS).unlink()
    assert rundir.resume_checkpoint(out).name == "ckpt-0000004"
    assert "resuming without verifying" in capsys.readouterr().err
    shutil.copy(full / "ckpt-0000004" / rundir.CHECKSUMS, out / "ckpt-0000004")
    (out / "ckpt-0000004" / "config.json").write_text("{}")
    assert rundir.resume_checkpoint(out).name == "ckpt-0000002"


def test_a_full_disk_during_a_checkpoint_says_so(pair, full, tmp_path, monkeypatch):
    """torch.save on a full disk reports 'unexpected pos A vs B'; the user reads that the disk is full,
    the path, and that --resume continues. The half-written checkpoint is removed (space given back)."""
    student = AutoModelForCausalLM.from_pretrained(Path(full) / "final", use_safetensors=True)
    opt = torch.optim.AdamW(student.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    tok = models.load_tokenizer(Path(full) / "final")
    for exc in (RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 201280 vs 201172"),
                OSError(errno.ENOSPC, "No space left on device")):
        def full_disk(*a, **k):
            raise exc
        monkeypatch.setattr(distill.torch, "save", full_disk)
        with pytest.raises(OSError, match="disk is full while writing .*ckpt-0000006.*--resume") as e:
            distill.save_checkpoint(tmp_path, 6, student, tok, opt, sched)
        assert e.value.errno == errno.ENOSPC
        assert not list(tmp_path.glob(".ckpt-*"))


# ----------------------------------------------------------------------------- Ctrl-C

def test_ctrl_c_prints_one_line_with_the_command_that_resumes(pair, full, tmp_path, monkeypatch, capsys):
    """Ctrl-C ends with one line: the step reached, the last checkpoint, and a command that, run as
    printed, continues the run to exactly the uninterrupted result."""
    out = killed_at_step_3(pair, tmp_path / "run", monkeypatch)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("interrupted")]
    assert len(lines) == 1
    assert lines[0].startswith(f"interrupted at step 2; last checkpoint {out / 'ckpt-0000002'} (step 2); "
                               f"resume with: python distill.py ")
    command = shlex.split(lines[0].split("resume with: ")[1])
    assert command[:2] == ["python", "distill.py"] and "--resume" in command
    distill.main(command[2:])
    assert same_run(out, full)


# ----------------------------------------------------------------------------- safetensors only

def test_a_pickle_checkpoint_is_refused(pair, tmp_path):
    """A student saved as pytorch_model.bin (pickle: loading it can run code) is refused, saying why,
    although transformers could load it."""
    import shutil
    d = Path(shutil.copytree(pair[1], tmp_path / "student"))
    model = AutoModelForCausalLM.from_pretrained(d, use_safetensors=True)
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="only pickle weights \\(pytorch_model.bin\\).*safetensors only"):
        models.load_model(d)


@pytest.mark.parametrize("path, name", [("d/gsm8k", "gsm8k"), ("d/gsm8k/", "gsm8k"), ("d/gsm8k/train.jsonl", "gsm8k"),
                                        ("d/gsm8k/test.jsonl", "gsm8k"), ("d/gsm8k/validation.parquet", "gsm8k"),
                                        ("d/x/gsm8k_train.jsonl", "gsm8k"), ("d/x/gsm8k-test.json", "gsm8k"),
                                        ("d/gsm8k/train-00000-of-00002.parquet", "gsm8k"),
                                        ("d/x/mydata.jsonl", "mydata")])
def test_every_split_of_one_data_set_has_the_data_sets_name(path, name):
    """Runs trained on a data set's train file and the evaluation on its test file must share a task folder
    (rundir.task_group), or `make eval` finds no draft: a split's file is named by its data set (the file's stem
    without the split word, or its folder when the stem is only a split or a shard), as the folder is."""
    assert rundir.data_name(path) == name
    assert rundir.task_group("gsm8k", "file", path, "standin") == f"gsm8k-file-{name}"
