"""The seed's first SideRunner example: a batch generator prefetched in the background.

Only the import line differs from the original library's example. The
generator's ``next()`` runs in a worker thread while this loop prints.
"""

import threading

from mlworkflow_async import DictDataset
from mlworkflow_async.sync import SideRunner

dataset = DictDataset({i: {"x": i, "y": i * i} for i in range(10)}).sync
keys = None
threads = set()

side_runner = SideRunner()


def batch_generator(dataset, keys, batch_size):
    for keys, batch in dataset.batches(batch_size=batch_size, drop_incomplete=True):
        threads.add(threading.current_thread() is threading.main_thread())
        yield keys, batch


async_batch_generator = side_runner.yield_async(batch_generator(dataset, keys, 4))
for keys, batch in async_batch_generator:
    print("batch", keys, batch["y"].tolist())

# A function taking no argument that returns the generator is accepted too.
for keys, batch in side_runner.yield_async(lambda: batch_generator(dataset, None, 3)):
    print("batch", keys, batch["y"].tolist())

print("generator ran in the main thread:", sorted(threads))
