"""A small COLA training loop on torch.distributed, the way a user (or ``cola train``) writes one.

Run by tests/test_distributed.py under ``torchrun --standalone --nproc_per_node 2`` (gloo on
CPU), and imported by the same tests to run the one-process reference. Every rank sees the same
global batch of each step and trains on its slice; only rank 0 writes ``OUT/result.pt``.

    torchrun --standalone --nproc_per_node 2 tests/dist_train_script.py OUT [CHECKPOINT_STEP [MORE_OUT]]

With ``MORE_OUT``, the same two processes then run the rest of tests/test_distributed.py's process work
(:func:`test_distributed.more_work`: lock-step details, FSDP2, Conv1D under FSDP), its results in
``MORE_OUT``: each launch imports torch and cola anew, so the module makes one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import cola
import cola.distributed as cd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import MLP  # noqa: E402

GLOBAL_BATCH = 8
D_IN, D_OUT = 12, 10


def config(**overrides) -> cola.ChainConfig:
    """Knots every 3 steps, a rank change after the first, asymmetric (RAC) re-init drawn per link,
    ReLoRA's optimizer pruning and LR restarts: every part of a knot that could drift."""
    settings = dict(total_steps=12, merge_policy="every", merge_policy_options={"every": 3},
                    rank_schedule="step-down", rank_schedule_options={"later_rank": 2},
                    reinit="rac", reinit_options={"train": "bernoulli"}, optimizer_policy="prune",
                    lr_policy="restart", seed=3)
    settings.update(overrides)
    return cola.ChainConfig(**settings)


def make_chain(cfg: cola.ChainConfig, seed: int = 0):
    torch.manual_seed(seed)                 # the same base model and LoRA init on every rank
    model = MLP(D_IN, 16, D_OUT)
    cola.inject_lora(model, ["fc1", "fc2"], rank=4, alpha=8)
    chain = cola.Chain(model, lambda p: torch.optim.AdamW(p, lr=2e-2), cfg)
    return model, chain


def global_batch(step: int, size: int = GLOBAL_BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of optimizer step ``step`` (0-based): a function of the step alone."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(size, D_IN, generator=g)
    return x, torch.sin(x[:, :D_OUT] * 2) + 0.1 * torch.randn(size, D_OUT, generator=g)


def train(model, chain, steps: range, on_step=None, batch_size: int = GLOBAL_BATCH) -> list[float]:
    """The data-parallel loop: shard the global batch, scale, backward, average gradients, step."""
    losses = []
    for step in steps:
        x, y = global_batch(step, batch_size)
        mine = cd.shard(list(range(len(x))))
        loss = ((model(x[mine]) - y[mine]) ** 2).mean() * cd.loss_scale(len(mine), len(x))
        loss.backward()
        cd.sync_gradients(chain)
        global_loss = cd.average(loss)
        chain.step(global_loss)
        chain.zero_grad()
        losses.append(global_loss)
        if on_step is not None:
            on_step(chain)
    return losses


def lora_state(chain) -> dict[str, torch.Tensor]:
    """Every LoRA layer's factors and (merged) base weight, as plain CPU tensors."""
    out = {}
    for name, layer in chain.layers.items():
        out[f"{name}.A"] = layer.lora_A.detach().cpu().clone()
        out[f"{name}.B"] = layer.lora_B.detach().cpu().clone()
        out[f"{name}.W"] = layer.base.weight.detach().cpu().clone()
    return out


def main(out: str, checkpoint_step: int | None = None) -> None:
    env = cd.init()                         # gloo here (no CUDA), nccl on GPUs
    torch.set_num_threads(1)
    out_dir = Path(out)
    model, chain = make_chain(config())
    cd.attach(chain, on_mismatch="raise")

    def on_step(chain):
        if checkpoint_step is not None and chain.step_count == checkpoint_step:
            cd.save_on_main(out_dir / "checkpoint.pt", chain.state_dict())

    losses = train(model, chain, range(chain.config.total_steps), on_step)
    differing = cd.verify_in_sync(model)
    if cd.is_main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"world_size": cd.world_size(), "launcher": env.launcher, "losses": losses,
                    "knots": [r.step for r in chain.history], "ranks": [r.new_rank for r in chain.history],
                    "differing": differing, "state": lora_state(chain)}, out_dir / "result.pt")
    cd.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None)
    if len(sys.argv) > 3:
        import os

        import test_distributed

        test_distributed.more_work(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), sys.argv[3])
