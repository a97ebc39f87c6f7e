"""fl_core: MLLM-assisted federated learning on long-tailed data, and its baselines."""

__version__ = "0.1.0"
