"""One LightningDataModule for every supervised source (arith, GSM8K, JSONL)."""

from __future__ import annotations

from functools import partial

import lightning as L
from torch.utils.data import DataLoader

from fluid.data.sft import PromptDataset, SFTDataset, collate_prompts, collate_sft


class SFTDataModule(L.LightningDataModule):
    def __init__(self, source, tokenizer, batch_size: int = 32, eval_batch_size: int = 64,
                 max_length: int = 512, num_workers: int = 0, name: str = "data"):
        super().__init__()
        self.name = name
        self.source, self.tokenizer = source, tokenizer
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.max_length, self.num_workers = max_length, num_workers
        self.train_set = self.val_set = self.test_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None and stage in (None, "fit", "validate"):
            self.train_set = SFTDataset(self.source.examples("train"), self.tokenizer, self.max_length)
            self.val_set = SFTDataset(self.source.examples("validation"), self.tokenizer, self.max_length)
        if self.test_set is None and stage in (None, "test", "predict"):
            self.test_set = PromptDataset(self.source.examples("test"), self.tokenizer)

    def _loader(self, ds, batch_size: int, shuffle: bool, collate) -> DataLoader:
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, collate_fn=collate,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, True, partial(collate_sft, pad_id=self.tokenizer.pad_token_id))

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size, False,
                            partial(collate_sft, pad_id=self.tokenizer.pad_token_id))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size, False, collate_prompts)
