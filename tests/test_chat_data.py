"""`mpisplit prepare --chat`: conversations rendered by the chat template, the loss mask of each
turn, the shards, the training batches, and training on them.

    python -m pytest -q tests/test_chat_data.py

References: transformers' `apply_chat_template` rendered turn by turn on the same tokenizer
files (the tokens a turn adds, the generation prompt as an assistant turn's header); the
conversations' own text for the batches; transformers' GPT-2 in float64 for the loss of the
first training step (summed cross-entropy over the counted targets / their number).
"""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from _chat import (
    LLAMA3_STYLE,
    QWEN2_STYLE,
    SMOLLM2,
    train_tokenizer,
    write_chat_folder,
    write_tokenizer_folder,
)
from conftest import REPO_ROOT, clean_mpi_env, mpiexec_path

from mpisplit.data.chat_mask import encode_conversation
from mpisplit.data.conversations import parse_record
from mpisplit.data.manifest import read_manifest
from mpisplit.data.prepare import PrepareOptions, prepare
from mpisplit.models.chat_template import ChatTemplate, load_chat_template
from mpisplit.training.chat_data import IGNORE, ChatDataset

pytest.importorskip("jinja2")
pytestmark = pytest.mark.timeout(300)
QUIET = {"progress": False, "workers": 1}
TEMPLATES = {"smollm2": SMOLLM2, "qwen2-style": QWEN2_STYLE, "llama3-style": LLAMA3_STYLE}
TOKENS = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
S, U, A = "system", "user", "assistant"


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


CHATS = [
    [msg(U, "What is the capital of France?"), msg(A, "Paris is the capital of France.")],
    [msg(S, "You tell stories."), msg(U, "Tell me a story about a fox."), msg(A, "The quick brown fox jumps."),
     msg(U, "Hello there"), msg(A, "I am fine, thank you.")],
    [msg(U, "Hello there, how are you today?"), msg(A, "I am fine."), msg(U, "Tell me a story."),
     msg(A, "The lazy dog."), msg(U, "Thank you")],
]


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer()


@pytest.fixture(scope="module")
def folders(bpe, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat-data")
    return {name: write_tokenizer_folder(root / name, bpe, t, **TOKENS) for name, t in TEMPLATES.items()}


def hf_tokenizer(folder: Path):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **TOKENS)
    tok.chat_template = json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]
    return tok


def hf_reference(tok, messages: list[dict], train_on: str) -> tuple[list[int], list[int]]:
    """Ids and mask from transformers' tokenizer `tok`, turn by turn: an assistant turn trains the
    tokens that rendering it adds after the generation prompt of the turns before it."""

    def ids(part: list[dict], prompt: bool = False) -> list[int]:
        return tok.apply_chat_template(part, tokenize=True, add_generation_prompt=prompt, return_dict=False)

    whole = ids(messages)
    mask = [0] * len(whole)
    answers = []
    for i, m in enumerate(messages):
        if m["role"] == A:
            head, done = ids(messages[:i], prompt=True), ids(messages[: i + 1])
            assert whole[: len(done)] == done and done[: len(head)] == head  # the turns are prefixes
            answers.append(range(len(head), len(done)))
    if train_on == "all":
        answers = [range(len(whole))]
    for span in answers[-1:] if train_on == "last" else answers:
        for j in span:
            mask[j] = 1
    return whole, mask


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("train_on", ["assistant", "last", "all"])
def test_mask_equals_transformers_turn_by_turn(folders, template, train_on):
    pytest.importorskip("transformers")
    folder = folders[template]
    chat_template = load_chat_template(folder)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for messages in CHATS:
        ids, mask = encode_conversation(tok, chat_template, messages, None, train_on, "test")
        want_ids, want_mask = hf_reference(hf_tokenizer(folder), messages, train_on)
        assert ids.tolist() == want_ids
        assert mask.tolist() == want_mask, (template, train_on, messages)
        assert mask.any() and not mask.all() or train_on == "all"


def test_end_of_turn_token_trained_header_not(folders):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folders["smollm2"] / "tokenizer.json"))
    ids, mask = encode_conversation(tok, load_chat_template(folders["smollm2"]), CHATS[0], None, "assistant", "t")
    trained = tok.decode(ids[mask == 1].tolist(), skip_special_tokens=False)
    assert trained == "Paris is the capital of France.<|im_end|>\n"


def test_sharegpt_equals_openai_layout():
    openai = {"messages": [msg(S, "s"), msg(U, "u"), {"role": A, "content": [{"type": "text", "text": "a"},
                                                                             {"type": "text", "text": "b"}]}]}
    sharegpt = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "u"},
                                  {"from": "gpt", "value": "a\nb"}]}
    assert parse_record(json.dumps(openai), "x")[0] == parse_record(json.dumps(sharegpt), "y")[0]


def write_chats(path: Path, chats: list[list[dict]], sharegpt_every: int = 2) -> Path:
    roles = {S: "system", U: "human", A: "gpt"}
    with open(path, "w") as f:
        for i, c in enumerate(chats):
            if i % sharegpt_every == 1:
                f.write(json.dumps({"conversations": [{"from": roles[m["role"]], "value": m["content"]} for m in c]}))
            else:
                f.write(json.dumps({"messages": c}))
            f.write("\n\n" if i == 1 else "\n")  # a blank line is skipped
    return path


@pytest.mark.parametrize("workers", [1, 2])
def test_prepare_chat_shards_and_batches(folders, tmp_path, workers):
    from tokenizers import Tokenizer

    folder = folders["qwen2-style"]
    no_answer = [msg(U, "Hello there")]  # nothing to train on: skipped
    chats = [CHATS[i % 3] + ([msg(U, "Thank you"), msg(A, "The end " * (i % 4))] if i % 2 else []) for i in range(9)]
    write_chats(tmp_path / "c.jsonl", [*chats[:4], no_answer, *chats[4:]])
    manifest = prepare([tmp_path / "c.jsonl"], folder, tmp_path / "c",
                       PrepareOptions(chat=True, val_fraction=0.25, eos="<|im_end|>", progress=False, workers=workers))
    tok, template = Tokenizer.from_file(str(folder / "tokenizer.json")), load_chat_template(folder)
    encoded = [encode_conversation(tok, template, c, None, "assistant", "t") for c in chats]
    val = [3, 7]  # floor((i + 1) / 4) > floor(i / 4)
    train = [i for i in range(9) if i not in val]
    assert manifest["kind"] == "chat" and manifest["chat"]["skipped"] == 1
    assert manifest["train"]["documents"] == 7 and manifest["val"]["documents"] == 2
    assert manifest["train"]["trained_tokens"] == sum(int(encoded[i][1][1:].sum()) for i in train)
    assert read_manifest(tmp_path / "c") == manifest
    data = ChatDataset(tmp_path / "c", manifest, tok.get_vocab_size())
    for split, which in (("train", train), ("val", val)):
        seq = max(len(encoded[i][0]) for i in which) + 3
        x, y = data.batch(split, 5, 2, 8, seq)
        picks = np.random.default_rng([5, 0 if split == "train" else 1, 2]).integers(0, len(which), size=8)
        for row, k in enumerate(picks):
            ids, mask = encoded[which[k]]
            n = len(ids) - 1
            assert x[row, :n].tolist() == ids[:-1].tolist() and (x[row, n:] == data.pad).all()
            want = [int(t) if m else IGNORE for t, m in zip(ids[1:], mask[1:])] + [IGNORE] * (seq - n)
            assert y[row].tolist() == want
        for dp in (2, 4):
            rows = [data.batch(split, 5, 2, 8, seq, r, dp) for r in range(dp)]
            assert np.array_equal(np.concatenate([r[0] for r in rows]), x)
            assert np.array_equal(np.concatenate([r[1] for r in rows]), y)
    longest = max(manifest["train"]["longest"], manifest["val"]["longest"])
    data.check_seq_len(longest - 1)
    with pytest.raises(ValueError, match=f"conversations of up to {longest} tokens; --seq-len {longest - 2}"):
        data.check_seq_len(longest - 2)


@pytest.mark.parametrize("workers", [1, 2])
def test_too_long_refused_or_truncated(folders, tmp_path, workers):
    folder = folders["smollm2"]
    write_chats(tmp_path / "c.jsonl", [CHATS[1], CHATS[0], CHATS[2]])
    with pytest.raises(ValueError, match=r"c\.jsonl:1: the conversation has \d+ tokens, more than --seq-len 40"):
        prepare([tmp_path / "c.jsonl"], folder, tmp_path / "a",
                PrepareOptions(chat=True, seq_len=40, progress=False, workers=workers))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]  # nothing written, no temporary folder
    # 67, 76 and 106 tokens whose answers start at tokens 35, 66 and 67: cut to 67, the second
    # keeps 1 answer token and the third none (skipped)
    manifest = prepare([tmp_path / "c.jsonl"], folder, tmp_path / "b",
                       PrepareOptions(chat=True, seq_len=67, truncate=True, val_fraction=0.4, **QUIET))
    assert manifest["chat"]["truncated"] == 2 and manifest["chat"]["skipped"] == 1
    assert manifest["train"]["longest"] == manifest["val"]["longest"] == 67
    assert manifest["val"]["trained_tokens"] == 1


REWRITES = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
            "{% if loop.last %} (last){% endif %}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("case", ["rewrites-turns", "not-jsonl", "bad-role", "no-messages", "no-template",
                                  "one-conversation", "train-on"])
def test_bad_input_is_one_clear_error(bpe, folders, tmp_path, case):
    folder, options, inputs = folders["smollm2"], {}, [write_chats(tmp_path / "c.jsonl", CHATS)]
    if case == "rewrites-turns":
        folder = write_tokenizer_folder(tmp_path / "rw", bpe, REWRITES, **TOKENS)
        message = r"c\.jsonl:1: the chat template .*rw.* cannot be masked turn by turn: the rendering of messages\[:2\]"
    elif case == "not-jsonl":
        (tmp_path / "c.txt").write_text("hello")
        inputs, message = [tmp_path / "c.txt"], r"--chat reads JSONL files .*c\.txt' is not one"
    elif case == "bad-role":
        (tmp_path / "c.jsonl").write_text(json.dumps({"conversations": [{"from": "bot", "value": "x"}]}) + "\n")
        message = r"c\.jsonl:1: conversations\[0\]: 'from' must be one of"
    elif case == "no-messages":
        (tmp_path / "c.jsonl").write_text('{"text": "hello"}\n')
        message = r"c\.jsonl:1: a conversation needs 'messages' .* the line has \['text'\]"
    elif case == "no-template":
        folder = write_tokenizer_folder(tmp_path / "none", bpe, None, **TOKENS)
        message = "has no chat template .* --chat-template FILE"
    elif case == "one-conversation":
        write_chats(tmp_path / "c.jsonl", CHATS[:1])
        message = "a single conversation to train on"
    else:
        options, message = {"train_on": "users"}, "--train-on must be one of assistant, last, all, got 'users'"
    with pytest.raises((ValueError, TypeError), match=message):
        prepare(inputs, folder, tmp_path / "out", PrepareOptions(chat=True, **options, **QUIET))
    assert not (tmp_path / "out").exists()


def test_rewriting_template_renders_but_cannot_be_masked():
    """The template above is a fine template for serving: only the turn-by-turn split fails."""
    t = ChatTemplate(REWRITES)
    assert t.render(CHATS[0]).endswith("France. (last)<|im_end|>\n<|im_start|>assistant\n")


def _run(n: int, args: list[str], cwd: Path) -> None:
    cmd = [mpiexec_path(), "-n", str(n), sys.executable, str(Path(REPO_ROOT) / "train.py"), *args]
    done = subprocess.run(cmd, check=False, cwd=cwd, env=clean_mpi_env(), capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


def _gpt_and_corpus(tmp_path: Path, n: int, block_size: int) -> None:
    """tmp_path/gpt (a GPT-2 folder with a chat template) and tmp_path/corpus (n conversations)."""
    write_chat_folder(tmp_path / "gpt", block_size=block_size)
    write_chats(tmp_path / "c.jsonl", [CHATS[i % 3][: 2 + 2 * (i % 2)] for i in range(n)])
    subprocess.run([sys.executable, "-m", "mpisplit", "prepare", "--chat", "--tokenizer", "gpt", "--out", "corpus",
                    "--eos", "<|im_end|>", "--val-fraction", "0.2", "--seq-len", "64", "--no-progress", "c.jsonl"],
                   cwd=tmp_path, env=clean_mpi_env(), check=True, capture_output=True, timeout=120)


def test_training_on_chat_data_equals_transformers(tmp_path):
    """One command line from conversations to a trained model: the first step's loss equals the
    summed cross-entropy over the counted targets / their number under transformers' GPT-2 in
    float64, and every layout, and a run resumed at another layout, gives the same losses."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import GPT2LMHeadModel

    _gpt_and_corpus(tmp_path, 12, block_size=64)
    common = ["--data", "corpus", "--init-from", "gpt", "--seq-len", "63", "--batch-size", "4",
              "--dtype", "float64", "--eval-every", "0", "--sample-len", "0", "--no-progress", "--log-every", "1",
              "--lr", "1e-2", "--warmup", "3"]  # 3 steps inside the warmup: --steps 2 has the same rates
    runs = {"one": (1, ["--steps", "3"]), "dp2": (2, ["--steps", "3", "--dp", "2", "--tp", "1"]),
            "tp2-mb2": (2, ["--steps", "3", "--tp", "2", "--micro-batches", "2"])}
    for name, (n, flags) in runs.items():
        _run(n, [*common, *flags, "--out", name], tmp_path)
    _run(1, [*common, "--steps", "2", "--out", "resumed"], tmp_path)  # two steps, then
    _run(2, [*common, "--steps", "3", "--tp", "2", "--resume", "--out", "resumed"], tmp_path)  # the third at tp 2
    losses = {name: [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
              for name in [*runs, "resumed"]}
    for name, got in losses.items():
        assert len(got) == 3 and np.allclose(got, losses["one"], rtol=1e-10, atol=0), (name, losses)
    manifest = read_manifest(tmp_path / "corpus")
    x, y = ChatDataset(tmp_path / "corpus", manifest, 391).batch("train", 1337, 0, 4, 63)
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "gpt", torch_dtype=torch.float64).eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(x)).logits
    counted = torch.as_tensor(y) != IGNORE
    logp = torch.log_softmax(logits, dim=-1)[counted, torch.as_tensor(y)[counted]]
    assert abs(losses["one"][0] - float(-logp.sum() / counted.sum())) < 1e-10 * losses["one"][0]


def test_packed_rows_hold_every_conversation_once_an_epoch(folders, tmp_path):
    """--pack: each epoch's rows hold every conversation once, whole, from position 0, with its
    own targets; any dp split gives the same global rows; another epoch packs anew."""
    from tokenizers import Tokenizer

    from mpisplit.nn.packing import check_positions

    folder = folders["qwen2-style"]
    chats = [[msg(U, f"Question {i}?"), msg(A, "The end " * (1 + i % 5))]
             + ([msg(U, "Tell me a story."), msg(A, "The lazy dog. " * (1 + i % 3))] if i % 2 else []) for i in range(23)]
    write_chats(tmp_path / "c.jsonl", chats)
    manifest = prepare([tmp_path / "c.jsonl"], folder, tmp_path / "c",
                       PrepareOptions(chat=True, val_fraction=0.2, eos="<|im_end|>", progress=False, workers=1))
    tok, template = Tokenizer.from_file(str(folder / "tokenizer.json")), load_chat_template(folder)
    encoded = {tuple(ids.tolist()): mask for ids, mask in
               (encode_conversation(tok, template, c, None, "assistant", "t") for c in chats)}
    data = ChatDataset(tmp_path / "c", manifest, tok.get_vocab_size())
    part = data.splits["train"]
    train = [tuple(part.conversation(k)[0].tolist()) for k in range(part.conversations)]
    assert len(set(train)) == len(train) > 15 and set(train) <= set(encoded)
    seq = 2 * (manifest["train"]["longest"] - 1)
    data.use_packing(seq)
    with pytest.raises(ValueError, match="rows()"):
        data.batch("train", 5, 0, 4, seq)
    per_epoch, batch = data.splits["train"].row_count(seq), 4
    assert per_epoch < len(train)  # packing saves rows
    epochs = []
    for epoch in range(2):
        seen, first = [], epoch * per_epoch
        for row in range(first, first + per_epoch):
            step, k = divmod(row, batch)
            x, y, pos = data.rows("train", 5, step, batch, seq)
            x, y, pos = x[k], y[k], pos[k]
            check_positions(pos[None], (1, seq), seq)
            starts = [i for i in range(seq) if pos[i] == 0] + [seq]
            for lo, hi in pairwise(starts):
                ids = tuple(x[lo:hi].tolist())
                full = [key for key in encoded if key[:-1] == ids]
                if not full:  # the padding after the last conversation: nothing counted
                    assert hi == seq and (x[lo:] == data.pad).all() and (y[lo:] == IGNORE).all()
                    continue
                mask = encoded[full[0]]
                assert y[lo:hi].tolist() == [t if m else IGNORE for t, m in zip(full[0][1:], mask[1:])]
                seen.append(full[0])
        assert sorted(seen) == sorted(train)  # every conversation once (they are all different)
        epochs.append(seen)
    assert epochs[0] != epochs[1]
    for dp in (2, 4):
        whole = data.rows("train", 5, 3, 8, seq)
        parts = [data.rows("train", 5, 3, 8, seq, r, dp) for r in range(dp)]
        for i in range(3):
            assert np.array_equal(np.concatenate([p[i] for p in parts]), whole[i])


def test_pack_needs_a_chat_corpus():
    from mpisplit.training.config import TrainConfig
    from mpisplit.training.setup import load_data

    with pytest.raises(ValueError, match="--pack packs the conversations of a chat corpus"):
        load_data(TrainConfig(pack=True, seq_len=16))


def test_packed_training_equals_transformers_on_each_conversation(tmp_path):
    """train --pack: the first step's loss is the summed cross-entropy of the counted targets of
    each conversation computed alone by transformers' GPT-2 (float64) over their number; tp 2
    with sequence parallelism and full recomputation gives the same losses."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import GPT2LMHeadModel

    _gpt_and_corpus(tmp_path, 16, block_size=128)
    common = ["--data", "corpus", "--init-from", "gpt", "--seq-len", "128", "--batch-size", "2", "--pack",
              "--dtype", "float64", "--eval-every", "2", "--eval-iters", "1", "--sample-len", "0", "--no-progress",
              "--log-every", "1", "--lr", "1e-2", "--warmup", "3", "--steps", "2"]
    _run(1, [*common, "--out", "one"], tmp_path)
    _run(2, [*common, "--tp", "2", "--sequence-parallel", "--recompute", "full", "--out", "tp2"], tmp_path)
    metrics = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
               for name in ("one", "tp2")}
    for key in ("loss", "val_loss"):
        got = [[m[key] for m in metrics[name] if key in m] for name in ("one", "tp2")]
        assert got[0] and np.allclose(got[0], got[1], rtol=1e-10, atol=0), (key, got)
    data = ChatDataset(tmp_path / "corpus", read_manifest(tmp_path / "corpus"), 391)
    data.use_packing(128)
    x, y, pos = data.rows("train", 1337, 0, 2, 128)
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "gpt", torch_dtype=torch.float64).eval()
    total, counted, pieces = 0.0, 0, 0
    with torch.no_grad():
        for r in range(2):
            starts = [i for i in range(128) if pos[r, i] == 0] + [128]
            for lo, hi in pairwise(starts):  # each conversation (and the padding) alone
                keep = torch.as_tensor(y[r, lo:hi]) != IGNORE
                logp = torch.log_softmax(model(torch.as_tensor(x[None, r, lo:hi])).logits[0], dim=-1)
                total -= float(logp[keep, torch.as_tensor(y[r, lo:hi])[keep]].sum())
                counted += int(keep.sum())
                pieces += bool(keep.any())
    assert pieces > 2  # a row holds two conversations or more
    assert abs(metrics["one"][0]["loss"] - total / counted) < 1e-10 * total / counted
