"""fl_core: MLLM-assisted federated learning on long-tailed data, and its baselines."""

import warnings as _warnings

from tqdm import TqdmWarning as _TqdmWarning

__version__ = "0.1.0"

# timm, open_clip, transformers and sentence-transformers import tqdm.auto, which in a Jupyter kernel
# without ipywidgets warns "IProgress not found" into whichever notebook cell first loads one of them:
# which cell that is depends on what the caches already hold, so nbval's comparison would too. Their
# progress bars fall back to text (fl_core's own are text), so import it once, quietly.
with _warnings.catch_warnings():
    _warnings.filterwarnings("ignore", message="IProgress not found", category=_TqdmWarning)
    import tqdm.auto as _tqdm_auto  # noqa: E402,F401
