"""What a network does, traced from one forward pass: its convolutions, poolings and linear
layers in the order they run, which feeds which, and the receptive field along the way.

Any ``nn.Module`` works, not only ours: the trace records the ATen operators that the forward
pass dispatches (``TorchDispatchMode``), below the module tree and below ``torch.nn.functional``,
so residual additions, branches, ``F.max_pool2d`` or ``x.mean((2, 3))`` written inline are
seen as well as layers. Every tensor carries three facts from the operator that made it:

- ``rf``: the receptive field of one of its positions, in input pixels, and ``jump``: the
  input pixels between neighbouring positions. A kxk operator with stride s and dilation d
  gives ``rf + d*(k-1)*jump`` and ``jump*s``; an operator of several inputs (``x + f(x)``,
  ``cat``) takes the largest of each, so a residual network's field is its longest path.
- ``last``: the latest traced operator reached through single-input operators only (batch
  norm, activations, reshapes, dropout, scaling). "A depthwise convolution followed by a
  1x1" and "global average pooling, then the classifier" are questions about ``last``.

A global pooling's output keeps its input's field: a squeeze-and-excitation block's global
context is not counted as widening the field (the assignment's count of convolutions).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from ..devices import module_device

IMAGE = -1  # the ``last`` of the input image

POOL_KINDS = ("max_pool", "avg_pool", "global_avg_pool", "global_max_pool", "global_sum_pool")
SPATIAL_KINDS = ("conv", "max_pool", "avg_pool", "resize")  # what moves rf or jump


@dataclass
class TracedOp:
    """One operator that matters to the rules; the others only pass ``rf``/``jump``/``last`` on."""

    index: int
    kind: str  # conv | max_pool | avg_pool | global_avg_pool | global_max_pool | global_sum_pool | linear | resize
    op: str  # the ATen operator, e.g. aten.convolution.default
    module: str  # the innermost module running it ("" for the network's own forward)
    layer: str  # that module's class when it is a torch.nn layer, else "" (an operator in user code)
    input_last: int | None  # ``last`` of its (single) traced input: IMAGE, an op index, or None
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    kernel: int = 1
    stride: int = 1
    dilation: int = 1
    groups: int = 1
    rf: int = 1  # receptive field of one output position, in input pixels
    jump: int = 1

    @property
    def in_channels(self) -> int:
        return self.in_shape[1] if len(self.in_shape) > 1 else 0

    @property
    def is_depthwise(self) -> bool:
        """Each filter sees one input channel (a channel multiplier is allowed)."""
        return self.kind == "conv" and self.groups == self.in_channels > 1

    @property
    def is_pointwise(self) -> bool:
        return self.kind == "conv" and self.kernel == 1 and self.groups == 1

    @property
    def downsamples(self) -> bool:
        """The map shrinks or the step between positions grows."""
        return (len(self.in_shape) == 4 == len(self.out_shape) and not self.kind.startswith("global")
                and (self.stride > 1 or any(o < i for o, i in zip(self.out_shape[2:], self.in_shape[2:], strict=True))))

    def where(self) -> str:
        """'head.0 (AdaptiveAvgPool2d)' for a torch.nn layer, 'forward: max_pool2d' for a call in code."""
        if self.layer:
            return f"{self.module} ({self.layer})"
        name = self.op.removeprefix("aten.").split(".")[0]
        name = _FRIENDLY.get(name, name.removeprefix("_"))
        return f"{self.module + '.forward' if self.module else 'forward'}: {name}"


_FRIENDLY = {"max_pool2d_with_indices": "max_pool2d", "addmm": "linear", "mm": "linear", "convolution": "conv2d",
             "slice": "slicing", "mean": "global average"}


@dataclass
class Trace:
    ops: list[TracedOp]
    output_shape: tuple[int, ...] | None  # None when the forward returned no tensor
    output_last: int | None  # ``last`` of the output tensor
    modules: dict[str, str] = field(default_factory=dict)  # module name -> class name

    @property
    def receptive_field(self) -> int:
        """The field of one position of the deepest map: what global pooling averages over."""
        return max((op.rf for op in self.ops if op.kind in SPATIAL_KINDS), default=1)

    def of_kind(self, *kinds: str) -> list[TracedOp]:
        return [op for op in self.ops if op.kind in kinds]

    def before(self, op: TracedOp) -> TracedOp | None:
        """The traced op that feeds ``op`` through single-input operators only, if any."""
        return self.ops[op.input_last] if op.input_last is not None and op.input_last >= 0 else None


@dataclass
class _Info:
    rf: int
    jump: int
    last: int | None


def _pair0(v: Any) -> int:
    return int(v[0]) if isinstance(v, (list, tuple)) and v else int(v) if isinstance(v, int) else 1


class _Tracer(TorchDispatchMode):
    def __init__(self, module_stack: list[tuple[str, str]]):
        super().__init__()
        self.module_stack = module_stack
        self.info: dict[int, _Info] = {}
        self.alive: list[torch.Tensor] = []  # keeps ids unique while the trace runs
        self.ops: list[TracedOp] = []

    def mark(self, t: torch.Tensor, info: _Info) -> None:
        self.info[id(t)] = info
        self.alive.append(t)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat_in = [a for a in _flatten(args) if isinstance(a, torch.Tensor) and id(a) in self.info]
        if not flat_in:
            return out
        infos = [self.info[id(a)] for a in flat_in]
        outs = [o for o in _flatten(out) if isinstance(o, torch.Tensor)]
        rf, jump = max(i.rf for i in infos), max(i.jump for i in infos)
        last = infos[0].last if len(infos) == 1 else None
        x, y = flat_in[0], outs[0] if outs else None
        op = self.classify(str(func), args, x, y) if y is not None else None
        if op is not None:
            op.index, op.input_last = len(self.ops), last
            if op.kind in SPATIAL_KINDS:
                op.rf = rf + op.dilation * (op.kernel - 1) * jump
                op.jump = jump * op.stride
            else:
                op.rf, op.jump = rf, jump
            self.ops.append(op)
            rf, jump, last = op.rf, op.jump, op.index
        for o in outs:
            self.mark(o, _Info(rf, jump, last))
        return out

    def classify(self, name: str, args: tuple, x: torch.Tensor, y: torch.Tensor) -> TracedOp | None:
        """A TracedOp (index and field filled in later) for the operators that matter, else None."""
        module, layer = self.module_stack[-1] if self.module_stack else ("", "")

        def op(kind: str, **geometry: int) -> TracedOp:
            return TracedOp(0, kind, name, module, layer, None, tuple(x.shape), tuple(y.shape), **geometry)

        spatial_in = tuple(x.shape[2:]) if x.dim() == 4 else ()
        collapses = x.dim() == 4 and max(spatial_in) > 1 and (y.dim() == 2 or tuple(y.shape[2:]) == (1, 1))
        if name.startswith("aten.convolution"):
            weight = args[1]
            if args[6]:  # transposed: grows the map
                return op("resize")
            return op("conv", kernel=max(weight.shape[2:]), stride=_pair0(args[3]), dilation=_pair0(args[5]),
                      groups=int(args[8]))
        if name.startswith(("aten.max_pool2d", "aten.adaptive_max_pool2d")):
            if collapses:
                return op("global_max_pool")
            if name.startswith("aten.adaptive"):
                return op("max_pool", **_adaptive(spatial_in, y))
            kernel = _pair0(args[1])
            stride = _pair0(args[2]) if len(args) > 2 and args[2] else kernel
            return op("max_pool", kernel=kernel, stride=stride, dilation=_pair0(args[4]) if len(args) > 4 else 1)
        if name.startswith(("aten.avg_pool2d", "aten._adaptive_avg_pool2d", "aten.adaptive_avg_pool2d")):
            if collapses:
                return op("global_avg_pool")
            if "adaptive" in name:
                return op("avg_pool", **_adaptive(spatial_in, y))
            kernel = _pair0(args[1])
            return op("avg_pool", kernel=kernel, stride=_pair0(args[2]) if len(args) > 2 and args[2] else kernel)
        if name.startswith(("aten.mean.dim", "aten.sum.dim", "aten.amax")) and collapses and _reduces_hw(args, x):
            kind = {"aten.mean": "global_avg_pool", "aten.sum.": "global_sum_pool"}.get(name[:9], "global_max_pool")
            return op(kind)
        if name.startswith(("aten.addmm", "aten.mm", "aten.linear")):
            return op("linear")
        if name.startswith("aten.upsample"):
            return op("resize")
        if x.dim() == 4 and y.dim() == 4 and any(o < i for o, i in zip(y.shape[2:], spatial_in, strict=True)):
            # slicing x[..., ::2], crops, other shrinking; rf and jump are counted along the rows
            rows = name.startswith("aten.slice") and len(args) > 4 and args[1] % 4 == 2
            return op("resize", stride=max(int(args[4]), 1) if rows else 1)
        return None


def _flatten(obj: Any) -> list[Any]:
    if isinstance(obj, (list, tuple)):
        return [leaf for item in obj for leaf in _flatten(item)]
    return [obj]


def _adaptive(spatial_in: tuple[int, ...], y: torch.Tensor) -> dict[str, int]:
    """Adaptive pooling's equivalent fixed window: kernel ceil(in/out), stride floor(in/out)."""
    size_in, size_out = spatial_in[0], y.shape[2]
    return {"kernel": -(-size_in // size_out), "stride": max(size_in // size_out, 1)}


def _reduces_hw(args: tuple, x: torch.Tensor) -> bool:
    dims = args[1] if len(args) > 1 else None
    if dims is None:
        return False
    dims = [dims] if isinstance(dims, int) else list(dims)
    return {d % x.dim() for d in dims} >= {2, 3}


def trace(model: nn.Module, input_size: int = 32, batch: int = 2) -> Trace:
    """Run ``model`` once on a zero batch in eval mode (no statistic changes) and record it.

    Raises whatever the forward pass raises; callers turn that into their own message.
    """
    stack: list[tuple[str, str]] = []  # (name, torch.nn class name or "") of the modules running now

    def leave(_m, _inputs, _out) -> None:  # a forward hook's return value would replace the output
        stack.pop()

    hooks = []
    for name, m in model.named_modules():
        if name:
            layer = type(m).__name__ if type(m).__module__.startswith("torch.nn") else ""
            hooks.append(m.register_forward_pre_hook(lambda _m, _a, entry=(name, layer): stack.append(entry)))
            hooks.append(m.register_forward_hook(leave))
    tracer = _Tracer(stack)
    was_training = model.training
    model.eval()
    try:
        x = torch.zeros(batch, 3, input_size, input_size, device=module_device(model))
        with torch.no_grad(), tracer:
            tracer.mark(x, _Info(1, 1, IMAGE))
            out = model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    is_tensor = isinstance(out, torch.Tensor)
    output_info = tracer.info.get(id(out)) if is_tensor else None
    modules = {name: type(m).__name__ for name, m in model.named_modules()}
    return Trace(tracer.ops, tuple(out.shape) if is_tensor else None,
                 output_info.last if output_info else None, modules)


# ---------------------------------------------------------------------------- empirical check


class _DeepestMap(TorchFunctionMode):
    """Keeps the input of the last call that collapses a map to one value per channel (the
    global pooling), or failing that the last map produced, with its autograd history."""

    def __init__(self):
        super().__init__()
        self.pooled_input: torch.Tensor | None = None
        self.last_map: torch.Tensor | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        x = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if isinstance(out, torch.Tensor) and out.dim() == 4 and min(out.shape[2:]) > 1:
            self.last_map = out
        if (isinstance(out, torch.Tensor) and x is not None and x.dim() == 4 and min(x.shape[2:]) > 1
                and out.shape[:2] == x.shape[:2] and out.numel() == x.shape[0] * x.shape[1]):
            self.pooled_input = x
        return out


@torch.no_grad()
def _positive_weights(model: nn.Module) -> None:
    """All weights positive, batch-norm statistics neutral: no gradient can cancel out."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
    for p in model.parameters():
        p.uniform_(0.1, 1.0)


def empirical_receptive_field(model: nn.Module, size: int = 192) -> int | None:
    """Input pixels that reach one central position of the deepest map, by gradient.

    Weights are made positive and the input all ones, so no gradient cancels: every pixel
    inside the field gets a non-zero gradient, every one outside zero. The input must hold
    the whole field (``size`` well above it), else the count is clipped. None when the
    network cannot run at ``size`` x ``size`` before its deepest map (e.g. a flatten into a
    fixed-size linear layer fails after it, which is fine).
    """
    if module_device(model).type == "meta":  # a network without values has no gradient to follow
        return None
    # a copy on the CPU, whatever the network's device: float64 everywhere (MPS has none), and the
    # probe's input is made here too
    probe = copy.deepcopy(model).to(device="cpu", dtype=torch.float64).eval()
    _positive_weights(probe)
    x = torch.ones(1, 3, size, size, dtype=torch.float64, requires_grad=True)
    spy = _DeepestMap()
    try:
        with spy:
            probe(x)
    except Exception:  # noqa: BLE001 - a size-bound head may fail after the map we need
        pass
    fmap = spy.pooled_input if spy.pooled_input is not None else spy.last_map
    if fmap is None or not fmap.requires_grad:
        return None
    h, w = fmap.shape[-2:]
    fmap[0, :, h // 2, w // 2].sum().backward()
    rows = (x.grad[0].abs().sum((0, 2)) > 0).nonzero()
    return int(rows.max() - rows.min() + 1) if len(rows) else None


def probe_size(receptive_field: int) -> int:
    """An input side that holds the whole field around the central position, with margin."""
    return min(max(64, 32 * -(-(2 * receptive_field + 32) // 32)), 1024)
