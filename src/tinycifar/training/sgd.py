"""SGD with momentum (Nesterov optional): torch.optim.SGD's arithmetic, bit for bit, without its start-up.

Why not ``torch.optim.SGD``: building any ``torch.optim`` optimizer imports ``torch._dynamo`` (its
methods are wrapped to keep the compiler out), about a second of a 2-core CPU's start-up in a run
that needs no compiler (benchmarks/README.md, "Speed IX"). This one computes what torch's CPU loop
computes, in the same order: the weight decay, the buffer's update and the step are foreach sums,
which round as torch's per-tensor ones do; the momentum scaling stays per tensor, since a foreach
product rounds the factor to a bf16 or fp16 parameter's dtype first and torch's does not. A run
is the same run to the last bit either way. ``state_dict`` has torch's layout, so checkpoints
resume under either, and ``torch.amp.GradScaler`` drives it as it drives torch's (``param_groups``,
``step``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch

# the keys torch.optim.SGD adds to each group, at the values whose arithmetic this class has
TORCH_GROUP_KEYS = dict(dampening=0, maximize=False, foreach=None, differentiable=False, fused=None)
ARITHMETIC_KEYS = ("dampening", "maximize")


class SGD:
    """``torch.optim.SGD(params, lr, momentum, nesterov=..., weight_decay=...)`` with dampening 0; groups
    may set their own ``lr`` and ``weight_decay`` (extra keys such as ``lr_scale`` ride along)."""

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float, momentum: float = 0.0,
                 *, nesterov: bool = False, weight_decay: float = 0.0) -> None:
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum needs a momentum above 0")
        self.defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                             **TORCH_GROUP_KEYS)
        groups = list(params)
        if not groups:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):  # one group of plain parameters, as torch takes them
            groups = [dict(params=groups)]
        self.param_groups = [self._group(g) for g in groups]
        self.state: defaultdict[torch.Tensor, dict[str, torch.Tensor]] = defaultdict(dict)

    def _group(self, group: dict[str, Any]) -> dict[str, Any]:
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        group = {**self.defaults, **group, "params": params}
        check_arithmetic(group)
        return group

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter with a gradient; those without one (frozen, or unused by this
        step) keep their weights and momentum, as with torch's."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._step_group(group, params)

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        grads = [p.grad for p in params]
        if group["weight_decay"] != 0:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        momentum = group["momentum"]
        if momentum != 0:
            running, their_grads = [], []  # buffers from earlier steps, and the gradients they take in
            for p, g in zip(params, grads, strict=True):
                state = self.state[p]
                if "momentum_buffer" in state:
                    running.append(state["momentum_buffer"].mul_(momentum))
                    their_grads.append(g)
                else:  # a parameter's first step: torch starts its buffer at the gradient
                    state["momentum_buffer"] = g.detach().clone()
            if running:
                torch._foreach_add_(running, their_grads)
            buffers = [self.state[p]["momentum_buffer"] for p in params]
            grads = torch._foreach_add(grads, buffers, alpha=momentum) if group["nesterov"] else buffers
        if group.get("orthogonalize"):
            step_keeping_norms(params, [orthogonalized(g) for g in grads], group["lr"])
        else:
            torch._foreach_add_(params, grads, alpha=-group["lr"])

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's layout: parameters by their position across the groups."""
        index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[p] for p in g["params"]]}
                  for g in self.param_groups]
        state = {index[p]: {"momentum_buffer": s["momentum_buffer"]} for p, s in self.state.items() if s}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Groups' settings and momentum buffers (copied, onto each parameter's device and dtype) from
        ``state_dict()`` of this class or of torch.optim.SGD over the same parameter groups; nothing
        changes when it does not fit."""
        saved = state_dict["param_groups"]
        if [len(g["params"]) for g in saved] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("loaded state dict's parameter groups differ from the optimizer's")
        for g in saved:
            check_arithmetic(g)
        position = {i: p for g, mine in zip(saved, self.param_groups, strict=True)
                    for i, p in zip(g["params"], mine["params"], strict=True)}
        state: defaultdict[torch.Tensor, dict[str, torch.Tensor]] = defaultdict(dict)
        for i, s in state_dict["state"].items():
            if s.get("momentum_buffer") is not None:  # older torch wrote None for momentum 0
                p = position[i]
                state[p]["momentum_buffer"] = s["momentum_buffer"].to(p.device, p.dtype, copy=True)
        self.state = state
        for group, loaded in zip(self.param_groups, saved, strict=True):
            group.update({k: v for k, v in loaded.items() if k != "params"})


def orthogonalized(update: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The update with its singular values pushed toward 1 (Muon: Jordan et al., 2024), each filter
    one row: every direction of the filters' space moves, not only the few a small batch's gradient
    favours. A quintic Newton-Schulz iteration, X <- aX + (bA + cA^2)X with A = XX^T, on the
    Frobenius-normalized matrix, whose coefficients trade exactness for speed (singular values land
    in about [0.7, 1.2]); scaled by sqrt(rows / cols) where there are more rows than columns, as
    Muon's authors do. Iterating on X itself, not on a polynomial of the first Gram matrix (under
    half the arithmetic), because that form drifts in fp32 when one direction dominates the gradient
    (tests/test_sgd.py has such a gradient)."""
    x = update.reshape(len(update), -1).float()
    tall = x.size(0) > x.size(1)
    x = x.T if tall else x
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):  # three products a step: addmm(m, p, q, beta=s, alpha=t) is s*m + t*(p @ q)
        a = x @ x.T
        x = torch.addmm(x, torch.addmm(a, a, a, beta=-4.7750, alpha=2.0315), x, beta=3.4445)
    x = x.T if tall else x
    return (x * max(1.0, x.size(0) / x.size(1)) ** 0.5).view_as(update).to(update.dtype)


def step_keeping_norms(params: list[torch.Tensor], updates: list[torch.Tensor], lr: float) -> None:
    """p -= lr * update, then each filter bank back to its (Frobenius) norm before the step: batch norm
    after a filter divides out its scale, so a fixed norm fixes the update's relative size (lr, in place
    of weight decay's slow equilibrium). A bank at zero (zero-initialized) keeps the norm it steps to."""
    norms = torch._foreach_norm(params)
    torch._foreach_add_(params, updates, alpha=-lr)
    for p, before, after in zip(params, norms, torch._foreach_norm(params), strict=True):
        p.mul_(torch.where(before > 0, before / after.clamp_min(1e-12), 1.0))


def check_arithmetic(group: dict[str, Any]) -> None:
    """Refuse settings of torch's SGD whose arithmetic this class does not have (a resumed checkpoint
    of torch's with dampening, say), rather than step differently without a word."""
    for key in ARITHMETIC_KEYS:
        if group.get(key, TORCH_GROUP_KEYS[key]) != TORCH_GROUP_KEYS[key]:
            raise ValueError(f"SGD: {key}={group[key]!r} is not supported (only {TORCH_GROUP_KEYS[key]!r})")
