import re

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


def _tiny_generator(tiny_llama_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_EFFICIENT_CACHE", str(tmp_path))
    monkeypatch.setattr(data, "GENERATION_PROMPTS", {"calib": ("Hello", "Write a poem."),
                                                     "eval": ("Hi", "Describe rain.")})
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_generated_text_is_reproducible_and_leaves_the_global_rng_alone(tiny_llama_dir, tmp_path, monkeypatch,
                                                                        one_thread):
    model, tok = _tiny_generator(tiny_llama_dir, tmp_path, monkeypatch)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    t = data.generated_text(model, tok, "calib", new_tokens=16)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's random stream went on as if nothing ran
    for f in (tmp_path / "generated").glob("*.json"):
        f.unlink()
    torch.manual_seed(7)  # another global state: the text depends on the recipe's seed only
    assert data.generated_text(model, tok, "calib", new_tokens=16) == t


def test_generated_text_shows_its_decode_steps(tiny_llama_dir, tmp_path, monkeypatch, one_thread, capsys):
    """progress=True draws a bar over the decode steps of the batched generate (and changes nothing in the text)."""
    model, tok = _tiny_generator(tiny_llama_dir, tmp_path, monkeypatch)
    quiet = data.generated_text(model, tok, "calib", new_tokens=12, progress=False)
    assert "generating calib text" not in capsys.readouterr().err
    for f in (tmp_path / "generated").glob("*.json"):
        f.unlink()
    assert data.generated_text(model, tok, "calib", new_tokens=12, progress=True) == quiet
    err = capsys.readouterr().err
    steps = [int(n) for n in re.findall(r"(\d+)/12", err)]
    assert "generating calib text" in err and steps and max(steps) >= 6  # min_new_tokens = 6: sampling may stop there


def test_generated_text_cache_is_keyed_by_the_recipe(tiny_llama_dir, tmp_path, monkeypatch, one_thread):
    model, tok = _tiny_generator(tiny_llama_dir, tmp_path, monkeypatch)
    files = lambda: sorted((tmp_path / "generated").glob("*.json"))  # noqa: E731
    t = data.generated_text(model, tok, "calib", new_tokens=16)
    assert data.generated_text(model, tok, "calib", new_tokens=16) == t and len(files()) == 1  # a cache hit
    data.generated_text(model, tok, "calib", new_tokens=16, seed=1)
    data.generated_text(model, tok, "calib", new_tokens=17)
    monkeypatch.setattr(data, "SAMPLING", dict(data.SAMPLING, temperature=0.5))
    data.generated_text(model, tok, "calib", new_tokens=16)
    monkeypatch.setattr(data, "GENERATION_PROMPTS", dict(data.GENERATION_PROMPTS, calib=("Hello", "Write a song.")))
    data.generated_text(model, tok, "calib", new_tokens=16)
    assert len(files()) == 5  # seed, length, sampling and prompts each made a new text, none reused the old one


def test_heldout_generated_text_is_not_calibration_text(tiny_llama_dir, tmp_path, monkeypatch, one_thread):
    """The held-out text has its own prompts and seed: no 8-token run of it occurs in the calibration text."""
    assert not set(data.GENERATION_PROMPTS["calib"]) & set(data.GENERATION_PROMPTS["eval"])
    assert data.HELDOUT_GENERATED["split"] == "eval" and data.HELDOUT_GENERATED["seed"] != 0  # calib uses seed 0
    model, tok = _tiny_generator(tiny_llama_dir, tmp_path, monkeypatch)
    monkeypatch.setattr(data, "GENERATED_TOKENS", 32)
    monkeypatch.setattr(data, "HELDOUT_GENERATED", dict(data.HELDOUT_GENERATED, new_tokens=32))
    held = data.heldout_ids(tok, "generated", 10_000, model)
    calib = tok(data.generated_text(model, tok, "calib"), add_special_tokens=False).input_ids
    grams = {tuple(calib[i:i + 8]) for i in range(len(calib) - 7)}
    assert held.numel() >= 2 * 16 and not any(tuple(held[i:i + 8].tolist()) in grams for i in range(held.numel() - 7))
