"""The serving engine and its OpenAI-compatible HTTP server (gptcore.serve), on the CPU.

- engine: many prompts of different lengths, batched continuously with chunked prefill, give for
  each prompt exactly the tokens offline ``generate`` gives that prompt alone (greedy, fp32);
  a seeded sampled request gives offline generate's tokens with that seed; n choices, stop
  strings / tokens, logprobs, penalties; a full queue refuses; cancels and a failing step free
  their blocks; free blocks == total blocks after every test;
- HTTP: a real uvicorn server on 127.0.0.1 (fixture), driven by the official ``openai`` client
  (completions and chat, streamed and not) and by httpx for raw bodies: every bad input is a 400
  naming the field; a client that disconnects mid-stream frees its blocks; /metrics, /health,
  /v1/models; a bounded load test (300 requests, 16 at a time, random cancellations);
- the CLI: ``python -m gptcore.serve --preset tiny`` serves, and SIGTERM drains a running stream.
"""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from gptcore import GPT, GPTConfig  # noqa: E402
from gptcore.generate import generate  # noqa: E402
from gptcore.serve import Engine, EngineFull, ParamError, SamplingParams  # noqa: E402
from gptcore.serve.api import create_app, render_chat  # noqa: E402
from gptcore.tokenizer import get_encoding  # noqa: E402
from tinymodel import spread_tiny  # noqa: E402

CTX = 128


def _model(vocab=50257, seed=0):
    """Tiny untied model with widened weights, so greedy tokens vary and near-ties are rare."""
    return spread_tiny(vocab, seed, context_length=CTX)


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def small():
    """The same model with a 512-token vocabulary: engine tests that need no text run faster."""
    return _model(vocab=512)


@pytest.fixture(scope="module")
def enc():
    return get_encoding("gpt2")


def _prompts(n, seed, lo=1, hi=60, vocab=50257):
    g = random.Random(seed)
    return [[g.randrange(vocab) for _ in range(g.randint(lo, hi))] for _ in range(n)]


def _assert_no_leak(engine):
    assert engine.free_blocks() == engine.num_blocks
    assert engine._reserved == 0 and not engine._requests


# ---- engine ------------------------------------------------------------------------------------
def test_engine_matches_offline_generate_per_prompt(small):
    prompts = _prompts(10, seed=1, vocab=512)
    # small batch and chunk: requests queue, join mid-run, prompts span several prefill chunks
    eng = Engine(small, block_size=8, max_batch=4, prefill_chunk=24, eos_token_id=None)
    outs = eng.generate(prompts, SamplingParams(max_tokens=12, temperature=0))
    for p, o in zip(prompts, outs):
        assert o[0]["tokens"] == generate(small, [p], 12, temperature=0)[0]
        assert o[0]["finish_reason"] == "length"
    assert eng.steps > 12  # really interleaved, not one static batch
    _assert_no_leak(eng)


def test_engine_seeded_sampling_matches_offline(small):
    p = _prompts(1, seed=2, vocab=512)[0]
    eng = Engine(small, max_batch=4, eos_token_id=None)
    for kw in (dict(temperature=0.8, top_k=40), dict(temperature=1.2, top_p=0.9)):
        got = eng.generate([p], SamplingParams(max_tokens=8, seed=7, **kw))[0][0]["tokens"]
        assert got == generate(small, [p], 8, seed=7, **kw)[0]
    # same seed beside other traffic: same tokens
    other = _prompts(3, seed=3, vocab=512)
    outs = eng.generate([p] + other, SamplingParams(max_tokens=8, seed=7, temperature=0.8, top_k=40))
    assert outs[0][0]["tokens"] == generate(small, [p], 8, seed=7, temperature=0.8, top_k=40)[0]
    _assert_no_leak(eng)


def test_engine_n_choices_logprobs_penalties(small):
    p = _prompts(1, seed=4, vocab=512)[0]
    eng = Engine(small, max_batch=8, eos_token_id=None)
    out = eng.generate([p], SamplingParams(max_tokens=6, temperature=1.0, seed=3, n=3, logprobs=2))[0]
    assert len(out) == 3 and all(len(c["tokens"]) == 6 for c in out)
    assert len({tuple(c["tokens"]) for c in out}) > 1
    lp = out[0]["logprobs"][0]
    assert lp.token == out[0]["tokens"][0] and len(lp.top) == 2 and lp.top[0][1] >= lp.top[1][1]
    # logprobs equal the model's log-softmax at that position
    full = torch.log_softmax(small(torch.tensor([p]))[0, -1].float(), -1)
    assert abs(full[lp.token].item() - lp.logprob) < 1e-4
    assert lp.top[0][0] == int(full.argmax())
    # a big frequency penalty forbids repeating a token
    rep = eng.generate([p], SamplingParams(max_tokens=30, temperature=0, frequency_penalty=2.0,
                                           presence_penalty=2.0))[0][0]["tokens"]
    plain = eng.generate([p], SamplingParams(max_tokens=30, temperature=0))[0][0]["tokens"]
    assert len(set(rep)) >= len(set(plain))
    _assert_no_leak(eng)


def test_engine_stops(model, enc):
    p = _prompts(1, seed=5)[0]
    eng = Engine(model, tokenizer=enc, max_batch=4, eos_token_id=None)
    full = eng.generate([p], SamplingParams(max_tokens=20, temperature=0))[0][0]
    assert full["text"] == enc.decode(full["tokens"])
    t = full["tokens"]
    cut = eng.generate([p], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[t[5]]))[0][0]
    assert cut["tokens"] == t[: t.index(t[5])] and cut["finish_reason"] == "stop"
    stop = enc.decode(t[8:10])
    s = eng.generate([p], SamplingParams(max_tokens=20, temperature=0, stop=[stop]))[0][0]
    assert s["finish_reason"] == "stop" and s["text"] == full["text"][: full["text"].index(stop)]
    _assert_no_leak(eng)


def test_engine_bad_params_and_full_queue(small):
    eng = Engine(small, max_batch=2, max_queue=3, num_blocks=40, block_size=8)
    bad = [({"max_tokens": -1}, "max_tokens"), ({"max_tokens": 10 ** 9}, "max_tokens"),
           ({"temperature": -0.5}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": 0}, "top_k"),
           ({"n": 0}, "n"), ({"logprobs": 50}, "logprobs"), ({"presence_penalty": 3}, "presence_penalty"),
           ({"stop": ["x"]}, "stop")]  # no tokenizer: stop strings are refused
    for kw, field in bad:
        with pytest.raises(ParamError) as ei:
            eng.submit([1, 2], SamplingParams(**kw), lambda ev: None)
        assert ei.value.field == field
    with pytest.raises(ParamError, match="prompt"):
        eng.submit([], SamplingParams(), lambda ev: None)
    with pytest.raises(ParamError, match="prompt"):
        eng.submit([1] * CTX, SamplingParams(), lambda ev: None)
    with pytest.raises(ParamError, match="KV blocks"):   # 40 blocks of 8 < 1 x (100 + 28)... needs 16 x 3
        eng.submit([1] * 100, SamplingParams(max_tokens=28, n=3), lambda ev: None)
    events = []
    for _ in range(3):
        eng.submit([1, 2, 3], SamplingParams(max_tokens=4), events.append)
    with pytest.raises(EngineFull, match="capacity"):
        eng.submit([1, 2, 3], SamplingParams(max_tokens=4), events.append)
    while eng.has_work():
        eng.step()
    assert sum(e.done for e in events) == 3
    _assert_no_leak(eng)


def test_engine_cancel_and_failure_free_blocks(small, monkeypatch):
    eng = Engine(small, max_batch=4, block_size=8, prefill_chunk=16, eos_token_id=None)
    events = {}
    ids = [eng.submit(p, SamplingParams(max_tokens=40, temperature=0), lambda ev: events.setdefault(ev.request_id, []).append(ev))
           for p in _prompts(6, seed=6, lo=20, hi=60, vocab=512)]
    for _ in range(5):
        eng.step()
    assert eng.free_blocks() < eng.num_blocks
    for rid in ids[::2]:   # running, prefilling and still-waiting requests alike
        eng.cancel(rid)
    eng.step()
    for rid in ids[::2]:
        assert events[rid][-1].done and any(e.finish_reason == "cancelled" for e in events[rid])
    # a step that raises fails the requests in it (an error event), frees their blocks, engine goes on
    calls = {"n": 0}
    real = small.forward

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected fault")
        return real(*a, **k)

    monkeypatch.setattr(small, "forward", flaky)
    while eng.has_work():
        eng.step()
    monkeypatch.undo()
    reasons = [e.finish_reason for rid in ids[1::2] for e in events[rid] if e.finish_reason]
    assert "error" in reasons
    _assert_no_leak(eng)
    out = eng.generate([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0))
    assert len(out[0][0]["tokens"]) == 3
    _assert_no_leak(eng)


# ---- HTTP --------------------------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(model, enc):
    import uvicorn

    engine = Engine(model, tokenizer=enc, max_batch=16, block_size=16, max_queue=64, prefill_chunk=64,
                    seed=0).start()
    app = create_app(engine, "tiny-test")
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline and th.is_alive(), "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", engine
    srv.should_exit = True
    th.join(10)
    engine.stop()


@pytest.fixture
def client(server):
    url, _ = server
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)


def _wait_idle(engine, timeout=20):
    deadline = time.time() + timeout
    while engine.has_work() or engine.free_blocks() != engine.num_blocks:
        assert time.time() < deadline, engine.stats()
        time.sleep(0.02)


def test_http_completions_match_offline(server, client, model, enc):
    url, engine = server
    text = "The quick brown fox"
    ids = enc.encode(text)
    r = client.completions.create(model="tiny-test", prompt=text, max_tokens=10, temperature=0,
                                  extra_body={"ignore_eos": True})
    ref = generate(model, [ids], 10, temperature=0)[0]
    assert r.choices[0].text == enc.decode(ref) and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 10
    # streamed: the same text in pieces
    chunks = list(client.completions.create(model="tiny-test", prompt=text, max_tokens=10, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == enc.decode(ref)
    assert chunks[-1].choices[0].finish_reason == "length"
    # token-id prompt, n=2 seeded, logprobs
    r = client.completions.create(model="tiny-test", prompt=ids, max_tokens=5, temperature=0.9, seed=1, n=2,
                                  logprobs=3)
    assert [c.index for c in r.choices] == [0, 1]
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) <= 5
    assert all(len(t) <= 3 for t in lp.top_logprobs)
    _wait_idle(engine)


def test_http_concurrent_requests_equal_offline(server, model):
    url, engine = server
    prompts = _prompts(24, seed=7, hi=50)
    lens = [random.Random(i).randint(1, 30) for i in range(len(prompts))]
    results = [None] * len(prompts)

    def one(i):
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        r = c.completions.create(model="tiny-test", prompt=prompts[i], max_tokens=lens[i], temperature=0,
                                 logprobs=0, extra_body={"ignore_eos": True})
        results[i] = r.choices[0].logprobs.tokens

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    enc = get_encoding("gpt2")
    for i, p in enumerate(prompts):
        ref = generate(model, [p], lens[i], temperature=0)[0]
        assert results[i] == [enc.decode_single_token_bytes(t).decode("utf-8", "replace") for t in ref], i
    _wait_idle(engine)


def test_http_chat(server, client, enc):
    url, engine = server
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    r = client.chat.completions.create(model="tiny-test", messages=msgs, max_tokens=8, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(enc.encode(render_chat(msgs)))
    stream = client.chat.completions.create(model="tiny-test", messages=msgs, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    r = client.chat.completions.create(model="tiny-test", messages=msgs, max_tokens=3, temperature=0,
                                       logprobs=True, top_logprobs=2)
    assert all(len(x.top_logprobs) == 2 for x in r.choices[0].logprobs.content)
    _wait_idle(engine)


def test_http_sse_format(server):
    url, engine = server
    with httpx.stream("POST", url + "/v1/completions", timeout=60,
                      json={"model": "tiny-test", "prompt": "Hello", "max_tokens": 4, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [x for x in r.iter_lines() if x]
    assert all(x.startswith("data: ") for x in lines) and lines[-1] == "data: [DONE]"
    json.loads(lines[0][6:])


BAD = [
    (b'{"model": "tiny-test", "prompt": "hi"', "body"),                                  # malformed JSON
    (b'{"model": "tiny-test", "prompt": "\xff\xfe"}', "body"),                            # invalid UTF-8
    (b'[1, 2]', "body"),
    (b'{"model": "tiny-test", "prompt": "hi", "colour": 1}', "colour"),                  # unknown field
    (b'{"model": "tiny-test", "prompt": "hi", "max_tokens": "5"}', "max_tokens"),        # wrong type
    (b'{"model": "tiny-test", "prompt": "hi", "max_tokens": -3}', "max_tokens"),
    (b'{"model": "tiny-test", "prompt": "hi", "max_tokens": 100000000}', "max_tokens"),
    (b'{"model": "tiny-test", "prompt": ""}', "prompt"),                                 # empty prompt
    (b'{"model": "tiny-test", "prompt": []}', "prompt"),
    (b'{"model": "tiny-test", "prompt": "' + b"word " * 300 + b'"}', "prompt"),          # past the context
    (b'{"model": "tiny-test", "prompt": [1, 99999999]}', "prompt"),
    (b'{"model": "tiny-test", "prompt": "hi", "temperature": "hot"}', "temperature"),
    (b'{"model": "tiny-test", "prompt": "hi", "top_p": 1.5}', "top_p"),
    (b'{"model": "tiny-test", "prompt": "hi", "n": 0}', "n"),
    (b'{"model": "tiny-test", "prompt": "hi", "stream": "yes"}', "stream"),
    (b'{"model": "tiny-test", "prompt": "hi", "logprobs": 99}', "logprobs"),
    (b'{"model": "tiny-test", "prompt": "hi", "stop": [1]}', "stop"),
    (b'{"model": "tiny-test", "prompt": "hi", "seed": -1}', "seed"),
    (b'{"prompt": "hi"}', "model"),
]


@pytest.mark.parametrize("body,field", BAD, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD)])
def test_http_bad_input_is_400_naming_the_field(server, body, field):
    url, engine = server
    r = httpx.post(url + "/v1/completions", content=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and field in err["message"], err


def test_http_bad_chat_and_model(server):
    url, engine = server
    cases = [({"model": "tiny-test", "messages": []}, "messages"),
             ({"model": "tiny-test", "messages": [{"role": "robot", "content": "x"}]}, "messages"),
             ({"model": "tiny-test", "messages": [{"role": "user", "content": "x " * 200}]}, "messages"),
             ({"model": "tiny-test", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
             ({"model": "tiny-test", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
              "top_logprobs")]
    for body, field in cases:
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (body, r.text)
    r = httpx.post(url + "/v1/completions", json={"model": "gpt-9", "prompt": "x"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    with pytest.raises(openai.BadRequestError):
        openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0).completions.create(
            model="tiny-test", prompt="", max_tokens=3)
    _wait_idle(engine)


def test_http_disconnect_mid_stream_frees_blocks(server):
    url, engine = server
    with httpx.stream("POST", url + "/v1/completions", timeout=60,
                      json={"model": "tiny-test", "prompt": "Once upon a time", "max_tokens": 100,
                            "stream": True, "ignore_eos": True}) as r:
        it = r.iter_lines()
        got = 0
        for line in it:
            if line.startswith("data: {"):
                got += 1
            if got == 3:
                break
        assert engine.free_blocks() < engine.num_blocks
    _wait_idle(engine)   # the engine saw the cancel: every block is back
    assert engine.stats()["generated_tokens"] > 0


def test_http_models_health_metrics(server):
    url, engine = server
    m = httpx.get(url + "/v1/models").json()
    assert m["data"][0]["id"] == "tiny-test"
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    text = httpx.get(url + "/metrics").text
    for name in ("gptcore_queue_depth", "gptcore_running_requests", "gptcore_kv_blocks_used",
                 "gptcore_kv_blocks_free", "gptcore_tokens_per_second"):
        assert name in text
    assert f"gptcore_kv_blocks_total {float(engine.num_blocks)}" in text


@pytest.mark.slow
def test_http_load_with_random_cancels(server):
    """300 requests, 16 at a time, about a quarter cancelled mid-stream: every other request gets a
    complete answer, and at the end every KV block is free."""
    url, engine = server
    rng = random.Random(11)
    jobs = [(rng.randint(1, 40), rng.randint(1, 24), rng.random() < 0.25, rng.random() < 0.5) for _ in range(300)]
    errors, done = [], []
    lock = threading.Lock()
    queue = list(range(len(jobs)))

    def worker():
        with httpx.Client(base_url=url, timeout=120) as c:
            while True:
                with lock:
                    if not queue:
                        return
                    i = queue.pop()
                plen, mt, cancel, stream = jobs[i]
                body = {"model": "tiny-test", "prompt": [(i * 7 + k) % 50000 for k in range(plen)],
                        "max_tokens": mt, "temperature": 0.7, "ignore_eos": True, "stream": stream or cancel}
                try:
                    if body["stream"]:
                        with c.stream("POST", "/v1/completions", json=body) as r:
                            if r.status_code != 200:
                                errors.append((i, r.status_code, r.read()))
                                continue
                            n = 0
                            last = None
                            for line in r.iter_lines():
                                if line.startswith("data: "):
                                    n += 1
                                    last = line
                                    if cancel and n >= 2:
                                        break
                            if not cancel and last != "data: [DONE]":
                                errors.append((i, "no [DONE]", last))
                    else:
                        r = c.post("/v1/completions", json=body)
                        if r.status_code != 200 or r.json()["usage"]["completion_tokens"] != mt:
                            errors.append((i, r.status_code, r.text))
                    with lock:
                        done.append(i)
                except Exception as e:  # noqa: BLE001
                    errors.append((i, repr(e)))

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]
    assert len(done) == len(jobs)
    _wait_idle(engine, timeout=60)
    _assert_no_leak(engine)


# ---- CLI ---------------------------------------------------------------------------------------
def test_cli_help_documents_every_flag():
    from gptcore.serve.__main__ import build_parser

    text = build_parser().format_help()
    for action in build_parser()._actions:
        assert action.help, action.option_strings
    assert "--preset" in text and "--port" in text


@pytest.mark.slow
def test_cli_serves_and_sigterm_drains():
    port = _free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "gptcore.serve", "--preset", "tiny", "--port", str(port),
                             "--backend", "torch", "--log-level", "warning", "--max-batch", "4"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.2)
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 40, "stream": True, "ignore_eos": True,
                "temperature": 0}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = []
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                if len(lines) == 2:
                    proc.send_signal(signal.SIGTERM)   # mid-stream: the stream still completes
        assert lines[-1] == "data: [DONE]"
        text = "".join(json.loads(x[6:])["choices"][0]["text"] for x in lines[:-1])
        assert len(get_encoding("gpt2").encode(text)) >= 30  # (re-tokenizing may merge a few tokens)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- GPU ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gpu_engine_cuda_graph_decode_equals_eager_and_offline(backend):
    """On CUDA the decode step replays captured graphs (padded batch buckets, scratch-block rows);
    fp32 greedy must give offline generate's tokens per prompt, graph and eager alike."""
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("tiny", vocab_size=512, tie_weights=False, context_length=256)
    m = GPT(cfg, backend=backend).cuda().eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    prompts = _prompts(13, seed=21, hi=120, vocab=512)
    ref = [generate(m, [p], 24, temperature=0, cuda_graph=False)[0] for p in prompts]
    for graphs in (True, False):
        eng = Engine(m, max_batch=8, prefill_chunk=64, cuda_graphs=graphs, eos_token_id=None)
        eng.capture_graphs()   # every bucket before any request (padding rows only)
        outs = eng.generate(prompts, SamplingParams(max_tokens=24, temperature=0))
        assert eng.stats()["decode_mode"] == ("cuda-graph" if graphs else "eager")
        assert [o[0]["tokens"] for o in outs] == ref
        _assert_no_leak(eng)


@pytest.mark.gpu
def test_gpu_engine_gpt2_bf16_runs():
    m = GPT(GPTConfig.from_preset("gpt2"), backend="triton").cuda().to(torch.bfloat16).eval()
    eng = Engine(m, max_batch=16, num_blocks=512)
    outs = eng.generate(_prompts(20, seed=3, hi=300), SamplingParams(max_tokens=16, temperature=0.7, seed=1,
                                                                     ignore_eos=True))
    assert all(len(o[0]["tokens"]) == 16 for o in outs)
    assert eng.stats()["decode_mode"] == "cuda-graph"
    _assert_no_leak(eng)


@pytest.mark.gpu
def test_gpu_engine_pipelined_sampling_paths_match_offline():
    """On CUDA (graphs, pinned stage, tokens read one step late): seeded sampling equals offline
    generate with that seed, penalized greedy rows equal the no-cache reference, logprobs equal
    the model's log-softmax, all in shared batches; no leak."""
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("tiny", vocab_size=512, tie_weights=False, context_length=256)
    m = GPT(cfg, backend="triton").cuda().eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    ps = _prompts(6, seed=31, hi=100, vocab=512)
    eng = Engine(m, max_batch=4, prefill_chunk=64, eos_token_id=None)
    eng.capture_graphs()
    res = {}
    kinds = [dict(temperature=0.8, top_k=40, seed=5), dict(temperature=0, presence_penalty=1.5, frequency_penalty=0.5),
             dict(temperature=0, logprobs=2)]
    for i, p in enumerate(ps):
        eng.submit(p, SamplingParams(max_tokens=12, **kinds[i % 3]),
                   lambda ev, i=i: res.setdefault(i, []).append(ev))
    while eng.has_work():
        eng.step()
    assert eng.stats()["decode_mode"] == "cuda-graph"
    for i, p in enumerate(ps):
        toks = [t for ev in res[i] for t in ev.tokens]
        kw = kinds[i % 3]
        if "seed" in kw:
            assert toks == generate(m, [p], 12, temperature=0.8, top_k=40, seed=5, cuda_graph=False)[0]
        elif "presence_penalty" in kw:
            assert toks == _penalized_reference(m, p, 12, 1.5, 0.5)
        else:
            assert toks == generate(m, [p], 12, temperature=0, cuda_graph=False)[0]
            lp = [x for ev in res[i] for x in ev.logprobs][0]
            full = torch.log_softmax(m(torch.tensor([p], device="cuda"))[0, -1].float(), -1)
            assert abs(full[lp.token].item() - lp.logprob) < 1e-3 and lp.top[0][0] == int(full.argmax())
    _assert_no_leak(eng)


def test_engine_batched_first_prefill_chunks_match_offline():
    """Several prompts starting in one step are prefilled in one right-padded forward (seen in
    the forward shapes); each still gives exactly offline generate's greedy tokens, no leak."""
    torch.manual_seed(0)
    m = GPT(GPTConfig.from_preset("tiny", vocab_size=256, context_length=128), backend="torch").eval()
    g = random.Random(0)
    ps = [[g.randrange(256) for _ in range(g.randint(3, 40))] for _ in range(12)]
    eng = Engine(m, max_batch=8, prefill_chunk=100, eos_token_id=None)
    shapes, orig = [], m.hidden_states
    m.hidden_states = lambda ids, *a, **k: (shapes.append(tuple(ids.shape)), orig(ids, *a, **k))[1]
    try:
        outs = eng.generate(ps, SamplingParams(max_tokens=10, temperature=0))
    finally:
        m.hidden_states = orig
    assert any(b > 1 and t > 1 for b, t in shapes)
    assert [o[0]["tokens"] for o in outs] == [generate(m, [p], 10, temperature=0)[0] for p in ps]
    _assert_no_leak(eng)


# ---- the pipelined step, batched sampling and the prefill plan ----------------------------------
def _penalized_reference(m, prompt, n, presence, frequency):
    """Greedy decoding with OpenAI's presence/frequency penalties over the generated tokens, by
    a full forward per token (no cache): the oracle of the engine's per-slot count rows."""
    seq, out = list(prompt), []
    dev = next(m.parameters()).device
    counts = torch.zeros(m.config.vocab_size, device=dev)
    with torch.no_grad():
        for _ in range(n):
            logits = m(torch.tensor([seq], device=dev))[0, -1].float()
            logits = logits - (presence * (counts > 0).float() + frequency * counts)
            t = int(logits.argmax())
            out.append(t)
            seq.append(t)
            counts[t] += 1
    return out


def test_engine_penalties_batched_per_row_match_reference(small):
    """Penalized and plain rows share batches; slots are reused by later requests (their count
    rows must start from zero): every request gives its own reference tokens."""
    g = random.Random(11)
    settings = [(0.0, 0.0), (2.0, 0.0), (0.0, 1.5), (1.0, 1.0), (-1.0, 0.5)]
    reqs = [(p, settings[i % len(settings)]) for i, p in enumerate(_prompts(9, seed=12, lo=2, hi=20, vocab=512))]
    eng = Engine(small, max_batch=3, prefill_chunk=32, eos_token_id=None)
    results = {}
    for p, (pr, fr) in reqs:
        eng.submit(p, SamplingParams(max_tokens=10, temperature=0, presence_penalty=pr, frequency_penalty=fr),
                   lambda ev, key=(tuple(p), pr, fr): results.setdefault(key, []).extend(ev.tokens))
    while eng.has_work():
        eng.step()
    for p, (pr, fr) in reqs:
        assert results[(tuple(p), pr, fr)] == _penalized_reference(small, p, 10, pr, fr), (pr, fr)
    _assert_no_leak(eng)


def test_engine_never_launches_past_max_tokens(small):
    """The host reads a step's tokens one step later; the engine must still stop launching a
    sequence at max_tokens: exactly max_tokens - 1 decode rows per request (its first token
    comes from the prefill), also for a prompt + max_tokens that fills the context exactly."""
    ps = [_prompts(1, seed=13, lo=CTX - 9, hi=CTX - 9, vocab=512)[0]] + _prompts(4, seed=15, lo=3, hi=30, vocab=512)
    eng = Engine(small, max_batch=3, block_size=8, eos_token_id=None)
    rows, orig = [], small.forward
    small.forward = lambda ids, *a, **k: (rows.append(ids.shape[0] if ids.shape[1] == 1 else 0), orig(ids, *a, **k))[1]
    try:
        out = eng.generate(ps, SamplingParams(max_tokens=9, temperature=0))
    finally:
        del small.forward
    assert sum(rows) == len(ps) * (9 - 1)
    assert all(o[0]["finish_reason"] == "length" for o in out)
    assert [o[0]["tokens"] for o in out] == [generate(small, [p], 9, temperature=0)[0] for p in ps]
    _assert_no_leak(eng)


def test_engine_prefill_plan_few_forwards_per_step(small):
    """Per step: at most one later chunk (the oldest prompt's) and one padded forward over
    whole first chunks; a prompt that does not fit the remaining budget waits whole."""
    eng = Engine(small, max_batch=8, prefill_chunk=32, eos_token_id=None)
    calls, orig = [], small.hidden_states
    small.hidden_states = lambda ids, *a, **k: (calls.append((eng.steps, tuple(ids.shape))), orig(ids, *a, **k))[1]
    try:
        prompts = _prompts(8, seed=14, lo=5, hi=50, vocab=512)
        outs = eng.generate(prompts, SamplingParams(max_tokens=4, temperature=0))
    finally:
        del small.hidden_states
    per_step = {}
    for step, shape in calls:
        if shape[1] > 1:
            per_step.setdefault(step, []).append(shape)
    assert per_step and all(len(v) <= 2 for v in per_step.values())
    assert all(sum(b * t for b, t in v) <= 8 * 32 for v in per_step.values())
    assert [o[0]["tokens"] for o in outs] == [generate(small, [p], 4, temperature=0)[0] for p in prompts]
    _assert_no_leak(eng)


def test_engine_prefill_fault_after_a_completed_prompt_leaks_nothing(small):
    """A step whose second prefill forward raises, after its first completed a prompt: that
    request too ends (with an error event) and returns its blocks; the engine goes on."""
    eng = Engine(small, max_batch=4, prefill_chunk=32, block_size=8, eos_token_id=None)
    events = {}
    on = lambda ev: events.setdefault(ev.request_id, []).append(ev)  # noqa: E731
    a = eng.submit(_prompts(1, seed=16, lo=50, hi=50, vocab=512)[0], SamplingParams(max_tokens=4, temperature=0), on)
    eng.step()                                   # A's first chunk (32 of 50)
    b = eng.submit([1, 2, 3, 4, 5], SamplingParams(max_tokens=4, temperature=0), on)
    real, calls = eng.runner.prefill, []

    def flaky(group):
        calls.append(len(group))
        if len(calls) == 2:                      # B's whole prompt went first; A's later chunk raises
            raise RuntimeError("injected fault")
        return real(group)

    eng.runner.prefill = flaky
    try:
        while eng.has_work():
            eng.step()
    finally:
        del eng.runner.prefill
    for rid in (a, b):
        assert events[rid][-1].done and any(e.finish_reason == "error" for e in events[rid])
    _assert_no_leak(eng)
    assert eng.generate([[7, 8, 9]], SamplingParams(max_tokens=3, temperature=0))[0][0]["finish_reason"] == "length"
    _assert_no_leak(eng)


def test_engine_prefill_buckets_padded_forward_matches_offline(small):
    """The prefill graphs' padded (rows, tokens) bucket forward, run eagerly on the CPU: padding
    rows on the scratch slot, padding tokens past each prompt; greedy tokens still equal offline
    generate per prompt, and groups that fit no bucket (later chunks) still run eagerly."""
    eng = Engine(small, max_batch=6, prefill_chunk=48, eos_token_id=None)
    eng.runner.prefill_graphs = True
    shapes, orig = [], small.hidden_states
    small.hidden_states = lambda ids, *a, **k: (shapes.append(tuple(ids.shape)), orig(ids, *a, **k))[1]
    try:
        prompts = _prompts(2, seed=18, lo=60, hi=70, vocab=512) + _prompts(9, seed=17, lo=3, hi=20, vocab=512)
        outs = eng.generate(prompts, SamplingParams(max_tokens=6, temperature=0))
    finally:
        del small.hidden_states
    assert any(b in (2, 4, 8) and t in (16, 32) for b, t in shapes)      # bucketed first-chunk groups
    assert any(t > 1 and t not in (16, 32, 64) for b, t in shapes)       # later chunks: eager, unpadded
    assert [o[0]["tokens"] for o in outs] == [generate(small, [p], 6, temperature=0)[0] for p in prompts]
    assert eng.runner.pool.table[eng.runner.pool.pad_slot].eq(eng.num_blocks).all()   # pad row: scratch only
    _assert_no_leak(eng)
