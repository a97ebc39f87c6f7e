"""The ClientApp: a SuperNode trains its partition (``node_config['partition-id']``) with the same
local-update function as the in-process engine, from the config the server sends."""

from __future__ import annotations

import json

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_core.config import config_from_dict
from fl_core.fl.sampling import client_generator
from fl_core.parallel import cpu_threads

CONFIG_KEY = "fl-core-config"  # the full experiment config, as JSON, in every train message
_engines: dict[str, object] = {}  # one client-side engine per config in this process


def client_engine(cfg):
    """Data, model and method of ``cfg`` for local training (built once per process and config)."""
    from fl_core.data.federated import build_federated_data
    from fl_core.fl.engine import Engine, resolve_device
    from fl_core.methods import make_method

    key = cfg.fingerprint()
    if key not in _engines:
        device = resolve_device(cfg.device)
        _engines.clear()
        _engines[key] = Engine(cfg, make_method(cfg), build_federated_data(cfg, device), "unused", device, progress=False)
    return _engines[key]


def partition_id(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise ValueError("this SuperNode has no partition-id: start it with --node-config 'partition-id=K num-partitions=N'")
    return int(context.node_config["partition-id"])


def make_client_app() -> ClientApp:
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """Which partition this node holds (the server samples clients by partition id)."""
        return Message(RecordDict({"partition": MetricRecord({"partition-id": partition_id(context)})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        config = msg.content["config"]
        cfg = config_from_dict(json.loads(config[CONFIG_KEY]))
        k, round_idx = partition_id(context), int(config["server-round"])
        with cpu_threads(cfg.cpu_threads):
            engine = client_engine(cfg)
            engine.model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
            if "broadcast" in msg.content:
                engine.method.receive_broadcast(tensors_to(msg.content["broadcast"].to_torch_state_dict(), engine.device))
            result = engine.method.client_update(engine, k, client_generator(cfg.seed, round_idx, k))
        metrics = MetricRecord({"num-examples": result.num_samples, "partition-id": k, "train-loss": result.mean_loss,
                                "upload-bytes": result.upload_bytes, "client-flops": result.flops})
        reply = {"arrays": ArrayRecord(result.state), "metrics": metrics}
        extras = engine.method.pack_extras(result.extras)
        if extras:
            reply["extras"] = ArrayRecord(tensors_to(extras, "cpu"))
        return Message(RecordDict(reply), reply_to=msg)

    return app


def tensors_to(tensors: dict, device) -> dict:
    """``{name: tensor}`` detached and moved to ``device`` (records travel on the CPU)."""
    return {key: t.detach().to(device) for key, t in tensors.items()}
