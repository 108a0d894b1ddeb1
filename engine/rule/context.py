"""One layer's context held in memory and split as docs/ARCHITECTURE.md section 1 describes, for evaluating methods.

Used by tests and ``bench/scripts/attention_error.py`` to compare every method on the same keys; the
offloaded decode path (storage tiers, key index) composes the same attention functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .attention import dense_attention, group_queries, rc_attention, topk_attention
from .methods import METHODS, Method
from .estimators import build_feature_map
from .feature_maps import EstimatorSpec, FeatureMap
from .learned_maps import LearnedParams
from .retrieval import gather_tokens, group_topk
from .summary import Summary


@dataclass
class LayerContext:
    """Keys and values of one layer: ``k, v: (B, Hkv, N, d)``, split into sink (first ``sink``),
    tail (last ``tail``) and the mid-region between them; a summary of the mid-region."""

    k: torch.Tensor
    v: torch.Tensor
    sink: int
    tail: int
    feature_map: FeatureMap | None
    summary: Summary | None

    @staticmethod
    def build(
        k: torch.Tensor,
        v: torch.Tensor,
        sink: int,
        tail: int,
        spec: EstimatorSpec,
        layer: int = 0,
        chunk: int = 1024,
        summary_dtype: torch.dtype | None = None,
        learned: LearnedParams | None = None,
    ) -> "LayerContext":
        """Split ``k, v: (B, Hkv, N, d)`` and build the mid-region's summary chunk by chunk
        (in float32, or float64 for float64 keys unless ``summary_dtype`` says otherwise);
        ``learned``: the layer's calibrated parameters, for the learned estimator."""
        if summary_dtype is None:
            summary_dtype = torch.float64 if k.dtype == torch.float64 else torch.float32
        b, h, n, d = k.shape
        sink = min(sink, n)
        tail = min(tail, n - sink)
        k_mid = k[:, :, sink : n - tail]
        fmap = build_feature_map(spec, layer, k_mid, h, d, k.device, learned)
        summary = None
        if fmap is not None:
            summary = Summary.empty(b, h, fmap.num_features, d, k.device, summary_dtype)
            for start in range(0, k_mid.shape[2], chunk):
                ks = k_mid[:, :, start : start + chunk]
                summary.fold(fmap.key_logits(ks), v[:, :, sink + start : sink + start + ks.shape[2]])
        return LayerContext(k, v, sink, tail, fmap, summary)

    @property
    def mid_len(self) -> int:
        return self.k.shape[2] - self.sink - self.tail

    def anchors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sink + tail keys and values, ``(B, Hkv, sink + tail, d)`` each."""
        n = self.k.shape[2]
        idx = torch.cat([torch.arange(self.sink), torch.arange(n - self.tail, n)]).to(self.k.device)
        return self.k[:, :, idx], self.v[:, :, idx]

    def mid(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.k.shape[2]
        return self.k[:, :, self.sink : n - self.tail], self.v[:, :, self.sink : n - self.tail]

    def attend(self, q: torch.Tensor, method: Method, count: int = 0, gamma: torch.Tensor | float = 0.0) -> torch.Tensor:
        """Output ``(B, Hq, d)`` of ``method`` for ``q: (B, Hq, d)``, retrieving the ``count``
        mid tokens of largest group score (exact search)."""
        if method == "dense":
            return dense_attention(q, self.k, self.v)
        ka, va = self.anchors()
        k_mid, v_mid = self.mid()
        ids = group_topk(group_queries(q, self.k.shape[1]), k_mid, count if method != "sink-tail" else 0)
        kr, vr = gather_tokens(k_mid, ids), gather_tokens(v_mid, ids)
        if method in ("sink-tail", "topk"):
            return topk_attention(q, ka, va, kr, vr)
        if method == "rc":
            if self.feature_map is None or self.summary is None:
                raise ValueError("method 'rc' needs an estimator: build the context with kind favor or centroid")
            return rc_attention(q, ka, va, kr, vr, self.feature_map, self.summary, gamma=gamma)
        raise ValueError(f"method {method!r} is unknown: use one of {', '.join(METHODS)}")


def attention_entropy(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Normalised entropy H / log N of each query head's dense attention, ``(B, Hq)`` in [0, 1]."""
    qg = group_queries(q, k.shape[1]).to(torch.float64)
    s = torch.matmul(qg, k.to(torch.float64).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    logp = torch.log_softmax(s, dim=-1)
    h = -(logp.exp() * logp).sum(dim=-1) / math.log(max(k.shape[2], 2))
    return h.reshape(q.shape[0], -1)
