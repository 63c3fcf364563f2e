"""Distributed COLA with real processes on CPU (gloo, 2 ranks, tiny models).

One process launch (each imports torch and cola anew), shared by every test here: ``torchrun`` of 2 ranks
running the training loop of tests/dist_train_script.py (lock-step, 2 ranks vs 1 rank, resume on 1 rank),
then, in the same two processes (:func:`more_work`), the lock-step of loss-driven knots, drift repair and
uneven shards, FSDP2 (``fully_shard``) on a tiny Llama with replicated and with sharded LoRA factors, the
shard-local merge on raw DTensors, and a Conv1D (GPT-2) weight folded into its FSDP shards.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import cola
import cola.distributed as cd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import dist_train_script as script  # noqa: E402
from helpers import conv1d_and_linear  # noqa: E402

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")
WORLD = 2


# ============================================================================ process helpers

def _init_group(rank: int, world: int, store: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=90))


def _max_rank_diff(tensors) -> float:
    """max |t_r - t_0| over ranks r of every tensor (all ranks call it)."""
    flat = torch.cat([t.detach().reshape(-1).double().cpu() for t in tensors])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return max(float((g - gathered[0]).abs().max()) for g in gathered)


def _all(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _max_state_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ============================================================================ torchrun: the training loop

@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> tuple[Path, Path]:
    """The module's one launch: ``torchrun`` of dist_train_script.py (its folder, first), then
    :func:`more_work` in the same processes (its folder, second)."""
    out, more = tmp_path_factory.mktemp("torchrun"), tmp_path_factory.mktemp("more")
    env = dict(os.environ, OMP_NUM_THREADS="1", COLA_DISABLE_PLUGIN_AUTOLOAD="1", COLA_DIST_BACKEND="gloo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           str(HERE / "dist_train_script.py"), str(out), "6", str(more)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    print(f"\n[dist] torchrun launch (training loop, lock-step, FSDP, Conv1D): {time.perf_counter() - t0:.1f} s")
    return out, more


@pytest.fixture(scope="module")
def torchrun_result(launched):
    out = launched[0]
    result = torch.load(out / "result.pt", weights_only=False)
    result["out"] = out
    return result


@pytest.fixture(scope="module")
def one_rank_reference():
    model, chain = script.make_chain(script.config())
    losses = script.train(model, chain, range(chain.config.total_steps))
    return {"losses": losses, "state": script.lora_state(chain), "knots": [r.step for r in chain.history]}


def test_torchrun_loop_keeps_ranks_identical_and_only_rank0_writes(torchrun_result):
    r = torchrun_result
    assert r["world_size"] == 2 and r["launcher"] == "torchrun"
    assert r["knots"] == [3, 6, 9] and r["ranks"] == [2, 2, 2]          # the rank schedule acted
    assert r["differing"] == []                                           # bit-identical on both ranks
    assert sorted(p.name for p in r["out"].iterdir()) == ["checkpoint.pt", "result.pt"]


def test_two_ranks_of_batch_b_match_one_rank_of_batch_2b(torchrun_result, one_rank_reference):
    ref = one_rank_reference
    assert ref["knots"] == torchrun_result["knots"]
    loss_diff = max(abs(a - b) for a, b in zip(ref["losses"], torchrun_result["losses"]))
    weight_diff = _max_state_diff(ref["state"], torchrun_result["state"])
    print(f"\n2 ranks x 4 vs 1 rank x 8: max |loss diff| {loss_diff:.2e}, max |weight diff| {weight_diff:.2e}")
    assert loss_diff < 1e-4 and weight_diff < 1e-4


def test_checkpoint_of_two_ranks_resumes_on_one_rank(torchrun_result, one_rank_reference):
    """Saved by rank 0 at step 6, exactly at a knot, with 2 ranks; continued here with 1."""
    model, chain = script.make_chain(script.config())
    chain.load_state_dict(cola.load_checkpoint(torchrun_result["out"] / "checkpoint.pt"))
    assert chain.step_count == 6 and chain.link == 2
    losses = script.train(model, chain, range(6, chain.config.total_steps))
    assert [r.step for r in chain.history] == [3, 6, 9]
    state = script.lora_state(chain)
    assert max(abs(a - b) for a, b in zip(losses, torchrun_result["losses"][6:])) < 1e-4
    assert _max_state_diff(state, torchrun_result["state"]) < 1e-4
    assert _max_state_diff(state, one_rank_reference["state"]) < 1e-4


# ============================================================================ more work: lock-step details

def _lockstep_worker(rank, world, store, out):
    _init_group(rank, world, store)
    res = {}
    # a loss-driven merge policy, an SVD re-init folded into the weights, a truncating merge rule
    cfg = script.config(merge_policy="plateau", merge_policy_options={"patience": 2, "smoothing": 0.0},
                        reinit="pissa", reinit_options={}, merge_rule="svd-truncate", merge_rule_options={"rank": 2},
                        rank_schedule="constant", rank_schedule_options={}, optimizer_policy="keep",
                        lr_policy="rewarm", lr_policy_options={"steps": 2}, total_steps=14)
    model, chain = script.make_chain(cfg)
    cd.attach(chain, on_mismatch="raise")
    script.train(model, chain, range(cfg.total_steps))
    res["plateau_knots"] = _all([r.step for r in chain.history])
    res["plateau_diff"] = _max_rank_diff(script.lora_state(chain).values())

    # the RAC / step-down / prune chain, with an uneven global batch (7 = 4 + 3)
    model, chain = script.make_chain(script.config())
    cd.attach(chain)
    res["uneven_losses"] = script.train(model, chain, range(chain.config.total_steps), batch_size=7)
    res["uneven_state"] = script.lora_state(chain)
    res["uneven_diff"] = _max_rank_diff(res["uneven_state"].values())

    # a drift (rank 1 only) is found and repaired by broadcast from rank 0, or refused
    layer = chain.layers["fc1"]
    if rank == 1:
        with torch.no_grad():
            layer.lora_A.add_(1e-3)
            layer.base.weight.add_(1e-6)
    res["found"] = cd.check(chain, on_mismatch="repair")
    res["after_repair"] = cd.verify_in_sync(chain)
    res["repaired_diff"] = _max_rank_diff(script.lora_state(chain).values())
    if rank == 1:
        with torch.no_grad():
            layer.lora_B.add_(1e-3)
    try:
        cd.check(chain, on_mismatch="raise")
        res["raised"] = None
    except cola.ColaError as err:
        res["raised"] = str(err)
    # different starting models are refused on every rank
    torch.manual_seed(rank)
    other = script.MLP(script.D_IN, 16, script.D_OUT)
    cola.inject_lora(other, ["fc1", "fc2"], rank=4, alpha=8)
    other_chain = cola.Chain(other, lambda p: torch.optim.SGD(p, lr=0.1), script.config())
    try:
        cd.attach(other_chain)
        res["start_refused"] = None
    except cola.ColaError as err:
        res["start_refused"] = str(err)

    # full fine-tuning through plain DDP
    torch.manual_seed(0)
    full = script.MLP(script.D_IN, 16, script.D_OUT)
    wrapped = cd.ddp(full)
    opt = torch.optim.SGD(full.parameters(), lr=0.1)
    for step in range(3):
        x, y = script.global_batch(step)
        mine = cd.shard(list(range(len(x))))
        ((wrapped(x[mine]) - y[mine]) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    res["ddp_type"] = type(wrapped).__name__
    res["ddp_diff"] = _max_rank_diff(full.parameters())
    # ... or through sync_gradients in small buckets (no wrapper: the model keeps its attributes)
    torch.manual_seed(0)
    full2 = script.MLP(script.D_IN, 16, script.D_OUT)
    opt = torch.optim.SGD(full2.parameters(), lr=0.1)
    for step in range(3):
        x, y = script.global_batch(step)
        mine = cd.shard(list(range(len(x))))
        ((full2(x[mine]) - y[mine]) ** 2).mean().backward()
        cd.sync_gradients(full2, bucket_mb=300 * 4 / 2 ** 20)   # ~300 floats per bucket: several buckets
        opt.step()
        opt.zero_grad()
    res["bucketed_vs_ddp"] = max(float((a - b).abs().max()) for a, b in zip(full.parameters(), full2.parameters()))
    if rank == 0:
        torch.save(res, Path(out) / "lockstep.pt")
    cd.shutdown()


def more_work(rank: int, world: int, out: str) -> None:
    """The lock-step checks, FSDP, then Conv1D under FSDP, in the torchrun launch's processes after its training
    loop (tests/dist_train_script.py): three process groups one after the other, each on its own store."""
    store = str(Path(out) / "store")
    _lockstep_worker(rank, world, store + "-lockstep", out)
    _fsdp_worker(rank, world, store + "-fsdp", out)
    _fsdp_conv1d_worker(rank, world, store + "-conv1d", out)


@pytest.fixture(scope="module")
def spawned(launched) -> Path:
    """The folder of :func:`more_work`'s results (``lockstep.pt``, ``fsdp.pt``, ``fsdp_chain.pt``,
    ``fsdp_conv1d.pt``)."""
    return launched[1]


@pytest.fixture(scope="module")
def lockstep(spawned):
    return torch.load(spawned / "lockstep.pt", weights_only=False)


def test_loss_driven_knots_are_tied_in_lock_step(lockstep):
    knots = lockstep["plateau_knots"]
    assert knots[0] == knots[1] and len(knots[0]) >= 1, knots
    assert lockstep["plateau_diff"] == 0.0


def test_uneven_shards_are_weighted_like_one_rank(lockstep):
    assert lockstep["uneven_diff"] == 0.0
    model, chain = script.make_chain(script.config())
    losses = script.train(model, chain, range(chain.config.total_steps), batch_size=7)
    assert max(abs(a - b) for a, b in zip(losses, lockstep["uneven_losses"])) < 1e-4
    assert _max_state_diff(script.lora_state(chain), lockstep["uneven_state"]) < 1e-4


def test_drift_is_repaired_or_refused(lockstep):
    assert lockstep["found"] == ["fc1.base.weight", "fc1.lora_A"]
    assert lockstep["after_repair"] == [] and lockstep["repaired_diff"] == 0.0
    assert "ranks diverged" in lockstep["raised"] and "fc1.lora_B" in lockstep["raised"]
    assert "ranks start from different models" in lockstep["start_refused"]


def test_full_finetuning_uses_plain_ddp(lockstep):
    assert lockstep["ddp_type"] == "DistributedDataParallel" and lockstep["ddp_diff"] == 0.0
    assert lockstep["bucketed_vs_ddp"] < 1e-6


# ============================================================================ more work: FSDP2

def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    cola.inject_lora(model, ["q_proj", "v_proj"], rank=4, alpha=8)
    return model


def _tokens(step: int, size: int = 4, length: int = 8) -> torch.Tensor:
    return torch.randint(0, 61, (size, length), generator=torch.Generator().manual_seed(500 + step))


PROBE = _tokens(-1, size=3)


def _train_llama(model, chain, steps) -> list[float]:
    losses = []
    for step in steps:
        ids = _tokens(step)
        mine = cd.shard(list(range(len(ids))))
        loss = model(input_ids=ids[mine], labels=ids[mine]).loss * cd.loss_scale(len(mine), len(ids))
        loss.backward()
        cd.sync_gradients(chain)
        losses.append(cd.average(loss))
        chain.step(losses[-1])
        chain.zero_grad()
    return losses


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    was = model.training
    model.eval()
    out = model(input_ids=PROBE).logits.float().clone()
    model.train(was)
    return out


def _fsdp_config(**kw) -> cola.ChainConfig:
    settings = dict(total_steps=6, merge_policy="knots", knots=[3], rank_schedule="list",
                    rank_schedule_options={"ranks": [4, 2]}, reinit="pissa", seed=1)
    settings.update(kw)
    return cola.ChainConfig(**settings)


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-2)


class _Probe:
    """Outputs of the model just before and just after each knot (a forward inside the hooks,
    which leaves FSDP's root unsharded: the merge must still write into the shards)."""

    def __init__(self, model):
        self.model, self.jumps = model, []

    @cola.hookimpl
    def cola_before_merge(self, chain, link, step):
        self.before = _logits(self.model)

    @cola.hookimpl
    def cola_after_merge(self, chain, report):
        self.jumps.append(float((_logits(self.model) - self.before).abs().max()))


def _fsdp_worker(rank, world, store, out):
    _init_group(rank, world, store)
    from torch.distributed.tensor import DTensor

    res = {}
    pm = cola.PluginManager()
    # ---- replicated LoRA factors, sharded base model; a rank change and a PiSSA re-init at the knot
    model = cd.fsdp(_tiny_llama())
    res["weight_type"] = type(model.model.layers[0].self_attn.q_proj.base.weight).__name__
    res["lora_type"] = type(model.model.layers[0].self_attn.q_proj.lora_A).__name__
    chain = cola.Chain(model, _adamw, _fsdp_config(), plugin_manager=pm)
    cd.attach(chain, on_mismatch="raise")
    probe = _Probe(model)
    pm.register(probe, "probe")
    res["losses"] = _train_llama(model, chain, range(6))
    pm.unregister("probe")
    res["jumps"], res["knots"] = probe.jumps, [r.step for r in chain.history]
    res["ranks_after"] = sorted({layer.rank for layer in chain.layers.values()})
    res["logits"] = _logits(model)
    res["logits_rank_diff"] = _max_rank_diff([res["logits"]])
    state = chain.state_dict()                               # gathered: a collective on every rank
    cd.save_on_main(Path(out) / "fsdp_chain.pt", state)
    # the gathered state loads onto a freshly sharded model too
    model2 = cd.fsdp(_tiny_llama())
    chain2 = cola.Chain(model2, _adamw, _fsdp_config(), plugin_manager=pm)
    chain2.load_state_dict(state)
    res["reload_diff"] = float((_logits(model2) - res["logits"]).abs().max())

    # ---- a knot right after an eval forward that left the blocks unsharded (reshard_after_forward=False):
    # the chain reshards first, so the merge lands in the shards, not in a transient full copy
    model5 = cd.fsdp(_tiny_llama(), reshard_after_forward=False)
    chain5 = cola.Chain(model5, _adamw, _fsdp_config(reinit="lora"), plugin_manager=pm)
    _train_llama(model5, chain5, range(2))
    before = _logits(model5)                                  # leaves every block unsharded
    chain5.tie_knot()
    cd.reshard(model5)
    res["unsharded_knot_jump"] = float((_logits(model5) - before).abs().max())

    # ---- LoRA factors sharded by FSDP too (constant rank)
    model3 = cd.fsdp(_tiny_llama(), shard_lora=True)
    q = model3.model.layers[0].self_attn.q_proj
    res["sharded_lora_type"] = type(q.lora_A).__name__
    cfg3 = _fsdp_config(total_steps=4, knots=[2], rank_schedule="constant", rank_schedule_options={},
                        reinit="lora")
    chain3 = cola.Chain(model3, _adamw, cfg3, plugin_manager=pm)
    probe3 = _Probe(model3)
    pm.register(probe3, "probe3")
    res["sharded_losses"] = _train_llama(model3, chain3, range(3))
    pm.unregister("probe3")
    res["sharded_jumps"], res["sharded_knots"] = probe3.jumps, [r.step for r in chain3.history]
    try:
        q.set_factors_(torch.zeros(2, q.in_features), torch.zeros(q.out_features, 2))
        res["rank_change"] = None
    except cola.ConfigError as err:
        res["rank_change"] = str(err)
    state3 = chain3.state_dict()                             # factors and Adam moments gathered
    res["state3_plain"] = all(not isinstance(v, DTensor) for v in state3["optimizer"]["state"][0].values())
    model4 = cd.fsdp(_tiny_llama(), shard_lora=True)
    chain4 = cola.Chain(model4, _adamw, cfg3, plugin_manager=pm)
    chain4.load_state_dict(state3)
    res["sharded_resume"] = (_train_llama(model3, chain3, range(3, 4)), _train_llama(model4, chain4, range(3, 4)))

    # ---- the shard-local merge on raw DTensors: uneven row shards, column shards, bf16 compensation
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    merges = {}
    for dtype, placement in ((torch.float32, Shard(0)), (torch.float32, Shard(1)), (torch.bfloat16, Shard(0))):
        torch.manual_seed(1)
        plain = cola.LoRALinear(nn.Linear(5, 7, dtype=dtype), rank=2, alpha=4)
        sharded = copy.deepcopy(plain)
        sharded.base.weight = nn.Parameter(distribute_tensor(sharded.base.weight.detach(), mesh, [placement]),
                                           requires_grad=False)
        g = torch.Generator().manual_seed(2)
        for _ in range(4):
            B, A = torch.randn(7, 2, generator=g), torch.randn(2, 5, generator=g)
            plain.fold_(B, A, 0.37)
            sharded.fold_(B, A, 0.37)
        merges[f"{dtype}-{placement}"] = (
            float((sharded.base.weight.full_tensor().float() - plain.base.weight.float()).abs().max()),
            float((sharded.exact_weight() - plain.exact_weight()).abs().max()),
            tuple(sharded.base.weight.to_local().shape))
    res["dtensor_merges"] = _all(merges)
    if rank == 0:
        torch.save(res, Path(out) / "fsdp.pt")
    cd.shutdown()


@pytest.fixture(scope="module")
def fsdp_run(spawned):
    res = torch.load(spawned / "fsdp.pt", weights_only=False)
    res["out"] = spawned
    return res


def test_fsdp_shards_the_base_and_keeps_lora_replicated(fsdp_run):
    assert fsdp_run["weight_type"] == "DTensor" and fsdp_run["lora_type"] == "Parameter"
    assert fsdp_run["sharded_lora_type"] == "DTensor"


def test_fsdp_knot_keeps_outputs_and_changes_rank(fsdp_run):
    assert fsdp_run["knots"] == [3] and fsdp_run["ranks_after"] == [2]
    assert len(fsdp_run["jumps"]) == 1 and fsdp_run["jumps"][0] < 1e-5, fsdp_run["jumps"]
    assert fsdp_run["logits_rank_diff"] == 0.0
    assert fsdp_run["unsharded_knot_jump"] < 1e-5


def test_fsdp_matches_unsharded_training_and_its_state_loads_anywhere(fsdp_run):
    pm = cola.PluginManager()
    model = _tiny_llama()
    chain = cola.Chain(model, _adamw, _fsdp_config(), plugin_manager=pm)
    losses = _train_llama(model, chain, range(6))
    assert max(abs(a - b) for a, b in zip(losses, fsdp_run["losses"])) < 1e-4
    assert float((_logits(model) - fsdp_run["logits"]).abs().max()) < 1e-4
    # the gathered FSDP state, on one unsharded rank, and on two sharded ones
    fresh = _tiny_llama()
    chain1 = cola.Chain(fresh, _adamw, _fsdp_config(), plugin_manager=pm)
    chain1.load_state_dict(cola.load_checkpoint(fsdp_run["out"] / "fsdp_chain.pt"))
    assert float((_logits(fresh) - fsdp_run["logits"]).abs().max()) < 1e-5
    assert fsdp_run["reload_diff"] < 1e-5


def test_fsdp_sharded_lora_factors(fsdp_run):
    assert fsdp_run["sharded_knots"] == [2]
    assert fsdp_run["sharded_jumps"][0] < 1e-5
    assert "cannot change the rank of a LoRA factor that FSDP shards" in fsdp_run["rank_change"]
    assert fsdp_run["state3_plain"]
    a, b = fsdp_run["sharded_resume"]
    assert abs(a[0] - b[0]) < 1e-6


def test_shard_local_merge_on_dtensors(fsdp_run):
    per_rank = fsdp_run["dtensor_merges"]
    for key in per_rank[0]:
        shapes = [r[key][2] for r in per_rank]
        for rank_result in per_rank:
            weight_diff, exact_diff, _ = rank_result[key]
            tol = 1e-2 if "bfloat16" in key else 1e-6      # bf16: one rounding of the stored weight
            assert weight_diff <= tol and exact_diff < 1e-5, (key, rank_result[key])
        assert shapes in ([(4, 5), (3, 5)], [(7, 3), (7, 2)]), (key, shapes)


# ============================================================================ no processes

def test_single_process_helpers_are_no_ops(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    env = cd.init()
    assert env == cd.DistEnv() and not env.launched and not cd.is_distributed()
    assert cd.rank() == 0 and cd.world_size() == 1 and cd.is_main_process()
    model, chain = script.make_chain(script.config())
    x, y = script.global_batch(0)
    ((model(x) - y) ** 2).mean().backward()
    grads = [p.grad.clone() for p in chain.params if p.grad is not None]
    cd.sync_gradients(chain)
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, [p for p in chain.params if p.grad is not None]))
    assert cd.average(torch.tensor(2.5)) == 2.5 and cd.verify_in_sync(chain) == []
    cd.attach(chain)
    assert cd.fsdp(model) is model and cd.ddp(model) is model


def test_environment_detection(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert cd.detect() == cd.DistEnv(3, 4, 1, 2, "accelerate")
    assert not cd.is_main_process() and cd.world_size() == 4
    with pytest.raises(cola.ColaError, match="call cola.distributed.init"):
        cd.sync_gradients([])
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(cola.ConfigError, match="RANK=4"):
        cd.detect()
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")        # accelerate launch --cpu runs CPU ranks with mpirun
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    assert cd.detect() == cd.DistEnv(1, 2, 1, 2, "accelerate")


def test_shards_cover_the_global_batch_and_scaled_losses_average_to_its_mean():
    items = list(range(11))
    values = torch.rand(11, dtype=torch.float64)
    for world in (1, 2, 3, 4, 16):
        parts = [cd.shard(items, r, world) for r in range(world)]
        assert sum(parts, []) == items
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        scaled = [cd.loss_scale(len(p), len(items), world) * float(values[p].mean()) for p in parts if p]
        assert sum(scaled) / world == pytest.approx(float(values.mean()))
    assert cd.loss_scale(4, 8, 2) == 1.0 and cd.loss_scale(3, 7, 2) == pytest.approx(6 / 7)


def _fsdp_conv1d_worker(rank, world, store, out):
    """Under FSDP2 (2 gloo ranks): shard-local folds into a Conv1D weight, and a GPT-2 chain (PiSSA at its knot)
    sharded vs not; rank 0 saves the differences."""
    import transformers
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    _init_group(rank, world, store)
    res = {}
    mesh = init_device_mesh("cpu", (world,))
    for dtype, placement in ((torch.float32, Shard(0)), (torch.float32, Shard(1)), (torch.bfloat16, Shard(0))):
        conv, _ = conv1d_and_linear(5, 7, dtype, seed=1)
        plain = cola.LoRALinear(conv, rank=2, alpha=4)
        sharded = copy.deepcopy(plain)
        sharded.base.weight = nn.Parameter(distribute_tensor(sharded.base.weight.detach(), mesh, [placement]),
                                           requires_grad=False)
        g = torch.Generator().manual_seed(2)
        for _ in range(4):
            B, A = torch.randn(7, 2, generator=g), torch.randn(2, 5, generator=g)
            plain.fold_(B, A, 0.37)
            sharded.fold_(B, A, 0.37)
        res[f"{dtype}-{placement}"] = (
            float((sharded.base.weight.full_tensor().float() - plain.base.weight.float()).abs().max()),
            float((sharded.exact_weight() - plain.exact_weight()).abs().max()),
            tuple(sharded.base.weight.to_local().shape))

    def gpt2():
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=1,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))

    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(3))
    logits = {}
    for shard in (True, False):
        model = gpt2()
        cola.inject_lora(model, ["c_attn", "c_fc"], rank=2, alpha=4)
        if shard:
            model = cd.fsdp(model)
            res["weight_type"] = type(model.transformer.h[0].attn.c_attn.base.weight).__name__
        chain = cola.Chain(model, lambda p: torch.optim.AdamW(p, lr=1e-2),
                           cola.ChainConfig(total_steps=4, merge_policy="knots", knots=[2], reinit="pissa", seed=1))
        for _ in range(4):
            model(input_ids=ids, labels=ids).loss.backward()
            chain.step()
            chain.zero_grad()
        res["knots"] = [r.step for r in chain.history]
        with torch.no_grad():
            logits[shard] = model(input_ids=ids).logits
    with torch.no_grad():
        res["trained"] = float((logits[False] - gpt2()(input_ids=ids).logits).abs().max())
    res["sharded_vs_plain"] = float((logits[True] - logits[False]).abs().max())
    if rank == 0:
        torch.save(res, f"{out}/fsdp_conv1d.pt")
    dist.destroy_process_group()


def test_conv1d_under_fsdp_folds_into_its_shards(spawned):
    """FSDP shards a Conv1D weight (in x out) by rows of *its* layout: folds, the compensation, PiSSA's gather
    (:func:`_fsdp_conv1d_worker`)."""
    res = torch.load(spawned / "fsdp_conv1d.pt", weights_only=False)
    assert res["weight_type"] == "DTensor" and res["knots"] == [2]
    for key, local_shape in (("torch.float32-S(0)", (3, 7)), ("torch.float32-S(1)", (5, 4)),
                             ("torch.bfloat16-S(0)", (3, 7))):
        assert res[key] == (0.0, 0.0, local_shape), (key, res[key])
    assert res["trained"] > 1e-2 and res["sharded_vs_plain"] < 1e-5, res
