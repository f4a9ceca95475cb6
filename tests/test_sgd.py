"""Our SGD against torch.optim.SGD: the same numbers to the last bit, the same state dict, no compiler import."""

from __future__ import annotations

import subprocess
import sys
import tempfile

import pytest
import torch
from torch import nn

from tinycifar.training.sgd import SGD, orthogonalized, step_keeping_norms


def groups_of(model: nn.Module) -> list[dict]:
    """Two groups as the recipes make them: decayed weights, and undecayed norms at their own lr."""
    weights = [p for n, p in model.named_parameters() if n.endswith("weight") and p.ndim > 1]
    rest = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.ndim > 1)]
    return [dict(params=weights, weight_decay=5e-4, lr=0.1, lr_scale=1.0),
            dict(params=rest, weight_decay=0.0, lr=0.4, lr_scale=4.0)]


def network(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    return net.to(dtype)


def run_steps(optimizer, model: nn.Module, start: int, stop: int, total: int = 6) -> None:
    """Steps start..stop-1 of a run of ``total``: the same batches and lrs whichever steps run."""
    g = torch.Generator().manual_seed(1)
    for i in range(stop):
        x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
        x = x.to(next(model.parameters()).dtype)
        if i < start:
            continue
        for group in optimizer.param_groups:
            group["lr"] = 0.1 * (1 - i / total) * group["lr_scale"]
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        if i == 0:  # the head has no gradient at first: its buffer starts a step later
            model[4].weight.grad = model[4].bias.grad = None
        optimizer.step()


def train_steps(optimizer_class, model: nn.Module, steps: int, momentum: float, nesterov: bool):
    optimizer = optimizer_class(groups_of(model), lr=0.1, momentum=momentum, nesterov=nesterov)
    run_steps(optimizer, model, 0, steps)
    return optimizer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("momentum,nesterov", [(0.9, True), (0.9, False), (0.0, False)])
def test_steps_equal_torchs_to_the_last_bit(momentum, nesterov, dtype):
    """bf16 parameters too: a foreach product would round the momentum to bf16 first, torch's does not."""
    ours, theirs = network(dtype), network(dtype)
    a = train_steps(SGD, ours, 6, momentum, nesterov)
    b = train_steps(torch.optim.SGD, theirs, 6, momentum, nesterov)
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(p, q)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == {i for i, s in sb["state"].items() if s.get("momentum_buffer") is not None}
    for i, s in sa["state"].items():
        assert torch.equal(s["momentum_buffer"], sb["state"][i]["momentum_buffer"])


def test_a_state_dict_resumes_under_either_optimizer():
    """A checkpoint written by torch's SGD (older runs) resumes under ours, and ours under torch's."""
    for first, second in ((torch.optim.SGD, SGD), (SGD, torch.optim.SGD)):
        whole, cut = network(), network()
        reference = train_steps(first, whole, 6, 0.9, True)
        half = train_steps(first, cut, 3, 0.9, True)
        resumed = second(groups_of(cut), lr=0.1, momentum=0.9, nesterov=True)
        resumed.load_state_dict(half.state_dict())
        run_steps(resumed, cut, 3, 6)
        assert all(torch.equal(p, q) for p, q in zip(cut.parameters(), whole.parameters(), strict=True))
        assert reference.state_dict()["param_groups"] == resumed.state_dict()["param_groups"]


def test_loading_copies_the_buffers_and_refuses_other_groups():
    model = network()
    opt = train_steps(SGD, model, 2, 0.9, True)
    saved = opt.state_dict()
    fresh = SGD(groups_of(model), lr=0.1, momentum=0.9, nesterov=True)
    fresh.load_state_dict(saved)
    buffer = next(iter(fresh.state.values()))["momentum_buffer"]
    assert all(buffer is not s["momentum_buffer"] for s in saved["state"].values())
    with pytest.raises(ValueError, match="parameter groups differ"):
        SGD([dict(params=list(model.parameters()))], lr=0.1).load_state_dict(saved)
    with pytest.raises(ValueError, match="Nesterov"):
        SGD(groups_of(model), lr=0.1, nesterov=True)


def test_settings_it_cannot_follow_are_refused_and_groups_taken_as_torch_takes_them():
    model = network()
    torchs = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.1)
    ours = SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"dampening=0.1 is not supported"):
        ours.load_state_dict(torchs.state_dict())
    with pytest.raises(ValueError, match="maximize"):
        SGD([dict(params=list(model.parameters()), maximize=True)], lr=0.1)
    with pytest.raises(ValueError, match="empty parameter list"):
        SGD([], lr=0.1)
    weight = model[0].weight
    assert SGD([dict(params=weight)], lr=0.1).param_groups[0]["params"] == [weight]  # one tensor, not its rows


def test_a_training_run_never_imports_the_compiler():
    """The reason for the class: torch.optim imports torch._dynamo on its first use (over a second)."""
    code = ("import sys; from tinycifar.config import resolve_config; from tinycifar.training.train import train; "
            "train(resolve_config('fast', overrides=dict(dataset='synthetic', synthetic_size=256, batch_size=64, "
            "epochs=1, precision='fp32', device='cpu', quiet=True, out=sys.argv[1]))); "
            "print('torch._dynamo' in sys.modules)")
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run([sys.executable, "-c", code, out + "/run"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("shape", [(64, 32, 3, 3), (128, 96, 1, 1), (96, 96, 3, 3), (10, 128)],
                         ids=["wide", "tall", "square-ish", "matrix"])
def test_an_orthogonalized_update_has_singular_values_near_one_and_points_downhill(shape):
    """Newton-Schulz's quintic lands singular values in about [0.7, 1.2] (x sqrt(rows/cols) when tall)
    whatever the gradient's scale; it keeps the shape and the direction (a positive inner product)."""
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 1e-3
    g[0] *= 100  # one filter's gradient dominating, as a small batch's can
    o = orthogonalized(g)
    assert o.shape == g.shape
    rows = o.reshape(len(o), -1)
    scale = max(1.0, rows.size(0) / rows.size(1)) ** 0.5
    s = torch.linalg.svdvals(rows) / scale
    assert s.min() > 0.6 and s.max() < 1.25, s
    assert (o * g).sum() > 0


def muon_groups(model: nn.Module) -> list[dict]:
    """As param_groups makes them with muon_lr: the convolution's filters orthogonalized, the rest SGD's."""
    conv = model[0].weight
    return [dict(params=[conv], weight_decay=0.0, lr_scale=0.5, orthogonalize=True),
            dict(params=[p for p in model.parameters() if p is not conv], weight_decay=5e-4, lr_scale=1.0)]


def test_an_orthogonalizing_group_keeps_each_banks_norm_and_resumes_from_its_state_dict():
    whole, cut = network(), network()
    conv = whole[0].weight
    norm, before = conv.norm().item(), conv.detach().clone()
    run_steps(SGD(muon_groups(whole), lr=0.1, momentum=0.9, nesterov=True), whole, 0, 6)
    assert conv.norm().item() == pytest.approx(norm, rel=1e-5)
    assert (conv - before).norm() > 0.05 * norm
    half = SGD(muon_groups(cut), lr=0.1, momentum=0.9, nesterov=True)
    run_steps(half, cut, 0, 3)
    resumed = SGD(muon_groups(cut), lr=0.1, momentum=0.9, nesterov=True)
    resumed.load_state_dict(half.state_dict())
    run_steps(resumed, cut, 3, 6)
    assert all(torch.equal(p, q) for p, q in zip(cut.parameters(), whole.parameters(), strict=True))


def test_a_bank_at_zero_moves_and_a_zero_gradient_moves_nothing():
    """No 0/0: a zero-initialized bank keeps the norm it steps to; a zero update leaves a bank as it is."""
    zero, other = torch.zeros(8, 3, 3, 3), torch.randn(8, 3, 3, 3)
    kept = other.clone()
    updates = [orthogonalized(torch.randn(8, 3, 3, 3)), orthogonalized(torch.zeros_like(other))]
    step_keeping_norms([zero, other], updates, lr=0.1)
    assert torch.isfinite(zero).all() and zero.norm() > 0
    assert torch.allclose(other, kept)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_orthogonalizing_takes_channels_last_and_bf16_banks(dtype):
    """The recipe's parameters are channels_last; a bf16 bank is orthogonalized in fp32 and comes back bf16."""
    g = torch.randn(16, 8, 3, 3).to(dtype=dtype, memory_format=torch.channels_last)
    o = orthogonalized(g)
    assert o.dtype == dtype and o.shape == g.shape
    plain = orthogonalized(g.contiguous().float())
    assert torch.allclose(o.float(), plain, atol=1e-2 if dtype == torch.bfloat16 else 1e-6)
