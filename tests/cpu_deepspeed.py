"""Lightning's DeepSpeed strategy with its CUDA-only checks lifted, for tests: DeepSpeed itself
has a CPU accelerator (gloo), so ZeRO-2/3 partitioning, Lightning's sharded checkpoint and
``fluid.convert`` run for real on CPU. The strategy a user picks (``strategy=deepspeed_zero3``)
is Lightning's own; ``fluid.validate`` refuses it on CPU."""

from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy


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
