"""Crash safety: SIGKILL a training process at random instants, many times, often in the middle
of a checkpoint write. After every kill the newest checkpoint loads and resuming works."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from randygpt.checkpoint import load_checkpoint
from randygpt.data import builtin_sample_text

KILLS = 30
TINY = ["--preset", "tiny", "--layers", "1", "--dim", "16", "--heads", "2", "--block", "16",
        "--batch", "4", "--eval-iters", "1", "--no-progress", "--sample-tokens", "0"]
FOREVER = "1000000"


def _start(args, log_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-m", "randygpt", *args], env=env, stdout=log,
                            stderr=subprocess.STDOUT), log


def _wait_for(predicate, p, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert p.poll() is None, f"the process exited ({p.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


@pytest.mark.slow
def test_sigkill_at_random_instants_never_breaks_the_checkpoint(tmp_path):
    data = tmp_path / "d.txt"
    data.write_text(builtin_sample_text())
    out = tmp_path / "run"
    latest = out / "checkpoint.safetensors"
    rng = random.Random(20240611)
    log_path = tmp_path / "log.txt"
    kills = kills_mid_write = kills_before_training = 0
    last_iter = 0
    # every iteration evaluates and writes one or two checkpoints, so writes take a large share
    # of the time and random kills land inside them
    first = ["train", "--data", str(data), *TINY, "--eval-interval", "1", "--iters", FOREVER,
             "--out", str(out)]
    resume = ["train", "--resume", "--out", str(out), "--iters", FOREVER, "--no-progress",
              "--sample-tokens", "0"]
    while kills < KILLS:
        p, log = _start(first if kills == 0 else resume, log_path)
        if kills == 0:
            _wait_for(latest.exists, p, "the first checkpoint")
        elif rng.random() < 0.15:   # sometimes kill it while it is still starting up
            _wait_for(lambda: log_path.stat().st_size > 0, p, "any output")
            kills_before_training += 1
        else:
            _wait_for(lambda: "model:" in log_path.read_text(), p, "training to start")
        time.sleep(rng.uniform(0.0, 0.12))
        p.send_signal(signal.SIGKILL)
        assert p.wait(timeout=30) == -signal.SIGKILL
        log.close()
        kills += 1
        leftovers = [n for n in os.listdir(out) if ".tmp-" in n]
        kills_mid_write += bool(leftovers)
        assert len(leftovers) <= 1, leftovers       # older ones were cleaned up on start

        c = load_checkpoint(latest)                # the newest checkpoint always loads whole
        assert c.iter >= last_iter, "a checkpoint went backwards"
        last_iter = c.iter
        best = load_checkpoint(out / "checkpoint_best.safetensors")
        assert best.iter <= c.iter and best.meta.best_val_loss == best.meta.val_loss

    # finally let a resume run to completion: three more iterations, then a clean exit
    p, log = _start(["train", "--resume", "--out", str(out), "--iters", str(last_iter + 3),
                     "--no-progress", "--sample-tokens", "0"], log_path)
    assert p.wait(timeout=60) == 0, log_path.read_text()
    log.close()
    assert load_checkpoint(latest).iter == last_iter + 3
    assert not [n for n in os.listdir(out) if ".tmp-" in n]
    iters = [json.loads(line)["iter"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert iters == list(range(1, last_iter + 4))   # no gaps, no duplicates, no torn lines
    # where the random kills land depends on the machine's load; the deterministic test below
    # kills inside a write every time, so this count is reported, not asserted
    print(f"\n{kills} SIGKILLs ({kills_before_training} during start-up, {kills_mid_write} left "
          f"a half-written temp file); reached iteration {last_iter}")


# Runs `randygpt train` in a child that SIGKILLs itself at a chosen point inside the N-th
# checkpoint write: halfway through writing the temp file, at its fsync, or after the rename
# but before the directory fsync. Deterministic, so every case is covered on every run.
KILL_INSIDE_WRITE = r"""
import os, signal, sys
import randygpt.checkpoint as ck
where, nth = sys.argv[1], int(sys.argv[2])
writes = {"n": 0}
real_fdopen, real_replace, real_fsync = os.fdopen, os.replace, os.fsync

class HalfThenDie:
    def __init__(self, f): self.f = f
    def __enter__(self): return self
    def __exit__(self, *a): return self.f.__exit__(*a)
    def write(self, data):
        self.f.write(data[: len(data) // 2]); self.f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    def __getattr__(self, name): return getattr(self.f, name)

def fdopen(fd, *a, **k):
    writes["n"] += 1
    f = real_fdopen(fd, *a, **k)
    return HalfThenDie(f) if where == "half" and writes["n"] == nth else f

def fsync(fd):
    if where == "fsync" and writes["n"] == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    real_fsync(fd)

def replace(a, b):
    real_replace(a, b)
    if where == "renamed" and writes["n"] == nth:
        os.kill(os.getpid(), signal.SIGKILL)

ck.os.fdopen, ck.os.fsync, ck.os.replace = fdopen, fsync, replace
from randygpt.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("where", ["half", "fsync", "renamed"])
def test_sigkill_inside_a_checkpoint_write_keeps_the_previous_one(tmp_path, where):
    data = tmp_path / "d.txt"
    data.write_text(builtin_sample_text())
    out = tmp_path / "run"
    args = ["train", "--data", str(data), *TINY, "--eval-interval", "2", "--iters", "8",
            "--out", str(out)]
    env = dict(os.environ, RANDYGPT_NO_PLOT="1",       # loss.png would be a write too
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # writes 1 and 2 are iteration 2 (latest, best); write 3 is iteration 4's latest
    p = subprocess.run([sys.executable, "-c", KILL_INSIDE_WRITE, where, "3", *args], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr
    c = load_checkpoint(out / "checkpoint.safetensors")
    assert c.iter == (4 if where == "renamed" else 2)   # the old file, or all of the new one
    if where != "renamed":
        assert [n for n in os.listdir(out) if ".tmp-" in n], "the kill left no temp file"
    r = subprocess.run([sys.executable, "-m", "randygpt", "train", "--resume", "--out", str(out),
                        "--iters", "8", "--no-progress", "--sample-tokens", "0"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(out / "checkpoint.safetensors").iter == 8
    assert not [n for n in os.listdir(out) if ".tmp-" in n]
