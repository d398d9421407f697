"""One LightningDataModule for every supervised source (arith, GSM8K, JSONL)."""

from __future__ import annotations

import logging
from functools import partial

import lightning as L
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from fluid.data.selfdistill import SelfResponses, self_responses
from fluid.data.sft import PromptDataset, SFTDataset, _encoded, collate_prompts, collate_sft, encode_prompt
from fluid.utils.errors import FluidConfigError

RESPONSES = ("gold", "self")

log = logging.getLogger(__name__)


class ResumableSampler(DistributedSampler):
    """A shuffling sampler whose order is a function of (seed, epoch) alone and which starts where
    a resumed run left off, on one device or several.

    ``position()`` gives (epoch, batches this rank has done in the epoch, rank, world size), read
    when iteration starts, after Lightning has restored the loops from ``ckpt_path``. The epoch's
    permutation is padded to a multiple of the world size and dealt out ``rank::world`` (as
    ``DistributedSampler`` does; being one, Lightning does not wrap it again); a rank's list is
    rotated past the batches it already did, so its length stays the same and the restored loop
    ends the epoch at its usual batch count. A run resumed after a kill therefore sees exactly
    the batches an uninterrupted one would have."""

    def __init__(self, n: int, batch_size: int, seed: int, position):  # noqa: D107 - no process group needed
        self.n, self.batch_size, self.seed, self.position = n, batch_size, seed, position

    def _world(self) -> int:
        return max(1, self.position()[3])

    def __len__(self) -> int:
        return -(-self.n // self._world())

    def set_epoch(self, epoch: int) -> None:  # the epoch comes from the trainer itself
        pass

    def __iter__(self):
        epoch, done, rank, world = self.position()
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        per_rank = -(-self.n // world)
        order = (order * (1 + per_rank * world // max(1, self.n)))[: per_rank * world]  # pad as DistributedSampler
        mine = order[rank::world]
        skip = (done * self.batch_size) % max(1, len(mine))
        return iter(mine[skip:] + mine[:skip])


class SFTDataModule(L.LightningDataModule):
    def __init__(self, source, tokenizer, batch_size: int = 32, eval_batch_size: int = 64,
                 max_length: int = 512, num_workers: int = 0, name: str = "data", seed: int = 0,
                 global_batch_size: int | None = None,  # resolved into batch_size by fluid.train
                 responses: str = "gold", self_responses: dict | None = None):
        super().__init__()
        if responses not in RESPONSES:
            raise FluidConfigError("data.responses", f"unknown {responses!r}", f"one of: {' | '.join(RESPONSES)}")
        # gold: the dataset's reference answers; self: the backbone's own greedy responses (selfdistill.py)
        self.responses = responses
        self.self_settings = SelfResponses(**(self_responses or {}))
        self.seed = seed  # the training order: a function of (seed, epoch)
        self.name = name
        self.source, self.tokenizer = source, tokenizer
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.max_length, self.num_workers = max_length, num_workers
        self.train_set = self.val_set = self.test_set = None

    def prepare_data(self) -> None:
        """``responses=self``: generate (or find cached) the greedy responses once, on one process."""
        if self.responses == "self":
            for split in ("train", "validation"):
                self._self_encoded(split, self.source.examples(split))

    def _self_encoded(self, split: str, examples: list[dict]) -> list:
        tok = self.tokenizer
        prompts = [encode_prompt(tok, ex["messages"]) for ex in examples]
        rows = self_responses(self.self_settings, prompts, tok.eos_token_id, tok.pad_token_id,
                              label=f"self-responses ({self.name} {split})")
        kept = [(p, r["response_ids"]) for p, r in zip(prompts, rows)
                if r["finished"] == "eos" or self.self_settings.keep_truncated]
        if rows and not kept:
            raise FluidConfigError("data.self_responses.max_new_tokens", f"all {len(rows)} {split} responses hit "
                                   f"{self.self_settings.max_new_tokens} tokens without EOS",
                                   "raise it, or set data.self_responses.keep_truncated=true")
        if len(kept) < len(rows):
            log.warning("%s %s: dropped %d of %d self-generated responses that hit max_new_tokens=%d without EOS",
                        self.name, split, len(rows) - len(kept), len(rows), self.self_settings.max_new_tokens)
        return [_encoded(tok, p, r) for p, r in kept]

    def _sft(self, split: str) -> SFTDataset:
        examples = self.source.examples(split)
        encoded = self._self_encoded(split, examples) if self.responses == "self" else None
        return SFTDataset(examples, self.tokenizer, self.max_length, encoded=encoded)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None and stage in (None, "fit", "validate"):
            self.train_set = self._sft("train")
            self.val_set = self._sft("validation")
        if self.test_set is None and stage in (None, "test", "predict"):
            self.test_set = PromptDataset(self.source.examples("test"), self.tokenizer)

    def _loader(self, ds, batch_size: int, shuffle: bool, collate) -> DataLoader:
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, collate_fn=collate,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        sampler = ResumableSampler(len(self.train_set), self.batch_size, self.seed, self._position)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler,
                          collate_fn=partial(collate_sft, pad_id=self.tokenizer.pad_token_id),
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def _position(self) -> tuple[int, int, int, int]:
        trainer = self.trainer  # None until a Trainer uses this datamodule
        if trainer is None:
            return 0, 0, 0, 1
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        return trainer.current_epoch, done, trainer.global_rank, max(1, trainer.world_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size, False,
                            partial(collate_sft, pad_id=self.tokenizer.pad_token_id))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size, False, collate_prompts)
