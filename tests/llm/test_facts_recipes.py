"""The facts recipes: the capacity map and the chain comparison (CPU and GPU scale), checked for what they
promise, and dry-run with the real architectures of OPT-1.3B and Llama-2-7B built on the meta device (their
configs written out here: the hub is not reachable)."""

from __future__ import annotations

import copy

import pytest
import torch

from cola.llm import experiment
from cola.llm.sweep import run_sweep
from cola.llm.sweep.cells import build_cells, effective
from cola.llm.sweep.spec import load_recipe
from cola.llm.sweep.tuning import candidates, tuning_units

MAPS = ["capacity-map-cpu", "capacity-map-opt-1.3b", "capacity-map-llama-2-7b"]
CHAINS = ["facts-chains-cpu", "facts-chains-opt-1.3b", "facts-chains-llama-2-7b"]


def _all(spec):
    cells, extra = build_cells(spec)
    return cells, extra, [effective(c.settings) for c in [*cells, *extra]]


@pytest.mark.parametrize("name", MAPS)
def test_capacity_maps_cover_ranks_r_to_8r_at_equal_steps_each_tuned_r_and_4r_at_every_n(name):
    spec = load_recipe(name)
    cells, extra, runs = _all(spec)
    assert all(s.task == "facts" and s.train_file.startswith("synthetic:") for s in runs)
    assert len({(s.steps, s.batch_size) for s in runs}) == 1                  # equal steps and facts per step
    r = spec.baseline["rank"]
    lora = [s for s in runs if s.method == "lora"]
    assert {s.rank for s in lora} == {r, 2 * r, 4 * r, 8 * r}
    assert all(s.alpha == 2 * s.rank for s in lora)                           # the same scaling at every rank
    sizes = sorted({s.n_train for s in lora})
    covered = {(x.rank, x.n_train) for x in lora}
    assert len(sizes) >= 3 and all((rank, n) in covered for rank in (r, 4 * r) for n in sizes)  # r and 4r: every N
    assert any(s.method == "full" for s in runs)
    assert set(spec.tune) == {"lr", "full_lr"} and not set(spec.tune_seeds) & set(spec.seeds)
    groups = candidates(spec, cells, extra)
    for group in groups.values():                                             # every cell picks among its LRs
        full = group[0].settings.method == "full"
        assert len(group) == len(spec.tune["full_lr" if full else "lr"]) >= 3


@pytest.mark.parametrize("name", CHAINS)
def test_chain_comparisons_have_every_arm_the_issue_names(name):
    spec = load_recipe(name)
    cells, extra, runs = _all(spec)
    r = spec.settings["rank"]
    assert len({(s.steps, s.batch_size, s.train_file) for s in runs}) == 1
    assert {(s.method, s.rank) for s in runs if s.method == "lora"} == {("lora", r), ("lora", 4 * r)}
    assert any(s.method == "full" for s in runs)
    chains = [s for s in runs if s.method == "cola"]
    assert all(s.rank == r for s in chains)
    kinds = {(s.links, s.chain.get("reinit"), s.chain.get("lr_policy", "continue"),
              s.chain.get("optimizer_policy", "reset")) for s in chains}
    for links in (2, 4):
        for reinit in ("lora", "fw"):
            assert (links, reinit, "continue", "reset") in kinds
    assert {(4, reinit, "rewarm", "prune") for reinit in ("lora", "fw")} <= kinds
    relora = [s for s in chains if s.chain.get("optimizer_policy") == "prune"]
    # ReLoRA's 99% pruning; jointly on GPU: pruned each moment by its own mask, it blew up every CPU run
    joint = not name.endswith("-cpu")
    assert all(s.chain["optimizer_policy_options"] == ({"fraction": 0.99, "joint": True} if joint else
                                                       {"fraction": 0.99}) for s in relora)
    assert len(spec.seeds) >= 3 and spec.metric == "recall"
    assert spec.baseline == {"method": "lora", "rank": r, "alpha": 2.0 * r, "chain.reinit": "lora"}
    # one baseline run for every arm, and it is the LoRA r arm itself (no fw-initialised or rescaled copies)
    lora_r = next(c for c in cells if effective(c.settings).method == "lora" and c.settings.rank == r)
    assert {c.baseline_key for c in cells} == {lora_r.key} and not extra
    groups = candidates(spec, cells, extra)
    assert len(tuning_units(spec, groups)) == 3 * len(groups)                 # every arm tuned on 3 values


def test_the_restarts_recipe_pairs_with_the_chain_comparisons_own_lora_runs():
    chains, restarts = load_recipe("facts-chains-cpu"), load_recipe("facts-restarts-cpu")
    assert restarts.settings == chains.settings and restarts.seeds == chains.seeds
    assert restarts.tune_seeds == chains.tune_seeds and restarts.tune["lr"] == chains.tune["lr"]
    baseline = {c.key for c in build_cells(chains)[0]} & {c.key for c in build_cells(restarts)[0]}
    assert len(baseline) == 1                                   # LoRA r=4: the same run keys, so the same runs
    arms = {(s.links, s.chain.get("lr_policy"), s.chain.get("optimizer_policy", "reset"),
             tuple(sorted((s.chain.get("optimizer_policy_options") or {}).items())))
            for s in _all(restarts)[2] if s.method == "cola"}
    assert arms == {(4, "rewarm", "reset", ()), (4, "rewarm", "prune", (("fraction", 0.99), ("joint", True)))}


def test_the_tuned_natural_text_recipe_is_capacity_cpu_with_every_arm_tuned():
    old, new = load_recipe("capacity-cpu"), load_recipe("capacity-tuned-cpu")
    for key in ("model", "task", "train_file", "max_length", "steps", "batch_size", "rank", "alpha", "targets"):
        assert old.settings[key] == new.settings[key]
    assert new.tune == {"lr": [2e-3, 5e-3, 1e-2, 2e-2]} and "lr" not in new.settings.get("chain", {})
    _, _, runs = _all(new)
    assert {(s.method, s.rank, s.chain.get("reinit", "lora")) for s in runs} == {
        ("lora", 2, "lora"), ("cola", 2, "lora"), ("cola", 2, "fw")}


ARCHITECTURES = {
    "facebook/opt-1.3b": ("OPTConfig", "OPTForCausalLM", dict(
        vocab_size=50272, hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32,
        max_position_embeddings=2048, word_embed_proj_dim=2048)),
    "meta-llama/Llama-2-7b-hf": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=4096)),
}


#: the meta-device models of the real architectures, built once for every test of the module
_META_MODELS: dict = {}


@pytest.fixture
def real_architectures(tokenizer, monkeypatch):
    """cola's dry runs on OPT-1.3B and Llama-2-7B built on the meta device from their configs (once per architecture
    for the whole module, as cola's own meta_model does: a plan reads shapes only), with the tiny tokenizer."""
    import transformers

    tok, built = copy.deepcopy(tokenizer), _META_MODELS

    def meta_model(settings):
        if settings.model not in built:
            config_cls, model_cls, config = ARCHITECTURES[settings.model]
            with torch.device("meta"):
                built[settings.model] = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config))
        return built[settings.model], tok

    monkeypatch.setattr(experiment, "meta_model", meta_model)


@pytest.mark.parametrize("name", [n for n in MAPS + CHAINS if not n.endswith("-cpu")])
def test_gpu_recipes_dry_run_on_the_real_architectures(name, real_architectures, tmp_path):
    spec = load_recipe(name)
    plan = run_sweep(spec, tmp_path / "plan", dry_run=True)
    model = next(iter(ARCHITECTURES.values()))[2] if "opt" in name else ARCHITECTURES["meta-llama/Llama-2-7b-hf"][2]
    width, inner = model["hidden_size"], model.get("ffn_dim", model.get("intermediate_size"))
    for row in plan["cells"]:
        if row["method"] == "full":
            continue
        assert row["trainable_params_per_link"][0] == row["ranks"][0] * (width + inner)   # one down-projection
        assert row["steps"] == spec.settings["steps"] and row["tuning_candidates"] == len(spec.tune["lr"])
    assert plan["tuning_runs"] == sum(r["tuning_candidates"] for r in {r["key"]: r for r in plan["cells"]}.values())
    assert not (tmp_path / "plan").exists()


BUDGETS = ["facts-budget-cpu", "facts-budget-opt-1.3b", "facts-budget-llama-2-7b"]


@pytest.mark.parametrize("name", BUDGETS)
def test_budget_verdicts_tune_every_arm_within_0_3_nats_with_kl_replay(name):
    """The chain verdict at a forgetting budget: the arms of the chain comparison, each tuned (LR and step) under
    0.3 nats of forgetting, with the tweets replayed as KL to the start and forgetting measured on another text."""
    spec = load_recipe(name)
    cells, extra, runs = _all(spec)
    assert spec.max_forgetting == 0.3 and spec.tune_step and len(spec.seeds) >= 3
    assert not set(spec.tune_seeds) & set(spec.seeds)
    for s in runs:
        assert (s.replay_file, s.replay_loss, s.reference_file) == ("embedded:tweets", "kl", "embedded:python-docs")
        assert s.eval_every and s.steps % s.eval_every == 0 and s.task == "facts"
    r = spec.baseline["rank"]
    assert len({(s.steps, s.batch_size, s.train_file, s.n_train) for s in runs}) == 1
    assert {s.rank for s in runs if s.method == "lora"} == {r, 4 * r} and any(s.method == "full" for s in runs)
    chains = {(s.links, s.chain.get("reinit"), s.chain.get("optimizer_policy", "reset"),
               (s.chain.get("optimizer_policy_options") or {}).get("fraction"),
               (s.chain.get("optimizer_policy_options") or {}).get("joint")) for s in runs if s.method == "cola"}
    assert chains == {(2, "lora", "reset", None, None), (2, "fw", "reset", None, None),
                      (4, "lora", "reset", None, None), (4, "fw", "reset", None, None),
                      (4, "lora", "prune", 0.99, True), (4, "lora", "prune", 1.0, True)}
    groups = candidates(spec, cells, extra)
    assert len(groups) == 9 and all(len(g) == len(spec.tune["full_lr" if g[0].settings.method == "full" else "lr"])
                                    for g in groups.values())


@pytest.mark.parametrize("name", [n for n in BUDGETS if not n.endswith("-cpu")])
def test_gpu_budget_recipes_dry_run_on_the_real_architectures(name, real_architectures, tmp_path):
    """LoRA on q_proj and v_proj of the top 10 layers of OPT-1.3B / Llama-2-7B: r x (d + d) per matrix, 20 of them."""
    spec = load_recipe(name)
    plan = run_sweep(spec, tmp_path / "plan", dry_run=True)
    width = ARCHITECTURES[spec.settings["model"]][2]["hidden_size"]
    for row in plan["cells"]:
        if row["method"] != "full":
            assert row["trainable_params_per_link"][0] == row["ranks"][0] * 2 * width * 20
        assert row["steps"] == spec.settings["steps"] and row["tuning_candidates"] == 3
    assert plan["tuning_runs"] == 27
