from fluid.data.datamodule import SFTDataModule
from fluid.data.sources import ArithSource, GSM8KSource, JsonlSource

__all__ = ["SFTDataModule", "ArithSource", "GSM8KSource", "JsonlSource"]
