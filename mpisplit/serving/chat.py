"""POST /v1/chat/completions: a conversation in, the assistant's answer out, in OpenAI's chat
layout. The conversation is rendered by the model's chat template (models/chat_template.py) and then goes
the way of a completion: the same validation of every other field, the same engine, batching
and streaming; only the request's `messages` and the answer's layout are chat's own.

    request   messages [{role: system|user|assistant|tool, content: str | [{type: "text", text}],
              tool_calls (assistant), tool_call_id (tool)}], max_completion_tokens (or max_tokens;
              default: the rest of the context), logprobs (bool), top_logprobs (0..20), tools and
              tool_choice (tools.py), and the completion fields (response_format: guided.py)
    answer    {id: "chatcmpl-...", object: "chat.completion", choices: [{index, message: {role,
              content, tool_calls?}, logprobs: {content: [{token, logprob, bytes, top_logprobs}]}
              | null, finish_reason}], usage}
    stream    "chat.completion.chunk" events: delta {role: "assistant", content: ""} first, then
              {content}, then {} with the finish_reason; with include_usage a last chunk with
              choices [] and usage. With tools (tool_choice not "none") the text is held until the
              answer is complete and then sent as one delta: {content} or {tool_calls}
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import replace
from typing import Any

from mpisplit.models.chat_template import ChatTemplate, ChatTemplateError
from mpisplit.serving import tools as tooling
from mpisplit.serving.validation import (
    MAX_LOGPROBS,
    ApiError,
    CompletionRequest,
    ModelInfo,
    _integer,
    validate_completion,
)

ROLES = ("system", "user", "assistant", "tool")
CHAT_ONLY = ("messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools", "tool_choice")
UNSUPPORTED = ("functions", "function_call")  # OpenAI's older names for tools: refused unless empty


def _content(content: Any, i: int) -> str:
    """A message's text: a string, or text parts joined by newlines (as vLLM joins them)."""
    if isinstance(content, str):
        return content
    where = f"'messages[{i}].content'"
    if isinstance(content, list) and content:
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ApiError(f"{where} parts must be {{\"type\": \"text\", \"text\": STRING}}; got a part "
                               f"of type {kind!r} (only text is supported)", "messages")
        return "\n".join(part["text"] for part in content)
    raise ApiError(f"{where} must be a string or a non-empty list of text parts, got {str(content)[:80]!r}",
                   "messages")


def chat_messages(body: dict) -> list[dict]:
    """The request's messages as the template sees them: [{"role", "content": str}]."""
    messages = body.get("messages")
    if messages is None:
        raise ApiError("'messages' is missing: send a list of {\"role\", \"content\"}", "messages")
    if not isinstance(messages, list):
        raise ApiError(f"'messages' must be a list of {{\"role\", \"content\"}}, got {type(messages).__name__}",
                       "messages")
    if not messages:
        raise ApiError("'messages' is empty (it needs at least one message)", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(f"'messages[{i}]' must be an object with 'role' and 'content', "
                           f"got {type(message).__name__}", "messages")
        role = message.get("role")
        if role not in ROLES:
            raise ApiError(f"'messages[{i}].role' must be one of {', '.join(ROLES)}; got {role!r}", "messages")
        calls = message.get("tool_calls") if role == "assistant" else None
        content = message.get("content")
        entry: dict[str, Any] = {"role": role, "content": "" if content is None and calls else _content(content, i)}
        if calls:
            entry["tool_calls"] = _tool_calls(calls, i)
        if role == "tool" and isinstance(message.get("tool_call_id"), str):
            entry["tool_call_id"] = message["tool_call_id"]
        out.append(entry)
    return out


def _tool_calls(calls: Any, i: int) -> list[dict]:
    """An assistant message's tool calls as templates read them: arguments as an object (the
    client sends a JSON string)."""
    where = f"'messages[{i}].tool_calls'"
    if not isinstance(calls, list):
        raise ApiError(f"{where} must be a list of calls", "messages")
    out = []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ApiError(f"{where} entries must be {{\"type\": \"function\", \"function\": {{\"name\", "
                           "\"arguments\"}}", "messages")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                raise ApiError(f"{where}: the arguments of {fn['name']!r} are not JSON", "messages") from None
        out.append({**call, "function": {"name": fn["name"], "arguments": args}})
    return out


def chat_prompt(messages: list[dict], model: ModelInfo, template: ChatTemplate | None,
                tools: list[dict] | None = None) -> list[int]:
    """The token ids of the rendered conversation (special tokens read as special, none added)."""
    if template is None:
        raise ApiError("this model has no chat template (no chat_template.jinja and no chat_template in "
                       "tokenizer_config.json); start the server with --chat-template FILE, or use "
                       "/v1/completions", "messages")
    if model.tokenizer is None:
        raise ApiError("this model has no tokenizer; chat needs one (use /v1/completions with token ids)",
                       "messages")
    try:
        text = template.render(messages, add_generation_prompt=True, tools=tools)
    except ChatTemplateError as exc:
        raise ApiError(f"the chat template refused the conversation: {exc}", "messages") from None
    try:
        ids = [int(i) for i in model.tokenizer.encode(text)]
    except ValueError as exc:
        raise ApiError(f"the rendered conversation cannot be encoded: {exc}", "messages") from None
    if not ids:
        raise ApiError("the conversation renders to no tokens at all", "messages")
    return ids


def _max_tokens(body: dict, prompt: int, model: ModelInfo) -> int:
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = _integer(body, key, None, low=1)
    room = model.limit - prompt
    if value is None and room >= 1:
        return room
    if value is None or prompt + value > model.limit:
        asked = "" if value is None else f" plus {key} ({value})"
        raise ApiError(f"the conversation renders to {prompt} tokens{asked}; {model.limit_text()}", "messages")
    return value


def _logprobs(body: dict) -> int | None:
    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise ApiError(f"'logprobs' must be true or false, got {wanted!r}", "logprobs")
    top = _integer(body, "top_logprobs", None, low=0, high=MAX_LOGPROBS)
    if top is not None and not wanted:
        raise ApiError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return (top or 0) if wanted else None


def validate_chat(body: dict, model: ModelInfo, template: ChatTemplate | None) -> CompletionRequest:
    """The chat request as the engine takes it (a completion of the rendered prompt), or ApiError."""
    for key in UNSUPPORTED:
        if body.get(key):
            raise ApiError(f"'{key}' is not supported: use 'tools' and 'tool_choice'", key)
    for key in ("echo", "prompt_logprobs"):
        if body.get(key) not in (None, False):
            raise ApiError(f"'{key}' is a /v1/completions field (chat answers hold no prompt)", key)
    tools = tooling.request_tools(body)
    choice = tooling.request_choice(body, tools)
    if tools is not None and (template is None or not template.renders_tools):
        raise ApiError("'tools' needs a chat template that renders tools; this model's does not", "tools")
    prompt = chat_prompt(chat_messages(body), model, template, tools)
    rest = {k: v for k, v in body.items() if k not in CHAT_ONLY}
    rest.update(prompt=prompt, max_tokens=_max_tokens(body, len(prompt), model), logprobs=_logprobs(body))
    req = validate_completion(rest, model)
    if tools is None or choice is None:
        return req
    assert template is not None  # checked above
    layout = tooling.call_layout(template.source)
    req.tools = tooling.ToolSpec(tuple(t["function"]["name"] for t in tools), layout, choice != "none")
    if choice not in ("auto", "none"):
        if req.sampling.grammar is not None:
            raise ApiError("a forced tool call ('tool_choice') cannot be combined with another constraint",
                           "tool_choice")
        req.sampling = replace(req.sampling, grammar=tooling.call_grammar(tools, choice, layout))
    return req


def chat_logprobs(pieces: list[dict]) -> dict:
    """Completion-layout logprobs of some events in the chat layout."""
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    content = []
    for p in pieces:
        lp = p["logprobs"]
        for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
            content.append({**entry(token, value), "top_logprobs": [entry(t, v) for t, v in top.items()]})
    return {"content": content}


class ChatLayout:
    """The answer and the stream events of one chat request (see the module docstring)."""

    def __init__(self, model: str, with_logprobs: bool, echo: Any = None,
                 tools: tooling.ToolSpec | None = None) -> None:
        self.with_logprobs = with_logprobs  # echo and prompt logprobs: refused by validate_chat
        self.tools = tools if tools is not None and tools.parse else None
        self._held: dict[int, list[dict]] = {}  # with tools: each choice's events until it ends
        self.head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "object": "chat.completion",
                     "created": int(time.time()), "model": model}

    def _chunk(self, index: int, delta: dict, logprobs: dict | None = None, finish_reason: str | None = None) -> dict:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return {**self.head, "object": "chat.completion.chunk", "choices": [choice]}

    def opening(self, index: int) -> list[dict]:
        return [self._chunk(index, {"role": "assistant", "content": ""})]

    def chunks(self, ev: dict, index: int) -> list[dict]:
        if self.tools is not None:
            return self._held_chunks(ev, index)
        out = []
        if ev["text"] or self.with_logprobs:
            out.append(self._chunk(index, {"content": ev["text"]}, chat_logprobs([ev]) if self.with_logprobs else None))
        if ev["finish_reason"] is not None:
            out.append(self._chunk(index, {}, None, ev["finish_reason"]))
        return out

    def _held_chunks(self, ev: dict, index: int) -> list[dict]:
        """With tools: nothing until the choice ends, then its content or its calls in one delta."""
        held = self._held.setdefault(index, [])
        held.append(ev)
        if ev["finish_reason"] is None:
            return []
        del self._held[index]
        message, reason = self._message(held, ev["finish_reason"])
        delta = {k: v for k, v in message.items() if k != "role" and v is not None}
        if "tool_calls" in delta:
            delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(delta["tool_calls"])]
        logprobs = chat_logprobs(held) if self.with_logprobs else None
        return [self._chunk(index, delta, logprobs), self._chunk(index, {}, None, reason)]

    def _message(self, pieces: list[dict], reason: str | None) -> tuple[dict, str | None]:
        """The assistant message of a choice's pieces and its finish_reason ("tool_calls" when
        its text was tool calls)."""
        text = "".join(p["text"] for p in pieces)
        if self.tools is None:
            return {"role": "assistant", "content": text}, reason
        content, calls = tooling.parse_calls(text, self.tools)
        if not calls:
            return {"role": "assistant", "content": text}, reason
        return {"role": "assistant", "content": content, "tool_calls": calls}, \
            "tool_calls" if reason == "stop" else reason

    def whole(self, pieces: list[list[dict]], usage: dict) -> dict:
        choices = []
        for i, ps in enumerate(pieces):
            message, reason = self._message(ps, ps[-1]["finish_reason"] if ps else None)
            choices.append({"index": i, "message": message, "logprobs": chat_logprobs(ps) if self.with_logprobs else None,
                            "finish_reason": reason})
        return {**self.head, "choices": choices, "usage": usage}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self.head, "object": "chat.completion.chunk", "choices": [], "usage": usage}
