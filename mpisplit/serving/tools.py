"""Tool calls on /v1/chat/completions: the request's `tools` and `tool_choice`, the template that
renders them, the grammar that forces a call, and the calls read back out of the answer.

    tools         [{"type": "function", "function": {"name", "description", "parameters"}}]
    tool_choice   "auto" (default with tools: the model decides; its calls are parsed), "none"
                  (the tools are shown, the answer stays text), "required" (one call of some
                  tool, forced by a grammar), {"type": "function", "function": {"name"}} (one
                  call of that tool, forced)

Tools are honoured only where the model's chat template renders them (it reads the `tools`
variable); with any other template they are refused with a 400. The call format follows the
template: one that writes `<tool_call>` gets the Hermes/Qwen layout, a JSON object
{"name", "arguments"} between <tool_call> and </tool_call> per call; any other gets a bare
JSON object {"name", "parameters"} (Llama 3.1's). A forced call is the grammar of that layout
with the tool's parameters as the schema of its arguments. An answer whose calls parse (a known
tool name, JSON arguments) comes back as `message.tool_calls` (arguments as a JSON string),
with finish_reason "tool_calls"; the text outside the calls, if any, stays `content`.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from mpisplit.serving.validation import ApiError

MAX_TOOLS = 128
NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class ToolSpec:
    """A request's tools as the answer needs them: their names and the template's call layout."""

    names: tuple[str, ...]
    layout: str  # "hermes" or "json"
    parse: bool  # tool_choice is not "none"


def request_tools(body: dict) -> list[dict] | None:
    """The request's `tools`, checked (None when absent or empty)."""
    tools = body.get("tools")
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise ApiError(f"'tools' must be a list of at most {MAX_TOOLS} tools", "tools")
    names = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not NAME.match(fn["name"]):
            raise ApiError(f"'tools[{i}]' must be {{\"type\": \"function\", \"function\": {{\"name\": "
                           f"[A-Za-z0-9_.-]{{1,64}}, \"description\", \"parameters\"}}}}", "tools")
        if not isinstance(fn.get("parameters", {}), dict) or not isinstance(fn.get("description", ""), str):
            raise ApiError(f"'tools[{i}].function': 'parameters' must be a JSON schema (an object) and "
                           "'description' a string", "tools")
        names.append(fn["name"])
    if len(set(names)) != len(names):
        raise ApiError("'tools' names a function twice", "tools")
    return tools


def request_choice(body: dict, tools: list[dict] | None) -> str | None:
    """"auto", "none", "required" or a tool's name; None without tools."""
    choice = body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none", "auto"):
            raise ApiError("'tool_choice' needs 'tools'", "tool_choice")
        return None
    if choice is None or choice in ("auto", "none", "required"):
        return choice or "auto"
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if name is None:
        raise ApiError("'tool_choice' must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", "
                       f"\"function\": {{\"name\"}}}}, got {str(choice)[:80]!r}", "tool_choice")
    if name not in [t["function"]["name"] for t in tools]:
        raise ApiError(f"'tool_choice' names {name!r}, which is not among the tools", "tool_choice")
    return name


def call_layout(template_source: str) -> str:
    return "hermes" if "<tool_call>" in template_source else "json"


def call_grammar(tools: list[dict], choice: str, layout: str) -> str:
    """The llguidance grammar of one call of the chosen tool ("required": of any of them)."""
    from mpisplit.serving.guided import JSON_OPTIONS, require_llguidance

    key = "arguments" if layout == "hermes" else "parameters"
    chosen = [t["function"] for t in tools if choice == "required" or t["function"]["name"] == choice]
    calls = [{"type": "object", "properties": {"name": {"const": f["name"]},
                                               key: f.get("parameters") or {"type": "object"}},
              "required": ["name", key], "additionalProperties": False} for f in chosen]
    schema = {"anyOf": calls, "x-guidance": JSON_OPTIONS}
    llg = require_llguidance()
    if layout == "json":
        return llg.LLMatcher.grammar_from_json_schema(json.dumps(schema))
    return llg.LLMatcher.grammar_from_lark(
        'start: "<tool_call>\\n" call "\\n</tool_call>"\ncall: %json ' + json.dumps(schema))


def _call(obj: Any, names: tuple[str, ...], key: str) -> dict | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get(key, obj.get("arguments", obj.get("parameters", {})))
    if not isinstance(args, dict):
        return None
    return {"id": f"call_{secrets.token_hex(12)}", "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


def parse_calls(text: str, spec: ToolSpec) -> tuple[str | None, list[dict]]:
    """(the content left, the calls) of an answer; no calls: (text, [])."""
    if not spec.parse:
        return text, []
    if spec.layout == "hermes":
        calls = []
        for body in HERMES_CALL.findall(text):
            try:
                call = _call(json.loads(body), spec.names, "arguments")
            except json.JSONDecodeError:
                return text, []
            if call is None:
                return text, []
            calls.append(call)
        rest = HERMES_CALL.sub("", text).strip() if calls else text
        return (rest or None) if calls else text, calls
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return text, []
    found = [_call(o, spec.names, "parameters") for o in (obj if isinstance(obj, list) else [obj])]
    if not found or any(c is None for c in found):
        return text, []
    return None, [c for c in found if c is not None]
