"""A Hugging Face GPT-2 folder with a byte-level BPE tokenizer that this test trains with the
`tokenizers` library: the server and `mpisplit generate --hf --prompt TEXT` read and write
text through it. References: the library's greedy decoding of the tokenizer's ids in this
process, and transformers' `generate` and log-softmax where transformers is installed."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from _serving import Server, greedy_reference, serve_env, tiny_model
from mpi4py import MPI

pytestmark = pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="launches its own MPI jobs")
tokenizers = pytest.importorskip("tokenizers")
openai = pytest.importorskip("openai")

TEXT = (
    "The quick brown fox jumps over the lazy dog. Über café naïve résumé → déjà vu. "
    "Tensor parallel serving splits every layer over the ranks; each rank holds its heads. "
) * 20
PROMPT = "The café fox"


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    folder.mkdir()
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator([TEXT], vocab_size=300, min_frequency=2, show_progress=False)
    model = tiny_model(bpe.get_vocab_size(), seed=5)
    model.save_pretrained(folder)
    bpe.save(str(folder / "tokenizer.json"))
    two_files = folder.parent / "two-files"
    two_files.mkdir()
    model.save_pretrained(two_files)
    bpe.save_model(str(two_files))  # vocab.json + merges.txt
    yield folder, two_files, model, bpe
    model.grid.free()


def test_hf_tokenizer_loads_both_layouts(hf_folder):
    from mpisplit.models.hf_tokenizer import load_hf_tokenizer

    folder, two_files, _model, bpe = hf_folder
    one, two = load_hf_tokenizer(folder), load_hf_tokenizer(two_files)
    ids = bpe.encode(PROMPT).ids
    assert one.encode(PROMPT).tolist() == ids == two.encode(PROMPT).tolist()
    assert one.decode(ids) == PROMPT == two.decode(ids)
    assert load_hf_tokenizer(folder.parent) is None  # no tokenizer: token ids only
    with pytest.raises(ValueError, match="300 tokens; the model's vocabulary has 10"):
        load_hf_tokenizer(folder, vocab_size=10)


def test_generate_command_takes_text_with_a_tokenizer(hf_folder):
    folder, _, model, bpe = hf_folder
    ids = bpe.encode(PROMPT).ids
    expected = bpe.decode(ids + greedy_reference(model, ids, 10).tolist())
    out = subprocess.run(
        [sys.executable, "-m", "mpisplit.generate", "--hf", str(folder), "--prompt", PROMPT,
         "--max-new-tokens", "10", "--dtype", "float64"],
        capture_output=True, text=True, timeout=60, env=serve_env(), check=True,
    ).stdout
    assert out.removesuffix("\n") == expected


def _transformers_reference(folder, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """transformers' greedy tokens and their logprobs; a skip naming what is missing (after the
    test's own checks ran) where torch or transformers is not installed."""
    torch = pytest.importorskip("torch", reason="the comparison with transformers needs torch")
    transformers = pytest.importorskip("transformers", reason="the comparison with transformers needs transformers")
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder, torch_dtype=torch.float64).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
        logits = hf(out).logits[0]
    lp = torch.log_softmax(logits, dim=-1).numpy()
    gen = out[0, len(ids):].tolist()
    return gen, np.array([lp[len(ids) - 1 + i, t] for i, t in enumerate(gen)])


@pytest.mark.parametrize("n", [1, 2])
def test_server_with_bpe_tokenizer(hf_folder, n):
    folder, two_files, model, bpe = hf_folder
    ids = bpe.encode(PROMPT).ids
    gen = greedy_reference(model, ids, 12).tolist()
    with Server(n, ["--hf", str(folder if n == 1 else two_files), "--dtype", "float64"]) as srv:
        name = json.loads(__import__("httpx").get(srv.url + "/v1/models", timeout=30).text)["data"][0]["id"]
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        resp = client.completions.create(model=name, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=1)
        choice = resp.choices[0]
        assert choice.text == bpe.decode(gen)
        assert resp.usage.prompt_tokens == len(ids)
        assert choice.logprobs.tokens == [bpe.decode([t]) for t in gen]
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model=name, prompt=PROMPT, max_tokens=12, temperature=0, stream=True))
        assert streamed == choice.text
        by_ids = client.completions.create(model=name, prompt=ids, max_tokens=12, temperature=0)
        assert by_ids.choices[0].text == choice.text
        ref = _transformers_reference(folder, ids, 12)
        assert ref[0] == gen
        assert np.allclose(choice.logprobs.token_logprobs, ref[1], atol=1e-9, rtol=0)


def test_fine_tune_from_folder_on_text(hf_folder, tmp_path):
    """train.py --init-from FOLDER --data file.txt trains on the text encoded by the folder's
    tokenizer (the data set's ids are the tokenizer's own), and its loss goes down."""
    from conftest import REPO_ROOT, mpiexec_command

    folder, _, _, bpe = hf_folder
    data = tmp_path / "text.txt"
    data.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "run"
    proc = subprocess.run(
        [*mpiexec_command(2), sys.executable, f"{REPO_ROOT}/train.py", "--init-from", str(folder), "--data",
         str(data), "--steps", "6", "--seq-len", "16", "--batch-size", "4", "--eval-every", "0", "--sample-len",
         "0", "--no-progress", "--log-every", "1", "--dtype", "float64", "--lr", "3e-3", "--out", str(out)],
        capture_output=True, text=True, timeout=120, env=serve_env(), check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) >= 6 and losses[-1] < losses[0]
    from mpisplit.training.config import TrainConfig
    from mpisplit.training.setup import load_data

    ds = load_data(TrainConfig(init_from=str(folder), data=str(data), seq_len=16)).dataset
    assert np.concatenate([ds.train, ds.val]).tolist() == bpe.encode(TEXT).ids


def test_generate_stops_at_the_folders_eos_ids_as_transformers_does(hf_folder, tmp_path):
    """generation_config.json lists two eos ids, one the greedy continuation reaches at k:
    `mpisplit generate --hf` ends there (the eos id printed, as transformers' generate returns
    it), --ignore-eos runs on; transformers, reading the same folder, stops at the same token."""
    import shutil

    folder, _, model, bpe = hf_folder
    ids = bpe.encode(PROMPT).ids
    gen = greedy_reference(model, ids, 12).tolist()
    k = next(i for i in range(1, 12) if gen[i] not in gen[:i])
    unused = next(t for t in range(len(bpe.get_vocab())) if t not in gen)
    eos_folder = tmp_path / "with-eos"
    shutil.copytree(folder, eos_folder)
    (eos_folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [unused, gen[k]]}))

    def generate(*extra: str) -> list[int]:
        out = subprocess.run(
            [sys.executable, "-m", "mpisplit.generate", "--hf", str(eos_folder), "--dtype", "float64",
             "--prompt-ids", ",".join(map(str, ids)), "--max-new-tokens", "12", *extra],
            capture_output=True, text=True, timeout=60, env=serve_env(), check=True,
        ).stdout
        return [int(t) for t in out.strip().split(",")][len(ids):]

    assert generate() == gen[: k + 1]
    assert generate("--ignore-eos") == gen
    ref = _transformers_reference(eos_folder, ids, 12)
    assert ref[0] == gen[: k + 1]
