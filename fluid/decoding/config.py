"""``DecodeConfig``: the decoding settings and the only source of their defaults.

``python -m fluid.generate`` composes it as the ``decode`` node (a structured config registered
with Hydra's ConfigStore), so ``decode.k_max=8`` on the command line is type-checked against it.
"""

from __future__ import annotations

from dataclasses import dataclass

ALGORITHMS = ("fluid", "ar", "published")
HORIZONS = ("head", "fixed", "oracle")
WINDOWS = ("block", "cost")


@dataclass
class DecodeConfig:
    algorithm: str = "fluid"       # fluid | ar (greedy baseline) | published (the reference loop)
    horizon: str = "head"          # head (K-head of a stage-2 checkpoint) | fixed | oracle (analysis)
    fixed_k: int = 8
    k_min: int = 4
    k_max: int = 16
    # draft-fill threshold; None: 0.3 with verification (a wrong draft only ends a block early,
    # an empty slot costs a forward: measured fastest), the method's reference 0.9 without (drafts
    # are then committed as they are)
    confidence: float | None = None
    verify: bool = True
    max_new_tokens: int = 256
    batch_size: int = 16
    share_verify_draft: bool = True  # a fully drafted block carries MASK slots that draft the next block
    lane_len: int | None = None    # how many (None: k_max - 1, enough to draft a whole next block)
    # tokens per forward across the batch (None: no cap): with n active rows a block holds at most
    # max(k_min, token_budget // (2 n)) slots and a lane one fewer. Measured on 2 CPU cores, where
    # batch 16 is compute-bound (uncapped it ran at 0.84x AR); raise it on a GPU. As rows finish
    # the cap widens again.
    token_budget: int | None = 320
    # torch.compile the transformer body (dynamic shapes) for every algorithm alike: faster
    # forwards once compiled (tens of seconds on first use), same tokens
    compile: bool = False
    # block: the method's blocks (a horizon from `horizon`, drafted by lanes) | cost: per row and
    # forward, the drafts and lane slots that maximise expected committed tokens per unit of forward
    # cost (fluid/decoding/costwin.py; `horizon` is not used)
    window: str = "block"
    cost_curve: list[float] | None = None  # window=cost: relative cost of 1, 2, ... tokens (None: measured)
    # n-gram drafts (window=cost): the continuation of the latest earlier occurrence, in the prompt
    # and the text so far, of the last ngram_min..ngram_max tokens; with no MASK token (a plain
    # checkpoint) this is the whole draft source: training-free
    ngram: bool = False
    ngram_min: int = 1
    ngram_max: int = 3
    ngram_draft: int = 10           # at most this many drafted tokens per lookup
    # window=cost: optimism of the lane's depth rates, mean + explore * sqrt(ln t / n) (UCB), so that
    # lanes whose first drafts missed are tried again (a lane is measured only when carried); 0: plain
    # means. 1.0 (UCB1's order): a lane left out after ten straight misses is retried within ~30 row-forwards
    explore: float = 1.0

    @property
    def fill_threshold(self) -> float:
        """The confidence above which a later empty slot takes its draft."""
        if self.confidence is not None:
            return self.confidence
        return 0.3 if self.verify else 0.9

    def caps(self, n_rows: int) -> tuple[int, int]:
        """(largest block, lane length) for a forward over ``n_rows`` rows (``token_budget``)."""
        k_cap = self.k_max
        if self.token_budget is not None:
            k_cap = max(self.k_min, min(self.k_max, self.token_budget // (2 * n_rows)))
        # a lane of k - 1 MASK slots drafts slots 1..k-1 of the next block (slot 0 is exact)
        lane = min(self.lane_len or self.k_max - 1, k_cap - 1) if self.share_verify_draft else 0
        return k_cap, lane

    @property
    def needs_head(self) -> bool:
        """Whether these settings read a K-head (horizon=head in the method's block windows)."""
        return self.algorithm == "fluid" and self.window == "block" and self.horizon == "head"

    @property
    def needs_mask(self) -> bool:
        """Whether these settings need a MASK token (every FLUID setting but n-gram drafting)."""
        return self.algorithm != "ar" and not (self.window == "cost" and self.ngram)

    def validate(self) -> "DecodeConfig":
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"decode.algorithm: unknown {self.algorithm!r} ({' | '.join(ALGORITHMS)})")
        if self.horizon not in HORIZONS:
            raise ValueError(f"decode.horizon: unknown {self.horizon!r} ({' | '.join(HORIZONS)})")
        if self.fixed_k < 1 or (self.horizon == "fixed" and self.fixed_k > self.k_max):
            raise ValueError(f"decode.fixed_k must be in [1, k_max={self.k_max}], got {self.fixed_k} "
                             "(raise decode.k_max for a longer fixed horizon)")
        if not 1 <= self.k_min <= self.k_max:
            raise ValueError(f"decode.k_min/k_max: need 1 <= k_min <= k_max, got {self.k_min}, {self.k_max}")
        if self.confidence is not None and not 0.0 <= self.confidence <= 1.0:
            raise ValueError(f"decode.confidence must be in [0, 1] or null, got {self.confidence}")
        if self.lane_len is not None and (self.lane_len < 0 or (self.lane_len == 0 and self.window != "cost")):
            raise ValueError(f"decode.lane_len must be >= 1 or null (0: no lane, with window=cost), got {self.lane_len}")
        if self.window not in WINDOWS:
            raise ValueError(f"decode.window: unknown {self.window!r} ({' | '.join(WINDOWS)})")
        if self.ngram and self.window != "cost":
            raise ValueError("decode.ngram=true drafts in cost-sized windows: add decode.window=cost")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"decode.ngram_min/ngram_max: need 1 <= min <= max, got {self.ngram_min}, {self.ngram_max}")
        if self.ngram_draft < 1:
            raise ValueError(f"decode.ngram_draft must be >= 1, got {self.ngram_draft}")
        if self.explore < 0:
            raise ValueError(f"decode.explore must be >= 0, got {self.explore}")
        if self.cost_curve is not None and (len(self.cost_curve) < 1 or min(self.cost_curve) <= 0):
            raise ValueError(f"decode.cost_curve must be a list of positive numbers or null, got {self.cost_curve}")
        if self.token_budget is not None and self.token_budget < 2:
            raise ValueError(f"decode.token_budget must be >= 2 or null, got {self.token_budget}")
        if self.max_new_tokens < 1:
            raise ValueError("decode.max_new_tokens must be >= 1")
        if self.batch_size < 1:
            raise ValueError(f"decode.batch_size must be >= 1, got {self.batch_size}")
        return self


def register_decode_config() -> None:
    """Make ``DecodeConfig`` the ``decode`` node's schema and defaults (``decode: default``)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="decode", name="default", node=DecodeConfig)
