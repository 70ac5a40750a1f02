"""SpeculativeConfig: vLLM's names and n-gram defaults, and one-line errors for what it cannot run."""

from __future__ import annotations

import pytest

from microscale.config import SpeculativeConfig


def test_ngram_defaults_follow_vllm():
    assert SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 4}) == SpeculativeConfig(
        "ngram", 4, prompt_lookup_min=5, prompt_lookup_max=5)
    # One bound given: the other is it.
    only_max = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3})
    assert (only_max.prompt_lookup_min, only_max.prompt_lookup_max) == (3, 3)
    only_min = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2})
    assert (only_min.prompt_lookup_min, only_min.prompt_lookup_max) == (2, 2)


def test_from_json_and_draft():
    cfg = SpeculativeConfig.from_json(
        '{"method": "draft", "num_speculative_tokens": 5, "model": "/m/draft", "disable_by_batch_size": 8}')
    assert (cfg.method, cfg.num_speculative_tokens, cfg.model, cfg.disable_by_batch_size) == ("draft", 5, "/m/draft", 8)
    assert cfg.prompt_lookup_min is None and cfg.prompt_lookup_max is None


@pytest.mark.parametrize(("given", "message"), [
    ('{"method": "ngram"', "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 3}, r"unknown keys \['lookahead'\]"),
    ({"num_speculative_tokens": 2}, "needs method"),
    ({"method": "ngram"}, "needs num_speculative_tokens"),
    ({"method": "eagle", "num_speculative_tokens": 2}, "method must be one of ngram, draft; got 'eagle'"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be a positive integer, got 0"),
    ({"method": "ngram", "num_speculative_tokens": True}, "num_speculative_tokens must be a positive integer"),
    ({"method": "ngram", "num_speculative_tokens": "3"}, "num_speculative_tokens must be a positive integer"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 0}, "prompt_lookup_min must be a positive"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
     r"prompt_lookup_min \(4\) must not exceed prompt_lookup_max \(2\)"),
    ({"method": "ngram", "num_speculative_tokens": 2, "model": "/m/draft"}, "needs no model"),
    ({"method": "draft", "num_speculative_tokens": 2}, "model .* is required for method 'draft'"),
    ({"method": "draft", "num_speculative_tokens": 2, "model": "/m", "prompt_lookup_max": 3}, "ngram' only"),
    ({"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 0}, "disable_by_batch_size must be"),
])
def test_bad_configs_are_one_line_value_errors(given, message):
    with pytest.raises(ValueError, match=message) as info:
        SpeculativeConfig.from_json(given) if isinstance(given, str) else SpeculativeConfig.from_dict(given)
    assert "\n" not in str(info.value)


def test_the_cut_off_is_chosen_for_the_device_when_none_is_given() -> None:
    ngram, draft = SpeculativeConfig("ngram", 4), SpeculativeConfig("draft", 4, model="/m/draft")
    assert [c.for_device("cpu").disable_by_batch_size for c in (ngram, draft)] == [8, 1]
    assert [c.for_device("cuda").disable_by_batch_size for c in (ngram, draft)] == [32, 32]
    assert SpeculativeConfig("ngram", 4, disable_by_batch_size=3).for_device("cpu").disable_by_batch_size == 3
