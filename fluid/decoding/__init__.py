"""Decoding: the FLUID loop (:mod:`.fluid`, rules in :mod:`.window`), greedy AR (:mod:`.ar`), the
published-loop baseline (:mod:`.published`), horizon sources (:mod:`.horizon`), the batched
state (:mod:`.state`), the settings (:mod:`.config`) and the driver (:mod:`.decoder`)."""

from fluid.decoding.config import DecodeConfig
from fluid.decoding.decoder import FluidDecoder
from fluid.decoding.state import RowStats

__all__ = ["DecodeConfig", "FluidDecoder", "RowStats"]
