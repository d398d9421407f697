"""Data: sources (text only) and the Lightning data module. The module is imported on first use, so
that evaluation and decoding, which read only the sources, do not import Lightning (seconds)."""

from fluid.data.sources import ArithSource, GSM8KSource, JsonlSource

__all__ = ["SFTDataModule", "ArithSource", "GSM8KSource", "JsonlSource"]


def __getattr__(name: str):
    if name == "SFTDataModule":
        from fluid.data.datamodule import SFTDataModule

        return SFTDataModule
    raise AttributeError(f"module 'fluid.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
