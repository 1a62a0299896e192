"""Task data: load a text-classification dataset, partition it across clients."""

from fedlora.data.partition import client_split, partition_indices
from fedlora.data.sources import TaskData, load_task_data

__all__ = ["TaskData", "load_task_data", "partition_indices", "client_split"]
