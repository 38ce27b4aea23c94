"""CPU-side hot spots, timed with pytest-benchmark (not part of the test suite).

    python -m pytest bench/ --benchmark-only            # all of them
    python -m pytest bench/ --benchmark-only -k sample  # one group

Tokenization throughput (gptcore.data.tokenize_sources on the embedded corpus), batch assembly
from the uint16 memmap (TokenData.get_batch), and top-k/top-p sampling of a GPT-2 logits row:
gptcore.generate.sample beside a textbook sort + multinomial sampler. `python -m pytest` alone
collects tests/ only (pyproject testpaths), so none of this runs in CI.
"""
import inspect

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from gptcore.data import default_corpus, prepare, tokenize_sources  # noqa: E402
from gptcore.tokenizer import get_encoding  # noqa: E402

V = 50257


@pytest.fixture(scope="module")
def corpus():
    return default_corpus()


@pytest.fixture(scope="module")
def token_data(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("hotspots")
    text = "\n\n".join(s.text for s in corpus)[: 1 << 20]  # ~1 MB of English
    (root / "corpus.txt").write_text(text)
    return prepare(str(root / "corpus.txt"), cache_dir=root / "cache", progress=False)


def test_tokenize_sources(benchmark, corpus):
    n_bytes = sum(len(s.text.encode()) for s in corpus)
    tokens = benchmark.pedantic(tokenize_sources, args=(corpus,), kwargs={"progress": False}, rounds=3)
    benchmark.extra_info.update(MB=n_bytes / 1e6, tokens=int(len(tokens)),
                                MB_per_s=n_bytes / 1e6 / benchmark.stats.stats.median)


def test_encode_one_string(benchmark, corpus):
    enc = get_encoding("gpt2")
    text = corpus[0].text * max(1, (100_000 // max(1, len(corpus[0].text))))
    ids = benchmark(enc.encode_ordinary, text)
    benchmark.extra_info.update(chars=len(text), tokens=len(ids))


@pytest.mark.parametrize("batch_size,block", [(16, 1024), (64, 256)])
def test_get_batch(benchmark, token_data, batch_size, block):
    g = torch.Generator().manual_seed(0)
    x, y = benchmark(token_data.get_batch, "train", batch_size, block, g)
    assert x.shape == (batch_size, block) and torch.equal(x[:, 1:], y[:, :-1])
    benchmark.extra_info["tokens_per_call"] = batch_size * block


def _sample_textbook(logits, temperature, top_k, top_p, generator):
    """Sort, cut at top-k and at cumulative probability top-p, softmax, multinomial."""
    probs, order = torch.sort(torch.softmax(logits / temperature, dim=-1), dim=-1, descending=True)
    probs[:, top_k:] = 0
    probs[(probs.cumsum(-1) - probs) >= top_p] = 0
    pick = torch.multinomial(probs, 1, generator=generator)
    return order.gather(-1, pick).squeeze(-1)


@pytest.mark.parametrize("batch", [1, 32])
def test_sample_textbook(benchmark, batch):
    logits = torch.randn(batch, V) * 3
    g = torch.Generator().manual_seed(0)
    tok = benchmark(_sample_textbook, logits, 0.8, 50, 0.95, g)
    assert tok.shape == (batch,)


@pytest.mark.parametrize("batch", [1, 32])
def test_sample_gptcore(benchmark, batch):
    gen = pytest.importorskip("gptcore.generate")
    sample = getattr(gen, "sample", None)
    if sample is None:
        pytest.skip("gptcore.generate has no sample()")
    logits = torch.randn(batch, V) * 3
    kw = dict(temperature=0.8, top_k=50, top_p=0.95)
    if "noise" in inspect.signature(sample).parameters:  # host-sync-free sampling takes its random draws
        tok = benchmark(lambda: sample(logits, noise=torch.empty(batch, V).exponential_(), **kw))
    else:
        tok = benchmark(sample, logits, **kw)
    assert tok.shape == (batch,)
