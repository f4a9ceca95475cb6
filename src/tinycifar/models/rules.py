"""The assignment's rules as a checklist: ``tinycifar check`` and ``tinycifar.check``.

Rules live in a small TOML file (``assignment.toml`` beside this module is the default; a
user writes their own for another budget or other layer types). Every rule is measured on
the network's traced forward pass (``graph.trace``), so it holds for any ``nn.Module``:
functional pooling, residual branches and inline reshapes are seen, not only layers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..tomlfile import read_toml
from .graph import Trace, TracedOp, empirical_receptive_field, probe_size, trace
from .registry import ModelError, build_model, count_params

DEFAULT_RULES = Path(__file__).with_name("assignment.toml")


class RulesError(ValueError):
    """A rules file cannot be used; the message names the file and the key."""


@dataclass
class Rules:
    name: str = "custom rules"
    input_size: int = 32
    num_classes: int = 10
    params_below: int = 0  # 0 = not checked
    receptive_field_above: int = 0
    no_max_pooling: bool = False
    only_global_average_pooling: bool = False
    depthwise_separable: bool = False
    dilated_conv: bool = False
    downsample_by_conv: bool = False
    gap_then_linear: bool = False
    forbidden_layers: list[str] = field(default_factory=list)
    required_layers: list[str] = field(default_factory=list)


def load_rules(path: str | Path | None = None) -> Rules:
    """Rules from a TOML file (default: the assignment's); unknown keys and wrong types are refused."""
    path = Path(path) if path is not None else DEFAULT_RULES
    values = read_toml(path, f"--rules {path}", RulesError)
    fields = {f.name: f for f in dataclasses.fields(Rules)}
    for key, value in values.items():
        if key not in fields:
            raise RulesError(f"--rules {path}: unknown rule {key!r}; known: {', '.join(fields)}")
        expected = fields[key].type
        ok = {"str": isinstance(value, str),
              "int": isinstance(value, int) and not isinstance(value, bool) and value >= 0,
              "bool": isinstance(value, bool),
              "list[str]": isinstance(value, list) and all(isinstance(v, str) for v in value)}[expected]
        if not ok:
            kind = {"int": "a non-negative integer", "bool": "true or false", "str": "a string",
                    "list[str]": "a list of strings"}[expected]
            raise RulesError(f"--rules {path}: {key} must be {kind}, got {value!r}")
    rules = Rules(**values)
    if rules.input_size < 8 or rules.num_classes < 1:
        raise RulesError(f"--rules {path}: input_size must be at least 8 and num_classes at least 1")
    return rules


@dataclass
class RuleResult:
    name: str
    passed: bool
    value: Any
    limit: str
    detail: str = ""


@dataclass
class CheckReport:
    model: str
    rules: str
    results: list[RuleResult]
    params: int
    receptive_field: int
    empirical_receptive_field: int | None

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "rules_name": self.rules, "passed": self.passed,
                "rules": [dataclasses.asdict(r) for r in self.results], "params": self.params,
                "receptive_field": self.receptive_field,
                "empirical_receptive_field": self.empirical_receptive_field}

    def format(self) -> str:
        lines = [f"{self.model} against the rules of {self.rules}:"]
        width = max(len(r.name) for r in self.results)
        for r in self.results:
            value = f"{r.value:,}" if isinstance(r.value, int) and not isinstance(r.value, bool) else str(r.value)
            lines.append(f"  {'PASS' if r.passed else 'FAIL'}  {r.name:<{width}}  {value:<14} {r.limit}"
                         + (f"  ({r.detail})" if r.detail else ""))
        failed = [r.name for r in self.results if not r.passed]
        lines.append(f"all {len(self.results)} rules pass" if not failed
                     else f"{len(failed)} of {len(self.results)} rules fail: {', '.join(failed)}")
        return "\n".join(lines)

    __str__ = format


# ---------------------------------------------------------------------------- the rules

OP_KINDS = ("conv", "depthwise_conv", "dilated_conv", "strided_conv", "pointwise_conv", "max_pool", "avg_pool",
            "global_avg_pool", "global_max_pool", "linear", "resize")


def _ops_of(t: Trace, kind: str) -> list[TracedOp]:
    tests = {"depthwise_conv": lambda op: op.is_depthwise, "pointwise_conv": lambda op: op.is_pointwise,
             "dilated_conv": lambda op: op.kind == "conv" and op.dilation > 1,
             "strided_conv": lambda op: op.kind == "conv" and op.stride > 1}
    return [op for op in t.ops if tests.get(kind, lambda op: op.kind == kind)(op)]


def _count_layers(model: nn.Module, t: Trace, name: str) -> int:
    """Traced operations of that kind, or submodules whose class (or a base class) has that name."""
    if name in OP_KINDS:
        return len(_ops_of(t, name))
    return sum(any(c.__name__ == name for c in type(m).__mro__) for m in model.modules())


def _where(ops: list[TracedOp], limit: int = 3) -> str:
    more = f", +{len(ops) - limit} more" if len(ops) > limit else ""
    return ", ".join(op.where() for op in ops[:limit]) + more


def _separable_pairs(t: Trace) -> list[tuple[TracedOp, TracedOp]]:
    return [(t.before(op), op) for op in t.ops
            if op.is_pointwise and t.before(op) is not None and t.before(op).is_depthwise]


def _head(t: Trace) -> tuple[bool, str]:
    """Does the output come from one linear layer fed by global average pooling?"""
    out = t.ops[t.output_last] if t.output_last is not None and t.output_last >= 0 else None
    if out is None:
        return False, "the output is not made by a layer (it joins several paths, or is the input)"
    pooled = t.before(out)
    on_pooled_map = out.is_pointwise and tuple(out.in_shape[2:]) == (1, 1)
    if out.kind != "linear" and not on_pooled_map:
        return False, f"the output comes from {out.where()}, not a linear layer"
    if pooled is None or pooled.kind != "global_avg_pool":
        fed_by = pooled.where() if pooled else "several paths"
        return False, f"the classifier {out.where()} is fed by {fed_by}, not by global average pooling"
    note = " (a 1x1 convolution on the pooled map: a linear layer)" if on_pooled_map else ""
    return True, f"{pooled.where()} -> {out.where()}{note}"


def check_model(model: nn.Module, rules: Rules | None = None, name: str | None = None) -> CheckReport:
    """Measure ``model`` against ``rules`` (default: the assignment's)."""
    rules = rules or load_rules()
    name = name or getattr(model, "name", None) or type(model).__name__
    try:
        t = trace(model, rules.input_size)
    except Exception as e:  # noqa: BLE001 - user code can fail in any way
        first = (str(e).strip().splitlines() or [""])[0]
        raise ModelError(f"{name}: forward on a 2x3x{rules.input_size}x{rules.input_size} batch raised "
                         f"{type(e).__name__}: {first}") from None
    params, rf = count_params(model), t.receptive_field
    empirical = empirical_receptive_field(model, probe_size(rf))
    results: list[RuleResult] = []

    def rule(enabled: Any, rule_name: str, passed: bool, value: Any, limit: str, detail: str = "") -> None:
        if enabled:
            results.append(RuleResult(rule_name, bool(passed), value, limit, detail))

    want = f"2x{rules.num_classes}"
    got = "x".join(map(str, t.output_shape)) if t.output_shape else "no tensor"
    rule(True, "output shape", got == want, got, f"= {want}", f"for a 2x3x{rules.input_size}x{rules.input_size} batch")
    rule(rules.params_below, "parameters", params < rules.params_below, params, f"< {rules.params_below:,}")
    cross = ("cross-checked by gradient" if empirical == rf else
             f"the gradient probe finds {empirical}" if empirical else "no gradient cross-check possible")
    rule(rules.receptive_field_above, "receptive field", rf > rules.receptive_field_above, rf,
         f"> {rules.receptive_field_above}", cross)
    max_pools = t.of_kind("max_pool", "global_max_pool")
    rule(rules.no_max_pooling, "no max-pooling", not max_pools, len(max_pools), "= 0", _where(max_pools))
    other_pools = t.of_kind("max_pool", "global_max_pool", "avg_pool", "global_sum_pool")
    rule(rules.only_global_average_pooling, "no pooling but global average", not other_pools, len(other_pools),
         "= 0", _where(other_pools))
    pairs = _separable_pairs(t)
    grouped = [op for op in t.of_kind("conv") if op.groups > 1 and not op.is_depthwise]
    ds_detail = (f"{pairs[0][0].where()} -> {pairs[0][1].where()}" if pairs else
                 f"{_where(grouped)}: grouped, not depthwise" if grouped else "")
    rule(rules.depthwise_separable, "depthwise-separable conv", pairs, len(pairs), ">= 1", ds_detail)
    dilated = _ops_of(t, "dilated_conv")
    rule(rules.dilated_conv, "dilated conv", dilated, len(dilated), ">= 1", _where(dilated))
    down = [op for op in t.ops if op.downsamples]
    not_conv = [op for op in down if op.kind != "conv"]
    rule(rules.downsample_by_conv, "downsampling by convolutions", not not_conv,
         f"{len(down) - len(not_conv)} of {len(down)}", "all",
         f"not by a convolution: {_where(not_conv)}" if not_conv else "")
    head_ok, head_detail = _head(t)
    rule(rules.gap_then_linear, "GAP then linear", head_ok, "yes" if head_ok else "no", "yes", head_detail)
    for layer in rules.forbidden_layers:
        n = _count_layers(model, t, layer)
        rule(True, f"no {layer}", n == 0, n, "= 0")
    for layer in rules.required_layers:
        n = _count_layers(model, t, layer)
        rule(True, f"has {layer}", n > 0, n, ">= 1")
    return CheckReport(name, rules.name, results, params, rf, empirical)


def check(model: nn.Module | str, rules: str | Path | Rules | None = None,
          model_kwargs: dict[str, Any] | None = None) -> CheckReport:
    """Check a network (an ``nn.Module`` or a spec) against rules (a file, a Rules, or the assignment's).

    A module is only read, on whatever device it lives: the rules are measured on one forward pass of
    a blank batch on its device in eval mode (its mode is restored), and the receptive field is
    cross-checked by gradient on a float64 copy on the CPU.
    """
    rules = rules if isinstance(rules, Rules) else load_rules(rules)
    if isinstance(model, nn.Module):
        return check_model(model, rules)
    network, _ = build_model(model, model_kwargs, rules.num_classes, rules.input_size)
    return check_model(network, rules, model)
