"""The federated view of a dataset: each client's images on the training device, plus the
class statistics (train counts, client x class counts, groups) that reporting needs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fl_core.config import ExperimentConfig, dataset_facts
from fl_core.data.augment import ImagePipeline
from fl_core.data.datasets import Dataset, ImageSplit, load_dataset
from fl_core.data.groups import class_groups
from fl_core.data.partition import federated_split


@dataclass
class FederatedData:
    dataset: Dataset  # test (and heldout) splits live on the device; train stays on the host
    clients: list[ImageSplit]  # each client's images and labels, on the device
    client_indices: list[np.ndarray]  # into dataset.train, in the partitioner's order
    pipeline: ImagePipeline

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    @property
    def client_class_counts(self) -> np.ndarray:
        """(clients, classes) image counts."""
        labels = self.dataset.train.labels.numpy()
        return np.stack([np.bincount(labels[i], minlength=self.num_classes) for i in self.client_indices])

    @property
    def train_class_counts(self) -> np.ndarray:
        """Images per class over all clients (the long-tailed training set)."""
        return self.client_class_counts.sum(axis=0)

    def groups(self, many_threshold: int = 100, few_threshold: int = 20) -> dict[str, np.ndarray]:
        return class_groups(self.train_class_counts, many_threshold, few_threshold)

    def summary(self, many_threshold: int = 100, few_threshold: int = 20) -> dict:
        """JSON-ready description for run records."""
        return {
            "dataset": self.dataset.name,
            "class_names": self.dataset.class_names,
            "train_class_counts": self.train_class_counts.tolist(),
            "client_class_counts": self.client_class_counts.tolist(),
            "test_size": len(self.dataset.test),
            "groups": {k: v.tolist() for k, v in self.groups(many_threshold, few_threshold).items()},
        }


def build_federated_data(cfg: ExperimentConfig, device: torch.device | str = "cpu") -> FederatedData:
    """Load the dataset, long-tail and partition it as ``cfg.data`` says, move clients to ``device``."""
    d = cfg.data
    ds = load_dataset(d)
    indices = federated_split(
        ds.train.labels.numpy(),
        num_classes=ds.num_classes,
        imbalance_factor=d.imbalance_factor,
        num_clients=d.num_clients,
        alpha=d.alpha,
        seed=cfg.seed,
        method=d.partition,
        min_client_size=d.min_client_size,
        long_tail=not dataset_facts(d).already_long_tailed,
    )
    empty = [k for k, idx in enumerate(indices) if len(idx) == 0]
    if empty:
        raise ValueError(
            f"the {d.partition} partition left clients {empty} without images (data.num_clients="
            f"{d.num_clients}, data.alpha={d.alpha}); use fewer clients or a larger alpha"
        )
    ds.test = ds.test.to(device)
    if ds.heldout is not None:
        ds.heldout = ds.heldout.to(device)
    pipeline = ImagePipeline(ds.mean, ds.std, ds.crop_padding if d.augment else 0, ds.flip and d.augment,
                             per_batch=d.augment_per == "batch")
    clients = [ds.train.subset(idx).to(device) for idx in indices]
    return FederatedData(dataset=ds, clients=clients, client_indices=indices, pipeline=pipeline)
