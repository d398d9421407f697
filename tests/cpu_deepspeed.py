"""Lightning's DeepSpeed strategy with its CUDA-only checks lifted, for tests: DeepSpeed itself
has a CPU accelerator (gloo), so ZeRO-2/3 partitioning, Lightning's sharded checkpoint and
``fluid.convert`` run for real on CPU. The strategy a user picks (``strategy=deepspeed_zero3``)
is Lightning's own; ``fluid.validate`` refuses it on CPU."""

import importlib

from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

# DeepSpeed's CPU backend compiles a shared-memory all-reduce op (about 40 s of C++ on a fresh
# machine) when it starts; it only speeds up several processes on one node, and these runs are one
importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # (`deepspeed.comm.torch` the
# attribute is the torch package itself)


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # skip DeepSpeedStrategy's "CUDA GPUs only" check

    def setup_distributed(self) -> None:  # without the CUDA device-index check
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self):
        import torch

        return torch.device("cpu", self.local_rank)  # DeepSpeed's engine wants a device index
