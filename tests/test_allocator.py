import os
import platform
import subprocess
import sys

import pytest

from fl_core import allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# A few training steps of a ResNet-8; prints the setting and the minor page faults of the last ten
# (after two to warm up).
CHILD = """
import resource, torch
import torch.nn.functional as F
from fl_core.allocator import keep_freed_memory
from fl_core.models import ResNet8
setting = keep_freed_memory()
torch.manual_seed(0)
model, x, y = ResNet8(10, 1, 0.25), torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
def step():
    F.cross_entropy(model(x)[1], y).backward()
step(), step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(setting, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(malloc: str) -> tuple[str, int]:
    env = {**os.environ, allocator.ENV: malloc, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True).stdout
    setting, faults = out.split()
    return setting, int(faults)


@pytest.mark.skipif(not GLIBC, reason="the setting is glibc's")
def test_kept_memory_is_reused_without_page_faults():
    default_setting, default_faults = page_faults("default")
    kept_setting, kept_faults = page_faults("keep")
    assert (default_setting, kept_setting) == ("default", "keep")
    # glibc's default puts the steps' activations on fresh pages (~7 000 page faults a step here); kept: 0-2 500 in all
    assert default_faults > 5000 and kept_faults < default_faults / 5


def test_unknown_setting_is_refused_naming_the_valid_ones(monkeypatch):
    monkeypatch.setenv(allocator.ENV, "jemalloc")
    with pytest.raises(ValueError, match="FL_CORE_MALLOC='jemalloc' is not one of keep, default"):
        allocator.keep_freed_memory()
