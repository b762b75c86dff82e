"""Human-facing progress lines and a machine-readable JSON-lines log of the same numbers."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

log = logging.getLogger("rsdino")


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class ProgressReporter:
    """Prints one line per logging interval and appends the same record to ``train_log.jsonl``."""

    def __init__(self, log_path: Path, total_steps: int, samples_per_step: int) -> None:
        self.log_path = log_path
        self.total_steps = total_steps
        self.samples_per_step = samples_per_step
        self._last_time = time.perf_counter()
        self._last_step: int | None = None

    def start(self, step: int) -> None:
        self._last_time = time.perf_counter()
        self._last_step = step

    def drop_records_after(self, step: int) -> None:
        """Resuming at ``step``: records of later steps belong to work the restart redoes, so
        the log keeps one record per step and kind (written to a temp file, then renamed)."""
        if not self.log_path.exists():
            return
        lines = self.log_path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
        if len(kept) != len(lines):
            partial = self.log_path.with_name(self.log_path.name + ".tmp")
            partial.write_text("".join(kept))
            partial.replace(self.log_path)

    def report(
        self,
        step: int,
        losses: dict[str, float],
        scalars: dict[str, float],
        views: dict[str, float] | None = None,
    ) -> dict:
        """``step`` is the number of completed steps; ``views``: seasonal-view and cloud counts."""
        now = time.perf_counter()
        done = step - (self._last_step if self._last_step is not None else step)
        elapsed = now - self._last_time
        seconds_per_step = elapsed / done if done > 0 else 0.0
        samples_per_s = self.samples_per_step / seconds_per_step if seconds_per_step else 0.0
        eta = seconds_per_step * (self.total_steps - step)
        self._last_time, self._last_step = now, step

        loss_text = " ".join(f"{name} {value:.4f}" for name, value in losses.items())
        views = views or {}
        view_text = (
            f" | seasonal {views['seasonal_pairs']:.2f} ({views['seasonal_days_apart']:.0f} days)"
            if "seasonal_pairs" in views
            else ""
        )
        log.info(
            "step %d/%d | %s | lr %.3g | %.1f samples/s%s | ETA %s",
            step,
            self.total_steps,
            loss_text,
            scalars["lr"],
            samples_per_s,
            view_text,
            format_duration(eta),
        )
        record = {
            "step": step,
            **losses,
            **scalars,
            **views,
            "samples_per_s": samples_per_s,
            "time": time.time(),  # wall clock, to line the log up with other events
        }
        self._append(record)
        return record

    def report_eval(self, record: dict, seconds: float) -> None:
        """Print and append an evaluation record; its time does not count against throughput."""
        knn = " ".join(f"k={k} {value:.4f}" for k, value in record["eval"]["knn"].items())
        log.info("eval at step %d | knn top-1 %s | %.1fs", record["step"], knn, seconds)
        self._append({**record, "time": time.time()})
        self._last_time += seconds

    def _append(self, record: dict) -> None:
        with open(self.log_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
