"""Offline GPT-2 tokenizer: exact ids, round trips, special token."""
import pytest
import tiktoken

from gptcore.tokenizer import ENDOFTEXT, decode, encode, get_encoding


@pytest.mark.parametrize("text,ids", [
    ("Hello world", [15496, 995]),
    (" the", [262]),
    ("Hello, world!", [15496, 11, 995, 0]),
    ("GPT-2", [38, 11571, 12, 17]),
    (ENDOFTEXT, [50256]),
])
def test_known_gpt2_ids(text, ids):
    assert encode(text) == ids


def test_is_a_tiktoken_encoding_with_gpt2_vocab():
    enc = get_encoding("gpt2")
    assert isinstance(enc, tiktoken.Encoding)
    assert enc.n_vocab == 50257 and enc.eot_token == 50256 and enc.name == "gpt2"


@pytest.mark.parametrize("text", ["", "naïve café — 東京 🚀", "  leading and trailing  \n\n", "a" * 5000])
def test_round_trip(text):
    assert decode(encode(text)) == text


def test_plain_encode_refuses_special_token_by_default():
    # tiktoken's own guard: literal special tokens need allowed_special (gptcore.encode allows <|endoftext|>)
    with pytest.raises(ValueError):
        get_encoding().encode(ENDOFTEXT)
