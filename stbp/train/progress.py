"""What a training run shows while it trains, on the primary rank only: a progress bar in a terminal, or elsewhere (a
log file, a job scheduler) a progress line every :attr:`Progress.EVERY_S` seconds; and one line per epoch."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

__all__ = ["Progress"]


class Progress:
    """The progress of a run of ``epochs`` epochs of ``batch_size`` images a step; silent unless ``shown``."""

    EVERY_S = 30.0  # seconds between progress lines when the output is not a terminal

    def __init__(self, shown: bool, epochs: int, batch_size: int):
        self.shown, self.epochs, self.batch_size = shown, epochs, batch_size
        self.epoch, self.steps = 0, 0  # the epoch (0-based) under way and its number of steps
        self.bar = None  # the epoch's tqdm bar, in a terminal
        self.last_line = -math.inf  # when the last progress line was printed (the first sync point prints one)
        self.waited = 0.0  # seconds of the epoch spent waiting for the next batch (:meth:`timed`)

    def timed(self, batches: Iterable[T]) -> Iterator[T]:
        """``batches``, adding the time spent waiting for each to :attr:`waited` (from zero): over the epoch's time,
        the fraction of the step time the loader was the bottleneck (host time, no device sync)."""
        self.waited, it = 0.0, iter(batches)
        while True:
            t = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            self.waited += time.perf_counter() - t
            yield item

    def start(self, epoch: int, steps: int) -> None:
        """An epoch of ``steps`` steps begins: a bar for it in a terminal."""
        self.epoch, self.steps = epoch, steps
        if self.shown and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{self.epochs}", leave=False, dynamic_ncols=True)

    def update(self, done: int, loss: float, lr: float, elapsed: float) -> None:
        """``done`` steps of the epoch trained in ``elapsed`` seconds, at mean ``loss`` and learning rate ``lr``."""
        left = (self.steps - done) + (self.epochs - self.epoch - 1) * self.steps  # steps still to train
        eta = _clock(elapsed / done * left)
        if self.bar is not None:
            data = f"{100 * self.waited / elapsed:.0f}%"
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", data_wait=data, run_eta=eta, refresh=False)
            self.bar.update(done - self.bar.n)
        elif self.shown and time.perf_counter() - self.last_line >= self.EVERY_S:
            self.last_line = time.perf_counter()
            images = done * self.batch_size
            print(
                f"[stbp] {100 * done / self.steps:.0f}% of epoch {self.epoch + 1} of {self.epochs} ({done}/"
                f"{self.steps} steps)  loss {loss:.4f}  {images / elapsed:.0f} img/s  waiting for data "
                f"{100 * self.waited / elapsed:.0f}%  ETA epoch "
                f"{_clock(elapsed / done * (self.steps - done))}, run {eta}",
                flush=True,
            )

    def close(self) -> None:
        """The epoch's steps are done: its bar goes."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def epoch_done(self, metrics: dict[str, float]) -> None:
        """The epoch's line: its training and validation loss and accuracy, speed, time and spike cost."""
        if not self.shown:
            return
        print(
            f"epoch {self.epoch + 1}/{self.epochs}  train loss {metrics['train_loss']:.4f} "
            f"acc {metrics['train_acc']:.2f}%  val loss {metrics['val_loss']:.4f} "
            f"acc {metrics['val_acc']:.2f}%  lr {metrics['lr']:.2e}  "
            f"{metrics['images_per_s']:.0f} img/s ({100 * metrics['data_wait']:.0f}% waiting for data)  "
            f"{metrics['epoch_time_s']:.1f}s"
            + (f"  {metrics['sops_per_image'] / 1e6:.2f}M SOPs/image" if "sops_per_image" in metrics else ""),
            flush=True,
        )


def _clock(seconds: float) -> str:
    """``m:ss``, or ``h:mm:ss`` from an hour."""
    minutes, secs = divmod(int(seconds + 0.5), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"
