"""One routing rule: which parameters Muon updates and which AdamW updates.

Moonlight's rule (paper section 2.2 and ``toy_train.py``): every hidden matrix, including the MoE
router and each routed expert, goes to Muon; embeddings, the output head, norm gains and biases go
to AdamW with the same lr and weight decay. :func:`is_muon_parameter` is that rule and is the only
place it is written; the optimizer groups, the distributed layouts and the engine adapters all call
it. User patterns (``fnmatch`` style, matched against the full parameter name) override it, and a
pattern that matches no trainable parameter is an error, never silently ignored.
"""

from __future__ import annotations

import fnmatch
from typing import Iterable, Mapping, Optional, Sequence

import torch

from .splits import SplitSpec, default_split

# Name fragments that mark embeddings and output heads (Megatron, HF and nanoGPT spellings).
EMBEDDING_OR_HEAD_PATTERNS = (
    "*embedding*",
    "*embed_tokens*",
    "*wte*",
    "*wpe*",
    "*lm_head*",
    "*output_layer*",
)


def is_muon_parameter(name: str, param: torch.Tensor, *, is_embedding_or_head: bool = False) -> bool:
    """Moonlight's default rule: a parameter with 2 or more dims that is not an embedding or the
    output head. ``is_embedding_or_head`` lets callers that know module types say so directly."""
    if param.ndim < 2 or is_embedding_or_head:
        return False
    return not any(fnmatch.fnmatchcase(name, p) for p in EMBEDDING_OR_HEAD_PATTERNS)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def route_parameters(
    named_parameters: Iterable[tuple[str, torch.Tensor]],
    *,
    adamw: Sequence[str] = (),
    muon: Sequence[str] = (),
    embedding_or_head: Sequence[str] = (),
) -> dict[str, bool]:
    """Map each trainable parameter name to True (Muon) or False (AdamW).

    ``adamw`` / ``muon``: patterns forcing a route (``adamw`` wins where both match);
    ``embedding_or_head``: names known (e.g. from module types) to be embeddings or heads.
    Raises ValueError for a pattern that matches no trainable parameter.
    """
    named = [(n, p) for n, p in named_parameters if p.requires_grad]
    known_heads = set(embedding_or_head)
    routes = {}
    for name, p in named:
        if _matches(name, adamw):
            routes[name] = False
        elif _matches(name, muon):
            routes[name] = True
        else:
            routes[name] = is_muon_parameter(name, p, is_embedding_or_head=name in known_heads)
    for kind, patterns in (("adamw", adamw), ("muon", muon)):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for n, _ in named):
                raise ValueError(
                    f"{kind} pattern {pattern!r} matches no trainable parameter; names look like "
                    f"{[n for n, _ in named[:4]]}"
                )
    return routes


def muon_param_groups(
    model: torch.nn.Module,
    *,
    adamw: Sequence[str] = (),
    muon: Sequence[str] = (),
    splits: Optional[Mapping[str, SplitSpec]] = None,
) -> list[dict]:
    """Param groups for :class:`muon_megatron.Muon`, built the Moonlight way.

    Embedding modules and a module named like an output head go to AdamW, every other matrix to
    Muon (one group per split spec), 1-D tensors to AdamW. ``splits`` maps name patterns to the
    :class:`SplitSpec` of matching parameters; a pattern matching nothing, patterns giving one
    parameter different specs, or a pattern matching an AdamW parameter, is a ValueError. Groups carry ``names`` for messages.
    """
    splits = dict(splits or {})
    heads = [
        f"{mod_name}.{p_name}" if mod_name else p_name
        for mod_name, module in model.named_modules()
        if isinstance(module, torch.nn.Embedding)
        for p_name, _ in module.named_parameters(recurse=False)
    ]
    named = list(model.named_parameters())
    routes = route_parameters(named, adamw=adamw, muon=muon, embedding_or_head=heads)
    used = set()
    muon_groups: dict[SplitSpec, dict] = {}
    adamw_group = {"params": [], "names": [], "use_muon": False}
    for name, p in named:
        if name not in routes:
            continue
        matching = [pattern for pattern in splits if fnmatch.fnmatchcase(name, pattern)]
        used.update(matching)
        if len({splits[pattern] for pattern in matching}) > 1:
            raise ValueError(
                f"split patterns {matching} all match {name!r} but give different split specs; make them "
                "disjoint (or give the same spec)"
            )
        spec = splits[matching[0]] if matching else None
        if not routes[name]:
            if spec is not None:
                raise ValueError(f"split for {name!r} given, but {name!r} is routed to AdamW")
            adamw_group["params"].append(p)
            adamw_group["names"].append(name)
            continue
        if spec is None:
            try:
                spec = default_split(p.shape)
            except ValueError as err:
                raise ValueError(
                    f"{name!r} (shape {tuple(p.shape)}) is routed to Muon, but {err}: Muon orthogonalises "
                    f"2-D matrices. Route it to AdamW (adamw=[{name!r}]) or give it a split spec "
                    "(splits={...}) whose logical matrices are 2-D."
                ) from None
        group = muon_groups.setdefault(spec, {"params": [], "names": [], "use_muon": True, "split": spec})
        group["params"].append(p)
        group["names"].append(name)
    for pattern in splits:
        if pattern not in used:
            raise ValueError(f"split pattern {pattern!r} matches no trainable parameter")
    groups = list(muon_groups.values())
    if adamw_group["params"]:
        groups.append(adamw_group)
    return groups
