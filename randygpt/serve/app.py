"""The HTTP API: OpenAI's completions and chat routes over the decode loop (engine.py).

    GET  /health                 public: 200 and the loop's load once the model is loaded
    GET  /v1/models              the checkpoint as a model
    POST /v1/completions         prompt(s) -> n choices each, or a stream of chunks (SSE)
    POST /v1/chat/completions    messages -> chat.py's transcript -> a completion
    POST /tokenize, /detokenize  text <-> ids with the model's tokenizer
    GET  /                       the playground page (static/index.html)

A request is checked whole before any work: a bad or unsupported field is a 400 naming it.
Each choice becomes one Job; the engine decodes all jobs of all requests together. A stream
that a client abandons is cancelled at once (Starlette cancels the generator when the client
disconnects; a plain request polls for the disconnect while it waits).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import time
import uuid

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from ..errors import UserError
from ..sample import SamplingConfig, encode_prompt
from ..session import score_tokens
from ..tokenizer import BOS_TOKEN, EOS_TOKEN
from .chat import ChatTemplate
from .engine import Engine, Job, QueueFull
from .schemas import (APIError, ChatRequest, CompletionRequest, DetokenizeRequest, MAX_STOP,
                      TokenizeRequest, validation_error)

STATIC = os.path.join(os.path.dirname(__file__), "static")


class BodyLimit:
    """413 for a request whose Content-Length is over max_bytes (or not a number), before
    the app reads it. A plain ASGI middleware: Starlette's @app.middleware("http") passes
    every chunk of a streamed response through a task and a memory channel (8.5 % of the
    server's samples at 32 streaming clients, py-spy)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            size = dict(scope["headers"]).get(b"content-length")
            if size is not None and (not size.isdigit() or int(size) > self.max_bytes):
                e = APIError(413, f"the request body is over {self.max_bytes} bytes",
                             code="body_too_large")
                return await JSONResponse(e.body(), status_code=413)(scope, receive, send)
        await self.app(scope, receive, send)


class Limits:
    def __init__(self, max_tokens_cap=1024, max_prompt_tokens=8192, max_body_bytes=1 << 20,
                 retry_after_s=1):
        self.max_tokens_cap, self.max_prompt_tokens = max_tokens_cap, max_prompt_tokens
        self.max_body_bytes, self.retry_after_s = max_body_bytes, retry_after_s


def create_app(checkpoint_or_model, tokenizer=None, *, model_id=None, api_key=None,
               max_batch=8, queue=64, limits: Limits | None = None,
               chat: ChatTemplate | None = None) -> FastAPI:
    """The app for a checkpoint path, a loaded Checkpoint, or a (model, tokenizer) pair.
    app.state.engine is the decode loop; close it with app.state.engine.close() (the app's
    shutdown does)."""
    if isinstance(checkpoint_or_model, (str, os.PathLike)):
        from ..checkpoint import load_checkpoint
        checkpoint_or_model = load_checkpoint(checkpoint_or_model, optimizer=False)
    if tokenizer is None:                                  # a Checkpoint
        ckpt = checkpoint_or_model
        model, tokenizer = ckpt.model, ckpt.tokenizer
        stem = os.path.splitext(os.path.basename(ckpt.path))[0]    # a run's checkpoint*:
        model_id = model_id or (os.path.basename(os.path.dirname(os.path.abspath(ckpt.path)))
                                if stem.startswith("checkpoint") else stem)  # the run's name
    else:
        model = checkpoint_or_model
    model_id = model_id or "randygpt"
    limits, chat = limits or Limits(), chat or ChatTemplate()
    engine = Engine(model, tokenizer, max_batch=max_batch, queue=queue)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()

    app = FastAPI(title="randyGPT", version="1", description="OpenAI-compatible API of a "
                  "randyGPT checkpoint", lifespan=lifespan)
    app.state.engine, app.state.model_id, app.state.limits = engine, model_id, limits

    # ---- errors: OpenAI's shape, 400 for every client mistake ---------------------------
    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        err = validation_error(e.errors())
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(404)
    async def _not_found(request, e):
        return JSONResponse(APIError(404, f"no route {request.url.path}", code="not_found")
                            .body(), status_code=404)

    @app.exception_handler(405)
    async def _bad_method(request, e):
        return JSONResponse(APIError(405, f"{request.method} is not allowed on "
                                     f"{request.url.path}", code="method_not_allowed").body(),
                            status_code=405)

    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)

    def auth(request: Request):
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
                token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                           type="authentication_error", code="invalid_api_key")

    protected = [Depends(auth)]

    # ---- public --------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        s = engine.stats
        return {"status": "ok", "model": model_id, **engine.busy, "steps": s.steps,
                "tokens": s.tokens, "peak_batch": s.peak_batch, "cancelled": s.cancelled}

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(os.path.join(STATIC, "index.html"))

    # ---- models and tokens ---------------------------------------------------------------
    @app.get("/v1/models", dependencies=protected)
    async def models():
        return {"object": "list", "data": [describe()]}

    @app.get("/v1/models/{name}", dependencies=protected)
    async def one_model(name: str):
        check_model(name)
        return describe()

    def describe():
        return {"id": model_id, "object": "model", "created": created, "owned_by": "randygpt",
                "tokenizer": tokenizer.kind, "vocab_size": int(tokenizer.vocab_size),
                "context_length": int(model.cfg.block_size),
                "parameters": int(model.num_params)}

    def check_model(name):
        if name is not None and name != model_id:
            raise APIError(404, f"model '{name}' does not exist; this server serves "
                           f"'{model_id}'", param="model", code="model_not_found")

    @app.post("/tokenize", dependencies=protected)
    async def tokenize(body: TokenizeRequest):
        check_model(body.model)
        ids = encode(body.prompt, "prompt", allow_empty=True)
        return {"tokens": ids, "count": len(ids), "max_model_len": int(model.cfg.block_size)}

    @app.post("/detokenize", dependencies=protected)
    async def detokenize(body: DetokenizeRequest):
        check_model(body.model)
        check_ids(body.tokens, "tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    def encode(text, param, allow_empty=False) -> list:
        if not text and allow_empty:
            return []
        try:
            ids = encode_prompt(tokenizer, text)
        except UserError as e:
            raise APIError(400, e.render(lambda f: param), param=param,
                           code="unknown_characters") from None
        if len(ids) > limits.max_prompt_tokens:
            raise APIError(400, f"'{param}' has {len(ids)} tokens; the limit is "
                           f"{limits.max_prompt_tokens} (the model sees the last "
                           f"{model.cfg.block_size})", param=param, code="prompt_too_long")
        return ids

    def check_ids(ids, param):
        bad = [i for i in ids if not 0 <= i < tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"'{param}' has token id(s) outside 0..{tokenizer.vocab_size - 1}"
                           f": {bad[:5]}", param=param, code="invalid_token")
        if len(ids) > limits.max_prompt_tokens:
            raise APIError(400, f"'{param}' has {len(ids)} tokens; the limit is "
                           f"{limits.max_prompt_tokens}", param=param, code="prompt_too_long")

    # ---- the shared request plan -----------------------------------------------------------
    def plan(body, prompts, max_tokens, extra_stops=()):
        """Checked sampling settings -> one Job per (prompt, choice)."""
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise APIError(400, f"'stop' takes 1 to {MAX_STOP} non-empty strings", "stop")
        if max_tokens > limits.max_tokens_cap:
            param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) \
                else "max_tokens"
            raise APIError(400, f"'{param}' {max_tokens} is over this server's cap of "
                           f"{limits.max_tokens_cap}", param, code="max_tokens_too_large")
        sampling = SamplingConfig(1.0 if body.temperature is None else body.temperature,
                                  body.top_k or 0, 1.0 if body.top_p is None else body.top_p)
        n = body.n or 1
        jobs = []
        for p, ids in enumerate(prompts):
            for c in range(n):
                i = p * n + c
                rng = np.random.default_rng(None if body.seed is None else
                                            [body.seed % (1 << 64), i])
                jobs.append(Job(ids or [tokenizer.bos_id], max_tokens, sampling,
                                stops + list(extra_stops), rng,
                                getattr(body, "logprobs", None), index=i))
        return jobs

    def start(jobs):
        if not jobs:
            return None
        if len(jobs) > max_batch + queue:          # would never fit: waiting cannot help
            raise APIError(400, f"this request needs {len(jobs)} streams (prompts x n); this "
                           f"server takes at most {max_batch + queue} at once", "n")
        try:
            return engine.submit(jobs)
        except QueueFull as e:
            raise APIError(429, f"the server is busy ({e}); retry after "
                           f"{limits.retry_after_s} s", type="rate_limit_error",
                           code="queue_full",
                           headers={"Retry-After": str(limits.retry_after_s)}) from None

    async def events_of(request, jobs, events, poll):
        """(index, Event) as they come; a client that leaves cancels every job at once.
        `poll`: check for a disconnect while waiting (a plain request: nothing cancels it)."""
        left, done = len(jobs), False
        try:
            while left:
                try:
                    index, item = await asyncio.wait_for(events.get(), 0.5 if poll else None)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if isinstance(item, Exception):
                    raise APIError(500, f"generation failed: {type(item).__name__}: {item}",
                                   type="server_error", code="generation_failed")
                left -= item.finish_reason is not None
                yield index, item
            done = True
        finally:
            if not done:
                engine.cancel(jobs)

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    def usage(prompt_tokens, completion_tokens):
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    # ---- completions ---------------------------------------------------------------------
    @app.post("/v1/completions", dependencies=protected)
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        prompts, texts = prompt_ids(body.prompt)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        if max_tokens == 0 and not body.echo:
            raise APIError(400, "'max_tokens' 0 generates nothing; it is for scoring a prompt "
                           "with 'echo': true and 'logprobs'", "max_tokens")
        n = body.n or 1
        jobs = plan(body, prompts, max_tokens) if max_tokens else []
        scores = None
        if body.echo and body.logprobs is not None:
            scores = await engine.call(lambda: [score_tokens(model, ids, body.logprobs)
                                                for ids in prompts])
        rid, now = "cmpl-" + uuid.uuid4().hex, int(time.time())
        choices = [Choice(tokenizer, texts[i // n] if body.echo else "",
                          body.logprobs, prompts[i // n] if body.echo else [],
                          scores[i // n] if scores else None) for i in range(len(prompts) * n)]
        events = start(jobs)
        prompt_tokens = sum(len(ids) for ids in prompts)

        def chunk(index, text, logprobs, finish):
            return {"id": rid, "object": "text_completion", "created": now, "model": model_id,
                    "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                 "finish_reason": finish}]}

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def stream():
                try:
                    for i, ch in enumerate(choices):
                        if ch.text or not jobs:
                            yield sse(chunk(i, ch.text, ch.release(), None if jobs else
                                            "length"))
                    async for i, event in events_of(request, jobs, events, poll=False):
                        ch = choices[i]
                        ch.add(event)
                        yield sse(chunk(i, event.text, ch.release(), event.finish_reason))
                except APIError as e:
                    yield sse(e.body())
                    yield "data: [DONE]\n\n"
                    return
                if include_usage:
                    yield sse({"id": rid, "object": "text_completion", "created": now,
                               "model": model_id, "choices": [],
                               "usage": usage(prompt_tokens, sum(c.n for c in choices))})
                yield "data: [DONE]\n\n"
            return StreamingResponse(stream(), media_type="text/event-stream")

        async for i, event in events_of(request, jobs, events, poll=True):
            choices[i].add(event)
        return {"id": rid, "object": "text_completion", "created": now, "model": model_id,
                "choices": [{"index": i, "text": ch.text, "logprobs": ch.release(),
                             "finish_reason": ch.finish or "length"}
                            for i, ch in enumerate(choices)],
                "usage": usage(prompt_tokens, sum(c.n for c in choices))}

    def prompt_ids(prompt):
        """The prompt field -> ([ids per prompt], [text per prompt])."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "'prompt' is an empty list; give a string or a list of them",
                           "prompt")
        ids, texts = [], []
        for p in prompt:
            if isinstance(p, str):
                ids.append(encode(p, "prompt", allow_empty=True))
                texts.append(p)
            else:
                check_ids(p, "prompt")
                ids.append(list(p))
                texts.append(tokenizer.decode(p))
        return ids, texts

    # ---- chat ------------------------------------------------------------------------------
    @app.post("/v1/chat/completions", dependencies=protected)
    async def chat_completions(body: ChatRequest, request: Request):
        check_model(body.model)
        if body.max_tokens and body.max_completion_tokens and \
                body.max_tokens != body.max_completion_tokens:
            raise APIError(400, "'max_tokens' and 'max_completion_tokens' disagree; give one",
                           "max_completion_tokens")
        max_tokens = body.max_completion_tokens or body.max_tokens or min(
            256, limits.max_tokens_cap)
        turns = []
        for m in body.messages:
            text = m.content if isinstance(m.content, str) else "".join(p.text for p in
                                                                         m.content)
            turns.append((m.role, m.name, text))
        prompt = chat.render(turns)
        ids = encode(prompt, "messages")
        jobs = plan(body, [ids], max_tokens, chat.stops())
        events = start(jobs)
        rid, now = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
        replies = [Reply() for _ in jobs]

        def chunk(index, delta, finish):
            return {"id": rid, "object": "chat.completion.chunk", "created": now,
                    "model": model_id, "choices": [{"index": index, "delta": delta,
                                                    "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def stream():
                try:
                    for i in range(len(jobs)):
                        yield sse(chunk(i, {"role": "assistant", "content": ""}, None))
                    async for i, event in events_of(request, jobs, events, poll=False):
                        piece = replies[i].add(event)
                        if piece:
                            yield sse(chunk(i, {"content": piece}, None))
                        if event.finish_reason:
                            yield sse(chunk(i, {}, event.finish_reason))
                except APIError as e:
                    yield sse(e.body())
                    yield "data: [DONE]\n\n"
                    return
                if include_usage:
                    yield sse({"id": rid, "object": "chat.completion.chunk", "created": now,
                               "model": model_id, "choices": [],
                               "usage": usage(len(ids), sum(r.n for r in replies))})
                yield "data: [DONE]\n\n"
            return StreamingResponse(stream(), media_type="text/event-stream")

        async for i, event in events_of(request, jobs, events, poll=True):
            replies[i].add(event)
        return {"id": rid, "object": "chat.completion", "created": now, "model": model_id,
                "choices": [{"index": i, "message": {"role": "assistant", "content": r.text},
                             "logprobs": None, "finish_reason": r.finish}
                            for i, r in enumerate(replies)],
                "usage": usage(len(ids), sum(r.n for r in replies))}

    return app


class Reply:
    """One chat choice: the text less the one space after the speaker's colon."""

    def __init__(self):
        self.text, self.n, self.finish = "", 0, None

    def add(self, event) -> str:
        self.n += 1
        self.finish = event.finish_reason or self.finish
        piece = event.text
        if not self.text and piece.startswith(" "):
            piece = piece[1:]
        self.text += piece
        return piece


class Choice:
    """One completion choice: its text so far and, with logprobs, OpenAI's per-token lists.
    A token's entry is released once the text released covers its offset, so the tokens
    of a stop string (never output) get no entry, streaming or not."""

    def __init__(self, tokenizer, echo_text, top_n, echo_ids, echo_scores):
        self.tokenizer, self.top_n = tokenizer, top_n
        self.text, self.n, self.finish = echo_text, 0, None
        self.pending, self.offset = [], 0      # entries not yet released; next token's offset
        if top_n is not None:
            for k, tok in enumerate(echo_ids):
                self._entry(tok, echo_scores[k] if echo_scores else None)

    def _entry(self, token, lp):
        s = self._token_text(token)
        self.pending.append((s, self.offset, None if lp is None else lp.logprob,
                             None if lp is None else {self._token_text(i): v
                                                      for i, v in lp.top}))
        self.offset += 0 if token in (self.tokenizer.bos_id, self.tokenizer.eos_id) else len(s)

    def _token_text(self, token):
        """A token as text; BOS and EOS (which have none) by their marker names."""
        special = {self.tokenizer.bos_id: BOS_TOKEN, self.tokenizer.eos_id: EOS_TOKEN}
        return special.get(token) or self.tokenizer.decode([token])

    def add(self, event) -> None:
        self.n += 1
        self.finish = event.finish_reason or self.finish
        self.text += event.text
        if self.top_n is not None and event.token is not None:
            self._entry(event.token, event.logprob)

    def release(self):
        """The logprobs object for the entries the text now covers (None without logprobs)."""
        if self.top_n is None:
            return None
        covered = len(self.text)
        out = []
        for e in self.pending:          # in order: stop at the first entry not yet covered
            if not (e[1] < covered or (e[0] in (BOS_TOKEN, EOS_TOKEN) and e[1] <= covered)):
                break
            out.append(e)
        self.pending = self.pending[len(out):]
        return {"tokens": [e[0] for e in out], "token_logprobs": [e[2] for e in out],
                "top_logprobs": [e[3] for e in out], "text_offset": [e[1] for e in out]}
