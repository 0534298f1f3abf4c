"""Bad input from the command line (cli.py): one `error: ...` line, exit status 2, before any model loads,
and nothing left behind that would block the retry. Issue 19's cases, script by script."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import distill
from study import evaluate
import models
from plumbing import cli, train_checks

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
    """evaluate's command line on the pair, with a runs folder of its own: the checkout's runs/ (drafts a user
    trained) must not change what a test sees."""
    (tmp_path / "no-runs").mkdir(exist_ok=True)
    return ["--task", "gsm8k", "--teacher", pair[0], "--student", pair[1], "--results", str(tmp_path / "res"),
            "--runs", str(tmp_path / "no-runs"), "--n-prompts", "2", *map(str, extra)]


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
    standin = train_checks.resolve_config(distill.parse_args(common))
    local = train_checks.resolve_config(distill.parse_args(common + ["--data-path", str(data_file.parent)]))
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


# ----------------------------------------------------------------------------- --help (issue 31, item 14)

def script_help(script: str) -> str:
    """`script` is a file at the root (distill.py) or a module run with -m (study.report)."""
    command = [str(REPO / script)] if script.endswith(".py") else ["-m", script]
    r = subprocess.run([sys.executable, *command, "--help"], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("script", ["distill.py", "study.evaluate", "study.report", "study.curve",
                                    "models.py", "data.py"])
def test_help_prints_option_texts_not_argparse_internals(script):
    """Issue 31: an unescaped % in evaluate.py's --speedup-repeats help made --help print argparse's
    internal dict ({'option_strings': ...}) in place of the sentence; --help is the first thing a user reads."""
    text = script_help(script)
    assert "option_strings" not in text and "%(" not in text, text


@pytest.mark.parametrize("script", ["study.report", "study.curve"])
def test_help_description_is_a_whole_sentence(script):
    """Issue 31: curve.py's --help description stopped mid-sentence ('... as a function of the'): the first
    line of a wrapped docstring is not a sentence, its first paragraph is."""
    description = " ".join(script_help(script).split("\n\n")[1].split())
    assert description.endswith("."), description


@pytest.mark.parametrize("script", ["distill", "evaluate"])
@pytest.mark.parametrize("seed", [-1, 2**64])
def test_seeds_outside_32_bits_are_refused_before_any_model(pair, tmp_path, no_models, script, seed):
    """Issue 31: --seed 2^64 overflowed torch's generator (a traceback) and evaluate.py --seed -1 failed
    after the baseline's whole decoding; a seed is an integer in [0, 2^32 - 1], so that every seed derived
    from it (seed x 1,000,003 + step ...) fits torch's 64 bits, checked with the other options."""
    argv = (train_args(pair, tmp_path / "run") if script == "distill" else eval_args(pair, tmp_path))
    with pytest.raises(ValueError, match=rf"--seed {seed} is not allowed; --seed must be an integer >= 0 and <= 4294967295"):
        {"distill": distill, "evaluate": evaluate}[script].main(argv + ["--seed", str(seed)])
    assert not (tmp_path / "run").exists() and not (tmp_path / "res").exists()


def test_thousands_of_threads_are_refused_in_one_line_not_a_segfault(pair, tmp_path):
    """Audit: `distill.py --threads 100000` passed the check (>= 1) and OpenMP crashed once training
    started: a segfault, exit status -11, no message. The shared check (cli.check_threads) bounds
    the count to a few threads per CPU (cli.max_threads), so every script with --threads refuses it
    in the one line that names what is allowed, before any work."""
    from study import report
    from study import specbench
    code, err = cli_run("distill.py", *train_args(pair, tmp_path / "run"), "--threads", 100000,
                        cwd=tmp_path)
    assert code == 2 and len(err) == 1, (code, err)
    assert err[0].startswith("error: --threads 100000 is not allowed") and \
        f"<= {cli.max_threads()}" in err[0] and f"{os.cpu_count()} CPUs" in err[0], err
    assert not (tmp_path / "run").exists()
    for parse_args in (evaluate.parse_args, specbench.parse_args, report.parse_args):
        with pytest.raises(cli.BadInput, match=rf"--threads 100000 .*<= {cli.max_threads()}"):
            parse_args(["--threads", "100000"])


# ----------------------------------------------------------------------------- --device (issue 31, item 5)

@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_a_cuda_device_without_cuda_is_refused_before_any_model(pair, tmp_path, no_models, monkeypatch, device):
    """Issue 31: --device cuda / cuda:0 on a machine without CUDA crashed in torch.cuda.set_device, after the
    data had loaded; the device is the user's to fix, named with what the machine has."""
    monkeypatch.setattr(distill.torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=rf"--device {device} is not available: torch sees no CUDA GPU .*--device cpu"):
        distill.main(train_args(pair, tmp_path / "run") + ["--device", device])
    assert not (tmp_path / "run").exists()


def test_a_gpu_index_the_machine_lacks_is_refused(monkeypatch):
    """--device cuda:3 on a 2-GPU machine names the GPUs there are (it failed in set_device)."""
    monkeypatch.setattr(distill.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(distill.torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"--device cuda:3 is cuda:3, but this machine has 2 CUDA GPU\(s\): cuda:0 to cuda:1"):
        train_checks.check_device("cuda:3")


def test_cuda_without_an_index_is_this_processs_gpu(monkeypatch):
    """Issue 31: `--device cuda` (the first thing a GPU user types) crashed in torch.cuda.set_device on every
    machine, which needs an index; it means cuda:<local rank>, each torchrun rank its own GPU."""
    monkeypatch.setattr(distill.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(distill.torch.cuda, "device_count", lambda: 2)
    cfg = distill.Config(device="cuda")
    train_checks.check_device(cfg.device, local_rank=1)
    assert train_checks.run_device(cfg, local_rank=1) == distill.torch.device("cuda", 1)
    assert train_checks.run_device(distill.Config(device="cuda:0"), local_rank=1) == distill.torch.device("cuda", 0)


# ----------------------------------------------------------------------------- model configs (issue 31, item 7)

def test_a_config_json_that_disagrees_with_the_weights_is_refused_before_any_model(pair, tmp_path, no_models):
    """Issue 31: a teacher whose config.json gives other sizes than its weights (a config.json of another
    model) failed inside from_pretrained with a size-mismatch traceback after the load report; the
    safetensors headers and the config's shapes are compared first, naming the tensor."""
    import shutil
    teacher = tmp_path / "teacher"
    shutil.copytree(pair[0], teacher)
    config = json.loads((teacher / "config.json").read_text())
    config["intermediate_size"] *= 2
    (teacher / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"the teacher's config\.json does not match its weights: \S*mlp\S* is \[\d+, \d+\] "
                                         r"in .*model\.safetensors, but config\.json makes it"):
        distill.main(train_args((str(teacher), pair[1]), tmp_path / "run") + ["--lr", "1e-3"])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, words", [
    ("[1, 2]", "holds a JSON array, not an object of the model's settings"),
    ('"llama"', "holds a JSON string, not an object of the model's settings"),
    ('{"model_type": ', "is not valid JSON"),
    ('{"hidden_size": 64}', "has no model_type"),
])
def test_a_config_json_that_is_no_model_config_is_named_before_any_model(pair, tmp_path, no_models,
                                                                          text, words):
    """Audit: a --teacher whose config.json is a JSON array ended in transformers' TypeError
    traceback (while the tokenizer loaded); invalid JSON and a config without model_type failed in
    transformers' words, the latter only after the data had loaded. Each is one line naming the
    file and what is wrong with it, before any model loads."""
    import shutil
    teacher = tmp_path / "teacher"
    shutil.copytree(pair[0], teacher)
    (teacher / "config.json").write_text(text)
    with pytest.raises(ValueError) as e:
        distill.main(train_args((str(teacher), pair[1]), tmp_path / "run") + ["--lr", "1e-3"])
    assert cli.is_bad_input(e.value), repr(e.value)
    msg = str(e.value)
    assert f"the teacher's {teacher / 'config.json'} " in msg and words in msg, msg
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("script", ["specbench", "evaluate"])
def test_runs_that_is_a_file_is_refused_before_any_model(pair, tmp_path, no_models, script):
    """Audit: `specbench.py --runs /etc/hostname` found no run under the file and went on to decode
    with the baseline draft alone, as if nothing had been trained (evaluate.py called the file 'no
    such folder'). --runs is the root of distill.py's runs: a file is refused, saying so, before any
    model loads (cli.check_runs_root, shared by both scripts)."""
    from study import specbench
    runs = tmp_path / "hostname"
    runs.write_text("a file, not a folder\n")
    if script == "specbench":
        questions = tmp_path / "question.jsonl"
        row = {"question_id": 1, "category": "qa", "turns": ["Hi?"]}
        questions.write_text(json.dumps(row) + "\n")
        argv = ["--preset", "tiny", "--teacher", pair[0], "--student", pair[1], "--questions",
                str(questions), "--results", str(tmp_path / "res"), "--runs", str(runs)]
    else:
        argv = eval_args(pair, tmp_path, "--runs", runs)
    with pytest.raises(ValueError, match=rf"--runs {runs} is a file, not a folder; pass the root"):
        {"specbench": specbench, "evaluate": evaluate}[script].main(argv)
    assert not (tmp_path / "res").exists()


@pytest.mark.parametrize("script", ["distill", "evaluate"])
def test_a_tokenizer_larger_than_the_lm_head_is_refused_before_any_model(pair, tmp_path, no_models, script):
    """Issue 31: the check that the lm_heads have a row for every token ran after both models had loaded;
    it needs only the configs (vocab_size), so it runs with the other checks."""
    import shutil
    from transformers import AutoTokenizer
    folders = []
    for role, src in zip(("teacher", "student"), pair):
        shutil.copytree(src, tmp_path / role)
        folders.append(str(tmp_path / role))
    rows = models.config_model(pair[0]).get_output_embeddings().weight.shape[0]
    tok = AutoTokenizer.from_pretrained(pair[0])
    tok.add_tokens([f"extra_token_{i}" for i in range(rows - len(tok) + 5)])
    for folder in folders:
        tok.save_pretrained(folder)
    with pytest.raises(ValueError, match=rf"the teacher's lm_head has {rows} rows, fewer than the {rows + 5} tokens"):
        if script == "distill":
            distill.main(train_args(folders, tmp_path / "run", "--lr", "1e-3"))
        else:
            evaluate.main(eval_args(folders, tmp_path))


# ----------------------------------------------------------------------------- huge rows (issue 31, item 12)

def test_a_huge_prompt_is_refused_without_tokenizing_it_whole(pair, tmp_path, no_models, monkeypatch):
    """Issue 31: a 50 MB single-row prompt took 154 s and 12.4 GB before its (correct) length error, all of it
    tokenized first; a prefix of (context + 1) x the longest token's characters settles it."""
    real = distill.data.build_prompt_ids

    def no_huge_rows(tokenizer, task, example):
        assert len(example.prompt) < 100_000, "a huge prompt was tokenized whole"
        return real(tokenizer, task, example)
    monkeypatch.setattr(distill.data, "build_prompt_ids", no_huge_rows)
    f = tmp_path / "train.jsonl"
    f.write_text(json.dumps({"question": "How many apples? " * 300_000, "answer": "Two.\n#### 2"}) + "\n")
    with pytest.raises(ValueError, match=r"train\.jsonl, line 1: the prompt has \d+ tokens in its first \d+ of "
                                         r"\d+ characters .*context of 1024 positions"):
        distill.main(train_args(pair, tmp_path / "run", "--data-path", f))
    assert not (tmp_path / "run").exists()


def test_more_validation_prompts_than_exist_are_refused_saying_how_many(pair, tmp_path, no_models):
    """Issue 31: --eval-every 1 --eval-prompts 100000 ran silently for minutes; the stand-in's validation
    prompts are a finite pool, and asking for more than it (or a file) holds says how many there are."""
    with pytest.raises(ValueError, match=r"--eval-prompts 100000 is too many: .* the gsm8k stand-in has (\d+): its "
                                         r"2000 validation prompts less the \d+ that training uses too; ask for at "
                                         r"most \1"):
        distill.main(train_args(pair, tmp_path / "run", "--eval-every", "1", "--eval-prompts", "100000"))
    assert not (tmp_path / "run").exists()


def test_cuda_for_more_processes_than_gpus_is_refused_on_every_rank(monkeypatch):
    """Under torchrun, `--device cuda` gives each local rank its own GPU: 4 processes on a 2-GPU machine fail
    in set_device on ranks 2 and 3 only, whose error rank 0 would not print; every rank checks the largest
    local rank, so rank 0 says it."""
    monkeypatch.setattr(distill.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(distill.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match=r"--device cuda gives each of the 4 processes on this machine its own GPU "
                                         r"\(cuda:<local rank>\), but it has 2"):
        train_checks.resolve_config(distill.parse_args(["--device", "cuda", "--out", "/tmp/unused-run"]))


# ----------------------------------------------------------------------------- torchrun (issue 31, item 10)

def test_under_torchrun_a_bad_option_is_one_line_and_every_rank_exits_2(tmp_path):
    """Issue 31: under torchrun a bad option printed its error once per rank, and the first rank to exit made
    torchrun SIGTERM the others. Rank 0 prints the one line; the ranks wait for each other in torchrun's store,
    so every rank exits 2 (torchrun's own summary of the failed children stays torchrun's)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(REPO / "distill.py"), "--top-p", "2", "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: need --temperature >= 0 and 0 < --top-p <= 1, got 0.6, 2.0"], r.stderr
    exit_codes = [line.split(":", 1)[1].split()[0] for line in r.stderr.splitlines()
                  if line.strip().startswith("exitcode")]
    assert exit_codes == ["2", "2"], r.stderr
    assert not (tmp_path / "run").exists()


def test_check_says_what_would_run_and_writes_nothing(pair, tmp_path, capsys, no_models):
    """Issue 31 item 10: `distill.py --check` runs every check that comes before a model loads and stops there,
    so a launcher (make train NPROC=N) can refuse bad input before torchrun starts its ranks."""
    out = tmp_path / "run"
    assert distill.main(train_args(pair, out, "--check")) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("checked: rkl on ") and "Nothing was written" in line, line
    assert not out.exists()


def test_check_refuses_what_the_run_would_refuse(pair, tmp_path, capsys):
    """--check is only worth running first if it fails where the run would: a bad option is the same line."""
    with pytest.raises(SystemExit) as e:
        cli.script_main(distill.main, train_args(pair, tmp_path / "run", "--check", "--top-p", "2"))
    assert e.value.code == 2
    assert "0 < --top-p <= 1" in capsys.readouterr().err


def test_make_train_nproc_checks_before_torchrun_starts_the_ranks(tmp_path):
    """Issue 31 item 10: `make train NPROC=2` with a bad option prints the error line once and exits 2 without
    starting torchrun (no per-rank output, no torchrun summary of failed children)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(["make", "-s", "train", "NPROC=2", f"PY={sys.executable}", "TORCHRUN=false-torchrun-not-run",
                        f"ARGS=--top-p 2 --out {tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True,
                       env=env, timeout=300)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: need --temperature >= 0 and 0 < --top-p <= 1, got 0.6, 2.0"], r.stderr
    assert "false-torchrun-not-run" not in r.stderr and r.returncode != 0
    assert not (tmp_path / "run").exists()
