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
        distill.main(train_args((pair[0], str(student)), tmp_path / "run"))


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
