"""The vLLM adapter's conversions, without starting an engine."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace


from server.config import load_settings
from server.engine.base import GenerationParams
from server.engine.vllm import VllmEngine, _logprobs, engine_arguments, kv_bytes_per_token
from server.profiles import find_profile
from server.protocol import JSON_OBJECT_SCHEMA
from server.toolcalls.constraint import response_format_regex


def test_engine_arguments_merge_profile_then_overrides():
    profile = find_profile(load_settings().profiles_dir, "smollm2")
    args = engine_arguments(profile, Path("/ckpt"), {"max_num_seqs": 4})
    assert args["model"] == "/ckpt" and args["max_model_len"] == 8192 and args["dtype"] == "bfloat16"
    assert args["enforce_eager"] is True and args["max_num_seqs"] == 4
    assert args["structured_outputs_config"] == {"backend": "xgrammar"}


def test_sampling_params_carry_every_field():
    engine = VllmEngine.__new__(VllmEngine)
    params = GenerationParams(max_tokens=7, n=2, temperature=0.5, top_p=0.9, top_k=5, seed=3, stop=("x",),
                              presence_penalty=0.1, frequency_penalty=0.2, repetition_penalty=1.1, min_tokens=1,
                              ignore_eos=True, logprobs=2, json_schema=JSON_OBJECT_SCHEMA)
    sp = engine._sampling_params(params)
    assert (sp.n, sp.max_tokens, sp.temperature, sp.top_p, sp.top_k, sp.seed) == (2, 7, 0.5, 0.9, 5, 3)
    assert sp.stop == ["x"] and sp.ignore_eos and sp.logprobs == 2 and sp.min_tokens == 1
    assert (sp.presence_penalty, sp.frequency_penalty, sp.repetition_penalty) == (0.1, 0.2, 1.1)
    # A response format goes to the engine as the server's own regex of the schema.
    assert sp.structured_outputs.json is None and sp.structured_outputs.regex == response_format_regex(JSON_OBJECT_SCHEMA)


def test_bad_words_reach_vllm_tokenised_once_per_list_as_vllm_tokenises_them():
    from vllm.sampling_params import SamplingParams
    from vllm.tokenizers import get_tokenizer

    from server.checkpoints import checkpoint_dir

    settings = load_settings()
    tokenizer = get_tokenizer(str(checkpoint_dir(find_profile(settings.profiles_dir, "smollm2"), settings.models_dir)))
    asked = []
    engine = VllmEngine.__new__(VllmEngine)
    engine._bad_words = {}
    engine._llm = SimpleNamespace(get_tokenizer=lambda: asked.append(1) or tokenizer)
    words = ("I'm sorry", "chatbot", "as an AI")
    own = SamplingParams(bad_words=list(words))
    own.update_from_tokenizer(tokenizer)
    for _ in range(3):
        sp = engine._sampling_params(GenerationParams(max_tokens=4, bad_words=words))
        assert sp.bad_words_token_ids == own.bad_words_token_ids and len(own.bad_words_token_ids) >= len(words)
        sp.update_from_tokenizer(tokenizer)  # what vLLM does on the way in: nothing left to redo
        assert sp.bad_words_token_ids == own.bad_words_token_ids
    assert len(asked) == 1
    assert engine._sampling_params(GenerationParams(max_tokens=4)).bad_words_token_ids is None


def test_logprobs_keep_top_k_in_rank_order_and_clamp_infinity():
    lp = lambda v, rank, tok: SimpleNamespace(logprob=v, rank=rank, decoded_token=tok)
    # The sampled token (9) ranks 5th: outside the top 2, so it is not among the alternatives.
    entries = [{9: lp(-3.0, 5, "z"), 1: lp(-0.1, 1, "a"), 2: lp(float("-inf"), 2, "b")}]
    [out] = _logprobs(entries, [9], 2)
    assert out.token == "z" and out.logprob == -3.0
    assert out.top == (("a", -0.1), ("b", -9999.0))


def test_the_cpu_kv_cache_is_sized_from_the_profile_and_the_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64}))
    profile = find_profile(load_settings().profiles_dir, "smollm2")
    per_token = 2 * 30 * 3 * 64 * 2  # K and V, layers, KV heads, head size, bf16
    assert kv_bytes_per_token(tmp_path, "bfloat16") == per_token == 23040
    args = engine_arguments(profile, tmp_path, {"max_model_len": 2048})
    wanted = profile.kv_cache_sequences * 2048 * per_token * 17 // 16
    assert wanted <= args["kv_cache_memory_bytes"] < wanted + (1 << 20) and args["kv_cache_memory_bytes"] % (1 << 20) == 0
    # An explicit size wins; so does a GPU profile's own memory management.
    assert engine_arguments(profile, tmp_path, {"kv_cache_memory_bytes": 123})["kv_cache_memory_bytes"] == 123
    gpu = find_profile(load_settings().profiles_dir, "llama-3.1-8b")
    assert "kv_cache_memory_bytes" not in engine_arguments(gpu, tmp_path)
    # A checkpoint that does not say: vLLM's own default.
    assert "kv_cache_memory_bytes" not in engine_arguments(profile, tmp_path / "nowhere")
