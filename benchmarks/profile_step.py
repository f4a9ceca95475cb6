"""Where a training step of a preset spends its time, and how close it runs to the CPU's peak.

One step as the preset trains it (its network with the whitening stem, its recipe for the precision:
bf16 autocast, or fp32 with --precision fp32 and the fp32 table's batch and optimizer; channels_last
or contiguous with --contiguous, its augmentation),
profiled with ``torch.profiler`` over a few steps after warm-up.
Operators are grouped by what they are for: convolutions by kind (full, strided, dilated,
depthwise, pointwise) and pass (forward, backward), batch norm, activations, optimizer,
augmentation, the rest. The achieved rate counts 3 x 2 x the network's forward MACs per image
(forward, and a backward that costs twice the forward, less the gradients that never run: the
first convolution's input gradient, its weights' where they are frozen, and with --frozen-stem the
second convolution's input gradient) against two peaks: the theoretical one
(cores in use x clock x FLOP per cycle: two FMA pipes x the lanes of the datapath x 2 FLOP per
multiply-add; bf16's VDPBF16PS counts two products a lane) and the one a large matrix product in
the step's precision reaches here (what oneDNN can get). The datapath is 512 bits where ATen's
kernels run AVX-512 on full-width pipes (Zen 5, Intel Xeon): fp32 64, bf16 128 FLOP per cycle;
256 bits with AVX2 (ATEN_CPU_CAPABILITY=avx2) or on AMD family 25 (Zen 4 splits each 512-bit
operation in two): fp32 32, bf16 64. Where oneDNN multiplies bf16 on AMX tiles (Intel Xeon since
Sapphire Rapids), bf16 counts the tile unit's 1024 FLOP per cycle.

    python benchmarks/profile_step.py --preset fast --out benchmarks/results/profile_fast
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/profile_step.py --precision fp32 \
        --out benchmarks/results/profile_fast_fp32_avx2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import command_line, kernel_isa, machine_info, markdown_table, synthetic_step  # noqa: E402

from tinycifar.data.augment import augment  # noqa: E402
from tinycifar.data.loader import resized  # noqa: E402
from tinycifar.evaluate import autocast_context  # noqa: E402
from tinycifar.models.summary import model_summary  # noqa: E402
from tinycifar.training.train import freeze_stem_norm, onednn_max_isa  # noqa: E402


def conv_kind(module: nn.Conv2d) -> str:
    if module.groups > 1 and module.groups == module.in_channels:
        return "depthwise"
    if module.kernel_size == (1, 1):
        return "pointwise"
    if module.dilation != (1, 1):
        return "dilated"
    if module.stride != (1, 1):
        return "strided"
    return "full 3x3"


def label_modules(model: nn.Module) -> None:
    """Forward hooks that wrap each conv / batch norm / activation in a named profiler range, and a
    backward hook that does the same for its gradient (so the backward ops can be attributed)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            kind = f"conv {conv_kind(module)}"
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            kind = "batch norm"
        elif isinstance(module, (nn.ReLU, nn.GELU)):
            kind = "activation"
        else:
            continue
        state = {}

        def enter(mod, args, kind=kind, state=state):
            state["fwd"] = torch.autograd.profiler.record_function(f"## {kind} | forward")
            state["fwd"].__enter__()

        def leave(mod, args, out, state=state):
            state["fwd"].__exit__(None, None, None)

        def bwd_enter(mod, grad_out, kind=kind, state=state):
            state["bwd"] = torch.autograd.profiler.record_function(f"## {kind} | backward")
            state["bwd"].__enter__()

        def bwd_leave(mod, grad_in, grad_out, state=state):
            state["bwd"].__exit__(None, None, None)

        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)
        module.register_full_backward_pre_hook(bwd_enter)
        module.register_full_backward_hook(bwd_leave)


def datapath_bits(cpuinfo: str) -> int:
    """The width one FMA pipe computes per cycle: 256 bits under AVX2 or on AMD's family 25 (Zen 3
    has no AVX-512, Zen 4 runs it on 256-bit halves), else 512 where ATen runs AVX-512."""
    family = re.search(r"cpu family\s*:\s*(\d+)", cpuinfo)
    zen4_or_older = "AuthenticAMD" in cpuinfo and family is not None and int(family[1]) <= 25
    return 512 if torch.backends.cpu.get_cpu_capability() == "AVX512" and not zen4_or_older else 256


AMX_BF16_FLOP_PER_CYCLE = 1024


def amx_in_use() -> bool:
    """AMX tiles multiply bf16 where the CPU has them (Intel Xeon since Sapphire Rapids) and
    ``ONEDNN_MAX_CPU_ISA`` leaves them to oneDNN (a cap without AMX in its name excludes them)."""
    max_isa = onednn_max_isa()
    return torch.cpu._is_amx_tile_supported() and (max_isa in ("", "ALL", "DEFAULT") or "AMX" in max_isa)


def flop_per_cycle(precision: str, cpuinfo: str) -> int:
    """Two FMA pipes x lanes x 2 FLOP per multiply-add; a bf16 dot-product lane does two products.
    With AMX, bf16 products run on the tile unit instead: 512 multiply-adds per cycle and core
    (one 16x32 by 32x16 TDPBF16PS every 16 cycles), 1024 FLOP, which the convolutions reach and
    batch norm and activations do not."""
    if precision == "bf16" and amx_in_use():
        return AMX_BF16_FLOP_PER_CYCLE
    lanes = datapath_bits(cpuinfo) // 32
    return 2 * lanes * 2 * (2 if precision == "bf16" else 1)


def matmul_peak(dtype: torch.dtype, seconds: float = 3.0, n: int = 2048) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - t0)


def operator_rows(prof: torch.profiler.profile, steps: int, top: int) -> list[dict]:
    """The operators with the most self time, by input shapes. The parts above time a module's
    backward from its first hook to its last, which can hold other work the autograd engine runs
    meanwhile (a residual block's other branch); an operator's self time holds only its own."""
    events = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
    return [{"operator": e.key, "input_shapes": " ".join(str(shape) for shape in e.input_shapes if shape),
             "calls_per_step": e.count // steps, "self_ms_per_step": round(e.self_cpu_time_total / 1000 / steps, 2)}
            for e in events[:top]]


def part_rows(ranges: dict[tuple[str, str], float], profiled_seconds: float) -> list[dict]:
    """The parts' seconds a step as rows, largest first, and the rest of the step as "other". Both are
    shares of the profiled step (hooks on, ReLUs out of place, the profiler's own cost), which is longer
    than the unprofiled one: against that, "other" came out negative when the parts were most of it."""
    rows = [{"part": part, "pass": kind, "ms_per_step": round(1000 * s, 2),
             "share_%": round(100 * s / profiled_seconds, 1)}
            for (part, kind), s in sorted(ranges.items(), key=lambda kv: -kv[1])]
    rest = profiled_seconds - sum(ranges.values())
    rows.append({"part": "other (loss, autograd bookkeeping, residual adds, pooling, head)", "pass": "-",
                 "ms_per_step": round(1000 * rest, 2), "share_%": round(100 * rest / profiled_seconds, 1)})
    return rows


def macs_run_per_image(model: nn.Module, summary: dict, frozen_stem: bool) -> float:
    """Multiply-accumulates a training step runs per image (at 32x32): the forward's three times (forward,
    input gradients, weight gradients), less what never runs: the first convolution's input gradient
    (images need none), its weight gradient where its filters are frozen (the whitening stem), and with
    the stem's norm frozen the second convolution's input gradient."""
    macs_of = {row["name"]: row["macs"] for row in summary["layers"]}
    name_of = {module: name for name, module in model.named_modules()}
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    first = macs_of.get(name_of[convs[0]], 0)
    skipped = first * (1 + (not convs[0].weight.requires_grad))
    if frozen_stem and len(convs) > 1:
        skipped += macs_of.get(name_of[convs[1]], 0)
    return 3 * summary["macs"] - skipped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--contiguous", action="store_true", help="NCHW tensors instead of channels_last")
    ap.add_argument("--frozen-stem", action="store_true",
                    help="the whitening stem's norm frozen, as the fp32 recipe's 32x32 epochs train")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    ap.add_argument("--clock-ghz", type=float, default=None, help="default: /proc/cpuinfo's cpu MHz")
    ap.add_argument("--ops", type=int, default=15, help="the operators with the most self time to list")
    ap.add_argument("--out", default="benchmarks/results/profile_fast")
    args = ap.parse_args()

    memory_format = torch.contiguous_format if args.contiguous else torch.channels_last
    s = synthetic_step(args.preset, memory_format, args.batch_size, precision=args.precision)
    cfg, model = s.cfg, s.model
    device = torch.device("cpu")
    if args.frozen_stem:  # backward stops at the second convolution's weights
        freeze_stem_norm(model)

    def step() -> None:
        with torch.autograd.profiler.record_function("## augmentation | -"):
            x = resized(augment(s.x_raw, cfg.aug, s.generator), args.resolution).contiguous(memory_format=memory_format)
        with autocast_context(device, args.precision):
            loss = s.criterion(model(x).float(), s.y)
        s.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.autograd.profiler.record_function("## optimizer | -"):
            s.optimizer.step()

    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    step_seconds = (time.perf_counter() - t0) / args.steps

    for module in model.modules():  # backward hooks cannot wrap in-place activations
        if isinstance(module, nn.ReLU):
            module.inplace = False
    label_modules(model)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        profiled_seconds = (time.perf_counter() - t0) / args.steps
    ranges = defaultdict(float)
    for evt in prof.events():
        m = re.match(r"## (.+) \| (.+)", evt.name)
        if m:
            ranges[(m.group(1), m.group(2))] += evt.cpu_time_total / 1e6 / args.steps
    operators = operator_rows(prof, args.steps, args.ops)
    rows = part_rows(ranges, profiled_seconds)

    area = (args.resolution / 32) ** 2  # convolutions scale with the area
    summary = model_summary(model)
    macs = summary["macs"] * area
    flops_per_step = 2 * macs_run_per_image(model, summary, args.frozen_stem) * area * cfg.batch_size
    achieved = flops_per_step / step_seconds
    cpuinfo = Path("/proc/cpuinfo").read_text()
    clock = args.clock_ghz or float(re.search(r"cpu MHz\s*:\s*([\d.]+)", cpuinfo)[1]) / 1000
    cores = min(torch.get_num_threads(), os.cpu_count() or 1)  # the cores the step runs on
    per_cycle = flop_per_cycle(args.precision, cpuinfo)
    theoretical = cores * clock * 1e9 * per_cycle
    measured_peak = matmul_peak(torch.bfloat16 if args.precision == "bf16" else torch.float32)
    layout = "contiguous" if args.contiguous else "channels_last"
    aten_isa, onednn_isa = kernel_isa()
    report = {"command": command_line(), "machine": machine_info(), "preset": args.preset, "model": cfg.model,
              "batch": cfg.batch_size, "resolution": args.resolution, "step_seconds": step_seconds,
              "profiled_step_seconds": profiled_seconds,
              "images_per_second": cfg.batch_size / step_seconds, "forward_macs_per_image": macs,
              "achieved_flops": achieved, "theoretical_peak_flops": theoretical, "clock_ghz": clock,
              "matmul_peak_flops": measured_peak, "precision": args.precision,
              "memory_format": layout, "aten_cpu_capability": aten_isa, "onednn_max_cpu_isa": onednn_isa,
              "flop_per_cycle_per_core": per_cycle, "amx_tiles": per_cycle == AMX_BF16_FLOP_PER_CYCLE,
              "rows": rows, "operators": operators}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    md = [f"# Profile of one `{args.preset}` training step ({cfg.model}, batch {cfg.batch_size}, "
          f"{args.resolution}x{args.resolution}, {args.precision}, {layout}; ATen {report['aten_cpu_capability']}, "
          f"oneDNN ISA {report['onednn_max_cpu_isa']})", "",
          f"Command: `{report['command']}`", "",
          "Machine: " + ", ".join(f"{k}={v}" for k, v in report["machine"].items()), "",
          f"Step: {1000 * step_seconds:.1f} ms ({cfg.batch_size / step_seconds:,.0f} images/s, median-free mean of "
          f"{args.steps} steps, unprofiled; {1000 * profiled_seconds:.1f} ms profiled, of which the parts below are "
          f"shares). Forward: {macs / 1e6:.1f}M MACs per image.", "",
          f"Achieved: **{achieved / 1e9:,.0f} GFLOP/s** (2 x the MACs a step runs x batch / step time: 3 x the "
          "forward's, less the first convolution's input gradient, its weight gradient where its filters are "
          "frozen, and with --frozen-stem the second one's input gradient) = "
          f"**{100 * achieved / measured_peak:.0f}%** of what a 2048x2048 {args.precision} matrix product reaches here "
          f"({measured_peak / 1e9:,.0f} GFLOP/s, oneDNN's practical peak) and {100 * achieved / theoretical:.0f}% of "
          f"{cores} cores x {clock:.2f} GHz x {per_cycle} {args.precision} FLOP per cycle"
          f"{' (AMX tiles)' if report['amx_tiles'] else ''} "
          f"({theoretical / 1e9:,.0f} GFLOP/s at the "
          "clock /proc/cpuinfo reports; when the matrix product beats it, the cores run above that clock).", "",
          markdown_table(rows, ["part", "pass", "ms_per_step", "share_%"]), "",
          f"The {args.ops} operators with the most self time (profiler on, so each takes a little longer; "
          "a part's backward above is timed between its module's hooks and can hold other branches' work, "
          "an operator's self time cannot):", "",
          markdown_table(operators, ["operator", "input_shapes", "calls_per_step", "self_ms_per_step"])]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
