"""Federated methods, each a small object plugging into the engine's hooks."""

from fl_core.config import ExperimentConfig
from fl_core.methods.base import ClientResult, Method
from fl_core.methods.clip2fl import CLIP2FL
from fl_core.methods.creff import CReFF
from fl_core.methods.fedavg import FedAvg, FedProx
from fl_core.methods.mllm_fl import MLLMFL

METHODS = {
    "fedavg": lambda cfg: FedAvg(),
    "fedprox": lambda cfg: FedProx(cfg.method.prox_mu),
    "creff": CReFF,
    "clip2fl": CLIP2FL,
    "mllm_fl": MLLMFL,
}


def make_method(cfg: ExperimentConfig) -> Method:
    """The method named by ``cfg.method.name``."""
    if cfg.method.name not in METHODS:
        raise ValueError(f"method.name={cfg.method.name!r} is not known; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[cfg.method.name](cfg)


__all__ = ["CLIP2FL", "METHODS", "CReFF", "ClientResult", "FedAvg", "FedProx", "MLLMFL", "Method", "make_method"]
