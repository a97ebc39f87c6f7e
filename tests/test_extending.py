"""A method written outside fl_core, the way README's "Adding a method" describes: a ``Method``
subclass that overrides one hook, registered under a new name, runs, checkpoints and resumes like
the built-in ones."""

import pytest
import torch

import fl_core.config
import fl_core.methods
from fl_core import report
from fl_core.experiment import run_experiment
from fl_core.fl import weighted_average
from fl_core.methods import Method

from conftest import Interrupted, final_weights, stable


class FedAvgM(Method):
    """FedAvg with server momentum (Hsu et al., 2019): ``v <- momentum * v + (w - average)``,
    ``w <- w - lr * v`` for the weights; BatchNorm's statistics are averaged as in FedAvg."""

    name = "fedavgm"

    def __init__(self, lr: float, momentum: float):
        self.lr, self.momentum = lr, momentum
        self.velocity: dict[str, torch.Tensor] = {}

    def aggregate(self, engine, results):
        average = weighted_average([r.state for r in results], [r.num_samples for r in results])
        current = engine.model.state_dict()
        for key, _ in engine.model.named_parameters():
            step = current[key] - average[key]
            if key in self.velocity:
                step = self.momentum * self.velocity[key] + step
            self.velocity[key] = step
            average[key] = current[key] - self.lr * step
        engine.model.load_state_dict(average)

    def state_dict(self):  # checkpointed after every round, so that a resumed run goes on with it
        return {"velocity": self.velocity}

    def load_state_dict(self, state):
        self.velocity = state["velocity"]

    def describe(self):
        return {"name": self.name, "server_lr": self.lr, "server_momentum": self.momentum}


@pytest.fixture
def register(monkeypatch):
    """Register FedAvgM with the given settings under 'fedavgm' (the config's names and the factories)."""
    monkeypatch.setattr(fl_core.config, "METHODS", (*fl_core.config.METHODS, "fedavgm"))

    def with_settings(lr: float, momentum: float):
        monkeypatch.setitem(fl_core.methods.METHODS, "fedavgm", lambda cfg: FedAvgM(lr, momentum))

    return with_settings


@pytest.mark.slow
def test_a_method_defined_outside_fl_core_runs_checkpoints_and_resumes(register, tiny_config, tmp_path, monkeypatch):
    fedavg = run_experiment(tiny_config(), tmp_path / "fedavg", progress=False)
    cfg = tiny_config(method__name="fedavgm")

    register(lr=1.0, momentum=0.0)  # w - (w - average): FedAvg, up to rounding
    plain = run_experiment(cfg, tmp_path / "plain", progress=False)
    assert plain["method"] == {"name": "fedavgm", "server_lr": 1.0, "server_momentum": 0.0}
    assert report.method_label(plain) == "fedavgm"  # compare's and the book's tables name it so
    for key, value in final_weights(tmp_path / "fedavg").items():
        torch.testing.assert_close(final_weights(tmp_path / "plain")[key], value, rtol=0, atol=1e-5)
    assert [e["clients"] for e in plain["rounds"]] == [e["clients"] for e in fedavg["rounds"]]

    register(lr=1.0, momentum=0.9)
    reference = run_experiment(cfg, tmp_path / "reference", progress=False)
    moved = max((final_weights(tmp_path / "reference")[k] - v).abs().max().item()
                for k, v in final_weights(tmp_path / "plain").items() if v.is_floating_point())
    assert moved > 1e-3, "server momentum changed nothing"

    aggregate = FedAvgM.aggregate

    def crash_in_round_2(self, engine, results):
        if engine.completed_rounds == 1:
            raise Interrupted  # after round 1's checkpoint, which holds the velocity
        aggregate(self, engine, results)

    monkeypatch.setattr(FedAvgM, "aggregate", crash_in_round_2)
    with pytest.raises(Interrupted):
        run_experiment(cfg, tmp_path / "resumed", progress=False)
    monkeypatch.setattr(FedAvgM, "aggregate", aggregate)
    resumed = run_experiment(cfg, tmp_path / "resumed", progress=False)
    assert resumed["timing"]["resumed_after_rounds"] == [1]
    assert stable(resumed) == stable(reference)


def test_the_config_accepts_exactly_the_methods_that_have_a_factory():
    assert sorted(fl_core.config.METHODS) == sorted(fl_core.methods.METHODS)
