"""The progress bar's numbers, brought to the host without making the training loop wait for them."""

from __future__ import annotations

import torch


class BarReadout:
    """Loss and running accuracy of a step, for the bar's text, shown once they have reached the host.

    Reading a device value (``.item()``) waits until the device has run every queued step; doing
    it for the bar every 10 steps keeps a GPU's queue short. ``push`` starts an asynchronous copy
    of the step's numbers (into pinned memory, with an event recorded after it); ``text`` gives the
    newest numbers that have arrived, without waiting unless told to (the epoch's last step, which
    the epoch's end waits for anyway). On the CPU the numbers are on the host at once.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.pending: tuple[int, int, torch.Tensor, torch.cuda.Event | None] | None = None
        self.shown: str | None = None

    def push(self, step: int, loss: torch.Tensor, correct: torch.Tensor, seen: int) -> None:
        self.text()  # keep the previous numbers if they have arrived
        values = torch.stack([loss.detach().float(), correct.detach().float()])
        event = None
        if self.device.type == "cuda":
            values = values.to("cpu", non_blocking=True)  # pinned: the copy runs in the device's queue
            event = torch.cuda.Event()
            event.record()
        self.pending = (step, seen, values, event)

    def text(self, wait: bool = False) -> str | None:
        """'Loss=... Batch_id=... Accuracy=...' of the newest push that has arrived (or None)."""
        if self.pending is not None:
            step, seen, values, event = self.pending
            if event is not None and wait:
                event.synchronize()
            if event is None or event.query():
                loss, correct = values.tolist()  # host memory the copy has filled: no wait
                self.shown = f"Loss={loss:.4f} Batch_id={step} Accuracy={100.0 * correct / seen:.2f}"
                self.pending = None
        return self.shown
