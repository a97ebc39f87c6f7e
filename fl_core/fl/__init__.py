"""The federated engine: client sampling, local update, aggregation, round hooks, checkpoints."""

from fl_core.fl.aggregate import weighted_average
from fl_core.fl.engine import Engine, RunDirectoryConflict, resolve_device
from fl_core.fl.local import LocalStats, SGDSettings, local_sgd, plan_client_steps
from fl_core.fl.sampling import client_generator, client_schedule
from fl_core.fl.vectorized import train_clients_vectorized

__all__ = [
    "Engine",
    "LocalStats",
    "RunDirectoryConflict",
    "SGDSettings",
    "client_generator",
    "client_schedule",
    "local_sgd",
    "plan_client_steps",
    "resolve_device",
    "train_clients_vectorized",
    "weighted_average",
]
