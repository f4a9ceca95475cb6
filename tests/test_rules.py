"""`tinycifar check`: the assignment's rules on networks that pass, and on ones that break one rule each."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
import torch.nn.functional as F
from cli_helpers import run_main
from torch import nn

from tinycifar.models import MODEL_REGISTRY, create_model
from tinycifar.models.graph import empirical_receptive_field, trace
from tinycifar.models.rules import Rules, RulesError, check, load_rules

pytestmark = pytest.mark.usefixtures("one_thread")


def cbr(cin: int, cout: int, stride: int = 1, dilation: int = 1, groups: int = 1, k: int = 3) -> nn.Sequential:
    pad = dilation * (k - 1) // 2
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, pad, dilation, groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


class Good(nn.Module):
    """Passes every rule: strided downsampling, a dilated conv, depthwise + 1x1, GAP, linear. RF 53."""

    def __init__(self, width: int = 16, dilation: int = 2, groups_is_depthwise: bool = True,
                 downsample: str = "stride", head: str = "gap", extra_width: int = 0):
        super().__init__()
        w = width
        self.c1 = nn.Sequential(cbr(3, w), cbr(w, w, stride=1 if downsample == "maxpool" else 2))  # pool instead
        pools = {"maxpool": nn.MaxPool2d(2), "maxpool-same": nn.MaxPool2d(3, stride=1, padding=1)}
        self.pool = pools.get(downsample, nn.Identity())
        self.c2 = nn.Sequential(cbr(w, w, dilation=dilation),
                                cbr(w, w, groups=w if groups_is_depthwise else 2), cbr(w, 2 * w, k=1),
                                cbr(2 * w, 2 * w, stride=2))
        self.c3 = nn.Sequential(*(cbr(2 * w, 2 * w) for _ in range(4)))
        self.big = nn.Linear(1, extra_width) if extra_width else None
        self.head = head
        self.fc = nn.Linear(2 * w * (64 if head == "flatten" else 1), 10)

    def forward(self, x):
        x = self.c3(self.c2(self.pool(self.c1(x))))
        x = x.flatten(1) if self.head == "flatten" else F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


class Residual(nn.Module):
    """A residual network with a 1x1 projection shortcut: the field is the longest path's."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16, stride=2)
        self.body = nn.Sequential(cbr(16, 16, dilation=2), cbr(16, 16, groups=16), cbr(16, 32, k=1),
                                  cbr(32, 32, stride=2), *(cbr(32, 32) for _ in range(4)))
        self.shortcut = nn.Conv2d(16, 32, 1, stride=2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        x = self.body(x) + self.shortcut(x)
        return self.fc(x.mean((2, 3)))


class Branches(nn.Module):
    """Two branches (3x3 and dilated 3x3) concatenated, Inception-style."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(cbr(3, 16, stride=2), cbr(16, 16, groups=16), cbr(16, 32, k=1),
                                  cbr(32, 32, stride=2), cbr(32, 32, stride=2))
        self.a, self.b = cbr(32, 32), cbr(32, 32, dilation=4)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = self.stem(x)
        return self.fc(F.adaptive_avg_pool2d(torch.cat([self.a(x), self.b(x)], 1), 1).flatten(1))


def results(report) -> dict[str, bool]:
    return {r.name: r.passed for r in report.results}


def failing(report) -> set[str]:
    return {r.name for r in report.results if not r.passed}


@pytest.mark.parametrize("net", [Good, Residual, Branches], ids=["plain", "residual", "branches"])
def test_networks_that_follow_the_rules_pass(net):
    report = check(net())
    assert report.passed, report.format()
    assert len(report.results) == 9
    assert report.receptive_field == report.empirical_receptive_field > 44


@pytest.mark.parametrize("name", sorted(MODEL_REGISTRY))
def test_every_registered_network_passes(name):
    assert check(name).passed


def test_hand_computed_fields():
    # Good: 3x3 -> 3; stride 2 -> 5 (jump 2); dilation 2 -> 5 + 2*2*2 = 13; depthwise -> 17; 1x1 -> 17;
    # stride 2 -> 21 (jump 4); four 3x3 -> 29, 37, 45, 53
    assert trace(Good()).receptive_field == 53 == empirical_receptive_field(Good(), 192)
    # residual: the body's path, 3 -> 11 -> 15 -> 15 -> 19 (jump 4) -> 51, wins over the 1x1 shortcut's 3
    assert trace(Residual()).receptive_field == 51
    # branches: the dilated one, 19 at jump 8 + 4*2*8 = 83, wins over the plain one's 35
    assert trace(Branches()).receptive_field == 83 == empirical_receptive_field(Branches(), 256)


BROKEN = {
    "max-pooling": (lambda: Good(downsample="maxpool"), {"no max-pooling", "no pooling but global average",
                                                         "downsampling by convolutions"}),
    "max-pooling that keeps the size": (lambda: Good(downsample="maxpool-same"), {"no max-pooling",
                                                                              "no pooling but global average"}),
    "flatten + linear without GAP": (lambda: Good(head="flatten"), {"GAP then linear"}),
    "too many parameters": (lambda: Good(extra_width=200_000), {"parameters"}),
    "no dilation": (lambda: Good(dilation=1), {"dilated conv"}),
    "grouped conv that is not depthwise": (lambda: Good(groups_is_depthwise=False), {"depthwise-separable conv"}),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_each_broken_rule_fails_alone(case):
    make, expected = BROKEN[case]
    report = check(make())
    assert failing(report) == expected, report.format()
    assert not report.passed


def test_too_small_a_receptive_field_fails_alone():
    class Shallow(nn.Module):  # RF 3 -> 11 -> 15 -> 15, every other rule kept
        def __init__(self):
            super().__init__()
            self.f = nn.Sequential(cbr(3, 16, stride=2), cbr(16, 16, dilation=2), cbr(16, 16, groups=16),
                                   cbr(16, 16, k=1))
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            return self.fc(self.f(x).mean((2, 3)))

    report = check(Shallow())
    assert failing(report) == {"receptive field"}
    assert report.receptive_field == 15 == report.empirical_receptive_field


def test_a_grouped_conv_is_named_as_not_depthwise():
    detail = next(r.detail for r in check(Good(groups_is_depthwise=False)).results
                  if r.name == "depthwise-separable conv")
    assert "c2.1.0 (Conv2d): grouped, not depthwise" in detail


def test_rules_from_a_file(tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text(textwrap.dedent("""
        name = "tighter"
        params_below = 20000
        receptive_field_above = 60
        forbidden_layers = ["BatchNorm2d"]
        required_layers = ["Dropout", "dilated_conv"]
    """))
    report = check(Good(), rules)
    assert report.rules == "tighter"
    assert results(report) == {"output shape": True, "parameters": False, "receptive field": False,
                               "no BatchNorm2d": False, "has Dropout": False, "has dilated_conv": True}


@pytest.mark.parametrize(("text", "fragment"), [
    ("params_blow = 3", "unknown rule 'params_blow'"),
    ("params_below = -1", "params_below must be a non-negative integer"),
    ("dilated_conv = 'yes'", "dilated_conv must be true or false"),
    ("name = [", "not valid TOML"),
])
def test_bad_rules_files(tmp_path, text, fragment):
    path = tmp_path / "r.toml"
    path.write_text(text)
    with pytest.raises(RulesError, match=fragment):
        load_rules(path)


def test_default_rules_are_the_assignments():
    assert load_rules() == Rules(name="ERA V1 session 9", params_below=200_000, receptive_field_above=44,
                                 no_max_pooling=True, only_global_average_pooling=True, depthwise_separable=True,
                                 dilated_conv=True, downsample_by_conv=True, gap_then_linear=True)



def test_cli_exit_codes_and_json(tmp_path, capsys):
    rc, out, _ = run_main(capsys, ["check", "--model", "era9"])
    assert rc == 0 and "all 9 rules pass" in out and "PASS  receptive field" in out
    rc, out, _ = run_main(capsys, ["check", "--model", "era9", "--json"])
    doc = json.loads(out)
    assert rc == 0 and doc["passed"] and doc["params"] == 195_410 and doc["receptive_field"] == 83
    assert {"name", "passed", "value", "limit"} <= set(doc["rules"][0])
    strict = tmp_path / "strict.toml"
    strict.write_text("params_below = 1000\n")
    rc, out, _ = run_main(capsys, ["check", "--model", "era9", "--rules", str(strict)])
    assert rc == 1 and "FAIL  parameters" in out and "1 of 2 rules fail: parameters" in out
    rc, _, err = run_main(capsys, ["check", "--model", "era9", "--rules", str(tmp_path / "none.toml")])
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "none.toml: cannot read" in err


def test_fastnet_dilated_convs_and_era9_separable_pairs_are_named():
    report = check(create_model("era9"))
    details = {r.name: r.detail for r in report.results}
    assert details["depthwise-separable conv"] == "features.1.1.0.0 (Conv2d) -> features.1.1.1.0 (Conv2d)"
    assert details["GAP then linear"] == "head.0 (AdaptiveAvgPool2d) -> head.2 (Linear)"
