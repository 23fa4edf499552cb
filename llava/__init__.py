"""LLaVA fork with dynamic long-tail visual token pruning and heavy-hitter KV eviction."""

import os

from llava._version_check import check_transformers

if os.environ.get("LLAVA_SKIP_VERSION_CHECK") != "1":
    check_transformers()
