"""Chat templates and folders for the chat tests.

SMOLLM2 is the `tokenizer.chat_template` of SmolLM2-135M-Instruct's GGUF (the cached model of
the real-model tests; test_chat_smollm2.py reads it from the file and compares). The others
are written here in the style of two model families: LLAMA3_STYLE (bos_token, header tokens,
the system message cut from the list, trim, strftime_now, raise_exception) and QWEN2_STYLE
(ChatML with a default system message, plain {% %} blocks that only come out right with
trim_blocks and lstrip_blocks, loop controls). TOJSON_STYLE shows the messages as JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3_STYLE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + strftime_now("%d %b %Y") + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant'] %}
        {{- raise_exception("after the system message only user and assistant messages may follow") }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim }}
    {{- '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

QWEN2_STYLE = """{% for message in messages %}
    {% if message['content'] == '' %}
        {% continue %}
    {% endif %}
    {% if loop.first and message['role'] != 'system' %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
    {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""

# Tools in the Hermes layout (a system message listing them, calls as <tool_call> JSON </tool_call>,
# results as <tool_response>), in the ChatML frame.
TOOLS_STYLE = """{%- if tools %}<|im_start|>system
Call a function by answering <tool_call>{"name": NAME, "arguments": ARGS}</tool_call>. Functions:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools><|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == "assistant" and m.tool_calls %}<|im_start|>assistant
{%- for call in m.tool_calls %}
<tool_call>
{{ {"name": call.function.name, "arguments": call.function.arguments} | tojson }}
</tool_call>
{%- endfor %}<|im_end|>
{% elif m.role == "tool" %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

# Tools in Llama 3.1's layout: listed as JSON in the user turn, a call is a bare JSON object.
TOOLS_JSON_STYLE = """{%- for m in messages %}<|im_start|>{{ m.role }}
{%- if tools and loop.last %}
Answer with a JSON object {"name": NAME, "parameters": ARGS} calling one of: {{ tools | tojson }}
{%- endif %}
{{ m.content }}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

TOJSON_STYLE = "{% for m in messages %}{{ m | tojson }}\n{% endfor %}{{ eos_token }}"

SPECIAL = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>",
           "<|im_end|>"]

TEXT = (
    "You are a helpful assistant. Hello there, how are you today? I am fine, thank you. "
    "What is the capital of France? Paris is the capital of France. Tell me a story about a fox. "
    "The quick brown fox jumps over the lazy dog. Today Date: 03 Dec 2026. system user assistant "
) * 20

CONVERSATIONS = {
    "one-turn": [{"role": "user", "content": "Hello there, how are you today?"}],
    "system": [{"role": "system", "content": "  You tell stories.  "},
               {"role": "user", "content": "Tell me a story about a fox."}],
    "multi-turn": [{"role": "user", "content": "What is the capital of France?"},
                   {"role": "assistant", "content": "Paris is the capital of France."},
                   {"role": "user", "content": "Tell me a story about a fox."}],
}

# Characters of the test checkpoints' vocabulary only (tests/_serving.py CHARS).
CHAR_TEMPLATE = (
    "{% if messages[0]['role'] == 'assistant' %}"
    "{{ raise_exception('a conversation must not open with an assistant message') }}{% endif %}"
    "{% for m in messages %}{{ m['role'] }} says {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant says {% endif %}"
)


def train_tokenizer():
    """A byte-level BPE with the special tokens of the templates above, whose post-processor
    adds <|begin_of_text|> (as Llama 3's does): a second BOS would show if it were applied."""
    import tokenizers
    from tokenizers.processors import TemplateProcessing

    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator([TEXT], vocab_size=400, min_frequency=2, show_progress=False)
    bpe.add_special_tokens(SPECIAL)
    bos = bpe.token_to_id(SPECIAL[0])
    bpe.post_processor = TemplateProcessing(single=f"{SPECIAL[0]} $A", special_tokens=[(SPECIAL[0], bos)])
    return bpe


def write_tokenizer_folder(folder: Path, bpe, template: str | list | None, **tokens) -> Path:
    """tokenizer.json and a tokenizer_config.json with `template` and the given special tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    bpe.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **tokens}
    if template is not None:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def write_chat_folder(folder: Path, seed: int = 7, block_size: int = 128):
    """A tiny GPT-2 folder (context `block_size`) whose tokenizer_config.json has the Qwen2-style template
    and a BOS token, no eos (answers run to their max_tokens whatever the engine's end-of-turn
    rules). Returns the float64 model and the tokenizer."""
    from _serving import tiny_model

    bpe = train_tokenizer()
    write_tokenizer_folder(folder, bpe, QWEN2_STYLE, bos_token="<|begin_of_text|>")
    model = tiny_model(bpe.get_vocab_size(), seed=seed, block_size=block_size)
    model.save_pretrained(folder)
    return model, bpe


def greedy_answer(folder: Path, model, bpe, messages: list[dict], n: int) -> str:
    """The library's greedy continuation of the rendered conversation, decoded."""
    from _serving import greedy_reference

    from mpisplit.models.chat_template import load_chat_template
    from mpisplit.models.hf_tokenizer import load_hf_tokenizer

    ids = load_hf_tokenizer(folder).encode(load_chat_template(folder).render(messages)).tolist()
    return bpe.decode(greedy_reference(model, ids, n).tolist(), skip_special_tokens=False)
