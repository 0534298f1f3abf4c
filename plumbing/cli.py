"""What every script (distill.py, data.py, models.py and the study/ scripts) does with its command line.

Bad input is one line on stderr, `error: <what is wrong and what is allowed>`, exit status 2, and it comes
before the work: each script runs its checks (options, paths, data rows, model folders, prompt lengths)
inside `before_the_work()`, which marks the ValueError / OSError / RuntimeError of a failed check as bad
input; `script_main` prints that as the one line (no traceback). Errors after the checks, inside the
work, keep their traceback: they are bugs or the machine's doing, not the user's input. Called from Python
(tests, report.py), the scripts' main() raise the check's own exception (data.DataError, ...), as before.

Threads (--threads, README "Threads"): the CPU thread count of torch's intra-op pool. Default 1, measured
(bench/bench_threads.py, docs/benchmarks.md): on a machine shared with another busy process, 2 OpenMP
threads that spin-wait for each other lose to 1 thread; and torch promises bit-equal results only at the
same count (a sum split over another number of threads may round differently), so distill.py records it
in config.json and --resume refuses a different one on the CPU.
"""
import argparse
import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

DEFAULT_THREADS = 1
THREADS_PER_CPU = 4     # more --threads per CPU is a typo: 100000 threads crashed OpenMP (rc -11)
EXIT_BAD_INPUT = 2


class BadInput(ValueError):
    """Input the user must fix (raised by the checks here): one `error: ...` line, exit status 2."""


BAD_INPUT = (ValueError, OSError, RuntimeError)     # what a failed check raises (DataError, RunDirError, ...)


@contextmanager
def before_the_work():
    """The checks of a script: a ValueError / OSError / RuntimeError raised inside (a bad option, a missing
    file, a model folder that is not one, data rows) is bad input. It is marked as such and goes on as it
    is (Python callers still catch data.DataError, rundir.RunDirError, ...); script_main prints it."""
    try:
        yield
    except BAD_INPUT as e:
        e.bad_input = True
        raise


def is_bad_input(e: BaseException) -> bool:
    return isinstance(e, BadInput) or (isinstance(e, BAD_INPUT) and getattr(e, "bad_input", False))


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `timeout`, job schedulers and torchrun send to stop a process), raised like Ctrl-C's
    KeyboardInterrupt so that the same clean-up runs (temporary folders removed, distill.py's one line with
    the command that resumes); the exit status is then 128 + 15."""


def _raise_terminated(signum, frame):
    raise Terminated()


def exit_status_of(interrupt: KeyboardInterrupt) -> int:
    return 128 + signal.SIGTERM if isinstance(interrupt, Terminated) else 130


def script_main(main, argv=None):
    """The `if __name__ == "__main__"` of every script: run main; bad input -> one line, exit 2 (anything
    else keeps its traceback); Ctrl-C -> exit 130 and SIGTERM -> exit 143, both after the script printed
    where it stopped (SIGTERM is raised as Terminated, a KeyboardInterrupt, so the script handles both alike)."""
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        main(argv)
    except BAD_INPUT as e:
        if not is_bad_input(e):
            raise
        report_bad_input(str(e))
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt as e:
        sys.exit(exit_status_of(e))


RANKS_WAIT_S = 30.0     # under torchrun: how long a rank with bad input waits for the others to fail too


def torchrun_store():
    """A client of the key-value store torchrun's agent keeps for its ranks (MASTER_ADDR:MASTER_PORT, the one
    init_process_group joins), or None outside torchrun or where it cannot be reached."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "MASTER_PORT" not in os.environ:
        return None
    from datetime import timedelta

    import torch.distributed as dist
    try:
        return dist.TCPStore(os.environ.get("MASTER_ADDR", "localhost"), int(os.environ["MASTER_PORT"]),
                             is_master=False, timeout=timedelta(seconds=10))
    except (RuntimeError, ValueError, OSError):
        return None


def report_bad_input(message: str):
    """The one `error: ...` line. Under torchrun every rank runs the same checks and fails the same way: rank 0
    prints the line, and each rank waits (at most RANKS_WAIT_S) until every rank has failed before it exits 2,
    so that torchrun stops none of them first (SIGTERM) and no rank repeats the line. A rank whose check
    failed while rank 0's did not (rank 0 never reported) prints its own line, naming its rank."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    store = torchrun_store() if world > 1 else None
    if store is None:
        print(f"error: {message}", file=sys.stderr, flush=True)
        return
    # torchrun SIGTERMs the ranks still running as soon as one has exited, and the exits of ranks that all
    # failed are milliseconds apart: a rank with bad input finishes and exits 2 itself (the status torchrun
    # reports) instead of dying of that signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    key = f"cli/bad_input/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"     # one per (re)start
    if rank == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
        store.set(key + "/rank0", "1")
    failed, deadline = store.add(key, 1), time.monotonic() + RANKS_WAIT_S
    while failed < world and time.monotonic() < deadline:
        time.sleep(0.05)
        failed = store.add(key, 0)
    if rank != 0 and not store.check([key + "/rank0"]):
        print(f"error: (rank {rank}) {message}", file=sys.stderr, flush=True)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors (unknown flag, a value of the wrong type) are one line too, exit 2."""

    def error(self, message):
        raise BadInput(f"{message} (see {self.prog} --help)")


def description(doc: str) -> str:
    """A module docstring's first paragraph as one line, for --help: its first line alone may stop
    mid-sentence (the docstrings wrap at 120 columns)."""
    return " ".join(doc.strip().split("\n\n")[0].split())


def help_text(text: str) -> str:
    """`text` for argparse's help=, which %-formats it (%(default)s): a literal % (e.g. from an f-string's
    {x:.0%}) must be doubled, or --help prints argparse's internal data or fails."""
    return text.replace("%", "%%")


def add_threads_option(parser: argparse.ArgumentParser, default=DEFAULT_THREADS):
    parser.add_argument("--threads", type=int, default=default,
                        help="CPU threads of torch (README 'Threads': more than 1 is slower, not faster, when "
                             "another process keeps the cores busy, and results are exact only at the same "
                             f"count); default %(default)s, at most {THREADS_PER_CPU} per CPU")


MAX_SEED = 2**32 - 1      # the seeds derived from a run's (seed * 1_000_003 + step ...) fit torch's 64 bits


def check_seed(seed: int, flag: str = "--seed") -> int:
    """A seed is an integer in [0, MAX_SEED]: torch's generators take 64 bits, and every seed the scripts derive
    from it (data.prompt_generator, step_prompt_indices: seed times a constant near 10^6, plus the step) must
    fit them too."""
    if not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise BadInput(f"{flag} {seed!r} is not allowed; {flag} must be an integer >= 0 and <= {MAX_SEED} (2^32 - 1)")
    return seed


def max_threads() -> int:
    """The largest --threads allowed: THREADS_PER_CPU per CPU of this machine. Oversubscribing a
    little is the user's choice; thousands of threads make OpenMP fail (a segfault, no message)."""
    return THREADS_PER_CPU * (os.cpu_count() or 1)


def check_threads(threads: int) -> int:
    limit = max_threads()
    if not isinstance(threads, int) or not 1 <= threads <= limit:
        raise BadInput(f"--threads {threads!r} is not allowed; --threads must be an integer >= 1 "
                       f"and <= {limit} ({THREADS_PER_CPU} per CPU: this machine has "
                       f"{os.cpu_count()} CPUs)")
    return threads


def set_threads(threads: int):
    """torch's intra-op thread count (the OpenMP pool every CPU kernel uses)."""
    import torch

    torch.set_num_threads(check_threads(threads))


def check_markdown_out(out, heading: str, default: str, flag: str = "--out",
                       figures: bool = True) -> Path:
    """The --out of report.py / curve.py: the Markdown file they write at the very end, with figures/ beside it.
    Checked before any work, since the study takes minutes to hours: a folder, a file the script did not write
    (its first line is not `heading`, the script's own title), and a place that cannot be created or written
    are refused, naming what is there (`default`: the script's default --out, named in the advice).
    A report of the script's own is replaced: that is how it is updated.
    figures=False: a script that writes no figures/ beside it (specbench.py's --report)."""
    out = Path(out)
    if out.is_dir():
        beside = ", figures/ go beside it" if figures else ""
        raise BadInput(f"{flag} {out} is a folder; pass the Markdown file to write in it (e.g. "
                       f"{out / Path(default).name}){beside}")
    if out.exists():
        with open(out, "rb") as f:
            first = f.readline(200).decode("utf-8", "replace").rstrip("\n")
        if not first.startswith(heading):
            raise BadInput(f"{flag} {out} exists and is not a file this script wrote (its first line is "
                           f"{first[:60]!r}, not {heading!r}); it would be replaced: move it or pass another {flag}")
    folder = out.parent
    while not folder.exists():                  # the nearest existing folder: created from there
        folder = folder.parent
    if not folder.is_dir():
        raise BadInput(f"{flag} {out} cannot be created: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise BadInput(f"{flag} {out} cannot be written: {out if out.exists() else folder} is not writable")
    fig_dir = out.parent / "figures"
    if figures and fig_dir.exists() and not fig_dir.is_dir():
        raise BadInput(f"{flag} {out}: the figures go to {fig_dir}, which is a file, not a folder")
    return out


def check_runs_root(runs, given: bool, flag: str = "--runs") -> Path:
    """The root of distill.py's runs that evaluate.py and specbench.py read the drafts from
    (<runs>/<preset>/<task>/<run>/final). It must be a folder: under a file no run is found, and
    the script went on with the baseline draft alone as if none had been trained. Passed on the
    command line (`given`) it must exist; the default (runs/) may be missing: nothing trained yet,
    the baseline alone."""
    runs = Path(runs)
    where = ("pass the root distill.py wrote its runs to (runs/, holding "
             "<preset>/<task>/<run>/final)")
    if runs.exists() and not runs.is_dir():
        raise BadInput(f"{flag} {runs} is a file, not a folder; {where}")
    if given and not runs.is_dir():
        raise BadInput(f"{flag} {runs}: no such folder; {where}")
    return runs


def apply_overrides(cfg, args, preset: dict | None, sequences=(), values=()):
    """A study's config: the QUICK preset (when given) first, then the options the user passed (not None).

    `sequences` name list options (stored as tuples), `values` scalar ones; both are attributes of cfg and args.
    """
    for key, v in (preset or {}).items():
        setattr(cfg, key, v)
    for key in sequences:
        if getattr(args, key) is not None:
            setattr(cfg, key, tuple(getattr(args, key)))
    for key in values:
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    return cfg


def write_markdown(out, lines: list[str]) -> Path:
    """A report's lines to `out`, atomically (<out>.md.tmp, then a rename): a crash leaves the old report or
    the new one, never half of one."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)
    return out


def parse_dataclass(config_class, argv=None, **parser_kwargs):
    """A config dataclass from the command line: each field whose metadata has flag=True is an
    option named after it (max_new_tokens -> --max-new-tokens; a bool -> --x / --no-x), with the
    metadata's help and the field's default; the other fields keep their defaults."""
    p = ArgumentParser(**parser_kwargs)
    for f in fields(config_class):
        if not f.metadata["flag"]:
            continue
        flag, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.type is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                           help=help)
        else:                                     # `int | None` -> int
            typ = next(a for a in getattr(f.type, "__args__", (f.type,)) if a is not type(None))
            p.add_argument(flag, type=typ, default=f.default, help=help)
    return config_class(**vars(p.parse_args(argv)))
