"""Tool calls and a `tools` column rendered through a chat template that supports them, rows a template
cannot render reported with file:line, and `data.chat_template` (a string or a file)."""

from __future__ import annotations

import json

import pytest

from dpokit.config_loader import load_config
from dpokit.data.records import PreferenceRecord, Problems, read_preferences
from dpokit.data.tokenize import (
    TokenizeSettings,
    chat_template_text,
    encode_records,
    render,
    tokenize_records,
    use_chat_template,
)
from dpokit.errors import ConfigError, DataError

# ChatML with tools in the style of Qwen2.5's template: the tool schemas in a system turn, each call as a
# <tool_call> JSON line, tool results as <tool_response> in a user turn
TOOL_TEMPLATE = r"""
{%- if tools %}{{ '<|im_start|>system\nYou may call these functions:\n' }}
{%- for tool in tools %}{{ (tool | tojson) + '\n' }}{% endfor %}{{ '<|im_end|>\n' }}{% endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' and message.tool_calls %}{{ '<|im_start|>assistant\n' }}
{%- if message.content %}{{ message.content + '\n' }}{% endif %}
{%- for call in message.tool_calls %}{{ '<tool_call>{"name": "' + call.function.name + '", "arguments": '
    + (call.function.arguments | tojson) + '}</tool_call>\n' }}{% endfor %}{{ '<|im_end|>\n' }}
{%- elif message.role == 'tool' %}{{ '<|im_start|>user\n<tool_response>' + message.content + '</tool_response><|im_end|>\n' }}
{%- else %}{{ '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"""

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
CALL = {"role": "assistant", "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
RESULT = {"role": "tool", "name": "get_weather", "content": "{\"temperature_c\": 18, \"sky\": \"cloudy\"}"}
PROMPT = [{"role": "user", "content": "What is the weather in Paris?"}]
CHOSEN = [CALL, RESULT, {"role": "assistant", "content": "It is 18 °C and cloudy in Paris."}]
REJECTED = [{"role": "assistant", "content": "I cannot know that."}]


@pytest.fixture
def tool_tokenizer(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    use_chat_template(tok, TOOL_TEMPLATE)
    return tok


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_tool_calls_and_tools_render_as_transformers_renders_them(tool_tokenizer):
    record = PreferenceRecord(PROMPT, CHOSEN, REJECTED, "t:1", [WEATHER])
    prompt, chosen, rejected = render(record, tool_tokenizer)
    expected_prompt = tool_tokenizer.apply_chat_template(PROMPT, tools=[WEATHER], tokenize=False,
                                                         add_generation_prompt=True)
    full = tool_tokenizer.apply_chat_template(PROMPT + CHOSEN, tools=[WEATHER], tokenize=False)
    assert prompt == expected_prompt and full.startswith(prompt)
    assert chosen == full[len(prompt):].rstrip()  # the completion ends at its end-of-turn token (EOS)
    assert '"name": "get_weather"' in prompt  # the schema, in the system turn
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in chosen
    assert "<tool_response>{\"temperature_c\": 18" in chosen and chosen.endswith("cloudy in Paris.<|im_end|>")
    assert rejected == "I cannot know that.<|im_end|>"
    (pair,) = encode_records([record], tool_tokenizer)
    assert tool_tokenizer.decode(pair.chosen).startswith("<tool_call>")
    assert pair.chosen[-1] == tool_tokenizer.eos_token_id


def test_tool_rows_from_a_file_keep_every_key_and_read_tools_as_json(tmp_path, tool_tokenizer):
    rows = [{"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED, "tools": json.dumps([WEATHER])},
            {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED, "tools": [WEATHER]}]
    records = read_preferences(write_rows(tmp_path / "tools.jsonl", rows)).records
    assert records[0].tools == records[1].tools == [WEATHER]
    assert records[0].chosen[0]["tool_calls"] == CALL["tool_calls"]  # not dropped on the way
    assert records[0].chosen[1]["name"] == "get_weather"
    pairs, _ = tokenize_records(records, tool_tokenizer, TokenizeSettings(max_length=4096, max_prompt_length=2048),
                                Problems())
    assert len(pairs) == 2  # tools as a JSON string and as a list render the same
    assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == (pairs[1].prompt, pairs[1].chosen, pairs[1].rejected)


def test_a_template_without_tool_support_rejects_the_row_with_file_and_line(tmp_path, tokenizer):
    """SmolLM2's template renders role and content only: it would drop the tools and the calls silently."""
    rows = [{"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED, "tools": [WEATHER]},  # tools dropped
            {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED},  # the call (empty content) dropped
            {"prompt": PROMPT, "chosen": [{**CALL, "content": None}, *CHOSEN[1:]], "rejected": REJECTED},  # fails
            {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": "Sunny."}], "rejected": REJECTED}]
    path = write_rows(tmp_path / "agentic.jsonl", rows)
    problems = Problems("collect")
    pairs, _ = tokenize_records(read_preferences(path).records, tokenizer, TokenizeSettings(), problems)
    assert len(pairs) == 1 and pairs[0].source == f"{path}:4"  # the row without tool content trains
    assert [(p.source, p.reason) for p in problems.rows] == [
        (f"{path}:1", "tools_not_rendered"), (f"{path}:2", "tool_calls_not_rendered"), (f"{path}:3", "template_error")]
    assert "function 'get_weather' is not in the rendered prompt" in problems.rows[0].detail
    assert problems.rows[1].detail.startswith("'chosen' message 0: the chat template does not render its tool call "
                                              "'get_weather'")
    assert problems.rows[2].detail.startswith("the chat template cannot render this row (")
    with pytest.raises(DataError, match=rf"^{path}:1: the chat template does not render the row's 'tools'"):
        tokenize_records(read_preferences(path).records, tokenizer, TokenizeSettings(), Problems())


def test_a_tool_result_the_template_drops_is_reported(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    # renders tool calls but skips tool messages
    tool_branch = TOOL_TEMPLATE[TOOL_TEMPLATE.index("{%- elif message.role == 'tool' %}"):
                                TOOL_TEMPLATE.index("{%- else %}")]
    use_chat_template(tok, TOOL_TEMPLATE.replace(tool_branch, "{%- elif message.role == 'tool' %}"))
    problems = Problems("collect")
    encode_records([PreferenceRecord(PROMPT, CHOSEN, REJECTED, "t:7")], tok, problems)
    assert [(p.source, p.reason) for p in problems.rows] == [("t:7", "tool_results_not_rendered")]


@pytest.mark.parametrize("row,reason", [
    ({"tools": "{not json"}, "bad_tools"),
    ({"tools": [{"description": "no name"}]}, "bad_tools"),
    ({"tools": {"name": "f"}}, "bad_tools"),
    ({"chosen": [{"role": "assistant", "content": "", "tool_calls": [{"function": {}}]}]}, "bad_tool_call"),
    ({"chosen": [{"role": "assistant", "content": "", "tool_calls": []}]}, "bad_tool_call"),
    ({"prompt": [{"role": "user", "content": "x", "tool_calls": CALL["tool_calls"]}]}, "bad_tool_call"),
    ({"chosen": [{"role": "assistant"}]}, "bad_message"),
])
def test_malformed_tool_fields_are_reported(tmp_path, row, reason):
    base = {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}
    problems = Problems("collect")
    read_preferences(write_rows(tmp_path / "bad.jsonl", [{**base, **row}]), problems=problems)
    assert problems.counts() == {reason: 1} and problems.rows[0].source.endswith("bad.jsonl:1")


def test_tools_need_conversational_rows(tmp_path):
    problems = Problems("collect")
    read_preferences(write_rows(tmp_path / "s.jsonl", [{"prompt": "Hi", "chosen": "a", "rejected": "b",
                                                        "tools": [WEATHER]}]), problems=problems)
    assert problems.counts() == {"bad_tools": 1} and "needs conversational rows" in problems.rows[0].detail


def test_an_assistant_turn_with_only_tool_calls_is_not_empty(tmp_path):
    rows = [{"prompt": PROMPT, "chosen": [{**CALL, "content": None}], "rejected": REJECTED}]
    (record,) = read_preferences(write_rows(tmp_path / "c.jsonl", rows)).records
    assert record.chosen[0]["content"] is None and record.chosen[0]["tool_calls"]


def test_chat_template_from_a_string_or_a_file(tmp_path, tokenizer):
    assert chat_template_text(TOOL_TEMPLATE) == TOOL_TEMPLATE
    path = tmp_path / "house.jinja"
    path.write_text(TOOL_TEMPLATE, encoding="utf-8")
    assert chat_template_text(str(path)) == TOOL_TEMPLATE
    with pytest.raises(ConfigError, match="is neither a file nor a Jinja template"):
        chat_template_text(str(tmp_path / "missing.jinja"))
    with pytest.raises(ConfigError, match="data.chat_template: invalid Jinja at line 1"):
        chat_template_text("{% for m in messages %}{{ m.content }}")
    with pytest.raises(ConfigError, match="data.chat_template: invalid Jinja"):  # checked before anything loads
        load_config(None, ["data.train=x.jsonl", "data.chat_template={{ unclosed"])


def test_training_with_a_house_chat_template_on_tool_rows(tiny_config, tmp_path):
    from transformers import AutoTokenizer

    from dpokit.trainer import train

    template = tmp_path / "house.jinja"
    template.write_text(TOOL_TEMPLATE, encoding="utf-8")
    rows = [{"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED, "tools": [WEATHER]}] * 4
    data = write_rows(tmp_path / "agentic.jsonl", rows)
    result = train(tiny_config(f"data.train={data}", f"data.chat_template={template}", "train.batch_size=2",
                               "train.max_steps=1", "data.max_length=512", "data.max_prompt_length=256"))
    assert json.loads((result.run_dir / "data_report.json").read_text())["train_pairs"] == 4
    exported = AutoTokenizer.from_pretrained(result.model_dir)
    assert exported.chat_template == TOOL_TEMPLATE  # the model renders conversations as it was trained on them
