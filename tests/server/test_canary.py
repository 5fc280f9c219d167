from __future__ import annotations

import pytest

from server.canary import WORDS, contains, new_canary
from server.config import load_settings
from server.errors import ConfigError
from server.profiles import find_profile


def test_a_new_canary_is_enc_and_three_words_random_per_process():
    canaries = {new_canary() for _ in range(50)}
    assert len(canaries) > 45  # ~24 bits each: repeats in 50 draws are rare
    for c in canaries:
        head, *words = c.split(" ")
        assert head == "enc" and len(words) == 3 and set(words) <= set(WORDS)


def test_canary_found_whatever_its_case_or_line_breaks():
    assert contains("Sure: [ENC Orbit\ncanyon  lantern] You are", "enc orbit canyon lantern")
    assert not contains("The orbit of the canyon lantern", "enc orbit canyon lantern")
    assert contains("see [enc-e2e-canary]", "enc-e2e-canary")  # pinned hex-style ones too


def test_canary_costs_the_default_model_six_prompt_tokens():
    # The point of words: each is one token after a space, where hex is one per character.
    from vllm.tokenizers import get_tokenizer

    from server.checkpoints import checkpoint_dir

    settings = load_settings()
    tokenizer = get_tokenizer(str(checkpoint_dir(find_profile(settings.profiles_dir, "smollm2"), settings.models_dir)))
    assert [w for w in WORDS if len(tokenizer.encode(" " + w, add_special_tokens=False)) != 1] == []
    base = len(tokenizer.encode("You are the support assistant.", add_special_tokens=False))
    for w in WORDS:  # each word first and last: nothing merges with "enc" or "]"
        marked = len(tokenizer.encode(f"[enc {w} orbit {w}] You are the support assistant.", add_special_tokens=False))
        assert marked - base == 6, w


@pytest.mark.parametrize("value", ["enc orbit canyon lantern", "enc-e7a1c0ffee"])
def test_pinned_canary_may_be_words_or_hex(monkeypatch, value):
    monkeypatch.setenv("ENCLAVE_RAILS_CANARY", value)
    assert load_settings().rails_canary == value


@pytest.mark.parametrize("value", ["enc  two", "short", "enc\norbit canyon", "enc orbit canyon <lantern>"])
def test_pinned_canary_refuses_what_is_not_words(monkeypatch, value):
    monkeypatch.setenv("ENCLAVE_RAILS_CANARY", value)
    with pytest.raises(ConfigError, match="rails_canary"):
        load_settings()
