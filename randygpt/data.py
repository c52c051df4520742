"""Reading the training text, documents, the token cache, the train/validation split, batches.

The corpus is a list of documents, each framed as BOS doc EOS and stored back to back in one
int32 stream with an offsets array. A training window never spans two documents:

- a document of at least block_size+1 tokens gives windows starting anywhere inside it that
  end inside it;
- a shorter document gives one window: the whole document, then padding whose targets are
  IGNORE (the loss skips them) and whose inputs repeat the last token. Attention is causal,
  so padding after a document cannot change the predictions inside it.

Every predicted token weighs the same (in expectation). A piece of n targets has n+T-1
windows, one per offset s in [-(T-1), n-1]; window s counts the targets [max(s,0), min(s+T,n)),
so every target lies in exactly T windows whatever its piece's length. A batch row draws one
window uniformly among all windows of all pieces (a piece in proportion to n+T-1). The row
holds the T tokens that end at the window's last target (or the piece from its start), so a
counted target sees all the context the block allows; targets outside the window are IGNORE.
(Drawing a short document in proportion to its length and counting all of its tokens would
weigh each token by its document's length: the logged loss and the choice of the best
checkpoint lean to long documents, and generated documents come out too long.)
Without a separator the whole text is one piece, drawn as plain uniform windows of T targets
(nanoGPT's; the first and last T tokens of a long text weigh a little less).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import sys
import time
from dataclasses import dataclass, field
from importlib import resources

import numpy as np

from .errors import UserError

VAL_FRACTION = 0.1
MAX_TEXT_BYTES = 4 << 30   # the text, its tokens and their batches must fit in memory
IGNORE = -1          # target id of padding: contributes nothing to the loss or the gradient
CACHE_FORMAT = "randygpt-tokens-v1"


def builtin_sample_text() -> str:
    """A few KB of text written for this project, used when there is no train.txt."""
    return resources.files("randygpt").joinpath("sample_text.txt").read_text(encoding="utf-8")


def read_text(path: str) -> str:
    """Read a UTF-8 text file, or raise a UserError that says what is wrong with it."""
    if not os.path.exists(path):
        raise UserError(f"data file {path!r} does not exist; pass {{field}} PATH to a UTF-8 "
                        "text file", "data")
    if os.path.isdir(path):
        raise UserError(f"data path {path!r} is a directory; pass {{field}} PATH to a text file",
                        "data")
    if not stat.S_ISREG(os.stat(path).st_mode):     # /dev/zero, a FIFO: no end, or no size
        raise UserError(f"data path {path!r} is not a regular file (a device, pipe or socket); "
                        "save the text to a file and pass {field} PATH", "data")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_TEXT_BYTES + 1)
    except OSError as e:
        raise UserError(f"data file {path!r} cannot be read: {e.strerror}") from None
    if len(raw) > MAX_TEXT_BYTES:
        raise UserError(f"data file {path!r} is over {MAX_TEXT_BYTES >> 30} GiB, more than "
                        "randyGPT holds in memory; train on a part of it", "data")
    if not raw:
        raise UserError(f"data file {path!r} is empty; give it some text to learn from")
    if not raw.strip():
        raise UserError(f"data file {path!r} holds only whitespace ({len(raw):,} bytes); "
                        "give it some text to learn from")
    if b"\x00" in raw:                            # anywhere: a NUL deep inside is binary too
        raise UserError(f"data file {path!r} looks binary (it has NUL bytes); "
                        "randyGPT trains on UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"data file {path!r} is not valid UTF-8 (bad byte at offset {e.start}); "
                        "convert it to UTF-8 first") from None


def bits_per_char(total_loss_nats: float, n_chars: int) -> float:
    """Bits per character: the total loss (nats, summed over every predicted token, EOS
    included) over the text, divided by its characters (BOS/EOS have none) and by ln 2.
    Comparable between tokenizers, unlike loss per token."""
    if n_chars <= 0:
        return float("nan")
    return total_loss_nats / n_chars / math.log(2)


# --------------------------------------------------------------------------------------------
# Documents

def split_text(text: str, separator: str | None) -> list[str]:
    """The documents of `text`: the pieces between separators, empty ones dropped."""
    if separator is None:
        return [text]
    if not separator:
        raise UserError("{field} is empty; give the string between documents, "
                        r"e.g. '\n\n' for a blank line", "doc_separator")
    docs = [d for d in text.split(separator) if d]
    if not docs:
        raise UserError(f"the text holds nothing but the separator {separator!r}")
    return docs


@dataclass
class Documents:
    """Framed documents back to back: piece d is tokens[bounds[d]:bounds[d+1]].

    A piece is a whole document (BOS ... EOS) or, where the train/val split cuts one, a part.
    chars[d] is the number of text characters piece d stands for.
    """
    tokens: np.ndarray          # (N,) int32
    bounds: np.ndarray          # (D+1,) int64, bounds[0] == 0, bounds[-1] == N
    chars: np.ndarray           # (D,) int64
    _index: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def n_docs(self) -> int:
        return len(self.bounds) - 1

    @property
    def n_chars(self) -> int:
        return int(self.chars.sum())

    @property
    def n_targets(self) -> int:
        """Tokens that are predicted: all but the first of each piece."""
        return int(np.maximum(np.diff(self.bounds) - 1, 0).sum())

    def windows(self, block_size: int):
        """Per piece: the cdf of window counts (n_targets + T - 1; 0 for a piece without
        targets) and the count of plain window starts (one piece: uniform T-target windows)."""
        if block_size not in self._index:
            lengths = np.diff(self.bounds)
            targets = np.maximum(lengths - 1, 0)
            n_windows = np.where(targets > 0, targets + block_size - 1, 0).astype(np.float64)
            n_starts = np.maximum(lengths - block_size, 1)
            self._index[block_size] = (np.cumsum(n_windows), n_starts)
        return self._index[block_size]


def frame(pieces: list[np.ndarray], texts: list[str], bos_id: int, eos_id: int) -> Documents:
    """Documents from the ids of each document: BOS ids EOS, back to back."""
    lengths = np.array([len(p) + 2 for p in pieces], dtype=np.int64)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    tokens = np.empty(bounds[-1], dtype=np.int32)
    for a, ids in zip(bounds[:-1], pieces):
        tokens[a] = bos_id
        tokens[a + 1:a + 1 + len(ids)] = ids
        tokens[a + 1 + len(ids)] = eos_id
    return Documents(tokens, bounds, np.array([len(t) for t in texts], dtype=np.int64))


def encode_documents(texts: list[str], tokenizer, progress: bool | None = None) -> Documents:
    """Encode each document (with a progress bar on a terminal for texts over 1 MB)."""
    total = sum(len(t) for t in texts)
    bar = _progress_bar(total, progress if progress is not None else
                        (sys.stderr.isatty() and total > 1 << 20))
    step = bar.update if bar is not None else None
    try:
        pieces = [tokenizer.encode(t, progress=step) for t in texts]
    finally:
        if bar is not None:
            bar.close()
    return frame(pieces, texts, tokenizer.bos_id, tokenizer.eos_id)


def cache_key(text: str, tokenizer, separator: str | None) -> str:
    """A hash of everything the token stream depends on: text, tokenizer, separator."""
    h = hashlib.sha256()
    for part in (CACHE_FORMAT, json.dumps(tokenizer.to_dict(), sort_keys=True),
                 json.dumps(separator), text):
        data = part.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:24]


def load_documents(text: str, tokenizer, separator: str | None = None,
                   cache_dir: str | None = None, progress: bool | None = None,
                   log=print, check=None) -> Documents:
    """The text as framed documents, from the token cache in cache_dir when it has them.

    The cache file is tokens-<hash>.npy with the hash of (text, tokenizer, separator), so a
    changed text or tokenizer is a different file; a file that does not fit (damaged, cut
    short) is ignored and written again. Writes go to a temporary file, then a rename.
    `check(docs)` runs before the cache is written: a run it refuses leaves no cache file.
    """
    texts = split_text(text, separator)
    if separator is not None and len(texts) == 1:
        log(f"note: the separator {separator!r} does not occur in the text: one document")
    path = None
    if cache_dir is not None:
        path = os.path.join(cache_dir, f"tokens-{cache_key(text, tokenizer, separator)}.npy")
        docs = _read_cache(path, texts, tokenizer)
        if docs is not None:
            log(f"tokens: {len(docs):,} from the cache {path}")
            if check is not None:
                check(docs)
            return docs
    t0 = time.perf_counter()
    docs = encode_documents(texts, tokenizer, progress)
    n_docs = f" in {docs.n_docs:,} documents" if docs.n_docs > 1 else ""
    log(f"tokens: encoded {len(text):,} characters to {len(docs):,} {tokenizer.kind} tokens"
        f"{n_docs} in {time.perf_counter() - t0:.2f} s")
    if check is not None:
        check(docs)
    if path is not None:
        _write_cache(path, docs.tokens, log)
    return docs


def _read_cache(path: str, texts: list[str], tokenizer) -> Documents | None:
    if not os.path.exists(path):
        return None
    try:
        tokens = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if tokens.ndim != 1 or tokens.dtype != np.int32 or len(tokens) < 2:
        return None
    starts = np.flatnonzero(tokens == tokenizer.bos_id)
    ends = np.flatnonzero(tokens == tokenizer.eos_id)
    if tokenizer.bos_id == tokenizer.eos_id:    # GPT-2: <|endoftext|> opens and closes
        starts, ends = starts[0::2], starts[1::2]
    # encode never emits BOS/EOS, so they mark exactly the documents' edges
    if (len(starts) != len(texts) or len(ends) != len(texts) or starts[0] != 0
            or not np.array_equal(starts[1:], ends[:-1] + 1) or ends[-1] != len(tokens) - 1
            or tokens.min() < 0 or tokens.max() >= tokenizer.vocab_size):
        return None
    bounds = np.concatenate([starts, [len(tokens)]]).astype(np.int64)
    return Documents(tokens, bounds, np.array([len(t) for t in texts], dtype=np.int64))


def _write_cache(path: str, tokens: np.ndarray, log) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "wb") as f:
            np.save(f, tokens)
        os.replace(tmp, path)
    except OSError as e:            # a cache is an optimisation: never fail the run over it
        if os.path.exists(tmp):
            os.remove(tmp)
        log(f"note: could not write the token cache {path} ({e.strerror}); continuing")


# --------------------------------------------------------------------------------------------
# The train/validation split

@dataclass
class Split:
    train: np.ndarray | Documents   # token ids (int32), or framed documents
    val: np.ndarray | Documents


def split_documents(docs: Documents, block_size: int, decode=None,
                    source: str = "the text", shuffle: bool = False, seed: int = 0) -> Split:
    """`shuffle`: a seeded random 10 % of the documents (by tokens) for validation (see
    random_split); otherwise, or when that cannot be done, the tail split:

    About the last 10 % of tokens for validation, as whole documents where a document
    boundary lies near the 90 % mark (validation between half and twice its 10 % share);
    otherwise (one document, or a few long ones) cut at the mark, the cut document giving
    its head to training and its tail to validation. Either way windows stay inside a piece.
    `decode` counts the characters of a cut document's head (else estimated from tokens)."""
    n = len(docs)
    n_val = int(n * VAL_FRACTION)
    if shuffle and docs.n_docs > 1:
        split = random_split(docs, seed)
        if split is not None:
            _check_long_enough(n, len(split.val), block_size, source)
            return split
    mark = n - n_val
    inner = docs.bounds[1:-1]
    ok = inner[(n - inner >= n_val / 2) & (n - inner <= 2 * n_val)]
    cut = int(ok[np.argmin(np.abs(ok - mark))]) if len(ok) else mark
    k, a, b = _piece_at(docs.bounds, cut)
    if cut in (a + 1, b - 1):       # no piece of a single token: it would predict nothing
        cut = a if cut == a + 1 else b
    _check_long_enough(n, n - cut, block_size, source)
    k, a, b = _piece_at(docs.bounds, cut)
    head_chars = 0
    if cut > a:         # the cut is inside piece k: split its characters between the sides
        if decode is not None:
            head_chars = min(len(decode(docs.tokens[a:cut])), int(docs.chars[k]))
        else:
            head_chars = round(int(docs.chars[k]) * (cut - a) / (b - a))
    train = Documents(docs.tokens[:cut], np.append(docs.bounds[:k + 1], cut) if cut > a
                      else docs.bounds[:k + 1].copy(),
                      np.append(docs.chars[:k], head_chars) if cut > a else docs.chars[:k].copy())
    val_chars = docs.chars[k:].copy()
    val_chars[0] -= head_chars
    val = Documents(docs.tokens[cut:], np.append(cut, docs.bounds[k + 1:]) - cut, val_chars)
    return Split(train, val)


def random_split(docs: Documents, seed: int) -> Split | None:
    """Whole documents in a seeded random order go to validation until it holds 10 % of the
    tokens (a document that would take it past twice that is skipped); each side keeps the
    file's order. A file sorted by anything (names by frequency, papers by date) would
    otherwise validate on its last, different 10 %. None when no such set exists (a few
    long documents): the caller cuts at the tail instead."""
    lengths = np.diff(docs.bounds)
    n_val = int(len(docs) * VAL_FRACTION)
    order = np.random.default_rng([seed, 0x5B1D]).permutation(docs.n_docs)
    fits = np.cumsum(lengths[order])
    k = int(np.searchsorted(fits, n_val))          # the first k+1 reach n_val
    chosen = order[:k + 1]
    if fits[min(k, len(fits) - 1)] > 2 * n_val:   # a long document overshoots: skip the big
        small = order[lengths[order] <= n_val]
        fits = np.cumsum(lengths[small])
        k = int(np.searchsorted(fits, n_val))
        if k >= len(small):
            return None
        chosen = small[:k + 1]
    is_val = np.zeros(docs.n_docs, dtype=bool)
    is_val[chosen] = True
    if is_val.all():
        return None
    token_is_val = np.repeat(is_val, lengths)

    def part(mask_docs, mask_tokens):
        return Documents(docs.tokens[mask_tokens],
                         np.concatenate([[0], np.cumsum(lengths[mask_docs])]).astype(np.int64),
                         docs.chars[mask_docs].copy())
    return Split(part(~is_val, ~token_is_val), part(is_val, token_is_val))


def _piece_at(bounds: np.ndarray, i: int) -> tuple[int, int, int]:
    """(k, start, end) of the piece that holds token i."""
    k = int(np.searchsorted(bounds, i, side="right")) - 1
    return k, int(bounds[k]), int(bounds[k + 1])


def _check_long_enough(n: int, n_val: int, block_size: int, source: str) -> None:
    need = block_size + 1
    if n_val < need or n - n_val < need:
        raise UserError(
            f"{source} is too short: {n} tokens gives a validation split of {n_val}, "
            f"but a window needs block_size+1 = {need}; use more text (at least "
            f"{need * 10} tokens) or a smaller {{field}}", "block_size")


# --------------------------------------------------------------------------------------------
# Batches

def get_batch(data, batch_size: int, block_size: int, rng):
    """Random windows of block_size+1 tokens: inputs x (B, T) and next-token targets y (B, T).

    `data` is one token stream (int array) or Documents. With Documents no window crosses a
    piece; a piece shorter than a window is padded (targets IGNORE), and when every row of a
    batch is padded the batch is trimmed to its longest row (T smaller than block_size).
    """
    T = block_size
    if isinstance(data, np.ndarray):
        starts = rng.integers(0, len(data) - T, size=batch_size)
        window = starts[:, None] + np.arange(T + 1)                  # (B, T+1) gather indices
        chunk = data[window]
        return chunk[:, :-1].astype(np.int64), chunk[:, 1:].astype(np.int64)

    cdf, n_starts = data.windows(T)
    if data.n_docs == 1:     # one piece: the same draws as a plain stream
        start = rng.integers(0, n_starts[0], size=batch_size) + data.bounds[0]
        end = np.full((batch_size, 1), data.bounds[1])
        first = start                                                 # every target counts
    else:                    # a window uniformly among all windows (see the module notes)
        piece = np.searchsorted(cdf, rng.random(batch_size) * cdf[-1], side="right")
        piece = np.minimum(piece, data.n_docs - 1)                    # guards u*total == total
        n = data.bounds[piece + 1] - data.bounds[piece] - 1           # (B,) targets per piece
        s = (rng.random(batch_size) * (n + T - 1)).astype(np.int64) - (T - 1)
        lo, hi = np.maximum(s, 0), np.minimum(s + T, n)               # counted targets [lo, hi)
        row = np.maximum(hi - T, 0)                                   # the row's first input
        start = data.bounds[piece] + row                              # (B,)
        first = data.bounds[piece] + lo
        end = (data.bounds[piece] + hi + 1)[:, None]                  # (B, 1) exclusive
    window = start[:, None] + np.arange(T + 1)                        # (B, T+1)
    inside = window < end
    chunk = data.tokens[np.minimum(window, end - 1)].astype(np.int64)
    counted = inside[:, 1:] & (window[:, 1:] > first[:, None])        # targets in the window
    x, y = chunk[:, :-1], np.where(counted, chunk[:, 1:], IGNORE)
    width = int(inside.sum(axis=1).max()) - 1                         # longest row's targets
    if width < T:
        x, y = x[:, :width], y[:, :width]
    return np.ascontiguousarray(x), np.ascontiguousarray(y)


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit="char", unit_scale=True, desc="encoding", file=sys.stderr,
                dynamic_ncols=True)
