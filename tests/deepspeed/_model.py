"""A tiny language model whose Muon matrices straddle ZeRO partition boundaries at DP 2 and 4,
its deterministic data, and the single-process reference training loop."""

from __future__ import annotations

import torch
from torch import nn

VOCAB, HIDDEN = 32, 16


class TinyLM(nn.Module):
    """Muon matrices fc1 (24 x 16), fc2 (20 x 24), proj (16 x 20): 1184 elements in one flat group,
    so at DP 2 fc2 straddles the boundary and at DP 4 fc1, fc2 and proj each do. ``hidden`` and
    ``ffn`` (16 and 24) change the widths (odd ones make ZeRO-3 cut rows in the middle and pad)."""

    def __init__(self, hidden: int = HIDDEN, ffn: int = 24):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, hidden)
        self.fc1 = nn.Linear(hidden, ffn)
        self.fc2 = nn.Linear(ffn, 20)
        self.proj = nn.Linear(20, hidden, bias=False)
        self.norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h = self.proj(torch.nn.functional.gelu(self.fc2(torch.nn.functional.gelu(self.fc1(h)))))
        logits = self.lm_head(self.norm(h)).float()
        return nn.functional.cross_entropy(logits.view(-1, VOCAB), targets.view(-1))


def make_model(seed: int = 0, **shape) -> TinyLM:
    """:class:`TinyLM` drawn with ``seed``; ``shape``: its ``hidden`` / ``ffn`` widths."""
    torch.manual_seed(seed)
    return TinyLM(**shape)


def micro_batch(step: int, micro: int, rank: int, size: int = 4, seq: int = 8):
    """Tokens and targets of one micro-batch; a pure function of (step, micro, rank)."""
    g = torch.Generator().manual_seed(10_000 * step + 100 * micro + rank)
    tokens = torch.randint(0, VOCAB, (size, seq), generator=g)
    targets = torch.randint(0, VOCAB, (size, seq), generator=g)
    return tokens, targets


def reference_weights(steps: int, world: int, gas: int, *, clip: float = 0.0, opt_kwargs: dict, seed: int = 0,
                      skip_steps=(), shape: dict | None = None) -> dict:
    """Single-process muon_megatron.Muon on the full-batch gradient (mean over ranks and micro-batches);
    ``shape``: :func:`make_model`'s widths."""
    from muon_megatron import Muon, muon_param_groups

    model = make_model(seed, **(shape or {}))
    opt = Muon(muon_param_groups(model), **opt_kwargs)
    for step in range(steps):
        if step in skip_steps:
            continue
        opt.zero_grad(set_to_none=True)
        losses = [model(*micro_batch(step, m, r)) for r in range(world) for m in range(gas)]
        torch.stack(losses).mean().backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---- Megatron-DeepSpeed style tensor parallelism, for the mpu tests -----------------------------


class TensorParallelUnit:
    """A minimal Megatron ``mpu``: TP groups of consecutive ranks, DP groups strided by ``tp``."""

    def __init__(self, tp: int):
        import torch.distributed as dist

        world, rank = dist.get_world_size(), dist.get_rank()
        self.tp, self.dp = tp, world // tp
        for k in range(self.dp):
            ranks = list(range(k * tp, (k + 1) * tp))
            group = dist.new_group(ranks)
            if rank in ranks:
                self.tp_group = group
        for j in range(tp):
            ranks = list(range(j, world, tp))
            group = dist.new_group(ranks)
            if rank in ranks:
                self.dp_group = group
        self.tp_rank, self.dp_rank = rank % tp, rank // tp

    def get_model_parallel_rank(self):
        return self.tp_rank

    def get_model_parallel_world_size(self):
        return self.tp

    def get_model_parallel_group(self):
        return self.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self):
        return self.dp_rank

    def get_data_parallel_world_size(self):
        return self.dp

    def get_data_parallel_group(self):
        return self.dp_group


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        import torch.distributed as dist

        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _mark(p: nn.Parameter, dim: int) -> nn.Parameter:
    p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, dim, 1
    return p


class TensorParallelTinyLM(nn.Module):
    """:class:`TinyLM` with fc1 column-parallel and fc2 row-parallel over ``mpu``'s TP group, built
    from the full model's weights; the other parameters are replicated over TP."""

    def __init__(self, full: TinyLM, mpu: TensorParallelUnit):
        super().__init__()
        self.mpu = mpu
        tp, r = mpu.tp, mpu.tp_rank
        self.embed, self.proj, self.norm, self.lm_head = full.embed, full.proj, full.norm, full.lm_head
        rows = full.fc1.weight.shape[0] // tp
        cols = full.fc2.weight.shape[1] // tp
        self.fc1 = nn.Module()
        self.fc1.weight = _mark(nn.Parameter(full.fc1.weight.data[r * rows:(r + 1) * rows].clone()), 0)
        self.fc1.bias = _mark(nn.Parameter(full.fc1.bias.data[r * rows:(r + 1) * rows].clone()), 0)
        self.fc2 = nn.Module()
        self.fc2.weight = _mark(nn.Parameter(full.fc2.weight.data[:, r * cols:(r + 1) * cols].clone()), 1)
        self.fc2.bias = nn.Parameter(full.fc2.bias.data.clone())

    def forward(self, tokens, targets):
        group = self.mpu.tp_group
        h = _CopyToTP.apply(self.embed(tokens), group)
        a = torch.nn.functional.gelu(h @ self.fc1.weight.t() + self.fc1.bias)
        y = _ReduceFromTP.apply(a @ self.fc2.weight.t(), group) + self.fc2.bias
        logits = self.lm_head(self.norm(self.proj(torch.nn.functional.gelu(y)))).float()
        return nn.functional.cross_entropy(logits.view(-1, VOCAB), targets.view(-1))

    def full_weights(self) -> dict:
        """The full model's weights, TP slices gathered."""
        import torch.distributed as dist

        out = {}
        for n, p in self.named_parameters():
            w = p.detach().float()
            if getattr(p, "tensor_model_parallel", False):
                parts = [torch.empty_like(w) for _ in range(self.mpu.tp)]
                dist.all_gather(parts, w.contiguous(), group=self.mpu.tp_group)
                w = torch.cat(parts, dim=p.partition_dim)
            out[n] = w.clone()
        return out
