"""The bar's numbers: shown once the asynchronous copy has arrived, never waited for mid-epoch."""

from __future__ import annotations

import torch
from host_reads import HostReads

from tinycifar.training import progress
from tinycifar.training.progress import BarReadout


class FakeEvent:
    """torch.cuda.Event's query/synchronize, completed by the test (no GPU here)."""

    made: list[FakeEvent] = []

    def __init__(self):
        self.done = False
        FakeEvent.made.append(self)

    def record(self) -> None:
        pass

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.done = True


def test_on_the_cpu_the_numbers_show_at_once_without_a_host_read():
    readout = BarReadout(torch.device("cpu"))
    assert readout.text() is None
    loss, correct = torch.tensor(1.5), torch.tensor(2)
    with HostReads() as reads:
        readout.push(3, loss, correct, 4)
        text = readout.text()
    assert text == "Loss=1.5000 Batch_id=3 Accuracy=50.00" and reads.seen == []


def test_on_a_gpu_a_copy_on_its_way_is_not_waited_for_except_at_the_last_step(monkeypatch):
    monkeypatch.setattr(progress.torch.cuda, "Event", FakeEvent)
    FakeEvent.made.clear()
    readout = BarReadout(torch.device("cuda"))  # the tensors stay on the CPU; the events are fakes
    readout.push(0, torch.tensor(2.0), torch.tensor(1), 10)
    assert readout.text() is None  # not arrived: nothing to show yet, and no wait
    FakeEvent.made[0].done = True
    assert readout.text() == "Loss=2.0000 Batch_id=0 Accuracy=10.00"
    readout.push(10, torch.tensor(1.0), torch.tensor(5), 20)
    assert readout.text() == "Loss=2.0000 Batch_id=0 Accuracy=10.00"  # the newest that arrived
    assert readout.text(wait=True) == "Loss=1.0000 Batch_id=10 Accuracy=25.00"
