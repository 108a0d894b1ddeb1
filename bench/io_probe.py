"""bench-io's probe: what the dense run's decode queries see, and every variant's error on them.

While the engine's ``dense`` variant answers, the probe is called by decode attention with each
layer's queries and the anchors they see.  Per query it records each head's normalised attention
entropy (float64, over the whole context) and, at sampled positions, every variant's attention
output error against dense and (rc) its estimated against true unread mass, with exact search and
the engine's own feature maps and summaries, through the rule's one assembly (``rc_state``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from ..engine.rule.attention import Completion, TokenSet, completion_state, normalize, rc_state
from ..engine.rule.budget import retrieval_count
from .io_analysis import Accumulator
from .variants import Variant


@dataclass
class Probe:
    """Collects what the dense run's queries see (see the module docstring)."""

    variants: list[Variant]
    mids: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: mid keys, values (1, Hkv, n, d) float64
    estimators: dict[str, list]  # estimator -> per layer (feature map, summary)
    sampled: set[int]
    acc: Accumulator
    block: int = 16  # tokens per block of the block selector
    entropy_by_position: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    counter: dict[int, int] = field(default_factory=lambda: defaultdict(int))

    def __call__(self, layer: int, qg: torch.Tensor, anchors: list[TokenSet], q_pos: torch.Tensor) -> None:
        """``qg: (T, Hkv, G, d)``: T query positions; ``anchors``: sink and tail sets with the
        tail's visibility per position ``(T, 1, C)``."""
        sink, tail = anchors
        for i in range(qg.shape[0]):
            seen = tail.valid[i, 0]
            ka = torch.cat([sink.k[0], tail.k[0][:, seen]], dim=1)[None]  # (1, Hkv, A, d)
            va = torch.cat([sink.v[0], tail.v[0][:, seen]], dim=1)[None]
            self._query(layer, qg[i : i + 1], ka, va)

    def _query(self, layer: int, qg: torch.Tensor, ka: torch.Tensor, va: torch.Tensor) -> None:
        t = self.counter[layer]
        self.counter[layer] += 1
        k_mid, v_mid = self.mids[layer]
        q64 = qg.to(torch.float64)
        scale = qg.shape[-1] ** -0.5
        ka, va = ka.to(torch.float64), va.to(torch.float64)
        s_a = torch.matmul(q64, ka.transpose(-1, -2)) * scale  # (1, Hkv, G, A)
        s_m = torch.matmul(q64, k_mid.transpose(-1, -2)) * scale  # (1, Hkv, G, n)
        s = torch.cat([s_a, s_m], dim=-1)
        lse = torch.logsumexp(s, dim=-1)  # (1, Hkv, G)
        logp = s - lse[..., None]
        n_all = s.shape[-1]
        entropy = (-(logp.exp() * logp).sum(dim=-1) / math.log(max(n_all, 2)))[0]  # (Hkv, G)
        self.entropy_by_position[t].append(float(entropy.mean()))
        if t not in self.sampled:
            return
        p = logp.exp()
        o_dense = torch.matmul(p[..., : s_a.shape[-1]], va) + torch.matmul(p[..., s_a.shape[-1] :], v_mid)  # (1, Hkv, G, d)
        n_mid = k_mid.shape[2]
        order = s_m.amax(dim=2).argsort(dim=-1, descending=True)  # group score, best first (1, Hkv, n)
        for v in self.variants:
            if v.method == "dense":
                continue
            count = 0 if v.method == "sink-tail" else retrieval_count(v.budget, n_mid)
            ids, valid = order[..., :count], None
            if v.selector in ("block", "exact-block"):
                exact = ids
                choose = block_ids if v.selector == "block" else exact_block_ids
                ids, valid = choose(q64, k_mid, count, self.block)
                hit = ((ids[..., :, None] == exact[..., None, :]) & valid[..., None]).any(dim=-2)  # (1, Hkv, count)
                self.acc.add_recall(v.key, float(hit.double().mean()) if count else 1.0)
            # Retrieved keys in the model's dtype: the maps see the features the summary was built from.
            kr = torch.gather(k_mid, 2, ids[..., None].expand(*ids.shape, k_mid.shape[-1])).to(qg.dtype)
            vr = torch.gather(v_mid, 2, ids[..., None].expand(*ids.shape, v_mid.shape[-1]))
            read = torch.zeros(s_m.shape[:2] + s_m.shape[3:], dtype=torch.int64, device=s_m.device)  # (1, Hkv, n)
            read.scatter_reduce_(-1, ids, torch.ones_like(ids) if valid is None else valid.long(), "amax")
            unread = (read == 0)[:, :, None, :]  # (1, Hkv, 1, n)
            true_u = torch.logsumexp(s_m.masked_fill(~unread, -math.inf), dim=-1)  # (1, Hkv, G) log unread mass
            ratio, completion = None, None
            if v.method == "rc":
                fmap, summary = self.estimators[v.estimator][layer]
                completion = Completion(fmap, summary)
                est = completion_state(fmap.query_logits(q64), summary, fmap.key_logits(kr), vr, valid)
                est_u = torch.log(est.den.to(torch.float64)) + est.m.to(torch.float64)  # -inf where dropped
                ratio = (est_u - true_u)[0]
            o = normalize(rc_state(q64, [TokenSet(ka, va)], scale, TokenSet(kr, vr, valid), completion))
            err = (torch.linalg.vector_norm(o - o_dense, dim=-1) / torch.linalg.vector_norm(o_dense, dim=-1).clamp_min(1e-30))[0]
            self.acc.add_heads(v.key, layer, entropy, err, torch.exp(true_u - lse)[0], ratio)


def block_ids(qg: torch.Tensor, k_mid: torch.Tensor, count: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The block selector's choice in float64: the ceil(count / block) blocks of ``block`` tokens
    with the largest bound ``max_g sum_i max(q_i hi_i, q_i lo_i)`` -> their token ids and which are
    real (a partial last block), ``(1, Hkv, R)`` each, for ``qg: (1, Hkv, G, d)`` and the mid keys
    ``k_mid: (1, Hkv, n, d)``."""
    n = k_mid.shape[2]
    blocks = math.ceil(n / block)
    pad = blocks * block - n
    fill = lambda x: k_mid.new_full((*k_mid.shape[:2], pad, k_mid.shape[3]), x)  # noqa: E731
    hi = torch.cat([k_mid, fill(-math.inf)], 2).view(*k_mid.shape[:2], blocks, block, -1).amax(3)
    lo = torch.cat([k_mid, fill(math.inf)], 2).view(*k_mid.shape[:2], blocks, block, -1).amin(3)
    bound = (torch.matmul(qg.clamp_min(0), hi.transpose(-1, -2)) + torch.matmul(qg.clamp_max(0), lo.transpose(-1, -2))).amax(2)
    chosen = bound.topk(min(math.ceil(count / block), blocks), dim=-1).indices
    ids = (chosen[..., None] * block + torch.arange(block, device=k_mid.device)).flatten(-2)
    return ids.clamp(max=max(n - 1, 0)), ids < n


def exact_block_ids(qg: torch.Tensor, k_mid: torch.Tensor, count: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact-block selector's choice in float64: the ceil(count / block) blocks whose best
    token (``max_g q.k``) scores highest -> their token ids and which are real, ``(1, Hkv, R)``."""
    n = k_mid.shape[2]
    blocks = math.ceil(n / block)
    s = torch.matmul(qg, k_mid.transpose(-1, -2)).amax(2)  # (1, Hkv, n)
    s = torch.nn.functional.pad(s, (0, blocks * block - n), value=-math.inf).view(*s.shape[:2], blocks, block).amax(-1)
    chosen = s.topk(min(math.ceil(count / block), blocks), dim=-1).indices
    ids = (chosen[..., None] * block + torch.arange(block, device=k_mid.device)).flatten(-2)
    return ids.clamp(max=max(n - 1, 0)), ids < n
