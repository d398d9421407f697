"""Stage-1 lanes (docs/method.md sections 1-3): batch expansion and the strictly causal attention rule."""

from fluid.lanes.attention import AttentionBackend, block_mask, dense_allowed, dense_float_mask
from fluid.lanes.expand import LaneBatch, expand_lanes
from fluid.lanes.schedules import FixedSchedule, FluidSchedule, FullLanes, LaneSchedule

__all__ = ["LaneBatch", "expand_lanes", "dense_allowed", "dense_float_mask", "block_mask", "AttentionBackend",
           "LaneSchedule", "FluidSchedule", "FixedSchedule", "FullLanes"]
