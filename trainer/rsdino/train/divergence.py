"""Which checkpoint to go back to when training diverges.

A NaN loss is only the end of a divergence: the weights usually blew up some intervals before
(a loss spike), and the checkpoints saved in between hold those weights. The guard watches the
interval loss; a checkpoint counts as good only when it was saved while the loss was finite and
below ``spike_factor`` times the median of the recent intervals. Retention never deletes the
newest good checkpoint, and the divergence error names it with ``--resume-from-step``.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque

log = logging.getLogger("rsdino")

_WARM_UP_INTERVALS = 5  # too few intervals for a median to mean anything: every finite loss passes
_HISTORY = 50


class DivergenceGuard:
    def __init__(self, spike_factor: float) -> None:
        self.spike_factor = spike_factor  # 0 disables the spike test (finite is enough)
        self.good_step: int | None = None
        self._recent: deque[float] = deque(maxlen=_HISTORY)
        self._healthy = True
        self._saved_healthy: dict[int, bool] = {}

    def observe(self, step: int, loss: float) -> None:
        """The mean total loss of the interval that ended at ``step``."""
        if not math.isfinite(loss):
            self._healthy = False
            return
        baseline = statistics.median(self._recent) if self._recent else None
        spiked = (
            self.spike_factor > 0
            and baseline is not None
            and len(self._recent) >= _WARM_UP_INTERVALS
            and abs(loss) > self.spike_factor * abs(baseline)
        )
        if spiked and self._healthy:
            log.warning(
                "loss spike at step %d: %.4g is over %g x the recent median %.4g; checkpoints "
                "are not marked good until it comes back down",
                step,
                loss,
                self.spike_factor,
                baseline,
            )
        self._healthy = not spiked
        if not spiked:
            self._recent.append(loss)

    def saving(self, step: int) -> None:
        """A checkpoint of ``step`` is being written now, under the latest interval's loss."""
        self._saved_healthy[step] = self._healthy

    def committed(self, step: int) -> None:
        """The checkpoint of ``step`` is complete: it becomes the one to go back to if healthy."""
        if self._saved_healthy.pop(step, False):
            self.good_step = step
