"""What stages 1 and 2 share: building the backbone for lane forwards, the per-step random
generator and the lane expansion call (both train on lane-expanded batches)."""

from __future__ import annotations

import torch

from fluid.lanes import AttentionBackend, LaneBatch, LaneSchedule, expand_lanes
from fluid.modules.base import FluidModule

SEED_STRIDE = 1_000_003  # separates the step streams of different run seeds
VAL_SEED = 10_007        # validation lanes: the same for every validation run (seed + batch index)


class LaneModule(FluidModule):
    """A :class:`FluidModule` whose steps expand their batch into lanes."""

    def build_backbone(self, flex: bool):
        """The backbone from its spec; ``flex``: flex attention for the expanded lane forward."""
        self.announce_zero3()
        model = self.spec.build_model()
        if flex:
            model.config._attn_implementation = "flex_attention"
        return model

    def step_generator(self, seed: int) -> torch.Generator:
        """The lanes' randomness of this training step: distinct per run seed, step and rank."""
        world = max(1, self.trainer.world_size)
        return torch.Generator().manual_seed(seed * SEED_STRIDE + self.global_step * world + self.global_rank)

    @staticmethod
    def val_generator(batch_idx: int) -> torch.Generator:
        return torch.Generator().manual_seed(VAL_SEED + batch_idx)

    def expand_batch(self, batch: dict, schedule: LaneSchedule, generator: torch.Generator, *, mask_token_id: int,
               noise_token_ids: torch.Tensor, **kwargs) -> LaneBatch:
        """Lane-expand a right-padded batch on the CPU (a per-row loop) and move it to the device."""
        cpu = {k: v.cpu() for k, v in batch.items()}
        lb = expand_lanes(cpu["input_ids"], cpu["labels"], cpu["attention_mask"], schedule,
                          mask_token_id=mask_token_id, noise_token_ids=noise_token_ids,
                          pad_token_id=self.tokenizer.pad_token_id, generator=generator, **kwargs)
        return lb.to(self.device)

    def uses_flex(self, backend: AttentionBackend) -> bool:
        return backend.resolve(self.device) is AttentionBackend.FLEX
