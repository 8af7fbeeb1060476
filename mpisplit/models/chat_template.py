"""A model's chat template: the Jinja text that turns a conversation into the prompt it was
tuned on, rendered the way transformers' `apply_chat_template` renders it.

    template = load_chat_template("smollm2-folder")      # None when the folder has none
    text = template.render([{"role": "user", "content": "Hi"}])   # add_generation_prompt=True

Where the template comes from, first found wins: an explicit file (`--chat-template FILE`),
the folder's `chat_template.jinja`, the `chat_template` of its `tokenizer_config.json` (a
string, or a list of {"name", "template"} of which "default" is taken).

The environment is transformers': jinja2's ImmutableSandboxedEnvironment (templates come with
downloaded models and are not trusted code) with trim_blocks, lstrip_blocks and the
loop-controls extension; a `tojson` that does not HTML-escape; the globals `raise_exception`
and `strftime_now`; the variables `messages`, `add_generation_prompt`, `tools` (the request's,
or None) and `documents` (None) and the named special tokens (`bos_token`, `eos_token`, ...). The rendered text
already holds every special token the model expects: it is tokenized without adding any
(no second BOS), and the special tokens written in it are read as such by the tokenizer.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

# The named special tokens a template may read (transformers' SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """The template refused the conversation (its raise_exception) or failed while rendering."""


def _jinja2() -> Any:
    try:
        import jinja2
        import jinja2.ext
        import jinja2.sandbox
    except ImportError:
        raise ValueError("chat templates need the 'jinja2' package: pip install jinja2 (or mpisplit[serve])") from None
    return jinja2


def _environment() -> Any:
    jinja2 = _jinja2()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        # jinja2's own tojson escapes <, >, & and ' for HTML; a prompt wants the plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


class ChatTemplate:
    """A compiled template and the special tokens it may refer to."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None, origin: str = "") -> None:
        if not isinstance(source, str) or not source.strip():
            raise ValueError(f"the chat template{' in ' + origin if origin else ''} is empty")
        jinja2 = _jinja2()
        self.source, self.origin = source, origin
        self.special_tokens = dict(special_tokens or {})
        try:
            self.compiled = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(f"the chat template {origin} is not valid Jinja: {exc} (line {exc.lineno})") from None

    @property
    def renders_tools(self) -> bool:
        """Whether the template reads the `tools` variable (so a request's tools reach the prompt)."""
        from jinja2 import meta

        return "tools" in meta.find_undeclared_variables(_environment().parse(self.source))

    def render(self, messages: list[dict], add_generation_prompt: bool = True,
               tools: list[dict] | None = None) -> str:
        """The prompt text for `messages` (dicts with "role" and "content") and `tools` (OpenAI's
        list, or None); ChatTemplateError with the template's own message when it raises."""
        jinja2 = _jinja2()
        try:
            return self.compiled.render(messages=messages, tools=tools, documents=None,
                                        add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.TemplateError as exc:  # raise_exception, undefined names, sandbox refusals
            raise ChatTemplateError(str(exc) or type(exc).__name__) from None
        except (TypeError, ValueError, LookupError, ArithmeticError) as exc:  # e.g. "str" + None
            raise ChatTemplateError(f"the chat template failed: {type(exc).__name__}: {exc}") from None


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {str(path)!r}: {exc}") from None
    if not isinstance(data, dict):
        raise TypeError(f"{str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data


def special_tokens(folder: str | os.PathLike) -> dict[str, str]:
    """The named special tokens of a Hugging Face folder: tokenizer_config.json's, completed by
    the older special_tokens_map.json."""
    found: dict[str, str] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = Path(folder) / name
        if path.is_file():
            data = _read_json(path)
            for key in SPECIAL_TOKEN_NAMES:
                text = _token_text(data.get(key))
                if text is not None:
                    found.setdefault(key, text)
    return found


def _named_default(entries: list, origin: str) -> object:
    """The template of the entry named "default", as the JSON has it (the caller checks it is a string)."""
    named = {e.get("name"): e.get("template") for e in entries if isinstance(e, dict)}
    if "default" not in named:
        raise ValueError(f"{origin} has chat templates named {sorted(map(str, named))} and none is 'default'; "
                         "give one with --chat-template FILE")
    return named["default"]


def _folder_template(folder: Path) -> tuple[str, str] | None:
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8"), str(jinja_file)
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    value = _read_json(config).get("chat_template")
    origin = f"{str(config)!r}"
    if value is None:
        return None
    if isinstance(value, list):
        value = _named_default(value, origin)
    if not isinstance(value, str):
        raise TypeError(f"the chat_template of {origin} must be a string or a list of named templates, "
                         f"got {type(value).__name__}")
    return value, origin


def load_chat_template(folder: str | os.PathLike | None, file: str | os.PathLike | None = None) -> ChatTemplate | None:
    """The chat template of a Hugging Face folder or a GGUF file (None: an mpisplit checkpoint), or
    of `file` when given; None when there is none. The folder's special tokens come with it either way."""
    if folder is not None and str(folder).endswith(".gguf"):
        return _gguf_template(Path(folder), file)
    tokens = special_tokens(folder) if folder is not None else {}
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"chat template file {str(path)!r} does not exist")
        return ChatTemplate(path.read_text(encoding="utf-8"), tokens, repr(str(path)))
    if folder is None:
        return None
    found = _folder_template(Path(folder))
    return None if found is None else ChatTemplate(found[0], tokens, found[1])


def _gguf_template(path: Path, file: str | os.PathLike | None) -> ChatTemplate | None:
    """A GGUF file's `tokenizer.chat_template` and named special tokens (its metadata), or `file`'s."""
    from mpisplit.models.gguf.tokenizer import build_tokenizer

    config = build_tokenizer(path)[1]
    tokens = {k: v for k in SPECIAL_TOKEN_NAMES if isinstance(v := config.get(k), str)}
    if file is not None:
        if not Path(file).is_file():
            raise FileNotFoundError(f"chat template file {str(file)!r} does not exist")
        return ChatTemplate(Path(file).read_text(encoding="utf-8"), tokens, repr(str(file)))
    source = config.get("chat_template")
    return None if source is None else ChatTemplate(source, tokens, f"{str(path)!r} (tokenizer.chat_template)")
