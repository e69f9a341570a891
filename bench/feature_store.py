"""What the training feature store costs a click: storing one image's features, reading them back, and a repeat click.

    python bench/feature_store.py [--rounds N] [--dir FOLDER]

A click on an image stores its embedding for training (`training.features.TrainingFeatures.put`: serialised, then
written atomically and not flushed) in the project's MODEL_DIR folder; a repeat click only finds it there. Measured
for SAM ViT's entry (256x64x64 float16, 2 MiB) and SAM 3's (10.1 MiB); beside it, the write alone, unflushed and
flushed to the disk (`write_atomically`'s durable mode: fsync of the file and its folder), which is what a durable
store would add. Medians of N rounds in a temporary folder under FOLDER (TMPDIR by default: put it on MODEL_DIR's
disk).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.cache.embeddings import serialize_embedding  # noqa: E402
from backend.models.base import ImageEmbedding  # noqa: E402
from backend.project_files import ProjectFiles, write_atomically  # noqa: E402
from backend.training.features import TrainingFeatures  # noqa: E402

ENTRIES = {
    "SAM ViT": ImageEmbedding(np.ones((256, 64, 64), np.float16), (768, 1024), (768, 1024)),
    "SAM 3": ImageEmbedding(
        np.ones((256, 72, 72), np.float16),
        (768, 1024),
        (1008, 1008),
        extras={"high_res_0": np.ones((32, 288, 288), np.float16), "high_res_1": np.ones((64, 144, 144), np.float16)},
    ),
}


def median_ms(action, rounds: int) -> float:
    times = []
    for round_ in range(rounds):
        started = time.perf_counter()
        action(round_)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def measure(embedding: ImageEmbedding, rounds: int, under: str | None) -> dict[str, float]:
    """Bytes, and ms for: put of a new image, put of a stored one, get, the write alone unflushed and flushed."""
    with tempfile.TemporaryDirectory(dir=under) as folder:
        store = TrainingFeatures(ProjectFiles(folder, 1), "bench", 1 << 40)
        data = serialize_embedding(embedding)
        written = Path(folder) / "written"
        return {
            "bytes": len(data),
            "put_new": median_ms(lambda n: store.put(f"new{n}", embedding), rounds),
            "put_known": median_ms(lambda n: store.put("new0", embedding), rounds),
            "get": median_ms(lambda n: store.get(f"new{n}"), rounds),
            "write": median_ms(lambda n: write_atomically(written / f"{n}", data, durable=False), rounds),
            "durable": median_ms(lambda n: write_atomically(written / f"d{n}", data), rounds),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--dir", default=None, help="where the temporary folder goes (TMPDIR by default)")
    args = parser.parse_args()
    print(f"load average (1 min) at start: {os.getloadavg()[0]:.2f}; {args.rounds} rounds each; medians in ms")
    print(
        f"{'entry':<8} {'bytes':>11} {'put, new':>9} {'put, known':>11} {'get':>7} {'write':>7} {'flushed':>8}"
        f" {'flushed/put':>12}"
    )
    for name, embedding in ENTRIES.items():
        m = measure(embedding, args.rounds, args.dir)
        print(
            f"{name:<8} {m['bytes']:>11,.0f} {m['put_new']:>9.2f} {m['put_known']:>11.3f} {m['get']:>7.2f}"
            f" {m['write']:>7.2f} {m['durable']:>8.2f} {m['durable'] / m['put_new']:>11.1f}x"
        )
    print(f"load average (1 min) at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
