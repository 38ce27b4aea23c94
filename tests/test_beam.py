"""Beam search (Generator.beam_search, ``python -m gptcore.generate --num-beams``).

Width 1 is greedy decoding; with width V**(N-1) over a V-token vocabulary and N new tokens beam
search is exhaustive, so it must return what a brute-force search over all V**N continuations
(scored by the cache-less model) finds; narrower widths equal a plain re-implementation of beam
search on the cache-less model.
"""
import itertools

import pytest
import torch

from gptcore.generate import Generator, generate
from tinymodel import spread_tiny


def _model(vocab=6, seed=0):
    return spread_tiny(vocab, seed)


@torch.no_grad()
def _score(model, prompt, cont):
    logits = model(torch.tensor([prompt + cont]))[0].float()
    lp = torch.log_softmax(logits, -1)
    return sum(lp[len(prompt) - 1 + i, t].item() for i, t in enumerate(cont))


@torch.no_grad()
def _naive_beam(model, prompt, n, k):
    beams = [([], 0.0)]
    for _ in range(n):
        cand = []
        for seq, s in beams:
            lp = torch.log_softmax(model(torch.tensor([prompt + seq]))[0, -1].float(), -1)
            cand += [(seq + [t], s + lp[t].item()) for t in range(lp.numel())]
        beams = sorted(cand, key=lambda c: -c[1])[:k]
    return beams[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_width_one_is_greedy(seed):
    m = _model(vocab=64, seed=seed)
    prompt = [3, 1, 4, 1, 5][: seed + 2]
    toks, _ = Generator(m).beam_search(prompt, 10, num_beams=1)
    assert toks == generate(m, [prompt], 10, temperature=0)[0]


@pytest.mark.parametrize("seed", [0, 1])
def test_exhaustive_width_finds_brute_force_best(seed):
    V, N = 5, 3
    m = _model(vocab=V, seed=seed)
    prompt = [seed % V, (seed + 2) % V]
    best = max(itertools.product(range(V), repeat=N), key=lambda c: _score(m, prompt, list(c)))
    toks, score = Generator(m).beam_search(prompt, N, num_beams=V ** (N - 1))
    assert toks == list(best)
    assert abs(score - _score(m, prompt, toks)) < 1e-4


@pytest.mark.parametrize("k", [2, 3])
def test_narrow_width_equals_plain_beam_search(k):
    m = _model(vocab=7, seed=5)
    prompt = [1, 2, 3]
    toks, score = Generator(m).beam_search(prompt, 5, num_beams=k)
    ref, ref_score = _naive_beam(m, prompt, 5, k)
    assert toks == ref and abs(score - ref_score) < 1e-4


def test_stop_tokens_and_errors():
    m = _model(vocab=6, seed=1)
    toks, _ = Generator(m).beam_search([1, 2], 8, num_beams=3, stop_tokens=[0, 1, 2, 3, 4, 5])
    assert len(toks) == 1   # every token stops
    with pytest.raises(ValueError, match="num_beams"):
        Generator(m).beam_search([1], 3, num_beams=0)
    with pytest.raises(ValueError, match="context_length"):
        Generator(m).beam_search([1] * 60, 10, num_beams=2)


@pytest.mark.slow
def test_cli_num_beams():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "gptcore.generate", "--preset", "tiny", "--prompt-ids", "1,2,3",
                        "--num-beams", "3", "--max-new-tokens", "4", "--backend", "torch"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "best of 3 beams" in r.stdout
