import pytest
import torch

from hf_efficient import data


def test_splits_are_disjoint_fixed_and_complete():
    names = data.split_names()
    assert names["eval"] == list(data.EVAL_PLAYS)
    assert not set(names["train"]) & set(names["eval"])
    assert len(names["train"]) + len(names["eval"]) == len(data.play_files()) == 42
    assert names == data.split_names()


def test_corpus_loads_through_datasets_deterministically():
    import datasets

    ds = data.load_corpus()
    assert isinstance(ds, datasets.DatasetDict) and set(ds) == {"train", "eval"}
    assert ds["eval"]["play"] == list(data.EVAL_PLAYS)
    hamlet = ds["eval"][0]["text"]
    assert hamlet.startswith("HAMLET, PRINCE OF DENMARK") and "To be, or not to be" in hamlet
    again = data.load_corpus("eval")
    assert again["text"] == ds["eval"]["text"]
    # no held-out text leaks into training (not even the famous lines through another file)
    assert all("To be, or not to be" not in t for t in ds["train"]["text"])


def test_bad_split_name():
    with pytest.raises(ValueError, match="split must be one of"):
        data.load_corpus("validation")


def test_token_ids_prefix_and_windows(embedded_tokenizer):
    ids = data.token_ids(embedded_tokenizer, "eval", max_tokens=500)
    assert ids.shape == (500,) and ids.dtype == torch.long
    assert torch.equal(ids, data.token_ids(embedded_tokenizer, "eval", max_tokens=500))
    w1 = data.sample_windows(ids, 4, 64, seed=3)
    assert w1.shape == (4, 64) and torch.equal(w1, data.sample_windows(ids, 4, 64, seed=3))
    assert not torch.equal(w1, data.sample_windows(ids, 4, 64, seed=4))
    with pytest.raises(ValueError, match="need more than"):
        data.sample_windows(ids[:10], 1, 64)


def test_token_ids_are_cached_and_need_no_corpus_loader_on_a_hit(embedded_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_EFFICIENT_CACHE", str(tmp_path))
    first = data.token_ids(embedded_tokenizer, "eval", max_tokens=300)
    assert len(list((tmp_path / "tokens").glob("eval-2400-*.safetensors"))) == 1

    def no_loader(*a, **k):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(data, "load_corpus", no_loader)
    again = data.token_ids(embedded_tokenizer, "eval", max_tokens=300)
    assert torch.equal(first, again) and again.dtype == torch.long
    # Another vocabulary is another key: the stale cache must not answer for it.
    other = type("Tok", (), {"get_vocab": lambda self: {"a": 0}, "__call__": None})()
    with pytest.raises(AssertionError, match="cache was not used"):
        data._cached_tokens(other, "eval", 2400, data._cache_key(other, "eval"))


def test_token_ids_bad_split(embedded_tokenizer):
    with pytest.raises(ValueError, match="split must be one of"):
        data.token_ids(embedded_tokenizer, "validation", 10)
