"""Learning signal of seasonal views: single-date vs two-date pretraining, the same steps.

The synthetic world has seasons that change every class's spectra and backscatter but not its
land cover, so a feature that ignores the season is what the held-out kNN and linear probes
(tiles at any day of the year) reward. Runs ``eval_signal.py`` twice with the same config and
steps, once with ``train.views.seasonal.enabled=true``, and writes both results side by side.

    python benchmarks/seasonal_signal.py --output-dir runs/seasonal_signal
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

EVAL_SIGNAL = Path(__file__).with_name("eval_signal.py")


def run_eval_signal(out: Path, config: str, overrides: list[str], counts: str) -> dict:
    command = [sys.executable, str(EVAL_SIGNAL), "--output-dir", str(out), "--config", config]
    done = subprocess.run(
        [*command, "--counts", counts, *overrides], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return json.loads((out / "eval_signal.json").read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/seasonal_signal"))
    parser.add_argument("--config", default="quickstart")
    parser.add_argument("--counts", default="1000,200,500", help="train,val,test tiles")
    parser.add_argument("overrides", nargs="*", help="config overrides for both runs, key=value")
    args = parser.parse_args()
    seasonal = ["train.views.seasonal.enabled=true", *args.overrides]
    runs = {
        "single_date": run_eval_signal(
            args.output_dir / "single_date", args.config, args.overrides, args.counts
        ),
        "seasonal": run_eval_signal(
            args.output_dir / "seasonal", args.config, seasonal, args.counts
        ),
    }
    report = {
        "config": args.config,
        "overrides": args.overrides,
        "steps": {name: run["steps"] for name, run in runs.items()},
        "random_init": runs["single_date"]["random_init"],
        **{name: run["pretrained"] for name, run in runs.items()},
        "train_seconds": {name: run["train_seconds"] for name, run in runs.items()},
    }
    (args.output_dir / "seasonal_signal.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
