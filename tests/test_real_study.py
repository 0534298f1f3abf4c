"""real_study.py: the seed's question on the real target. The runs themselves are CPU hours (CI runs
`make real-study QUICK=1`); these tests pin the pieces that decide WHICH runs are trained, read back and
compared, on synthetic per-prompt metrics and on config files, without loading a model."""
import json
from pathlib import Path

import numpy as np
import pytest

from plumbing import cli
from study import curve
import distill
from study import real_study as R
from study import report


def metrics(acceptance: list[float]) -> dict:
    """Per-prompt metrics of one draft as evaluate.evaluate_draft writes them."""
    a = np.asarray(acceptance, dtype=float)
    return {"token_acceptance": a.tolist(), "alpha": a.tolist(), "mean_accepted_length": (1 + 5 * a).tolist()}


def setting(per_prompt: dict, entropy: float) -> dict:
    return {"entropy": [entropy, entropy - 0.01, entropy + 0.01], "tokens": 100, "per_prompt": per_prompt,
            "points": [], "cost": {}}


def test_the_acceptance_objectives_are_trained_at_the_presets_temperature_only():
    """nla and lk cost as much as the main divergences; the budget trains them where the preset decodes."""
    cfg = R.StudyConfig()
    assert set(R.divs_at(cfg, R.PRESET_T)) >= {"nla", "lk", "rkl", "jsd"}
    assert not {"nla", "lk"} & set(R.divs_at(cfg, 1.3))


def test_every_run_samples_scores_and_validates_at_its_temperature():
    """The knob changes one thing: the run's --temperature (the loss temperature follows it); the final
    student is validated once (--eval-every = steps), which gives the run's val_alpha."""
    cfg = R.StudyConfig()
    c = distill.parse_args(R.distill_argv(cfg, 1.3, "tvd", 1, Path("x")))
    assert (c.temperature, c.div, c.seed, c.preset, c.loss_temperature) == (1.3, "tvd", 1, "smollm2", None)
    assert c.eval_every == 80 and c.eval_prompts == cfg.val_prompts


def _write_run(tmp_path, argv) -> Path:
    out = tmp_path / "T0.6" / "rkl-s0"
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(vars(distill.parse_args(argv))))
    return out


def test_a_cached_run_of_the_same_command_matches(tmp_path):
    """A run trained by the same command (by the study or by hand) is reused, not trained again."""
    cfg = R.StudyConfig(runs=str(tmp_path))
    argv = R.distill_argv(cfg, 0.6, "rkl", 0, tmp_path / "T0.6" / "rkl-s0")
    assert R.config_differences(_write_run(tmp_path, argv), argv) == []


def test_a_cached_run_of_another_configuration_is_refused_before_training(tmp_path):
    """A run dir trained at another temperature must never be counted as this setting's draft."""
    cfg = R.StudyConfig(runs=str(tmp_path))
    _write_run(tmp_path, R.distill_argv(cfg, 1.0, "rkl", 0, tmp_path / "T0.6" / "rkl-s0"))
    with pytest.raises(cli.BadInput, match=r"--temperature 1\.0 -> 0\.6"):
        R.train_draft(cfg, 0.6, "rkl", 0, log=print)


def test_an_evaluation_is_read_back_only_under_its_fingerprint(tmp_path):
    """The cache is keyed by everything the numbers depend on: another draft or protocol is measured again."""
    path = tmp_path / "real_eval.json"
    R.write_json(path, {"fingerprint": {"draft": "a", "n_prompts": 8}, "result": {"x": 1}})
    assert R.cached(path, {"draft": "a", "n_prompts": 8}) == {"x": 1}
    assert R.cached(path, {"draft": "b", "n_prompts": 8}) is None


def test_a_torn_cache_file_is_measured_again(tmp_path):
    """A file cut short by a crash is not an error and not a result: it is recomputed."""
    path = tmp_path / "real_eval.json"
    path.write_text('{"fingerprint": {"draft": "a"}, "res')
    assert R.cached(path, {"draft": "a"}) is None


def test_a_missing_draft_stops_the_analysis():
    """The report is never drawn from part of the study: every expected draft is named."""
    cfg = R.StudyConfig(settings=(0.6,), divs=("baseline", "rkl", "jsd"), extra_divs=("nla",), seeds=(0, 1))
    runs = {n: metrics([0.1, 0.2]) for n in ("baseline", "rkl-s0", "rkl-s1", "jsd-s0", "jsd-s1", "nla-s0")}
    with pytest.raises(report.MissingRunError, match="nla-s1"):
        R.build({0.6: setting(runs, 0.5)}, cfg)


def test_the_seed_claim_is_read_along_measured_entropy():
    """rkl better at the low-entropy temperature and jsd at the high one (separated) is the claim holding; the
    settings are ordered by measured entropy, and the tables name the knob T."""
    cfg = R.StudyConfig(settings=(0.3, 1.3), divs=("baseline", "rkl", "jsd"), extra_divs=(), seeds=(0, 1), n_boot=300)
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.4, 64)
    low = {"baseline": metrics(base), **{f"rkl-s{s}": metrics(base + 0.2) for s in (0, 1)},
           **{f"jsd-s{s}": metrics(base + 0.1) for s in (0, 1)}}
    high = {"baseline": metrics(base), **{f"rkl-s{s}": metrics(base + 0.05) for s in (0, 1)},
            **{f"jsd-s{s}": metrics(base + 0.15) for s in (0, 1)}}
    c = R.build({1.3: setting(high, 2.0), 0.3: setting(low, 0.2)}, cfg)
    assert c.order == [0.3, 1.3]
    v = curve.claim_verdict(c)
    assert v["holds"] and (v["low"], v["high"]) == (0.3, 1.3)
    assert curve.levels_markdown(c, "token_acceptance").startswith("| T |")


def test_a_divergence_trained_at_one_temperature_is_a_dash_elsewhere():
    """nla and lk exist at T = 0.6 only: the tables show them there and '-' at other temperatures."""
    cfg = R.StudyConfig(settings=(0.6, 1.0), divs=("baseline", "rkl"), extra_divs=("nla",), seeds=(0,), n_boot=200)
    a = np.linspace(0.1, 0.5, 16)
    c = R.build({0.6: setting({"baseline": metrics(a), "rkl-s0": metrics(a + 0.1), "nla-s0": metrics(a + 0.05)}, 0.5),
                 1.0: setting({"baseline": metrics(a), "rkl-s0": metrics(a + 0.1)}, 1.0)}, cfg)
    rows = curve.levels_markdown(c, "token_acceptance").splitlines()
    assert rows[0].split("|")[-2].strip() == "nla"
    assert rows[2].split("|")[-2].strip() != "-" and rows[3].split("|")[-2].strip() == "-"


def test_the_budget_sums_every_cached_run():
    """The header's CPU time is the whole study's: every run's training and evaluation seconds, every setting."""
    results = {t: {**setting({}, 1.0), "seconds": 360.0,
                   "cost": {"rkl-s0": {"train_s": 1800.0, "eval_s": 360.0}, "baseline": {"eval_s": 360.0}}}
               for t in (0.3, 0.6)}
    assert R.study_hours(results) == pytest.approx((1.0, 0.4, 0.2))


@pytest.mark.parametrize("args, message", [
    (["--settings", "0"], "temperatures must be > 0"),
    (["--settings", "0.6", "0.6"], "repeats a temperature"),
    (["--divs", "baseline", "kl"], "unknown --divs"),
    (["--divs", "baseline"], "at least one trained divergence"),
    (["--n-prompts", "100000"], "more than the 1319 GSM8k test prompts"),
    (["--task", "cnndm"], "unknown --task 'cnndm'; valid: gsm8k, dialogsum"),
    (["--task", "dialogsum", "--n-prompts", "501"], "more than the 500 DialogSum test prompts"),
    (["--device", "cuda:99"], "--device cuda:99"),
    (["--device", "tpu0"], "'tpu0' is not a device; valid: cpu, cuda"),
])
def test_bad_options_are_one_line_before_any_model(args, message):
    """A study of hours must refuse a mistake before its first minute."""
    with pytest.raises(cli.BadInput, match=message):
        R.parse_args(args)


def test_a_run_another_process_trains_is_waited_for(tmp_path):
    """Two writers of one run directory must never run at once: the study waits while the lock is held."""
    import threading

    from plumbing import rundir

    out = tmp_path / "run"
    out.mkdir()
    lock = rundir.RunLock(out).acquire()
    said = []
    waiter = threading.Thread(target=R.wait_while_in_use, args=(out, said.append, 0.05))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive() and len(said) == 1 and "in use by" in said[0]
    lock.release()
    waiter.join(5)
    assert not waiter.is_alive()


class _Protocol:
    def as_dict(self):
        return {"temperature": 0.6, "gamma": 5}


def _setting(n_prompts=3) -> "R.Setting":
    return R.Setting(teacher=None, prompts=[[1, 2]] * n_prompts, protocol=_Protocol(), target_sha="t",
                     baseline_dir=Path("base"), commit="c")


def test_a_draft_trained_elsewhere_by_the_same_recipe_has_the_same_fingerprint():
    """Where a run was written, with how many threads, on which device, and how often it saved do not change
    the recipe: a ledger entry must match whichever folder or machine trained it."""
    a = R.StudyConfig(runs="runs/a", threads=1)
    b = R.StudyConfig(runs="elsewhere", threads=2, device="cuda")
    fa = R.draft_fingerprint(a, 0.6, "rkl", 0, 8, _Protocol(), "t")
    assert fa == R.draft_fingerprint(b, 0.6, "rkl", 0, 8, _Protocol(), "t")
    assert "--temperature" in fa["distill"] and "--out" not in fa["distill"]


def test_a_draft_of_another_recipe_has_another_fingerprint():
    """A ledger entry is a result only for its own recipe: another seed, temperature or step count is
    another draft."""
    cfg = R.StudyConfig()
    base = R.draft_fingerprint(cfg, 0.6, "rkl", 0, 8, _Protocol(), "t")
    assert base != R.draft_fingerprint(cfg, 0.6, "rkl", 1, 8, _Protocol(), "t")
    assert base != R.draft_fingerprint(cfg, 1.0, "rkl", 0, 8, _Protocol(), "t")
    assert base != R.draft_fingerprint(R.StudyConfig(steps=40), 0.6, "rkl", 0, 8, _Protocol(), "t")


def test_a_setting_in_the_ledger_is_read_back_without_training_or_a_model(tmp_path, monkeypatch):
    """The drafts live outside the repository: on a new machine the committed ledger alone must give the
    setting's numbers, training and measuring nothing."""
    cfg = R.StudyConfig(runs=str(tmp_path / "runs"), ledger=str(tmp_path / "ledger"), seeds=(0,),
                        divs=("baseline", "rkl"), extra_divs=())
    s = _setting()
    R.write_json(R.ledger_path(cfg, 0.6, "teacher_entropy"),
                 {"fingerprint": {"target": "t", "n_prompts": 3, "protocol": _Protocol().as_dict()},
                  "result": {"entropy": [0.4, 0.3, 0.5], "tokens": 90, "seconds": 5.0}})
    for div, seed in (("baseline", None), ("rkl", 0)):
        fp = R.draft_fingerprint(cfg, 0.6, div, seed, 3, s.protocol, "t")
        entry = {"per_prompt": metrics([0.1, 0.2, 0.3]), "pooled_alpha": 0.2, "cost": {"eval_s": 1.0},
                 "estimates": None if div == "baseline" else {"train_alpha": 0.3, "val_alpha": 0.25}}
        R.write_json(R.ledger_path(cfg, 0.6, curve.run_name(div, seed)), {"fingerprint": fp, "result": entry})

    def no_work(*a, **k):
        raise AssertionError("trained or measured a draft the ledger holds")
    monkeypatch.setattr(R, "measure_draft", no_work)
    monkeypatch.setattr(R.curve, "teacher_entropy_per_prompt", no_work)
    out = R.run_setting(cfg, 0.6, log=print, setting=s)
    assert out["entropy"] == [0.4, 0.3, 0.5] and set(out["per_prompt"]) == {"baseline", "rkl-s0"}
    assert out["points"] == [{"name": "T0.6/rkl-s0", "eval_alpha": 0.2, "train_alpha": 0.3, "val_alpha": 0.25}]


def test_a_measured_draft_is_written_to_the_ledger_once(tmp_path, monkeypatch):
    """What the study measures must reach the ledger (the committed record) and be read from it next time."""
    cfg = R.StudyConfig(runs=str(tmp_path / "runs"), ledger=str(tmp_path / "ledger"), seeds=(0,),
                        divs=("baseline", "rkl"), extra_divs=())
    calls = []

    def measure(cfg, t, div, seed, setting, log):
        calls.append(div)
        return {"per_prompt": metrics([0.5]), "pooled_alpha": 0.5, "cost": {}, "draft_sha256": "d",
                "estimates": None if div == "baseline" else {"train_alpha": 0.4, "val_alpha": 0.4}}
    monkeypatch.setattr(R, "measure_draft", measure)
    monkeypatch.setattr(R.curve, "teacher_entropy_per_prompt",
                        lambda *a: (np.array([1.0]), np.array([2])))
    R.run_setting(cfg, 0.6, log=print, setting=_setting(1))
    R.run_setting(cfg, 0.6, log=print, setting=_setting(1))
    assert calls == ["baseline", "rkl"]
    entry = json.loads(R.ledger_path(cfg, 0.6, "rkl-s0").read_text())
    assert entry["commit"] == "c" and entry["result"]["draft_sha256"] == "d"


def test_a_report_of_part_of_the_study_says_what_it_lacks():
    """REAL.md is committed while the study grows over sessions: a report of one temperature and one seed must
    say so in its header, naming what is missing, and the whole study must say nothing of the kind."""
    part = R.StudyConfig(settings=(0.6,), divs=("baseline", "fkl", "rkl"), extra_divs=(), seeds=(0,))
    missing = R.missing_from_study(part)
    assert missing == ["temperatures 0.3, 1 not yet in it", "divergences jsd, tvd not yet in it",
                       "acceptance objectives at T = 0.6 nla, lk not yet in it", "seeds 1 not yet in it"]
    assert R.missing_from_study(R.StudyConfig()) == []


def test_another_task_keeps_its_runs_ledger_and_report_apart():
    """GSM8k's ledger (results/real-study/T<T>/) was measured before tasks existed: a DialogSum draft of the
    same divergence, seed and temperature must never be read back as GSM8k's, nor overwrite it."""
    gsm, dia = R.parse_args([]), R.parse_args(["--task", "dialogsum"])
    assert R.ledger_path(gsm, 0.6, "rkl-s0") == Path("results/real-study/T0.6/rkl-s0.json")
    assert R.ledger_path(dia, 0.6, "rkl-s0") == Path("results/real-study/dialogsum/T0.6/rkl-s0.json")
    assert R.setting_dir(dia, 0.6) == Path("runs/real-study/dialogsum/T0.6")
    assert (gsm.out, dia.out) == ("results/REAL.md", "results/REAL-dialogsum.md")
    assert (R.figure_prefix(gsm), R.figure_prefix(dia)) == ("real", "real-dialogsum")


def test_a_dialogsum_draft_is_trained_on_dialogsum_and_fingerprinted_apart():
    """The task is part of the recipe: distill.py gets --task dialogsum, and the ledger fingerprint differs from
    GSM8k's draft of the same divergence, seed and temperature."""
    gsm, dia = R.StudyConfig(), R.StudyConfig(task="dialogsum")
    assert distill.parse_args(R.distill_argv(dia, 0.6, "rkl", 0, Path("x"))).task == "dialogsum"
    assert R.draft_fingerprint(gsm, 0.6, "rkl", 0, 8, _Protocol(), "t") != \
        R.draft_fingerprint(dia, 0.6, "rkl", 0, 8, _Protocol(), "t")


def test_spec_bench_gains_are_the_distilled_drafts_minus_the_baseline_draft(tmp_path):
    """REAL.md quotes Spec-Bench's full run: each distilled draft's acceptance gain over the BASELINE draft (not over
    sps, nor its raw acceptance), per column, in points; with no run recorded it says so."""
    path = tmp_path / "specbench.json"
    assert "has not been recorded yet" in R.specbench_sentence(path, "GSM8k")
    gain = lambda m: {"mean": m, "lo": m - 0.003, "hi": m + 0.003, "n_prompts": 80}  # noqa: E731
    path.write_text(json.dumps({
        "protocol": {"max_new_tokens": 64},
        "drafts": [["baseline", "b", "ckpt/draft"], ["jsd-s0", "j", "runs/x/jsd-s0/final"]],
        "gains": {"specdec-jsd-s0": {"specdec-baseline": {"Translation": gain(0.006), "Overall": gain(0.020)},
                                     "sps": {"Translation": gain(0.5), "Overall": gain(0.5)}}}}))
    line = R.specbench_sentence(path, "GSM8k")
    assert "jsd-s0 (runs/x/jsd-s0/final)" in line and "64 new tokens" in line
    assert "Translation +0.6 [+0.3, +0.9], Overall +2.0 [+1.7, +2.3]" in line and "+50.0" not in line


def test_a_spec_bench_draft_of_another_task_is_named_as_such(tmp_path):
    """REAL-dialogsum.md quotes Spec-Bench's drafts too: one distilled on GSM8k must not read as a DialogSum
    draft."""
    path = tmp_path / "specbench.json"
    path.write_text(json.dumps({"protocol": {"max_new_tokens": 64},
                                "drafts": [["jsd-s0", "j", "runs/smollm2/gsm8k/jsd-s0/final"]],
                                "gains": {"specdec-jsd-s0": {"specdec-baseline": {}}}}))
    assert "distilled on GSM8k, not DialogSum" in R.specbench_sentence(path, "DialogSum")
    assert "distilled on" not in R.specbench_sentence(path, "GSM8k")


def test_every_run_is_told_its_device_and_may_resume_on_another(tmp_path):
    """distill.py picks a GPU by itself when there is one: the study must say where each run trains, and a run
    begun on the CPU must be resumable on a GPU (where it runs is not what it is)."""
    cfg = R.StudyConfig(device="cuda")
    argv = R.distill_argv(cfg, 0.6, "rkl", 0, tmp_path)
    assert argv[argv.index("--device") + 1] == "cuda"
    cpu_argv = R.distill_argv(R.StudyConfig(), 0.6, "rkl", 0, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(R.asdict(distill.parse_args(cpu_argv))))
    assert R.config_differences(tmp_path, argv) == []


def test_gpu_seconds_are_kept_apart_from_cpu_hours():
    """The header's CPU hours are one-thread CPU time: a run measured on a GPU must not be added to them, and
    its own hours must be reported apart."""
    results = {0.6: {**setting({}, 1.0), "gpu_seconds": 36.0,
                     "cost": {"rkl-s0": {"train_gpu_s": 360.0, "eval_gpu_s": 72.0},
                              "jsd-s0": {"train_s": 3600.0, "eval_s": 1800.0}}}}
    assert R.study_hours(results) == pytest.approx((1.0, 0.5, 0.0))
    assert R.study_hours(results, gpu=True) == pytest.approx((0.1, 0.02, 0.01))
    assert R.cost_key("train", "cuda:0") == "train_gpu_s" and R.cost_key("eval", "cpu") == "eval_s"
    assert "0.10 hours of training" in R.gpu_hours_clause(results)


def test_the_gpu_step_model_passes_through_both_measured_points():
    """The estimate's step cost is a line through the H100's two measured decoding speeds at batch 8
    (docs/benchmarks.md): 1306.2 tok/s with 4 layers, 850.0 tok/s with 12."""
    assert R.gpu_step_ms(4) == pytest.approx(8 / 1306.2 * 1000, abs=0.01)
    assert R.gpu_step_ms(12) == pytest.approx(8 / 850.0 * 1000, abs=0.01)


def test_training_steps_count_on_policy_sampling_only():
    """Off-policy steps (the warmup, and 1 - lmbda of the rest) read dataset answers: only the on-policy
    steps sample, max_new_tokens draft steps each; every step scores once with the teacher."""
    steps = R.training_steps({"steps": 80, "off_policy_warmup": 30, "lmbda": 0.5, "max_new_tokens": 128})
    assert (steps.draft, steps.target) == (25 * 128 + 3 * 80, 80)


def test_decoding_rounds_follow_the_measured_accepted_length():
    """A prompt needs generated / mean accepted length verification rounds, shared by a batch's rows; each
    round is gamma draft steps and one target step."""
    steps = R.decoding_steps({"generated": [128, 128], "mean_accepted_length": [2.0, 4.0]}, gamma=5, batch=2)
    assert (steps.draft, steps.target) == (5 * 48, 48)


def test_a_distilled_draft_adds_training_and_validation_to_its_evaluation():
    """A draft's GPU minutes are its evaluation's, plus its training and the validation decoding of
    val_prompts prompts at the evaluation's cost per prompt; the baseline is evaluation only."""
    cfg = R.StudyConfig(val_prompts=1)
    pp = {"generated": [128, 128], "mean_accepted_length": [2.0, 4.0]}
    ev = R.decoding_steps(pp, 5, cfg.eval_batch).gpu_seconds(4) / 60
    train = R.training_steps(R.recipe(cfg)).gpu_seconds(4) / 60
    assert R.gpu_minutes(cfg, pp, trained=False) == pytest.approx(ev)
    assert R.gpu_minutes(cfg, pp, trained=True) == pytest.approx(ev * 1.5 + train)


def test_the_full_grid_holds_every_run_of_the_whole_study():
    """The budget's 'runs not in the ledger yet' counts against the whole study: a baseline and every
    divergence and seed at each temperature, the acceptance objectives at the preset's temperature."""
    grid = R.full_grid(R.StudyConfig())
    assert len(grid) == 3 * (1 + 4 * 2) + 2 * 2 + 1
    assert (0.6, "nla-s1") in grid and (1.0, "nla-s0") not in grid and (0.3, "baseline") in grid
    assert [name for t, name in grid if t == R.NOISE_PROBE_T["gsm8k"]] == ["baseline"]   # the probe: no draft


def test_dialogsums_whole_study_is_the_presets_temperature_with_two_seeds():
    """DialogSum is the real high-entropy task, not a second knob: its report is complete with every main
    divergence at two seeds at the preset's temperature, and must not call itself partial for lacking
    temperatures or acceptance objectives."""
    grid = R.full_grid(R.StudyConfig(task="dialogsum"))
    assert sorted(grid) == sorted([(0.6, "baseline")] + [(0.6, f"{d}-s{s}") for d in ("fkl", "rkl", "jsd", "tvd")
                                                          for s in (0, 1)])
    assert R.parse_args(["--task", "dialogsum"]).settings == (0.6,)
    assert R.missing_from_study(R.parse_args(["--task", "dialogsum", "--seeds", "0"])) == ["seeds 1 not yet in it"]


def test_the_budget_reads_its_means_and_the_missing_runs_from_the_ledger(tmp_path):
    """REAL.md's budget: the mean measured cost per draft, and the rest of the study priced at those means
    from what the ledger lacks (here: everything but one setting's entropy, baseline and rkl-s0)."""
    cfg = R.StudyConfig(ledger=str(tmp_path), settings=(0.6,), seeds=(0,), divs=("baseline", "rkl"), extra_divs=())
    for name in ("teacher_entropy", "baseline", "rkl-s0"):
        R.write_json(R.ledger_path(cfg, 0.6, name), {})
    pp = {"generated": [128] * 4, "mean_accepted_length": [2.0] * 4}
    results = {0.6: {**setting({"baseline": pp, "rkl-s0": pp}, 0.4), "seconds": 600.0,
                     "cost": {"baseline": {"eval_s": 1200.0}, "rkl-s0": {"train_s": 1800.0, "eval_s": 600.0}}}}
    text = " ".join(R.budget_markdown(cfg, results))
    assert "30 CPU min of training and 10 of evaluation (1 draft), the baseline draft's evaluation 20" in text
    # 32 runs (the probe's baseline too), 30 missing: 3 baselines at 20 min, 27 drafts at 40 min, and the
    # entropy at 3 temperatures (0.3, 1.0, the probe's 1.3) at 10 min
    assert "30 of its runs are not in the ledger yet, about 20 CPU hours more" in text
    assert f"a distilled draft would take about {R.gpu_minutes(cfg, pp, True):.1f} GPU min" in text


def test_the_noise_probe_is_reported_from_its_measured_entropy(tmp_path):
    """Why the knob stops where it does must be read from the probe's measurement: exp(H) of the teacher
    there against the lowest setting's, ln V from the ledger's protocol, and the baseline's acceptance."""
    cfg = R.StudyConfig(ledger=str(tmp_path))
    R.write_json(R.ledger_path(cfg, 1.3, "teacher_entropy"), {"fingerprint": {"protocol": {"vocab_size": 49152}}})
    c = curve.Curve.__new__(curve.Curve)
    c.entropy = {0.6: (0.39, 0.38, 0.40), 1.0: (1.46, 1.41, 1.52)}
    probe = {"entropy": [6.12, 6.01, 6.23], "per_prompt": {"baseline": metrics([0.01, 0.02])}}
    line = R.noise_probe_sentence(cfg, c, 1.3, probe)
    assert "stops at T = 1.0: at T = 1.3" in line and "6.12 [6.01, 6.23] nats: exp(H) = 455" in line
    assert "against 1.5 at T = 0.6" in line and "ln V = 10.80" in line and "(token acceptance 1.5% over its 2" in line


def test_a_gpu_run_is_never_timed_as_cpu_time(tmp_path):
    """A draft trained and evaluated on a GPU has no CPU seconds: run_cost must not make them up from its files'
    times, and the budget's CPU means must leave it out (it used to be read as a CPU draft without eval_s)."""
    (tmp_path / "final").mkdir()
    (tmp_path / "config.json").write_text("{}")
    R.record_cost(tmp_path, R.cost_key("train", "cuda"), 60.0)
    R.record_cost(tmp_path, R.cost_key("eval", "cuda"), 30.0)
    assert R.run_cost(tmp_path) == {"train_gpu_s": 60.0, "eval_gpu_s": 30.0}
    pp = {"generated": [128], "mean_accepted_length": [2.0]}
    results = {0.6: {**setting({"rkl-s0": pp, "jsd-s0": pp}, 0.4), "seconds": 60.0,
                     "cost": {"rkl-s0": R.run_cost(tmp_path), "jsd-s0": {"train_s": 600.0, "eval_s": 300.0}}}}
    assert R.cpu_means(results).n_drafts == 1 and R.cpu_means(results).train == pytest.approx(10.0)
    assert R.cost_key("train", "cpu:0") == "train_s"


def test_the_teachers_entropy_samples_every_prompt_in_one_batch():
    """entropy.teacher_sample_entropies samples all prompts together (max_new_tokens target steps), then scores
    them 16 at a time: that, not max_new_tokens per 16 prompts, is what its GPU time follows."""
    cfg = R.StudyConfig()
    expected = R.Steps(0, 128 + 16).gpu_seconds(4) / 60
    assert R.entropy_gpu_minutes(cfg, 256) == pytest.approx(expected)


def test_the_noise_probe_is_paid_for_only_by_the_whole_knob(tmp_path):
    """The probe costs an hour: a run of a few settings reads it from the ledger when it is there and skips it
    otherwise; the whole knob measures it; a smoke run never does."""
    part = R.StudyConfig(ledger=str(tmp_path), settings=(0.6,))
    assert not R.wants_probe(part)
    assert R.wants_probe(R.StudyConfig(ledger=str(tmp_path)))
    assert not R.wants_probe(R.StudyConfig(ledger=str(tmp_path), quick=True))
    for name in ("teacher_entropy", "baseline"):
        R.write_json(R.ledger_path(part, 1.3, name), {})
    assert R.wants_probe(part)
    assert not R.wants_probe(R.StudyConfig(task="dialogsum", ledger=str(tmp_path)))


def test_a_budget_of_a_cheaper_recipe_is_not_written():
    """Runs of fewer steps or prompts would price the rest of the study at their own, smaller cost."""
    pp = {"generated": [128], "mean_accepted_length": [2.0]}
    results = {0.6: {**setting({"rkl-s0": pp}, 0.4), "cost": {"rkl-s0": {"train_s": 60.0, "eval_s": 30.0}}}}
    assert R.budget_markdown(R.StudyConfig(steps=10), results) == []
    assert R.budget_markdown(R.StudyConfig(n_prompts=64), results) == []


def test_the_reports_command_names_no_device():
    """REAL.md shows the recipe every run ran; where a run ran is the ledger's business, not the command's."""
    assert "--device" not in R.command_template(R.StudyConfig(device="cuda"))


def test_a_study_drafts_task_is_read_from_its_config(tmp_path):
    """GSM8k's study runs have no task folder (runs/real-study/T0.6/jsd-s0): the run's config.json says."""
    run = tmp_path / "T0.6" / "jsd-s0"
    (run / "final").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"task": "gsm8k"}))
    assert R.distilled_on(str(run / "final")) == "GSM8k"
    assert R.distilled_on("runs/smollm2/dialogsum/x/final") == "DialogSum"
    assert R.distilled_on("elsewhere/final") is None


def _ledger_entry(cfg, t, div, seed, s, acceptance=(0.1, 0.2, 0.3)):
    fp = R.draft_fingerprint(cfg, t, div, seed, len(s.prompts), s.protocol, s.target_sha)
    entry = {"per_prompt": metrics(list(acceptance)), "pooled_alpha": 0.2, "cost": {"eval_s": 1.0},
             "estimates": None if div == "baseline" else {"train_alpha": 0.3, "val_alpha": 0.25}}
    R.write_json(R.ledger_path(cfg, t, curve.run_name(div, seed)), {"fingerprint": fp, "result": entry})


def _ledger_entropy(cfg, t, s):
    R.write_json(R.ledger_path(cfg, t, "teacher_entropy"),
                 {"fingerprint": R.entropy_fingerprint(s), "result": {"entropy": [0.4, 0.3, 0.5], "tokens": 90}})


def test_a_setting_is_reported_at_the_seeds_every_one_of_its_drafts_has(tmp_path):
    """--from-ledger compares the divergences of a row over the same seeds: a seed one draft lacks is left out
    for the whole row, else a two-seed mean would be ranked against a one-seed mean."""
    cfg = R.StudyConfig(ledger=str(tmp_path), seeds=(0, 1), divs=("baseline", "rkl", "jsd"), extra_divs=())
    s = _setting()
    assert R.ledger_seeds(cfg, 0.6, s) == ()                      # nothing measured yet
    _ledger_entropy(cfg, 0.6, s)
    for div, seed in (("baseline", None), ("rkl", 0), ("jsd", 0), ("rkl", 1)):
        _ledger_entry(cfg, 0.6, div, seed, s)
    assert R.ledger_seeds(cfg, 0.6, s) == (0,)
    _ledger_entry(cfg, 0.6, "jsd", 1, s)
    assert R.ledger_seeds(cfg, 0.6, s) == (0, 1)


def test_a_setting_without_its_baseline_or_entropy_is_not_reported(tmp_path):
    """The baseline is every row's reference and the entropy its position on the knob: without either the row
    says nothing, whatever drafts the ledger holds."""
    cfg = R.StudyConfig(ledger=str(tmp_path), seeds=(0,), divs=("baseline", "rkl"), extra_divs=())
    s = _setting()
    _ledger_entry(cfg, 0.6, "rkl", 0, s)
    _ledger_entropy(cfg, 0.6, s)
    assert R.ledger_seeds(cfg, 0.6, s) == ()
    _ledger_entry(cfg, 0.6, "baseline", None, s)
    assert R.ledger_seeds(cfg, 0.6, s) == (0,)


def test_a_ledger_entry_of_another_recipe_does_not_count(tmp_path):
    """An entry written under another fingerprint (fewer steps, say) is not this study's draft."""
    cfg = R.StudyConfig(ledger=str(tmp_path), seeds=(0,), divs=("baseline", "rkl"), extra_divs=())
    s = _setting()
    _ledger_entropy(cfg, 0.6, s)
    _ledger_entry(cfg, 0.6, "baseline", None, s)
    _ledger_entry(R.StudyConfig(ledger=str(tmp_path), steps=40), 0.6, "rkl", 0, s)
    assert R.ledger_seeds(cfg, 0.6, s) == ()


def test_the_report_from_the_ledger_reads_without_measuring(tmp_path, monkeypatch):
    """--from-ledger must never start training: a setting it reports is read back whole, one it cannot is left
    out, and each row carries its own seeds into the analysis."""
    cfg = R.StudyConfig(ledger=str(tmp_path), seeds=(0, 1), settings=(0.6, 1.0), divs=("baseline", "rkl", "jsd"),
                        extra_divs=(), from_ledger=True)
    s = _setting()
    monkeypatch.setattr(R, "load_setting", lambda cfg, t: s)

    def no_work(*a, **k):
        raise AssertionError("--from-ledger trained or measured something")
    monkeypatch.setattr(R, "measure_draft", no_work)
    monkeypatch.setattr(R.curve, "teacher_entropy_per_prompt", no_work)
    _ledger_entropy(cfg, 0.6, s)
    for div, seed in (("baseline", None), ("rkl", 0), ("jsd", 0), ("rkl", 1), ("jsd", 1)):
        _ledger_entry(cfg, 0.6, div, seed, s)
    _ledger_entry(cfg, 1.0, "baseline", None, s)              # T = 1.0: no entropy, no drafts
    results = R.ledger_results(cfg, (0.6, 1.0), log=print)
    assert set(results) == {0.6} and results[0.6]["seeds"] == (0, 1)
    assert set(results[0.6]["per_prompt"]) == {"baseline", "rkl-s0", "jsd-s0", "rkl-s1", "jsd-s1"}


def test_the_report_from_an_empty_ledger_is_refused(tmp_path, monkeypatch):
    """Nothing to report is the user's mistake (a wrong --ledger, say): one line naming the ledger."""
    cfg = R.StudyConfig(ledger=str(tmp_path), seeds=(0,), settings=(0.6,), from_ledger=True)
    monkeypatch.setattr(R, "load_setting", lambda cfg, t: _setting())
    with pytest.raises(cli.BadInput, match=f"--from-ledger: {tmp_path} holds no temperature of \\[0.6\\]"):
        R.ledger_results(cfg, (0.6,), log=print)


def test_a_report_with_fewer_seeds_at_one_temperature_says_so():
    """A row reported at seed 0 only beside rows at seeds 0 and 1 reads as weaker evidence: the header and the
    setting's sentence must say which temperature lacks which seed, and a left-out temperature is missing."""
    cfg = R.StudyConfig()
    results = {0.6: {"seeds": (0, 1)}, 1.0: {"seeds": (0,)}}
    assert R.missing_from_study(cfg, results) == ["temperatures 0.3 not yet in it", "seed 1 not yet at T = 1"]
    assert R.seeds_clause(cfg, results) == "seeds 0, 1 at T = 0.6; seed 0 at T = 1"
    assert R.seeds_clause(cfg, {0.6: {"seeds": (0, 1)}, 1.0: {"seeds": (0, 1)}}) == "seeds 0, 1"
    both_seed_0 = {0.3: {"seeds": (0,)}, 0.6: {"seeds": (0,)}, 1.0: {"seeds": (0,)}}
    assert R.missing_from_study(cfg, both_seed_0) == ["seeds 1 not yet in it"]


def test_the_report_from_the_ledger_never_measures_an_entropy(tmp_path, monkeypatch):
    """The teacher's entropy costs half an hour per temperature: --from-ledger must stop, not measure it, where the
    ledger's entry is of another protocol (a noise probe found by name but not by fingerprint, say)."""
    cfg = R.StudyConfig(ledger=str(tmp_path), runs=str(tmp_path / "runs"), from_ledger=True)

    def no_work(*a, **k):
        raise AssertionError("--from-ledger measured the teacher's entropy")
    monkeypatch.setattr(R.curve, "teacher_entropy_per_prompt", no_work)
    R.write_json(R.ledger_path(cfg, 1.3, "teacher_entropy"), {"fingerprint": {"other": 1}, "result": {}})
    with pytest.raises(RuntimeError, match="--from-ledger measures nothing"):
        R.measure_setting_entropy(cfg, 1.3, _setting(), log=print)
