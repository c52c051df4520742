"""The command line: help, bad flags and bad data give one clear line and a non-zero exit."""
import json
import os
import subprocess
import sys

import pytest

from clitools import assert_one_line_error

TINY = ["--preset", "tiny", "--layers", "1", "--dim", "16", "--heads", "2", "--block", "16",
        "--batch", "4", "--eval-iters", "2", "--no-progress"]


def run(args, cwd=None, timeout=120):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
    return subprocess.run([sys.executable, "-m", "randygpt", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout, env=env)


def test_help_explains_every_train_flag():
    r = run(["train", "--help"])
    assert r.returncode == 0
    for flag in ("--data", "--iters", "--preset", "--out", "--seed", "--layers", "--dim",
                 "--heads", "--block", "--batch", "--lr", "--min-lr", "--warmup", "--dropout",
                 "--weight-decay", "--grad-clip", "--eval-interval", "--eval-iters", "--beta1",
                 "--beta2", "--backend"):
        assert flag in r.stdout, flag
    help_text = " ".join(r.stdout.split())      # each default said once, never "None"
    assert "None" not in help_text and "dropout probability (default 0.1)" in help_text
    assert "(default 0.1) (default" not in help_text
    assert "peak learning rate (default 0.001)" in help_text
    top = run(["--help"])
    assert top.returncode == 0 and "train" in top.stdout


def test_train_on_file_writes_metrics_and_prints_sample(tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("to be or not to be, that is the question. " * 40)
    out = tmp_path / "run"
    r = run(["train", "--data", str(data), "--iters", "20", "--eval-interval", "10",
             "--out", str(out), "--sample-tokens", "40", *TINY])
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["iter"] for row in rows] == [10, 20]
    assert "--- sample ---" in r.stdout


def test_builtin_sample_is_used_without_train_txt(tmp_path):
    r = run(["train", "--iters", "2", "--eval-interval", "2", "--sample-tokens", "0",
             "--out", str(tmp_path / "run"), *TINY], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "built-in sample" in r.stdout + r.stderr


def test_builtin_sample_demo_stops_before_memorising(tmp_path):
    # without --iters, a run on the built-in sample is a short demo; --iters still wins
    r = run(["train", "--sample-tokens", "0", "--out", str(tmp_path / "run"), *TINY,
             "--batch", "1", "--eval-iters", "1"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["iter"] == 200 and [row["iter"] for row in rows][:2] == [25, 50]


@pytest.mark.parametrize("content,fragment", [
    (b"", "empty"),
    (b"   \n\n", "empty"),
    (b"\x00\x01\x02binary" * 50, "binary"),
    (b"caf\xe9 au lait " * 100, "UTF-8"),
    (b"short text", "too short"),
])
def test_bad_data_files(tmp_path, content, fragment):
    data = tmp_path / "bad.txt"
    data.write_bytes(content)
    r = run(["train", "--data", str(data), "--iters", "2", "--out", str(tmp_path / "r"), *TINY])
    assert_one_line_error(r, fragment, "bad.txt")


def test_missing_data_file(tmp_path):
    r = run(["train", "--data", str(tmp_path / "nope.txt"), *TINY])
    assert_one_line_error(r, "does not exist")


def test_too_many_distinct_characters_suggests_bpe(tmp_path):
    data = tmp_path / "wide.txt"
    data.write_text("".join(chr(0x4E00 + i) for i in range(600)) * 3, encoding="utf-8")
    r = run(["train", "--data", str(data), "--iters", "2", "--out", str(tmp_path / "r"), *TINY])
    assert_one_line_error(r, "600 distinct characters", "BPE")


@pytest.mark.parametrize("args,fragment", [
    (["--preset", "huge"], "unknown preset"),
    (["--iters", "0"], "at least 1"),
    (["--iters", "ten"], "not a whole number"),
    (["--dim", "30", "--heads", "4"], "divisible"),
    (["--dropout", "1.5"], "dropout"),
    (["--beta1", "1.5"], "--beta1 1.5 must be in [0, 1)"),       # library errors name the flag
    (["--min-lr", "0.5"], "--min-lr 0.5 must lie between 0 and the peak learning rate"),
    (["--backend", "gpu"], "invalid choice"),
    (["--no-such-flag"], "unrecognized"),
])
def test_bad_flags(args, fragment):
    r = run(["train", *args])
    assert_one_line_error(r, fragment)
