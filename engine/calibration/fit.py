"""Calibrating the learned completion maps by distillation on the model's own activations.

For each calibration text the model runs once with stock attention while :func:`capturing` hands
over every layer's post-RoPE queries, keys and values.  The last ``queries`` positions of a text
play the decode queries: sink and tail anchors, the mid-region before them, exact Top-K by the
group's best score at budgets b/2, b, 2b and 4b (decode's partition, budget and subtraction), and
the exact attention as the target.  Per layer (layers are independent):

1. ``U``: the top ``directions`` eigenvectors of the group's query second moment (every position
   of every text);
2. centroids and spreads of each text's mid keys, as the map fits them at prefill;
3. ``tau`` and ``gamma`` by Adam on the merged output's relative error plus a log-mass term that
   is symmetric in the log (bench-io measured the 1.5x over-weight leaving a -0.17 bias), from tau = gamma = 0 (the
   centroid map); a query head whose final loss is not below the centroid map's keeps it.

Shapes: texts' captures per layer ``q: (Hq, T, d)``, ``k, v: (Hkv, T, d)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from ...storage import fingerprint_digest
from ..hf.integration import capturing
from ..hf.loader import LoadedModel
from ..progress import progress
from ..rule.budget import retrieval_count
from ..rule.feature_maps import CentroidFeatures
from ..rule.learned_maps import LearnedParams, cluster_spreads, query_terms
from .maps_file import LearnedMaps, model_identity

OVER_WEIGHT = 1.0  # an over-estimate of the unread mass costs as much as an under-estimate (the target is an unbiased estimate)
MASS_CLAMP = 30.0  # bound on a cluster's log-feature relative to the exact part's log-scale (training only)


@dataclass(frozen=True, slots=True)
class CalibrationConfig:
    """``budget``: the decode budget calibrated for (b/2 .. 4b are sampled); ``features``: clusters
    per KV head; ``directions``: learned query directions p; ``queries``: calibration queries per
    text (its last positions); ``max_tokens``: texts are cut to this many tokens."""

    budget: float = 0.01
    features: int = 64
    directions: int = 4
    sink: int = 4
    tail: int = 64
    queries: int = 128
    steps: int = 150
    lr: float = 0.05
    mass_weight: float = 1.0
    kmeans_iters: int = 10
    seed: int = 0
    max_tokens: int = 16384

    def __post_init__(self) -> None:
        if not 0.0 < self.budget <= 0.25:
            raise ValueError(f"budget must be a fraction in (0, 0.25], got {self.budget}")
        if self.features < 1 or self.directions < 0 or self.queries < 1 or self.steps < 0:
            raise ValueError("features and queries must be >= 1, directions and steps >= 0")


@dataclass
class _Item:
    """One (text, budget) of a layer, everything the loss needs, relative to the exact part's
    log-scale: ``base (Hkv, G, Q, C)`` q.c/sqrt(d) - m, ``z (Hkv, G, Q, C, p+1)`` the mass
    terms before tau, ``qsq (Hkv, G, Q)`` |q|^2 / (2d), ``cnt (Hkv, Q, C)`` unread tokens per cluster, ``vsum (Hkv, Q, C, d)`` their
    value sums, ``num_e (Hkv, G, Q, d)`` / ``den_e (Hkv, G, Q)`` the exact part, ``out (Hkv, G, Q,
    d)`` dense attention, ``den_u (Hkv, G, Q)`` the true unread mass."""

    base: torch.Tensor
    z: torch.Tensor
    qsq: torch.Tensor
    cnt: torch.Tensor
    vsum: torch.Tensor
    num_e: torch.Tensor
    den_e: torch.Tensor
    out: torch.Tensor
    den_u: torch.Tensor


def capture_layers(lm: LoadedModel, ids: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Run the model once over ``ids`` with stock attention -> per layer (q, k, v), post-RoPE, on the
    model's device in its dtype: ``q: (Hq, T, d)``, ``k, v: (Hkv, T, d)``."""
    caps: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def sink(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        caps[layer] = (q[0].detach(), k[0].detach(), v[0].detach())

    x = torch.tensor([list(ids)], device=lm.device)
    with torch.no_grad(), capturing(sink):
        lm.model(input_ids=x, use_cache=False, logits_to_keep=1)
    return [caps[i] for i in sorted(caps)]


def _items(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, U: torch.Tensor, cfg: CalibrationConfig) -> list[_Item]:
    """The loss inputs of one text for one layer, at every sampled budget."""
    hq, n, d = q.shape
    hkv = k.shape[0]
    g = hq // hkv
    qn = min(cfg.queries, n // 4)
    p0 = n - qn  # first calibration query
    mid = slice(cfg.sink, max(cfg.sink, p0 - cfg.tail))
    k_mid, v_mid = k[:, mid], v[:, mid]
    nm = k_mid.shape[1]
    if nm < 4 * cfg.features or qn < 1:
        return []
    scale = d ** -0.5
    qs = q[:, p0:].reshape(hkv, g, qn, d)
    s = torch.einsum("hgqd,hnd->hgqn", qs, k) * scale
    causal = torch.arange(n, device=q.device)[None, :] <= (p0 + torch.arange(qn, device=q.device))[:, None]  # (Q, n)
    s = s.masked_fill(~causal, -math.inf)
    out = torch.matmul(torch.softmax(s, dim=-1), v[:, None])  # (Hkv, G, Q, d)
    s_mid = s[..., mid]
    fmap = CentroidFeatures.fit(k_mid[None], cfg.features, cfg.kmeans_iters, cfg.seed)
    centroids = fmap.centroids[0]
    cluster = fmap.assign(k_mid[None])[0]  # (Hkv, nm)
    onehot = torch.nn.functional.one_hot(cluster, cfg.features).to(k.dtype)  # (Hkv, nm, C)
    # Per cluster, every mid token's count and value sum; the unread ones' are these less the read ones'.
    cnt_all = onehot.sum(dim=1)  # (Hkv, C)
    vsum_all = torch.einsum("hnc,hnd->hcd", onehot, v_mid)  # (Hkv, C, d)
    spreads = cluster_spreads(k_mid[None], fmap.centroids, U)[0]  # (Hkv, C, p+1)
    zq = query_terms(qs.permute(2, 0, 1, 3), U).permute(1, 2, 0, 3)  # (Hkv, G, Q, p+1)
    z = zq[:, :, :, None, :] * spreads[:, None, None]  # (Hkv, G, Q, C, p+1)
    score_c = torch.einsum("hgqd,hcd->hgqc", qs, centroids) * scale
    qsq = (qs * qs).sum(dim=-1) / (2 * d)
    items = []
    for b in (cfg.budget / 2, cfg.budget, 2 * cfg.budget, 4 * cfg.budget):
        top = s_mid.amax(dim=1).topk(retrieval_count(b, nm), dim=-1).indices  # (Hkv, Q, K)
        read = torch.zeros(hkv, qn, nm, dtype=torch.bool, device=q.device).scatter_(-1, top, True)
        exact = causal[None, None].expand(hkv, g, qn, n).clone()
        exact[..., mid] = read[:, None]
        se = s.masked_fill(~exact, -math.inf)
        m = se.amax(dim=-1)  # (Hkv, G, Q)
        pe = torch.exp(se - m[..., None])
        unread = (~read).to(k.dtype)  # (Hkv, Q, nm)
        den_u = torch.exp(s_mid - m[..., None]).mul(unread[:, None]).sum(dim=-1)
        top_cluster = cluster.gather(1, top.flatten(1)).view_as(top)  # (Hkv, Q, K)
        cnt = cnt_all[:, None].expand(hkv, qn, -1).clone().scatter_add_(
            -1, top_cluster, torch.full(top.shape, -1.0, device=q.device, dtype=k.dtype))
        top_v = v_mid.gather(1, top.flatten(1)[..., None].expand(-1, -1, d)).view(*top.shape, d)  # (Hkv, Q, K, d)
        vsum = vsum_all[:, None].expand(hkv, qn, -1, -1).clone().scatter_add_(
            2, top_cluster[..., None].expand(-1, -1, -1, d), -top_v)  # (Hkv, Q, C, d)
        items.append(_Item(score_c - m[..., None], z, qsq, cnt, vsum, torch.matmul(pe, v[:, None]), pe.sum(dim=-1), out, den_u))
    return items


def _stack(items: list[_Item]) -> list[_Item]:
    """Items of one shape stacked along a new leading dimension (one batch per shape: texts too
    short for ``queries`` calibration queries have fewer), so that a step of the fit is a few
    large operations instead of a few per item (it was launch-bound on the GPU)."""
    groups: dict[tuple, list[_Item]] = {}
    for it in items:
        groups.setdefault(tuple(it.vsum.shape), []).append(it)
    return [_Item(*(torch.stack([getattr(it, f) for it in group]) for f in _Item.__dataclass_fields__)) for group in groups.values()]


def _loss(item: _Item, tau: torch.Tensor, gamma: torch.Tensor, mass_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (loss per query head summed over the item's leading dimensions (Hkv, G), log estimated /
    true unread mass (..., Hkv, G, Q)).  ``item``'s tensors may carry leading (batch) dimensions."""
    offset = gamma[..., :1] + gamma[..., 1:] * item.qsq  # (..., Hkv, G, Q)
    logits = item.base + torch.einsum("...hgqcp,hgp->...hgqc", item.z, tau) + offset[..., None]
    w = torch.exp(logits.clamp(max=MASS_CLAMP))  # (..., Hkv, G, Q, C)
    den_u = torch.einsum("...hgqc,...hqc->...hgq", w, item.cnt)
    num_u = torch.einsum("...hgqc,...hqcd->...hgqd", w, item.vsum)
    o = (item.num_e + num_u) / (item.den_e + den_u)[..., None]
    err = torch.linalg.vector_norm(o - item.out, dim=-1) / torch.linalg.vector_norm(item.out, dim=-1).clamp_min(1e-12)
    ratio = torch.log(den_u.clamp_min(1e-30)) - torch.log(item.den_u.clamp_min(1e-30))
    mass = torch.where(ratio > 0, OVER_WEIGHT * ratio, -ratio) ** 2
    per_head = (err + mass_weight * mass).mean(dim=-1)  # (..., Hkv, G)
    return per_head.reshape(-1, *per_head.shape[-2:]).sum(dim=0), ratio


def _mean_loss(batches: list[_Item], count: int, tau: torch.Tensor, gamma: torch.Tensor, mass_weight: float) -> torch.Tensor:
    """The loss per query head ``(Hkv, G)``, averaged over all ``count`` items."""
    return sum(_loss(b, tau, gamma, mass_weight)[0] for b in batches) / count


def fit_layer(captures: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], cfg: CalibrationConfig) -> tuple[LearnedParams, dict]:
    """One layer's parameters from its captures over the texts (float32 on their device) -> params
    and a report: final and centroid (tau = gamma = 0) loss per query head, mean log mass ratio."""
    q0, k0, _ = captures[0]
    hq, _, d = q0.shape
    hkv = k0.shape[0]
    g = hq // hkv
    p = min(cfg.directions, d - 1)
    dev = q0.device
    moment = torch.zeros(hkv, d, d, device=dev)
    count = 0
    for q, _, _ in captures:
        x = q.float().reshape(hkv, -1, d)
        moment += torch.einsum("hnd,hne->hde", x, x)
        count += x.shape[1]
    _, vecs = torch.linalg.eigh(moment / max(count, 1))
    U = vecs.flip(-1)[..., :p].contiguous()  # (Hkv, d, p): largest first
    items = [it for q, k, v in captures for it in _items(q.float(), k.float(), v.float(), U, cfg)]
    # Start from the centroid map (tau = gamma = 0) and keep it for a head where learning did not help.
    tau = torch.zeros(hkv, g, p + 1, device=dev, requires_grad=True)
    gamma = torch.zeros(hkv, g, 2, device=dev, requires_grad=True)
    if not items:
        raise ValueError(f"the calibration texts are too short: each needs more than {cfg.sink + cfg.tail + 4 * cfg.features} tokens")
    count, batches = len(items), _stack(items)
    del items
    zeros = (torch.zeros_like(tau), torch.zeros_like(gamma))
    with torch.no_grad():
        centroid_loss = _mean_loss(batches, count, *zeros, cfg.mass_weight)
    opt = torch.optim.Adam([tau, gamma], lr=cfg.lr)
    for _ in range(cfg.steps):
        opt.zero_grad()
        _mean_loss(batches, count, tau, gamma, cfg.mass_weight).sum().backward()
        opt.step()
        with torch.no_grad():
            tau.clamp_(min=0.0)
    with torch.no_grad():
        final = _mean_loss(batches, count, tau, gamma, cfg.mass_weight)
        worse = final > centroid_loss  # (Hkv, G)
        tau[worse] = 0.0
        gamma[worse] = 0.0
        final = torch.where(worse, centroid_loss, final)
        ratio = torch.cat([_loss(b, tau, gamma, cfg.mass_weight)[1].flatten() for b in batches])
    report = {"loss": final.tolist(), "centroid_loss": centroid_loss.tolist(), "log_mass_ratio": float(ratio.mean()),
              "heads_kept_centroid": int(worse.sum())}
    return LearnedParams(U.cpu(), tau.detach().cpu(), gamma.detach().cpu()), report


def calibrate(lm: LoadedModel, texts: Sequence[str], cfg: CalibrationConfig, show_progress: bool = True,
              log: Callable[[str], None] | None = None) -> LearnedMaps:
    """Calibrate every layer's learned map of ``lm`` on ``texts`` -> maps (not yet saved)."""
    t0 = time.perf_counter()
    ids = [lm.tokenizer(t)["input_ids"][: min(cfg.max_tokens, lm.max_positions)] for t in texts]
    ids = [x for x in ids if len(x) > cfg.sink + cfg.tail + 4 * cfg.features + 16]
    if not ids:
        raise ValueError(f"no calibration text is long enough: each needs more than {cfg.sink + cfg.tail + 4 * cfg.features + 16} tokens")
    per_text = []
    with progress("capturing activations", len(ids), "texts", show_progress) as advance:
        for x in ids:
            per_text.append(capture_layers(lm, x))
            advance(1)
    _sync(lm.device)
    t_capture = time.perf_counter()
    n_layers = len(per_text[0])
    layers, reports = [], []
    with progress("fitting maps", n_layers, "layers", show_progress) as advance:
        for layer in range(n_layers):
            params, report = fit_layer([caps[layer] for caps in per_text], cfg)
            layers.append(params)
            reports.append(report)
            if log is not None:
                log(f"layer {layer}: loss {sum(map(sum, report['loss'])):.4f} (centroid {sum(map(sum, report['centroid_loss'])):.4f}), "
                    f"log mass ratio {report['log_mass_ratio']:+.3f}")
            advance(1)
    _sync(lm.device)
    t_fit = time.perf_counter()
    fp = lm.fingerprint()
    manifest = {
        "model": {"name": lm.name, "model_type": fp.get("model_type")},
        "model_digest": fingerprint_digest(model_identity(fp)),
        "settings": asdict(cfg),
        "texts": len(ids),
        "tokens": sum(map(len, ids)),
        "seconds": round(time.perf_counter() - t0, 1),
        "capture_seconds": round(t_capture - t0, 2),
        "fit_seconds_per_layer": round((t_fit - t_capture) / n_layers, 3),
        "device": str(lm.device),
        "per_layer": reports,
    }
    return LearnedMaps(layers, manifest)


def _sync(device: torch.device) -> None:
    """Queued device work finished (phase timings on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
