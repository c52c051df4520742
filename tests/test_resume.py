"""Resume is exact: N+M straight == N, stop (also by SIGINT / SIGTERM), resume to N+M, bit for bit.
And the rules around it: the checkpoint's config wins, runs are never overwritten, fine-tuning
starts fresh from a checkpoint's weights, divergence keeps the last good checkpoint."""
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
from safetensors.numpy import load as st_load

from randygpt.checkpoint import load_checkpoint, save_checkpoint
from randygpt.cli import main
from randygpt.config import ModelConfig, TrainConfig
from randygpt.data import builtin_sample_text
from randygpt.errors import UserError
from randygpt.model import GPT
from randygpt.runs import plan_run
from randygpt.train import train

TEXT = builtin_sample_text()
TINY = ["--preset", "tiny", "--layers", "1", "--dim", "16", "--heads", "2", "--block", "16",
        "--batch", "4", "--eval-iters", "2", "--no-progress", "--sample-tokens", "0"]
QUIET = dict(sample_tokens=0, log=lambda *_: None)


def tiny():
    m = ModelConfig(block_size=16, n_layer=2, n_embd=16, n_head=2, dropout=0.1)
    t = TrainConfig(iters=30, batch_size=4, lr=3e-3, warmup=4, decay_frac=0.5, eval_interval=6,
                    eval_iters=2, seed=9)
    return m, t


def tensors(run_dir, name="checkpoint.safetensors"):
    with open(os.path.join(run_dir, name), "rb") as f:
        return st_load(f.read())


def assert_same_tensors(a, b):
    assert sorted(a) == sorted(b)
    for k in a:                                    # weights and both AdamW moments, bit for bit
        assert a[k].tobytes() == b[k].tobytes(), k


def logged(run_dir):
    rows = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [(r["iter"], r["train_loss"], r["val_loss"], r["lr"]) for r in rows]


def snapshot(d):
    return {n: (open(os.path.join(d, n), "rb").read(), os.stat(os.path.join(d, n)).st_mtime_ns)
            for n in sorted(os.listdir(d))}


# ---------------------------------------------------------------------------------------------
# exactness

def test_stopping_twice_and_resuming_is_bit_identical_to_a_straight_run(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    straight = train(plan_run(*tiny(), text=TEXT, out_dir=a), **QUIET)

    first = train(plan_run(*tiny(), text=TEXT, out_dir=b), stop_after=10, **QUIET)    # 10: between evaluations
    assert first.iters_done == 10 and first.signal is None and first.sample == ""
    c = load_checkpoint(b)
    assert c.iter == 10 and c.optimizer_state["step"] == 10
    second = train(plan_run(resume=c, text=TEXT, out_dir=b), stop_after=23, **QUIET)
    assert second.iters_done == 23
    c = load_checkpoint(b)
    assert c.iter == 23
    # a killed run may have logged past its checkpoint, even half a line: resume drops that
    with open(os.path.join(b, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(dict(iter=24, train_loss=9.0, val_loss=9.0, lr=1.0)) + '\n{"iter": 3')
    last = train(plan_run(resume=c, text=TEXT, out_dir=b), **QUIET)

    assert last.iters_done == straight.iters_done == 30
    np.testing.assert_array_equal(last.model.params.flat, straight.model.params.flat)
    assert_same_tensors(tensors(a), tensors(b))
    assert_same_tensors(tensors(a, "checkpoint_best.safetensors"),
                        tensors(b, "checkpoint_best.safetensors"))
    assert logged(a) == logged(b) and [r[0] for r in logged(a)] == [6, 12, 18, 24, 30]
    assert [h["val_loss"] for h in first.history + second.history + last.history] == \
        [h["val_loss"] for h in straight.history]
    # and it really trained: losses moved, and the LR went through warmup, plateau and decay
    lrs = [r[3] for r in logged(a)]
    assert logged(a)[-1][2] < logged(a)[0][2] and lrs[1] == 3e-3 and lrs[-1] < lrs[2]


def test_resume_extends_a_finished_run_to_a_larger_iters(tmp_path, capsys):
    data = tmp_path / "d.txt"
    data.write_text(TEXT)
    common = ["train", "--data", str(data), *TINY, "--eval-interval", "4", "--decay-frac", "0",
              "--warmup", "2"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert main([*common, "--iters", "20", "--out", a]) == 0
    assert main([*common, "--iters", "12", "--out", b]) == 0
    assert load_checkpoint(b).iter == 12
    # no --data: the checkpoint remembers it; no model flags: the checkpoint's config is used
    assert main(["train", "--resume", "--out", b, "--iters", "20", "--no-progress",
                 "--sample-tokens", "0"]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert_same_tensors(tensors(a), tensors(b))
    assert logged(a) == logged(b)


def _cli(args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return [sys.executable, "-m", "randygpt", *args], env


@pytest.fixture(scope="module")
def straight_cli_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("straight")
    (d / "d.txt").write_text(TEXT)
    args = ["train", "--data", str(d / "d.txt"), "--iters", "3000", "--eval-interval", "100",
            *TINY]
    cmd, env = _cli([*args, "--out", str(d / "run")])
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return args, str(d / "run")


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_writes_a_checkpoint_exits_and_resume_is_exact(straight_cli_run, tmp_path, sig,
                                                             code):
    args, straight = straight_cli_run
    out = str(tmp_path / "run")
    cmd, env = _cli([*args, "--out", out])
    log = open(tmp_path / "log.txt", "w+")
    p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.monotonic() + 120
    while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):   # training has begun
        assert p.poll() is None and time.monotonic() < deadline, "training never started"
        time.sleep(0.005)
    p.send_signal(sig)
    assert p.wait(timeout=120) == code
    log.seek(0)
    text = log.read()
    c = load_checkpoint(out)
    assert 100 <= c.iter < 3000, text                      # stopped mid-run, not at the end
    assert (f"stopped by {signal.Signals(sig).name} at iteration {c.iter}/3000: checkpoint "
            f"written to {os.path.join(out, 'checkpoint.safetensors')}") in text
    assert "Traceback" not in text and "--- sample ---" not in text

    cmd, env = _cli(["train", "--resume", "--out", out, "--iters", "3000", "--no-progress",
                     "--sample-tokens", "0"])
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"resuming from {os.path.join(out, 'checkpoint.safetensors')} at iteration " \
           f"{c.iter} of 3000" in r.stdout
    assert_same_tensors(tensors(straight), tensors(out))
    assert logged(straight) == logged(out)


# ---------------------------------------------------------------------------------------------
# the rules of resuming

@pytest.fixture
def run12(tmp_path):
    """A CLI run of 12 iterations (eval every 4, lr 0.003) and its data file."""
    data = tmp_path / "d.txt"
    data.write_text(TEXT)
    out = str(tmp_path / "run")
    assert main(["train", "--data", str(data), *TINY, "--iters", "12", "--eval-interval", "4",
                 "--lr", "0.003", "--out", out]) == 0
    return data, out


def _one_line_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("flags,fragments", [
    (["--dim", "32"], ["--dim 32 (the checkpoint has n_embd 16)"]),
    (["--lr", "0.001", "--layers", "3"], ["--lr 0.001 (the checkpoint has lr 0.003)",
                                          "--layers 3 (the checkpoint has n_layer 1)"]),
    (["--preset", "small"], ["--preset small (the checkpoint has n_layer 1, n_embd 16"]),
    (["--dropout", "0.2"], ["--dropout 0.2 (the checkpoint has dropout 0.1)"]),
    (["--seed", "1"], ["--seed 1 (the checkpoint has seed 1337)"]),
])
def test_flags_that_contradict_the_checkpoint_are_an_error(run12, capsys, flags, fragments):
    data, out = run12
    before = snapshot(out)
    # --lr 0.001 is the parser's default: typed explicitly it still counts
    assert main(["train", "--resume", "--out", out, "--iters", "20", *flags]) == 2
    line = _one_line_error(capsys)
    for f in fragments + ["contradicts the checkpoint", "drop the flag"]:
        assert f in line, line
    assert snapshot(out) == before


def test_flags_that_agree_with_the_checkpoint_are_fine(run12, capsys):
    data, out = run12
    assert main(["train", "--resume", "--out", out, "--iters", "16", "--dim", "16",
                 "--layers", "1", "--batch", "4", "--lr", "0.003", "--no-progress",
                 "--sample-tokens", "0"]) == 0
    assert load_checkpoint(out).iter == 16


def test_resume_refusals_leave_the_run_untouched(run12, tmp_path, capsys):
    data, out = run12
    ckpt = os.path.join(out, "checkpoint.safetensors")
    before = snapshot(out)
    other = tmp_path / "other.txt"
    other.write_text(TEXT.replace("the", "a"))
    cases = [
        (["train", "--data", str(data), *TINY, "--iters", "12", "--out", out],
         "already holds a checkpoint"),                                     # a fresh run
        (["train", "--resume", "--iters", "20"], "--resume without a PATH"),
        (["train", "--resume", ckpt, "--fine-tune", ckpt, "--iters", "20"], "exclude each other"),
        (["train", "--resume", "--out", out, "--iters", "12"], "already at iteration 12"),
        (["train", "--resume", "--out", out, "--iters", "20", "--data", str(other)],
         "is not the one"),
        (["train", "--resume", "--out", str(tmp_path / "empty"), "--iters", "20"],
         "holds no checkpoint.safetensors"),
    ]
    for argv, fragment in cases:
        assert main(argv) == 2, argv
        line = _one_line_error(capsys)
        assert fragment in line, line
    assert snapshot(out) == before
    assert not os.path.exists(tmp_path / "empty")


def test_resume_into_another_directory_and_its_guard(run12, tmp_path, capsys):
    data, out = run12
    ckpt = os.path.join(out, "checkpoint.safetensors")
    fork = str(tmp_path / "fork")
    assert main(["train", "--resume", ckpt, "--out", fork, "--iters", "16", "--no-progress",
                 "--sample-tokens", "0"]) == 0
    assert load_checkpoint(fork).iter == 16 and load_checkpoint(out).iter == 12
    # a directory with another run's checkpoint is not resumed into
    before = snapshot(fork)
    assert main(["train", "--resume", ckpt, "--out", fork, "--iters", "20"]) == 2
    assert "already holds a checkpoint" in _one_line_error(capsys)
    assert snapshot(fork) == before


def test_weights_only_checkpoint_cannot_be_resumed(tmp_path, capsys):
    c = tmp_path / "w.safetensors"
    from randygpt.tokenizer import CharTokenizer
    tok = CharTokenizer.from_text(TEXT)
    save_checkpoint(c, GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1,
                                       n_embd=16, n_head=2)), tok)
    assert main(["train", "--resume", str(c), "--iters", "5"]) == 2
    assert "--fine-tune" in _one_line_error(capsys)


# ---------------------------------------------------------------------------------------------
# fine-tuning

def test_fine_tune_starts_from_the_weights_with_a_fresh_optimizer(run12, tmp_path, capsys):
    data, out = run12
    src = load_checkpoint(out)
    new = tmp_path / "new.txt"
    new.write_text(TEXT[len(TEXT) // 2:] * 2)         # different text, same characters
    ft = str(tmp_path / "ft")
    assert main(["train", "--fine-tune", out, "--data", str(new), "--iters", "1",
                 "--eval-interval", "1", "--lr", "1e-5", "--min-lr", "0", "--warmup", "0",
                 "--batch", "4", "--eval-iters", "2", "--no-progress", "--sample-tokens", "0",
                 "--out", ft]) == 0
    assert "fine-tuning from" in capsys.readouterr().out
    c = load_checkpoint(ft)
    assert c.iter == 1 and c.optimizer_state["step"] == 1      # fresh counter and optimizer
    assert c.train_config.lr == 1e-5 and c.train_config.seed == 1337
    assert c.tokenizer.to_dict() == src.tokenizer.to_dict()
    assert c.meta.fine_tuned_from == os.path.abspath(os.path.join(out,
                                                                     "checkpoint.safetensors"))
    # one AdamW step of lr 1e-5 moves each weight by about 1e-5 (|update| <= ~lr (1 + wd))
    delta = np.abs(c.model.params.flat - src.model.params.flat)
    assert 0 < delta.max() < 2e-5


def test_fine_tune_on_text_with_unknown_characters_names_them(run12, tmp_path, capsys):
    data, out = run12
    new = tmp_path / "new.txt"
    new.write_text(TEXT + " \u00e9t\u00e9 \u4e2d\u6587 ~")
    unknown = sorted(set(new.read_text()) - set(TEXT))
    assert main(["train", "--fine-tune", out, "--data", str(new), "--iters", "3",
                 "--out", str(tmp_path / "ft")]) == 2
    line = _one_line_error(capsys)
    assert f"{len(unknown)} character(s) the checkpoint's tokenizer does not know" in line
    for ch in unknown:
        assert repr(ch) in line, (ch, line)
    assert main(["train", "--fine-tune", out, "--data", str(data), "--iters", "3", "--dim", "32",
                 "--out", str(tmp_path / "ft")]) == 2
    assert "fine-tuning keeps the checkpoint's model shape" in _one_line_error(capsys)


# ---------------------------------------------------------------------------------------------
# divergence

def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    steps = {"n": 0}
    forward = GPT.forward

    def poisoned(self, idx, targets=None, rng=None):
        logits, loss = forward(self, idx, targets, rng)
        if rng is not None:                    # a training step (evaluation has no dropout rng)
            steps["n"] += 1
            if steps["n"] == 8:
                loss = float("nan")
        return logits, loss
    monkeypatch.setattr(GPT, "forward", poisoned)
    m, t = tiny()
    with pytest.raises(UserError) as e:
        train(plan_run(m, replace(t, eval_interval=3), text=TEXT, out_dir=out), **QUIET)
    msg = str(e.value)
    assert "loss became nan at iteration 7" in msg and "diverged" in msg
    assert os.path.join(out, "checkpoint.safetensors") in msg
    c = load_checkpoint(out)
    assert c.iter == 6 and np.isfinite(c.model.params.flat).all()


def test_real_divergence_is_one_line_and_writes_no_nan_checkpoint(tmp_path, capsys):
    data = tmp_path / "d.txt"
    data.write_text(TEXT)
    out = str(tmp_path / "run")
    assert main(["train", "--data", str(data), *TINY, "--iters", "300", "--eval-interval", "2",
                 "--lr", "1e4", "--warmup", "0", "--grad-clip", "0", "--out", out]) == 2
    line = _one_line_error(capsys)
    assert "training diverged" in line and "lower --lr" in line
    c = load_checkpoint(out)                  # whatever was written last is finite and loads
    assert np.isfinite(c.model.params.flat).all() and c.iter < 300


def test_document_runs_validate_on_a_random_split_that_resume_keeps(tmp_path):
    m, t = tiny()
    text = "".join(f"{w}\n" for w in TEXT.split())           # one word per document
    out = str(tmp_path / "run")
    plan = plan_run(m, t, text=text, out_dir=out, doc_separator="\n")
    assert plan.val_split == "random"
    assert plan_run(m, t, text=text).val_split == "tail"      # a plain text: its tail
    first = train(plan, stop_after=6, **QUIET)
    assert load_checkpoint(os.path.join(out, "checkpoint.safetensors")).meta.data.val_split \
        == "random"
    resumed = plan_run(text=text, resume="", out_dir=out)
    assert resumed.val_split == "random" and resumed.doc_separator == "\n"
    with pytest.raises(UserError, match="split"):
        plan_run(text=text, resume="", out_dir=out, val_split="tail")
    assert first.iters_done == 6


HOLD = """
import sys, time
from randygpt.runs import lock_run_dir
with lock_run_dir(sys.argv[1], check=False):
    print("held", flush=True)
    time.sleep(120)
"""


def hold_lock(run_dir):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE,
                              text=True, env=env)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_process_on_a_run_directory_is_refused_until_the_holder_dies(tmp_path, capsys):
    out = tmp_path / "run"
    holder = hold_lock(out)
    try:
        args = ["train", "--iters", "4", "--eval-interval", "2", "--out", str(out), *TINY]
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "in use by another randygpt process" in err[0]
        assert f"pid {holder.pid}" in err[0] and "--out" in err[0]
        assert not (out / "metrics.jsonl").exists()
        holder.send_signal(signal.SIGKILL)          # a killed holder's lock is released
        holder.wait(timeout=30)
        assert main(args) == 0
        assert (out / "checkpoint.safetensors").exists()
        capsys.readouterr()
        holder = hold_lock(out)                     # and a resume is refused the same way
        assert main(["train", "--resume", "--iters", "6", "--out", str(out), "--no-progress"]) == 2
        assert "in use by another randygpt process" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_two_fresh_runs_planned_together_never_share_a_directory(tmp_path):
    # both plans pass the "no checkpoint here" rule; the second to lock sees the first's
    m, t = tiny()
    out = str(tmp_path / "run")
    first, second = (plan_run(m, t, text=TEXT, out_dir=out) for _ in range(2))
    train(first, stop_after=6, **QUIET)
    with pytest.raises(UserError, match="already holds a checkpoint"):
        train(second, **QUIET)


def test_a_refused_run_leaves_no_directory_and_no_token_cache(tmp_path):
    m, t = tiny()
    out = tmp_path / "runs" / "run"
    plan = plan_run(m, t, text="too short", out_dir=str(out))
    with pytest.raises(UserError, match="too short"):
        train(plan, **QUIET)
    assert not out.exists()
    cache = tmp_path / "runs" / "token-cache"
    assert not cache.exists() or not os.listdir(cache)


def test_disk_full_names_the_intact_checkpoint_and_keeps_metrics_to_it(tmp_path, monkeypatch,
                                                                        capsys):
    import randygpt.train as train_module
    from randygpt.checkpoint import write_atomic
    calls = []

    def full_after_first(path, data):      # the second checkpoint write finds the disk full
        calls.append(path)
        if len(calls) > 2:                 # (the first evaluation writes latest and best)
            raise UserError(f"cannot write {path}: No space left on device; its previous "
                            "version, if any, is intact")
        write_atomic(path, data)
    monkeypatch.setattr(train_module, "write_atomic", full_after_first)
    m, t = tiny()
    out = tmp_path / "run"
    with pytest.raises(UserError) as e:
        train(plan_run(m, t, text=TEXT, out_dir=str(out)), **QUIET)
    msg = e.value.render(lambda f: "--" + f)
    assert "No space left" in msg and "checkpoint of iteration 6" in msg and "--resume" in msg
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows] == [6]
    assert load_checkpoint(str(out / "checkpoint.safetensors")).iter == 6
    # info: the best val loss is shown only where its checkpoint exists
    os.remove(out / "checkpoint_best.safetensors")
    assert main(["info", str(out)]) == 0
    assert "best val loss: none" in capsys.readouterr().out
