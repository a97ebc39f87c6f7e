"""FedAvg (McMahan et al. 2017) and FedProx (Li et al. 2020)."""

from __future__ import annotations

from fl_core.methods.base import Method


class FedAvg(Method):
    name = "fedavg"


class FedProx(Method):
    """FedAvg whose clients add ``mu/2 * ||w - w_global||^2`` to their loss."""

    name = "fedprox"

    def __init__(self, prox_mu: float):
        self.prox_mu = prox_mu

    def describe(self) -> dict:
        return {"name": self.name, "prox_mu": self.prox_mu}
