"""The app objects ``flwr run .`` loads (see ``[tool.flwr.app.components]`` in pyproject.toml)."""

from fl_core.flower.client import make_client_app
from fl_core.flower.server import make_server_app

server_app = make_server_app()
client_app = make_client_app()
