"""The tokenizer routes, as vLLM serves them (lm-eval's remote tokenizer and clients use them):

    POST /tokenize        {"prompt": text} or {"messages": [...]}, "add_special_tokens",
                          ("add_generation_prompt" for messages), "return_token_strs"
                          -> {"count", "max_model_len", "tokens", ["token_strs"]}
    POST /detokenize      {"tokens": [ids]} -> {"prompt": text}
    GET  /tokenizer_info  eos/bos/pad tokens and ids, the chat template, the context length

Defaults as vLLM's: a prompt gets the tokenizer's special tokens (add_special_tokens true), a
conversation does not (its template writes them) and gets the generation prompt. Every
function raises ApiError (a 400 naming the field) for a bad request; nothing here calls MPI.
"""

from __future__ import annotations

from typing import Any

from mpisplit.models.chat_template import ChatTemplate, ChatTemplateError
from mpisplit.serving.chat import chat_messages
from mpisplit.serving.validation import ApiError, ModelInfo, _boolean


def _tokenizer(model: ModelInfo, param: str) -> Any:
    if model.tokenizer is None:
        raise ApiError("this model has no tokenizer (it is served by token ids only)", param)
    return model.tokenizer


def encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    """Token ids of text; special tokens added by the tokenizer's post-processor if asked (a
    character tokenizer has none)."""
    hf = getattr(tokenizer, "tokenizer", None)  # models.hf_tokenizer.HFTokenizer wraps `tokenizers`
    try:
        if hf is not None:
            return [int(i) for i in hf.encode(text, add_special_tokens=add_special_tokens).ids]
        return [int(i) for i in tokenizer.encode(text)]
    except ValueError as exc:  # a character the character tokenizer does not know
        raise ApiError(f"the text cannot be encoded: {exc}", "prompt") from None


def tokenize(body: dict, model: ModelInfo, template: ChatTemplate | None) -> dict:
    has_prompt, has_messages = "prompt" in body, "messages" in body
    if has_prompt == has_messages:
        raise ApiError("give exactly one of 'prompt' (a string) and 'messages' (a conversation)",
                       "messages" if has_messages else "prompt")
    strs = _boolean(body, "return_token_strs", False)
    if has_prompt:
        prompt = body["prompt"]
        if not isinstance(prompt, str):
            raise ApiError(f"'prompt' must be a string, got {type(prompt).__name__}", "prompt")
        ids = encode(_tokenizer(model, "prompt"), prompt, _boolean(body, "add_special_tokens", True))
    else:
        messages = chat_messages(body)
        if template is None:
            raise ApiError("this model has no chat template (start the server with --chat-template FILE)",
                           "messages")
        try:
            text = template.render(messages, add_generation_prompt=_boolean(body, "add_generation_prompt", True))
        except ChatTemplateError as exc:
            raise ApiError(f"the chat template refused the conversation: {exc}", "messages") from None
        ids = encode(_tokenizer(model, "messages"), text, _boolean(body, "add_special_tokens", False))
    out: dict[str, Any] = {"count": len(ids), "max_model_len": model.block_size, "tokens": ids}
    if strs:
        out["token_strs"] = [model.tokenizer.decode([i]) for i in ids]
    return out


def detokenize(body: dict, model: ModelInfo) -> dict:
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise ApiError("'tokens' must be a list of token ids", "tokens")
    bad = [t for t in tokens if not 0 <= t < model.vocab_size]
    if bad:
        raise ApiError(f"'tokens' id {bad[0]} is outside [0, {model.vocab_size})", "tokens")
    return {"prompt": _tokenizer(model, "tokens").decode(tokens)}


def tokenizer_info(model: ModelInfo, template: ChatTemplate | None) -> dict:
    """What a client needs to tokenize as the server does."""
    tok = model.tokenizer
    specials = dict(template.special_tokens) if template is not None else {}
    eos_ids = list(model.eos_token_ids)
    eos = specials.get("eos_token")
    if eos is None and eos_ids and tok is not None:
        eos = tok.decode([eos_ids[0]])
    return {
        "tokenizer_class": type(tok).__name__ if tok is not None else None,
        "vocab_size": model.vocab_size,
        "model_max_length": model.block_size,
        "eos_token": eos,
        "eos_token_ids": eos_ids,
        "bos_token": specials.get("bos_token"),
        "pad_token": specials.get("pad_token"),
        "chat_template": template.source if template is not None else None,
    }
