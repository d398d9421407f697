"""Pretrained backbones (autoregressive LMs) that FLUID adapts."""
