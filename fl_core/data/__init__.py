"""Data: dataset registry, long tail, partitioners, class groups, on-device augmentation."""

from fl_core.data.augment import ImagePipeline
from fl_core.data.datasets import LOADERS, Dataset, DataNotFoundError, ImageSplit, load_dataset
from fl_core.data.federated import FederatedData, build_federated_data
from fl_core.data.groups import class_groups, count_groups, rank_groups
from fl_core.data.longtail import class_index_lists, long_tail_class_lists, long_tail_counts
from fl_core.data.partition import federated_split
from fl_core.data.webpool import WebPool, load_web_pool

__all__ = [
    "LOADERS",
    "Dataset",
    "DataNotFoundError",
    "FederatedData",
    "ImagePipeline",
    "ImageSplit",
    "WebPool",
    "build_federated_data",
    "class_groups",
    "class_index_lists",
    "count_groups",
    "federated_split",
    "load_dataset",
    "load_web_pool",
    "long_tail_class_lists",
    "long_tail_counts",
    "rank_groups",
]
