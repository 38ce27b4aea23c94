"""GPTConfig: presets, foreign key spellings, validation."""
import pytest

from gptcore import GPT, GPTConfig, PRESETS


@pytest.mark.parametrize("name,layers,dim,heads", [
    ("gpt2", 12, 768, 12), ("gpt2-medium", 24, 1024, 16), ("gpt2-large", 36, 1280, 20),
    ("gpt2-xl", 48, 1600, 25), ("small-384", 8, 384, 6), ("small-480", 12, 480, 12),
])
def test_presets(name, layers, dim, heads):
    c = GPTConfig.from_preset(name)
    assert (c.n_layers, c.emb_dim, c.n_heads) == (layers, dim, heads)
    assert c.head_dim * c.n_heads == c.emb_dim


def test_seed_context_lengths():
    assert GPTConfig.from_preset("small-384").context_length == 512
    assert GPTConfig.from_preset("small-480").context_length == 256


def test_gpt2_124m_parameter_count():
    # OpenAI's GPT-2 small: 124,439,808 parameters with the tied LM head counted once.
    assert GPT(GPTConfig.from_preset("gpt2"), backend="torch").num_params() == 124_439_808


def test_preset_overrides_and_unknown_preset():
    c = GPTConfig.from_preset("tiny", context_length=32)
    assert c.context_length == 32 and c.emb_dim == PRESETS["tiny"].emb_dim
    with pytest.raises(ValueError, match="unknown preset 'gpt5'.*gpt2-medium"):
        GPTConfig.from_preset("gpt5")


def test_llms_from_scratch_dict():
    d = {"vocab_size": 50257, "context_length": 256, "emb_dim": 768, "n_heads": 12,
         "n_layers": 12, "drop_rate": 0.1, "qkv_bias": False}
    c = GPTConfig.from_dict(d)
    assert (c.context_length, c.emb_dim, c.drop_rate, c.qkv_bias) == (256, 768, 0.1, False)
    assert GPTConfig.from_dict(c.to_dict()) == c


def test_nanogpt_dict():
    d = {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256, "bias": True,
         "vocab_size": 65, "dropout": 0.2}
    c = GPTConfig.from_dict(d)
    assert (c.n_layers, c.n_heads, c.emb_dim, c.context_length, c.vocab_size, c.drop_rate) == (6, 6, 384, 256, 65, 0.2)
    with pytest.raises(ValueError, match="bias=False"):
        GPTConfig.from_dict({**d, "bias": False})


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['n_embed'\].*emb_dim"):
        GPTConfig.from_dict({"n_embed": 768})


@pytest.mark.parametrize("kw,msg", [
    ({"emb_dim": 100, "n_heads": 12}, "divisible by n_heads"),
    ({"n_layers": 0}, "n_layers must be a positive integer"),
    ({"vocab_size": -5}, "vocab_size must be a positive integer"),
    ({"context_length": 2.5}, "context_length must be a positive integer"),
    ({"drop_rate": 1.0}, "drop_rate"),
    ({"pos_emb": "alibi"}, "pos_emb"),
    ({"pos_emb": "rope", "emb_dim": 12, "n_heads": 4}, "even head_dim"),
])
def test_invalid_configs(kw, msg):
    with pytest.raises(ValueError, match=msg):
        GPTConfig(**kw)
