"""The interface a federated method plugs into the engine with.

The engine owns the loop (sampling, checkpointing, evaluation, records); a method overrides only
the hooks it needs. The defaults are FedAvg.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from fl_core.fl.aggregate import weighted_average
from fl_core.fl.local import local_sgd
from fl_core.metrics import tensor_bytes

if TYPE_CHECKING:
    from fl_core.fl.engine import Engine


@dataclass
class ClientResult:
    client_id: int
    num_samples: int
    state: dict[str, torch.Tensor]  # the uploaded model
    mean_loss: float
    upload_bytes: int  # everything the client sends this round
    flops: int = 0  # the client's local compute this round (training, and any teacher it runs)
    extras: dict = field(default_factory=dict)  # method-specific uploads


class Method:
    """FedAvg; subclasses change single hooks."""

    name = "fedavg"
    prox_mu = 0.0
    default_arch: str | None = None  # the student this method needs when model.arch is 'auto'

    @staticmethod
    def projection_dim(cfg) -> int | None:
        """Width of a linear layer between features and classifier, if the method needs one."""
        return None

    def setup(self, engine: "Engine") -> None:
        """Before the first round of a fresh run (not on resume): e.g. server-side pretraining."""

    def client_update(self, engine: "Engine", client_id: int, generator: torch.Generator) -> ClientResult:
        """Local training of one sampled client, starting from the global model."""
        model = engine.worker_model()
        f = engine.cfg.fl
        stats = local_sgd(
            model,
            engine.data.clients[client_id],
            engine.data.pipeline,
            generator,
            epochs=f.local_epochs,
            batch_size=f.batch_size,
            lr=f.lr,
            momentum=f.momentum,
            weight_decay=f.weight_decay,
            prox_mu=self.prox_mu,
        )
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        flops = engine.train_flops_per_image * stats.num_samples * f.local_epochs
        return ClientResult(client_id, stats.num_samples, state, stats.mean_loss, tensor_bytes(state), flops)

    def aggregate(self, engine: "Engine", results: list[ClientResult]) -> None:
        """Sample-count weighted FedAvg into the global model."""
        engine.model.load_state_dict(
            weighted_average([r.state for r in results], [r.num_samples for r in results])
        )

    def after_aggregation(self, engine: "Engine", round_idx: int) -> dict:
        """Server work after aggregation (alignment, classifier re-training); returns round info."""
        return {}

    def evaluation_model(self, engine: "Engine") -> nn.Module:
        """The model that is evaluated this round."""
        return engine.model

    def state_dict(self) -> dict:
        """Method state to checkpoint between rounds."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def describe(self) -> dict:
        """Method facts for the run record."""
        return {"name": self.name}
