"""A conversation as training tokens and a loss mask, rendered turn by turn by its chat template.

The tokens are those of the whole rendering (add_generation_prompt false), tokenized as the
chat route tokenizes a prompt (no special tokens added). Each message's share of them is found
by rendering the conversation turn by turn: message i owns what rendering messages[:i+1] adds
to the rendering of messages[:i]; of an assistant message, the header is what the generation
prompt adds (rendering messages[:i] with add_generation_prompt true) and the rest is the answer,
its end-of-turn token included (a model that never sees it trained never learns to stop).

    train_on "assistant"   every assistant answer counts in the loss (the default)
             "last"        only the last assistant answer
             "all"         every token

A template whose turn-by-turn renderings are not prefixes of one another (one that rewrites
earlier turns, as templates that drop past reasoning do), or whose turn boundaries fall inside
a token, cannot be masked this way: that is a ValueError naming the template and the message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mpisplit.models.chat_template import ChatTemplate, ChatTemplateError

TRAIN_ON = ("assistant", "last", "all")


@dataclass
class Turn:
    role: str
    start: int  # character offsets into the whole rendering
    answer: int  # where an assistant turn's answer begins (after its header); == start otherwise
    end: int


def render_turns(template: ChatTemplate, messages: list[dict], tools: list[dict] | None,
                 where: str) -> tuple[str, list[Turn]]:
    """(the whole rendering, each message's span of it)."""
    whole, turns = "", []
    for i, message in enumerate(messages):
        text = _render(template, messages[: i + 1], False, tools, where)
        _check_prefix(whole, text, template, f"messages[:{i + 1}]", f"messages[:{i}]", where)
        answer = len(whole)
        if message["role"] == "assistant":
            prompt = _render(template, messages[:i], True, tools, where)
            _check_prefix(whole, prompt, template, f"messages[:{i}] with its generation prompt",
                          f"messages[:{i}]", where)
            _check_prefix(prompt, text, template, f"messages[:{i + 1}]",
                          f"messages[:{i}] with its generation prompt", where)
            answer = len(prompt)
        turns.append(Turn(message["role"], len(whole), answer, len(text)))
        whole = text
    return whole, turns


def _render(template: ChatTemplate, messages: list[dict], prompt: bool, tools: list[dict] | None,
            where: str) -> str:
    if not messages and not prompt:
        return ""
    try:
        return template.render(messages, add_generation_prompt=prompt, tools=tools)
    except ChatTemplateError as exc:
        raise ValueError(f"{where}: the chat template {template.origin} refused the conversation: {exc}") from None


def _check_prefix(head: str, text: str, template: ChatTemplate, longer: str, shorter: str, where: str) -> None:
    if not text.startswith(head):
        at = next((k for k, (a, b) in enumerate(zip(head, text)) if a != b), min(len(head), len(text)))
        raise ValueError(
            f"{where}: the chat template {template.origin} cannot be masked turn by turn: the rendering of "
            f"{longer} does not begin with the rendering of {shorter} (they differ from character {at}: "
            f"{head[at:at + 40]!r} vs {text[at:at + 40]!r})")


def trained_spans(turns: list[Turn], train_on: str, length: int) -> list[tuple[int, int]]:
    """The character spans whose tokens count in the loss."""
    if train_on == "all":
        return [(0, length)]
    answers = [(t.answer, t.end) for t in turns if t.role == "assistant"]
    if train_on == "last":
        return answers[-1:]
    if train_on == "assistant":
        return answers
    raise ValueError(f"--train-on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")


def encode_conversation(tokenizer: Any, template: ChatTemplate, messages: list[dict], tools: list[dict] | None,
                        train_on: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, loss mask: 1 where the token counts) of one conversation; `tokenizer` is a
    `tokenizers.Tokenizer`."""
    whole, turns = render_turns(template, messages, tools, where)
    encoding = tokenizer.encode(whole, add_special_tokens=False)
    ids = np.asarray(encoding.ids, dtype=np.uint32)
    offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
    bounds = sorted({b for t in turns for b in (t.start, t.answer)} - {0})
    _check_boundaries(offsets, bounds, whole, template, where)
    mask = np.zeros(len(ids), dtype=np.uint8)
    for lo, hi in trained_spans(turns, train_on, len(whole)):
        mask[(offsets[:, 0] >= lo) & (offsets[:, 0] < hi)] = 1
    return ids, mask


def _check_boundaries(offsets: np.ndarray, bounds: list[int], whole: str, template: ChatTemplate,
                      where: str) -> None:
    """No token may span a turn boundary (its part before and after would belong to two turns)."""
    for b in bounds:
        inside = np.flatnonzero((offsets[:, 0] < b) & (offsets[:, 1] > b))
        if len(inside):
            lo, hi = offsets[inside[0]]
            raise ValueError(
                f"{where}: with the chat template {template.origin}, one token ({whole[lo:hi]!r}) spans the "
                f"boundary between two turns at character {b}; the turns cannot be masked apart")
