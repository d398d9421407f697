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


def instantiate(node: DictConfig, key: str, **kwargs):
    """Hydra's ``instantiate``, but an error raised while building keeps one line: the project's
    own :class:`FluidConfigError` as it is, any other one as a FluidConfigError naming ``key``."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    from fluid.utils.errors import FluidConfigError

    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, FluidConfigError):
            raise cause from None
        err = cause if cause is not None else e
        text = str(err).strip().splitlines() or [type(err).__name__]
        raise FluidConfigError(key, f"cannot be built: {text[0]}") from None


def instantiate_dict(node: DictConfig | None, key: str = "callbacks") -> list:
    """The objects of a node of named ``_target_`` entries (``logger``, ``callbacks``)."""
    if not node:
        return []
    return [instantiate(v, f"{key}.{name}") for name, v in node.items() if isinstance(v, DictConfig) and "_target_" in v]
