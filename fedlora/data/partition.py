"""Split the training set across clients with flwr-datasets partitioners.

``FederatedDataset`` needs the hub, so the partitioners are given the local
``datasets.Dataset`` directly. IID and Dirichlet-by-label (Hsu et al. 2019,
"Measuring the Effects of Non-Identical Data Distribution") are built in, and seeded
replication (``partition=replicate``): every client draws the same number of rows, so a
federation of any size can be built from a packaged set for systems measurements.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner

from fedlora.core.config import seed_for
from fedlora.core.errors import ConfigError

_INDEX = "_row"
REPLICATE = "replicate"
REPLICATE_SALT = 0x5CA1E


def _partitioner(num_partitions: int, cfg: Any) -> Partitioner:
    if cfg.name == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if cfg.name == "dirichlet":
        if float(cfg.alpha) <= 0:
            raise ConfigError("partition.alpha", f"must be > 0, got {cfg.alpha}")
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=float(cfg.alpha),
            min_partition_size=int(cfg.min_partition_size),
            self_balancing=bool(cfg.self_balancing),
            shuffle=True,
            seed=int(cfg.seed),
        )
    raise ConfigError("partition", f"unknown partitioner {cfg.name!r}; choose iid, dirichlet or replicate")


def mean_shard_size(cfg: Any, train_size: int, num_partitions: int) -> int:
    """Rows of the mean client shard (public: the dataset's size, the federation's and
    the partition settings are): ``examples_per_client`` under replication, else the
    training set over the clients."""
    if cfg.name == REPLICATE:
        return int(cfg.examples_per_client)
    return max(1, int(train_size) // max(1, int(num_partitions)))


def replicate_indices(train_size: int, num_partitions: int, rows: int, seed: int) -> list[np.ndarray]:
    """Client i's rows: ``rows`` indices drawn without replacement by its own generator
    (seeded by the partition seed and i), so a client's shard does not depend on the
    federation's size and the draw is the same in every process."""
    if not 1 <= rows <= train_size:
        raise ConfigError("partition.examples_per_client",
                          f"must lie in [1, {train_size}] (the training rows there are), got {rows}")
    return [np.sort(np.random.default_rng(seed_for(seed, pid, REPLICATE_SALT))
                    .choice(train_size, size=rows, replace=False).astype(np.int64))
            for pid in range(num_partitions)]


def partition_indices(train: Dataset, num_partitions: int, cfg: Any) -> list[np.ndarray]:
    """Row indices of the training set held by each client (deterministic in the seed)."""
    if num_partitions < 1:
        raise ConfigError("federation.num_clients", f"must be >= 1, got {num_partitions}")
    if cfg.name == REPLICATE:
        return replicate_indices(len(train), num_partitions, int(cfg.examples_per_client), int(cfg.seed))
    if num_partitions > len(train):
        raise ConfigError(
            "federation.num_clients",
            f"{num_partitions} clients but only {len(train)} training examples; use fewer "
            "clients or more data (data.max_train_samples), or partition=replicate",
        )
    ds = train.select_columns(["label"]).add_column(_INDEX, list(range(len(train))))
    # IidPartitioner cuts contiguous shards: shuffle first, as FederatedDataset does.
    ds = ds.shuffle(seed=int(cfg.seed))
    partitioner = _partitioner(num_partitions, cfg)
    partitioner.dataset = ds
    try:
        parts = [np.sort(np.asarray(partitioner.load_partition(i)[_INDEX], dtype=np.int64))
                 for i in range(num_partitions)]
    except ValueError as err:
        raise ConfigError(
            "partition", f"cannot split {len(train)} examples into {num_partitions} clients: {err}"
        ) from err
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise ConfigError(
            "federation.num_clients",
            f"clients {empty[:5]} get no training example; use fewer clients or a larger "
            "partition.alpha",
        )
    return parts


def client_split(
    indices: np.ndarray, validation_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, validation) split of one client's shard; train keeps >= 1 row."""
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(indices)
    n_val = min(int(round(validation_fraction * len(indices))), len(indices) - 1)
    return np.sort(shuffled[n_val:]), np.sort(shuffled[:n_val])
