"""SGD with momentum (Nesterov optional): torch.optim.SGD's arithmetic, bit for bit, without its start-up.

Why not ``torch.optim.SGD``: building any ``torch.optim`` optimizer imports ``torch._dynamo`` (its
methods are wrapped to keep the compiler out), 1.3 s of a 2-core Xeon's and 1.6 s of a Zen 3's
start-up in a run that needs no compiler; and on the CPU its step loops over the tensors in Python.
This one steps each parameter group with foreach operations, which compute the same numbers as
torch's loop (the same elementwise products and sums in the same order): a run is the same run to
the last bit either way. ``state_dict`` has torch's layout, so checkpoints resume under either, and
``torch.amp.GradScaler`` drives it as it drives torch's (``param_groups``, ``step``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch

# the keys torch.optim.SGD puts in each group; a state dict of ours loads into it and back
TORCH_GROUP_KEYS = dict(dampening=0, maximize=False, foreach=None, differentiable=False, fused=None)


class SGD:
    """``torch.optim.SGD(groups, lr, momentum, nesterov=...)`` with dampening 0, each group's own
    ``lr`` and ``weight_decay`` (extra keys such as ``lr_scale`` ride along, as with torch's)."""

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float, momentum: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0):
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum needs a momentum above 0")
        self.defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                             **TORCH_GROUP_KEYS)
        groups = list(params)
        if groups and isinstance(groups[0], torch.Tensor):  # one group of plain parameters, as torch takes them
            groups = [dict(params=groups)]
        self.param_groups = [{**self.defaults, **group, "params": list(group["params"])} for group in groups]
        self.state: defaultdict[torch.Tensor, dict[str, torch.Tensor]] = defaultdict(dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self) -> None:
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
            states = [self.state[p] for p in params]
            running = [(s["momentum_buffer"], g) for s, g in zip(states, grads, strict=True) if "momentum_buffer" in s]
            if running:
                buffers, their_grads = map(list, zip(*running, strict=True))
                torch._foreach_mul_(buffers, momentum)
                torch._foreach_add_(buffers, their_grads)
            for s, g in zip(states, grads, strict=True):
                if "momentum_buffer" not in s:  # a parameter's first step: torch starts its buffer at the gradient
                    s["momentum_buffer"] = g.detach().clone()
            buffers = [s["momentum_buffer"] for s in states]
            grads = torch._foreach_add(grads, buffers, alpha=momentum) if group["nesterov"] else buffers
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
        ``state_dict()`` of this class or of torch.optim.SGD over the same parameter groups."""
        saved = state_dict["param_groups"]
        if [len(g["params"]) for g in saved] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("loaded state dict's parameter groups differ from the optimizer's")
        params = [p for g in self.param_groups for p in g["params"]]
        self.state = defaultdict(dict)
        for i, s in state_dict["state"].items():
            if s.get("momentum_buffer") is not None:
                p = params[int(i)]
                self.state[p]["momentum_buffer"] = s["momentum_buffer"].to(p.device, p.dtype, copy=True)
        for group, loaded in zip(self.param_groups, saved, strict=True):
            group.update({k: v for k, v in loaded.items() if k != "params"})
