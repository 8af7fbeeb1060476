"""Structured output in the engine (mpisplit/serving/guided.py), at the world size of the run:
every completion of a regex, a choice or a JSON schema matches it (checked with `re`, by
membership and with `jsonschema`, the references), on a random model that left alone writes
anything; the other requests of the batch draw the tokens they draw alone; a failing grammar
fails its own request only. The request fields and their 400s: test_guided_fields below; the
server through the openai client: tests/test_serve_structured.py."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from mpi4py import MPI

import mpisplit as ms
from mpisplit.serving.engine import Engine, SequenceSpec
from mpisplit.serving.sampling import SamplingParams
from mpisplit.serving.validation import ApiError, ModelInfo, validate_completion
from mpisplit.training.data import CharTokenizer

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

CHARS = "\n !\"',-.:0123456789?abcdefghijklmnopqrstuvwxyz[]{}"
REGEX = r"[a-z]{3,8}( [a-z]{2,5}){1,3}\."
CHOICES = ["yes", "no", "maybe not"]
SCHEMA = {
    "type": "object",
    "properties": {
        "word": {"type": "string", "pattern": "^[a-z]{1,6}$"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["word", "n", "ok", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def served():
    """A random model over a character vocabulary, at tp = the world size, and its ModelInfo."""
    world = MPI.COMM_WORLD.Get_size()
    grid = ms.ProcessGrid(tp=world)
    cfg = ms.GPTConfig.llama(vocab_size=len(CHARS), block_size=128, n_layer=2, n_head=2 * world,
                             n_kv_head=world, n_embd=16 * world, intermediate_size=40)
    model = ms.GPT(cfg, grid, dtype="float64", seed=3)
    for p in model.parameters():
        if p.data.ndim == 2:
            p.data *= 5.0
    model.eval()
    tok = CharTokenizer(CHARS)
    yield model, tok, ModelInfo("m", len(CHARS), 128, tok)
    grid.free()


def _run(model, tok, specs: list[SequenceSpec], **kw) -> dict[int, tuple[list[int], str | None, str | None]]:
    eng = Engine(model, max_batch=len(specs), prefill_chunk=8, tokenizer=tok, **kw)
    for spec in specs:
        eng.add(spec)
    out: dict[int, tuple[list[int], str | None, str | None]] = {s.rid: ([], None, None) for s in specs}
    while eng.running:
        for o in eng.step():
            tokens, _, _ = out[o.rid]
            if o.token >= 0:
                tokens.append(o.token)
            out[o.rid] = (tokens, o.reason, o.error)
    return out


def _requests(info: ModelInfo, field: str, value, count: int, **extra) -> list[SequenceSpec]:
    body = {"prompt": "the answer:", "max_tokens": 100, "temperature": 1.0, field: value, **extra}
    req = validate_completion(body, info)
    return [SequenceSpec(i, req.prompt, req.max_tokens, SamplingParams(**{**req.sampling.to_json(), "seed": i}))
            for i in range(count)]


@pytest.mark.mpi
def test_every_output_matches_its_constraint(served):
    model, tok, info = served
    cases = [("guided_regex", REGEX, lambda text: re.fullmatch(REGEX, text) is not None),
             ("guided_choice", CHOICES, lambda text: text in CHOICES),
             ("response_format", {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}},
              lambda text: jsonschema.validate(json.loads(text), SCHEMA) is None)]
    # (any JSON object, json_object, is unbounded: a random model fills max_tokens with it; the
    # server test gives it to a real model)
    for field, value, check in cases:
        results = _run(model, tok, _requests(info, field, value, 12))
        texts = set()
        for tokens, reason, error in results.values():
            text = tok.decode(tokens)
            assert error is None and reason == "stop", (field, text, reason, error)
            assert check(text), (field, text)
            texts.add(text)
        assert len(texts) > 1 or field == "guided_choice", (field, texts)  # sampled, not one fixed text
    unconstrained = _run(model, tok, _requests(info, "guided_regex", None, 4, max_tokens=20))
    assert not any(re.fullmatch(REGEX, tok.decode(t)) for t, _, _ in unconstrained.values())


@pytest.mark.mpi
def test_other_requests_draw_what_they_draw_alone(served):
    """A guided request in the batch changes no bit of the others' tokens (batch-invariant engine)."""
    model, tok, info = served
    plain = [SequenceSpec(100 + i, [5 + i, 9, 30], 24, SamplingParams(temperature=t, seed=i))
             for i, t in enumerate((0.0, 0.9))]
    alone = _run(model, tok, plain, batch_invariant=True)
    mixed = _run(model, tok, plain + _requests(info, "guided_regex", REGEX, 3), batch_invariant=True)
    for spec in plain:
        assert mixed[spec.rid] == alone[spec.rid]


@pytest.mark.mpi
def test_grammar_ends_the_sequence_before_min_tokens(served):
    """min_tokens bans the end; a complete grammar ends the sequence anyway ("stop")."""
    model, tok, info = served
    results = _run(model, tok, _requests(info, "guided_choice", ["ok"], 2, min_tokens=10))
    assert all(tok.decode(t) == "ok" and r == "stop" and e is None for t, r, e in results.values())


@pytest.mark.mpi
def test_a_grammar_that_fails_fails_its_request_alone(served):
    model, tok, _ = served
    bad = SequenceSpec(1, [3, 4], 10, SamplingParams(grammar="%%% not a grammar"))
    good = SequenceSpec(2, [3, 4], 10, SamplingParams(temperature=0.0))
    results = _run(model, tok, [bad, good])
    assert results[1][1] == "error" and "grammar" in results[1][2]
    assert results[2][1] == "length" and len(results[2][0]) == 10


def test_guided_fields(served):
    """Each way to ask, and what each bad request is told (a 400 naming the field)."""
    _, _, info = served
    base = {"prompt": "x", "max_tokens": 5}
    for field, value in [("guided_json", SCHEMA), ("guided_json", json.dumps(SCHEMA)), ("guided_regex", REGEX),
                         ("guided_choice", CHOICES), ("guided_grammar", 'start: "a" | "b"'),
                         ("guided_grammar", 'root ::= "a" | "b"'), ("structured_outputs", {"regex": REGEX}),
                         ("structured_outputs", {"json": SCHEMA}), ("response_format", {"type": "json_object"})]:
        assert validate_completion({**base, field: value}, info).sampling.grammar, field
    assert validate_completion({**base, "response_format": {"type": "text"}}, info).sampling.grammar is None
    both = {**base, "response_format": {"type": "text"}, "guided_regex": REGEX}  # text is no constraint
    assert validate_completion(both, info).sampling.grammar == validate_completion(
        {**base, "guided_regex": REGEX}, info).sampling.grammar
    bad = [({"guided_regex": REGEX, "guided_choice": CHOICES}, "guided_choice", "at most one"),
           ({"guided_json": "{not json"}, "guided_json", "not a JSON schema"),
           ({"guided_json": [1]}, "guided_json", "must be a JSON schema"),
           ({"guided_regex": "(unclosed"}, "guided_regex", "cannot be used"),
           ({"guided_choice": []}, "guided_choice", "non-empty list"),
           ({"guided_grammar": "start: undefined_rule"}, "guided_grammar", "cannot be used"),
           ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "one of"),
           ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs", "cannot be used"),
           ({"response_format": {"type": "xml"}}, "response_format", "json_object or json_schema"),
           ({"response_format": {"type": "json_schema"}}, "response_format", "needs 'json_schema'"),
           ({"response_format": "json"}, "response_format", "an object with a 'type'"),
           ({"guided_json": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}, "guided_json", "")]
    for extra, param, words in bad:
        with pytest.raises(ApiError) as info_:
            validate_completion({**base, **extra}, info)
        assert info_.value.param == param and words in info_.value.message, (extra, info_.value.message)
    no_tokenizer = ModelInfo("m", 10, 64, None)
    with pytest.raises(ApiError, match="needs a tokenizer"):
        validate_completion({"prompt": [1, 2], "guided_regex": "a+"}, no_tokenizer)


def test_mask_bits_are_the_tokens_allowed(served):
    """GrammarTokenizer.allowed reads llguidance's bit order (token i: bit i % 32 of word i // 32)."""
    from mpisplit.serving.guided import grammar_tokenizer

    _, tok, info = served
    gt = grammar_tokenizer(tok, info.vocab_size, ())
    mask = np.zeros(gt.words, dtype=np.int32)
    for i in (0, 31, 33, len(CHARS) - 1):
        mask[i // 32] |= np.int32(np.uint32(1 << (i % 32)).astype(np.int32))
    assert np.flatnonzero(gt.allowed(mask)).tolist() == [0, 31, 33, len(CHARS) - 1]


def test_hostile_constraints_are_400s(served):
    """What a fuzzer or a careless client sends: a clear 400 each, never an exception of another kind."""
    _, _, info = served
    deep: dict = {"type": "object"}
    for _ in range(400):
        deep = {"type": "object", "properties": {"a": deep}}
    for extra in [{"guided_json": deep}, {"guided_json": True}, {"guided_json": {"$ref": "#/nowhere"}},
                  {"guided_json": {"anyOf": []}}, {"guided_regex": "(?<=a)b"}, {"guided_grammar": "%%%"},
                  {"guided_choice": ["a", 1]}, {"guided_regex": "x" * 200_000},
                  {"response_format": {"type": "json_schema", "json_schema": {"schema": "{"}}},
                  {"structured_outputs": {"color": "red"}}]:
        with pytest.raises(ApiError) as err:
            validate_completion({"prompt": "x", "max_tokens": 5, **extra}, info)
        assert err.value.param == next(iter(extra)), (extra, err.value.message)
