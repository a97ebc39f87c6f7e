"""The ServerApp: the in-process engine's server half driving a Flower federation.

Before ``strategy.start`` the server does the method's setup (MLLM-FL's stage 1, or loads its
cached result) and asks every connected SuperNode which partition it holds. Each round
``PartitionStrategy`` sends the global model (and what the method's ``client_broadcast`` names, e.g.
CReFF's re-trained classifier) to the nodes of the partitions the seeded schedule picks (the
in-process engine's ``RandomState`` stream, not Flower's random node sampling); in
``aggregate_train`` it averages the replies in schedule order through the method (so weights equal
the in-process engine's), with their extra uploads (CReFF's per-class gradients), runs the
method's server work (MLLM-FL's alignment, CReFF's feature learning and re-training), evaluates
centrally and writes the same run record and checkpoint. A client that fails or times out is left out of
that round's average and recorded under ``failed_clients``; the run goes on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fl_core.config import ExperimentConfig, make_config, parse_set_args
from fl_core.flower.client import CONFIG_KEY, tensors_to
from fl_core.methods.base import ClientResult
from fl_core.parallel import cpu_threads
from fl_core.results import RECORD_NAME


class PartitionStrategy(FedAvg):
    """FedAvg messages, our sampling, our aggregation (``engine.complete_round``)."""

    def __init__(self, engine, nodes: dict[int, int], first_round: int):
        super().__init__(fraction_evaluate=0.0, min_available_nodes=0)
        self.engine, self.nodes, self.offset = engine, nodes, first_round - 1
        self.partition_of = {node: k for k, node in nodes.items()}
        self._tic = time.perf_counter()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        r = server_round + self.offset
        self._tic = time.perf_counter()
        round_config = ConfigRecord({**dict(config), "server-round": r})
        record = {"arrays": arrays, "config": round_config}
        broadcast = self.engine.method.client_broadcast()
        if broadcast:  # e.g. CReFF's re-trained classifier, whose gradients the clients compute
            record["broadcast"] = ArrayRecord(tensors_to(broadcast, "cpu"))
        record = RecordDict(record)
        return [Message(record, dst_node_id=self.nodes[k], message_type=MessageType.TRAIN)
                for k in self.engine.clients_of_round(r)]

    def aggregate_train(self, server_round: int, replies):
        r = server_round + self.offset
        sampled = self.engine.clients_of_round(r)
        by_partition, failed = {}, {}
        for reply in replies:
            if reply.has_error():
                failed[self.partition_of.get(reply.metadata.src_node_id)] = f"error {reply.error.code}: {reply.error.reason}"
            else:
                by_partition[int(reply.content["metrics"]["partition-id"])] = reply.content
        failed.update({k: "no reply before the timeout" for k in sampled if k not in by_partition and k not in failed})
        results = [self._client_result(k, by_partition[k]) for k in sampled if k in by_partition]  # schedule order
        entry = self.engine.complete_round(r, results, self._tic, failed)
        metrics = MetricRecord({k: float(entry[k]) for k in ("train_loss", "top1") if k in entry})
        return ArrayRecord(self.engine.model.state_dict()), metrics

    def configure_evaluate(self, server_round, arrays, config, grid):
        return []  # evaluation is central, inside aggregate_train

    def _client_result(self, k: int, content: RecordDict) -> ClientResult:
        m, device = content["metrics"], self.engine.device
        extras = {}
        if "extras" in content:
            extras = self.engine.method.unpack_extras(tensors_to(content["extras"].to_torch_state_dict(), device))
        return ClientResult(k, int(m["num-examples"]), content["arrays"].to_torch_state_dict(), float(m["train-loss"]),
                            int(m["upload-bytes"]), int(m["client-flops"]), extras)


def discover_partitions(grid: Grid, num_clients: int, timeout: float) -> dict[int, int]:
    """``{partition id: node id}`` for partitions ``0..num_clients-1``, waiting up to ``timeout``
    seconds for the SuperNodes to connect."""
    nodes: dict[int, int] = {}
    asked: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(nodes) < num_clients:
        new = [n for n in grid.get_node_ids() if n not in asked]
        if new:
            queries = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in new]
            for reply in grid.send_and_receive(queries, timeout=timeout):
                if not reply.has_error():
                    nodes[int(reply.content["partition"]["partition-id"])] = reply.metadata.src_node_id
            asked.update(new)
        if len(nodes) < num_clients:
            if time.monotonic() > deadline:
                missing = sorted(set(range(num_clients)) - set(nodes))
                raise TimeoutError(f"after {timeout:.0f} s no SuperNode holds partitions {missing} (data.num_clients="
                                   f"{num_clients}); start one per partition with --node-config 'partition-id=K'")
            time.sleep(1.0)
    return nodes


def run_federation(grid: Grid, cfg: ExperimentConfig, run_dir: Path | str | None = None, *,
                   client_timeout: float = 600.0, connect_timeout: float = 120.0) -> dict:
    """Run ``cfg`` over the Flower ``grid``; resumes from ``run_dir``'s checkpoint. Returns the record."""
    from fl_core.data.federated import build_federated_data
    from fl_core.experiment import default_run_dir
    from fl_core.fl.engine import Engine, resolve_device
    from fl_core.methods import make_method

    device = resolve_device(cfg.device)
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    with cpu_threads(cfg.cpu_threads):
        engine = Engine(cfg, make_method(cfg), build_federated_data(cfg, device), run_dir, device, progress=False)
        engine.runner = "flower"
        engine.start()  # stage 1 (cached) on a fresh run, or the checkpoint of an interrupted one
        remaining = cfg.fl.rounds - engine.completed_rounds
        if remaining > 0:
            nodes = discover_partitions(grid, cfg.data.num_clients, connect_timeout)
            strategy = PartitionStrategy(engine, nodes, engine.completed_rounds + 1)
            strategy.start(grid, ArrayRecord(engine.model.state_dict()), num_rounds=remaining, timeout=client_timeout,
                           train_config=ConfigRecord({CONFIG_KEY: json.dumps(cfg.to_dict())}))
        return {**engine.finish(), "_path": str(run_dir / RECORD_NAME)}


def make_server_app(cfg: ExperimentConfig | None = None, run_dir: Path | str | None = None) -> ServerApp:
    """A ServerApp for ``cfg``; without one, it reads ``profile``, ``set`` (space-separated
    ``key=value`` pairs, as the CLI's ``--set`` takes them) and ``run-dir`` from the run config
    (``[tool.flwr.app.config]`` or ``flwr run --run-config``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        rc = context.run_config
        config = cfg or make_config(str(rc.get("profile", "smoke")), parse_set_args(str(rc.get("set", "")).split()))
        where = run_dir or (str(rc["run-dir"]) if rc.get("run-dir") else None)
        record = run_federation(grid, config, where, client_timeout=float(rc.get("client-timeout", 600)))
        print(json.dumps({"top1": record["final"]["top1"], "run_record": record["_path"]}))

    return app
