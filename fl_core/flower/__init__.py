"""The same methods as a Flower app (Message API): ``ServerApp`` + ``ClientApp``.

Optional: needs the ``flower`` extra (``pip install -e ".[flower]"``). The app objects for
``flwr run .`` are ``fl_core.flower.app:server_app`` and ``fl_core.flower.app:client_app``.
"""

from fl_core.flower.client import make_client_app
from fl_core.flower.server import PartitionStrategy, make_server_app, run_federation

__all__ = ["PartitionStrategy", "make_client_app", "make_server_app", "run_federation"]
