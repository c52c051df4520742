"""Tokenizers: exact round trips (char and byte-level BPE), checkpoint dicts, tokenizer.json."""
import json
import os
import subprocess
import sys
from functools import lru_cache

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from randygpt.errors import UserError
from randygpt.tokenizer import (BOS_TOKEN, EOS_TOKEN, BPETokenizer, CharTokenizer,
                                _safe_chunks, export_tokenizer_json, tokenizer_from_dict)

SHAKESPEARE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                           "tinyshakespeare.txt")
TRAIN_TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
              "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die "
              "than to famish?\n\n") * 20


@lru_cache(maxsize=None)
def small_bpe(vocab_size=300) -> BPETokenizer:
    return BPETokenizer.train(TRAIN_TEXT, vocab_size)


# ------------------------------------------------------------------------------------------
# Char

def test_char_round_trip_and_specials():
    tok = CharTokenizer.from_text("hello world")
    ids = tok.encode("hold he world")
    assert ids.dtype == np.int32 and tok.decode(ids) == "hold he world"
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (8, 9, 10)     # 8 distinct characters
    assert tok.decode([tok.bos_id, *ids.tolist(), tok.eos_id]) == "hold he world"
    with pytest.raises(UserError, match="1 character"):
        tok.encode("hello?")


@given(st.text(alphabet="ab \n\u00e9\u65e5\U0001f600", max_size=200))
def test_char_round_trip_property(s):
    tok = CharTokenizer.from_text("ab \n\u00e9\u65e5\U0001f600")
    assert tok.decode(tok.encode(s)) == s


# ------------------------------------------------------------------------------------------
# BPE

def test_bpe_vocabulary_has_bytes_bos_eos_and_merges():
    tok = small_bpe()
    assert tok.kind == "bpe" and tok.vocab_size == 300
    assert {tok.bos_id, tok.eos_id} == {0, 1}
    ids = tok.encode(TRAIN_TEXT)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert tok.bos_id not in ids and tok.eos_id not in ids
    # merges compress: the trained text takes far fewer tokens than it has bytes
    assert len(ids) < 0.5 * len(TRAIN_TEXT.encode("utf-8"))
    assert tok.decode(ids) == TRAIN_TEXT


@settings(max_examples=300, deadline=None)
@given(st.text())          # any Unicode (hypothesis excludes lone surrogates, not valid text)
def test_bpe_round_trip_property_any_unicode(s):
    # the tokenizer saw only ASCII English: every other character goes through its bytes
    tok = small_bpe()
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    assert ((ids >= 0) & (ids < tok.vocab_size)).all()


@pytest.mark.parametrize("s", ["", "\x00", "日本語のテキスト 😀🚀", "a\r\nb\tc\u200b\ufeff",
                               "   leading and trailing   ", "e\u0301 vs \u00e9"])
def test_bpe_round_trips_unseen_characters(s):
    tok = small_bpe()
    assert tok.decode(tok.encode(s)) == s


def test_special_token_text_is_ordinary_text():
    tok = small_bpe()
    s = f"a {BOS_TOKEN} b {EOS_TOKEN} c"
    ids = tok.encode(s)
    assert tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.decode(ids) == s
    # only ids we put there are specials, and decode drops them (they have no text)
    assert tok.decode([tok.bos_id, *ids.tolist(), tok.eos_id]) == s


def test_bpe_to_dict_is_json_and_rebuilds_the_same_tokenizer():
    tok = small_bpe()
    d = json.loads(json.dumps(tok.to_dict()))
    again = tokenizer_from_dict(d)
    assert isinstance(again, BPETokenizer)
    assert (again.vocab_size, again.bos_id, again.eos_id) == (tok.vocab_size, tok.bos_id,
                                                              tok.eos_id)
    s = TRAIN_TEXT[:500] + f" {EOS_TOKEN} é😀"
    np.testing.assert_array_equal(again.encode(s), tok.encode(s))
    assert again.to_dict() == tok.to_dict()


def test_bpe_training_is_deterministic_and_documents_bound_merges():
    # the token cache relies on the same text giving the same tokenizer in a new run
    assert BPETokenizer.train(TRAIN_TEXT, 300).to_dict() == small_bpe().to_dict()
    # merges never join two documents: "ab" only ever occurs across a document edge
    tok = BPETokenizer.train(["xa", "bx"] * 50, 300)
    assert len(tok.encode("ab")) == 2 and len(tok.encode("xa")) == 1


def test_bpe_errors_are_user_errors():
    with pytest.raises(UserError, match="at least 258"):
        BPETokenizer.train(TRAIN_TEXT, 100)
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        tokenizer_from_dict({"kind": "bpe", "tokenizer_json": "{not json"})
    with pytest.raises(UserError, match="no tokenizer_json"):
        tokenizer_from_dict({"kind": "bpe"})
    with pytest.raises(UserError, match="unknown tokenizer kind"):
        tokenizer_from_dict({"kind": "wordpiece"})
    with pytest.raises(UserError, match="surrogate"):
        small_bpe().encode("a\ud800b")


# ------------------------------------------------------------------------------------------
# Chunked encoding equals one encode call

CHUNK_ALPHABET = "ab .,'\n\t\u00e9\u3000\x1c"


@lru_cache(maxsize=None)
def whitespace_bpe() -> BPETokenizer:
    """Trained on random text over CHUNK_ALPHABET, so it has merges of whitespace runs
    (" \n", "\n\n\n", ...): a cut that changed pre-tokens would change its ids."""
    rng = np.random.default_rng(0)
    weights = np.array([3, 3, 4, 1, 1, 1, 4, 1, 1, 1, 1], dtype=float)   # a b space . , ' \n ...
    text = "".join(rng.choice(list(CHUNK_ALPHABET), size=30000, p=weights / weights.sum()))
    return BPETokenizer.train(text, 600)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=CHUNK_ALPHABET, max_size=300), st.integers(1, 20))
def test_safe_chunks_give_the_same_ids_as_one_call(s, size):
    tok = whitespace_bpe()
    pieces = _safe_chunks(s, size)
    assert "".join(pieces) == s
    whole = tok._tok.encode(s, add_special_tokens=False).ids
    parts = [i for p in pieces for i in tok._tok.encode(p, add_special_tokens=False).ids]
    assert parts == whole


@pytest.mark.skipif(not os.path.exists(SHAKESPEARE), reason="needs shared/data/tinyshakespeare.txt")
def test_shakespeare_chunked_encode_equals_one_call():
    text = open(SHAKESPEARE, encoding="utf-8").read()
    tok = BPETokenizer.train(text, 512)
    ids = tok.encode(text)
    np.testing.assert_array_equal(ids, tok._tok.encode(text, add_special_tokens=False).ids)
    assert tok.decode(ids) == text
    assert 1.8 < len(text) / len(ids) < 2.2        # measured 1.94 chars per token at 512


# ------------------------------------------------------------------------------------------
# tokenizer.json export

def test_export_bpe_loads_in_tokenizers_with_the_same_ids(tmp_path):
    import tokenizers
    tok = small_bpe()
    path = tmp_path / "tokenizer.json"
    export_tokenizer_json(tok, str(path))
    hf = tokenizers.Tokenizer.from_file(str(path))
    s = TRAIN_TEXT[:300] + " naïve 😀"
    assert hf.encode(s).ids == tok.encode(s).tolist()
    assert hf.decode(hf.encode(s).ids) == s
    assert hf.token_to_id(BOS_TOKEN) == tok.bos_id and hf.token_to_id(EOS_TOKEN) == tok.eos_id
    assert [p for p in os.listdir(tmp_path)] == ["tokenizer.json"]       # no temporary left


def test_export_char_builds_an_equivalent_tokenizers_model(tmp_path):
    import tokenizers
    alphabet = "First Citizen:\nBefore we é日😀"
    tok = CharTokenizer.from_text(alphabet)
    path = tmp_path / "char.json"
    export_tokenizer_json(tok, str(path))
    hf = tokenizers.Tokenizer.from_file(str(path))
    s = "Citizen é日😀\nBefore"
    assert hf.encode(s).ids == tok.encode(s).tolist()
    assert hf.decode(hf.encode(s).ids) == s
    assert hf.token_to_id(BOS_TOKEN) == tok.bos_id and hf.token_to_id(EOS_TOKEN) == tok.eos_id
    assert hf.get_vocab_size() == tok.vocab_size
    with pytest.raises(Exception):         # an unknown character is an error there too
        hf.encode("q")


def test_export_into_a_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        export_tokenizer_json(small_bpe(), str(tmp_path / "nope" / "t.json"))


def test_tokenizers_is_imported_only_for_bpe():
    code = ("import sys, randygpt.tokenizer as t, randygpt.data, randygpt.train\n"
            "t.tokenizer_from_dict({'kind': 'char', 'chars': 'abc'}).encode('cab')\n"
            "assert 'tokenizers' not in sys.modules, 'imported too early'\n"
            "t.BPETokenizer.train('abc abc', 300)\n"
            "assert 'tokenizers' in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_bpe_training_cuts_only_long_runs_without_spaces():
    pytest.importorskip("tokenizers")
    from randygpt.tokenizer import MAX_TRAIN_WORD, BPETokenizer, _training_pieces
    spaced = "the quick brown fox jumps over the lazy dog. " * 50
    assert _training_pieces(spaced, MAX_TRAIN_WORD) == [spaced]      # trains exactly as before
    assert (BPETokenizer.train(spaced, 300).to_dict()
            == BPETokenizer.train(spaced, 300, max_word=None).to_dict())
    run = "abcdefghij" * 100                                          # 1000 letters, no space
    pieces = _training_pieces("x y " + run + " z", 256)
    assert "".join(pieces) == "x y " + run + " z"
    assert max(len(p) for p in pieces) <= 256 and len(pieces) == 6
    tok = BPETokenizer.train(run * 30, 300)                           # fast, and still lossless
    assert tok.decode(tok.encode(run * 3)) == run * 3
