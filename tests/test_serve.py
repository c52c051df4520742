"""`randygpt serve`: the official openai client against the app in-process (httpx's ASGI
transport, async: it has no sync ASGI transport) and against a real `randygpt serve`
subprocess on 127.0.0.1; batching, the queue, disconnects, errors, and schemathesis."""
import asyncio
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

fastapi = pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from randygpt.serve.app import Limits, create_app           # noqa: E402
from randygpt.serve.chat import ChatTemplate                # noqa: E402
from servetools import ROOT, Server, tiny_checkpoint, tiny_model   # noqa: E402

MODEL = "tiny"


@pytest.fixture(scope="module")
def served():
    model, tok = tiny_model()
    app = create_app(model, tok, model_id=MODEL, max_batch=4, queue=8,
                     limits=Limits(max_tokens_cap=300, max_body_bytes=50_000))
    yield app, model, tok
    app.state.engine.close()


def run(app, fn):
    """fn(client) with an AsyncOpenAI client on the app in-process; its result."""
    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app),
                                     base_url="http://test") as http:
            client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="none",
                                        http_client=http, max_retries=0)
            return await fn(client, http)
    return asyncio.run(main())


def logsoftmax(z):
    z = z.astype(np.float64)
    return z - z.max() - np.log(np.exp(z - z.max()).sum())


# --------------------------------------------------------------------------------------------
# the API through the openai client, in-process

def test_models_describe_the_checkpoint(served):
    app, model, tok = served
    models = run(app, lambda c, h: c.models.list())
    (m,) = models.data
    assert m.id == MODEL and m.tokenizer == "char" and m.context_length == 32
    assert m.parameters == model.num_params and m.vocab_size == tok.vocab_size


def test_completion_n_choices_usage_and_length(served):
    app, _, _ = served
    r = run(app, lambda c, h: c.completions.create(model=MODEL, prompt="the fox", max_tokens=9,
                                                   n=3, seed=5))
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert len({ch.text for ch in r.choices}) == 3            # n really is n samples
    assert all(ch.finish_reason == "length" for ch in r.choices)
    assert r.usage.prompt_tokens == 7 and r.usage.completion_tokens == 27
    assert r.usage.total_tokens == 34
    again = run(app, lambda c, h: c.completions.create(model=MODEL, prompt="the fox",
                                                       max_tokens=9, n=3, seed=5))
    assert [ch.text for ch in again.choices] == [ch.text for ch in r.choices]


def test_a_list_of_prompts_and_token_ids(served):
    app, _, tok = served
    ids = tok.encode("lazy").tolist()
    r = run(app, lambda c, h: c.completions.create(model=MODEL, prompt=["the", "dog"],
                                                   max_tokens=4, n=2, seed=1, echo=True))
    assert [ch.text[:3] for ch in r.choices] == ["the", "the", "dog", "dog"]
    assert r.usage.prompt_tokens == 6 and r.usage.completion_tokens == 16
    r = run(app, lambda c, h: c.completions.create(model=MODEL, prompt=ids, max_tokens=3,
                                                   echo=True, seed=1))
    assert r.choices[0].text.startswith("lazy") and r.usage.prompt_tokens == 4


def _stream_text(chunks):
    texts, finish = {}, {}
    for ch in chunks:
        for c in ch.choices:
            piece = c.text if hasattr(c, "text") else (c.delta.content or "")
            texts[c.index] = texts.get(c.index, "") + piece
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    return texts, finish


def test_streaming_equals_non_streaming_for_the_same_seed(served):
    app, _, _ = served
    kw = dict(model=MODEL, prompt="the quick", max_tokens=40, n=2, seed=11, temperature=0.9,
              top_p=0.95, extra_body={"top_k": 20})        # top_k: an extension field

    async def both(c, h):
        plain = await c.completions.create(**kw)
        stream = await c.completions.create(**kw, stream=True,
                                            stream_options={"include_usage": True})
        return plain, [chunk async for chunk in stream]
    plain, chunks = run(app, both)
    texts, finish = _stream_text(chunks)
    assert texts == {c.index: c.text for c in plain.choices}
    assert finish == {c.index: c.finish_reason for c in plain.choices}
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    assert len(chunks) > 40                                    # token by token, not one lump


def test_chat_streams_role_first_then_content_then_finish(served):
    app, _, _ = served
    messages = [{"role": "system", "content": "the fox"},
                {"role": "user", "content": "the dog"}]

    async def both(c, h):
        plain = await c.chat.completions.create(model=MODEL, messages=messages, seed=3,
                                                max_completion_tokens=30)
        stream = await c.chat.completions.create(model=MODEL, messages=messages, seed=3,
                                                 max_completion_tokens=30, stream=True,
                                                 stream_options={"include_usage": True})
        return plain, [chunk async for chunk in stream]
    plain, chunks = run(app, both)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    ends = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(ends) == 1 and ends[0].choices[0].delta.content is None
    texts, finish = _stream_text(chunks)
    assert texts[0] == plain.choices[0].message.content
    assert finish[0] == plain.choices[0].finish_reason
    assert plain.choices[0].message.role == "assistant"
    prompt = ChatTemplate().render([("system", None, "the fox"), ("user", None, "the dog")])
    assert plain.usage.prompt_tokens == len(prompt) and chunks[-1].usage == plain.usage
    if plain.choices[0].finish_reason == "length":
        assert plain.usage.completion_tokens == 30


def test_chat_template_is_a_plain_transcript():
    t = ChatTemplate("ROMEO", "JULIET")
    text = t.render([("system", None, "A garden."), ("user", None, "Hi."),
                     ("assistant", None, "Hello."), ("user", "NURSE", "Madam!")])
    assert text == "A garden.\n\nROMEO: Hi.\nJULIET: Hello.\nNURSE: Madam!\nJULIET:"
    assert t.stops() == ["\nROMEO:"]
    assert ChatTemplate().render([("user", None, "x")]) == "User: x\nAssistant:"


def test_stop_strings_never_leak_across_chunks(served):
    app, _, _ = served
    base = dict(model=MODEL, prompt="the", max_tokens=60, seed=2)
    full = run(app, lambda c, h: c.completions.create(**base)).choices[0].text
    stop = full[20:23]                                  # three characters, mid-completion
    cut = full.index(stop)

    async def streamed(c, h):
        s = await c.completions.create(**base, stop=[stop, "zzzz"], stream=True)
        return [chunk async for chunk in s]
    chunks = run(app, streamed)
    texts, finish = _stream_text(chunks)
    assert texts[0] == full[:cut] and finish[0] == "stop"
    plain = run(app, lambda c, h: c.completions.create(**base, stop=stop))
    assert plain.choices[0].text == full[:cut] and plain.choices[0].finish_reason == "stop"


def test_echo_with_max_tokens_0_scores_the_prompt(served):
    app, model, tok = served
    text = "the lazy dog jumps over the quick brown fox. " * 2    # 90 chars: windows slide
    r = run(app, lambda c, h: c.completions.create(model=MODEL, prompt=text, max_tokens=0,
                                                   echo=True, logprobs=3))
    (ch,) = r.choices
    lp = ch.logprobs
    assert ch.text == text and lp.tokens == list(text) and lp.text_offset == list(range(90))
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ids = tok.encode(text)
    for t in (1, 17, 40, 89):                # against a forward pass over the scored window
        start = 0 if t <= 32 else (t - 32 + 15) // 16 * 16
        want = logsoftmax(model.forward(ids[None, start:t])[0][0, -1])
        assert lp.token_logprobs[t] == pytest.approx(want[ids[t]], abs=1e-5)
        assert len(lp.top_logprobs[t]) == 3
        assert max(lp.top_logprobs[t].values()) == pytest.approx(want.max(), abs=1e-5)
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == 90


def test_generated_logprobs_are_the_models(served):
    app, model, tok = served
    r = run(app, lambda c, h: c.completions.create(model=MODEL, prompt="the ", max_tokens=12,
                                                   seed=4, logprobs=2, stop="\n"))
    ch = r.choices[0]
    lp = ch.logprobs
    assert "".join(lp.tokens) == ch.text and len(lp.tokens) == len(ch.text)
    for k in range(len(ch.text)):
        ids = tok.encode("the " + ch.text[:k])
        want = logsoftmax(model.forward(ids[None, :])[0][0, -1])
        assert lp.token_logprobs[k] == pytest.approx(want[tok.stoi[ch.text[k]]], abs=1e-5)
        assert lp.text_offset[k] == k


def test_tokenize_and_detokenize_round_trip(served):
    app, _, tok = served

    async def calls(c, h):
        a = await h.post("/tokenize", json={"prompt": "the dog"})
        b = await h.post("/detokenize", json={"tokens": a.json()["tokens"]})
        bad = await h.post("/detokenize", json={"tokens": [999]})
        return a.json(), b.json(), bad
    a, b, bad = run(app, calls)
    assert a["tokens"] == tok.encode("the dog").tolist() and a["count"] == 7
    assert a["max_model_len"] == 32 and b == {"prompt": "the dog"}
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


# --------------------------------------------------------------------------------------------
# mistakes: 400 in OpenAI's shape, naming the field

@pytest.mark.parametrize("body, param, fragment", [
    ({"prompt": "the", "presence_penalty": 0.5}, "presence_penalty", "unsupported field"),
    ({"prompt": "the", "suffix": "x"}, "suffix", "unsupported field"),
    ({"prompt": "the", "temperature": "hot"}, "temperature", "number"),
    ({"prompt": "the", "temperature": 3}, "temperature", "2"),
    ({"prompt": "the", "max_tokens": 301}, "max_tokens", "cap of 300"),
    ({"prompt": "the", "n": 0}, "n", "1"),
    ({"prompt": "the", "stop": ["a", "b", "c", "d", "e"]}, "stop", "1 to 4"),
    ({"prompt": "the", "stop": ""}, "stop", "non-empty"),
    ({"prompt": "the", "max_tokens": 0}, "max_tokens", "echo"),
    ({"prompt": "thé ☃"}, "prompt", "'é', '☃'"),
    ({"prompt": [5, 999]}, "prompt", "999"),
    ({"prompt": "a" * 9000}, "prompt", "9000 tokens; the limit is 8192"),
    ({"prompt": ["a", "b"], "n": 7}, "n", "needs 14 streams"),
    ({"prompt": "the", "best_of": 2}, "best_of", "unsupported field"),
    ({"prompt": "the", "presence_penalty": False}, "presence_penalty", "unsupported"),
    ({}, "prompt", "required"),
    ({"prompt": "the", "model": "gpt-4"}, "model", "does not exist"),
])
def test_bad_completion_requests_are_400_naming_the_field(served, body, param, fragment):
    app, _, _ = served
    r = run(app, lambda c, h: h.post("/v1/completions", json=body))
    want = 404 if param == "model" else 400
    assert r.status_code == want, r.text
    err = r.json()["error"]
    assert err["param"] == param and fragment in err["message"], err
    assert set(err) == {"message", "type", "param", "code"}


def test_neutral_values_of_unimplemented_fields_are_accepted(served):
    app, _, _ = served
    r = run(app, lambda c, h: h.post("/v1/completions", json={
        "prompt": "the", "max_tokens": 2, "presence_penalty": 0, "frequency_penalty": 0.0,
        "best_of": 1, "logit_bias": {}, "user": "me"}))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs"),
    ({"messages": [{"role": "user", "content": "é"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.0.content"),
])
def test_bad_chat_requests_are_400_naming_the_field(served, body, param):
    app, _, _ = served
    r = run(app, lambda c, h: h.post("/v1/chat/completions", json=body))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_malformed_and_oversized_bodies(served):
    app, _, _ = served

    async def calls(c, h):
        return (await h.post("/v1/completions", content=b"{nope",
                             headers={"content-type": "application/json"}),
                await h.post("/v1/completions", json=[1, 2]),
                await h.post("/v1/completions", json={"prompt": "a" * 60_000}),
                await h.get("/v1/nothing"))
    bad_json, not_object, big, missing = run(app, calls)
    assert bad_json.status_code == 400 and "JSON" in bad_json.json()["error"]["message"]
    assert not_object.status_code == 400
    assert big.status_code == 413 and "50000 bytes" in big.json()["error"]["message"]
    assert missing.status_code == 404 and "error" in missing.json()


def test_the_openai_client_raises_its_own_error_types(served):
    app, _, _ = served

    async def call(c, h):
        with pytest.raises(openai.BadRequestError) as e:
            await c.completions.create(model=MODEL, prompt="the", max_tokens=5,
                                       frequency_penalty=1.0)
        return e.value
    e = run(app, call)
    assert e.status_code == 400 and e.body["param"] == "frequency_penalty"


# --------------------------------------------------------------------------------------------
# many clients: batching, the queue, failures

def test_concurrent_requests_share_batched_steps(served):
    app, _, _ = served
    engine = app.state.engine

    async def four(c, h):
        engine.pause()                           # line all four up for the same first step
        before = engine.stats.steps
        tasks = [asyncio.create_task(c.completions.create(model=MODEL, prompt="the",
                                                          max_tokens=20, seed=i))
                 for i in range(4)]
        while engine.busy["choices_waiting"] < 4:
            await asyncio.sleep(0.01)
        engine.resume()
        results = await asyncio.gather(*tasks)
        return results, engine.stats.steps - before
    admitted = []                                # the prompts of one step: one decode call
    session = engine.session
    submit_all = session.submit_all
    session.submit_all = lambda requests: admitted.append(len(requests)) or submit_all(requests)
    try:
        results, steps = run(app, four)
    finally:
        del session.submit_all
    assert all(r.usage.completion_tokens == 20 for r in results)
    assert steps <= 21 and engine.stats.peak_batch == 4      # 4 x 20 tokens in ~20 steps
    assert admitted == [4]


def test_a_full_queue_is_429_with_retry_after():
    model, tok = tiny_model()
    app = create_app(model, tok, model_id=MODEL, max_batch=1, queue=0)
    try:
        async def calls(c, h):
            app.state.engine.pause()
            first = asyncio.create_task(h.post("/v1/completions", json={
                "prompt": "the", "max_tokens": 5}))
            while app.state.engine.busy["choices_waiting"] < 1:
                await asyncio.sleep(0.01)
            with pytest.raises(openai.RateLimitError) as e:
                await c.completions.create(model=MODEL, prompt="the", max_tokens=5)
            app.state.engine.resume()
            return e.value, await first
        err, first = run(app, calls)
        assert err.status_code == 429 and err.response.headers["retry-after"] == "1"
        assert err.body["code"] == "queue_full" and first.status_code == 200
    finally:
        app.state.engine.close()


def test_a_stream_that_fails_midway_sends_an_error_and_ends(served):
    app, model, _ = served
    calls = {"n": 0}
    decode = model.decode

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise FloatingPointError("injected fault")
        return decode(*a, **k)

    async def go(c, h):
        model.decode = failing
        try:
            r = await h.post("/v1/completions", json={"prompt": "the", "max_tokens": 30,
                                                      "stream": True})
        finally:
            model.decode = decode
        after = await c.completions.create(model=MODEL, prompt="the", max_tokens=3)
        return r, after
    r, after = run(app, go)
    assert r.status_code == 200
    events = [e[6:] for e in r.text.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert "injected fault" in err["message"] and err["type"] == "server_error"
    assert 1 <= len(events) - 2 <= 5                            # text chunks before the fault
    assert after.usage.completion_tokens == 3                   # the server carries on


# --------------------------------------------------------------------------------------------
# no 5xx for anything the schema allows (schemathesis, in-process through the ASGI app)

def test_schemathesis_finds_no_server_errors(served):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    app, _, _ = served
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [r.ok() for r in schema.get_all_operations()]
    assert {f"{o.method.upper()} {o.path}" for o in operations} >= {
        "POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models",
        "POST /tokenize", "POST /detokenize", "GET /health"}
    for op in operations:
        @settings(max_examples=8, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def no_5xx(case):
            response = case.call()
            assert response.status_code < 500, (case.body, response.text)
        no_5xx()


def test_serve_moves_the_model_to_the_fused_backend_and_compiles_before_any_client(
        tmp_path, capsys, monkeypatch):
    # `randygpt serve` (default --backend fused): the checkpoint's weights on the fused
    # backend, its compiled decode step in use from the first client's first token (a first
    # start says it compiles, and how long it took); its logits are the reference model's
    from randygpt.checkpoint import load_checkpoint
    from randygpt.cli import _serving_on
    from randygpt.model import GPT, KVCache
    ckpt = load_checkpoint(tiny_checkpoint(str(tmp_path)), optimizer=False)
    real = GPT.compile_decode
    monkeypatch.setattr(GPT, "compile_decode", lambda self: real(self) or True)   # cold
    served = _serving_on(ckpt, "fused")
    assert served.model.backend.name == "fused" and ckpt.model.backend.name == "reference"
    np.testing.assert_array_equal(served.model.params.flat, ckpt.model.params.flat)
    assert served.model._decode_step().ready(np.float32)
    err = capsys.readouterr().err
    assert "compiling fast kernels once" in err and "compiled in" in err
    ids = ckpt.tokenizer.encode("the dog").tolist()
    got, want = [], []
    for model, out in ((served.model, got), (ckpt.model, want)):
        cache = KVCache(model.cfg)
        out.append(model.prefill(ids[:3], cache)[-1])
        for t in ids[3:]:
            out.append(model.decode(np.array([t]), cache, [0])[0])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# a real `randygpt serve` on 127.0.0.1: auth, streaming over the wire, disconnects

KEY = "test-key-123"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = tiny_checkpoint(str(tmp_path_factory.mktemp("serve")))
    s = Server(ckpt, "--max-batch", "4", "--max-tokens-cap", "100000",
               env={"RANDYGPT_API_KEY": KEY})
    yield s
    s.close()


def test_real_server_needs_the_key_on_v1_but_not_health_or_page(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "randyGPT playground" in page.text
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(server.url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_real_server_with_the_sync_client(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    (m,) = client.models.list().data
    assert m.id == "serve" + m.id[5:] and m.context_length == 32   # the run directory's name
    kw = dict(model=m.id, prompt="the dog", max_tokens=25, seed=9, n=2)
    plain = client.completions.create(**kw)
    texts, finish = _stream_text(list(client.completions.create(**kw, stream=True)))
    assert texts == {c.index: c.text for c in plain.choices}
    chat = client.chat.completions.create(model=m.id, max_tokens=5, seed=1,
                                          messages=[{"role": "user", "content": "the"}])
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 5


def test_real_server_a_disconnect_stops_the_stream_at_once(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    before = httpx.get(server.url + "/health").json()
    # Greedy, because a sampled stream of the tiny model can end by itself at EOS before the
    # server sees the client leave (seed 0 did after 27 tokens); greedy ranks EOS 4th or lower
    # over 6,000 tokens, so the stream ends only by the disconnect.
    stream = client.completions.create(model=client.models.list().data[0].id, prompt="the",
                                       max_tokens=50_000, temperature=0, stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()                                   # the client leaves mid-stream
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        h = httpx.get(server.url + "/health").json()
        if h["streams_active"] == 0:
            break
        time.sleep(0.05)
    assert h["streams_active"] == 0 and h["cancelled"] == before["cancelled"] + 1
    time.sleep(0.3)
    later = httpx.get(server.url + "/health").json()
    assert later["tokens"] == h["tokens"] < before["tokens"] + 5_000   # no work after it left


# --------------------------------------------------------------------------------------------
# the command line

def test_training_and_generate_import_nothing_of_the_server(tmp_path):
    ckpt = tiny_checkpoint(str(tmp_path))
    code = ("import sys; from randygpt.cli import main; import randygpt.train; "
            f"main(['generate', '--checkpoint', {ckpt!r}, '--max-tokens', '3']); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'fastapi', 'uvicorn', 'starlette', 'pydantic', 'httpx'}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_serve_without_the_extra_says_what_to_install(tmp_path):
    code = ("import sys; sys.modules['fastapi'] = None; from randygpt.cli import main; "
            "sys.exit(main(['serve', '--checkpoint', 'x']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       timeout=60)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "randygpt serve: error: serving needs fastapi and uvicorn: pip install -e '.[serve]'"]


def test_serve_on_a_public_address_without_a_key_warns(tmp_path):
    ckpt = tiny_checkpoint(str(tmp_path))
    code = ("import sys, uvicorn; uvicorn.run = lambda *a, **k: None; "
            "from randygpt.cli import main; "
            f"sys.exit(main(['serve', '--checkpoint', {ckpt!r}, '--host', '0.0.0.0']))")
    env = {k: v for k, v in os.environ.items() if k != "RANDYGPT_API_KEY"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    assert "warning: 0.0.0.0 is reachable from other machines and no API key" in r.stderr
