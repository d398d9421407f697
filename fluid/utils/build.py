"""Objects from config nodes, for every entry point (``fluid.train``, ``fluid.evaluate``)."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf


def build(node: DictConfig, **objects):
    """Call ``node._target_`` with the node's plain values plus live objects (spec, tokenizer).
    Unlike Hydra's ``instantiate``, an error raised by the target reaches the caller as it is
    (a :class:`~fluid.utils.errors.FluidConfigError` stays one line)."""
    from hydra.utils import get_class

    kwargs = OmegaConf.to_container(node, resolve=True)
    target = get_class(kwargs.pop("_target_"))
    return target(**kwargs, **objects)


def instantiate_dict(node: DictConfig | None) -> list:
    """The objects of a node of named ``_target_`` entries (``logger``, ``callbacks``)."""
    from hydra.utils import instantiate

    if not node:
        return []
    return [instantiate(v) for v in node.values() if isinstance(v, DictConfig) and "_target_" in v]
