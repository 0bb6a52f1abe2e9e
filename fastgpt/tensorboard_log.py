"""`fastgpt train --tensorboard DIR`: the run's scalars as TensorBoard event files.

Tags, each against the iteration: ``train/loss`` (the logged step's batch loss), ``train/lr``,
``train/grad_norm`` (before clipping; none when --grad-clip 0, as such a step computes no norm),
``perf/tokens_per_s``, ``perf/tflops`` and ``perf/mfu`` (fastgpt.flops; MFU only where the peak is
known), ``estimate/train_loss`` and ``estimate/val_loss`` (the periodic estimates). Open them with
``tensorboard --logdir DIR``. A resumed run drops what a killed run logged past its checkpoint
(TensorBoard's purge_step), as metrics.jsonl does.

Uses torch.utils.tensorboard, which needs the ``tensorboard`` package (``pip install tensorboard``;
`make setup` installs it); only a run that asks for TensorBoard imports it.
"""

from __future__ import annotations

from typing import Optional

from fastgpt.errors import FastGPTError


def writer_class():
    """torch's SummaryWriter, or a FastGPTError saying what to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise FastGPTError(f"--tensorboard needs the tensorboard package ({e}); install it with "
                           f"`pip install tensorboard`") from None
    return SummaryWriter


class ScalarLog:
    """Writes the scalars of train and eval rows; rank 0 only."""

    def __init__(self, log_dir: str, resume_iter: Optional[int] = None):
        try:
            self.writer = writer_class()(log_dir=log_dir, purge_step=resume_iter)
        except OSError as e:
            raise FastGPTError(f"--tensorboard {log_dir!r} is not writable: {e.strerror}") from None

    def train_row(self, it: int, **values: Optional[float]) -> None:
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, value, it)

    def eval_row(self, it: int, train_loss: float, val_loss: float) -> None:
        self.writer.add_scalar("estimate/train_loss", train_loss, it)
        self.writer.add_scalar("estimate/val_loss", val_loss, it)

    def close(self) -> None:
        self.writer.close()
