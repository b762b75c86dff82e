"""Render docs/attention-example.png: `rsdino attention` on a held-out synthetic tile.

rsdino train --config quickstart --output-dir runs/quickstart
python docs/attention_example.py runs/quickstart
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import rasterio
from PIL import Image

from rsdino.data.synthetic import SyntheticLandCover

OUT = Path(__file__).with_name("attention-example.png")
PANELS = ("s2_input.png", "s2_mean.png", "s2_head0.png", "s2_head1.png", "s2_head2.png")


def main(run: str, out: Path = OUT) -> None:
    # Index 5000 lies past the quickstart's 4096 training tiles: a tile the model never saw.
    tile = SyntheticLandCover(1, 64, 6, "sen12ms", 0, 5000)[0]["s2"]
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "tile.tif"
        profile = {"driver": "GTiff", "count": 13, "dtype": "uint16", "width": 64, "height": 64}
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(tile)
        maps = Path(work) / "maps"
        subprocess.run(["rsdino", "attention", run, str(path), "--out", str(maps)], check=True)
        images = [Image.open(maps / name).convert("RGB") for name in PANELS]
    width, height = images[0].size
    sheet = Image.new("RGB", (width * len(images) + 8 * (len(images) - 1), height), "white")
    for i, image in enumerate(images):
        sheet.paste(image, (i * (width + 8), 0))
    sheet.save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1])
