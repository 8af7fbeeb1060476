"""The benchmarks' raw NumPy GPT step is right, PyTorch agrees with it, and the scripts run.

References: the same raw step at tp=1 on one process on the concatenated batch of all
replicas (float64, gathered slabs), central finite differences (float64), the PyTorch model
(float32, same weights). Run at 1, 2, 3 and 4 ranks:
  mpiexec -n 2 python -m pytest --with-mpi -q tests/test_bench_smoke.py
The script smoke runs launch their own mpiexec and run only in a single-rank pytest.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tp_params, world
from mpi4py import MPI

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import common, raw_gpt

TINY = common.TINY  # n_head 12, n_embd 48: divisible by tp = 1, 2, 3, 4; vocab 61 is padded


def _world_batch(dp: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    pairs = [raw_gpt.make_batch(TINY, seed=d) for d in range(dp)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def test_train_flops_formula() -> None:
    s = common.ModelShape("x", vocab_size=10, block_size=4, n_layer=2, n_head=2, n_embd=8,
                          batch=3, seq=4)
    N = 12
    per_layer = 2 * N * 8 * 24 + 2 * 2 * 3 * 16 * 8 + 2 * N * 64 + 2 * N * 8 * 32 * 2
    assert common.train_flops(s) == 3 * (2 * per_layer + 2 * N * 8 * 10)
    assert common.train_flops(s, tokens_batch=6) == 2 * common.train_flops(s)


def test_shard_unshard_roundtrip() -> None:
    full = raw_gpt.init_full_params(TINY, seed=3)
    for tp in (1, 2, 3, 4):
        for name, gshape, kind, _ in raw_gpt.param_specs(TINY):
            slabs = [raw_gpt.shard(full[name], kind, TINY, tp, r) for r in range(tp)]
            np.testing.assert_array_equal(raw_gpt.unshard(slabs, kind, TINY), full[name])
    # rank r's qkv slab holds heads [r H/t, (r+1) H/t) of each of Q, K, V
    h, hs = TINY.n_embd, TINY.head_size
    w = raw_gpt.shard(full["h0.attn_w"], "qkv", TINY, 4, 1)
    np.testing.assert_array_equal(w[:, :h // 4], full["h0.attn_w"][:, h // 4: h // 2])
    np.testing.assert_array_equal(w[:, h // 4: h // 2],
                                  full["h0.attn_w"][:, h + 3 * hs: h + 6 * hs])


def test_raw_gradients_match_finite_differences() -> None:
    model = raw_gpt.RawGPT(TINY, MPI.COMM_SELF, tp=1, dtype=np.float64)
    idx, tgt = raw_gpt.make_batch(TINY, seed=0)
    tgt[0, 2] = raw_gpt.IGNORE_INDEX  # an ignored position must not count
    loss = model.loss_and_grads(idx, tgt)
    assert 3.5 < loss < 4.5  # about log(61) = 4.11 at init
    grads = {k: v.copy() for k, v in model.g.items()}
    rng = np.random.default_rng(0)
    checked = 0
    for name, param in model.p.items():
        for _ in range(2):
            i = tuple(int(rng.integers(0, n)) for n in param.shape)
            if name == "wte":  # a row that is looked up, so both paths of the tied weight count
                i = (int(idx[1, 3]), i[1])
            old, eps = param[i], 1e-5
            param[i] = old + eps
            lp = model.forward_loss(idx, tgt)
            param[i] = old - eps
            lm = model.forward_loss(idx, tgt)
            param[i] = old
            fd = (lp - lm) / (2 * eps)
            assert abs(fd - grads[name][i]) <= 1e-8 + 1e-5 * abs(fd), (name, i, fd,
                                                                      grads[name][i])
            checked += 1
    assert checked == 2 * len(model.p)
    model.free()


@pytest.mark.mpi
@pytest.mark.timeout(120)
@pytest.mark.parametrize("tp", tp_params(1, 2, 3, 4))
def test_raw_parallel_step_matches_single_process(tp: int) -> None:
    """dp x tp raw step == tp=1 step on the concatenated batch: loss, every gradient (after
    the DP average), every parameter after one AdamW step; float64."""
    comm = MPI.COMM_WORLD
    dp = comm.size // tp
    model = raw_gpt.RawGPT(TINY, comm, tp=tp, dtype=np.float64, seed=5)
    idxs, tgts = _world_batch(dp)
    loss = model.loss_and_grads(idxs[model.dp_rank], tgts[model.dp_rank])
    model.allreduce_grads_dp()
    grads = model.gather_full("grad")
    model.adamw_step()
    params = model.gather_full("param")
    losses = comm.allgather(loss)

    ref = raw_gpt.RawGPT(TINY, MPI.COMM_SELF, tp=1, dtype=np.float64, seed=5)
    ref_loss = ref.loss_and_grads(np.concatenate(idxs), np.concatenate(tgts))
    ref_grads = {k: raw_gpt.unshard([v], kind, TINY)
                 for (k, v), (_, _, kind, _) in zip(ref.g.items(), raw_gpt.param_specs(TINY))}
    ref.adamw_step()
    ref_params = {k: raw_gpt.unshard([v], kind, TINY)
                  for (k, v), (_, _, kind, _) in zip(ref.p.items(), raw_gpt.param_specs(TINY))}

    assert abs(np.mean(losses) - ref_loss) < 1e-12
    assert set(grads) == set(ref_grads)
    for name, ref_grad in ref_grads.items():
        scale = max(1e-3, float(np.abs(ref_grad).max()))
        np.testing.assert_allclose(grads[name], ref_grad, rtol=0, atol=1e-11 * scale,
                                   err_msg=name)
        np.testing.assert_allclose(params[name], ref_params[name], rtol=0, atol=1e-12,
                                   err_msg=name)
    # the gradient is not trivially zero anywhere that matters
    assert float(np.abs(ref_grads["h1.attn_w"]).max()) > 1e-4
    model.free()
    ref.free()


@pytest.mark.mpi
@pytest.mark.timeout(60)
def test_raw_rejects_bad_arguments() -> None:
    comm = MPI.COMM_WORLD
    with pytest.raises(ValueError, match="world size"):
        raw_gpt.RawGPT(TINY, comm, tp=comm.size + 1)
    if comm.size > 1:
        one_head = common.ModelShape("one_head", vocab_size=11, block_size=4, n_layer=1,
                                     n_head=1, n_embd=10, batch=1, seq=4)
        with pytest.raises(ValueError, match="n_head=1"):
            raw_gpt.RawGPT(one_head, comm, tp=comm.size)
    with pytest.raises(TypeError, match="dtype"):
        raw_gpt.RawGPT(TINY, MPI.COMM_SELF, tp=1, dtype=np.int32)
    model = raw_gpt.RawGPT(TINY, MPI.COMM_SELF, tp=1)
    idx, tgt = raw_gpt.make_batch(TINY, seed=0)
    idx[0, 0] = TINY.vocab_size
    with pytest.raises(ValueError, match="token ids"):
        model.train_step(idx, tgt)
    model.free()


@pytest.mark.mpi
@pytest.mark.timeout(120)
@world(sizes=(1, 2))
@pytest.mark.parametrize("tp", tp_params(1, 2))
def test_torch_first_losses_match_raw(tp: int) -> None:
    """The PyTorch benchmark model gives the raw floor's float32 losses (same weights)."""
    pytest.importorskip("torch")
    comm = MPI.COMM_WORLD
    from benchmarks import torch_gpt

    t_losses, r_losses = torch_gpt.compare_with_raw(comm, tp, steps=2)
    np.testing.assert_allclose(t_losses, r_losses, rtol=1e-5)
    assert abs(r_losses[0] - np.log(TINY.vocab_size)) < 0.3


# ---- the scripts run end to end (each launches its own mpiexec) ---------------------------------


def _single_rank_with_mpiexec() -> None:
    if MPI.COMM_WORLD.size > 1:
        pytest.skip("script smoke runs launch mpiexec themselves: single-rank pytest only")
    try:
        common.mpiexec_path()
    except FileNotFoundError:
        pytest.skip("no mpiexec")


def _run_script(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "PMIX_", "HYDRA_", "HYDI_", "OMPI_"))}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.mark.timeout(300)
def test_floors_smoke(tmp_path: Path) -> None:
    _single_rank_with_mpiexec()
    r = _run_script(["benchmarks/floors.py", "--smoke", "--np", "2", "--out", str(tmp_path)])
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((tmp_path / "floors.json").read_text())
    assert res["matmul"] and all(row["gflops"] > 0 for row in res["matmul"])
    kinds = {row["op"] for row in res["collectives"]}
    assert kinds == {"allreduce", "allgather", "reduce_scatter"}
    for row in res["collectives"]:
        factor = 2 * (2 - 1) / 2 if row["op"] == "allreduce" else (2 - 1) / 2
        assert row["busbw_GBps"] == pytest.approx(row["algbw_GBps"] * factor)
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "floors.png").stat().st_size > 1000


@pytest.mark.timeout(400)
def test_bench_gpt_smoke(tmp_path: Path) -> None:
    _single_rank_with_mpiexec()
    r = _run_script(["benchmarks/bench_gpt.py", "--smoke", "--out", str(tmp_path)], timeout=360)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((tmp_path / "bench_gpt.json").read_text())
    layouts = {(row["ranks"], row["dp"], row["tp"]) for row in res["rows"]}
    assert layouts == {(1, 1, 1), (2, 2, 1), (2, 1, 2)}
    for row in res["rows"]:
        assert row["raw_s"] > 0 and row["flops"] > 0
        assert (row["torch_s"] is not None) == bool(importlib.util.find_spec("torch"))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("amp", [False, True])
def test_bench_shard_optimizer_smoke(tmp_path: Path, amp: bool) -> None:
    _single_rank_with_mpiexec()
    r = _run_script(["benchmarks/bench_shard_optimizer.py", "--smoke", "--dps", "1", "2", "--out", str(tmp_path),
                     *(["--amp"] if amp else [])], timeout=280)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((tmp_path / ("bench_shard_optimizer_amp.json" if amp else "bench_shard_optimizer.json")).read_text())
    assert [row["dp"] for row in res["memory"]] == [1, 2]
    for row in res["memory"]:  # the sharded state is 1/dp of the whole (to the padding)
        assert row["state_bytes"] * row["dp"] >= row["unsharded_state_bytes"]
        assert row["of_one_dp_th"] <= 1.05 and row["loss_rel_diff"] < 1e-5
    assert res["time_dp2"]["ratio"] > 0


@pytest.mark.timeout(300)
def test_bench_lora_smoke(tmp_path: Path) -> None:
    _single_rank_with_mpiexec()
    pytest.importorskip("peft")
    r = _run_script(["benchmarks/bench_lora.py", "--smoke", "--steps", "2", "--out", str(tmp_path)], timeout=280)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((tmp_path / "bench_lora.json").read_text())
    rows = {row["case"]: row for row in res["rows"]}
    assert set(rows) == {"ours-lora", "ours-full", "torch-lora", "torch-full"}
    assert rows["ours-lora"]["trained"] == rows["torch-lora"]["trained"] < rows["ours-full"]["trained"]
    assert rows["ours-full"]["trained"] == rows["torch-full"]["trained"]
    assert all(row["step_s"] > 0 for row in rows.values())


@pytest.mark.timeout(300)
def test_bench_packing_smoke(tmp_path: Path) -> None:
    _single_rank_with_mpiexec()
    r = _run_script(["benchmarks/bench_packing.py", "--smoke", "--reps", "1", "--out", str(tmp_path)], timeout=280)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((tmp_path / "bench_packing.json").read_text())
    assert res["rows"]["packed"] < res["rows"]["padded"] and res["fill"]["packed"] > res["fill"]["padded"]
    assert all(t["median_s"] > 0 for t in res["times"].values())


@pytest.mark.timeout(300)
def test_bench_hosts_smoke(tmp_path: Path) -> None:
    _single_rank_with_mpiexec()
    sys.path.insert(0, str(Path(REPO) / "tests"))
    from _hosts import missing

    if missing():
        pytest.skip(missing())
    r = _run_script(["benchmarks/bench_hosts.py", "--smoke", "--out", str(tmp_path)], timeout=280)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((tmp_path / "bench_hosts.json").read_text())["results"]["none"]
    assert res["p2"]["alpha"] > 0 and res["p2"]["beta"] > 0 and res["p4"]["ranks"] == 4
    assert all(row["mpi_s"] > 0 and row["ring_s"] > 0 for row in res["p2"]["allreduce"])
    assert res["step"]["dp_allreduce_s"] > 0 and len(res["model"]) == 12


@pytest.mark.timeout(300)
def test_blas_threads_smoke(tmp_path: Path) -> None:
    _single_rank_with_mpiexec()
    r = _run_script(["benchmarks/blas_threads.py", "--smoke", "--out", str(tmp_path)])
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((tmp_path / "blas_threads_smoke.json").read_text())
    limited = next(c for c in res["configs"] if c["ranks"] == 2 and c["limit"] != "none")
    # with ranks sharing the cores, the limit gives each rank its share of them
    assert all(t == [max(1, res["usable_cores"] // 2)] for t in limited["blas_threads_per_rank"])
    assert res["ratio_limited"] > 0


@pytest.mark.timeout(300)
def test_scaling_smoke(tmp_path: Path) -> None:
    _single_rank_with_mpiexec()
    r = _run_script(["benchmarks/scaling.py", "--smoke", "--out", str(tmp_path)])
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((tmp_path / "scaling.json").read_text())
    assert [(row["question"], row["ranks"]) for row in res["rows"]] == [
        ("strong", 1), ("strong", 2), ("weak", 1), ("weak", 2), ("dp", 1), ("dp", 2)]
    weak = [row for row in res["rows"] if row["question"] == "weak"]
    assert weak[1]["shape"]["n_embd"] == 2 * weak[0]["shape"]["n_embd"]
    # the reported figures follow from the measured times
    by = {(row["question"], row["ranks"]): row for row in res["rows"]}
    assert res["summary"]["strong_speedup"] == pytest.approx(
        by["strong", 1]["median_s"] / by["strong", 2]["median_s"])
    assert res["summary"]["dp_throughput_ratio"] == pytest.approx(
        by["dp", 2]["tokens_per_s"] / by["dp", 1]["tokens_per_s"])


@pytest.mark.timeout(300)
def test_bench_gpt_comm_counts_match_spec(tmp_path: Path) -> None:
    """One mpisplit step at dp2 x tp1 and dp1 x tp2 moves exactly the spec's collectives."""
    _single_rank_with_mpiexec()
    from benchmarks import bench_gpt

    if bench_gpt.load_mpisplit()[0] is None:
        pytest.skip("mpisplit GPT not importable")
    r = _run_script(["benchmarks/bench_gpt.py", "--comm", "--smoke", "--np", "2",
                     "--out", str(tmp_path)])
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((tmp_path / "bench_gpt_comm.json").read_text())
    assert res["ok"] and len(res["checks"]) == 8
    tp_calls = [c for c in res["checks"]
                if c["tp"] == 2 and c["comm"] == "tp" and c["what"] == "calls"]
    assert tp_calls[0]["analytic"] == 4 * TINY.n_layer + 5


@pytest.mark.timeout(300)
def test_bench_gpt_memory_smoke(tmp_path: Path) -> None:
    _single_rank_with_mpiexec()
    r = _run_script(["benchmarks/bench_gpt.py", "--memory", "--smoke", "--impls", "raw",
                     "--ranks", "2", "--out", str(tmp_path)])
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((tmp_path / "bench_gpt_memory.json").read_text())
    assert [(x["dp"], x["tp"]) for x in res["results"]] == [(2, 1), (1, 2)]
    for x in res["results"]:
        assert len(x["per_rank"]) == 2 and all(p["peak"] > 0 for p in x["per_rank"])
        a = x["analytic"]
        assert a["total"] == a["params"] + a["grads"] + a["adamw"] + a["activations"]


def test_analytic_counts() -> None:
    from benchmarks import bench_gpt

    # tp=2 halves every split parameter and pads the vocabulary 61 -> 62 rows
    assert bench_gpt.local_param_count(TINY, 1) == TINY.n_params()
    h, L = TINY.n_embd, TINY.n_layer
    replicated = TINY.block_size * h + L * (6 * h) + 2 * h  # wpe, LN x2, 2 biases, ln_f
    split = TINY.n_params() - replicated - TINY.vocab_size * h
    assert bench_gpt.local_param_count(TINY, 2) == replicated + split // 2 + 31 * h
    c = bench_gpt.analytic_comm(TINY, dp=1, tp=2, itemsize=4)
    N = TINY.batch * TINY.seq
    assert c["tp"]["allreduce"] == {"calls": 4 * L + 5,
                                    "bytes": (4 * L + 2) * N * h * 4 + 3 * N * 4}
    assert c["dp"]["allreduce"]["calls"] == 0


@pytest.mark.timeout(200)
def test_scripts_help() -> None:
    for script in ("floors.py", "bench_gpt.py", "raw_gpt.py"):
        r = _run_script([f"benchmarks/{script}", "--help"], timeout=60)
        assert r.returncode == 0 and "--smoke" in r.stdout, script


@pytest.mark.timeout(300)
def test_bench_llama_smoke(tmp_path: Path) -> None:
    """bench_llama.py on a tiny random Llama folder: decode at tp 1 and 2, a training step, both
    frameworks, the same first loss."""
    _single_rank_with_mpiexec()
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    out = tmp_path / "llama.json"
    r = _run_script(["benchmarks/bench_llama.py", "--hf", str(tmp_path / "hf"), "--prompt-ids", "[5, 9, 2, 40]",
                     "--tp", "2", "--new-tokens", "3", "--batch", "1", "--seq", "8", "--rounds", "1",
                     "--steps", "1", "--out", str(out)], timeout=280)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(row["task"], row["framework"]) for row in rows] == [
        ("decode", "torch"), ("decode", "mpisplit"), ("decode", "mpisplit-tp2"), ("train", "torch"), ("train", "mpisplit")]
    for row in rows:
        assert row["median s"] > 0 and row["peak RSS MB"] > 0
    assert all(row["decode tok/s"] > 0 and row["floor tok/s"] for row in rows[1:3])
    assert float(rows[4]["check"].split()[-1]) < 1e-5  # first-loss difference, float32
    assert "CPU: " in r.stdout


@pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="launches its own server")
def test_bench_serve_smoke() -> None:
    """bench_serve.py --smoke: a real server, concurrency 1 and 4, every row complete."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "HYDRA_", "HYDI_", "PMIX_", "OMPI_"))}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_serve.py"), "--smoke", "--no-peer"],
                         capture_output=True, text=True, timeout=240, env=env, check=False)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["concurrency"] for r in rows] == [1, 4]
    for r in rows:
        assert r["tokens"] == 24 and r["tokens_per_s"] > 0 and r["ttft_ms_p50"] > 0
    assert "CPU: " in out.stdout


@pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="launches its own server")
def test_bench_burst_smoke(tmp_path: Path) -> None:
    """bench_burst.py --smoke: a real server with a token budget, quiet and burst rows."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "HYDRA_", "HYDI_", "PMIX_", "OMPI_"))}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_burst.py"), "--smoke", "--settings",
                          "32:48", "--out", str(tmp_path / "b.json")],
                         capture_output=True, text=True, timeout=240, env=env, check=False)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = json.loads((tmp_path / "b.json").read_text())
    assert [(r["budget"], r["burst"]) for r in rows] == [(48, 0), (48, 8)]
    assert all(r["gaps"] > 0 and r["itl_ms_p99"] >= r["itl_ms_p50"] > 0 for r in rows)
    assert "CPU: " in out.stdout


@pytest.mark.timeout(300)
def test_pipeline_bench_smoke(tmp_path: Path) -> None:
    """benchmarks/pipeline.py at 2 ranks: the bubble rows carry the formula, the memory rows
    shrink from no parallelism to full recomputation, which keeps exactly each block's input."""
    _single_rank_with_mpiexec()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "HYDRA_", "HYDI_", "OMPI_"))}
    cmd = [common.mpiexec_path(), "-n", "2", sys.executable, "benchmarks/pipeline.py", "--smoke", "--out", str(tmp_path)]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((tmp_path / "pipeline.json").read_text())
    assert [(row["m"], row["formula_bubble"]) for row in res["bubble"]] == [(1, 1 / 2), (4, 1 / 5), (8, 1 / 9)]
    assert all(0.0 <= row["measured_bubble"] < 1.0 for row in res["bubble"])
    kept = {row["layout"]: row["bytes_per_layer"] for row in res["memory"]}
    assert kept["none"] > kept["tp2"] > kept["tp2+sp"] > kept["tp2+sp+selective"] > kept["full"]
    shape = res["shape"]
    assert kept["full"] == shape["seq"] * shape["rows"] * shape["hidden"] * 4  # one float32 (b, s, h) input
    assert [row["layout"] for row in res["steptime"]] == ["pp=2", "tp=2"]
