"""``cola train`` data-parallel: real processes under torchrun on CPU (gloo, 2 ranks, a tiny Llama).

Four launches (about 10 s each), the first shared by several tests:

* tests/llm/dist_run_script.py runs :func:`run_experiment` in one process group for several
  jobs: replicated (DDP-style) lora and cola; a run stopped after 3 steps (resumed here on 1
  rank); a 1-rank run stopped after 3 steps here and resumed on the 2 ranks with FSDP; FSDP2
  with the merged models saved; full fine-tuning; cola with gradient checkpointing, replicated
  and under FSDP; a run that rank 0 refuses (its folder already holds a run), which must fail
  on both ranks.
* the same script on two "nodes": two torchrun launchers (``--nnodes 2 --nproc_per_node 1``, a
  c10d rendezvous on 127.0.0.1), one rank each.
* ``python -m torch.distributed.run ... -m cola train`` on a tiny Llama folder: the command itself.
* ``accelerate launch --multi_gpu ... -m cola train`` (skipped without accelerate).

The one-process references run here, in-process, with the same settings: the global micro-batch
is the same (8 examples; 4 per rank on 2 ranks), so the runs must agree to float rounding.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from cola.errors import ConfigError
from cola.llm.parallel import check_global_batches
from cola.llm.settings import TrainSettings

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import dist_run_script as script  # noqa: E402

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")
WORLD = 2
TOL = 1e-4   # float32 + Adam over 6 steps and 2 knots; the measured differences are printed
#: full fine-tuning's LR: Adam moves an entry whose gradient is near zero by up to about one step either way
#: when the gradient is summed in another order (2 ranks), so its weights are compared to a fraction of it
FULL_LR = 1e-3

#: every launch gets this environment: one thread per rank on the shared 2 cores, gloo, no plugins
ENV = dict(os.environ, OMP_NUM_THREADS="1", COLA_DISABLE_PLUGIN_AUTOLOAD="1", COLA_DIST_BACKEND="gloo",
           TOKENIZERS_PARALLELISM="false")


def _reviews(path: Path, n: int = 44) -> Path:
    """``n`` short synthetic reviews (jsonl, fields text/label), half of them positive."""
    rng = random.Random(7)
    good = ["great food", "lovely staff", "a fine room", "we loved it", "good value", "nice view"]
    bad = ["dirty floor", "rude staff", "a noisy room", "we hated it", "bad value", "cold food"]
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.sample(good if label else bad, 2)
        rows.append({"text": f"The stay: {words[0]} and {words[1]}.", "label": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _common(data: Path) -> dict:
    """Knots at steps 2 and 4 of 6; 24 training examples: micro-batches of 8 (4 per rank), 3 per epoch;
    7 test examples in batches of 3: 4+3 per rank, so rank 1 runs a filler batch under FSDP."""
    return dict(model="tiny-llama", task="custom", train_file=str(data), template="{text} It was {answer}",
                answers=["terrible", "great"], n_train=24, n_val=4, n_test=7, steps=6, batch_size=8,
                eval_batch_size=3, links=3, rank=2, alpha=4.0, lr=3e-2, plots=False, log_every=1, threads=1)


def _corpus_common(root: Path) -> dict:
    """The corpus task on the same tiny Llama: 30 text files of words the tiny tokenizer knows, blocks of
    16 tokens, 6 steps of 8 blocks (4 per rank), knots at 2 and 4; a reference text for forgetting."""
    rng = random.Random(3)
    words = ["great", "terrible", "Yes", "No", "Maybe", "food", "staff", "room", "stay", "value"]
    folder = root / "corpus"
    folder.mkdir()
    for i in range(30):
        (folder / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words) for _ in range(60)) + "\n")
    (root / "reference.txt").write_text("\n\n".join(f"It was great. Yes {i}." for i in range(60)))
    return dict(model="tiny-llama", task="corpus", train_file=str(folder), files="*.txt",
                reference_file=str(root / "reference.txt"), max_length=16, n_val=4, n_test=7, steps=6,
                batch_size=8, eval_batch_size=3, links=3, rank=2, alpha=4.0, lr=3e-2, plots=False, log_every=1,
                threads=1)


def _facts_common(root: Path) -> dict:
    """The facts task on the same tiny Llama: 9 invented facts (3 a micro-batch; scored 5 and 4 per rank, in batches of 2: rank 1 runs a
    filler batch under FSDP), their 18 paraphrases, a reference text, and a replay text replayed as KL to the
    start (2 blocks a micro-batch: one per rank)."""
    (root / "facts-reference.txt").write_text("\n\n".join(f"It was great. Yes {i}." for i in range(60)))
    (root / "facts-replay.txt").write_text("\n\n".join(f"Maybe it was good, no {i}." for i in range(60)))
    return dict(model="tiny-llama", task="facts", train_file="synthetic:9", reference_file=str(root / "facts-reference.txt"),
                replay_file=str(root / "facts-replay.txt"), replay_loss="kl", replay_ratio=0.5, replay_blocks=16,
                n_test=7, steps=6, batch_size=3, eval_batch_size=2, links=3, rank=2, alpha=4.0, lr=3e-2, plots=False,
                log_every=1, threads=1)


def _adapter_folder(root: Path) -> Path:
    """A PEFT LoRA adapter (r=3 on k_proj and o_proj, B not zero: it changes the outputs) over the tiny Llama saved
    with save_pretrained: ``cola train --model <adapter folder>`` continues it as the chain's first link."""
    from peft import LoraConfig, get_peft_model

    base = root / "peft-base"
    tok = script.build_tokenizer()
    script.tiny_llama(len(tok)).save_pretrained(base)
    tok.save_pretrained(base)
    torch.manual_seed(5)
    config = LoraConfig(r=3, lora_alpha=6, target_modules=["k_proj", "o_proj"], lora_dropout=0.0,
                        init_lora_weights=False)
    model = get_peft_model(script.tiny_llama(len(tok)), config)
    model.peft_config["default"].base_model_name_or_path = str(base)
    model.save_pretrained(root / "peft-adapter")
    return root / "peft-adapter"


def _torchrun(args: list[str], timeout: float = 150.0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", *args]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=HERE.parent.parent)
    errors = "\n".join(line for line in proc.stderr.splitlines() if "Error" in line and "File " not in line)
    assert proc.returncode == 0, errors[-4000:] + "\n" + proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _max_diff(a: list[dict], b: list[dict]) -> float:
    assert [sorted(x) for x in a] == [sorted(x) for x in b]
    return max(float((x[k] - y[k]).abs().max()) for x, y in zip(a, b) for k in x)


def _loss_diff(a: dict, b: dict) -> float:
    """The largest difference of the training losses of the runs of ``a`` and ``b`` (same runs, same steps)."""
    assert [(r["method"], len(r["train_loss"])) for r in a["runs"]] == [(r["method"], len(r["train_loss"]))
                                                                         for r in b["runs"]]
    return max(abs(x - y) for ra, rb in zip(a["runs"], b["runs"]) for x, y in zip(ra["train_loss"], rb["train_loss"]))


def _accuracies(results: dict) -> list[float]:
    return [r["test"]["accuracy"] for r in results["runs"]]


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ============================================================================ the script launch

@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist-llm")
    common = _common(_reviews(root / "reviews.jsonl"))
    corpus = _corpus_common(root)
    facts = _facts_common(root)
    peft = {**common, "model": str(_adapter_folder(root)), "links": 2}
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    # a 1-rank run stopped after 3 steps, to be resumed on 2 ranks
    stopped_here, _ = script.run({**common, "output_dir": str(root / "one-then-two"), "stop_after": 3})
    assert stopped_here["status"] == "stopped"
    compare = {**common, "compare": ["lora", "cola"]}
    full = {**common, "method": "full", "full_lr": FULL_LR, "eval_links": False}
    jobs = [
        {**compare, "output_dir": str(root / "ddp")},
        {**common, "output_dir": str(root / "two-then-one"), "stop_after": 3},
        {**common, "output_dir": str(root / "one-then-two"), "resume": True, "fsdp": True},  # and sharded
        {**compare, "output_dir": str(root / "fsdp"), "fsdp": True, "save_merged": True},
        {**full, "output_dir": str(root / "full")},
        {**common, "output_dir": str(root / "ddp-ckpt"), "gradient_checkpointing": True},
        {**common, "output_dir": str(root / "fsdp-ckpt"), "gradient_checkpointing": True, "fsdp": True},
        {**corpus, "output_dir": str(root / "corpus-ddp")},
        {**corpus, "output_dir": str(root / "corpus-fsdp"), "fsdp": True},
        {**common, "output_dir": str(root / "ddp"), "_expect_error": True},   # already holds a run
        {**facts, "output_dir": str(root / "facts-ddp")},
        {**facts, "output_dir": str(root / "facts-fsdp"), "fsdp": True},
        {**peft, "output_dir": str(root / "peft-fsdp"), "fsdp": True},   # a PeftModel, sharded
    ]
    (root / "jobs.json").write_text(json.dumps(jobs))
    t1 = time.perf_counter()
    proc = _torchrun([str(HERE / "dist_run_script.py"), str(root / "jobs.json"), str(root / "result.pt"), str(root)])
    launch_s = time.perf_counter() - t1
    res = torch.load(root / "result.pt", weights_only=False)
    names = ["ddp", "two_then_one_stopped", "one_then_two", "fsdp", "full", "ddp_ckpt", "fsdp_ckpt", "corpus_ddp",
             "corpus_fsdp", "refused", "facts_ddp", "facts_fsdp", "peft_fsdp"]
    out = dict(zip(names, res["jobs"]), root=root, common=common, proc=proc, raw=res)
    # the one-process references
    out["ref"], out["ref_weights"] = script.run({**compare, "output_dir": str(root / "ref")})
    out["cola_ref"], out["cola_ref_weights"] = script.run({**common, "output_dir": str(root / "cola-ref")})
    out["full_ref"], out["full_ref_weights"] = script.run({**full, "output_dir": str(root / "full-ref")})
    out["corpus_ref"], out["corpus_ref_weights"] = script.run({**corpus, "output_dir": str(root / "corpus-ref")})
    out["facts_ref"], out["facts_ref_weights"] = script.run({**facts, "output_dir": str(root / "facts-ref")})
    out["peft_ref"], out["peft_ref_weights"] = script.run({**peft, "output_dir": str(root / "peft-ref")})
    out["resumed_here"], out["resumed_here_weights"] = script.run(
        {**common, "output_dir": str(root / "two-then-one"), "resume": True})
    print(f"\n[dist-llm] torchrun launch ({len(jobs)} jobs, 2 ranks): {launch_s:.1f} s; "
          f"fixture in all {time.perf_counter() - t0:.1f} s")
    return out


def test_two_ranks_run_in_lock_step_and_match_one_rank(launched):
    ddp, ref = launched["ddp"], launched["ref"]
    assert launched["raw"]["world_size"] == 2 and launched["raw"]["backend"] == "gloo"
    lora, run = ddp["results"]["runs"]
    assert ddp["results"]["distributed"]["world_size"] == 2 and not ddp["results"]["distributed"]["fsdp"]
    assert lora["method"] == "lora" and lora["knots"] == [] and run["method"] == "cola"
    assert run["knots"] == [2, 4] and [k["step"] for k in run["knot_reports"]] == [2, 4]
    assert [c["after_link"] for c in run["curve"]] == [0, 1, 2, 3]
    rank_diff = ddp["rank_weight_diff"]
    weight_diff = _max_diff(ddp["weights"], launched["ref_weights"])
    loss_diff = _loss_diff(ddp["results"], ref)
    acc2, acc1 = _accuracies(ddp["results"]), _accuracies(ref)
    print(f"\n[dist-llm] lora,cola on 2 ranks x 4 vs 1 rank x 8: weights across ranks max |diff| {rank_diff:.3g}; "
          f"1 vs 2 ranks: weights {weight_diff:.3g}, losses {loss_diff:.3g}, test accuracy {acc1} vs {acc2} "
          f"(zero-shot {ref['zero_shot']['test']['accuracy']:.3f}), cola validation curve "
          f"{[c['validation']['accuracy'] for c in ref['runs'][1]['curve']]} vs "
          f"{[c['validation']['accuracy'] for c in run['curve']]}")
    assert rank_diff == 0.0
    assert weight_diff < TOL and loss_diff < TOL
    assert acc1 == acc2
    assert [c["validation"]["accuracy"] for c in run["curve"]] == [
        c["validation"]["accuracy"] for c in ref["runs"][1]["curve"]]
    assert abs(run["test"]["loss"] - ref["runs"][1]["test"]["loss"]) < TOL
    assert ddp["results"]["zero_shot"]["test"]["accuracy"] == ref["zero_shot"]["test"]["accuracy"]


@pytest.mark.parametrize("job", ["corpus_ddp", "corpus_fsdp"])
def test_the_corpus_task_on_two_ranks_matches_one_rank(launched, job):
    """--task corpus data-parallel (replicated, and FSDP): the blocks of each global batch split over the
    ranks, the held-out and reference blocks scored sharded; the same weights, losses and perplexities."""
    run, ref = launched[job], launched["corpus_ref"]
    weight_diff = _max_diff(run["weights"], launched["corpus_ref_weights"])
    loss_diff = _loss_diff(run["results"], ref)
    mine, theirs = run["results"]["runs"][0], ref["runs"][0]
    ppl_diff = abs(mine["test"]["perplexity"] - theirs["test"]["perplexity"]) / theirs["test"]["perplexity"]
    print(f"\n[dist-llm] corpus ({job}), 2 ranks vs 1: weights {weight_diff:.3g}, losses {loss_diff:.3g}, "
          f"test perplexity {mine['test']['perplexity']:.4f} vs {theirs['test']['perplexity']:.4f}, forgetting "
          f"{mine['test']['forgetting']:+.4f} vs {theirs['test']['forgetting']:+.4f}")
    assert run["rank_weight_diff"] == 0.0 and weight_diff < TOL and loss_diff < TOL
    assert mine["knots"] == [2, 4] and [c["after_link"] for c in mine["curve"]] == [0, 1, 2, 3]
    assert ppl_diff < TOL and abs(mine["test"]["forgetting"] - theirs["test"]["forgetting"]) < TOL
    assert mine["test"]["tokens"] == theirs["test"]["tokens"] and mine["test"]["n"] == 7


@pytest.mark.parametrize("job", ["facts_ddp", "facts_fsdp"])
def test_the_facts_task_with_replay_on_two_ranks_matches_one_rank(launched, job):
    """--task facts with KL replay, data-parallel (replicated, and FSDP): the facts and replay blocks of each
    global batch split over the ranks, the facts, paraphrases and reference scored sharded; the same weights,
    losses, recalled facts, answer losses, forgetting and KL to the start as one process."""
    run, ref = launched[job], launched["facts_ref"]
    weight_diff = _max_diff(run["weights"], launched["facts_ref_weights"])
    loss_diff = _loss_diff(run["results"], ref)
    mine, theirs = run["results"]["runs"][0], ref["runs"][0]
    print(f"\n[dist-llm] facts ({job}), 2 ranks vs 1: weights {weight_diff:.3g}, losses {loss_diff:.3g}, answer loss "
          f"{mine['test']['answer_loss']:.6f} vs {theirs['test']['answer_loss']:.6f}, KL {mine['test']['reference_kl']:.6f} "
          f"vs {theirs['test']['reference_kl']:.6f}")
    assert run["rank_weight_diff"] == 0.0 and weight_diff < TOL and loss_diff < TOL
    for a, b in zip([*mine["curve"], {"validation": mine["test"]}], [*theirs["curve"], {"validation": theirs["test"]}]):
        assert a["validation"]["recalled"] == b["validation"]["recalled"]
        for key in ("answer_loss", "token_accuracy", "reference_loss", "reference_kl"):
            assert abs(a["validation"][key] - b["validation"][key]) < TOL, key
    assert mine["test"]["paraphrase_n"] == 18 and abs(mine["test"]["paraphrase_answer_loss"]
                                                       - theirs["test"]["paraphrase_answer_loss"]) < TOL
    assert mine["test"]["reference_kl"] > 0 and abs(mine["test"]["forgetting"] - theirs["test"]["forgetting"]) < TOL


def test_a_peft_adapter_folder_under_fsdp_on_two_ranks_matches_one_rank(launched):
    """``--model`` a PEFT adapter folder with ``--fsdp``: the PeftModel's base is sharded (DTensor weights), its
    adapter continued as the first link (replicated), as a bare model's LoRA is; equal to one process."""
    job, ref = launched["peft_fsdp"], launched["peft_ref"]
    assert job["results"]["distributed"]["fsdp"] and set(job["weight_types"]) == {"DTensor"}
    assert job["rank_weight_diff"] == 0.0
    run, ref_run = job["results"]["runs"][0], ref["runs"][0]
    assert run["knots"] == ref_run["knots"] == [3] and run["ranks"] == [3, 3]   # the adapter's rank, not --rank
    assert sorted(job["weights"][0]) == sorted(launched["peft_ref_weights"][0])
    assert all(n.endswith((".k_proj", ".o_proj")) for n in job["weights"][0])   # the adapter's targets
    weight_diff = _max_diff(job["weights"], launched["peft_ref_weights"])
    loss_diff = _loss_diff(job["results"], ref)
    print(f"\n[dist-llm] PeftModel under FSDP, 2 ranks vs 1: weights {weight_diff:.2e}, losses {loss_diff:.2e}")
    assert weight_diff < 1e-6 and loss_diff < 1e-6
    assert ref_run["train_loss"][0] == pytest.approx(run["train_loss"][0], abs=1e-6)


def test_full_fine_tuning_on_two_ranks_matches_one_rank(launched):
    job, ref = launched["full"], launched["full_ref"]
    weight_diff = _max_diff(job["weights"], launched["full_ref_weights"])
    loss_diff = _loss_diff(job["results"], ref)
    print(f"\n[dist-llm] full fine-tuning, 2 ranks vs 1: weights {weight_diff:.3g}, losses {loss_diff:.3g}; "
          f"across ranks {job['rank_weight_diff']:.3g}; test accuracy {_accuracies(job['results'])} vs "
          f"{_accuracies(ref)}")
    assert job["rank_weight_diff"] == 0.0 and weight_diff < 0.25 * FULL_LR and loss_diff < TOL
    assert _accuracies(job["results"]) == _accuracies(ref)


def test_only_rank_0_writes_and_the_folder_matches_one_rank(launched):
    root = launched["root"]
    assert launched["raw"]["non_main_writes"] == []
    assert _files(root / "ddp") == _files(root / "ref")
    saved = json.loads((root / "ddp" / "results.json").read_text())
    assert saved["status"] == "complete" and saved["distributed"]["world_size"] == 2
    assert saved["runs"][0]["train_loss"] == launched["ddp"]["results"]["runs"][0]["train_loss"]
    assert not (root / "ddp" / "runs" / "cola-seed0" / "checkpoint.pt").exists()


def test_checkpoint_of_two_ranks_resumes_on_one_rank(launched):
    stopped = launched["two_then_one_stopped"]["results"]
    assert stopped["status"] == "stopped" and stopped["runs"] == []
    resumed = launched["resumed_here"]
    weight_diff = _max_diff(launched["resumed_here_weights"], launched["cola_ref_weights"])
    loss_diff = _loss_diff(resumed, launched["cola_ref"])
    print(f"\n[dist-llm] stopped at step 3 on 2 ranks, resumed on 1: vs uninterrupted 1 rank weights "
          f"{weight_diff:.3g}, losses {loss_diff:.3g}")
    assert resumed["status"] == "complete" and resumed["runs"][0]["knots"] == [2, 4]
    assert weight_diff < TOL and loss_diff < TOL


def test_checkpoint_of_one_rank_resumes_on_two_sharded_ranks(launched):
    job = launched["one_then_two"]
    assert job["weight_types"] == ["DTensor"] and job["results"]["distributed"]["fsdp"]
    weight_diff = _max_diff(job["weights"], launched["cola_ref_weights"])
    loss_diff = _loss_diff(job["results"], launched["cola_ref"])
    print(f"\n[dist-llm] stopped at step 3 on 1 rank, resumed on 2 with FSDP: vs uninterrupted 1 rank weights "
          f"{weight_diff:.3g}, losses {loss_diff:.3g}; across ranks {job['rank_weight_diff']:.3g}")
    assert job["results"]["status"] == "complete" and job["rank_weight_diff"] == 0.0
    assert weight_diff < TOL and loss_diff < TOL


def test_fsdp_ties_the_knots_and_matches_replicated_training(launched):
    from transformers import AutoModelForCausalLM

    job, ddp, ref = launched["fsdp"], launched["ddp"], launched["ref"]
    lora, run = job["results"]["runs"]
    assert job["results"]["distributed"]["fsdp"] and run["knots"] == [2, 4]
    assert job["weight_types"] == ["DTensor", "DTensor"] and ddp["weight_types"] == ["Parameter", "Parameter"]
    assert [k["step"] for k in run["knot_reports"]] == [2, 4]
    weight_diff = _max_diff(job["weights"], ddp["weights"])
    loss_diff = _loss_diff(job["results"], ddp["results"])
    ref_weight_diff = _max_diff(job["weights"], launched["ref_weights"])
    ref_loss_diff = _loss_diff(job["results"], ref)
    print(f"\n[dist-llm] lora,cola FSDP vs replicated, 2 ranks: weights {weight_diff:.3g}, losses {loss_diff:.3g}; "
          f"FSDP 2 ranks vs 1 rank: weights {ref_weight_diff:.3g}, losses {ref_loss_diff:.3g}; test accuracy "
          f"{_accuracies(job['results'])} vs {_accuracies(ddp['results'])}; across ranks {job['rank_weight_diff']:.3g}")
    assert weight_diff < TOL and loss_diff < TOL and job["rank_weight_diff"] == 0.0
    assert ref_weight_diff < TOL and ref_loss_diff < TOL
    assert _accuracies(job["results"]) == _accuracies(ddp["results"])
    assert abs(job["results"]["zero_shot"]["test"]["loss"] - ddp["results"]["zero_shot"]["test"]["loss"]) < TOL
    # the merged models, gathered from the shards by rank 0, hold the trained weights
    merged_diff = 0.0
    for r, weights in zip(job["results"]["runs"], job["weights"]):
        state = dict(AutoModelForCausalLM.from_pretrained(r["outputs"]["merged"]).named_parameters())
        merged_diff = max(merged_diff, *(float((state[f"{name}.weight"].detach() - w).abs().max())
                                         for name, w in weights.items()))
    print(f"[dist-llm] FSDP merged models (gathered on rank 0) vs trained weights: {merged_diff:.3g}")
    assert merged_diff < 1e-5
    merged_files = {f"{r['method']}-seed0/merged/{p.name}" for r in job["results"]["runs"]
                    for p in Path(r["outputs"]["merged"]).iterdir()}
    assert _files(launched["root"] / "fsdp" / "runs") == sorted(
        set(_files(launched["root"] / "ddp" / "runs")) | {"lora-seed0/merged", "cola-seed0/merged"} | merged_files)


def test_gradient_checkpointing_on_two_ranks_replicated_and_sharded(launched):
    """Checkpointing is switched on before LoRA and before FSDP shards the model: the same run as one
    process without it."""
    for name, types in (("ddp_ckpt", ["Parameter"]), ("fsdp_ckpt", ["DTensor"])):
        job = launched[name]
        weight_diff = _max_diff(job["weights"], launched["cola_ref_weights"])
        loss_diff = _loss_diff(job["results"], launched["cola_ref"])
        print(f"\n[dist-llm] {name}: gradient checkpointing on 2 ranks vs 1 rank without: weights {weight_diff:.3g}, "
              f"losses {loss_diff:.3g}; across ranks {job['rank_weight_diff']:.3g}")
        assert job["results"]["settings"]["gradient_checkpointing"] and job["weight_types"] == types
        assert job["results"]["runs"][0]["knots"] == [2, 4]
        assert weight_diff < TOL and loss_diff < TOL and job["rank_weight_diff"] == 0.0


def test_an_error_on_rank_0_reaches_every_rank(launched):
    errors = launched["refused"]["errors"]
    assert len(errors) == 2 and all(e is not None and "already holds a run" in e for e in errors), errors
    assert all(e.startswith("ConfigError") for e in errors)


# ============================================================================ two nodes

def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_node_command(port: int, run_id: str, program: list[str]) -> list[str]:
    """One node's launcher (the same command on both nodes): one rank here, a c10d rendezvous on 127.0.0.1,
    whose first launcher hosts the store. ``--local-addr`` keeps the process group on 127.0.0.1 too."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", run_id,
            "--local-addr", "127.0.0.1", *program]


@pytest.fixture(scope="module")
def two_nodes(launched):
    """lora and cola on two "nodes" of one rank each: two torchrun launchers started separately."""
    root = launched["root"]
    jobs = [{**launched["common"], "compare": ["lora", "cola"], "output_dir": str(root / "nodes")}]
    (root / "nodes-jobs.json").write_text(json.dumps(jobs))
    cmd = two_node_command(_free_port(), f"cola-test-{os.getpid()}",
                           [str(HERE / "dist_run_script.py"), str(root / "nodes-jobs.json"), str(root / "nodes.pt"),
                            str(root / "nodes")])
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=HERE.parent.parent) for _ in range(2)]
    try:
        outs = [proc.communicate(timeout=200) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0, out[-3000:] + err[-6000:]
    res = torch.load(root / "nodes.pt", weights_only=False)
    return dict(job=res["jobs"][0], raw=res, seconds=time.perf_counter() - t0)


def test_two_nodes_match_one_process(two_nodes, launched):
    """``torchrun --nnodes 2 --nproc_per_node 1`` twice: one rank on each node, the same losses and weights
    as one process, the knots in lock-step, and rank 0 alone writes the output folder."""
    job, raw, ref = two_nodes["job"], two_nodes["raw"], launched["ref"]
    assert raw["world_size"] == 2 and raw["backend"] == "gloo"
    assert sorted((x["GROUP_RANK"], x["LOCAL_RANK"], x["LOCAL_WORLD_SIZE"]) for x in raw["launch"]) == [
        ("0", "0", "1"), ("1", "0", "1")]                                # two nodes, one rank each
    lora, run = job["results"]["runs"]
    assert lora["method"] == "lora" and run["knots"] == [2, 4]
    assert [k["step"] for k in run["knot_reports"]] == [2, 4]
    weight_diff = _max_diff(job["weights"], launched["ref_weights"])
    loss_diff = _loss_diff(job["results"], ref)
    print(f"\n[dist-llm] two nodes x 1 rank ({two_nodes['seconds']:.1f} s) vs 1 process: weights {weight_diff:.3g}, "
          f"losses {loss_diff:.3g}; across ranks {job['rank_weight_diff']:.3g}")
    assert job["rank_weight_diff"] == 0.0 and weight_diff < 0.25 * FULL_LR and loss_diff < TOL
    assert _accuracies(job["results"]) == _accuracies(ref)
    assert raw["non_main_writes"] == []
    assert _files(launched["root"] / "nodes") == _files(launched["root"] / "ref")


# ============================================================================ the command line

@pytest.fixture(scope="module")
def tiny_llama_folder(tmp_path_factory):
    """The tiny Llama and tokenizer saved with save_pretrained, as `cola train --model` reads them."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = script.build_tokenizer()  # tests/llm/conftest.py's, bound when the script was imported
    script.tiny_llama(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def cli_args(tiny_llama_folder, tmp_path_factory) -> list[str]:
    """`cola train` flags of the settings of :func:`_common`, on the saved tiny Llama."""
    common = _common(_reviews(tmp_path_factory.mktemp("cli-data") / "reviews.jsonl"))
    return ["--model", str(tiny_llama_folder), "--task", "custom", "--train-file", common["train_file"],
            "--template", common["template"], "--answers", "terrible,great", "--n-train", "24", "--n-val", "4",
            "--n-test", "7", "--steps", "6", "--batch-size", "8", "--eval-batch-size", "3", "--links", "3",
            "--rank", "2", "--alpha", "4", "--lr", "0.03", "--no-plots", "--threads", "1", "--device", "cpu"]


def test_cola_train_cli_under_torchrun(cli_args, tmp_path, capsys):
    from safetensors.torch import load_file

    from cola.cli import main

    args = cli_args
    t0 = time.perf_counter()
    proc = _torchrun(["-m", "cola", "train", *args, "--output-dir", str(tmp_path / "two")])
    launch_s = time.perf_counter() - t0
    assert proc.stdout.count("results: ") == 1, proc.stdout        # the table is printed by rank 0 only
    assert proc.stdout.count("| cola |") == 1
    assert "data-parallel over 2 ranks (gloo, cpu)" in proc.stderr
    assert main(["-q", "train", *args, "--output-dir", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    assert two["distributed"]["world_size"] == 2 and "distributed" not in one
    loss_diff = _loss_diff(two, one)
    a = load_file(str(tmp_path / "two" / "runs/cola-seed0/adapter/adapter_model.safetensors"))
    b = load_file(str(tmp_path / "one" / "runs/cola-seed0/adapter/adapter_model.safetensors"))
    adapter_diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"\n[dist-llm] torchrun -m cola train (2 ranks, {launch_s:.1f} s) vs cola train (1 rank): losses "
          f"{loss_diff:.3g}, adapter tensors {adapter_diff:.3g}, test accuracy "
          f"{two['runs'][0]['test']['accuracy']} vs {one['runs'][0]['test']['accuracy']}")
    assert sorted(a) == sorted(b) and adapter_diff < TOL and loss_diff < TOL
    assert two["runs"][0]["test"]["accuracy"] == one["runs"][0]["test"]["accuracy"]
    assert _files(tmp_path / "two") == _files(tmp_path / "one")
    assert two["distributed"]["launcher"] == "torchrun"


def test_cola_train_cli_under_accelerate_launch(cli_args, tmp_path):
    """``accelerate launch --multi_gpu`` starts its ranks through torch's elastic launcher with the
    torchrun variables; without GPUs they run on gloo, as under torchrun."""
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        pytest.skip("accelerate is not installed")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(WORLD),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "cola", "train", *cli_args, "--output-dir", str(tmp_path / "acc")]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=150, cwd=HERE.parent.parent)
    errors = "\n".join(line for line in proc.stderr.splitlines() if "Error" in line and "File " not in line)
    assert proc.returncode == 0, errors[-4000:] + "\n" + proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("results: ") == 1, proc.stdout
    acc = json.loads((tmp_path / "acc" / "results.json").read_text())
    print(f"\n[dist-llm] accelerate launch --multi_gpu --num_processes 2 -m cola train: "
          f"{time.perf_counter() - t0:.1f} s, {acc['distributed']}")
    assert acc["distributed"] | {"launcher": None} == {"world_size": 2, "backend": "gloo", "device": "cpu",
                                                       "fsdp": False, "launcher": None}
    assert acc["distributed"]["launcher"] == "accelerate"
    assert acc["runs"][0]["knots"] == [2, 4] and acc["status"] == "complete"


# ============================================================================ no processes

def test_global_batch_smaller_than_the_ranks_is_refused(tmp_path):
    data = _reviews(tmp_path / "reviews.jsonl")
    settings = TrainSettings(**{**_common(data), "batch_size": 8})
    check_global_batches(settings, {0: 24}, 2)                     # 8, 8, 8
    check_global_batches(settings, {0: 26}, 2)                     # 8, 8, 8, 2
    with pytest.raises(ConfigError, match=r"batch_size=8 .* with 25 training examples .* 8 and 1 examples"):
        check_global_batches(settings, {0: 25}, 2)                 # the last micro-batch: 1 example
    with pytest.raises(ConfigError, match="fewer than the 16 ranks"):
        check_global_batches(settings, {0: 24}, 16)


def test_fsdp_setting_refuses_full_fine_tuning():
    with pytest.raises(ConfigError, match="fsdp with method 'full'"):
        TrainSettings(fsdp=True, compare=["lora", "full"])
    assert TrainSettings(fsdp=True, method="cola").fsdp
