"""Documents, windows that stay inside them, the split, the token cache, bits per character."""
import math
import os

import numpy as np
import pytest

from randygpt.config import ModelConfig
from randygpt.data import (IGNORE, Documents, bits_per_char, cache_key, encode_documents,
                           get_batch, load_documents, split_documents,
                           split_text)
from randygpt.errors import UserError
from randygpt.model import GPT
from randygpt.tokenizer import BPETokenizer, CharTokenizer

LETTERS = "abcdefghij"


def lettered_corpus(lengths):
    """Document d is LETTERS[d % 10] repeated lengths[d] times: neighbours never share a
    letter, so a window's letters tell which document(s) it came from."""
    texts = [LETTERS[d % len(LETTERS)] * n for d, n in enumerate(lengths)]
    tok = CharTokenizer(LETTERS)
    return texts, tok, encode_documents(texts, tok, progress=False)


def assert_window_inside_one_document(x_row, y_row, tok):
    """Check one sampled window from the ids alone: the counted targets are one run, the row's
    inputs up to the last counted target are one shifted run of BOS? letter* EOS? of a single
    letter (ignored targets before the run are context), and only padding follows."""
    keep = y_row != IGNORE
    counted = np.flatnonzero(keep)
    assert len(counted) >= 1
    i, n = int(counted[0]), int(counted[-1]) + 1
    assert keep[i:n].all() and not keep[n:].any()                 # one run of counted targets
    seq = np.concatenate([x_row[:n], y_row[n - 1:n]])              # the real row, n + 1 tokens
    np.testing.assert_array_equal(y_row[i:n - 1], x_row[i + 1:n])  # targets are shifted inputs
    letters = set(seq.tolist()) - {tok.bos_id, tok.eos_id}
    assert len(letters) <= 1, f"window mixes documents: {seq}"
    bos, eos = np.flatnonzero(seq == tok.bos_id), np.flatnonzero(seq == tok.eos_id)
    assert bos.tolist() in ([], [0]), f"BOS inside a window: {seq}"
    assert eos.tolist() in ([], [len(seq) - 1]), f"a window runs past an EOS: {seq}"


# ------------------------------------------------------------------------------------------
# Documents

def test_split_text_drops_empty_documents():
    assert split_text("a\n\nb\n\n\n\nc\n\n", "\n\n") == ["a", "b", "c"]
    assert split_text("one text", None) == ["one text"]
    assert split_text("no separator here", "###") == ["no separator here"]
    with pytest.raises(UserError, match="nothing but the separator"):
        split_text("######", "###")
    with pytest.raises(UserError, match="empty"):
        split_text("abc", "")


def test_documents_are_framed_bos_doc_eos():
    texts, tok, docs = lettered_corpus([3, 1, 4])
    assert docs.bounds.tolist() == [0, 5, 8, 14]
    assert docs.tokens.dtype == np.int32
    b, e, a = tok.bos_id, tok.eos_id, LETTERS.index
    assert docs.tokens.tolist() == [b, 0, 0, 0, e, b, 1, e, b, 2, 2, 2, 2, e]
    assert a("a") == 0 and docs.n_chars == 8 and docs.n_targets == 4 + 2 + 5


# ------------------------------------------------------------------------------------------
# Windows never cross a document

@pytest.mark.parametrize("block_size", [4, 16, 64])
def test_no_sampled_window_crosses_a_document(block_size):
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 3 * block_size, size=400)      # many shorter than a window
    texts, tok, docs = lettered_corpus(lengths)
    split = split_documents(docs, block_size, tok.decode)
    batch_rng = np.random.default_rng(1)
    for part in (split.train, split.val):
        seen_rows = 0
        for _ in range(300):
            x, y = get_batch(part, 16, block_size, batch_rng)
            assert x.shape == y.shape and x.shape[0] == 16 and 1 <= x.shape[1] <= block_size
            for xr, yr in zip(x, y):
                assert_window_inside_one_document(xr, yr, tok)
            seen_rows += 16
        assert seen_rows == 4800


def test_the_crossing_check_catches_a_plain_stream_sampler():
    # the same check on uniform windows over the concatenated stream must fail: it can fail
    texts, tok, docs = lettered_corpus([5, 7, 3, 9] * 20)
    x, y = get_batch(docs.tokens, 64, 16, np.random.default_rng(0))
    with pytest.raises(AssertionError):
        for xr, yr in zip(x, y):
            assert_window_inside_one_document(xr, yr, tok)


def target_counts(lengths, block_size, batches, batch_size=64, seed=0):
    """How often each target (each token but a piece's first) is counted in `batches`
    batches over pieces of the given token lengths; the token ids are their positions."""
    bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    docs = Documents(np.arange(bounds[-1], dtype=np.int32), bounds,
                     np.asarray(lengths, dtype=np.int64))
    rng = np.random.default_rng(seed)
    counts = np.zeros(bounds[-1], dtype=np.int64)
    for _ in range(batches):
        _, y = get_batch(docs, batch_size, block_size, rng)
        np.add.at(counts, y[y != IGNORE], 1)
    is_target = np.ones(bounds[-1], dtype=bool)
    is_target[bounds[:-1]] = False
    return counts, is_target, bounds


def test_every_predicted_token_has_the_same_expected_weight():
    # pieces much shorter than a window, about one window, and several windows long: each
    # target's expected count is batch rows x T / (number of windows), whatever its piece
    T = 8
    lengths = np.array([2, 3, 5, 9, 12, 30, 61] * 12)
    counts, is_target, bounds = target_counts(lengths, T, batches=3000)
    W = float(np.sum(lengths - 1 + T - 1))
    expected = 3000 * 64 * T / W
    got = counts[is_target]
    assert abs(got.mean() / expected - 1) < 0.01
    piece = np.searchsorted(bounds, np.flatnonzero(is_target), side="right") - 1
    for n in np.unique(lengths):              # each length class, and each position in it
        rows = lengths[piece] == n
        assert abs(got[rows].mean() / expected - 1) < 0.03, (n, got[rows].mean(), expected)
    # per token: a count, i.e. Poisson-like noise of sqrt(expected) around the same mean
    z = (got - expected) / np.sqrt(expected)
    assert np.abs(z).max() < 5.5 and 0.5 < z.std() < 1.6
    # (the old sampler, a piece in proportion to its targets then all its tokens, gave the
    # 1-target pieces a weight of about 1/7 of the 7-target ones: far outside these bounds)


def test_a_short_document_row_sees_it_from_bos():
    # a row that counts only the tail of a short document still starts at its BOS
    texts, tok, docs = lettered_corpus([9])
    docs2 = encode_documents(texts * 2, tok, progress=False)
    x, y = get_batch(docs2, 4000, 16, np.random.default_rng(0))
    assert (x[:, 0] == tok.bos_id).all()
    kept = (y != IGNORE).sum(axis=1)
    assert kept.min() >= 1 and kept.max() == 10 and (kept < 10).any()


def test_batch_of_short_documents_is_trimmed_to_its_longest_row():
    texts, tok, docs = lettered_corpus([2, 5, 3])
    x, y = get_batch(docs, 32, 64, np.random.default_rng(0))
    assert x.shape == (32, 6)                                   # BOS + 5 letters -> 5 + EOS
    assert (y != IGNORE).sum(axis=1).max() == 6 and (y != IGNORE).sum(axis=1).min() == 3


def test_one_document_gives_the_same_batches_as_a_plain_stream():
    tok = CharTokenizer(LETTERS)
    docs = encode_documents(["abcdefghij" * 30], tok, progress=False)
    a = get_batch(docs, 8, 16, np.random.default_rng(5))
    b = get_batch(docs.tokens, 8, 16, np.random.default_rng(5))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_padding_changes_neither_loss_nor_gradients():
    # a short document padded to block_size trains exactly like the document alone
    cfg = ModelConfig(vocab_size=12, block_size=16, n_layer=2, n_embd=16, n_head=2, dropout=0.0)
    model = GPT(cfg, seed=0, dtype=np.float64)
    texts, tok, docs = lettered_corpus([6, 40])
    x, y = get_batch(docs, 64, 16, np.random.default_rng(0))
    row = int(np.flatnonzero((y == IGNORE).any(axis=1))[0])
    n = int((y[row] != IGNORE).sum())
    assert n == 7 and x.shape[1] == 16
    _, padded_loss = model.forward(x[row:row + 1], y[row:row + 1])
    model.backward()
    padded_grads = model.grads.flat.copy()
    _, alone_loss = model.forward(x[row:row + 1, :n], y[row:row + 1, :n])
    model.backward()
    assert abs(padded_loss - alone_loss) < 1e-12
    np.testing.assert_allclose(padded_grads, model.grads.flat, rtol=1e-10, atol=1e-14)
    assert np.abs(model.grads.flat).max() > 0


def test_ignored_targets_gradient_matches_finite_differences():
    from gradcheck import check_op
    from randygpt.ops import reference as ops
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 4, 5)) * 2
    targets = rng.integers(0, 5, size=(2, 4))
    targets[0, 2:] = IGNORE
    targets[1, 3] = IGNORE
    loss, cache = ops.cross_entropy_forward(logits, targets)
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    keep = targets >= 0
    expected = -logp[keep, targets[keep]].mean()              # mean over the 5 kept only
    assert abs(loss - expected) < 1e-12
    (dlogits,) = ops.cross_entropy_backward(1.0, cache)
    assert np.abs(dlogits[~keep]).max() == 0
    check_op(lambda: float(ops.cross_entropy_forward(logits, targets)[0]), [dlogits], [logits])


# ------------------------------------------------------------------------------------------
# The split

def test_split_takes_whole_documents_near_the_90_percent_mark():
    texts, tok, docs = lettered_corpus([38] * 50)                # 50 documents of 40 tokens
    s = split_documents(docs, 8, tok.decode)
    assert len(s.val) == 200 and s.val.n_docs == 5 and s.train.n_docs == 45
    assert s.val.tokens[0] == tok.bos_id and s.train.tokens[-1] == tok.eos_id
    assert s.train.n_chars + s.val.n_chars == docs.n_chars == 50 * 38
    assert s.val.bounds.tolist() == [0, 40, 80, 120, 160, 200]


def test_split_cuts_one_long_document_like_a_plain_text():
    tok = CharTokenizer(LETTERS)
    docs = encode_documents(["abcdefghij" * 100], tok, progress=False)   # 1002 tokens
    s = split_documents(docs, 8, tok.decode)
    assert (len(s.train), len(s.val)) == (902, 100)
    assert s.train.n_chars == 901 and s.val.n_chars == 99        # BOS and EOS have no text
    assert s.val.n_targets == 99


def test_split_cuts_when_the_last_document_is_most_of_the_text():
    texts, tok, docs = lettered_corpus([20, 20, 500])
    s = split_documents(docs, 8, tok.decode)
    n = len(docs)
    assert len(s.val) == int(n * 0.1) and s.train.n_docs == 3 and s.val.n_docs == 1
    assert s.train.n_chars + s.val.n_chars == 540
    assert s.val.tokens[-1] == tok.eos_id and s.val.tokens[0] == LETTERS.index("c")


def test_split_of_a_too_short_text_is_a_user_error():
    texts, tok, docs = lettered_corpus([30])
    with pytest.raises(UserError, match="too short"):
        split_documents(docs, 8, tok.decode)


# ------------------------------------------------------------------------------------------
# The token cache

class CountingTokenizer(CharTokenizer):
    calls = 0

    def encode(self, text, progress=None):
        CountingTokenizer.calls += 1
        return super().encode(text, progress)


def test_cache_second_load_skips_encoding_and_gives_the_same_documents(tmp_path):
    tok = CountingTokenizer("abc \n")
    text = "abc abc\n\ncab\n\n\n\nbca"
    CountingTokenizer.calls = 0
    first = load_documents(text, tok, "\n\n", str(tmp_path), log=lambda *_: None)
    assert CountingTokenizer.calls == 3
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].startswith("tokens-") and files[0].endswith(".npy")
    msgs = []
    second = load_documents(text, tok, "\n\n", str(tmp_path), log=msgs.append)
    assert CountingTokenizer.calls == 3 and "from the cache" in msgs[0]
    np.testing.assert_array_equal(first.tokens, second.tokens)
    np.testing.assert_array_equal(first.bounds, second.bounds)
    np.testing.assert_array_equal(first.chars, second.chars)


def test_changed_text_tokenizer_or_separator_never_reuses_the_cache(tmp_path):
    tok = CharTokenizer("abc \n")
    quiet = dict(log=lambda *_: None)
    base = load_documents("abc\n\ncab", tok, "\n\n", str(tmp_path), **quiet)
    other_text = load_documents("abc\n\ncac", tok, "\n\n", str(tmp_path), **quiet)
    other_tok = load_documents("abc\n\ncab", CharTokenizer("abcd \n"), "\n\n", str(tmp_path),
                               **quiet)
    other_sep = load_documents("abc\n\ncab", tok, None, str(tmp_path), **quiet)
    assert len(os.listdir(tmp_path)) == 4
    assert other_text.tokens[-2] != base.tokens[-2]
    assert other_tok.tokens[1] == base.tokens[1] and other_tok.tokens[0] != base.tokens[0]
    assert other_sep.n_docs == 1 and base.n_docs == 2
    keys = {cache_key("abc\n\ncab", tok, "\n\n"), cache_key("abc\n\ncac", tok, "\n\n"),
            cache_key("abc\n\ncab", tok, None), cache_key("abc\n\ncab", tok, "\n")}
    assert len(keys) == 4


def test_bpe_cache_is_keyed_by_the_trained_tokenizer(tmp_path):
    text = "the cat sat on the mat\n\n" * 50
    a, b = BPETokenizer.train(text, 270), BPETokenizer.train(text, 290)
    assert cache_key(text, a, None) == cache_key(text, BPETokenizer.train(text, 270), None)
    assert cache_key(text, a, None) != cache_key(text, b, None)
    docs = load_documents(text, a, "\n\n", str(tmp_path), log=lambda *_: None)
    again = load_documents(text, BPETokenizer.train(text, 270), "\n\n", str(tmp_path),
                           log=lambda *_: None)
    np.testing.assert_array_equal(docs.tokens, again.tokens)
    assert a.decode(docs.tokens[docs.bounds[0]:docs.bounds[1]]) == "the cat sat on the mat"


def test_damaged_cache_is_ignored_and_rewritten(tmp_path):
    tok = CountingTokenizer("abc")
    load_documents("abcabc", tok, None, str(tmp_path), log=lambda *_: None)
    (path,) = [tmp_path / f for f in os.listdir(tmp_path)]
    good = path.read_bytes()
    for damage in (good[:len(good) // 2], b"not numpy at all", good[:-4] + b"\x7f\x7f\x7f\x7f"):
        path.write_bytes(damage)
        CountingTokenizer.calls = 0
        docs = load_documents("abcabc", tok, None, str(tmp_path), log=lambda *_: None)
        assert CountingTokenizer.calls == 1                      # encoded again
        assert docs.tokens.tolist() == [3, 0, 1, 2, 0, 1, 2, 4]
        assert path.read_bytes() == good
    assert os.listdir(tmp_path) == [path.name]                   # no temporaries left


def test_unwritable_cache_does_not_fail_the_run(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    msgs = []
    docs = load_documents("abc", CharTokenizer("abc"), None, str(blocker / "cache"),
                          log=msgs.append)
    assert len(docs) == 5 and any("could not write the token cache" in m for m in msgs)


# ------------------------------------------------------------------------------------------
# Bits per character

def test_bits_per_char():
    assert bits_per_char(100 * math.log(2), 100) == pytest.approx(1.0)
    assert math.isnan(bits_per_char(1.0, 0))
    # a uniform guess over 64 symbols costs 6 bits per character for a char model
    texts, tok, docs = lettered_corpus([99])
    n_targets = docs.n_targets                                   # 99 letters + EOS
    assert bits_per_char(math.log(64) * n_targets, docs.n_chars) == pytest.approx(
        6 * 100 / 99)


# ------------------------------------------------------------------------------------------
# Training with BPE and documents (library and command line)

SPEECHES = "".join(f"SPEAKER {i % 7}:\nthe {['cat', 'dog', 'owl'][i % 3]} sat on the mat "
                   f"{'and purred ' * (i % 4)}today.\n\n" for i in range(160))


def tiny_configs(iters=60):
    from randygpt.config import TrainConfig
    m = ModelConfig(block_size=16, n_layer=1, n_embd=32, n_head=2, dropout=0.0)
    t = TrainConfig(iters=iters, batch_size=8, lr=3e-3, warmup=5, eval_interval=30,
                    eval_iters=4, seed=3)
    return m, t


def test_train_with_bpe_documents_reports_bits_per_char_and_uses_the_cache(tmp_path):
    import json
    from randygpt.runs import plan_run
    from randygpt.train import train
    m, t = tiny_configs()
    logs = []
    r = train(plan_run(m, t, text=SPEECHES, out_dir=str(tmp_path / "run"), bpe_vocab_size=300,
                       doc_separator="\n\n", cache_dir=str(tmp_path / "cache"),
                       val_split="tail"),           # the last documents, as counted below
              sample_tokens=30, log=logs.append)
    assert r.tokenizer.kind == "bpe" and r.model.cfg.vocab_size == r.tokenizer.vocab_size
    assert any("encoded" in x and "160 documents" in x for x in logs)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["val_bpc"] < rows[0]["val_bpc"]                       # it learns
    # val bpc = mean val loss per token x predicted tokens / characters / ln 2
    docs = load_documents(SPEECHES, r.tokenizer, "\n\n", log=lambda *_: None)
    val = split_documents(docs, 16, r.tokenizer.decode).val
    assert val.n_docs == 16 and val.n_chars == sum(len(d) for d in SPEECHES.split("\n\n")[-17:])
    assert rows[-1]["val_bpc"] == pytest.approx(
        bits_per_char(rows[-1]["val_loss"] * val.n_targets, val.n_chars), rel=1e-5)
    # several documents now: a byte-level model may still emit a rare byte (any of 256) after
    # 60 steps, but nearly all of what it writes is the corpus's alphabet
    known = sum(c in set(SPEECHES) for c in r.sample)
    assert len(r.sample) >= 20 and known >= 0.95 * len(r.sample), r.sample
    logs.clear()
    again = train(plan_run(m, t, text=SPEECHES, bpe_vocab_size=300, doc_separator="\n\n",
                           cache_dir=str(tmp_path / "cache"), val_split="tail"),
                  sample_tokens=0, log=logs.append)
    assert any("from the cache" in x for x in logs) and not any("encoded" in x for x in logs)
    assert again.history == [dict(h, elapsed_s=a["elapsed_s"], tokens_per_sec=a["tokens_per_sec"])
                             for h, a in zip(r.history, again.history)]


def test_cli_bpe_train_export_and_refusals(tmp_path, capsys):
    import tokenizers
    from randygpt.checkpoint import load_checkpoint
    from randygpt.cli import main
    data = tmp_path / "speeches.txt"
    data.write_text(SPEECHES, encoding="utf-8")
    run = tmp_path / "runs" / "bpe"
    tiny = ["--preset", "tiny", "--layers", "1", "--dim", "16", "--heads", "2", "--block", "16",
            "--batch", "4", "--eval-iters", "2", "--no-progress", "--sample-tokens", "0"]
    assert main(["train", "--data", str(data), "--iters", "4", "--eval-interval", "4",
                 "--bpe", "280", "--doc-separator", r"\n\n", "--out", str(run), *tiny]) == 0
    out = capsys.readouterr().out
    assert "160 documents" in out and "val bpc" in out
    assert len(os.listdir(tmp_path / "runs" / "token-cache")) == 1       # next to the run
    ckpt = load_checkpoint(str(run))
    assert ckpt.tokenizer.kind == "bpe" and ckpt.tokenizer.vocab_size == 280

    exported = tmp_path / "tokenizer.json"
    assert main(["export-tokenizer", str(run / "checkpoint.safetensors"), str(exported)]) == 0
    hf = tokenizers.Tokenizer.from_file(str(exported))
    assert hf.encode(SPEECHES[:200]).ids == ckpt.tokenizer.encode(SPEECHES[:200]).tolist()
    assert main(["export-tokenizer", str(run), str(exported)]) == 2       # never overwrites
    assert "already exists" in capsys.readouterr().err

    for flag in (["--fine-tune", str(run)], ["--resume", str(run / "checkpoint.safetensors")]):
        assert main(["train", "--data", str(data), "--bpe", *flag, *tiny]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "drop --bpe" in err


def test_random_split_takes_whole_documents_seeded_and_unlike_the_tail():
    # a file sorted by document length: its tail is all long documents
    lengths = np.sort(np.random.default_rng(0).integers(1, 30, size=2000))
    texts, tok, docs = lettered_corpus(lengths)
    tail = split_documents(docs, 8, tok.decode)
    split = split_documents(docs, 8, tok.decode, shuffle=True, seed=1)
    again = split_documents(docs, 8, tok.decode, shuffle=True, seed=1)
    other = split_documents(docs, 8, tok.decode, shuffle=True, seed=2)
    np.testing.assert_array_equal(split.val.tokens, again.val.tokens)
    assert not np.array_equal(split.val.tokens, other.val.tokens)
    for part in (split.train, split.val):              # whole documents only: BOS ... EOS
        assert (part.tokens[part.bounds[:-1]] == tok.bos_id).all()
        assert (part.tokens[part.bounds[1:] - 1] == tok.eos_id).all()
    assert split.train.n_docs + split.val.n_docs == docs.n_docs
    assert len(split.train) + len(split.val) == len(docs)
    assert split.train.n_chars + split.val.n_chars == docs.n_chars
    assert 0.09 < len(split.val) / len(docs) < 0.11
    mean = lengths.mean()
    val_mean = np.diff(split.val.bounds).mean() - 2
    tail_mean = np.diff(tail.val.bounds).mean() - 2
    assert abs(val_mean - mean) < 1.5 and tail_mean > mean + 8


def test_random_split_of_a_few_long_documents_falls_back_to_the_tail():
    texts, tok, docs = lettered_corpus([500, 40])
    split = split_documents(docs, 8, tok.decode, shuffle=True, seed=0)
    tail = split_documents(docs, 8, tok.decode)
    np.testing.assert_array_equal(split.val.tokens, tail.val.tokens)
