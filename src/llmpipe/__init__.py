"""llmpipe: a reproducible DVC pipeline for the whole life of a small language model."""

import os

__version__ = "0.1.0"

# transformers >= 5.2x turns hub kernels on by default whenever the `kernels` package is
# installed (it is one of its requirements): on a GPU, loading a model then downloads and runs
# code from the hub, without trust_remote_code, and fails offline (the first GPU check found
# this in finetune's model.eval()). Off by default, like remote code; USE_HUB_KERNELS=YES in
# the environment turns them back on. Here, not in each loader, because TRL loads GRPO's
# reference model itself.
os.environ.setdefault("USE_HUB_KERNELS", "NO")
