"""Generation: the KV cache reproduces full forward passes, the sliding window, stopping rules,
and the `generate` / `eval` commands end to end."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from randygpt.config import ModelConfig
from randygpt.errors import UserError
from randygpt.model import GPT
from randygpt.sample import (Decoder, SamplingConfig, generate_ids, generate_text,
                             generate_uncached, stream_text)
from randygpt.tokenizer import CharTokenizer
from clitools import assert_one_line_error

TEXT = "the quick brown fox jumps over the lazy dog. THE END!\n"
TOK = CharTokenizer(TEXT)
BLOCK = 12


def make_model(dtype=np.float32, block=BLOCK, seed=3):
    cfg = ModelConfig(vocab_size=TOK.vocab_size, block_size=block, n_layer=2, n_embd=32,
                      n_head=4, dropout=0.0)
    model = GPT(cfg, seed=seed, dtype=dtype)
    # larger weights than the N(0, 0.02) init, so attention is far from uniform and a wrong
    # key, value or position would show in the logits
    model.params.flat[...] *= 8
    for name in model.params.names():
        if name.endswith(".g"):
            model.params[name][...] = 1 + 0.3 * np.random.default_rng(1).standard_normal(
                model.params[name].shape)
    return model


def full_logits(model, window):
    logits, _ = model.forward(np.asarray(window)[None, :])
    return logits[0]                                                          # (T, V)


def random_ids(n, seed=0):
    return np.random.default_rng(seed).integers(0, TOK.vocab_size, n).tolist()


# --------------------------------------------------------------------------------------------
# the cache against full forward passes

def test_prefill_equals_forward_at_every_position():
    model = make_model()
    ids = random_ids(BLOCK)
    got = model.prefill(ids, model.new_kv_cache())
    np.testing.assert_allclose(got, full_logits(model, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-12)])
def test_decode_steps_equal_forward_at_every_position(dtype, tol):
    # float64 at 1e-12 shows the decode math (folded gains, cached k/v) is exact, not close
    model = make_model(dtype)
    ids = random_ids(BLOCK, seed=1)
    want = full_logits(model, ids)
    cache = model.new_kv_cache()
    got = [model.prefill(ids[:1], cache)[0]]
    for t in range(1, BLOCK):
        got.append(model.decode_step(ids[t], cache))
    assert cache.length == BLOCK
    np.testing.assert_allclose(np.array(got), want, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="full"):
        model.decode_step(ids[0], cache)


def expected_windows(ids, block, keep):
    """The documented window policy, written out independently of Decoder."""
    window, out, slides = [], [], 0
    for tok in ids:
        if len(window) == block:
            window = window[len(window) - keep:]
            slides += 1
        window = window + [tok]
        out.append(list(window))
    return out, slides


@pytest.mark.parametrize("keep", [0, 3, BLOCK // 2, BLOCK - 1])
def test_sliding_window_logits_equal_forward_over_the_window(keep):
    model = make_model()
    ids = random_ids(4 * BLOCK + 5, seed=2)
    decoder = Decoder(model, keep=keep)
    windows, slides = expected_windows(ids, BLOCK, keep)
    got = [decoder.start(ids[:1])]
    for tok in ids[1:]:
        got.append(decoder.feed(tok))
    assert decoder.window == windows[-1]
    assert decoder.rebuilds == slides >= 3                          # it slid, repeatedly
    for t, window in enumerate(windows):
        np.testing.assert_allclose(got[t], full_logits(model, window)[-1], rtol=1e-5,
                                   atol=1e-5, err_msg=f"position {t}, keep {keep}")


def test_keep_block_minus_one_is_the_exact_last_block_tokens():
    model = make_model()
    ids = random_ids(3 * BLOCK, seed=3)
    decoder = Decoder(model, keep=BLOCK - 1)
    decoder.start(ids[:1])
    for t in range(1, len(ids)):
        got = decoder.feed(ids[t])
        crop = ids[max(0, t + 1 - BLOCK):t + 1]           # nanoGPT's idx[:, -block_size:]
        np.testing.assert_allclose(got, full_logits(model, crop)[-1], rtol=1e-5, atol=1e-5)


def test_prompt_longer_than_the_block_prefills_its_last_block():
    model = make_model()
    ids = random_ids(2 * BLOCK + 7, seed=4)
    decoder = Decoder(model)
    got = decoder.start(ids)
    assert decoder.window == ids[-BLOCK:]
    np.testing.assert_allclose(got, full_logits(model, ids[-BLOCK:])[-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampling", [SamplingConfig(temperature=0),
                                      SamplingConfig(temperature=0.9, top_k=20, top_p=0.95)])
def test_cached_generation_gives_the_same_tokens_as_uncached(sampling):
    model = make_model()
    prompt = TOK.encode("the quick").tolist()
    n = 3 * BLOCK
    cached = list(generate_ids(model, prompt, n, sampling, np.random.default_rng(9),
                               keep=BLOCK - 1))
    uncached = generate_uncached(model, prompt, n, sampling, np.random.default_rng(9))
    assert len(cached) == n and cached == uncached


# --------------------------------------------------------------------------------------------
# stopping, prompts, seeds

GREEDY = SamplingConfig(temperature=0)


def test_stops_before_the_stop_id():
    model = make_model()
    free = list(generate_ids(model, [TOK.bos_id], 40, GREEDY, None))
    stop = free[7]
    first = free.index(stop)
    stopped = list(generate_ids(model, [TOK.bos_id], 40, GREEDY, None, stop_id=stop))
    assert stopped == free[:first]


def test_stream_stops_at_eos_and_at_max_tokens():
    model = make_model()
    free = generate_text(model, TOK, "", max_tokens=30, sampling=GREEDY)
    assert len(free) == 30              # every id of this vocabulary but BOS/EOS is one char
    tok = CharTokenizer(TEXT)
    tok.eos_id = tok.stoi[free[10]]     # pretend that character is EOS
    cut = generate_text(model, tok, "", max_tokens=30, sampling=GREEDY)
    assert cut == free[:free.index(free[10])]


def test_empty_prompt_starts_from_bos():
    model = make_model()
    text = generate_text(model, TOK, "", max_tokens=20, sampling=GREEDY)
    ids = list(generate_ids(model, [TOK.bos_id], 20, GREEDY, None, stop_id=TOK.eos_id))
    assert text == TOK.decode(ids) and len(text) > 0


def test_stop_strings_cut_the_text_and_are_not_included():
    model = make_model()
    free = generate_text(model, TOK, "the ", max_tokens=40, sampling=GREEDY)
    stop = free[12:15]
    want = free[:free.index(stop)]
    assert generate_text(model, TOK, "the ", max_tokens=40, sampling=GREEDY,
                         stop=[stop]) == want
    pieces = list(stream_text(model, TOK, "the ", max_tokens=40, sampling=GREEDY,
                              stop=["zzzz", stop]))
    assert "".join(pieces) == want and all(p for p in pieces)
    never = generate_text(model, TOK, "the ", max_tokens=40, sampling=GREEDY, stop=["@@"])
    assert never == free


def test_bpe_stream_pieces_join_to_the_decoded_ids():
    pytest.importorskip("tokenizers")
    from randygpt.tokenizer import BPETokenizer
    corpus = "naïve café – déjà vu, 東京 and Zürich: ünïcödé everywhere. " * 20
    bpe = BPETokenizer.train(corpus, vocab_size=300)
    cfg = ModelConfig(vocab_size=bpe.vocab_size, block_size=16, n_layer=1, n_embd=32, n_head=4)
    model = GPT(cfg, seed=5)
    s = SamplingConfig(temperature=1.5)      # wander through bytes of multi-byte characters
    pieces = list(stream_text(model, bpe, "café", max_tokens=120, sampling=s,
                              rng=np.random.default_rng(3)))
    ids = list(generate_ids(model, bpe.encode("café").tolist(), 120, s,
                            np.random.default_rng(3), stop_id=bpe.eos_id))
    # a character cut in two by a piece boundary would decode to U+FFFD in the pieces only
    text = bpe.decode(ids)
    assert "".join(pieces) == text and len(ids) > 50
    assert any(127 < ord(c) < 0xFFFD for c in text)         # multi-byte characters were made


def test_same_seed_same_text_other_seed_other_text():
    model = make_model()
    s = SamplingConfig(temperature=1.0)

    def text(seed):
        return generate_text(model, TOK, "the", max_tokens=50, sampling=s,
                             rng=np.random.default_rng(seed))
    assert text(1) == text(1)
    assert text(1) != text(2)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(prompt="the cat é ß"), "2 character.*'ß', 'é'"),
    (dict(sampling=SamplingConfig(temperature=-1)), "--temperature"),
    (dict(sampling=SamplingConfig(top_p=0)), "--top-p"),
    (dict(max_tokens=0), "--max-tokens"),
    (dict(stop=[""]), "--stop")])
def test_bad_generation_input_is_a_user_error(kwargs, fragment):
    model = make_model()
    args = dict(prompt="the", max_tokens=5) | kwargs
    with pytest.raises(UserError, match=fragment):
        stream_text(model, TOK, **args)          # raised at the call, before any text


# --------------------------------------------------------------------------------------------
# the commands, end to end, on a model trained by the CLI

PY = sys.executable
ENV = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
          "\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n") * 6


def cli(args, cwd, timeout=120):
    return subprocess.run([PY, "-m", "randygpt", *args], capture_output=True, text=True,
                          cwd=cwd, env=ENV, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    (root / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    r = cli(["train", "--data", "corpus.txt", "--preset", "tiny", "--iters", "30", "--block",
             "16", "--batch", "4", "--eval-interval", "15", "--eval-iters", "2",
             "--sample-tokens", "0", "--no-progress", "--out", "runs/first"], cwd=root)
    assert r.returncode == 0, r.stderr
    assert (root / "runs/first/checkpoint_best.safetensors").exists()
    return root


def test_cli_generate_matches_the_library_and_is_reproducible(trained):
    from randygpt.checkpoint import load_checkpoint
    ckpt = load_checkpoint(trained / "runs/first/checkpoint_best.safetensors")
    r = cli(["generate", "--run", "runs/first", "--prompt", "First", "--temperature", "0",
             "--max-tokens", "60"], cwd=trained)
    assert r.returncode == 0, r.stderr
    want = generate_text(ckpt.model, ckpt.tokenizer, "First", max_tokens=60, sampling=GREEDY)
    assert r.stdout == want + "\n"
    args = ["generate", "--prompt", "Speak", "--max-tokens", "80", "--seed", "5",
            "--top-k", "10", "--top-p", "0.9", "--temperature", "1.2"]
    a, b = cli(args, cwd=trained), cli(args, cwd=trained)
    assert a.returncode == 0 and a.stdout == b.stdout and len(a.stdout) > 1
    assert cli(args[:-6] + ["6"] + args[-4:], cwd=trained).stdout != a.stdout


def test_cli_echo_stop_and_num_samples(trained):
    base = ["generate", "--prompt", "All:", "--max-tokens", "40", "--temperature", "0"]
    plain = cli(base, cwd=trained).stdout
    echo = cli(base + ["--echo"], cwd=trained).stdout
    assert echo == "All:" + plain
    completion = plain[:-1]
    stop = completion[5:7]
    cut = cli(base + ["--stop", stop], cwd=trained).stdout
    assert cut == completion[:completion.index(stop)] + "\n"
    nl = cli(base + ["--stop", "\\n"], cwd=trained).stdout      # typed as backslash-n
    assert "\n" not in nl[:-1] and nl[:-1] == completion.split("\n")[0]
    three = cli(["generate", "--max-tokens", "30", "--seed", "3", "--num-samples", "3"],
                cwd=trained)
    assert three.returncode == 0 and three.stdout.count("---\n") == 2
    (trained / "prompt.txt").write_text("All:", encoding="utf-8")
    from_file = cli(base[:1] + ["--prompt-file", "prompt.txt"] + base[3:], cwd=trained)
    assert from_file.stdout == plain


def test_cli_generate_help_and_a_reader_that_leaves_early(trained):
    r = cli(["generate", "--help"], cwd=trained)
    for flag in ("--checkpoint", "--run", "--prompt", "--prompt-file", "--max-tokens",
                 "--temperature", "--top-k", "--top-p", "--seed", "--stop", "--num-samples",
                 "--echo"):
        assert flag in r.stdout, flag
    assert "--json" in cli(["eval", "--help"], cwd=trained).stdout
    greedy = ["generate", "--run", "runs/first", "--temperature", "0", "--max-tokens"]
    assert len(cli(greedy + ["300"], cwd=trained).stdout) == 301     # no early EOS, greedily
    proc = subprocess.Popen([PY, "-m", "randygpt", *greedy, "100000"], cwd=trained, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert len(proc.stdout.read(5)) == 5            # like `| head -c 5`
    proc.stdout.close()
    assert proc.wait(timeout=60) == 0
    assert proc.stderr.read() == b""


def test_default_checkpoint_is_the_best_of_the_most_recent_run(trained, tmp_path):
    import shutil
    runs = tmp_path / "runs"
    best = trained / "runs/first/checkpoint_best.safetensors"
    for name, age in (("old", 1000), ("new", 10), ("newest-no-best", 0)):
        (runs / name).mkdir(parents=True)
        if name != "newest-no-best":
            shutil.copy(best, runs / name / "checkpoint_best.safetensors")
        t = 1_700_000_000 - age
        os.utime(runs / name, (t, t))
    r = cli(["generate", "--max-tokens", "5", "--seed", "1"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert os.path.join("runs", "new", "checkpoint_best.safetensors") in r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(cli(["generate"], cwd=empty), "no checkpoint", "--checkpoint")


@pytest.mark.parametrize("args, fragments", [
    (["--prompt", "Speak é!"], ["'é'", "does not know"]),
    (["--temperature", "-0.5"], ["--temperature"]),
    (["--top-p", "0"], ["--top-p"]),
    (["--top-p", "1.01"], ["--top-p"]),
    (["--max-tokens", "0"], ["--max-tokens"]),
    (["--num-samples", "0"], ["--num-samples"]),
    (["--prompt-file", "nope.txt"], ["nope.txt"]),
])
def test_cli_generate_bad_input(trained, args, fragments):
    assert_one_line_error(cli(["generate", "--run", "runs/first", *args], cwd=trained),
                          *fragments)


def test_cli_missing_or_bad_checkpoint(trained, tmp_path):
    assert_one_line_error(cli(["generate", "--checkpoint", "missing.safetensors"],
                              cwd=trained), "missing.safetensors", "does not exist")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a checkpoint}" + b"\0" * 50)
    assert_one_line_error(cli(["generate", "--checkpoint", str(bad)], cwd=trained), "bad")
    assert_one_line_error(cli(["eval", "--checkpoint", str(bad), "--data", "corpus.txt"],
                              cwd=trained), "bad")
    assert_one_line_error(cli(["generate", "--run", str(tmp_path)], cwd=trained), "run")


def test_cli_eval_reports_the_library_numbers(trained):
    from randygpt.checkpoint import load_checkpoint
    from randygpt.evaluate import evaluate_text
    r = cli(["eval", "--checkpoint", "runs/first/checkpoint_best.safetensors", "--data",
             "corpus.txt", "--json"], cwd=trained)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    ckpt = load_checkpoint(trained / "runs/first/checkpoint_best.safetensors")
    want = evaluate_text(ckpt.model, ckpt.tokenizer, CORPUS)
    assert got["tokens"] == got["chars"] == len(CORPUS)
    assert got["loss"] == pytest.approx(want.loss, rel=1e-9)
    assert got["perplexity"] == pytest.approx(np.exp(want.loss), rel=1e-9)
    assert got["bits_per_char"] == pytest.approx(want.loss / np.log(2), rel=1e-9)
    text = cli(["eval", "--run", "runs/first", "--data", "corpus.txt"], cwd=trained)
    assert text.returncode == 0 and f"{want.bits_per_char:.4f} bits/char" in text.stdout
    assert_one_line_error(cli(["eval", "--run", "runs/first", "--data", "nope.txt"],
                              cwd=trained), "nope.txt")
    (trained / "odd.txt").write_text("Speak ☃", encoding="utf-8")
    assert_one_line_error(cli(["eval", "--run", "runs/first", "--data", "odd.txt"],
                              cwd=trained), "'☃'")


def test_generate_imports_nothing_heavy(trained):
    # the first-token latency target rests on this: no numba, tqdm, tokenizers or torch
    code = ("import sys; from randygpt.cli import main; "
            "main(['generate', '--run', 'runs/first', '--max-tokens', '3', '--seed', '0']); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'numba', 'tqdm', 'tokenizers', 'torch', 'llvmlite'}))")
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=trained, env=ENV,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_blas_threads_can_be_set_at_run_time():
    from randygpt.blas import get_blas_threads, set_blas_threads
    before = get_blas_threads()
    if before is None:
        pytest.skip("NumPy here does not use OpenBLAS")
    try:
        assert set_blas_threads(1) == before
        assert get_blas_threads() == 1
        model = make_model()                        # still correct single-threaded
        ids = random_ids(BLOCK, seed=7)
        np.testing.assert_allclose(model.prefill(ids, model.new_kv_cache()),
                                   full_logits(model, ids), rtol=1e-5, atol=1e-5)
    finally:
        set_blas_threads(before)
    assert get_blas_threads() == before
