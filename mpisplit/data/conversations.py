"""The conversations of `mpisplit prepare --chat`: JSONL records read into chat messages.

Two layouts, told apart per line:

    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "..."}], "tools": [...]}
    {"conversations": [{"from": "system"|"human"|"gpt"|"tool", "value": "..."}]}      (ShareGPT)

A content may also be a list of text parts ({"type": "text", "text": ...}, joined by newlines, as
the chat route joins them); "tools" (optional, OpenAI's list) reaches the template. Blank lines
are skipped; every error names the file and line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpisplit.data.documents import _lines, _open, is_jsonl

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "tool": "tool"}


@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    tools: list[dict] | None
    source: str  # "file:line", for messages
    disk_bytes: int  # bytes of the input file consumed since the previous conversation (progress)


def iter_conversations(files: list[Path]) -> Iterator[Conversation]:
    for path in files:
        if not is_jsonl(path):
            raise ValueError(f"--chat reads JSONL files (.jsonl, .ndjson, either .gz); {str(path)!r} is not one")
        yield from _file_conversations(path)


def _file_conversations(path: Path) -> Iterator[Conversation]:
    stream, counted = _open(path)
    try:
        with stream:
            for number, line in enumerate(_lines(stream, path), start=1):
                where = f"{path}:{number}"
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise ValueError(f"{where}: not UTF-8 text ({exc.reason})") from None
                if text.strip():
                    messages, tools = parse_record(text, where)
                    yield Conversation(messages, tools, where, counted.advance())
    finally:
        counted.raw.close()


def parse_record(line: str, where: str) -> tuple[list[dict[str, Any]], list[dict] | None]:
    """(messages as the template reads them, tools or None) of one JSONL line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict) or not ({"messages", "conversations"} & record.keys()):
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{where}: a conversation needs 'messages' (OpenAI's layout) or 'conversations' "
                         f"(ShareGPT's); the line has {keys}")
    if "messages" in record:
        messages = [_openai(m, f"{where}: messages[{i}]") for i, m in enumerate(_list(record, "messages", where))]
    else:
        messages = [_sharegpt(m, f"{where}: conversations[{i}]")
                    for i, m in enumerate(_list(record, "conversations", where))]
    tools = record.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ValueError(f"{where}: 'tools' must be a list of objects (OpenAI's tools), got {str(tools)[:80]!r}")
    return messages, tools or None


def _list(record: dict, key: str, where: str) -> list:
    value = record[key]
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: {key!r} must be a non-empty list, got {str(value)[:80]!r}")
    return value


def _openai(message: Any, where: str) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise TypeError(f"{where} must be an object with 'role' and 'content', got {type(message).__name__}")
    role = message.get("role")
    if role not in ROLES:
        raise ValueError(f"{where}: role must be one of {', '.join(ROLES)}; got {role!r}")
    out = {k: v for k, v in message.items() if k in ("tool_calls", "tool_call_id", "name")}
    calls = out.get("tool_calls")
    content = message.get("content")
    out.update(role=role, content="" if content is None and calls else _text(content, where))
    return out


def _sharegpt(message: Any, where: str) -> dict[str, Any]:
    if not isinstance(message, dict) or "from" not in message or "value" not in message:
        raise ValueError(f"{where} must be an object with 'from' and 'value' (ShareGPT's layout)")
    role = SHAREGPT_ROLES.get(message["from"]) if isinstance(message["from"], str) else None
    if role is None:
        raise ValueError(f"{where}: 'from' must be one of {', '.join(SHAREGPT_ROLES)}; got {message['from']!r}")
    return {"role": role, "content": _text(message["value"], where)}


def _text(content: Any, where: str) -> str:
    """A string, or text parts joined by newlines."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        return "\n".join(p["text"] for p in content)
    raise ValueError(f"{where}: the content must be a string or a list of text parts "
                     f"({{\"type\": \"text\", \"text\": ...}}), got {str(content)[:80]!r}")
