"""Train a small model from a plain script: no ``async`` anywhere.

The script generates a two-class dataset, caches it once in a
``PickledDataset`` file, then trains a logistic regression by stochastic
gradient descent for a few epochs. The cache records the settings that
generated it (``--items``, ``--features``, ``--separation``, ``--seed``) and
is generated again when they change. Batches come from the dataset's blocking
view, ``ds.batches(...)``, which loads the next items in the background;
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

from mlworkflow_async import DictDataset
from mlworkflow_async.exceptions import PickledFileError
from mlworkflow_async.sync import PickledDataset, SideRunner, SyncView

Batch = tuple[np.ndarray, np.ndarray]  # features and labels
#: The context entry of the cache file: the settings its data was generated with.
GENERATED_WITH = "generated_with"


class GeneratedData(DictDataset[int, Any]):
    """The generated items; their ``context`` (stored in the cache) says how they were made."""

    def __init__(self, items: dict[int, Any], settings: dict[str, Any]) -> None:
        super().__init__(items)
        self.context = {GENERATED_WITH: settings}


def data_settings(items: int, features: int, separation: float, seed: int) -> dict[str, Any]:
    """What defines the generated data: equal settings generate equal data."""
    return {"items": items, "features": features, "separation": separation, "seed": seed}


def make_dataset(items: int, features: int, separation: float, seed: int) -> GeneratedData:
    """Two Gaussian clouds, one per class, ``separation`` apart along a random direction."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=features)
    direction /= np.linalg.norm(direction)
    labels = rng.integers(0, 2, items)
    offsets = np.outer(labels - 0.5, direction) * separation
    x = (rng.normal(size=(items, features)) + offsets).astype(np.float32)
    settings = data_settings(items, features, separation, seed)
    return GeneratedData({i: {"x": x[i], "y": float(labels[i])} for i in range(items)}, settings)


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
    """Cache the generated dataset in ``path`` unless it already holds that very data.

    The settings that define the data are stored in the file's context; a
    cache made with other settings (``--items 50`` after a run with the
    default, say) is generated again rather than silently trained on. A file
    at ``path`` that is not a dataset file raises ``FileExistsError``.
    Returns what it did, to print.
    """
    wanted = data_settings(items, features, separation, seed)
    lines = []
    if path.exists():
        found = _generated_with(path)
        if found == wanted:
            return f"using cached data in {path}"
        lines.append(f"rebuilding {path}: {_difference(found, wanted)}")
    start = time.perf_counter()
    dataset = make_dataset(items, features, separation, seed)
    # Blocks until the file is complete; it is written atomically, replacing
    # any stale cache only once the new one is whole.
    PickledDataset.create(dataset, path)
    lines.append(f"cached {items} items in {path} in {time.perf_counter() - start:.2f} s")
    return "\n".join(lines)


def _generated_with(path: Path) -> dict[str, Any] | None:
    """The settings ``path`` was generated with, or None if it does not say."""
    try:
        # Only the context is needed; safe=True loads no class from the file.
        with PickledDataset(path, safe=True) as cached:
            found = cached.context.get(GENERATED_WITH)
    except PickledFileError as exc:
        # Not a cache this script wrote (those are written atomically): it
        # may be someone's data, so it is not overwritten.
        raise FileExistsError(f"{exc}; pass another --data, or remove {path}") from exc
    return found if isinstance(found, dict) else None


def _difference(found: dict[str, Any] | None, wanted: dict[str, Any]) -> str:
    if found is None:
        return "it does not say which data it holds"
    changed = [
        f"{name} {found.get(name)!r} -> {value!r}"
        for name, value in wanted.items()
        if found.get(name) != value
    ]
    return "it holds other data (" + ", ".join(changed) + ")"


def train(
    ds: SyncView[int, Any],
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    report: Any = print,
) -> tuple[list[float], float]:
    """Train on ``ds``; return the mean loss of each epoch and the final accuracy."""
    keys = ds.keys.all()
    features = ds.query_item(keys[0])["x"].shape[0]
    model = LogisticRegression(features)
    rng = np.random.default_rng(seed)
    epoch_losses: list[float] = []
    with SideRunner(1) as side_runner:
        for epoch in range(1, epochs + 1):
            order = [keys[i] for i in rng.permutation(len(keys))]

            def batch_generator(order: list[int] = order) -> Iterator[Batch]:
                for _, batch in ds.batches(batch_size, keys=order, drop_incomplete=True):
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
    everything = ds.query(keys)
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
    try:
        print(prepare(args.data, args.items, args.features, args.separation, args.seed))
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    with PickledDataset(args.data) as ds:
        train(ds, args.epochs, args.batch_size, args.learning_rate, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
