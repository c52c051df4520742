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
from randygpt.model import KVCache
from randygpt.sample import SamplingConfig, encode_prompt, sample_token
from randygpt.session import Session, complete, generate, score_tokens
from randygpt.tokenizer import CharTokenizer
from clitools import assert_one_line_error

TEXT = "the quick brown fox jumps over the lazy dog. THE END!\n"
TOK = CharTokenizer(TEXT)
BLOCK = 12


# decode runs op by op on the reference backend and as one compiled step (traced from the
# same blocks, ops/fused/decode.py) on the fused backend: the cache tests run on both
BACKENDS = ["reference", "fused"]


@pytest.fixture(autouse=True)
def compiled_decode_from_the_first_token(monkeypatch):
    # the fused backend's compiled step, not its op-by-op wait (decode.COMPILE_AFTER_S),
    # is what these tests check on it
    from randygpt.ops.fused import decode
    monkeypatch.setattr(decode, "COMPILE_AFTER_S", 0.0)


def make_model(dtype=np.float32, block=BLOCK, seed=3, backend="reference"):
    cfg = ModelConfig(vocab_size=TOK.vocab_size, block_size=block, n_layer=2, n_embd=32,
                      n_head=4, dropout=0.0)
    model = GPT(cfg, seed=seed, dtype=dtype, backend=backend)
    assert (model._decode_step() is not None) == (backend == "fused")
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
    got = model.prefill(ids, KVCache(model.cfg))
    np.testing.assert_allclose(got, full_logits(model, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-12)])
def test_decode_steps_equal_forward_at_every_position(dtype, tol, backend):
    # float64 at 1e-12 shows the decode math (cached k/v, one position) is exact, not close
    model = make_model(dtype, backend=backend)
    ids = random_ids(BLOCK, seed=1)
    want = full_logits(model, ids)
    cache = KVCache(model.cfg, dtype=dtype)
    got = [model.prefill(ids[:1], cache)[0]]
    for t in range(1, BLOCK):
        got.append(model.decode(np.array([ids[t]]), cache, [0])[0])
    assert cache.lengths[0] == BLOCK
    np.testing.assert_allclose(np.array(got), want, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="full"):
        model.decode(np.array([ids[0]]), cache, [0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_decode_equals_each_stream_alone(backend):
    # 5 streams at different lengths decoded in one step (some streams idle): each row is
    # its own window's forward pass, whatever the others hold
    model = make_model(np.float64, backend=backend)
    cache = KVCache(model.cfg, streams=6, dtype=np.float64)
    prompts = {s: random_ids(1 + s, seed=10 + s) for s in (0, 1, 2, 4, 5)}
    for s, ids in prompts.items():
        model.prefill(ids, cache, s)
    for step in range(3):
        streams = [5, 0, 2, 4, 1] if step % 2 else [0, 1, 2, 4, 5]    # any order, a gap at 3
        tokens = [random_ids(1, seed=100 * step + s)[0] for s in streams]
        logits = model.decode(np.array(tokens), cache, streams)
        for row, (s, t) in enumerate(zip(streams, tokens)):
            prompts[s].append(t)
            want = full_logits(model, prompts[s])[-1]
            np.testing.assert_allclose(logits[row], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("compile_after_s, op_by_op_steps", [(1e-9, 1), (1e9, BLOCK - 1)])
def test_the_compiled_step_waits_until_op_by_op_decoding_has_taken_its_compile_time(
        compile_after_s, op_by_op_steps, monkeypatch):
    # a first run's short sample: decoding op by op is cheaper than compiling (~6 s), so the
    # step compiles only once op by op has taken COMPILE_AFTER_S (here: after the first step,
    # or never); the logits are the forward pass's either way
    from randygpt.ops.fused import decode
    real_run, calls = decode._run, []

    class Run:                                  # not compiled, not on disk: until called
        signatures = []

        def __call__(self, *args):
            calls.append(1)
            return real_run(*args)
    monkeypatch.setattr(decode, "_run", Run())
    monkeypatch.setattr(decode, "on_disk", lambda kernel, dtype: False)
    monkeypatch.setattr(decode, "COMPILE_AFTER_S", compile_after_s)
    model = make_model(backend="fused")
    step = model._decode_step()
    ids = random_ids(BLOCK, seed=4)
    cache = KVCache(model.cfg)
    got = [model.prefill(ids[:1], cache)[0]]
    for t in range(1, BLOCK):
        got.append(model.decode(np.array([ids[t]]), cache, [0])[0])
        assert len(calls) == max(0, t - op_by_op_steps)
    assert step.op_by_op_s > 0
    np.testing.assert_allclose(np.array(got), full_logits(model, ids), rtol=1e-5, atol=1e-5)
    # a step numba's disk cache holds is used from the first token
    monkeypatch.setattr(decode, "on_disk", lambda kernel, dtype: True)
    fresh = GPT(model.cfg, seed=None, backend=model.backend)
    assert fresh._decode_step().ready(np.float32)


def test_compiled_decode_equals_the_reference_ops_and_falls_back_without_a_kernel(
        monkeypatch):
    # the compiled step against the op-by-op decode of the same weights on the reference
    # backend, 3 streams, every position; a description with an op the step has no kernel
    # for (faked: the recorder refuses squared ReLU) gets no step and decodes op by op
    from randygpt.ops.fused import decode
    fused = make_model(np.float64, backend="fused")
    ref = make_model(np.float64)
    caches = [KVCache(fused.cfg, streams=3, dtype=np.float64) for _ in range(2)]
    for s in range(3):
        for model, cache in zip((fused, ref), caches):
            model.prefill(random_ids(1 + s, seed=s), cache, s)
    for step in range(BLOCK - 3):
        tokens = np.array(random_ids(3, seed=50 + step))
        got, want = (m.decode(tokens, c, [0, 1, 2]) for m, c in zip((fused, ref), caches))
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(caches[0].k, caches[1].k, rtol=1e-12, atol=1e-12)
    # float32, 6 streams (a block of 4 and two single rows): each row bit-equal to the same
    # stream decoded alone
    model = make_model(backend="fused")
    together, alone = KVCache(model.cfg, streams=6), KVCache(model.cfg, streams=6)
    for s in range(6):
        for cache in (together, alone):
            model.prefill(random_ids(2 + s, seed=20 + s), cache, s)
    tokens = np.array(random_ids(6, seed=30))
    batched = model.decode(tokens, together, list(range(6)))
    for s in range(6):
        np.testing.assert_array_equal(batched[s], model.decode(tokens[s:s + 1], alone, [s])[0])

    def refuse(self, x):
        raise decode.Untraceable("squared_relu")
    monkeypatch.setattr(decode._Recorder, "squared_relu_forward", refuse)
    plain = GPT(fused.cfg, seed=None, dtype=np.float64, backend=fused.backend)
    plain.params.flat[...] = fused.params.flat
    assert plain._decode_step() is None
    cache = KVCache(plain.cfg, dtype=np.float64)
    ids = random_ids(5, seed=8)
    plain.prefill(ids[:4], cache)
    np.testing.assert_allclose(plain.decode(np.array(ids[4:]), cache, [0])[0],
                               full_logits(ref, ids)[-1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_window_restart_joins_other_streams_rows_in_one_decode_call(backend):
    # stream 1 restarts on 7 tokens (rows at positions 0..6, each attending to the ones
    # before it) in the same call as streams 0 and 2's next tokens: every row's logits are
    # the forward pass over its own window; each cache ends at its last row
    model = make_model(np.float64, backend=backend)
    cache = KVCache(model.cfg, streams=3, dtype=np.float64)
    windows = {s: random_ids(3 + 2 * s, seed=40 + s) for s in range(3)}
    for s, ids in windows.items():
        model.prefill(ids, cache, s)
    restart = random_ids(7, seed=44)
    nxt = random_ids(2, seed=45)
    streams = [0] + [1] * 7 + [2]
    positions = [len(windows[0])] + list(range(7)) + [len(windows[2])]
    logits = model.decode(np.array([nxt[0]] + restart + [nxt[1]]), cache, streams, positions)
    np.testing.assert_allclose(logits[0], full_logits(model, windows[0] + nxt[:1])[-1],
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(logits[1:8], full_logits(model, restart), rtol=1e-12,
                               atol=1e-12)
    np.testing.assert_allclose(logits[8], full_logits(model, windows[2] + nxt[1:])[-1],
                               rtol=1e-12, atol=1e-12)
    assert cache.lengths.tolist() == [4, 7, 8]
    with pytest.raises(ValueError, match="consecutive"):       # a gap at position 2
        model.decode(np.array([1, 2, 3]), cache, [1, 1, 1], [0, 1, 3])
    with pytest.raises(ValueError, match="consecutive"):       # not from its length or 0
        model.decode(np.array([1]), cache, [0], [2])


def test_the_compiled_steps_settings_and_splits_change_no_bit(monkeypatch):
    # the same rows (two restarts, three streams' next tokens) under every product block
    # width, on one thread and split over two, and in calls of 3 rows: bit-identical logits
    # and caches, as they must be for the timed choice between them to be free
    from randygpt.ops.fused import decode
    model = make_model(backend="fused")
    step = model._decode_step()
    streams = [0, 1, 1, 1, 1, 1, 2, 3, 4, 4, 4, 4]
    positions = [3, 0, 1, 2, 3, 4, 5, 2, 0, 1, 2, 3]
    tokens = np.array(random_ids(len(streams), seed=60))
    results = []
    for width, threads, max_rows in [(16, 1, 64), (64, 1, 64), (16, 2, 64), (64, 2, 64),
                                     (64, 2, 3), (16, 1, 3)]:
        cache = KVCache(model.cfg, streams=5)
        for s in range(5):
            model.prefill(random_ids(6, seed=70 + s), cache, s)
        cache.lengths[:] = [3, 6, 5, 2, 6]
        monkeypatch.setattr(decode, "MAX_ROWS", max_rows)
        step._buffers.clear()
        step._setting_of[len(streams), True] = (width, threads)
        results.append((model.decode(tokens, cache, streams, positions), cache.k.copy()))
    for logits, keys in results[1:]:
        np.testing.assert_array_equal(logits, results[0][0])
        np.testing.assert_array_equal(keys, results[0][1])
    parts = decode._parts(np.array(streams), 2)                 # whole streams, in order
    assert [p.tolist() for p in parts] == [list(range(6)), list(range(6, 12))]


def test_the_compiled_steps_setting_is_timed_once_and_kept(monkeypatch, tmp_path):
    # four candidates (block 4x16 or 4x64, one thread or two) timed on the real rows; one
    # replaces the one before only when 10% faster; the decision is saved and a new process
    # (a fresh step) uses it untimed; RANDYGPT_DECODE_BLOCK forces a width, and a bad value
    # is a one-line error
    import numba
    from randygpt.ops.fused import decode
    monkeypatch.setenv("RANDYGPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(numba.config, "NUMBA_NUM_THREADS", 2)
    timed = []

    def fake_times(fns, repeats=5):
        for fn in fns:
            fn()                                               # each candidate really runs
        timed.append(len(fns))
        # (16,1) (64,1): not 10% better; (16,2) wins. Widths alone: 4x64 wins
        return [1.0, 0.95, 0.5, 0.48] if len(fns) == 4 else [1.0, 0.5]
    from randygpt.ops.fused import choose
    monkeypatch.setattr(choose, "_best_times", fake_times)
    model = make_model(backend="fused")
    cache = KVCache(model.cfg, streams=10)
    for s in range(10):
        model.prefill(random_ids(2, seed=s), cache, s)
    model.decode(np.array(random_ids(10, seed=80)), cache, list(range(10)))
    assert timed == [4]
    assert model._decode_step().setting(10, None) == (16, 2)
    fresh = GPT(model.cfg, seed=None, backend=model.backend)._decode_step()
    assert fresh.setting(12, None) == (16, 2) and timed == [4]     # same bucket: 9..16 rows
    # one stream's 10 restart rows cannot split: only the widths are timed, kept apart
    cache.lengths[0] = 0
    model.decode(np.array(random_ids(10, seed=81)), cache, [0] * 10, range(10))
    assert timed == [4, 2] and model._decode_step().setting(10, None, False) == (64, 1)
    with open(tmp_path / "kernels.json") as f:
        saved = [d for m in json.load(f).values() for k, d in m.items()
                 if k == "decode rows<=16 of 2 threads"]
    assert saved[0]["width"] == 16 and saved[0]["threads"] == 2
    monkeypatch.setenv("RANDYGPT_DECODE_BLOCK", "64")
    assert GPT(model.cfg, seed=None, backend=model.backend)._decode_step().setting(
        2, None) == (64, 1)
    monkeypatch.setenv("RANDYGPT_DECODE_BLOCK", "32")
    with pytest.raises(UserError, match="RANDYGPT_DECODE_BLOCK='32' is not a block width"):
        GPT(model.cfg, seed=None, backend=model.backend)._decode_step()


def expected_windows(ids, block, keep):
    """The documented window policy, written out independently of Session."""
    window, out, slides = [], [], 0
    for tok in ids:
        if len(window) == block:
            window = window[len(window) - keep:]
            slides += 1
        window = window + [tok]
        out.append(list(window))
    return out, slides


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("keep", [0, 3, BLOCK // 2, BLOCK - 1])
def test_sliding_window_logits_equal_forward_over_the_window(keep, backend):
    model = make_model(backend=backend)
    ids = random_ids(4 * BLOCK + 5, seed=2)
    session = Session(model, TOK, keep=keep)
    windows, slides = expected_windows(ids, BLOCK, keep)
    got = [session.prefill(0, ids[:1])]
    for tok in ids[1:]:
        got.append(session.feed([0], [tok])[0])
    assert session.window(0) == windows[-1]
    assert session.rebuilds == slides >= 3                          # it slid, repeatedly
    for t, window in enumerate(windows):
        np.testing.assert_allclose(got[t], full_logits(model, window)[-1], rtol=1e-5,
                                   atol=1e-5, err_msg=f"position {t}, keep {keep}")


def test_keep_block_minus_one_is_the_exact_last_block_tokens():
    model = make_model()
    ids = random_ids(3 * BLOCK, seed=3)
    session = Session(model, TOK, keep=BLOCK - 1)
    session.prefill(0, ids[:1])
    for t in range(1, len(ids)):
        got = session.feed([0], [ids[t]])[0]
        crop = ids[max(0, t + 1 - BLOCK):t + 1]           # nanoGPT's idx[:, -block_size:]
        np.testing.assert_allclose(got, full_logits(model, crop)[-1], rtol=1e-5, atol=1e-5)


def test_prompt_longer_than_the_block_prefills_its_last_block():
    model = make_model()
    ids = random_ids(2 * BLOCK + 7, seed=4)
    session = Session(model, TOK)
    got = session.prefill(0, ids)
    assert session.window(0) == ids[-BLOCK:]
    np.testing.assert_allclose(got, full_logits(model, ids[-BLOCK:])[-1], rtol=1e-5, atol=1e-5)


def uncached_ids(model, prompt_ids, max_tokens, sampling, rng, stop_id):
    """nanoGPT's loop: a full forward pass over the last block_size tokens per new token."""
    ids, new = list(prompt_ids), []
    for _ in range(max_tokens):
        token = sample_token(full_logits(model, ids[-model.cfg.block_size:])[-1], sampling, rng)
        if token == stop_id:
            break
        ids.append(token)
        new.append(token)
    return new


def ids_of(events):
    return [e.token for e in events if e.token is not None]


@pytest.mark.parametrize("sampling", [SamplingConfig(temperature=0),
                                      SamplingConfig(temperature=0.9, top_k=20, top_p=0.95)])
def test_cached_generation_gives_the_same_tokens_as_uncached(sampling):
    model = make_model()
    prompt = TOK.encode("the quick").tolist()
    n = 3 * BLOCK
    endless = CharTokenizer(TEXT)
    endless.eos_id = -1                 # never stops early: all n tokens are compared
    cached = ids_of(generate(model, endless, prompt, n, sampling, rng=np.random.default_rng(9),
                             keep=BLOCK - 1))
    uncached = uncached_ids(model, prompt, n, sampling, np.random.default_rng(9), -1)
    assert len(cached) == n and cached == uncached


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_streams_each_equal_their_own_generation(backend):
    # 4 streams with different prompts, sampling settings, stops and lengths, decoded
    # together (batched steps; streams finish at different times, one joins late): each
    # stream's events are exactly those it makes alone
    model = make_model(backend=backend)
    jobs = [("the ", 30, SamplingConfig(temperature=0), (), 1),
            ("quick", 25, SamplingConfig(temperature=1.0, top_k=5), (), 2),
            ("", 40, SamplingConfig(temperature=0.8, top_p=0.9), ("bo",), 3),
            ("lazy", 3 * BLOCK, SamplingConfig(temperature=1.2), (), 4)]
    alone = [list(generate(model, TOK, p, n, s, stop, np.random.default_rng(seed)))
             for p, n, s, stop, seed in jobs]
    session = Session(model, TOK, streams=4)
    together = {}
    for p, n, s, stop, seed in jobs[:3]:
        together[session.submit(p, n, s, stop, np.random.default_rng(seed))] = []
    late, steps = jobs[3], 0
    while session.active:
        for e in session.step():
            together[e.stream].append(e)
        steps += 1
        if steps == 5:
            p, n, s, stop, seed = late
            together[session.submit(p, n, s, stop, np.random.default_rng(seed))] = []
    for want, got in zip(alone, together.values()):
        assert [(e.token, e.text, e.finish_reason) for e in got] == \
               [(e.token, e.text, e.finish_reason) for e in want]
    reasons = [e[-1].finish_reason for e in alone]
    assert reasons[:2] == ["length", "length"] and reasons[2] == "stop"
    assert len({len(e) for e in alone}) == 4            # they finished at different steps


@pytest.mark.parametrize("backend", BACKENDS)
def test_streams_submitted_together_prefill_in_one_call_and_equal_their_own(backend):
    # submit_all (a server admitting several requests at one step): all prompts, of
    # different lengths (one longer than the block, one empty), go through one decode
    # call, and each stream's events are exactly those it makes alone
    model = make_model(backend=backend)
    jobs = [("the ", 20, SamplingConfig(temperature=0), 1),
            ("quick brown " * 4, 20, SamplingConfig(temperature=1.0, top_k=5), 2),
            ("", 20, SamplingConfig(temperature=0.8, top_p=0.9), 3)]
    prompt_rows = [min(len(encode_prompt(TOK, p)), BLOCK) for p, *_ in jobs]
    assert prompt_rows[1] == BLOCK                       # cut to the block's last tokens
    alone = [list(generate(model, TOK, p, n, s, rng=np.random.default_rng(seed)))
             for p, n, s, seed in jobs]
    session = Session(model, TOK, streams=4)
    calls = []
    decode = model.decode
    model.decode = lambda *a, **k: calls.append(a[0]) or decode(*a, **k)
    streams = session.submit_all([dict(prompt=p, max_tokens=n, sampling=s,
                                       rng=np.random.default_rng(seed))
                                  for p, n, s, seed in jobs])
    assert streams == [0, 1, 2] and len(calls) == 1
    assert len(calls[0]) == sum(prompt_rows)             # every prompt's rows
    together = {s: [] for s in streams}
    while session.active:
        for e in session.step():
            together[e.stream].append(e)
    for want, s in zip(alone, streams):
        assert [(e.token, e.text) for e in together[s]] == [(e.token, e.text) for e in want]


def test_submit_all_starts_no_stream_when_one_request_is_bad():
    model = make_model()
    session = Session(model, TOK, streams=4)
    with pytest.raises(UserError, match="max_tokens"):
        session.submit_all([dict(prompt="the", max_tokens=5), dict(prompt="a", max_tokens=0)])
    assert not session.active
    assert session.submit_all([dict(prompt="x")] * 2) == [0, 1]
    with pytest.raises(RuntimeError, match="3 streams asked for, 2 free"):
        session.submit_all([dict(prompt="y")] * 3)
    assert sorted(session.active) == [0, 1]


# --------------------------------------------------------------------------------------------
# stopping, prompts, seeds

GREEDY = SamplingConfig(temperature=0)


def test_events_carry_tokens_text_and_finish_reasons():
    model = make_model()
    events = list(generate(model, TOK, "the", 10, GREEDY))
    assert len(events) == 10 and [e.finish_reason for e in events] == [None] * 9 + ["length"]
    assert "".join(e.text for e in events) == TOK.decode(ids_of(events))


def test_stream_stops_at_eos_and_at_max_tokens():
    model = make_model()
    free = complete(model, TOK, "", max_tokens=30, sampling=GREEDY)
    assert len(free) == 30              # every id of this vocabulary but BOS/EOS is one char
    tok = CharTokenizer(TEXT)
    tok.eos_id = tok.stoi[free[10]]     # pretend that character is EOS
    events = list(generate(model, tok, "", max_tokens=30, sampling=GREEDY))
    assert "".join(e.text for e in events) == free[:free.index(free[10])]
    assert events[-1].finish_reason == "stop" and events[-1].token is None


def test_empty_prompt_starts_from_bos():
    model = make_model()
    n = BLOCK - 1                       # BOS + n tokens fit one window: no slide
    text = complete(model, TOK, "", max_tokens=n, sampling=GREEDY)
    ids = uncached_ids(model, [TOK.bos_id], n, GREEDY, None, TOK.eos_id)
    assert text == TOK.decode(ids) and len(text) > 0


def test_stop_strings_cut_the_text_and_are_not_included():
    model = make_model()
    free = complete(model, TOK, "the ", max_tokens=40, sampling=GREEDY)
    stop = free[12:15]
    want = free[:free.index(stop)]
    assert complete(model, TOK, "the ", max_tokens=40, sampling=GREEDY, stop=[stop]) == want
    events = list(generate(model, TOK, "the ", max_tokens=40, sampling=GREEDY,
                           stop=["zzzz", stop]))
    assert "".join(e.text for e in events) == want and events[-1].finish_reason == "stop"
    never = complete(model, TOK, "the ", max_tokens=40, sampling=GREEDY, stop=["@@"])
    assert never == free


def test_bpe_stream_pieces_join_to_the_decoded_ids():
    pytest.importorskip("tokenizers")
    from randygpt.tokenizer import BPETokenizer
    corpus = "naïve café – déjà vu, 東京 and Zürich: ünïcödé everywhere. " * 20
    bpe = BPETokenizer.train(corpus, vocab_size=300)
    cfg = ModelConfig(vocab_size=bpe.vocab_size, block_size=16, n_layer=1, n_embd=32, n_head=4)
    model = GPT(cfg, seed=5)
    s = SamplingConfig(temperature=1.5)      # wander through bytes of multi-byte characters
    events = list(generate(model, bpe, "café", max_tokens=120, sampling=s,
                           rng=np.random.default_rng(3)))
    ids = ids_of(events)
    # a character cut in two by a piece boundary would decode to U+FFFD in the pieces only
    text = bpe.decode(ids)
    assert "".join(e.text for e in events) == text and len(ids) > 50
    assert any(127 < ord(c) < 0xFFFD for c in text)         # multi-byte characters were made


def test_same_seed_same_text_other_seed_other_text():
    model = make_model()
    s = SamplingConfig(temperature=1.0)

    def text(seed):
        return complete(model, TOK, "the", max_tokens=50, sampling=s,
                        rng=np.random.default_rng(seed))
    assert text(1) == text(1)
    assert text(1) != text(2)


@pytest.mark.parametrize("kwargs, field, fragment", [
    (dict(prompt="the cat é ß"), "prompt", "2 character.*'ß', 'é'"),
    (dict(sampling=SamplingConfig(temperature=-1)), "temperature", "-1 must be"),
    (dict(sampling=SamplingConfig(top_p=0)), "top_p", "0 must be in"),
    (dict(max_tokens=0), "max_tokens", "0 must be at least 1"),
    (dict(stop=[""]), "stop", "string is empty")])
def test_bad_generation_input_is_a_user_error_naming_the_field(kwargs, field, fragment):
    model = make_model()
    args = dict(prompt="the", max_tokens=5) | kwargs
    with pytest.raises(UserError, match=fragment) as e:
        generate(model, TOK, **args)          # raised at the call, before any text
    assert e.value.field == field and "--" not in str(e.value)


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
    want = complete(ckpt.model, ckpt.tokenizer, "First", max_tokens=60, sampling=GREEDY)
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
        np.testing.assert_allclose(model.prefill(ids, KVCache(model.cfg)),
                                   full_logits(model, ids), rtol=1e-5, atol=1e-5)
    finally:
        set_blas_threads(before)
    assert get_blas_threads() == before


# --------------------------------------------------------------------------------------------
# logprobs: of sampled tokens (Session with logprobs=N) and of a given text (score_tokens)

def log_softmax(z):
    z = z.astype(np.float64)
    return z - z.max() - np.log(np.exp(z - z.max()).sum())


def test_events_carry_the_models_logprobs_when_asked():
    # two streams batched; the one that asked gets, per token, log-softmax of the model's
    # logits (not the sampler's temperature / top-k distribution) and the top 3
    model = make_model()
    prompt = random_ids(3, seed=4)
    session = Session(model, TOK, streams=2)
    a = session.submit(prompt, BLOCK - 3, SamplingConfig(0.7, top_k=5), (),
                       np.random.default_rng(1), logprobs=3)
    b = session.submit(prompt[:2], BLOCK - 3, None, (), np.random.default_rng(2))
    events = []
    while session.active:
        events += session.step()
    assert all(e.logprob is None for e in events if e.stream == b)
    mine = [e for e in events if e.stream == a]
    assert len(mine) == BLOCK - 3 and all(e.token is not None for e in mine)
    window = list(prompt)
    for e in mine:
        want = log_softmax(full_logits(model, window)[-1])
        assert e.logprob.logprob == pytest.approx(want[e.token], abs=1e-5)
        assert [i for i, _ in e.logprob.top] == list(np.argsort(-want, kind="stable")[:3])
        assert [v for _, v in e.logprob.top] == pytest.approx(np.sort(want)[::-1][:3], abs=1e-5)
        window.append(e.token)
    with pytest.raises(UserError, match="logprobs"):
        session.submit(prompt, 3, logprobs=-1)


def test_score_tokens_equals_forward_with_at_least_half_a_block_of_context():
    model = make_model()
    ids = random_ids(40, seed=6)
    got = score_tokens(model, ids, 2)
    assert got[0] is None and len(got) == 40
    half = BLOCK // 2
    for t in range(1, 40):           # windows start every half block; the first covers 1..BLOCK
        start = 0 if t <= BLOCK else (t - BLOCK + half - 1) // half * half
        assert t - start >= min(t, half)
        want = log_softmax(full_logits(model, ids[start:t])[-1])
        assert got[t].logprob == pytest.approx(want[ids[t]], abs=1e-5)
        assert [i for i, _ in got[t].top] == list(np.argsort(-want, kind="stable")[:2])
