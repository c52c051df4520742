"""Data-parallel training: micro-batches, dropout by global row, and real `mpiexec -n 2` runs
(bit-exact against --grad-accum 2, signals, a dead or hung rank, drifted weights, resume)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from randygpt import threads
from randygpt.config import ModelConfig
from randygpt.model import GPT
from randygpt.ops import reference
from randygpt.optim import AdamW
from randygpt.step import train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "randygpt", "sample_text.txt")
# documents (padding: rows of unequal target counts) and dropout: every part of the rule
RUN = ["--data", SAMPLE, "--preset", "tiny", "--dim", "32", "--heads", "2", "--block", "32",
       "--batch", "3", "--eval-iters", "2", "--warmup", "5", "--dropout", "0.2",
       "--doc-separator", "\\n\\n", "--sample-tokens", "0", "--no-progress", "--seed", "5"]
ONE_THREAD = {name: "1" for name in threads.THREAD_COUNTS}


# --------------------------------------------------------------------------------------------
# in one process

def test_dropout_mask_of_a_row_is_its_global_rows_in_reference_and_fused():
    from randygpt.ops.fused import elementwise as fused
    rng = np.random.default_rng(0)
    x, f = (rng.standard_normal((6, 5, 8)).astype(np.float32) for _ in range(2))
    whole, _ = reference.residual_dropout_forward(x, f, 0.3, np.random.default_rng(4))
    dout = rng.standard_normal((2, 5, 8)).astype(np.float32)
    for row0 in (0, 2, 4):
        part = slice(row0, row0 + 2)
        ref, mask = reference.residual_dropout_forward(x[part], f[part], 0.3,
                                                       np.random.default_rng(4), row0)
        # dropout alone (x = 0) is exact: the kernel hashes the same indices
        fast, key = fused.residual_dropout_forward(np.zeros_like(f[part]), f[part], 0.3,
                                                   np.random.default_rng(4), row0)
        np.testing.assert_array_equal(ref, whole[part])     # rows of the whole batch's mask
        np.testing.assert_array_equal(fast, f[part] * mask)
        np.testing.assert_array_equal(fused.residual_dropout_backward(dout, key)[1],
                                      reference.residual_dropout_backward(dout, mask)[1])
    # and the mask really depends on the row: another offset, another mask
    other, _ = reference.residual_dropout_forward(x[:2], f[:2], 0.3, np.random.default_rng(4), 1)
    assert not np.array_equal(other, whole[:2])


def _step(model, x, y, micro_batches, **kw):
    opt = AdamW(model.params.flat, model.decay_mask(), 0.9, 0.99, weight_decay=0.01)
    seen = []
    r = train_step(model, opt, x, y, 1e-2, grad_clip=0.0, dropout_rng=np.random.default_rng(9),
                   micro_batches=micro_batches, grad_hook=lambda g: seen.append(g.copy()), **kw)
    return r, seen[0]


def test_grad_accumulation_is_the_gradient_of_the_whole_batch():
    # float64 so that only the order of the sums differs: the mean over all targets, weighted
    # by each micro-batch's share (the last rows are padding, as after a short document)
    cfg = ModelConfig(vocab_size=11, block_size=8, n_layer=1, n_embd=16, n_head=2, dropout=0.2)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 11, (6, 8))
    y = rng.integers(0, 11, (6, 8))
    y[4:, 3:] = -1
    whole, g_whole = _step(GPT(cfg, seed=0, dtype=np.float64), x, y, 1)
    accum, g_accum = _step(GPT(cfg, seed=0, dtype=np.float64), x, y, 3)
    np.testing.assert_allclose(g_accum, g_whole, rtol=1e-10, atol=1e-13)
    assert abs(accum.loss - whole.loss) < 1e-12
    # a rank's share: rows 2..3 of the batch, weighted by the whole batch's targets
    part, g_part = _step(GPT(cfg, seed=0, dtype=np.float64), x[2:4], y[2:4], 1, row0=2,
                         n_targets=int((y >= 0).sum()))
    first, g_first = _step(GPT(cfg, seed=0, dtype=np.float64), x[:2], y[:2], 1, row0=0,
                           n_targets=int((y >= 0).sum()))
    last, g_last = _step(GPT(cfg, seed=0, dtype=np.float64), x[4:], y[4:], 1, row0=4,
                         n_targets=int((y >= 0).sum()))
    np.testing.assert_allclose(g_first + g_part + g_last, g_whole, rtol=1e-10, atol=1e-13)
    assert abs(first.loss + part.loss + last.loss - whole.loss) < 1e-12
    with pytest.raises(ValueError, match="do not split"):
        _step(GPT(cfg, seed=0, dtype=np.float64), x, y, 4)


def test_ranks_on_one_machine_split_its_cores():
    cores = len(os.sched_getaffinity(0))
    env = {"PMI_SIZE": "2", "MPI_LOCALNRANKS": "2"}
    threads.apply(env)
    assert env["OPENBLAS_NUM_THREADS"] == env["NUMBA_NUM_THREADS"] == str(max(1, cores // 2))
    mine = {"PMI_SIZE": "2", "MPI_LOCALNRANKS": "2", "NUMBA_NUM_THREADS": "7"}
    threads.apply(mine)
    assert mine["NUMBA_NUM_THREADS"] == "7"                   # the user's setting wins
    alone = {}
    threads.apply(alone)
    assert "NUMBA_NUM_THREADS" not in alone and "OMP_WAIT_POLICY" in alone


def test_one_process_world_needs_no_mpi():
    from randygpt.distributed import World, open_world
    w = open_world(mpi=False)
    assert type(w) is World and w.size == 1 and w.is_root
    assert w.exchange(1.5, None) == (1.5, None)


LAST_WORDS = """
import sys
from randygpt.distributed import _let_the_launcher_read_the_output
sys.stderr.write("the last line\\n")
_let_the_launcher_read_the_output()
open(sys.argv[1], "w").close()       # what MPI_Abort would do next
"""


def test_last_words_wait_until_the_launcher_has_read_them(tmp_path):
    # under mpiexec a rank's stderr is a pipe to the launcher, which drops what it has not
    # read when the abort reaches it: the line must be read before the rank goes on to abort
    done = tmp_path / "aborted"
    p = subprocess.Popen([sys.executable, "-c", LAST_WORDS, str(done)], cwd=ROOT, env=_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        import fcntl
        import struct
        import termios
        while p.poll() is None and not struct.unpack(
                "i", fcntl.ioctl(p.stderr.fileno(), termios.FIONREAD, b"\0" * 4))[0]:
            time.sleep(0.01)                            # until the line is in the pipe
        time.sleep(0.5)                                 # a launcher too busy to read it
        assert not done.exists() and p.poll() is None   # the rank waits for it
        assert p.stderr.readline() == b"the last line\n"
        assert p.wait(timeout=60) == 0 and done.exists()  # and, once it is read, goes on
    finally:
        p.kill()
        p.wait()


# --------------------------------------------------------------------------------------------
# mpiexec -n 2

def _mpiexec():
    pytest.importorskip("mpi4py")
    path = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep
                        + os.environ.get("PATH", ""))
    if path is None:
        pytest.skip("no mpiexec (pip install -e '.[mpi]')")
    return path


def _env(**extra):
    return dict(os.environ, PYTHONPATH=ROOT, PYTHONHASHSEED="0", **extra)


def _train(args, n=None, timeout=240, **env):
    cmd = ([_mpiexec(), "-n", str(n)] if n else []) + [sys.executable, "-m", "randygpt",
                                                       "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(**env),
                          timeout=timeout)


def _start(args, n=2, log=None):
    return subprocess.Popen([_mpiexec(), "-n", str(n), sys.executable, "-m", "randygpt",
                             "train", *args], cwd=ROOT, env=_env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _ranks(p, n=2, timeout=60) -> dict:
    """{rank: pid} of the processes mpiexec `p` started (found in its own process tree)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {}
        for pid in _descendants(p.pid):
            try:
                env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
                cmd = open(f"/proc/{pid}/cmdline", "rb").read()
            except OSError:
                continue
            rank = [e for e in env if e.startswith(b"PMI_RANK=")]
            if rank and b"randygpt" in cmd:
                found[int(rank[0][9:])] = pid
        if len(found) == n:
            return found
        time.sleep(0.05)
    raise AssertionError("the ranks did not start")


def _end(p):
    """Kill what is left of mpiexec `p` and its ranks (a test that failed, a stopped rank)."""
    for pid in [*_descendants(p.pid), p.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.wait(timeout=30)


def _descendants(pid):
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _wait_for_handler(pid, signum, timeout=120):
    """Until process `pid` catches `signum` (the training loop installs its handlers)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = open(f"/proc/{pid}/status").read()
        caught = int(status.split("SigCgt:")[1].split()[0], 16)
        if caught >> (signum - 1) & 1:
            return
        time.sleep(0.01)
    raise AssertionError("the training loop did not start")


def _wait_for_metrics(p, out, rows=1, timeout=120):
    path = os.path.join(out, "metrics.jsonl")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and p.poll() is None:
        if os.path.exists(path) and len(open(path).read().splitlines()) >= rows:
            return
        time.sleep(0.02)
    raise AssertionError("no evaluation was written")


def _tensors(path):
    from safetensors.numpy import load_file
    return load_file(path)


def _assert_same_tensors(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].tobytes() == tb[k].tobytes(), k


def _rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def _same_metrics(a, b):
    drop = ("tokens_per_sec", "elapsed_s")
    return [{k: v for k, v in r.items() if k not in drop} for r in _rows(a)] == \
        [{k: v for k, v in r.items() if k not in drop} for r in _rows(b)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """An uninterrupted 2-rank run of 16 iterations."""
    out = str(tmp_path_factory.mktemp("mpi") / "two")
    r = _train([*RUN, "--iters", "16", "--eval-interval", "8", "--out", out], n=2)
    assert r.returncode == 0, r.stdout + r.stderr
    return out, r


def test_two_ranks_equal_one_process_with_grad_accum_two_bit_for_bit(two_ranks, tmp_path):
    out, r = two_ranks
    assert r.stdout.count("done: 16 iterations") == 1        # rank 0 alone reports
    assert r.stderr == ""                                     # and the other rank says nothing
    one = str(tmp_path / "one")
    s = _train([*RUN, "--iters", "16", "--eval-interval", "8", "--grad-accum", "2",
                "--out", one], **ONE_THREAD)
    assert s.returncode == 0, s.stderr
    assert _same_metrics(out, one)
    _assert_same_tensors(os.path.join(out, "checkpoint.safetensors"),
                         os.path.join(one, "checkpoint.safetensors"))
    # and the step really is bigger than one process's plain batch: not the same run
    plain = str(tmp_path / "plain")
    assert _train([*RUN, "--iters", "8", "--eval-interval", "8", "--out", plain],
                  **ONE_THREAD).returncode == 0
    assert _rows(plain)[0]["val_loss"] != _rows(one)[0]["val_loss"]


def test_sigterm_to_one_rank_stops_all_after_the_step_and_resumes_exactly(two_ranks, tmp_path):
    out = str(tmp_path / "run")
    with open(tmp_path / "log", "w") as log:
        p = _start([*RUN, "--iters", "16", "--eval-interval", "8", "--out", out], log=log)
        try:
            rank1 = _ranks(p)[1]
            _wait_for_handler(rank1, signal.SIGTERM)         # the loop has begun
            os.kill(rank1, signal.SIGTERM)
            assert p.wait(timeout=120) == 128 + signal.SIGTERM
        finally:
            _end(p)
    text = (tmp_path / "log").read_text()
    assert "stopped by SIGTERM at iteration" in text and "Traceback" not in text, text
    meta = json.loads(subprocess.run(
        [sys.executable, "-m", "randygpt", "info", "--json", out], capture_output=True,
        text=True, cwd=ROOT, env=_env(), timeout=60).stdout)
    stopped = meta["iter"]
    assert 0 < stopped < 16
    # the same number of ranks: the rest of the run is the uninterrupted one's, bit for bit
    again = str(tmp_path / "again")
    shutil.copytree(out, again)
    r = _train(["--resume", "--out", again, "--no-progress", "--sample-tokens", "0"], n=2)
    assert r.returncode == 0, r.stderr
    _assert_same_tensors(os.path.join(again, "checkpoint.safetensors"),
                         os.path.join(two_ranks[0], "checkpoint.safetensors"))
    # one process: told that the batch changes; with --grad-accum 2 it is the same batch
    r = _train(["--resume", "--out", out, "--no-progress", "--sample-tokens", "0",
                "--grad-accum", "2"], **ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert "trained on 2 rank(s), this run has 1" in r.stdout
    _assert_same_tensors(os.path.join(out, "checkpoint.safetensors"),
                         os.path.join(two_ranks[0], "checkpoint.safetensors"))


def test_ctrl_c_to_mpiexec_checkpoints_and_exits_130(tmp_path):
    out = str(tmp_path / "run")
    p = _start([*RUN, "--iters", "2000", "--eval-interval", "5", "--out", out],
               log=subprocess.DEVNULL)
    try:
        _wait_for_metrics(p, out)
        p.send_signal(signal.SIGINT)                 # mpiexec passes it to every rank
        assert p.wait(timeout=120) == 128 + signal.SIGINT
    finally:
        _end(p)
    from randygpt.checkpoint import load_checkpoint
    ckpt = load_checkpoint(os.path.join(out, "checkpoint.safetensors"))
    assert ckpt.meta.ranks == 2 and 5 <= ckpt.iter < 2000


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_dead_or_hung_rank_ends_the_job_and_the_checkpoint_loads(tmp_path, fault):
    out = str(tmp_path / "run")
    with open(tmp_path / "log", "w") as log:
        p = _start([*RUN, "--iters", "2000", "--eval-interval", "5", "--comm-timeout", "3",
                    "--out", out], log=log)
        try:
            _wait_for_metrics(p, out)
            rank1 = _ranks(p)[1]
            os.kill(rank1, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
            rc = p.wait(timeout=60)                  # nobody waits forever
        finally:
            _end(p)
    assert rc != 0
    text = (tmp_path / "log").read_text()
    if fault == "hung":
        lines = [line for line in text.splitlines() if "no answer from the other ranks" in line]
        assert len(lines) == 1 and "rank 0" in lines[0], text
    from randygpt.checkpoint import load_checkpoint
    assert load_checkpoint(os.path.join(out, "checkpoint.safetensors")).iter >= 5


def test_an_error_every_rank_has_is_said_once(tmp_path):
    r = _train(["--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")], n=2,
               timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0] and "--data" in lines[0], r.stderr


DRIFT = """
import sys
import numpy as np
from randygpt.distributed import open_world
from randygpt.errors import UserError
world = open_world(timeout=30)
w = np.arange(10, dtype=np.float32)
world.check_same_weights(w, 1)                    # alike: passes
if world.rank == 1:
    w[3] = np.nextafter(w[3], np.float32(9))      # one ulp on one rank
try:
    world.check_same_weights(w, 2)
except UserError as e:
    print(f"rank {world.rank} {e.quiet}: {e}", flush=True)
# the reduction: rank order, one value per element, the same on every rank
g = np.full(7, world.rank + 1, dtype=np.float32)
world.reduce_gradients(g)
loss, sig = world.exchange(0.25 * (world.rank + 1), 15 if world.rank == 1 else None)
print(f"rank {world.rank} sum {g.tolist()} loss {loss} signal {sig}", flush=True)
"""


def test_weight_checksum_catches_one_ulp_of_drift_and_reduction_sums(tmp_path):
    r = subprocess.run([_mpiexec(), "-n", "2", sys.executable, "-c", DRIFT], capture_output=True,
                       text=True, cwd=ROOT, env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    # two processes share mpiexec's pipe: a line of one may land inside or right after a
    # line of the other (CI once saw rank 1's line and rank 0's with no newline between), so
    # the checks look for the texts, not for whole lines
    assert "rank 0 False: at iteration 2 the weights of rank(s) 1 differ" in r.stdout, r.stdout
    assert "rank 1 True: " in r.stdout                                    # said once, by rank 0
    for rank in (0, 1):
        assert f"rank {rank} sum {[3.0] * 7} loss 0.75 signal 15" in r.stdout


def test_rank_zero_decides_plateaus_early_stop_and_the_time_budget_for_every_rank(tmp_path):
    # rank 0 alone evaluates: its plateau reductions and early stop must reach the other rank
    # (World.share), or the ranks would step with different LRs and the checksum would fail
    stall = ["--lr", "0.05", "--eval-interval", "2", "--lr-on-plateau", "1", "--early-stop",
             "3", "--iters", "200"]
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    r = _train([*RUN, *stall, "--out", two], n=2)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("early stop") == 1 and "done: 200 iterations" not in r.stdout
    s = _train([*RUN, *stall, "--grad-accum", "2", "--out", one], **ONE_THREAD)
    assert s.returncode == 0, s.stderr
    assert _same_metrics(two, one)
    _assert_same_tensors(os.path.join(two, "checkpoint.safetensors"),
                         os.path.join(one, "checkpoint.safetensors"))
    # a time budget: rank 0's clock ends both ranks together, inside the budget
    budget = str(tmp_path / "budget")
    r = _train([*RUN, "--time-budget", "8s", "--eval-interval", "10", "--out", budget], n=2)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("done: ") == 1
    last = _rows(budget)[-1]
    assert "val_loss_exact" in last and last["elapsed_s"] < 8.0
