"""Small models and loops shared by the core tests."""

from __future__ import annotations

import torch
from torch import nn

import cola


class MLP(nn.Module):
    def __init__(self, d_in=12, d_hidden=16, d_out=10, dtype=torch.float32, bias=True):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden, bias=bias, dtype=dtype)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(d_hidden, d_out, bias=bias, dtype=dtype)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def make_chain(config: cola.ChainConfig, rank=4, seed=0, dropout=0.0, lr=1e-2, dtype=torch.float32,
               optimizer=torch.optim.AdamW, pm=None, scheduler=None, **mlp):
    torch.manual_seed(seed)
    model = MLP(dtype=dtype, **mlp)
    cola.inject_lora(model, ["fc1", "fc2"], rank=rank, alpha=2 * rank, dropout=dropout)
    chain = cola.Chain(model, lambda p: optimizer(p, lr=lr), config, scheduler=scheduler, plugin_manager=pm)
    return model, chain


def batches(n, d_in=12, d_out=10, seed=1, batch=8):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        yield torch.randn(batch, d_in, generator=g), torch.randn(batch, d_out, generator=g)


def train(model, chain, data):
    losses = []
    for x, y in data:
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        chain.step(loss)
        chain.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def conv1d_and_linear(n_in=6, n_out=5, dtype=torch.float32, seed=0):
    """A GPT-2 ``Conv1D`` (weight stored in x out) and the ``nn.Linear`` computing the same function."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(seed)
    conv = Conv1D(n_out, n_in)
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
    linear = nn.Linear(n_in, n_out)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    return conv.to(dtype), linear.to(dtype)
