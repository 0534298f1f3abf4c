"""The run directory of distill.py (<out>/): what may be trusted in it after a crash, and who may write it.

A run directory holds
    config.json             the run's settings (json of distill.Config), written atomically
    metrics.jsonl           one json row per optimizer step {"step": s, ...}: append-only, flushed per step
    ckpt-<step>/            the last two checkpoints; each lists the sha256 of its files in checksums.json
    final/                  the trained student (a plain Hugging Face directory)
    best/                   with --eval-every: the student of the best validation step, best.json, checksums
    .lock                   the pid of the one process that writes here (while it runs)

Invariants (each kept by one small function below, each pinned by tests/test_rundir.py):
  * the log is never rewritten in place. Dropping the rows after a checkpoint on --resume writes a new
    file and renames it over the old one (os.replace is atomic): a crash at any moment leaves the old or the
    new log, whole. A torn last line (a crash or a full disk mid-write) is reported and dropped.
  * one writer: `RunLock` holds an exclusive flock on <out>/.lock. The kernel drops it when the process dies,
    so the lock of a dead process (kill -9, power loss) is recognised as stale without guessing from pids;
    the pid in the file only names the holder in the message.
  * a fresh run never deletes a run silently: it is refused unless --overwrite; --resume is refused when a
    setting that changes the result (everything but RESUME_MAY_CHANGE) differs from the saved config.json.
  * a checkpoint is trusted only if every file matches its checksum; --resume falls back to the previous
    (verified) checkpoint, saying so, when the newest is damaged.
"""
import errno
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from plumbing import cli

LOG, CONFIG, LOCK, CHECKSUMS = "metrics.jsonl", "config.json", ".lock", "checksums.json"
KEEP_CHECKPOINTS = 2
# settings a resumed run may change: where/how often it writes and on which device; nothing it computes
RESUME_MAY_CHANGE = frozenset({"out", "resume", "overwrite", "check", "save_every", "device", "gradient_checkpointing"})
# recorded facts of the launch that are not options: how a difference is named
LAUNCH_FIELDS = {"world_size": "the world size (processes: torchrun --nproc_per_node)"}


class RunDirError(ValueError):
    """A run-directory state that the user must resolve (the message says how)."""


def say(msg: str):
    print(f"[{Path(sys.argv[0]).name or 'distill'}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- atomic files

def fsync_dir(d: Path):
    """Make a rename inside d durable (POSIX: the directory entry lives in the directory's own blocks)."""
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str):
    """Replace `path` by `text` all at once: write a temporary sibling, fsync it, rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


# ----------------------------------------------------------------------------- the log

def read_log(path: Path) -> tuple[list[dict], str | None]:
    """(rows, torn): every complete row of a metrics.jsonl, and the torn last line if there is one.

    A line is complete when it ends with a newline and parses as a json object with a "step". Only the
    last line can be torn (rows are appended whole and flushed in order); damage before it is not a
    crash's doing and is an error naming the line."""
    path = Path(path)
    if not path.exists():
        return [], None
    lines = path.read_text(errors="replace").split("\n")     # the last piece is "" after a final newline
    rows, torn = [], None
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        if last and line == "":
            break
        try:
            row = json.loads(line)
            ok = isinstance(row, dict) and "step" in row and not last    # no newline: a cut-off write
        except json.JSONDecodeError:
            ok = False
        if ok:
            rows.append(row)
        elif last or (i == len(lines) - 2 and lines[-1] == ""):
            torn = line
        else:
            raise RunDirError(f"{path}: line {i + 1} is not a json row with a 'step' ({line[:80]!r}); "
                              f"only a torn last line is expected after a crash. Fix or remove the line.")
    return rows, torn


def _steps_text(steps: list[int]) -> str:
    """[5, 6, 9] -> '5-6, 9'."""
    runs, start = [], None
    for i, s in enumerate(steps):
        start = s if start is None else start
        if i + 1 == len(steps) or steps[i + 1] != s + 1:
            runs.append(f"{start}" if start == s else f"{start}-{s}")
            start = None
    return ", ".join(runs)


@dataclass
class LogScan:
    """metrics.jsonl read leniently: `rows` = the rows of steps 1..n in order with none missing (the part a
    resume can keep), `dropped` = the steps of the rows after the first damage, `problem` = that damage in
    words (None when the log is whole; a torn last line, the one thing a crash leaves, is `torn`)."""
    rows: list[dict]
    dropped: list[int]
    problem: str | None
    torn: str | None


def scan_log(path: Path) -> LogScan:
    """The rows of steps 1, 2, ... up to the first damage: a line that is not a row (torn in the middle,
    NUL bytes left by a lost write), or a missing or repeated step (a gap: lines lost in the middle). Never
    raises for the content; the rows after the damage are counted in `dropped`."""
    path = Path(path)
    if not path.exists():
        return LogScan([], [], None, None)
    lines = path.read_text(errors="replace").split("\n")     # the last piece is "" after a final newline
    rows, later, problem, torn = [], [], None, None
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        if last and line == "":
            break
        try:
            row = json.loads(line)
            ok = isinstance(row, dict) and isinstance(row.get("step"), int) and not last
        except json.JSONDecodeError:
            row, ok = None, False
        if problem is not None:
            if ok:
                later.append(row["step"])
            continue
        if not ok:
            if last or (i == len(lines) - 2 and lines[-1] == ""):
                torn = line
            else:
                problem = f"line {i + 1} is not a json row with a 'step' ({line[:60]!r})"
        elif row["step"] != len(rows) + 1:
            problem = (f"line {i + 1} holds step {row['step']} where step {len(rows) + 1} belongs (rows "
                       f"missing or repeated: lines lost in the middle of the file)")
            later.append(row["step"])
        else:
            rows.append(row)
    return LogScan(rows, later, problem, torn)


def truncate_log(path: Path, step: int) -> list[dict]:
    """Keep the rows with step <= `step` (those the checkpoint of that step accounts for): written to a
    new file that replaces the old one atomically. A torn last line is reported and dropped; so are the
    rows after a damaged line or a gap (resume_checkpoint chose a step the rows before it reach, so the
    log keeps one row per step), naming their steps."""
    path = Path(path)
    scan = scan_log(path)
    if scan.torn is not None:
        say(f"{path}: dropped a torn last line ({scan.torn[:60]!r}...), left by a crash or a full disk")
    if scan.problem is not None:
        say(f"{path}: {scan.problem}; dropped the rows after it"
            + (f" (steps {_steps_text(scan.dropped)})" if scan.dropped else "")
            + f", kept steps 1-{len(scan.rows)}")
    rows = scan.rows
    kept = [r for r in rows if r["step"] <= step]
    if path.exists() or kept:
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def open_log(out: Path, resume_step: int | None):
    """The log, opened for appending (each row: write + flush, see distill.main). resume_step=None: a
    fresh run, the log starts empty; an int: the rows after that step are dropped first."""
    path = Path(out) / LOG
    truncate_log(path, 0 if resume_step is None else resume_step)
    return open(path, "a")


def last_logged_step(out: Path) -> int:
    rows, _ = read_log(Path(out) / LOG)
    return rows[-1]["step"] if rows else 0


# ----------------------------------------------------------------------------- one writer

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:            # someone else's process: alive
        return True
    return True


def _holder(path: Path) -> str:
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return "another process"
    return f"process {pid}"


class RunLock:
    """Exclusive writer of a run directory: an flock on <out>/.lock, which holds the holder's pid.

    with RunLock(out): ...   -- refused with RunDirError (naming the pid) while another process holds it.
    A lock file whose process died is not locked (the kernel releases flocks with the process), so it is
    taken over, and the take-over is reported when the recorded pid is gone."""

    def __init__(self, out):
        self.path = Path(out) / LOCK
        self.fd = None

    def acquire(self):
        self.created = not self.path.parent.exists()     # removed again if the run writes nothing
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunDirError(f"run directory {self.path.parent} is in use by {_holder(self.path)} "
                                  f"(lock {self.path}); wait for it to finish or pass another --out") from None
            # the file may have been unlinked by the holder we waited behind: then lock the new one
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        old = os.read(fd, 64).decode(errors="replace").split()
        if old and old[0].isdigit() and int(old[0]) != os.getpid() and not _alive(int(old[0])):
            say(f"{self.path}: took over the stale lock of process {old[0]}, which is no longer running")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self):
        if self.fd is not None:
            try:
                self.path.unlink()          # still ours: we hold the flock, nobody else can have replaced it
            except OSError:                 # gone, or the directory turned unwritable: the flock goes anyway
                pass
            os.close(self.fd)                # closing drops the flock
            self.fd = None
            try:
                if self.created and not any(self.path.parent.iterdir()):
                    self.path.parent.rmdir()     # a run that failed before writing anything leaves no trace
            except OSError:
                pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def check_unlocked(out: Path):
    """Refuse early (before any model loads) when another process writes `out`; takes nothing."""
    path = Path(out) / LOCK
    if not path.exists():
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunDirError(f"run directory {out} is in use by {_holder(path)} (lock {path}); "
                          f"wait for it to finish or pass another --out") from None
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- fresh run, overwrite

# what a run writes into <out> (anything else there is not ours): names, and the patterns of checkpoints and
# of interrupted writes (.ckpt-*.tmp, .final.tmp, .best.tmp, .config.json.tmp, ...)
RUN_NAMES = frozenset({CONFIG, LOG, LOCK, "final", "best", "sharding.json"})
RUN_PATTERNS = ("ckpt-*", "damaged-ckpt-*", ".*.tmp")
# the keys every config.json of distill.py has had (a model's config.json has none of them together)
RUN_CONFIG_KEYS = frozenset({"task", "div", "seed", "lmbda", "preset"})


def is_run_config(path: Path) -> bool:
    """True when `path` is the config.json of a run of ours (distill.Config's fields), not, e.g., a model's."""
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and RUN_CONFIG_KEYS <= saved.keys()


def is_run_dir(out: Path) -> bool:
    """`out` was written by a run of ours: its config.json is a run's, or its metrics.jsonl starts with a row
    (a model folder has neither)."""
    out = Path(out)
    if is_run_config(out / CONFIG):
        return True
    try:
        with open(out / LOG) as f:
            first = json.loads(f.readline())
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and "step" in first


def foreign_entries(out: Path) -> list[Path]:
    """The entries of `out` that no run of ours wrote: other names, and a config.json that is not a run's
    (a model folder's). A run never writes over them, and --overwrite never deletes them."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = []
    for p in sorted(out.iterdir()):
        if p.name == CONFIG:
            if not is_run_config(p):
                found.append(p)
        elif p.name not in RUN_NAMES and not any(p.match(pat) for pat in RUN_PATTERNS):
            found.append(p)
    return found


def describe_entries(paths: list[Path], most: int = 4) -> str:
    names = [p.name + ("/" if p.is_dir() else "") for p in paths]
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def check_not_foreign(out: Path):
    """A run writes only into a new or empty folder, or a run directory of ours (config.json of a run): in
    a folder holding anything else (a model folder: its config.json would be replaced) it is refused, with
    or without --overwrite, naming what is there."""
    foreign = foreign_entries(out)
    if not foreign or is_run_dir(out):
        return
    model = " (a model folder?)" if (Path(out) / CONFIG).exists() else ""
    raise RunDirError(f"--out {out} is not a run directory of distill.py: it holds {describe_entries(foreign)}"
                      f"{model}, which no run wrote. A run writes only into a new or empty folder or its own "
                      f"run directory, and --overwrite deletes only a run's own files; pass another --out")


def run_files(out: Path) -> list[Path]:
    """The files and directories of a run in `out` (anything else there is the user's and is left alone)."""
    out = Path(out)
    if not out.is_dir():
        return []
    names = [out / LOG, out / "final", out / "best"] + ([out / CONFIG] if is_run_dir(out) else [])
    return sorted([p for p in names if p.exists()] + list(out.glob("ckpt-*")) + list(out.glob("damaged-ckpt-*")))


def check_fresh(out: Path, overwrite: bool):
    """A run started without --resume may not replace a run silently. The advice agrees with
    check_resumable's: --resume only where there is a checkpoint to resume from. A folder that is not a run
    directory (check_not_foreign) is refused even with --overwrite."""
    check_not_foreign(out)
    found = run_files(out)
    if found and not overwrite:
        held = ', '.join(p.name for p in found[:4])
        if checkpoints(out):
            raise RunDirError(f"--out {out} already holds a run ({held}); continue it with --resume, or start "
                              f"again from scratch with --overwrite (deletes its checkpoints, log and final model)")
        raise RunDirError(f"--out {out} already holds a run ({held}) that stopped before its first checkpoint, so "
                          f"there is nothing to --resume; start it again with --overwrite (deletes its log), or "
                          f"pass another --out")


def check_resumable(out: Path):
    """--resume needs a checkpoint in `out`; the advice agrees with check_fresh's."""
    if checkpoints(out):
        return
    if run_files(out):
        raise RunDirError(f"--resume: the run in {out} stopped before its first checkpoint (ckpt-*), so there is "
                          f"nothing to resume; start it again with --overwrite (deletes its log), or pass another "
                          f"--out")
    raise RunDirError(f"--resume: no run in {out} (no checkpoint ckpt-*); train without --resume to start it, or "
                      f"pass the --out of the run to continue")


def discard_unstarted(out: Path):
    """A fresh run that failed or was stopped before logging its first step leaves nothing that would make
    the retry need --overwrite: its config.json and empty metrics.jsonl are removed (a run with a logged
    step, a checkpoint or a final model is left as it is)."""
    out = Path(out)
    if checkpoints(out) or (out / "final").exists() or not (out / CONFIG).exists() or not is_run_dir(out):
        return                               # is_run_dir: never another folder's config.json
    try:
        rows, _ = read_log(out / LOG)
    except RunDirError:
        return
    if rows:
        return
    for p in (out / LOG, out / CONFIG):
        p.unlink(missing_ok=True)


def start_fresh(out: Path, overwrite: bool):
    """Check again under the lock, then clear the old run when --overwrite."""
    check_fresh(out, overwrite)
    for p in run_files(out):
        say(f"--overwrite: removing {p}")
        shutil.rmtree(p) if p.is_dir() else p.unlink()


@contextmanager
def claimed(out: Path, argv: list[str], *, master: bool, fresh: bool, overwrite: bool):
    """distill.py's run directory for the length of a run: rank 0 takes its lock (another run that
    started on it since the checks: one line) and, for a fresh run, clears it (--overwrite) under
    the lock. Inside, a fresh run that stops before its first logged step leaves nothing behind that
    would block a retry (discard_unstarted); Ctrl-C / SIGTERM prints one line with the command that
    resumes; a failed write becomes one line naming the file (write_failure; exit 2)."""

    lock = RunLock(out) if master else None
    with cli.before_the_work():
        if lock is not None:
            lock.acquire()
    try:
        with cli.before_the_work():          # checked again under the lock (another run may have written)
            if master and fresh:
                start_fresh(out, overwrite)
        try:
            yield
        except BaseException:
            if master and fresh:
                try:
                    discard_unstarted(out)
                except OSError:              # an unwritable directory: what is there stays, said below
                    pass
            raise
    except KeyboardInterrupt as e:
        if master:
            how = "terminated (SIGTERM)" if isinstance(e, cli.Terminated) else "interrupted"
            print(interrupted_message(out, argv, how), file=sys.stderr, flush=True)
        raise
    except OSError as e:
        message = write_failure(e, out, argv) if master else None
        if message is None:
            raise
        failure = RunDirError(message)
        failure.bad_input = True             # not a bug: one line (cli.script_main), exit 2
        raise failure from e
    finally:
        if lock is not None:
            lock.release()


def check_out_dir(out: Path, flag: str = "--out"):
    """`out` must be a directory we can write, or creatable: its nearest existing ancestor is a writable
    directory. `flag`: the option the message names (evaluate.py checks its --results the same way)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{flag} {out} is a file, not a directory; pass a directory (it is created if missing)")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise RunDirError(f"{flag} {out} cannot be created: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "is not writable" if probe == out else f"cannot be created: {probe} is not writable"
        raise RunDirError(f"{flag} {out} {what}; pass a directory you can write")


def task_group(task: str, source: str, data_path, preset_source: str) -> str:
    """The folder of a task's runs and evaluations under <root>/<preset>/ (distill.py's default --out,
    evaluate.py's runs and results, report.py): the task's name on the preset's own data, else the task,
    the source and, for local files, the data's name (gsm8k-file-gsm8k, gsm8k-hub), so that runs and results
    on other data neither replace the preset's nor are refused because of them."""
    preset_source, preset_path = preset_source if isinstance(preset_source, tuple) else (preset_source, None)
    if source == preset_source and (preset_path is None or str(data_path) == str(preset_path)):
        return task
    tag = f"{task}-{source}"
    if source == "file" and data_path:
        tag += "-" + re.sub(r"[^A-Za-z0-9._-]+", "_", data_name(data_path))
    return tag


SPLIT_WORDS = ("train", "test", "validation", "valid", "val", "eval", "dev")


def data_name(data_path) -> str:
    """The name of a data set given as a folder or as one split's file, the same for every split of it, so that
    training on data/gsm8k/train.jsonl and evaluating on data/gsm8k/test.jsonl (or on the folder data/gsm8k)
    land in one task folder: a folder's name; a file's stem without its split word (gsm8k_train.jsonl ->
    gsm8k), or its folder's name when the stem is only a split word or a shard of one (data/gsm8k/test.jsonl,
    data/gsm8k/train-00000-of-00002.parquet -> gsm8k)."""
    path = Path(str(data_path).rstrip("/"))
    if not path.suffix or path.is_dir():
        return path.name or "data"
    split = "|".join(SPLIT_WORDS)
    stem = re.sub(rf"(^({split})[-_.]+|[-_.]+({split})$)", "", path.stem, flags=re.IGNORECASE)
    if stem.lower() in SPLIT_WORDS or not re.search("[A-Za-z]", re.sub("of", "", stem)):   # a split, a shard of one
        return path.resolve().parent.name or "data"
    return stem


# ----------------------------------------------------------------------------- resume = the same run

def config_differences(saved: dict, current: dict, may_change=()) -> list[str]:
    """'field: saved -> current' for every setting that changes the result and differs. A field the
    saved config lacks (an older version) or the current one leaves unset (None = resolved later from
    the same preset, e.g. the preset's teacher) is not compared; nor are RESUME_MAY_CHANGE and `may_change`."""
    out = []
    for k, v in current.items():
        if k in RESUME_MAY_CHANGE or k in may_change or k not in saved or v is None:
            continue
        if saved[k] != v:                    # json keeps floats exactly; 1 == 1.0 is no change
            out.append(f"{LAUNCH_FIELDS.get(k, '--' + k.replace('_', '-'))}: {saved[k]!r} -> {v!r}")
    return out


def check_same_run(out: Path, current: dict, may_change=()):
    """--resume continues the run in `out`: refuse when a result-changing setting differs (`may_change`:
    settings that do not change this run's result, e.g. the CPU thread count on CUDA)."""
    path = Path(out) / CONFIG
    if not path.exists():
        raise RunDirError(f"--resume: {path} is missing, so the run's settings are unknown; "
                          f"start a new run with --overwrite")
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunDirError(f"--resume: {path} is not valid json ({e})") from None
    diff = config_differences(saved, current, may_change)
    if diff:
        free = ", ".join("--" + k.replace("_", "-") for k in sorted(RESUME_MAY_CHANGE - {"resume", "out"}))
        launch, n = "", saved.get("world_size")
        if n is not None and current.get("world_size") not in (None, n):
            launch = (f" and runs on as many processes as it started with "
                      f"({venv_command('python') + ' distill.py' if n == 1 else venv_command('torchrun') + f' --nproc_per_node={n}'})")
        raise RunDirError(f"--resume would change the run in {out}: {'; '.join(diff)}. A resumed run keeps its "
                          f"saved settings (only {free} may change){launch}; drop these options, or start a new "
                          f"run with another --out")


def check_same_data(out: Path, sha: str, origin: str, n_rows: int):
    """--resume continues on the rows the run started with: refuse when their fingerprint (sha256, recorded
    in config.json as data_sha256) differs, naming where the rows come from. A config.json of an older
    version, without the fingerprint, is not compared."""
    try:
        saved = json.loads((Path(out) / CONFIG).read_text()).get("data_sha256")
    except (OSError, ValueError, AttributeError):
        return                                # check_same_run has refused an unreadable config.json
    if saved is not None and saved != sha:
        raise RunDirError(f"--resume: the training data changed since the run in {out} started: {origin} now "
                          f"gives other rows ({n_rows} rows, sha256 {sha[:12]}; the run trained on sha256 "
                          f"{saved[:12]}). Resume with the data the run started with, or start a new run with "
                          f"another --out")


def write_config(out: Path, config: dict):
    write_atomic(Path(out) / CONFIG, json.dumps(config, indent=2))


# ----------------------------------------------------------------------------- verified checkpoints

def sha256(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def write_checksums(ckpt: Path):
    """<ckpt>/checksums.json: {file name: sha256} of every file of the checkpoint."""
    ckpt = Path(ckpt)
    sums = {p.name: sha256(p) for p in sorted(ckpt.iterdir()) if p.is_file() and p.name != CHECKSUMS}
    with open(ckpt / CHECKSUMS, "w") as f:
        json.dump(sums, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def verify_checkpoint(ckpt: Path) -> str | None:
    """None when every file matches checksums.json, else what is wrong (naming the file)."""
    ckpt = Path(ckpt)
    try:
        sums = json.loads((ckpt / CHECKSUMS).read_text())
    except FileNotFoundError:
        return f"{ckpt / CHECKSUMS} is missing (the checkpoint cannot be verified)"
    except json.JSONDecodeError:
        return f"{ckpt / CHECKSUMS} is not valid json"
    for name, digest in sums.items():
        f = ckpt / name
        if not f.exists():
            return f"{f} is missing"
        if sha256(f) != digest:
            return f"{f} does not match its checksum (damaged: flipped bytes or a cut-off copy)"
    return None


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a .tmp directory is an interrupted write and not listed)."""
    return sorted(p for p in Path(out).glob("ckpt-*") if p.is_dir())


def check_loadable(ckpt: Path) -> str | None:
    """For a checkpoint without checksums.json (nothing to compare its bytes with): None when it loads and
    every weight is finite, else what is wrong, naming the file. Reads config.json, every safetensors
    tensor and trainer_state.pt (weights_only) once on the CPU."""
    import torch
    from safetensors import safe_open

    ckpt = Path(ckpt)
    try:
        json.loads((ckpt / "config.json").read_text())
    except (OSError, ValueError) as e:
        return f"{ckpt / 'config.json'} is not readable json ({type(e).__name__})"
    weights = sorted(ckpt.glob("*.safetensors"))
    if not weights:
        return f"{ckpt} has no model*.safetensors"
    for f in weights:
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    t = st.get_tensor(name)
                    if t.is_floating_point() and not torch.isfinite(t).all():
                        return f"{f} holds non-finite values (NaN or inf) in {name} (damaged: flipped bytes)"
        except Exception as e:                       # SafetensorError: a cut-off or corrupted file
            return f"{f} is not readable ({type(e).__name__}: {e})"
    try:
        torch.load(ckpt / "trainer_state.pt", weights_only=True, map_location="cpu")
    except Exception as e:                           # EOFError, a zip error, a missing file
        return f"{ckpt / 'trainer_state.pt'} is not loadable ({type(e).__name__}: {e})"
    return None


def resume_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint that is whole and whose steps all have their row in metrics.jsonl.

    Whole: its files match checksums.json; one without checksums.json (written before checksums existed,
    or lost) is loaded instead (check_loadable: readable, every weight finite) and used with a warning.
    A damaged one is reported and the previous one tried.
    Logged: a resume keeps the rows up to its checkpoint and logs the later steps again, so the log has one
    row per step only if rows 1..<checkpoint step> are all there. A log damaged in the middle (a gap, a bad
    line: scan_log) keeps the rows before the damage; a checkpoint beyond them is passed over for one they
    reach, saying which steps are logged again, and when none is left the resume is refused."""
    log = Path(out) / LOG
    scan = scan_log(log)
    logged = len(scan.rows)
    # rows are flushed, not fsynced: a power loss may also lose the last rows of a checkpointed step
    damage = scan.problem or (f"its rows end at step {logged}" if log.exists() else "it is missing")
    passed_over = []
    for ckpt in reversed(checkpoints(out)):
        if checkpoint_step(ckpt) > logged:
            passed_over.append(ckpt)
            continue
        if not (ckpt / CHECKSUMS).exists():
            problem = check_loadable(ckpt)
            if problem is None:
                say(f"checkpoint {ckpt} has no {CHECKSUMS} (an older version wrote it, or it was lost): it loads "
                    f"and its weights are finite; resuming without verifying its bytes")
                return _after_passing_over(ckpt, passed_over, damage, logged, log)
            say(f"checkpoint {ckpt} has no {CHECKSUMS} and is damaged: {problem}; trying the previous one")
            continue
        problem = verify_checkpoint(ckpt)
        if problem is None:
            return _after_passing_over(ckpt, passed_over, damage, logged, log)
        say(f"checkpoint {ckpt} is damaged: {problem}; trying the previous one")
    if passed_over:
        raise RunDirError(f"--resume: {log} is damaged ({damage}): it has the rows of steps 1-{logged} only, and no whole checkpoint of step {logged} or earlier is left, so the "
                          f"resumed log would miss steps {logged + 1}-{checkpoint_step(passed_over[0])}. "
                          f"Restore {LOG} from a copy, or start again with --overwrite")
    if checkpoints(out):
        raise RunDirError(f"--resume: no checkpoint in {out} passes its checksums (see above); "
                          f"start again with --overwrite")
    return None


def _after_passing_over(ckpt: Path, passed_over: list[Path], damage: str, logged: int, log: Path) -> Path:
    if passed_over:
        step = checkpoint_step(ckpt)
        say(f"{log} is damaged ({damage}); its rows after step {logged} are dropped, so resuming from {ckpt} (step {step}) instead of {passed_over[0].name}: steps "
            f"{step + 1}-{checkpoint_step(passed_over[0])} are trained and logged again")
    return ckpt


def checkpoint_step(ckpt: Path) -> int:
    return int(Path(ckpt).name.split("-")[-1])


def set_aside(ckpt: Path) -> Path | None:
    """Move an existing (necessarily damaged or stale) ckpt-<step> out of the way of a new one."""
    ckpt = Path(ckpt)
    if not ckpt.exists():
        return None
    aside = ckpt.with_name(f"damaged-{ckpt.name}")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(ckpt, aside)
    say(f"moved the earlier {ckpt} (damaged, or passed over by --resume) to {aside}")
    return aside


def prune_checkpoints(out: Path, keep: int = KEEP_CHECKPOINTS):
    """Keep the newest `keep` checkpoints, so that a damaged newest one has a verified predecessor."""
    for old in checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def disk_full(exc: BaseException, path: Path) -> OSError | None:
    """An OSError saying plainly that the disk is full, when `exc` (raised while writing `path`) means that:
    ENOSPC, or torch.save's 'unexpected pos A vs B' (its zip writer wrote fewer bytes than it asked for)."""
    full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "unexpected pos" in str(exc)
    if not full:
        return None
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free / 2**20
    return OSError(errno.ENOSPC, f"the disk is full while writing {path} ({free:.0f} MiB free; "
                                 f"{type(exc).__name__}: {exc}). Free some space, then continue with --resume "
                                 f"(the previous checkpoint is intact)")


UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def write_failure(exc: BaseException, out: Path, argv: list[str]) -> str | None:
    """The one line for a run whose directory cannot be written any more (permissions taken away, a
    file system remounted read-only, a full disk), or None for any other error. The checkpoints written
    before are whole (each is written aside and renamed), so the line ends with the command that resumes."""
    if not isinstance(exc, OSError) or exc.errno not in (*UNWRITABLE, errno.ENOSPC, errno.EDQUOT):
        return None
    done = checkpoints(out)
    if exc.errno in UNWRITABLE:
        what = f"the run directory {out} is no longer writable ({exc.strerror}: {exc.filename or out})"
    else:
        what = f"the disk holding {out} is full ({exc.strerror or exc})"
    if not done:
        return f"{what}; no checkpoint was written yet. Fix it, then start again with: " + \
            resume_command(argv, out).removesuffix(" --resume") + " --overwrite"
    return (f"{what}; the checkpoints written so far are intact (last {done[-1]}). Fix it, then continue "
            f"with: {resume_command(argv, out)}")


# ----------------------------------------------------------------------------- Ctrl-C, SIGTERM

def resume_command(argv: list[str], out) -> str:
    """The command line that continues this run: the same options, --resume, an explicit --out."""
    args, skip = [], False
    for a in map(str, argv):
        if skip:
            skip = False
        elif a in ("--resume", "--no-resume", "--overwrite", "--no-overwrite"):
            continue
        elif a == "--out":
            skip = True
        elif not a.startswith("--out="):
            args.append(a)
    world = int(os.environ.get("WORLD_SIZE", "1"))        # the sharding is part of the run: same launcher
    launcher = [venv_command("torchrun"), f"--nproc_per_node={world}"] if world > 1 else [venv_command("python")]
    script = Path(__file__).resolve().parents[1] / "distill.py"      # plumbing/ -> the root
    return shlex.join([*launcher, shown_path(script), *args, "--out", str(out), "--resume"])


def shown_path(path: Path) -> str:
    """`path` relative to the working directory when it lies inside it (.venv/bin/python), else absolute."""
    path = Path(os.path.abspath(path))
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def venv_command(name: str) -> str:
    """The program `name` (python, torchrun) as a fresh shell can run it: the one beside this interpreter
    (.venv/bin/python after `make setup`; a new shell has no torch on its PATH's python), not a bare name.
    sys.executable is the venv's own path (not resolved through its symlink), so the venv stays named."""
    exe = Path(sys.executable)
    return shown_path(exe if name == "python" else exe.with_name(name))


def interrupted_message(out: Path, argv: list[str], how: str = "interrupted") -> str:
    """The one line printed on Ctrl-C (how="interrupted") or SIGTERM ("terminated (SIGTERM)"): step reached,
    last checkpoint, and the command that resumes."""
    try:
        step = last_logged_step(out)
    except RunDirError:
        step = "?"
    done = checkpoints(out)
    if not done:
        again = resume_command(argv, out).removesuffix(" --resume")
        return (f"{how} at step {step}; no checkpoint written yet in {out}, start again with: "
                f"{again}{' --overwrite' if run_files(out) else ''}")
    return (f"{how} at step {step}; last checkpoint {done[-1]} (step {checkpoint_step(done[-1])}); "
            f"resume with: {resume_command(argv, out)}")
