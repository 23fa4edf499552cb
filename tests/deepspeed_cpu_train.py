"""llava/train/train.py for the DeepSpeed test's CPU ranks, without DeepSpeed's shared-memory allreduce.

DeepSpeed's CPU accelerator compiles that op (``deepspeed_shm_comm``, two C++ files against torch's headers) with the
system compiler the first time a process group starts in a new environment: 40-85 CPU-s in every fresh CI environment,
while rank 1 waits for rank 0's build. Marked incompatible, the op is not built and the ranks reduce over gloo, as they
reduce over NCCL on GPUs (where the op does not exist). Everything else is train.py's own ``main``.
"""

import deepspeed.ops

deepspeed.ops.__compatible_ops__ = {**deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm": False}

from llava.train.train import main  # noqa: E402 (after the op is marked)

if __name__ == "__main__":
    main()
