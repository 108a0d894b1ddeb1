"""Budget accounting (docs/ARCHITECTURE.md, section 2): how many mid tokens a budget buys, and what a summary costs.

A token costs ``2 d bytes_kv`` per KV head per layer (key + value).  A summary of r features costs
``r (d + 2) bytes_s`` (plus any per-sequence state of its map, such as centroids), i.e.
``T_phi`` token-equivalents.  Two accountings are reported:

- matched exact support: the summary is held on the device and not charged; Top-K+phi reads K.
- matched bytes: the summary is charged; Top-K+phi reads K' = K - ceil(T_phi) (never below 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Accounting = Literal["support", "bytes"]


def retrieval_count(budget: float, mid_len: int) -> int:
    """K = ceil(b |M|), at most |M|.  ``budget`` is a fraction in [0, 1]."""
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"budget must be a fraction in [0, 1], got {budget}")
    # Round before ceil so that 0.01 * 300 = 3.0000000000000004 does not become 4.
    return min(mid_len, math.ceil(round(budget * mid_len, 9)))


@dataclass(frozen=True, slots=True)
class TokenCost:
    """Bytes per token per KV head and the summary's bytes per KV head."""

    head_dim: int
    kv_bytes: int  # bytes per stored element of K and V (2 for bf16 / fp16)
    summary_bytes: int  # per (sequence, KV head), map state included

    @property
    def token_bytes(self) -> int:
        return 2 * self.head_dim * self.kv_bytes

    @property
    def summary_tokens(self) -> float:
        """T_phi: the summary's size in token-equivalents."""
        return self.summary_bytes / self.token_bytes

    def retrieved(self, budget: float, mid_len: int, accounting: Accounting) -> int:
        """Tokens Top-K+phi retrieves at ``budget`` under ``accounting``."""
        k = retrieval_count(budget, mid_len)
        if accounting == "support":
            return k
        if accounting == "bytes":
            return max(0, k - math.ceil(self.summary_tokens))
        raise ValueError(f"accounting must be 'support' or 'bytes', got {accounting!r}")
