"""A document's state to and from its persisted form (``storage/document_store.py``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from ...storage import ArtifactError, ArtifactWriter, DiskTier, TierLayout
from ...storage.document_store import DocumentMeta, DocumentReader, DocumentWriter
from ..decode.selectors import BlockSelector
from ..decode.state import KVState
from ..rule.estimators import feature_map_from_tensors, feature_map_tensors
from ..rule.summary import Summary


def persist(state: KVState, doc_ids: list[int], writer: ArtifactWriter, fingerprint: dict[str, Any], dtype_name: str,
            lap: Callable[[str], None] | None = None, model_name: str = "") -> None:
    """Write everything a reopened document needs; commit makes it visible (atomically).

    The rows are written once: a prefill to disk has already written them into the artifact's
    store; nothing is read back.  The selection state that is not the keys themselves (block
    bounds, centroid ids) is saved beside them, so that reopening reads it instead of the keys."""
    cfg = state.config
    layers, heads = state.num_layers, state.num_kv_heads
    tier = state.tier
    if isinstance(tier, DiskTier) and not tier.read_only:
        checksums = tier.checksums
    else:  # the persisted form is always a Zarr store
        disk = DiskTier.create(writer.kv_location, TierLayout(layers, heads, state.head_dim, state.dtype), cfg.block_tokens)
        try:
            for layer in range(layers):
                k, v = state.read_mid(layer)
                disk.append(layer, k[0], v[0], torch.from_numpy(tier.positions(layer)))
            disk.flush()
            checksums = disk.checksums
        except BaseException:
            disk.abandon()  # its writers stop before the writer's folder is removed
            raise
        disk.close()
    doc = DocumentWriter(writer)
    tail_k, tail_v, tail_pos = state.tail.view()
    for layer in range(layers):
        doc.put_anchors(layer, state.sink_k[layer], state.sink_v[layer], tail_k[layer], tail_v[layer], tail_pos.cpu())
        if state.maps[layer] is not None:
            doc.put_estimator(layer, feature_map_tensors(state.maps[layer]), state.summaries[layer].state_dict())
        sel, saved = state.selectors[layer], {}
        if isinstance(sel, BlockSelector):
            saved.update(sel.saved())
        if state.clusters[layer] is not None:
            saved["clusters"] = state.clusters[layer][:, : state.mid_len]
        if saved:
            doc.put_selection(layer, saved)
        if cfg.selector == "faiss":  # the flat index searches these (streamed from the store when reopened)
            keys, _ = state.read_mid(layer)
            for head in range(heads):
                doc.put_keys(layer, head, keys[0, head].float().cpu().numpy())
                if cfg.index.kind != "flat":
                    doc.put_index(layer, head, state.index.serialize(layer, head))
    meta = DocumentMeta(tokens=state.seen, num_layers=layers, num_kv_heads=heads, head_dim=state.head_dim, dtype=dtype_name,
                        sink=cfg.sink, tail=cfg.tail, block_tokens=cfg.block_tokens,
                        estimator=asdict(cfg.estimator), index=asdict(cfg.index),
                        selection={"selector": cfg.selector, "block": state.selectors[0].block})
    if lap is not None:
        lap("persist")
    doc.commit(doc_ids, meta, fingerprint, checksums, lap=lap, model_name=model_name)


def restore(state: KVState, reader: DocumentReader, streamed_keys: bool) -> None:
    """Anchors, feature maps, summaries and the selection state of a reopened document (the KV
    rows stay in ``state.tier``).  ``streamed_keys``: a flat FAISS index reads its keys from the
    store at each search instead of holding them."""
    cfg, dev = state.config, state.device
    meta = reader.meta
    tails_k, tails_v = [], []
    for layer in range(state.num_layers):
        a = reader.anchors(layer)
        state.set_anchors(layer, a["sink_k"].to(dev), a["sink_v"].to(dev))
        tails_k.append(a["tail_k"])
        tails_v.append(a["tail_v"])
        if cfg.estimator.kind != "none":
            state.maps[layer], state.summaries[layer] = _estimator(reader, layer, cfg.estimator.kind, state, dev)
        _restore_selection(state, reader, layer, streamed_keys)
    state.tail.append(torch.stack(tails_k), torch.stack(tails_v), reader.anchors(0)["tail_pos"])
    state.seen = meta.tokens
    state.refresh()


def _estimator(reader: DocumentReader, layer: int, kind: str, state: KVState, dev: torch.device):  # noqa: ANN202
    """One layer's feature map and summary, checked against the layout (the file is checksummed;
    this catches a manifest whose estimator does not describe it)."""
    map_tensors, summary = reader.estimator(layer)
    where = f"the summaries of {reader.art.location}"
    try:
        fmap = feature_map_from_tensors(kind, map_tensors, dev)
        built = Summary.from_state_dict({k: v.to(dev) for k, v in summary.items()})
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise ArtifactError(f"{where} do not hold a {kind} estimator for layer {layer} ({str(e).splitlines()[0][:80]}): "
                            "re-run the prefill") from None
    shape = tuple(built.S.shape)
    if len(shape) != 4 or shape[:2] != (1, state.num_kv_heads) or shape[3] != state.head_dim:
        raise ArtifactError(f"{where} have shape {shape} for layer {layer}, not (1, {state.num_kv_heads}, r, {state.head_dim}): "
                            "re-run the prefill")
    return fmap, built


def _restore_selection(state: KVState, reader: DocumentReader, layer: int, streamed_keys: bool) -> None:
    """The selector's state and the centroid ids from what was saved where it fits, else from the
    keys in the tier (read once, chunk by chunk, not metered)."""
    cfg, heads = state.config, state.num_kv_heads
    saved = reader.selection(layer)
    n = state.tier.num_rows(layer)
    sel = state.selectors[layer]
    if cfg.selector == "faiss" and reader.has_keys():  # (no cluster ids: only device selectors run the fused kernels)
        index = state.index
        for head in range(heads):
            if cfg.index.kind != "flat":
                index.load(layer, head, reader.index(layer, head))
            elif streamed_keys:
                blocks = reader.keys_blocks(layer, head)
                index.attach_streamed(layer, head, blocks, blocks.size // (4 * state.head_dim))
            else:
                index.load_keys(layer, head, reader.keys(layer, head))
        return
    has_bounds = isinstance(sel, BlockSelector) and reader.meta.selection.get("block") == sel.block \
        and "kmax" in saved and saved["kmax"].shape[1] == math.ceil(n / sel.block)
    sel.reserve(n)
    if has_bounds:
        sel.load(saved["kmax"], saved["kmin"], n)
    need_clusters = state.wants_clusters(layer)
    if need_clusters and "clusters" in saved and saved["clusters"].shape[1] == n:
        state.set_clusters(layer, saved["clusters"])
        need_clusters = False
    if has_bounds and not need_clusters:
        return
    for start, keys in state.mid_keys(layer):  # keys (Hkv, m, d) in the model's dtype
        if not has_bounds:
            sel.add(keys)
        if need_clusters:
            state.assign_clusters(layer, keys[None], start)
