"""Stage 2 (docs/method.md section 4): the K-head and its targets."""

from fluid.khead.head import KHead
from fluid.khead.targets import k_star, kl_to_soft_labels, lane_slot_losses, soft_labels

__all__ = ["KHead", "k_star", "soft_labels", "kl_to_soft_labels", "lane_slot_losses"]
