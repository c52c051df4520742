"""Tokenizers. Every tokenizer has the same small interface:

    encode(text) -> np.ndarray[int32]     decode(ids) -> str
    vocab_size, bos_id, eos_id, kind      to_dict() / tokenizer_from_dict(d)  (for checkpoints)

CharTokenizer: one id per character of the training text. BPETokenizer: byte-level BPE
trained with the Hugging Face `tokenizers` library; every Unicode string round-trips, since
any character is a sequence of UTF-8 bytes and all 256 bytes are in the vocabulary.
GPT2Tokenizer: GPT-2's own byte-level BPE, read from a Hugging Face GPT-2 directory
(randygpt/hf.py), whose one special token <|endoftext|> is both BOS and EOS.
`tokenizers` is imported only when a BPE tokenizer is built or loaded, so commands that use
a char checkpoint start fast.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from .errors import UserError

MAX_CHAR_VOCAB = 512
BOS_TOKEN, EOS_TOKEN = "<|bos|>", "<|eos|>"
GPT2_EOT = "<|endoftext|>"       # GPT-2's document separator: its BOS and its EOS
DEFAULT_BPE_VOCAB = 1024
MIN_BPE_VOCAB = 256 + 2          # every byte, plus BOS and EOS
MAX_TRAIN_WORD = 256             # BPE training cuts runs of non-space characters longer than this
ENCODE_CHUNK_CHARS = 1 << 14     # BPE encodes a long text in pieces of about this many chars


class CharTokenizer:
    """One id per distinct character of the training text (sorted), then BOS and EOS."""

    kind = "char"

    def __init__(self, chars: str):
        self.chars = "".join(sorted(set(chars)))
        if len(self.chars) + 2 > MAX_CHAR_VOCAB:
            raise UserError(
                f"the text has {len(self.chars)} distinct characters; the char tokenizer takes at "
                f"most {MAX_CHAR_VOCAB - 2}: use a BPE tokenizer ({{field}}) for this text", "bpe")
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.bos_id = len(self.chars)
        self.eos_id = len(self.chars) + 1
        # a lookup table over code points makes encoding a vectorised gather, not a dict loop
        self._table = np.full(max(map(ord, self.chars), default=0) + 1, -1, dtype=np.int32)
        for c, i in self.stoi.items():
            self._table[ord(c)] = i

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(text)

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 2

    def unknown_chars(self, text: str) -> list[str]:
        return sorted(set(text) - set(self.chars))

    def encode(self, text: str, progress=None) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        inside = codes < len(self._table)
        ids = np.full(codes.shape, -1, dtype=np.int32)
        ids[inside] = self._table[codes[inside]]
        if (ids < 0).any():
            unknown = self.unknown_chars(text)
            shown = ", ".join(repr(c) for c in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
            raise UserError(f"the text has {len(unknown)} character(s) the tokenizer does not "
                            f"know: {shown}; remove them or train a tokenizer that covers them")
        if progress is not None:
            progress(len(text))
        return ids

    def decode(self, ids) -> str:
        n = len(self.chars)
        return "".join(self.chars[i] for i in np.asarray(ids).tolist() if 0 <= i < n)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}

    def to_hf_json(self) -> str:
        """The same mapping as a `tokenizers` tokenizer.json: each character is a word of a
        WordLevel model (split by a one-character regex), BOS/EOS are special tokens, and the
        decoder fuses tokens without spaces. Unknown characters are an error there too."""
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
        tok = Tokenizer(models.WordLevel(dict(self.stoi), unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
        tok.add_special_tokens([BOS_TOKEN, EOS_TOKEN])        # ids len(chars), len(chars) + 1
        return tok.to_str()


class BPETokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenization, no normalisation) from `tokenizers`.

    The ids come from a `tokenizers.Tokenizer`; BOS and EOS are its special tokens, and the
    text "<|eos|>" inside a document is encoded as ordinary bytes, never as the EOS id.
    """

    kind = "bpe"
    bos_token, eos_token = BOS_TOKEN, EOS_TOKEN

    def __init__(self, hf_json: str):
        tokenizers = _import_tokenizers()
        try:
            self._tok = tokenizers.Tokenizer.from_str(hf_json)
        except Exception as e:                      # the library raises plain Exceptions
            raise UserError(f"the stored BPE tokenizer is not a valid tokenizer.json ({e}); "
                            "the checkpoint is damaged: train or export it again") from None
        # special tokens in the *text* are plain text: only we put BOS/EOS ids in the stream
        self._tok.encode_special_tokens = True
        self.hf_json = hf_json
        self.bos_id = self._tok.token_to_id(self.bos_token)
        self.eos_id = self._tok.token_to_id(self.eos_token)
        if self.bos_id is None or self.eos_id is None:
            if self.kind == "gpt2":
                raise UserError(f"the tokenizer has no {GPT2_EOT} token: it is not GPT-2's "
                                "tokenizer; use the tokenizer files that came with the model")
            raise UserError(f"the stored BPE tokenizer has no {BOS_TOKEN} / {EOS_TOKEN} tokens; "
                            "it was not made by randyGPT: train a new one with {field}", "bpe")

    @classmethod
    def train(cls, texts, vocab_size: int = DEFAULT_BPE_VOCAB,
              max_word: int | None = MAX_TRAIN_WORD) -> "BPETokenizer":
        """Learn merges from `texts` (a string or a list of documents; merges never span
        two of them) up to vocab_size ids: 256 bytes + BOS + EOS + merges. Runs of more than
        `max_word` characters without whitespace (text without spaces: the pre-tokenizer
        would make it one huge word, and the trainer is slow on those) are learnt from in
        pieces of max_word characters; text without such runs trains exactly as before."""
        if vocab_size < MIN_BPE_VOCAB:
            raise UserError(f"{{field}} {vocab_size} is too small: a byte-level vocabulary needs "
                            f"at least {MIN_BPE_VOCAB} ids (256 bytes + BOS + EOS)", "bpe")
        tk = _import_tokenizers()
        tok = tk.Tokenizer(tk.models.BPE())
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[BOS_TOKEN, EOS_TOKEN], show_progress=False,
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())   # all 256 bytes: no unknowns
        texts = [texts] if isinstance(texts, str) else texts
        if max_word is not None:
            texts = [piece for t in texts for piece in _training_pieces(t, max_word)]
        tok.train_from_iterator(texts, trainer)
        return cls(tok.to_str())

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, progress=None) -> np.ndarray:
        """Ids of `text`. A long text is cut into pieces at points where the pre-tokenizer
        splits anyway (see _safe_chunks), so the ids equal those of one encode call, but it
        runs faster and `progress(n_chars)` can report as it goes."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise UserError(f"the text has a lone surrogate {text[e.start]!r} at {e.start}: "
                            "it is not valid Unicode; fix the text's encoding") from None
        # encode_batch_fast (tokenizers >= 0.20) skips computing offsets we never use
        encode_batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        parts = []
        for chunk in _safe_chunks(text, ENCODE_CHUNK_CHARS * 16):
            pieces = _safe_chunks(chunk, ENCODE_CHUNK_CHARS)
            parts.extend(np.asarray(e.ids, dtype=np.int32)
                         for e in encode_batch(pieces, add_special_tokens=False))
            if progress is not None:
                progress(len(chunk))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)

    def decode(self, ids) -> str:
        """Text of `ids`; BOS/EOS have no text. A slice that cuts a multi-byte character
        decodes that character as U+FFFD."""
        return self._tok.decode(np.asarray(ids, dtype=np.int64).tolist(), skip_special_tokens=True)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "tokenizer_json": self.hf_json}

    def to_hf_json(self) -> str:
        return self.hf_json


class GPT2Tokenizer(BPETokenizer):
    """GPT-2's byte-level BPE (50257 ids for OpenAI's GPT-2), the same machinery as
    BPETokenizer; <|endoftext|> opens and closes every document, as GPT-2 was trained."""

    kind = "gpt2"
    bos_token = eos_token = GPT2_EOT

    @classmethod
    def from_vocab_and_merges(cls, vocab_path: str, merges_path: str) -> "GPT2Tokenizer":
        """From a GPT-2 vocab.json and merges.txt: GPT-2's pre-tokenizer (its regex, no
        prefix space) and byte-level decoder, <|endoftext|> a special token."""
        tk = _import_tokenizers()
        try:
            vocab, merges = tk.models.BPE.read_file(vocab_path, merges_path)
        except Exception as e:                  # the library raises plain Exceptions
            raise UserError(f"cannot read {vocab_path} and {merges_path} as a GPT-2 vocabulary "
                            f"({e}); the download may be incomplete: fetch them again") from None
        tok = tk.Tokenizer(tk.models.BPE(vocab, merges))
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = tk.decoders.ByteLevel()
        tok.add_special_tokens([GPT2_EOT])     # already in GPT-2's vocabulary: its id stays
        return cls(tok.to_str())


def tokenizer_from_dict(d: dict):
    kind = d.get("kind") if isinstance(d, dict) else None
    if kind == "char":
        return CharTokenizer(d["chars"])
    if kind in ("bpe", "gpt2"):
        if not isinstance(d.get("tokenizer_json"), str):
            raise UserError(f"the stored {kind} tokenizer has no tokenizer_json; the checkpoint "
                            "is damaged: train (or import) it again")
        return (BPETokenizer if kind == "bpe" else GPT2Tokenizer)(d["tokenizer_json"])
    raise UserError(f"unknown tokenizer kind {kind!r}")


def export_tokenizer_json(tokenizer, path: str) -> None:
    """Write `tokenizer` as a standard tokenizer.json (loadable by tokenizers.Tokenizer.from_file),
    atomically: a temporary file in the same folder, then a rename."""
    text = json.dumps(json.loads(tokenizer.to_hf_json()), ensure_ascii=False, indent=2)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"cannot write {path!r}: folder {folder!r} does not exist")
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"cannot write {path!r}: {e.strerror}") from None


# The GPT-2 pre-tokenizer regex never puts "\n" together with a following non-space character,
# nor with a preceding one: after "X\n" (X printable ASCII, not space) followed by printable
# ASCII, a new pre-token starts whatever the left context, and the "\n" is a pre-token alone
# whether or not the text ends right after it. ASCII only, so Unicode whitespace tables of
# Python and Rust cannot disagree. tests/test_tokenizer.py checks the ids are unchanged.
_SAFE_CUT = re.compile(r"(?<=[!-~]\n)(?=[!-~])")


def _safe_chunks(text: str, size: int) -> list[str]:
    """`text` in consecutive pieces of about `size` characters, cut only at safe points."""
    pieces, i = [], 0
    while i < len(text):
        j = i + size
        if j < len(text):
            cut = _SAFE_CUT.search(text, j)
            j = cut.start() if cut else len(text)
        pieces.append(text[i:j])
        i = j
    return pieces


def _training_pieces(text: str, max_word: int) -> list[str]:
    """`text` with every run of over max_word non-space characters cut into max_word pieces
    (the pieces are separate training texts, so no merge spans a cut)."""
    long_runs = list(re.finditer(r"\S{%d,}" % (max_word + 1), text))
    if not long_runs:
        return [text]
    pieces, at = [], 0
    for m in long_runs:
        pieces.append(text[at:m.start()])
        pieces.extend(text[i:min(i + max_word, m.end())]
                      for i in range(m.start(), m.end(), max_word))
        at = m.end()
    pieces.append(text[at:])
    return [p for p in pieces if p]


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise UserError("BPE needs the 'tokenizers' package: pip install 'tokenizers>=0.15'") \
            from None
    return tokenizers
