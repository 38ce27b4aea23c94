"""OpenAI-compatible HTTP API over the engine (FastAPI; run by uvicorn in gptcore.serve.__main__).

    app = create_app(engine, model_name="gpt2")     # engine: gptcore.serve.engine.Engine, started

Endpoints:
  POST /v1/completions        prompt: a string, a list of token ids, or a list of either (one
                              request per prompt; choice index = prompt * n + j)
  POST /v1/chat/completions   messages rendered by the plain chat template below
  GET  /v1/models             the one model served
  GET  /health                200 {"status": "ok"} while the engine thread runs, else 503
  GET  /metrics               Prometheus text: queue depth, running requests, KV blocks
                              used/free/total, KV utilisation, tokens/s, generated tokens
Both POSTs stream server-sent events with "stream": true (one `data: {json}` chunk per step's
text, ending with `data: [DONE]`); "stream_options": {"include_usage": true} adds a last chunk
with the token counts.

Chat template (GPT-2-style models have none of their own): each message becomes
    "<Role>: <content>\\n\\n"       Role = System, User or Assistant
and the prompt ends with "Assistant:"; generation stops at "\\nUser:" (besides the request's own
stop strings, the eos token and max_tokens), so a model that continues the dialogue does not
answer for the user.

Settings beyond OpenAI's (as vLLM names them): top_k, stop_token_ids, ignore_eos. Sampling and
stopping follow gptcore.serve.sampling; logprobs are the model's log-softmax before temperature.

Bad input is an HTTP 400 in OpenAI's error shape, {"error": {"message", "type":
"invalid_request_error", "param": <the field>, "code"}}: a body that is not UTF-8 or not JSON,
unknown fields, wrong types, out-of-range values, an empty or too long prompt, max_tokens that
does not fit the context. An unknown model is a 404. A full queue (or a draining server) is a
503 with Retry-After. A client that disconnects cancels its requests at once (the engine frees
their blocks in its next step).

One cohesive thing, hence ~500 lines: the HTTP surface of the engine (request schemas, their
errors, the endpoints and their streams); the engine itself is gptcore.serve.engine.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from gptcore.serve.engine import Engine, EngineFull, Event
from gptcore.serve.sampling import MAX_LOGPROBS, ParamError, SamplingParams

CHAT_STOP = "\nUser:"
ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def render_chat(messages: list[dict]) -> str:
    """The plain chat template (module doc)."""
    return "".join(f"{ROLES[m['role']]}: {m['content']}\n\n" for m in messages) + "Assistant:"


# ---- request schemas (strict types, unknown fields refused) -------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Optional[int] = None
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: Optional[list[int]] = None
    seed: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False
    user: Optional[str] = None
    logit_bias: Optional[dict[str, float]] = None


class CompletionRequest(_Common):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = 16
    logprobs: Optional[int] = None
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str
    name: Optional[str] = None


class ChatRequest(_Common):
    messages: list[ChatMessage]
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None


# ---- errors ------------------------------------------------------------------------------------
def _error(status: int, message: str, param: Optional[str] = None, kind: str = "invalid_request_error",
           headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status, headers=headers)


class _BadRequest(Exception):
    def __init__(self, param: Optional[str], message: str, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.param, self.message, self.status, self.kind = param, message, status, kind


def _sse_response(chunks, events) -> StreamingResponse:
    """Stream chunks as server-sent events; closing the stream (a client that went away) closes
    the engine event generator at once, which cancels its requests."""
    async def body():
        try:
            async for c in chunks:
                yield c
        finally:
            await events.aclose()

    return StreamingResponse(body(), media_type="text/event-stream")


async def _collect(events, n: int) -> tuple[dict[int, dict], Optional[str]]:
    """Every choice's text, logprobs, token count and finish reason (non-streamed responses),
    keyed by choice index (prompt * n + j), and the first engine error if one happened."""
    choices: dict[int, dict] = {}
    try:
        async for i, ev in events:
            if ev.error:
                return choices, ev.error
            idx = i * n + ev.index
            c = choices.setdefault(idx, {"index": idx, "text": "", "lps": [], "finish_reason": None, "n": 0})
            c["text"] += ev.text
            c["lps"] += ev.logprobs
            c["n"] = ev.completion_tokens
            if ev.finish_reason:
                c["finish_reason"] = ev.finish_reason
    finally:
        await events.aclose()
    return choices, None


def _validation_message(e: ValidationError) -> tuple[str, str]:
    err = e.errors()[0]
    loc = [str(x) for x in err["loc"]]
    field = loc[0] if loc else "body"
    if err["type"] == "extra_forbidden":
        return field, f"unknown field {'.'.join(loc)!r}; remove it (see the API's fields in gptcore.serve.api)"
    if err["type"] == "missing":
        return field, f"{'.'.join(loc)}: field required"
    if field == "prompt":
        return field, ("prompt: must be a string, a list of strings, a list of token ids or a list of lists "
                       f"of token ids, got {type(err.get('input')).__name__ if 'input' in err else '?'}"
                       if len(loc) <= 2 else f"prompt: {err['msg']}")
    # union members add their type names to the location; keep the field path readable
    path = ".".join(x for x in loc if not any(c in x for c in "[]") and x not in ("str", "int", "float"))
    return field, f"{path}: {err['msg']} (got {err.get('input')!r})"


async def _parse(request: Request, schema):
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _BadRequest("body", f"the request body is not valid UTF-8 (byte {e.start})")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise _BadRequest("body", f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}")
    if not isinstance(data, dict):
        raise _BadRequest("body", f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        field, msg = _validation_message(e)
        raise _BadRequest(field, msg)


# ---- the app -----------------------------------------------------------------------------------
class _Mailbox:
    """Engine-thread events -> one event loop, with one wake-up per batch instead of one per event.

    The engine emits an event per running request per step; ``loop.call_soon_threadsafe`` for
    each would write to the loop's self-pipe and wake it (and take the GIL from the engine
    thread) once per event. Here the engine thread only appends; the first append after a drain
    schedules one drain, which hands every queued event to its request's queue.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.items: list = []
        self.scheduled = False

    def post(self, q: "asyncio.Queue", ev) -> None:
        with self.lock:
            self.items.append((q, ev))
            if self.scheduled:
                return
            self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:   # the loop has closed (server shutting down): nobody listens
            pass

    def _drain(self) -> None:
        with self.lock:
            items, self.items, self.scheduled = self.items, [], False
        for q, ev in items:
            q.put_nowait(ev)



def create_app(engine: Engine, model_name: str, tokenizer=None) -> FastAPI:
    tokenizer = tokenizer if tokenizer is not None else engine.tokenizer
    app = FastAPI(title="gptcore", description="OpenAI-compatible serving of a gptcore GPT model")
    created = int(time.time())
    app.state.engine = engine
    mailbox: list[Optional[_Mailbox]] = [None]     # engine events -> the serving loop (see _Mailbox)

    def encode(text: str, field: str) -> list[int]:
        if tokenizer is None:
            raise _BadRequest(field, "this server has no tokenizer; send token ids")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise _BadRequest(field, "the text is not valid Unicode (lone surrogate)")
        return tokenizer.encode(text, allowed_special={"<|endoftext|>"})

    def token_str(t: int) -> str:
        return tokenizer.decode_single_token_bytes(t).decode("utf-8", errors="replace") if tokenizer else str(t)

    def check_model(body) -> None:
        if body.model != model_name:
            raise _BadRequest("model", f"the model {body.model!r} does not exist; this server serves "
                                       f"{model_name!r}", status=404, kind="not_found_error")

    def params_of(body, max_tokens, logprobs, extra_stop=()) -> SamplingParams:
        if body.logit_bias:
            raise _BadRequest("logit_bias", "logit_bias is not supported; leave it out")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        top_k = None if body.top_k in (None, -1, 0) else body.top_k
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_k=top_k, top_p=body.top_p,
                              stop=tuple(stop) + tuple(extra_stop), stop_token_ids=tuple(body.stop_token_ids or ()),
                              seed=body.seed, n=body.n, logprobs=logprobs, presence_penalty=body.presence_penalty,
                              frequency_penalty=body.frequency_penalty, ignore_eos=body.ignore_eos)

    async def run(request: Request, prompts: list[list[int]], params: SamplingParams):
        """Submit every prompt; yield engine events until each request is done. Cancels on exit."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[Event] = asyncio.Queue()
        if mailbox[0] is None or mailbox[0].loop is not loop:   # the app's loop (one per server)
            mailbox[0] = _Mailbox(loop)
        post = mailbox[0].post

        def on_event(ev: Event) -> None:
            post(q, ev)

        for p in prompts:  # validate all before submitting any
            try:
                engine.check(p, params)
            except ParamError as e:
                raise _BadRequest(e.field, str(e))
        ids: list[int] = []
        try:
            for p in prompts:
                ids.append(engine.submit(p, params, on_event))
        except EngineFull as e:
            for rid in ids:
                engine.cancel(rid)
            raise _BadRequest(None, str(e), status=503, kind="server_overloaded")
        except ParamError as e:
            for rid in ids:
                engine.cancel(rid)
            raise _BadRequest(e.field, str(e))
        order = {rid: i for i, rid in enumerate(ids)}
        open_ids = set(ids)

        async def gen():
            try:
                while open_ids:
                    try:
                        ev = await asyncio.wait_for(q.get(), timeout=0.5)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            return
                        continue
                    if ev.done:
                        open_ids.discard(ev.request_id)
                        continue
                    yield order[ev.request_id], ev
            finally:
                for rid in open_ids:
                    engine.cancel(rid)

        return gen()

    @app.exception_handler(_BadRequest)
    async def _bad(request: Request, e: _BadRequest):
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return _error(e.status, e.message, e.param, e.kind, headers)

    @app.exception_handler(ValueError)
    async def _value(request: Request, e: ValueError):
        return _error(400, str(e))

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    # ---- completions ---------------------------------------------------------------------------
    def completion_logprobs(lps, offset0: int) -> dict:
        toks = [token_str(x.token) for x in lps]
        offs, o = [], offset0
        for t in toks:
            offs.append(o)
            o += len(t)
        return {"tokens": toks, "token_logprobs": [x.logprob for x in lps],
                "top_logprobs": [{token_str(t): v for t, v in x.top} for x in lps], "text_offset": offs}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _parse(request, CompletionRequest)
        check_model(body)
        if body.echo:
            raise _BadRequest("echo", "echo is not supported; leave it out or set it to false")
        if body.suffix:
            raise _BadRequest("suffix", "suffix is not supported")
        if body.best_of is not None and body.best_of != body.n:
            raise _BadRequest("best_of", "best_of other than n is not supported")
        p = body.prompt
        if isinstance(p, str):
            prompts = [encode(p, "prompt")]
        elif p and all(isinstance(x, str) for x in p):
            prompts = [encode(x, "prompt") for x in p]
        elif p and all(isinstance(x, list) for x in p):
            prompts = [list(x) for x in p]
        else:
            prompts = [list(p)]
        if not prompts or any(not x for x in prompts):
            raise _BadRequest("prompt", "prompt is empty; give at least one token of text")
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        params = params_of(body, max_tokens, body.logprobs)
        events = await run(request, prompts, params)
        rid, n = f"cmpl-{uuid.uuid4().hex}", body.n
        head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def stream():
                counts, offsets = {}, {}
                async for i, ev in events:
                    idx = i * n + ev.index
                    counts[idx] = ev.completion_tokens
                    lp = None
                    if body.logprobs is not None:
                        lp = completion_logprobs(ev.logprobs, offsets.get(idx, 0))
                        offsets[idx] = offsets.get(idx, 0) + sum(len(t) for t in lp["tokens"])
                    if ev.error:
                        yield sse({"error": {"message": ev.error, "type": "server_error", "param": None, "code": None}})
                        continue
                    if not ev.text and not ev.finish_reason and not ev.tokens:
                        continue
                    yield sse({**head, "choices": [{"index": idx, "text": ev.text, "logprobs": lp,
                                                    "finish_reason": ev.finish_reason}]})
                if include_usage:
                    pt = sum(len(x) for x in prompts)
                    yield sse({**head, "choices": [], "usage": usage(pt, sum(counts.values()))})
                yield "data: [DONE]\n\n"

            return _sse_response(stream(), events)
        choices, error = await _collect(events, n)
        if error:
            return _error(500, f"generation failed: {error}", kind="server_error")
        if await request.is_disconnected():
            return PlainTextResponse("", status_code=499)
        out = [{"index": c["index"], "text": c["text"],
                "logprobs": completion_logprobs(c["lps"], 0) if body.logprobs is not None else None,
                "finish_reason": c["finish_reason"]} for _, c in sorted(choices.items())]
        return {**head, "choices": out,
                "usage": usage(sum(len(x) for x in prompts), sum(c["n"] for c in choices.values()))}

    # ---- chat ----------------------------------------------------------------------------------
    def chat_logprobs(lps) -> dict:
        def entry(t, v):
            s = token_str(t)
            return {"token": s, "logprob": v, "bytes": list(s.encode("utf-8"))}

        return {"content": [{**entry(x.token, x.logprob), "top_logprobs": [entry(t, v) for t, v in x.top]}
                            for x in lps]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await _parse(request, ChatRequest)
        check_model(body)
        if not body.messages:
            raise _BadRequest("messages", "messages is empty; give at least one message")
        if body.top_logprobs is not None:
            if not body.logprobs:
                raise _BadRequest("top_logprobs", "top_logprobs needs logprobs: true")
            if not 0 <= body.top_logprobs <= MAX_LOGPROBS:
                raise _BadRequest("top_logprobs", f"must be in [0, {MAX_LOGPROBS}], got {body.top_logprobs}")
        prompt = encode(render_chat([m.model_dump() for m in body.messages]), "messages")
        mt = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        if mt is None:
            mt = max(1, engine.max_seq_len - len(prompt))
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = params_of(body, mt, logprobs, extra_stop=(CHAT_STOP,))
        try:
            engine.check(prompt, params)
        except ParamError as e:
            f = "messages" if e.field == "prompt" else (field if e.field == "max_tokens" else e.field)
            raise _BadRequest(f, f"{f}: {e.message}")
        events = await run(request, [prompt], params)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        head = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_name}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chead = {**head, "object": "chat.completion.chunk"}

            async def stream():
                counts, started = {}, set()
                async for _, ev in events:
                    if ev.error:
                        yield sse({"error": {"message": ev.error, "type": "server_error", "param": None, "code": None}})
                        continue
                    counts[ev.index] = ev.completion_tokens
                    if ev.index not in started:
                        started.add(ev.index)
                        yield sse({**chead, "choices": [{"index": ev.index, "delta": {"role": "assistant", "content": ""},
                                                         "logprobs": None, "finish_reason": None}]})
                    if ev.text or ev.tokens:
                        yield sse({**chead, "choices": [{"index": ev.index, "delta": {"content": ev.text},
                                                         "logprobs": chat_logprobs(ev.logprobs) if body.logprobs else None,
                                                         "finish_reason": None}]})
                    if ev.finish_reason:
                        yield sse({**chead, "choices": [{"index": ev.index, "delta": {}, "logprobs": None,
                                                         "finish_reason": ev.finish_reason}]})
                if include_usage:
                    yield sse({**chead, "choices": [], "usage": usage(len(prompt), sum(counts.values()))})
                yield "data: [DONE]\n\n"

            return _sse_response(stream(), events)
        choices, error = await _collect(events, body.n)
        if error:
            return _error(500, f"generation failed: {error}", kind="server_error")
        out = [{"index": i, "message": {"role": "assistant", "content": c["text"]},
                "logprobs": chat_logprobs(c["lps"]) if body.logprobs else None,
                "finish_reason": c["finish_reason"]} for i, c in sorted(choices.items())]
        return {**head, "choices": out, "usage": usage(len(prompt), sum(c["n"] for c in choices.values()))}

    # ---- the rest ------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "gptcore", "max_model_len": engine.max_seq_len}]}

    @app.get("/health")
    async def health():
        alive = engine._thread is not None and engine._thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "engine not running"}, status_code=200 if alive else 503)

    from prometheus_client import CollectorRegistry, generate_latest, CONTENT_TYPE_LATEST
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class _EngineCollector:
        def collect(self):
            s = engine.stats()
            for name, key, doc in (
                    ("gptcore_queue_depth", "waiting", "requests waiting for admission"),
                    ("gptcore_running_requests", "running", "requests being prefilled or decoded"),
                    ("gptcore_kv_blocks_used", "blocks_used", "KV-cache blocks holding tokens"),
                    ("gptcore_kv_blocks_free", "blocks_free", "KV-cache blocks on the free list"),
                    ("gptcore_kv_blocks_total", "blocks_total", "KV-cache blocks in all"),
                    ("gptcore_kv_blocks_reserved", "blocks_reserved", "blocks reserved by admitted requests"),
                    ("gptcore_kv_utilization", "kv_utilization", "share of used block slots holding live tokens"),
                    ("gptcore_tokens_per_second", "tokens_per_s", "output tokens/s over the recent steps")):
                yield GaugeMetricFamily(name, doc, value=float(s[key]))
            yield CounterMetricFamily("gptcore_generated_tokens", "output tokens generated",
                                      value=float(s["generated_tokens"]))
            yield CounterMetricFamily("gptcore_engine_steps", "scheduler iterations run", value=float(s["steps"]))

    registry = CollectorRegistry()
    registry.register(_EngineCollector())

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
