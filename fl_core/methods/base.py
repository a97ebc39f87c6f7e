"""The interface a federated method plugs into the engine with.

The engine owns the loop (sampling, checkpointing, evaluation, records); a method overrides only
the hooks it needs. The defaults are FedAvg.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from tqdm import tqdm

from fl_core.fl.aggregate import weighted_average
from fl_core.fl.local import LocalStats, SGDSettings, local_sgd
from fl_core.fl.vectorized import train_clients_vectorized
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


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights and buffers, detached copies (what a client uploads)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Method:
    """FedAvg; subclasses change single hooks."""

    name = "fedavg"
    prox_mu = 0.0
    default_arch: str | None = None  # the student this method needs when model.arch is 'auto'

    @staticmethod
    def projection_dim(cfg) -> int | None:
        """Width of a linear layer between features and classifier, if the method needs one."""
        return None

    def sgd_settings(self, cfg) -> SGDSettings:
        """The clients' local SGD: ``cfg.fl`` with this method's proximal weight."""
        return SGDSettings.from_config(cfg.fl, self.prox_mu)

    def setup(self, engine: "Engine") -> None:
        """Before the first round of a fresh run (not on resume): e.g. server-side pretraining."""

    def train_clients(self, engine: "Engine", client_ids: list[int], generators: list[torch.Generator]) -> list[ClientResult]:
        """Local training of the round's sampled clients: one after another, or all at once when
        the engine trains clients vectorized (same results within float tolerance)."""
        if engine.vectorized:
            return self.train_together(engine, client_ids, generators)
        return [self.client_update(engine, k, g) for k, g in
                zip(tqdm(client_ids, desc="clients", leave=False, disable=not engine.progress), generators)]

    def client_update(self, engine: "Engine", client_id: int, generator: torch.Generator) -> ClientResult:
        """Local training of one sampled client, starting from the global model."""
        model = engine.worker_model()
        extra = self._extra_loss(self.client_targets(engine, client_id))
        stats = local_sgd(model, engine.data.clients[client_id], engine.data.pipeline, generator,
                          self.sgd_settings(engine.cfg), extra_loss=extra)
        return self.client_result(engine, client_id, state_copy(model), stats)

    def train_together(self, engine: "Engine", client_ids: list[int], generators: list[torch.Generator]) -> list[ClientResult]:
        """``client_update`` of every client in ``client_ids`` at once (``train_clients_vectorized``)."""
        targets = [self.client_targets(engine, k) for k in client_ids]
        every = None if targets[0] is None else torch.cat(targets)  # indexed like the clients' images, concatenated
        outcomes = train_clients_vectorized(engine.model, [engine.data.clients[k] for k in client_ids],
                                            engine.data.pipeline, generators, self.sgd_settings(engine.cfg),
                                            self._extra_loss(every), **engine.stacked_execution)
        return [self.client_result(engine, k, state, stats) for k, (state, stats) in zip(client_ids, outcomes)]

    def client_targets(self, engine: "Engine", client_id: int) -> torch.Tensor | None:
        """Per-image targets of the client's extra training term (e.g. a teacher's logits of each of
        its images), or None when it trains on cross-entropy alone."""
        return None

    def client_extra_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The client's extra training term on a batch's logits ``(..., batch, classes)`` and the
        batch's ``client_targets``; one value per leading index (a scalar for one client)."""
        raise NotImplementedError(f"{type(self).__name__} has client_targets but no client_extra_loss")

    def _extra_loss(self, targets: torch.Tensor | None):
        """The training loops' ``extra_loss(logits, indices)`` reading ``targets`` at the batch's images."""
        if targets is None:
            return None
        return lambda logits, idx: self.client_extra_loss(logits, targets[idx])

    def client_result(self, engine: "Engine", client_id: int, state: dict[str, torch.Tensor], stats: LocalStats) -> ClientResult:
        """What a plain local-SGD client uploads (its model) and computes (its training steps)."""
        flops = engine.train_flops_per_image * stats.num_samples * engine.cfg.fl.local_epochs
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

    # -- what travels besides the model when clients run elsewhere (fl_core.flower) ---------------
    def client_broadcast(self) -> dict[str, torch.Tensor]:
        """Server state the clients need this round, besides the global model."""
        return {}

    def receive_broadcast(self, state: dict[str, torch.Tensor]) -> None:
        """On a client: take what ``client_broadcast`` sent."""

    def pack_extras(self, extras: dict) -> dict[str, torch.Tensor]:
        """A client's method-specific uploads (``ClientResult.extras``) as named tensors."""
        return {}

    def unpack_extras(self, tensors: dict[str, torch.Tensor]) -> dict:
        """On the server: ``ClientResult.extras`` from ``pack_extras``' tensors."""
        return {}

    def state_dict(self) -> dict:
        """Method state to checkpoint between rounds."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def describe(self) -> dict:
        """Method facts for the run record."""
        return {"name": self.name}
