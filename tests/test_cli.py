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
    (b"   \n\n", "only whitespace"),
    (b"\x00\x01\x02binary" * 50, "binary"),
    (b"plain text. " * 300_000 + b"\x00" + b"more text. " * 100, "binary"),  # NUL at 3.6 MB
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


# ------------------------------------------------------------------------------------------
# a model trained on a corpus of short documents (one name per line): eval, generate

def names_text(n=3000, seed=0):
    import numpy as np
    rng = np.random.default_rng(seed)
    syllables = ["ka", "ri", "mo", "na", "el", "to", "sa", "an", "li", "be"]
    return "".join("".join(rng.choice(syllables, size=int(rng.integers(1, 4)))) + "\n"
                   for _ in range(n))


@pytest.fixture(scope="module")
def names_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("names")
    data = d / "names.txt"
    data.write_text(names_text())
    r = run(["train", "--data", str(data), "--doc-separator", "\\n", "--iters", "150",
             "--eval-interval", "150", "--out", str(d / "run"), "--sample-tokens", "60",
             *TINY, "--dim", "32", "--batch", "16", "--dropout", "0", "--lr", "3e-3"])
    assert r.returncode == 0, r.stderr
    return data, d / "run", r


def test_end_of_run_sample_of_a_document_corpus_shows_several_documents(names_run):
    _, _, r = names_run
    sample = r.stdout.split("--- sample ---\n", 1)[1].rstrip("\n").split("\n")
    assert len(sample) >= 3 and all(sample), sample
    assert "exact val loss" in r.stdout


def test_eval_frames_documents_as_training_does(names_run):
    data, out, _ = names_run
    ckpt = str(out / "checkpoint.safetensors")
    exact = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["val_loss_exact"]
    framed = run(["eval", "--checkpoint", ckpt, "--data", str(data), "--doc-separator", "\\n",
                  "--json"])
    assert framed.returncode == 0, framed.stderr
    as_docs = json.loads(framed.stdout)
    assert as_docs["tokens"] == sum(len(n) + 1 for n in data.read_text().split("\n") if n)
    assert abs(as_docs["loss"] - exact) < 0.1          # the whole file vs its val split
    plain = run(["eval", "--checkpoint", ckpt, "--data", str(data), "--json"])
    assert "--doc-separator" in plain.stderr               # a note says what to pass
    assert json.loads(plain.stdout)["loss"] > as_docs["loss"] + 0.3
    slid = run(["eval", "--checkpoint", ckpt, "--data", str(data), "--stride", "4", "--json"])
    assert json.loads(slid.stdout)["loss"] < json.loads(plain.stdout)["loss"]


def test_generate_begins_a_document_at_bos_by_default_for_a_document_model(names_run):
    _, out, _ = names_run
    ckpt = str(out / "checkpoint.safetensors")
    common = ["generate", "--checkpoint", ckpt, "--prompt", "ka", "--seed", "5",
              "--num-samples", "30", "--max-tokens", "12", "--separator", "\\n"]
    default, bos, no_bos = (run(common + extra) for extra in ([], ["--bos"], ["--no-bos"]))
    assert default.returncode == bos.returncode == no_bos.returncode == 0
    assert default.stdout == bos.stdout != no_bos.stdout
    assert len(bos.stdout[:-1].split("\n")) == 30                     # one sample per line
    piped = subprocess.run(
        [sys.executable, "-m", "randygpt", *common[:3], "--prompt-file", "-", *common[5:]],
        input="ka", capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__))))
    assert piped.returncode == 0 and piped.stdout == default.stdout, piped.stderr


@pytest.mark.parametrize("flags", [["--batch", "100000"], ["--block", "100000"]])
def test_a_run_too_big_for_the_machine_is_refused_before_allocating(tmp_path, flags):
    r = run(["train", "--iters", "2", "--out", str(tmp_path / "run"), "--no-progress", *flags],
            cwd=tmp_path, timeout=60)
    assert_one_line_error(r, "this run needs about", "GiB", "available", "--batch")
    assert not (tmp_path / "run").exists()


def test_fine_tune_on_text_with_unseen_characters_says_what_to_do(tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("abc abc abc " * 60)
    out = tmp_path / "run"
    assert run(["train", "--data", str(data), "--iters", "2", "--eval-interval", "2", "--out",
                str(out), "--sample-tokens", "0", *TINY]).returncode == 0
    new = tmp_path / "new.txt"
    new.write_text("xyz " * 200)
    r = run(["train", "--fine-tune", str(out / "checkpoint.safetensors"), "--data", str(new),
             "--iters", "2", "--out", str(tmp_path / "ft"), "--no-progress"])
    assert_one_line_error(r, "does not know", "--fine-tune keeps the checkpoint's tokenizer")
    assert "train a tokenizer that covers" not in r.stderr


@pytest.mark.parametrize("flag", ["--grad-clip", "--lr", "--weight-decay", "--dropout"])
@pytest.mark.parametrize("value", ["inf", "nan"])
def test_non_finite_float_flags_are_refused(tmp_path, flag, value):
    r = run(["train", "--iters", "2", "--out", str(tmp_path / "run"), *TINY, flag, value],
            cwd=tmp_path)
    assert_one_line_error(r, flag, "finite")
    assert not (tmp_path / "run").exists()


def test_non_finite_train_config_is_refused_by_the_library():
    from randygpt.config import TrainConfig
    from randygpt.errors import UserError
    with pytest.raises(UserError, match="finite"):
        TrainConfig(grad_clip=float("inf")).validate()


def test_a_huge_finite_loss_is_divergence_and_keeps_the_last_good_checkpoint(tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("to be or not to be, that is the question. " * 40)
    out = tmp_path / "run"
    r = run(["train", "--data", str(data), "--iters", "60", "--eval-interval", "1",
             "--warmup", "0", "--lr", "1e2", "--out", str(out), *TINY])
    assert_one_line_error(r, "training diverged", "--lr")
    assert "last good checkpoint" in r.stderr or "no checkpoint" in r.stderr
    from randygpt.checkpoint import load_checkpoint
    if (out / "checkpoint.safetensors").exists():
        ckpt = load_checkpoint(str(out / "checkpoint.safetensors"))
        rows = (out / "metrics.jsonl").read_text().splitlines()
        assert json.loads(rows[-1])["iter"] <= ckpt.iter


@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_data_that_is_not_a_regular_file_is_refused(tmp_path, kind):
    path = "/dev/zero" if kind == "device" else str(tmp_path / "fifo")
    if kind == "fifo":
        os.mkfifo(path)
    r = run(["train", "--data", path, "--iters", "2", "--out", str(tmp_path / "r"), *TINY],
            timeout=60)
    assert_one_line_error(r, "not a regular file", "--data")


def test_an_unwritable_run_directory_is_refused_before_any_work(tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("to be or not to be, that is the question. " * 40)
    # /proc refuses new directories even to root (a chmod'ed directory does not stop root)
    r = run(["train", "--data", str(data), "--iters", "2", "--out", "/proc/randygpt-run",
             *TINY], timeout=60)
    assert_one_line_error(r, "cannot write to the run directory", "--out")
    assert "tokens:" not in r.stdout                 # refused before the data was encoded
