"""Make the README's preprocessing example: ``example.jpg`` (a photo-like input with a known
object) and ``before_after.jpg`` (what ``gen3d preprocess`` made of it: the input with the box,
score and mask drawn, beside the centred RGBA result).

    .venv/bin/python assets/preprocess/make_example.py

The input is the shipped toy rendering (assets/toy) on a lit, slightly noisy gradient, the kind
of plain background the embedded ``grabcut`` preprocessor is made for.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_preprocess import make_photo  # the benchmark's composite

from gen3d_plugins.preprocess_stage import load_settings, preprocess_file


def main() -> None:
    rgb, _ = make_photo(800, seed=1)
    example = HERE / "example.jpg"
    Image.fromarray(rgb).save(example, quality=88)
    with tempfile.TemporaryDirectory() as folder:
        preprocess_file(example, load_settings({}), Path(folder))
        overview = Image.open(Path(folder) / "overview.png").convert("RGB")
        overview.save(HERE / "before_after.jpg", quality=85)
    print(f"wrote {example} and {HERE / 'before_after.jpg'}")


if __name__ == "__main__":
    main()
