"""Smoke test of the benchmarks: each main function runs with tiny settings and writes its JSON.

No timing is asserted (timings are the benchmarks' output, not a test's); only that each
benchmark runs end to end and reports what it promises.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from benchmarks import common, gpu, knot, layer, memory, speed, task  # noqa: E402

TINY = ["--threads", "1", "--quiet", "--max-contention", "1000"]


def _load(path):
    data = json.loads(path.read_text())
    assert data["environment"]["torch"] == torch.__version__
    return data


def test_speed(tmp_path):
    out = tmp_path / "speed.json"
    speed.main(["--shapes", "tiny-opt", "--batch", "2", "--seq", "16", "--rounds", "2", "--gemm-reps", "1",
                "--output", str(out), *TINY])
    data = _load(out)
    m = data["models"]["tiny-opt"]
    assert set(m["configs"]) == set(speed.CONFIGS)
    for c in m["configs"].values():
        assert c["flops_per_step"] > 0 and len(c["samples"]) == 2
    # full fine-tuning does more matmul work than LoRA; chain and plain LoRA the same (knots aside)
    assert m["configs"]["full"]["flops_per_step"] > m["configs"]["cola-qv"]["flops_per_step"]
    assert m["configs"]["chain-qv"]["flops_per_step"] == pytest.approx(m["configs"]["cola-qv"]["flops_per_step"])
    assert m["configs"]["cola-qv"]["flops_per_step"] == pytest.approx(m["configs"]["peft-qv"]["flops_per_step"])
    assert m["configs"]["chain-qv"]["knot_steps"] == [1, 2]  # 3 links over 3 calls
    assert {"cola/peft qv", "cola/peft all", "chain-qv/cola-qv"} <= set(m["ratios"])


def test_speed_compiled_twins(tmp_path):
    """``--compile``: each config gets a compiled twin (dynamo's "eager" backend here, the plumbing and the compile
    counts: inductor's C++ compile is slow on 2 cores); the chain's knots (one rank) add no compilation."""
    out = tmp_path / "speed.json"
    speed.main(["--shapes", "tiny-llama", "--configs", "cola-qv", "chain-qv", "--compile", "--compile-backend",
                "eager", "--batch", "2", "--seq", "16", "--rounds", "2", "--gemm-reps", "1",
                "--output", str(out), *TINY])
    m = _load(out)["models"]["tiny-llama"]
    assert set(m["configs"]) == {"cola-qv", "cola-qv+compile", "chain-qv", "chain-qv+compile"}
    assert m["configs"]["chain-qv+compile"]["knot_steps"] == [1, 2]
    assert m["configs"]["chain-qv+compile"]["compiles"] == 1 and m["configs"]["cola-qv+compile"]["compiles"] == 1
    assert {"cola-qv+compile/cola-qv", "chain-qv+compile/chain-qv", "chain-qv+compile/cola-qv+compile"} <= set(m["ratios"])


@pytest.mark.parametrize("setup", ["full", "lora"])
def test_flop_formula_matches_torch_flop_counter(setup):
    """Our hook count of the matmuls = torch's FlopCounterMode; for attention we count the
    causal half of what torch counts (when torch counts the CPU attention kernel at all)."""
    from torch.utils.flop_counter import FlopCounterMode
    model = common.build_model("tiny-llama")
    if setup == "full":
        model, opt = common.setup_full(model)
    else:
        model, opt = common.setup_cola_lora(model, ["q_proj", "v_proj", "down_proj"], rank=4)
    batch = common.make_batch(model.config.vocab_size, 2, 16)
    step = common.train_step_fn(model, opt, batch)
    with common.FlopCounter(model) as ours:
        step()
    with FlopCounterMode(display=False) as theirs:
        step()
    counts = {str(k): v for k, v in theirs.get_flop_counts()["Global"].items()}
    matmuls = sum(v for k, v in counts.items() if k in ("aten.mm", "aten.addmm", "aten.bmm", "aten.matmul"))
    attention = sum(v for k, v in counts.items() if "attention" in k)
    assert ours.total - ours.attention == pytest.approx(matmuls, rel=1e-9)
    if attention:
        assert 2 * ours.attention == pytest.approx(attention, rel=1e-9)


def test_knot(tmp_path):
    out = tmp_path / "knot.json"
    knot.main(["--shape", "tiny-opt", "--batch", "2", "--seq", "16", "--rounds", "1", "--in-process",
               "--variants", "reinit=lora", "reinit=pissa", "merge=svd-truncate", "--output", str(out), *TINY])
    data = _load(out)
    assert set(data["time"]) == {"reinit=lora", "reinit=pissa", "merge=svd-truncate"}
    assert all(v["knot"]["median"] > 0 for v in data["time"].values())
    assert set(data["memory"]["variants"]) == set(data["time"])
    assert "one knot <= 1% of a step (q,v)" in data["targets"]


def test_memory_child_process(tmp_path):
    """One method, in a child process (the real measuring path)."""
    out = tmp_path / "memory.json"
    memory.main(["--shape", "tiny-opt", "--batch", "2", "--seq", "16", "--steps", "2", "--links", "2",
                 "--methods", "cola", "--output", str(out), *TINY])
    m = _load(out)["methods"]["cola"]
    assert "error" not in m, m.get("error")
    assert m["knots"] == [1] and m["process_peak"] >= m["peak"] > 0


def test_memory_in_process(tmp_path):
    out = tmp_path / "memory.json"
    memory.main(["--shape", "tiny-llama", "--batch", "2", "--seq", "16", "--steps", "2", "--links", "2",
                 "--methods", "lora", "full", "--in-process", "--output", str(out), *TINY])
    data = _load(out)
    assert set(data["methods"]) == {"lora", "full"}
    assert all("training_peak_delta" in m for m in data["methods"].values())


def test_memory_with_and_without_checkpointing(tmp_path):
    out = tmp_path / "memory.json"
    memory.main(["--shape", "tiny-llama", "--batch", "2", "--seq", "16", "--steps", "2", "--links", "2",
                 "--methods", "lora", "--checkpointing", "both", "--in-process", "--output", str(out), *TINY])
    methods = _load(out)["methods"]
    assert set(methods) == {"lora", "lora+ckpt"}
    assert [m["gradient_checkpointing"] for m in methods.values()] == [False, True]
    assert all(m["step_peak_delta"] >= 0 for m in methods.values())


def test_task(tmp_path):
    out = tmp_path / "task.json"
    task.main(["--shape", "tiny-llama", "--batch", "2", "--seq", "16", "--rounds", "1", "--output", str(out), *TINY])
    data = _load(out)
    paths = data["paths"]
    # the gathered path applies the LM head at one position per example, the other at all of them
    assert paths["gathered"]["flops_per_step"] < paths["full-logits"]["flops_per_step"]
    assert "median_ratio" in data["speedup"]


def test_layer(tmp_path):
    out = tmp_path / "layer.json"
    layer.main(["--fin", "16", "--fout", "24", "--batch", "2", "--seq", "4", "--inner", "1", "--rounds", "1",
                "--output", str(out), *TINY])
    data = _load(out)
    diffs = data["max_abs_diff_vs_cola (output, grads of x, A, B)"]
    assert max(diffs.values()) < 1e-5  # the variants compute the same function and gradients


def test_gpu_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    torch.set_num_threads(1)
    gpu.main(["--smoke", "--shapes", "tiny-llama", "--steps", "1", "--seq", "16"])
    data = _load(tmp_path / "gpu.json")
    assert [(c["shape"], c["method"]) for c in data["configs"]] == [("tiny-llama", m) for m in gpu.METHODS]
    assert all("error" not in c for c in data["configs"]), [c.get("error") for c in data["configs"]]
    assert data["configs"][1]["knots"]  # the COLA config tied its knots inside the run


def test_gpu_time_guard_and_failures_are_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))

    def boom(*a, **k):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(gpu, "run_config", boom)
    gpu.main(["--smoke", "--shapes", "tiny-opt", "--steps", "1", "--seq", "8", "--methods", "lora", "full"])
    data = _load(tmp_path / "gpu.json")
    assert [c["error"] for c in data["configs"]] == ["RuntimeError: simulated failure"] * 2
    gpu.main(["--smoke", "--shapes", "tiny-opt", "--budget-s", "1", "--steps", "1", "--seq", "8"])
    data = _load(tmp_path / "gpu.json")
    assert all("skipped" in c for c in data["configs"])
