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
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from plumbing import cli
import data
import distill
import models
from plumbing import checkpoints, rundir
import specdec
from plumbing.decoding_args import NonFiniteLogits

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


def killed_at_step_3(pair, out, monkeypatch, *extra):
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
            distill.main(run_args(pair, out, *extra))
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
    script = ("import os, signal, sys; sys.path.insert(0, sys.argv[1]); from plumbing import rundir\n"
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
            checkpoints.save_checkpoint(tmp_path, 6, student, tok, opt, sched)
        assert e.value.errno == errno.ENOSPC
        assert not list(tmp_path.glob(".ckpt-*"))


# ----------------------------------------------------------------------------- Ctrl-C

def fresh_shell_env():
    """The environment of a new shell after `make setup`: no virtual environment on PATH, so a bare `python`
    is the system's (without torch), or none at all."""
    keep = {k: os.environ[k] for k in ("HOME", "HF_HUB_OFFLINE", "HF_HOME", "TOKENIZERS_PARALLELISM") if k in os.environ}
    return {**keep, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}


def test_ctrl_c_prints_one_line_with_the_command_that_resumes(pair, full, tmp_path, monkeypatch, capsys):
    """Ctrl-C ends with one line: the step reached, the last checkpoint, and a command that, run as printed
    in a new shell (no activated venv: `python` there has no torch), continues the run to exactly the
    uninterrupted result. So it names the venv's interpreter (.venv/bin/python), not a bare `python`."""
    out = killed_at_step_3(pair, tmp_path / "run", monkeypatch)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("interrupted")]
    assert len(lines) == 1
    assert lines[0].startswith(f"interrupted at step 2; last checkpoint {out / 'ckpt-0000002'} (step 2); "
                               f"resume with: ")
    command = shlex.split(lines[0].split("resume with: ")[1])
    assert Path(command[0]).absolute() == Path(sys.executable).absolute() and command[0] != "python"
    assert Path(command[1]).resolve() == REPO / "distill.py" and "--resume" in command
    proc = subprocess.run(command, env=fresh_shell_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert same_run(out, full)


def test_sigterm_stops_like_ctrl_c_with_the_command_that_resumes(pair, tmp_path):
    """SIGTERM is what `timeout` and job schedulers send: the run must end as on Ctrl-C, with the one line
    naming the last checkpoint and the resume command (it used to die silently), exit status 128 + 15."""
    out = tmp_path / "run"
    args = run_args(pair, out, "--steps", 200, "--save-every", 1)
    proc = subprocess.Popen([sys.executable, str(REPO / "distill.py"), *args], cwd=REPO, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not rundir.checkpoints(out) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before its first checkpoint"
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("terminated (SIGTERM) at step ")]
    assert len(lines) == 1 and "last checkpoint" in lines[0] and lines[0].endswith(" --resume"), err[-2000:]
    assert not (out / rundir.LOCK).exists()                     # released on the way out


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


# ----------------------------------------------------------------------------- only a run's own files

@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_model_folder_as_out_is_refused_and_left_whole(pair, tmp_path, no_models, overwrite):
    """--out pointing at a model folder (a copy of a student, checkpoints/tiny/gsm8k/teacher) used to be
    refused with advice to pass --overwrite, which then deleted the model's config.json. A folder that is
    not a run directory is refused with or without --overwrite, naming what is there, and nothing changes."""
    import shutil
    folder = Path(shutil.copytree(pair[1], tmp_path / "model"))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(ValueError, match="not a run directory.*config.json") as e:
        distill.main(run_args(pair, folder, *overwrite))
    assert "model.safetensors" in str(e.value)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_overwrite_deletes_only_the_runs_own_files(pair, full, tmp_path, monkeypatch):
    """--overwrite of a run directory removes what the run wrote and leaves the user's notes beside it."""
    import shutil
    out = Path(shutil.copytree(full, tmp_path / "run"))
    (out / "notes.txt").write_text("mine")
    distill.main(run_args(pair, out, "--steps", 1, "--overwrite"))
    assert (out / "notes.txt").read_text() == "mine"
    assert [p.name for p in rundir.checkpoints(out)] == ["ckpt-0000001"]


# ----------------------------------------------------------------------------- the same data on --resume

def write_gsm8k_file(path, n=16, edit=None):
    """n stand-in rows as a GSM8k jsonl file; edit: the index of a row whose question is changed."""
    rows = []
    for i, ex in enumerate(data.load_examples("gsm8k", "train", n=n, max_article_tokens=None)):
        question = ex.prompt + (" (edited)" if i == edit else "")
        rows.append({"question": question, "answer": f"{ex.reference}\n#### {data.gsm8k_final_answer(ex.reference)}"})
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_resume_on_changed_data_is_refused_naming_the_file(pair, tmp_path, monkeypatch):
    """--resume after the data file changed used to continue on other prompts (other losses, exit 0).
    config.json records a sha256 of the rows used; a resume whose rows differ is refused before any model
    loads, naming the file; the same rows resume as before."""
    rows = write_gsm8k_file(tmp_path / "train.jsonl")
    args = lambda *extra: run_args(pair, tmp_path / "run", "--data-path", rows, *extra)   # noqa: E731
    killed_at_step_3(pair, tmp_path / "run", monkeypatch, "--data-path", rows)
    saved = json.loads((tmp_path / "run" / rundir.CONFIG).read_text())["data_sha256"]
    assert len(saved) == 64
    write_gsm8k_file(rows, edit=5)
    with monkeypatch.context() as m:
        m.setattr(models, "load_pair", lambda *a, **k: pytest.fail("loaded a model"))
        with pytest.raises(ValueError, match=f"training data changed.*--data-path {rows}"):
            distill.main(args("--resume"))
    write_gsm8k_file(rows)
    distill.main(args("--resume"))
    assert [r["step"] for r in log_rows(tmp_path / "run")] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- a log damaged in the middle

def test_scan_log_keeps_the_rows_before_a_gap_or_a_bad_line(tmp_path):
    """Rows lost in the middle (a gap) or a line torn in the middle end the part a resume may keep; the
    rows after the damage are named, so they can be said to be dropped."""
    log = tmp_path / rundir.LOG
    log.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4, 7, 8)))
    scan = rundir.scan_log(log)
    assert [r["step"] for r in scan.rows] == [1, 2, 3, 4] and scan.dropped == [7, 8] and "step 7" in scan.problem
    log.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    scan = rundir.scan_log(log)
    assert [r["step"] for r in scan.rows] == [1] and scan.dropped == [3] and "line 2" in scan.problem


def drop_log_rows(out, steps):
    rows = [r for r in log_rows(out) if r["step"] not in steps]
    (Path(out) / rundir.LOG).write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_gap_in_the_log_resumes_from_a_checkpoint_its_rows_reach(pair, full, tmp_path, capsys):
    """A log missing step 3's row used to resume from ckpt-4 into a log with a gap, silently. The resume now
    starts from ckpt-2 (the rows reach it), says which rows are dropped, and the log has one row per step:
    the same as the uninterrupted run."""
    import shutil
    out = Path(shutil.copytree(full, tmp_path / "run"))
    drop_log_rows(out, {3})
    distill.main(run_args(pair, out, "--resume"))
    err = capsys.readouterr().err
    assert "steps 3-4 are trained and logged again" in err and "dropped the rows after it (steps 4)" in err
    assert [r["step"] for r in log_rows(out)] == [1, 2, 3, 4]
    assert same_run(out, full)


def test_a_gap_before_every_checkpoint_is_refused_before_loading_models(pair, full, tmp_path, no_models):
    """When no checkpoint is left that the log's rows reach, resuming would leave a gap: refused in one
    message naming the missing steps, before any model loads, and the log is untouched."""
    import shutil
    out = Path(shutil.copytree(full, tmp_path / "run"))
    drop_log_rows(out, {2})
    before = (out / rundir.LOG).read_text()
    with pytest.raises(ValueError, match="rows of steps 1-1 only.*miss steps 2-4"):
        distill.main(run_args(pair, out, "--resume"))
    assert (out / rundir.LOG).read_text() == before


# ----------------------------------------------------------------------------- non-finite weights

def flip_exponent(weights_file: Path, name: str):
    """Set the exponent bits of the first value of tensor `name` (a float32 in a safetensors file): NaN/inf."""
    raw = bytearray(weights_file.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    start = 8 + n + header[name]["data_offsets"][0]
    raw[start + 3] |= 0x7F
    raw[start + 2] |= 0x80
    weights_file.write_bytes(raw)


def test_a_checkpoint_without_checksums_with_nan_weights_falls_back(full, tmp_path, capsys):
    """The newest checkpoint lacking checksums.json with flipped exponent bits used to be resumed from and
    crash in top-p. It is loaded first (every weight finite?), reported, and the previous one used."""
    import shutil
    out = Path(shutil.copytree(full, tmp_path / "run"))
    ckpt = out / "ckpt-0000004"
    (ckpt / rundir.CHECKSUMS).unlink()
    flip_exponent(ckpt / "model.safetensors", "model.embed_tokens.weight")
    assert rundir.resume_checkpoint(out).name == "ckpt-0000002"
    assert "non-finite values (NaN or inf) in model.embed_tokens.weight" in capsys.readouterr().err


def test_final_carries_checksums_and_a_damaged_copy_is_refused(full, tmp_path):
    """final/ is checksummed like the checkpoints, and a model folder with checksums.json is verified before
    it loads (evaluate.py, --student), naming the damaged file."""
    import shutil
    assert rundir.verify_checkpoint(Path(full) / "final") is None
    final = Path(shutil.copytree(Path(full) / "final", tmp_path / "final"))
    flip_exponent(final / "model.safetensors", "model.embed_tokens.weight")
    with pytest.raises(ValueError, match="damaged: .*model.safetensors does not match its checksum"):
        models.check_model_files(final, "draft")


def test_nan_weights_are_named_where_sampling_starts(pair):
    """Non-finite weights used to end in 'index -1 is out of bounds' inside top-p. Sampling checks the
    logits where it starts and names the model that produced them (the draft, the target, or the sampler)."""
    teacher, student, tok = models.load_pair(*pair)
    with torch.no_grad():
        student.get_input_embeddings().weight[:] = float("nan")
    prompts = [tok.encode("1 + 1 =")]
    with pytest.raises(NonFiniteLogits, match=f"the draft model {pair[1]} gives non-finite logits"):
        specdec.speculative_generate(teacher, student, prompts, max_new_tokens=4, top_p=0.9, seed=0)
    with pytest.raises(NonFiniteLogits, match=f"the target model {pair[1]}"):
        specdec.speculative_generate(student, teacher, prompts, max_new_tokens=4, top_p=0.9, seed=0)
    with pytest.raises(NonFiniteLogits, match="the sampling model"):
        specdec.autoregressive_generate(student, prompts, max_new_tokens=4, top_p=0.9, seed=0)


# ----------------------------------------------------------------------------- one line, not a traceback

def test_a_run_that_took_the_out_since_the_check_is_one_line(pair, tmp_path, monkeypatch, capsys):
    """Two runs started on one --out at the same moment both pass the early check; the loser of the lock used
    to get a RunDirError traceback. It ends with the one line 'in use by process N', exit 2."""
    monkeypatch.setattr(rundir, "check_unlocked", lambda out: None)     # the other run locks after our check
    with rundir.RunLock(tmp_path / "run"):
        with pytest.raises(SystemExit) as e:
            cli.script_main(distill.main, run_args(pair, tmp_path / "run"))
    assert e.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and f"in use by process {os.getpid()}" in err[0]


def test_a_run_dir_that_turns_unwritable_is_one_line_and_keeps_the_checkpoints(pair, tmp_path, monkeypatch,
                                                                                 capsys):
    """A run directory that turns unwritable mid-run (permissions taken away, a read-only remount: here the
    step-4 checkpoint's write fails with EACCES) ends with one line saying so and how to resume, exit 2; the
    step-2 checkpoint stays whole."""
    real, calls = checkpoints.save_model, []

    def denied(student, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(student, path, *a, **k)
    monkeypatch.setattr(checkpoints, "save_model", denied)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        cli.script_main(distill.main, run_args(pair, out))
    assert e.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and f"the run directory {out} is no longer writable" in err[0]
    assert "intact" in err[0] and err[0].endswith("--resume")
    assert [p.name for p in rundir.checkpoints(out)] == ["ckpt-0000002"]
    assert rundir.verify_checkpoint(out / "ckpt-0000002") is None


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
