"""N-gram drafts: the tokens that followed the most recent earlier occurrence of the text's last
few tokens, looked up in the prompt and the text generated so far (prompt lookup, training-free).

:class:`NgramIndex` keeps, per n-gram size, the end of the latest occurrence of every n-gram that
has a continuation, updated as tokens are committed, so a lookup costs one dict probe per size.
"""

from __future__ import annotations

from typing import Sequence


class NgramIndex:
    """The n-grams of ``n_min..n_max`` tokens of one row's text (prompt + committed tokens)."""

    def __init__(self, tokens: Sequence[int], n_min: int = 1, n_max: int = 3):
        if not 1 <= n_min <= n_max:
            raise ValueError(f"decode.ngram_min/ngram_max: need 1 <= min <= max, got {n_min}, {n_max}")
        self.toks: list[int] = []
        self.sizes = list(range(n_max, n_min - 1, -1))  # longest first
        self.ends: dict[int, dict[tuple, int]] = {n: {} for n in self.sizes}
        self.extend(tokens)

    def __len__(self) -> int:
        return len(self.toks)

    def extend(self, tokens: Sequence[int]) -> None:
        """Append ``tokens``; each n-gram that now has a continuation records where it ends."""
        for t in tokens:
            end = len(self.toks)
            for n, table in self.ends.items():
                if end >= n:
                    table[tuple(self.toks[end - n: end])] = end
            self.toks.append(int(t))

    def lookup(self, nxt: int, k: int) -> tuple[list[int], int]:
        """Up to ``k`` draft tokens to follow ``nxt`` (the exact next token, not yet in the text):
        the continuation of the most recent earlier occurrence of the longest n-gram ending in
        ``nxt`` that has one. Returns ``(tokens, n)`` (``n`` 0: no match)."""
        if k <= 0:
            return [], 0
        for n in self.sizes:
            if n - 1 > len(self.toks):
                continue
            key = tuple(self.toks[len(self.toks) - (n - 1):]) + (int(nxt),) if n > 1 else (int(nxt),)
            end = self.ends[n].get(key)
            last = len(self.toks)
            if last >= n and tuple(self.toks[last - n:]) == key:  # the latest: it is followed by nxt
                end = last
            if end is not None:
                # the continuation may run into the tokens that follow nxt itself: nxt is next
                cont = (self.toks + [int(nxt)])[end: end + k]
                if cont:
                    return cont, n
        return [], 0
