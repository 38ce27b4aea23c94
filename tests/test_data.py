"""Data pipeline: sources, caching, batches, sliding windows, and bad input."""
import json

import numpy as np
import pytest
import torch

import gptcore.data as data
from gptcore.data import DataError, GPTDataset, create_dataloader, prepare
from gptcore.tokenizer import encode, get_encoding

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.txt").write_text(TEXT)
    (d / "b.md").write_text("Second document.\n\n" + TEXT)
    (d / "skip.bin").write_bytes(b"\x00\x01")
    return d


def test_default_corpus_is_real_english_and_offline(tmp_path):
    td = prepare("default", cache_dir=tmp_path / "c", progress=False)
    assert td.manifest["n_tokens"] > 100_000
    eot = get_encoding().eot_token
    assert int((np.asarray(td.splits["train"]) == eot).sum()) > 10  # documents separated
    text = get_encoding().decode(list(td.splits["train"][:200]))
    assert " the " in text


def test_folder_tokens_equal_direct_encoding(corpus, tmp_path):
    td = prepare(corpus, cache_dir=tmp_path / "c", val_fraction=0.0, progress=False)
    eot = get_encoding().eot_token
    expect = encode(TEXT) + [eot] + encode("Second document.\n\n" + TEXT) + [eot]  # a.txt, b.md; .bin ignored
    assert list(map(int, td.splits["train"])) == expect
    assert td.manifest["val_tokens"] == 0


def test_glob_and_file_sources(corpus, tmp_path):
    g = prepare(str(corpus / "*.txt"), cache_dir=tmp_path / "g", val_fraction=0.0, progress=False)
    f = prepare(corpus / "a.txt", cache_dir=tmp_path / "f", val_fraction=0.0, progress=False)
    assert list(g.splits["train"]) == list(f.splits["train"])


def test_cache_reused_until_source_changes(corpus, tmp_path, monkeypatch):
    cache = tmp_path / "c"
    first = prepare(corpus, cache_dir=cache, progress=False)
    calls = []
    real = data.tokenize_sources
    monkeypatch.setattr(data, "tokenize_sources", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = prepare(corpus, cache_dir=cache, progress=False)
    assert calls == [] and again.hash == first.hash
    (corpus / "a.txt").write_text(TEXT + " More.")
    changed = prepare(corpus, cache_dir=cache, progress=False)
    assert calls == [1] and changed.hash != first.hash
    man = json.loads((cache / "manifest.json").read_text())
    assert man["tokenizer"] == "gpt2" and len(man["sources"]) == 2 and all("sha256" in s for s in man["sources"])


def test_train_val_split_and_batches(corpus, tmp_path):
    td = prepare(corpus, cache_dir=tmp_path / "c", val_fraction=0.25, progress=False)
    n = td.manifest["n_tokens"]
    assert td.manifest["val_tokens"] == int(n * 0.25)
    x, y = td.get_batch("train", 4, 16, torch.Generator().manual_seed(1))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    x2, _ = td.get_batch("train", 4, 16, torch.Generator().manual_seed(1))
    assert torch.equal(x, x2)  # same generator state, same batch


def test_long_document_pieces_tokenize_like_the_whole(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "_PIECE_CHARS", 300)
    text = ("Paragraph one has words.\n\n\nAnd more words here.  \n\n" * 60)
    p = tmp_path / "long.txt"
    p.write_text(text)
    pieces = list(data._pieces(text))
    assert len(pieces) > 3 and "".join(pieces) == text
    td = prepare(p, cache_dir=tmp_path / "c", val_fraction=0.0, progress=False)
    assert list(map(int, td.splits["train"]))[:-1] == encode(text)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.txt"
    p.write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        prepare(p, cache_dir=tmp_path / "c")


def test_non_utf8_error_and_replace_policy(tmp_path, capsys):
    p = tmp_path / "latin1.txt"
    p.write_bytes("Caf\xe9 au lait, ".encode("latin-1") * 20)
    with pytest.raises(DataError, match=r"not valid UTF-8 \(byte 3.*errors='replace'"):
        prepare(p, cache_dir=tmp_path / "c")
    td = prepare(p, cache_dir=tmp_path / "c", errors="replace", val_fraction=0.0, progress=False)
    assert "\ufffd" in get_encoding().decode(list(td.splits["train"]))
    assert "replaced 20 invalid UTF-8" in capsys.readouterr().err


def test_missing_path_and_empty_glob(tmp_path):
    with pytest.raises(DataError, match="not found.*'default'"):
        prepare(tmp_path / "nope.txt")
    with pytest.raises(DataError, match="matches no files"):
        prepare(str(tmp_path / "*.nothing"))
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="holds no text files"):
        prepare(tmp_path / "d")


def test_corpus_shorter_than_one_window(tmp_path):
    p = tmp_path / "short.txt"
    p.write_text("Just a few words.")
    td = prepare(p, cache_dir=tmp_path / "c", val_fraction=0.0, progress=False)
    with pytest.raises(DataError, match=r"fewer than one window of block_size\+1 = 65"):
        td.get_batch("train", 2, 64)
    with pytest.raises(DataError, match="val split has 0 tokens"):
        td.get_batch("val", 2, 4)


def test_token_ids_beyond_vocab(corpus, tmp_path):
    td = prepare(corpus, cache_dir=tmp_path / "c", progress=False)
    td.check_vocab(50257)
    with pytest.raises(DataError, match="vocab_size is 100"):
        td.check_vocab(100)


def test_download_offline_names_url_and_alternative(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(data.urllib.request, "urlopen", refuse)
    with pytest.raises(DataError, match=r"tinyshakespeare/input.txt.*--data PATH"):
        data.download("shakespeare", tmp_path)
    assert not list(tmp_path.iterdir())  # no partial file left behind


def test_sliding_window_dataset():
    ids = list(range(50))
    ds = GPTDataset(ids, max_length=8, stride=4)
    assert len(ds) == (50 - 8 - 1) // 4 + 1
    x, y = ds[2]
    assert x.tolist() == list(range(8, 16)) and y.tolist() == list(range(9, 17))
    with pytest.raises(IndexError):
        ds[len(ds)]
    dl = create_dataloader(TEXT, batch_size=3, max_length=16, stride=16, shuffle=False)
    xb, yb = next(iter(dl))
    assert xb.shape == (3, 16) and torch.equal(xb[0, 1:], yb[0, :-1])
    with pytest.raises(DataError, match="fewer than one window"):
        GPTDataset("hi", max_length=8, stride=1)
    with pytest.raises(DataError, match="empty text"):
        GPTDataset("", max_length=8, stride=1)
