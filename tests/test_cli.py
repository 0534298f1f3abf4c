"""Bad input from the command line (cli.py): one `error: ...` line, exit status 2, before any model loads,
and nothing left behind that would block the retry. Issue 19's cases, script by script."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cli
import distill
import evaluate
import models

REPO = Path(__file__).resolve().parents[1]


class ModelLoaded(Exception):
    """Raised instead of loading a model: a check that should have come first did not."""


def _no_models(*a, **k):
    raise ModelLoaded("a model was loaded before the checks finished")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = models.ensure_tiny_pair("gsm8k", root=tmp_path_factory.mktemp("ckpt"), scale="test")
    return str(Path(root) / "teacher"), str(Path(root) / "student")


@pytest.fixture
def no_models(monkeypatch):
    monkeypatch.setattr(models, "load_pair", _no_models)
    monkeypatch.setattr(models, "load_model", _no_models)


def train_args(pair, out, *extra):
    return ["--task", "gsm8k", "--teacher", pair[0], "--student", pair[1], "--out", str(out), "--steps", "1",
            "--batch-size", "2", "--max-new-tokens", "8", "--n-train", "4", *map(str, extra)]


def long_prompt_file(tmp_path) -> Path:
    """A GSM8k train file whose second row is far longer than the tiny pair's context of 1024 positions."""
    f = tmp_path / "train.jsonl"
    rows = [{"question": "How many apples?", "answer": "Two.\n#### 2"},
            {"question": "apples and pears " * 3000, "answer": "Three.\n#### 3"}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def cli_run(script, *args, cwd):
    """The script as a user runs it: (exit status, stderr lines)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True,
                       env=env, cwd=cwd)
    return r.returncode, [line for line in r.stderr.splitlines() if line.strip()]


# ----------------------------------------------------------------------------- the one line

def test_script_main_prints_a_marked_check_as_one_line_and_exits_2(capsys):
    """A failed check is the user's to fix: one line that says what is wrong, status 2, no traceback."""
    def main(argv):
        with cli.before_the_work():
            raise ValueError("--top-p 1.5 is outside (0, 1]")
    with pytest.raises(SystemExit) as e:
        cli.script_main(main)
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: --top-p 1.5 is outside (0, 1]\n"


def test_an_error_inside_the_work_keeps_its_traceback():
    """An error after the checks is a bug or the machine's doing: it must not be hidden as bad input."""
    def main(argv):
        raise ValueError("a bug")
    with pytest.raises(ValueError, match="a bug"):
        cli.script_main(main)


def test_a_too_long_prompt_fails_as_one_line_before_the_models_and_leaves_nothing(pair, tmp_path):
    """Issue 19: a 19,933-token prompt (context 1024) failed only after both models loaded, leaving
    config.json and an empty metrics.jsonl that made the retry need --overwrite. Now: exit 2, one line
    naming the file, line and the context; no run directory."""
    code, err = cli_run("distill.py", *train_args(pair, tmp_path / "run", "--data-path", long_prompt_file(tmp_path)),
                        cwd=tmp_path)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: ") and "train.jsonl, line 2" in err[0] and "context of 1024" in err[0], err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- distill.py: before any model

def test_distill_checks_prompt_lengths_before_any_model(pair, tmp_path, no_models):
    """Generation past the context fails in the middle of the work; the check needs only config.json."""
    with pytest.raises(ValueError, match=r"train\.jsonl, line 2: the prompt has \d+ tokens.*context of 1024"):
        distill.main(train_args(pair, tmp_path / "run", "--data-path", long_prompt_file(tmp_path)))
    assert not (tmp_path / "run").exists()


def test_a_folder_without_a_model_is_named_as_such(pair, tmp_path, no_models):
    """Issue 19: an empty folder as --teacher said 'install sentencepiece or tiktoken'."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty holds no tokenizer .* not a model folder .*no config\.json"):
        distill.main(train_args((str(tmp_path / "empty"), pair[1]), tmp_path / "run"))


def test_a_folder_without_config_json_is_refused_before_any_model(pair, tmp_path, no_models):
    """A tokenizer alone is not a model: say that config.json is missing, not a loader's KeyError later."""
    import shutil
    student = tmp_path / "student"
    shutil.copytree(pair[1], student)
    (student / "config.json").unlink()
    with pytest.raises(ValueError, match=r"the student .*student has no config\.json"):
        distill.main(train_args((pair[0], str(student)), tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_cut_off_safetensors_file_is_named_before_any_model(pair, tmp_path, no_models):
    """Issue 19: a corrupted model.safetensors raised a bare 'SafetensorError: incomplete metadata' after
    the data and the teacher loaded; the header check names the file first."""
    import shutil
    student = tmp_path / "student"
    shutil.copytree(pair[1], student)
    weights = student / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"the student's weights file .*model\.safetensors is not readable"):
        distill.main(train_args((pair[0], str(student)), tmp_path / "run") + ["--lr", "1e-4"])   # a copy: not tiny


def test_a_run_that_fails_in_its_first_step_leaves_nothing_blocking_a_retry(pair, tmp_path, monkeypatch):
    """A fresh run that logged no step is not a run: the retry must not need --overwrite."""
    real = distill.specdec.autoregressive_generate

    def fails(*a, **k):
        raise RuntimeError("out of memory")
    monkeypatch.setattr(distill.specdec, "autoregressive_generate", fails)
    with pytest.raises(RuntimeError, match="out of memory"):
        distill.main(train_args(pair, tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(distill.specdec, "autoregressive_generate", real)
    distill.main(train_args(pair, tmp_path / "run"))                  # no --overwrite needed
    assert (tmp_path / "run" / "final").is_dir()


def test_resume_and_overwrite_advice_agree_on_a_run_without_checkpoint(pair, tmp_path):
    """Issue 19: --resume with no checkpoint said 'train without --resume', and training without it said
    'use --resume or --overwrite': a loop. A run that stopped before its first checkpoint can only be
    started again: both messages say --overwrite, neither sends the user to the other."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    with pytest.raises(ValueError) as fresh:
        distill.main(train_args(pair, out))
    with pytest.raises(ValueError) as resume:
        distill.main(train_args(pair, out, "--resume"))
    for e in (fresh, resume):
        msg = str(e.value)
        assert "before its first checkpoint" in msg and "--overwrite" in msg, msg
    assert "with --resume" not in str(fresh.value) and "without --resume" not in str(resume.value)


# ----------------------------------------------------------------------------- evaluate.py: before any model

def eval_args(pair, tmp_path, *extra):
    return ["--task", "gsm8k", "--teacher", pair[0], "--student", pair[1], "--results", str(tmp_path / "res"),
            "--n-prompts", "2", *map(str, extra)]


@pytest.mark.parametrize("extra, words", [
    (["--results", "/etc/passwd/x"], ["--results /etc/passwd/x cannot be created", "/etc/passwd is a file"]),
    (["--runs", "/tmp/typo-of-runs"], ["--runs /tmp/typo-of-runs: no such folder"]),
    (["--top-p", "1.5"], ["--top-p 1.5", "(0, 1]"]),
    (["--top-p", "nan"], ["--top-p nan", "(0, 1]"]),
    (["--gamma", "0"], ["--gamma must be >= 1"]),
    (["--threads", "0"], ["--threads 0", ">= 1"]),
])
def test_evaluate_refuses_bad_options_before_any_model(pair, tmp_path, no_models, extra, words):
    """Issue 19: --results /etc/passwd/x ran the whole evaluation and failed on the write; --runs /tmp/typo
    exited 0 having evaluated the baseline alone; --top-p 1.5 was caught after the models loaded."""
    with pytest.raises(ValueError) as e:
        evaluate.main(eval_args(pair, tmp_path) + extra)
    assert all(w in str(e.value) for w in words), str(e.value)
    assert not (tmp_path / "res").exists()


def test_evaluate_checks_every_drafts_folder_before_any_model(pair, tmp_path, no_models):
    """A damaged final/ of one run would fail after the baseline's whole evaluation; it is named first."""
    import shutil
    final = tmp_path / "runs" / "tiny" / "gsm8k" / "rkl-s0" / "final"
    shutil.copytree(pair[1], final)
    (final / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(ValueError, match=r"the draft rkl-s0's weights file .*model\.safetensors is not readable"):
        evaluate.main(eval_args(pair, tmp_path, "--runs", tmp_path / "runs"))


def test_evaluate_checks_prompt_lengths_before_any_model(pair, tmp_path, no_models):
    """The context check of training holds for evaluation too: the eval file's row is named."""
    f = long_prompt_file(tmp_path)
    test = f.with_name("test.jsonl")
    f.rename(test)
    with pytest.raises(ValueError, match=r"test\.jsonl, line 2: the prompt has \d+ tokens.*context of 1024"):
        evaluate.main(eval_args(pair, tmp_path, "--data-path", test))


def test_data_py_checks_prompt_lengths_against_the_models_context(pair, tmp_path):
    """`python data.py` with a model folder as --tokenizer checks the prompts against its context."""
    f = long_prompt_file(tmp_path)
    code, err = cli_run("data.py", "--task", "gsm8k", "--split", "train", "--data-path", f, "--tokenizer", pair[0],
                        cwd=tmp_path)
    assert code == 2 and len(err) == 1 and "train.jsonl, line 2" in err[0] and "context of 1024" in err[0], err


# ----------------------------------------------------------------------------- paths that fit the user

def test_runs_on_other_data_get_their_own_default_folder(pair, tmp_path, monkeypatch):
    """Issue 19: `make train SOURCE=file DATA=...` after a stand-in run was refused (the same default --out),
    and an evaluation on local files overwrote the stand-in one. The data is in the default paths when it is
    not the preset's own."""
    monkeypatch.chdir(tmp_path)                              # the default runs/ is relative
    data_file = tmp_path / "gsm8k" / "train.jsonl"
    data_file.parent.mkdir()
    data_file.write_text(json.dumps({"question": "How many?", "answer": "Two.\n#### 2"}) + "\n")
    common = ["--task", "gsm8k", "--teacher", pair[0], "--student", pair[1]]
    standin = distill.resolve_config(distill.parse_args(common))
    local = distill.resolve_config(distill.parse_args(common + ["--data-path", str(data_file.parent)]))
    assert Path(standin.out) == Path("runs/tiny/gsm8k/rkl-s0")
    assert Path(local.out) == Path("runs/tiny/gsm8k-file-gsm8k/rkl-s0")


def test_make_passes_args_through():
    """`make train|eval ARGS="..."` hands the options on (Make had no way to pass --out or --overwrite)."""
    for target, flags in (("train", "--out runs/x --overwrite"), ("eval", "--results /tmp/r --n-prompts 8")):
        r = subprocess.run(["make", "-n", target, f"ARGS={flags}", "PY=python"], cwd=REPO, capture_output=True,
                           text=True, check=True)
        assert flags in r.stdout, r.stdout


def test_a_batch_the_processes_cannot_share_is_refused_before_any_model(pair, tmp_path, no_models, monkeypatch):
    """Under torchrun each rank takes batch / world prompts: a batch that does not divide is the user's to fix,
    said at once (it was found after the lock, once the process group was up)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"--batch-size 3 must be divisible by world size 2"):
        distill.main(train_args(pair, tmp_path / "run") + ["--batch-size", "3"])
    assert not (tmp_path / "run").exists()
