"""Train a small model from a plain script: no ``async`` anywhere.

The script generates a two-class dataset, caches it once in a
``PickledDataset`` file, then trains a logistic regression by stochastic
gradient descent for a few epochs. Batches come from the dataset's blocking
view, ``ds.sync.batches(...)``, which loads the next items in the background;
a blocking ``SideRunner`` prefetches the prepared batches one step further,
so the model update and the batch preparation overlap.

    python examples/train_loop.py --data train.pickle --epochs 2

It prints the mean loss and the accuracy of each epoch, then the accuracy of
the final model on all the data.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mlworkflow_async import Dataset, DictDataset
from mlworkflow_async.sync import PickledDataset, SideRunner

Batch = tuple[np.ndarray, np.ndarray]  # features and labels


def make_dataset(items: int, features: int, separation: float, seed: int) -> DictDataset[int, Any]:
    """Two Gaussian clouds, one per class, ``separation`` apart along a random direction."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=features)
    direction /= np.linalg.norm(direction)
    labels = rng.integers(0, 2, items)
    offsets = np.outer(labels - 0.5, direction) * separation
    x = (rng.normal(size=(items, features)) + offsets).astype(np.float32)
    return DictDataset({i: {"x": x[i], "y": float(labels[i])} for i in range(items)})


class LogisticRegression:
    """``p(y=1 | x) = sigmoid(x @ w + b)``, trained by plain SGD on the log loss."""

    def __init__(self, features: int) -> None:
        self.w = np.zeros(features)
        self.b = 0.0

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        z: np.ndarray = x @ self.w + self.b
        p: np.ndarray = 1 / (1 + np.exp(-z))
        return p

    def step(self, x: np.ndarray, y: np.ndarray, learning_rate: float) -> tuple[float, int]:
        """One gradient step on a batch; returns its loss (before the step) and hits."""
        p = self.probabilities(x)
        eps = 1e-12
        loss = -np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps))
        error = p - y
        self.w -= learning_rate * (x.T @ error) / len(y)
        self.b -= learning_rate * float(error.mean())
        hits = int(np.sum((p > 0.5) == (y > 0.5)))
        return float(loss), hits

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean((self.probabilities(x) > 0.5) == (y > 0.5)))


def prepare(path: Path, items: int, features: int, separation: float, seed: int) -> str:
    """Cache the generated dataset in ``path`` unless it is already there."""
    if path.exists():
        return f"using cached data in {path}"
    start = time.perf_counter()
    # Blocks until the file is complete; it is written atomically.
    PickledDataset.create(make_dataset(items, features, separation, seed), path)
    return f"cached {items} items in {path} in {time.perf_counter() - start:.2f} s"


def train(
    ds: Dataset[int, Any],
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    report: Any = print,
) -> tuple[list[float], float]:
    """Train on ``ds``; return the mean loss of each epoch and the final accuracy."""
    keys = ds.sync.keys.all()
    features = ds.sync.query_item(keys[0])["x"].shape[0]
    model = LogisticRegression(features)
    rng = np.random.default_rng(seed)
    epoch_losses: list[float] = []
    with SideRunner(1) as side_runner:
        for epoch in range(1, epochs + 1):
            order = [keys[i] for i in rng.permutation(len(keys))]

            def batch_generator(order: list[int] = order) -> Iterator[Batch]:
                for _, batch in ds.sync.batches(batch_size, keys=order, drop_incomplete=True):
                    yield batch["x"].astype(np.float64), batch["y"]

            losses, hits, seen = [], 0, 0
            for x, y in side_runner.yield_async(batch_generator, in_advance=2):
                loss, batch_hits = model.step(x, y, learning_rate)
                losses.append(loss)
                hits += batch_hits
                seen += len(y)
            epoch_losses.append(float(np.mean(losses)))
            report(
                f"epoch {epoch}/{epochs}: mean loss {epoch_losses[-1]:.4f} over "
                f"{len(losses)} batches, training accuracy {hits / seen:.1%}"
            )
    everything = ds.sync.query(keys)
    accuracy = model.accuracy(everything["x"].astype(np.float64), everything["y"])
    report(f"final accuracy on all {len(keys)} items: {accuracy:.1%}")
    return epoch_losses, accuracy


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a logistic regression, plain sync code.")
    parser.add_argument(
        "--data", type=Path, default=Path("train_data.pickle"),
        help="the PickledDataset cache; generated if missing",
    )
    parser.add_argument("--items", type=int, default=4096, help="items to generate")
    parser.add_argument("--features", type=int, default=20, help="features per item")
    parser.add_argument(
        "--separation", type=float, default=3.0, help="distance between the two class centres"
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.items, args.features, args.epochs, args.batch_size) < 1:
        parser.error("--items, --features, --epochs and --batch-size must be at least 1")
    if args.batch_size > args.items:
        parser.error(f"--batch-size ({args.batch_size}) is larger than --items ({args.items})")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    print(prepare(args.data, args.items, args.features, args.separation, args.seed))
    with PickledDataset(args.data) as ds:
        train(ds, args.epochs, args.batch_size, args.learning_rate, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
