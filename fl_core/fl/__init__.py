"""The federated engine: client sampling, local update, aggregation, round hooks, checkpoints."""

from fl_core.fl.aggregate import weighted_average
from fl_core.fl.engine import Engine, RunDirectoryConflict, resolve_device
from fl_core.fl.local import LocalStats, SGDSettings, client_batches, local_sgd
from fl_core.fl.sampling import client_generator, client_schedule
from fl_core.fl.vectorized import train_clients_vectorized

__all__ = [
    "Engine",
    "LocalStats",
    "RunDirectoryConflict",
    "SGDSettings",
    "client_batches",
    "client_generator",
    "client_schedule",
    "local_sgd",
    "resolve_device",
    "train_clients_vectorized",
    "weighted_average",
]
