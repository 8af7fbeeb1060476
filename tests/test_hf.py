"""Hugging Face GPT-2 folders: load at every TP degree, save bitwise, convert both ways.

    mpiexec -n N python -m pytest --with-mpi -q tests/test_hf.py     (N = 1, 2, 3, 4)

References: a GPT-2 folder written here with safetensors.numpy.save_file from seeded dense
arrays under transformers' names ("transformer." prefix, attention-mask buffers, a tied
lm_head.weight), and the dense float64 GPT-2 forward of tests/_dense_gpt.py computed from those
arrays. Vocabulary 67 is padded at tp = 2, 3, 4 (to 68, 69, 68); 12 heads split at every tp
up to 4. Loaded slabs and saved files must equal the source arrays bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import _dense_gpt as dense
import numpy as np
import pytest
from _mpi import gather_slab, grids, max_rel
from conftest import clean_mpi_env, mpiexec_path
from mpi4py import MPI
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import mpisplit as ms
from mpisplit.models import hf_gpt2
from mpisplit.training.checkpoint import CheckpointReader

COMM = MPI.COMM_WORLD
TINY = {"V": 67, "S": 16, "L": 2, "H": 12, "h": 36}


def gpt2_arrays(V: int, S: int, L: int, H: int, h: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded float64 GPT-2 weights under the model's names (no prefix), HF shapes."""
    rng = np.random.default_rng(seed)

    def normal(*shape: int, std: float = 0.2) -> np.ndarray:
        return rng.standard_normal(shape) * std

    p = {"wte.weight": normal(V, h, std=1.0), "wpe.weight": normal(S, h, std=0.1)}
    for i in range(L):
        b = f"h.{i}."
        p[b + "ln_1.weight"], p[b + "ln_1.bias"] = 1 + normal(h, std=0.1), normal(h, std=0.1)
        p[b + "attn.c_attn.weight"], p[b + "attn.c_attn.bias"] = normal(h, 3 * h), normal(3 * h, std=0.1)
        p[b + "attn.c_proj.weight"], p[b + "attn.c_proj.bias"] = normal(h, h), normal(h, std=0.1)
        p[b + "ln_2.weight"], p[b + "ln_2.bias"] = 1 + normal(h, std=0.1), normal(h, std=0.1)
        p[b + "mlp.c_fc.weight"], p[b + "mlp.c_fc.bias"] = normal(h, 4 * h), normal(4 * h, std=0.1)
        p[b + "mlp.c_proj.weight"], p[b + "mlp.c_proj.bias"] = normal(4 * h, h, std=0.1), normal(h, std=0.1)
    p["ln_f.weight"], p["ln_f.bias"] = 1 + normal(h, std=0.1), normal(h, std=0.1)
    return p


def hf_config_dict(V: int, S: int, L: int, H: int, h: int, **extra: object) -> dict:
    cfg = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
        "vocab_size": V, "n_positions": S, "n_ctx": S, "n_embd": h, "n_layer": L, "n_head": H,
        "n_inner": None, "layer_norm_epsilon": 1e-5, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
    }
    cfg.update(extra)
    return cfg


def hf_file_arrays(params: dict[str, np.ndarray], S: int, L: int, dtype: type) -> dict[str, np.ndarray]:
    """What transformers writes: prefixed names, the mask buffers, the tied head."""
    out = {"transformer." + k: v.astype(dtype) for k, v in params.items()}
    for i in range(L):
        out[f"transformer.h.{i}.attn.bias"] = np.tril(np.ones((1, 1, S, S), dtype=dtype))
        out[f"transformer.h.{i}.attn.masked_bias"] = np.array(-1e4, dtype=dtype)
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def write_folder(folder: Path, arrays: dict[str, np.ndarray], config: dict) -> None:
    """Rank 0 writes config.json + model.safetensors; every rank returns once they exist."""
    if COMM.rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        save_file(arrays, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(config))
    COMM.Barrier()


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A temporary folder all ranks see (rank 0 creates it, bcasts the path)."""
    path = tempfile.mkdtemp(prefix="mpisplit-hf-") if COMM.rank == 0 else None
    path = Path(COMM.bcast(path, root=0))
    yield path
    COMM.Barrier()
    if COMM.rank == 0:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def tiny(shared_dir: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A float64 GPT-2 folder of the TINY shape and its arrays (model names)."""
    params = gpt2_arrays(**TINY)
    folder = shared_dir / "tiny"
    write_folder(folder, hf_file_arrays(params, TINY["S"], TINY["L"], np.float64), hf_config_dict(**TINY))
    return folder, params


def as_global(name: str, array: np.ndarray, p: ms.Parameter) -> np.ndarray:
    """A file array in the parameter's global view (the fused QKV (h, 3h) as (h, 3, h))."""
    return array.reshape(p.global_shape)


def tokens(V: int, shape: tuple[int, int] = (2, 11), seed: int = 1) -> np.ndarray:
    ids = np.random.default_rng(seed).integers(0, V, size=shape)
    ids[0, :2] = (0, V - 1)  # the first and the last real vocabulary rows
    return ids.astype(np.int64)


def assert_same_error_everywhere(exc_info: pytest.ExceptionInfo, *fragments: str) -> None:
    text = str(exc_info.value)
    for fragment in fragments:
        assert fragment in text, (fragment, text)
    seen = COMM.allgather((type(exc_info.value).__name__, text))
    assert all(s == seen[0] for s in seen), seen


# ----------------------------------------------------------------------------------- loading


@pytest.mark.mpi
def test_slabs_equal_file_arrays(tiny: tuple[Path, dict]) -> None:
    """Gathered slabs == the file's arrays; the local QKV slab == Q, K and V columns of the
    rank's heads, taken here from the dense weight; padded vocabulary rows are zero."""
    folder, params = tiny
    h, H = TINY["h"], TINY["H"]
    for grid in grids():
        model = ms.GPT.from_pretrained(folder, grid, dtype="float64")
        named = dict(model.named_parameters())
        assert set(named) == set(params)
        for name, p in named.items():
            full = gather_slab(p, grid.tp_comm)
            assert np.array_equal(full, as_global(name, params[name], p)), name
        hl = h // grid.tp
        heads = np.concatenate([i * h + grid.tp_rank * hl + np.arange(hl) for i in range(3)])  # [Q_r|K_r|V_r]
        assert H % grid.tp == 0
        for i in range(TINY["L"]):
            attn = model.h[i].attn.c_attn
            assert np.array_equal(attn.weight.data, params[f"h.{i}.attn.c_attn.weight"][:, heads])
            assert np.array_equal(attn.bias.data, params[f"h.{i}.attn.c_attn.bias"][heads])
        wte = model.wte.weight
        lo, n = wte.start, wte.shape[0]
        real = max(0, min(lo + n, TINY["V"]) - lo)
        assert np.array_equal(wte.data[:real], params["wte.weight"][lo:lo + real])
        assert not wte.data[real:].any()


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_logits_match_dense_reference(tiny: tuple[Path, dict], dtype: str) -> None:
    folder, params = tiny
    idx = tokens(TINY["V"])
    ref = dense.logits(params, idx, TINY["L"], TINY["H"])
    tol = 1e-12 if dtype == "float64" else 2e-5
    for grid in grids():
        model = ms.GPT.from_pretrained(folder, grid, dtype=dtype)
        assert model.config == ms.GPTConfig(
            vocab_size=67, block_size=16, n_layer=2, n_head=12, n_embd=36, dropout=0.0, layer_norm_eps=1e-5,
        )
        out = ms.to_numpy(model(idx).data)
        assert out.shape == (2, 11, TINY["V"]) and out.dtype == np.dtype(dtype)
        assert max_rel(out, ref) < tol, (grid.tp, max_rel(out, ref))


@pytest.mark.mpi
def test_gpt2_vocabulary_50257(shared_dir: Path) -> None:
    """The real GPT-2 vocabulary with a tiny hidden size: padded to 50258/50259/50260 at
    tp = 2/3/4; logits (B, T, 50257) equal the dense reference; export unpads."""
    shape = {"V": 50257, "S": 8, "L": 1, "H": 12, "h": 24}
    params = gpt2_arrays(**shape, seed=3)
    f32 = {k: v.astype(np.float32) for k, v in params.items()}
    folder = shared_dir / "gpt2-vocab"
    write_folder(folder, hf_file_arrays(f32, shape["S"], shape["L"], np.float32), hf_config_dict(**shape))
    idx = tokens(shape["V"], (2, 8))
    ref = dense.logits({k: v.astype(np.float64) for k, v in f32.items()}, idx, shape["L"], shape["H"])
    for grid in grids():
        model = ms.GPT.from_pretrained(folder, grid)
        assert model.wte.padded_vocab == -(-50257 // grid.tp) * grid.tp
        out = ms.to_numpy(model(idx).data)
        assert out.shape == (2, 8, 50257)
        assert max_rel(out, ref) < 2e-5, (grid.tp, max_rel(out, ref))
        out_dir = shared_dir / f"gpt2-vocab-out-{grid.tp}"
        model.save_pretrained(out_dir)
        if COMM.rank == 0:
            back = load_file(str(out_dir / "model.safetensors"))
            assert back["transformer.wte.weight"].shape == (50257, 24)
            assert all(np.array_equal(back["transformer." + k], v) for k, v in f32.items())
            cfg = json.loads((out_dir / "config.json").read_text())
            assert cfg["vocab_size"] == 50257 and cfg["eos_token_id"] == cfg["bos_token_id"] == 50256
        COMM.Barrier()


@pytest.mark.mpi
def test_bfloat16_and_float16_files_widen_exactly(shared_dir: Path) -> None:
    """float16 and bfloat16 files load as the exactly widened float32 values."""
    params = gpt2_arrays(**TINY)
    f32 = {k: v.astype(np.float32) for k, v in params.items()}
    # bfloat16 = the upper 16 bits of a float32: truncating gives bf16-representable floats.
    bf_vals = {k: (v.view(np.uint32) & 0xFFFF0000).view(np.float32) for k, v in f32.items()}
    folder = shared_dir / "bf16"
    if COMM.rank == 0:
        folder.mkdir()
        header, blobs, pos = {"__metadata__": {"format": "pt"}}, [], 0
        for k, v in bf_vals.items():
            raw = (v.view(np.uint32) >> 16).astype("<u2").tobytes()
            header["transformer." + k] = {
                "dtype": "BF16", "shape": list(v.shape), "data_offsets": [pos, pos + len(raw)],
            }
            blobs.append(raw)
            pos += len(raw)
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))
        (folder / "config.json").write_text(json.dumps(hf_config_dict(**TINY)))
    f16_folder = shared_dir / "f16"
    f16 = {k: v.astype(np.float16) for k, v in params.items()}
    write_folder(f16_folder, hf_file_arrays(f16, TINY["S"], TINY["L"], np.float16), hf_config_dict(**TINY))
    assert hf_gpt2.weights_dtype(folder) == np.float32 and hf_gpt2.weights_dtype(f16_folder) == np.float32
    for grid in grids():
        for path, expect in ((folder, bf_vals), (f16_folder, f16)):
            model = ms.GPT.from_pretrained(path, grid)
            for name, p in model.named_parameters():
                want = as_global(name, expect[name].astype(np.float32), p)
                assert np.array_equal(gather_slab(p, grid.tp_comm), want), (path.name, name)


@pytest.mark.mpi
def test_unprefixed_names_and_sharded_index(tiny: tuple[Path, dict], shared_dir: Path) -> None:
    """Keys without "transformer.", spread over two files named by model.safetensors.index.json."""
    _, params = tiny
    folder = shared_dir / "sharded"
    if COMM.rank == 0:
        folder.mkdir()
        names = sorted(params)
        parts = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        for fname, keys in parts.items():
            save_file({k: params[k] for k in keys}, str(folder / fname), metadata={"format": "pt"})
        weight_map = {k: f for f, keys in parts.items() for k in keys}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        (folder / "config.json").write_text(json.dumps(hf_config_dict(**TINY)))
    COMM.Barrier()
    for grid in grids():
        model = ms.GPT.from_pretrained(folder, grid, dtype="float64")
        for name, p in model.named_parameters():
            assert np.array_equal(gather_slab(p, grid.tp_comm), as_global(name, params[name], p)), name


# ------------------------------------------------------------------------------------ saving


def assert_file_equals(folder: Path, params: dict[str, np.ndarray], dtype: np.dtype) -> None:
    """model.safetensors holds exactly the prefixed params, bit for bit, in `dtype`."""
    back = load_file(str(folder / "model.safetensors"))
    assert set(back) == {"transformer." + k for k in params}  # no lm_head, no buffers
    for k, v in params.items():
        got = back["transformer." + k]
        assert got.dtype == dtype and got.shape == v.shape, k
        assert got.tobytes() == v.astype(dtype).tobytes(), k
    with safe_open(str(folder / "model.safetensors"), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_save_pretrained_bitwise(shared_dir: Path, dtype: type) -> None:
    params = {k: v.astype(dtype) for k, v in gpt2_arrays(**TINY, seed=5).items()}
    src = shared_dir / "src"
    write_folder(src, hf_file_arrays(params, TINY["S"], TINY["L"], dtype), hf_config_dict(**TINY))
    for grid in grids():
        model = ms.GPT.from_pretrained(src, grid, dtype=dtype)
        out = shared_dir / f"out-tp{grid.tp}"
        if COMM.rank == 0:
            out.mkdir()
            (out / "tokenizer.json").write_text("{}")  # files beside the weights are kept
        COMM.Barrier()
        model.save_pretrained(out)
        model.save_pretrained(out)  # overwriting works
        if COMM.rank == 0:
            assert_file_equals(out, params, np.dtype(dtype))
            assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json"]
            cfg = json.loads((out / "config.json").read_text())
            assert cfg["architectures"] == ["GPT2LMHeadModel"] and cfg["model_type"] == "gpt2"
            assert cfg["activation_function"] == "gelu_new" and cfg["n_inner"] is None
            assert (cfg["vocab_size"], cfg["n_positions"], cfg["n_embd"], cfg["n_layer"], cfg["n_head"]) == (
                67, 16, 36, 2, 12,
            )
            assert cfg["torch_dtype"] == np.dtype(dtype).name and "eos_token_id" not in cfg
            assert hf_gpt2.read_config(out) == model.config
        COMM.Barrier()


@pytest.mark.mpi
def test_save_in_one_row_blocks(tiny: tuple[Path, dict], shared_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Column-split weights gathered one row at a time, and the QKV bias (3 runs) gathered
    too instead of written in place: the same bytes."""
    src, params = tiny
    monkeypatch.setattr(hf_gpt2, "_GATHER_BLOCK_BYTES", 1)
    monkeypatch.setattr(hf_gpt2, "_MAX_RUNS", 1)
    for grid in grids():
        out = shared_dir / f"rows-{grid.tp}"
        ms.GPT.from_pretrained(src, grid, dtype="float64").save_pretrained(out)
        if COMM.rank == 0:
            assert_file_equals(out, params, np.dtype(np.float64))
        COMM.Barrier()


@pytest.mark.mpi
def test_cross_tp_round_trip(tiny: tuple[Path, dict], shared_dir: Path) -> None:
    """Save at every TP degree a, load at every degree b (and at tp=1 on COMM_SELF): bitwise."""
    src, params = tiny
    saved = []
    for grid in grids():
        out = shared_dir / f"rt-{grid.tp}"
        ms.GPT.from_pretrained(src, grid, dtype="float64").save_pretrained(out)
        saved.append(out)
    if COMM.rank == 0:
        with ms.ProcessGrid(tp=1, comm=MPI.COMM_SELF) as alone:
            for out in saved:
                model = ms.GPT.from_pretrained(out, alone, dtype="float64")
                for name, p in model.named_parameters():
                    assert p.data.tobytes() == params[name].tobytes(), (out.name, name)
    COMM.Barrier()
    for out in saved:
        for grid in grids():
            model = ms.GPT.from_pretrained(out, grid, dtype="float64")
            for name, p in model.named_parameters():
                assert np.array_equal(gather_slab(p, grid.tp_comm), as_global(name, params[name], p))


@pytest.mark.mpi
def test_save_into_a_file_path_fails_everywhere(tiny: tuple[Path, dict], shared_dir: Path) -> None:
    src, _ = tiny
    blocker = shared_dir / "not-a-folder"
    if COMM.rank == 0:
        blocker.write_text("x")
    COMM.Barrier()
    with ms.ProcessGrid(tp=COMM.size) as grid:
        model = ms.GPT.from_pretrained(src, grid)
        with pytest.raises(OSError) as info:
            model.save_pretrained(blocker)
        assert_same_error_everywhere(info, "rank 0")
    assert sorted(os.listdir(shared_dir)) == ["not-a-folder", "tiny"]


# ------------------------------------------------------------------------------------ errors


def _mutate(folder: Path, *, drop: str | None = None, replace: dict | None = None, config: dict | None = None) -> None:
    """Rewrite the folder's files on rank 0 (tensor dropped/replaced, config keys changed)."""
    if COMM.rank == 0:
        arrays = load_file(str(folder / "model.safetensors"))
        if drop:
            del arrays[drop]
        arrays.update(replace or {})
        save_file(arrays, str(folder / "model.safetensors"))
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(config or {})
        (folder / "config.json").write_text(json.dumps(cfg))
    COMM.Barrier()


def _untied_head(params: dict) -> dict:
    head = params["wte.weight"].copy()
    head[-1, 0] += 1.0  # the last vocabulary row: held by the last TP rank only
    return {"lm_head.weight": head}


ERROR_CASES = {
    "missing tensor": ({"drop": "transformer.h.1.mlp.c_fc.bias"}, ValueError, ["'transformer.h.1.mlp.c_fc.bias'"]),
    "wrong shape": (
        {"replace": {"transformer.h.0.attn.c_attn.weight": np.zeros((36, 105))}},
        ValueError, ["(36, 105)", "(36, 108)", "transformer.h.0.attn.c_attn.weight"],
    ),
    "untied head": (None, ValueError, ["untied"]),
    "head shape": ({"replace": {"lm_head.weight": np.zeros((68, 36))}}, ValueError, ["(68, 36)", "untied"]),
    "extra layer": ({"replace": {"transformer.h.2.ln_1.weight": np.ones(36)}}, ValueError, ["h.2.ln_1.weight"]),
    "integer tensor": ({"replace": {"transformer.ln_f.bias": np.zeros(36, np.int64)}}, ValueError, ["I64"]),
    "not gpt2": ({"config": {"model_type": "llama"}}, ValueError, ["'llama'", "GPT-2"]),
    "activation": ({"config": {"activation_function": "relu"}}, ValueError, ["'relu'"]),
    "n_inner": ({"config": {"n_inner": 100}}, ValueError, ["n_inner 100"]),
    "heads": ({"config": {"n_head": 7}}, ValueError, ["n_embd=36", "n_head=7"]),
}


@pytest.mark.mpi
@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_folders_raise_on_every_rank(tiny: tuple[Path, dict], case: str) -> None:
    folder, params = tiny
    change, exc_type, fragments = ERROR_CASES[case]
    _mutate(folder, **(change if change is not None else {"replace": _untied_head(params)}))
    with ms.ProcessGrid(tp=COMM.size) as grid:
        with pytest.raises(exc_type) as info:
            ms.GPT.from_pretrained(folder, grid)
        assert_same_error_everywhere(info, *fragments)


@pytest.mark.mpi
def test_missing_files_raise_on_every_rank(tiny: tuple[Path, dict], shared_dir: Path) -> None:
    folder, _ = tiny
    with ms.ProcessGrid(tp=COMM.size) as grid:
        with pytest.raises(FileNotFoundError) as info:
            ms.GPT.from_pretrained(shared_dir / "absent", grid)
        assert_same_error_everywhere(info, "does not exist")
        if COMM.rank == 0:
            (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
        COMM.Barrier()
        with pytest.raises(FileNotFoundError) as info:
            ms.GPT.from_pretrained(folder, grid)
        assert_same_error_everywhere(info, "pytorch_model.bin", "safetensors")
        if COMM.rank == 0:
            (folder / "pytorch_model.bin").unlink()
            (folder / "config.json").unlink()
        COMM.Barrier()
        with pytest.raises(FileNotFoundError) as info:
            ms.GPT.from_pretrained(folder, grid)
        assert_same_error_everywhere(info, "config.json is missing")


# ----------------------------------------------------------------------------------- the CLI


def _cli(n: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [mpiexec_path(), "-n", str(n), sys.executable, "-m", "mpisplit.convert", *args],
        capture_output=True, text=True, timeout=120, check=False,
        env={**clean_mpi_env(), "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.timeout(400)
def test_convert_cli_both_ways(tmp_path: Path) -> None:
    """--from-hf at 2 ranks (tp 2), --to-hf at 3 ranks (tp 3): the exported file equals the
    source bit for bit; errors are one line on stderr, exit status 2."""
    params = gpt2_arrays(**TINY, seed=7)
    src = tmp_path / "src"
    src.mkdir()
    save_file(hf_file_arrays(params, TINY["S"], TINY["L"], np.float64), str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(hf_config_dict(**TINY)))

    done = _cli(2, "--from-hf", str(src), str(tmp_path / "ckpt"), "--step", "7")
    assert done.returncode == 0, done.stderr
    assert "tp=2" in done.stdout and "step-00000007" in done.stdout
    reader = CheckpointReader(tmp_path / "ckpt" / "step-00000007")
    assert reader.tp == 2 and reader.step == 7
    assert ms.GPTConfig(**reader.meta["config"]) == hf_gpt2.read_config(src)
    qkv = reader.read("model/h.1.attn.c_attn.weight")  # the shard view (h, 3, h)
    assert np.array_equal(qkv, params["h.1.attn.c_attn.weight"].reshape(36, 3, 36))
    reader.close()

    done = _cli(3, "--to-hf", str(tmp_path / "ckpt"), str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert "tp=3" in done.stdout
    assert_file_equals(tmp_path / "out", params, np.dtype(np.float64))

    done = _cli(2, "--from-hf", str(tmp_path / "absent"), str(tmp_path / "x"))
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and "does not exist" in done.stderr and "Traceback" not in done.stderr
    helped = subprocess.run(
        [sys.executable, "-m", "mpisplit.convert", "--help"], capture_output=True, text=True, timeout=60,
        check=False, env=clean_mpi_env(),
    )
    assert helped.returncode == 0 and "--from-hf HF_FOLDER OUT_ROOT" in helped.stdout


# -------------------------------------------------------------------- transformers, if present


def test_logits_match_transformers(tmp_path: Path) -> None:
    """Saved folder -> transformers' GPT2LMHeadModel: the same logits (skipped without torch)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    params = gpt2_arrays(**TINY, seed=11)
    src = tmp_path / "src"
    src.mkdir()
    save_file(hf_file_arrays(params, TINY["S"], TINY["L"], np.float64), str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(hf_config_dict(**TINY)))
    with ms.ProcessGrid(tp=1, comm=MPI.COMM_SELF) as grid:
        model = ms.GPT.from_pretrained(src, grid, dtype="float64")
        model.save_pretrained(tmp_path / "out")
        idx = tokens(TINY["V"])
        ours = ms.to_numpy(model(idx).data)
    ref = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out", torch_dtype=torch.float64).eval()
    with torch.no_grad():
        theirs = ref(torch.from_numpy(idx)).logits.numpy()
    assert max_rel(ours, theirs) < 1e-12
    assert max_rel(ours, dense.logits(params, idx, TINY["L"], TINY["H"])) < 1e-12

    # And the other way: a folder transformers itself wrote loads here with the same logits.
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=67, n_positions=16, n_embd=36, n_layer=2, n_head=12, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    theirs_model = transformers.GPT2LMHeadModel(config).to(torch.float64).eval()
    theirs_model.save_pretrained(tmp_path / "theirs")
    with torch.no_grad():
        theirs = theirs_model(torch.from_numpy(idx)).logits.numpy()
    with ms.ProcessGrid(tp=1, comm=MPI.COMM_SELF) as grid:
        ours = ms.to_numpy(ms.GPT.from_pretrained(tmp_path / "theirs", grid, dtype="float64")(idx).data)
    assert max_rel(ours, theirs) < 1e-12


@pytest.mark.parametrize("damage", ["truncated", "offsets past the end"])
def test_broken_weights_file_is_a_clear_error(tmp_path: Path, damage: str) -> None:
    """A model.safetensors cut in half, or whose header says the last tensor runs past the
    file's end: ValueError naming the file (never a crash or garbage weights)."""
    if MPI.COMM_WORLD.Get_size() > 1:
        pytest.skip("one process writes and reads its own folder")
    grid = ms.ProcessGrid(tp=1, comm=MPI.COMM_SELF)
    cfg = ms.GPTConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=8)
    ms.GPT(cfg, grid, dtype="float32", seed=0).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    raw = weights.read_bytes()
    if damage == "truncated":
        weights.write_bytes(raw[: len(raw) // 2])
    else:
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8: 8 + n])
        last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
        header[last]["data_offsets"][1] += 4096
        text = json.dumps(header).encode()
        weights.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    with pytest.raises(ValueError, match=r"model\.safetensors.*(incomplete|not fully covered|invalid|cannot read)"):
        ms.GPT.from_pretrained(tmp_path, grid)
    grid.free()
