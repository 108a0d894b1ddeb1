"""The learned completion map against simple references: the centroid map it extends, its formula
in float64 with explicit loops, the rule's estimate counted token by token; calibration on a tiny
model; the maps file (checksum, model, shape); the engine with maps (persist, reopen, refuse)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from rcengine import (
    CalibrationConfig,
    Engine,
    EngineConfig,
    EstimatorSpec,
    LearnedMaps,
    MapsError,
    ModelMismatchError,
    NoSpaceError,
    SamplingConfig,
    calibrate,
)
from rcengine.engine.calibration.maps_file import read_maps
from rcengine.engine.hf.loader import load_model
from rcengine.engine.rule.attention import Completion, TokenSet, group_queries, rc_state
from rcengine.engine.rule.estimators import feature_map_from_tensors, feature_map_tensors
from rcengine.engine.rule.feature_maps import CentroidFeatures
from rcengine.engine.rule.learned_maps import (
    LearnedCentroidFeatures,
    LearnedParams,
)
from rcengine.engine.rule.summary import Summary
from tiny_models import TEXT, save_tiny_model


def _params(gen: torch.Generator, hkv: int, g: int, d: int, p: int) -> LearnedParams:
    U, _ = torch.linalg.qr(torch.randn(hkv, d, p, generator=gen, dtype=torch.float64))
    tau = torch.rand(hkv, g, p + 1, generator=gen, dtype=torch.float64)
    gamma = torch.randn(hkv, g, 2, generator=gen, dtype=torch.float64) * 0.3
    return LearnedParams(U, tau, gamma)


def test_learned_map_at_zero_is_the_centroid_map(gen):
    k = torch.randn(1, 2, 300, 16, generator=gen, dtype=torch.float64)
    q = torch.randn(3, 2, 2, 16, generator=gen, dtype=torch.float64)
    params = _params(gen, 2, 2, 16, 3)
    zero = LearnedParams(params.U, torch.zeros_like(params.tau), torch.zeros_like(params.gamma))
    learned = LearnedCentroidFeatures.fit(k, zero, 8, iters=4, seed=1)
    centroid = CentroidFeatures.fit(k, 8, 4, 1)
    torch.testing.assert_close(learned.centroids, centroid.centroids)
    torch.testing.assert_close(learned.query_logits(q), centroid.query_logits(q.expand(3, -1, -1, -1)))
    torch.testing.assert_close(learned.key_logits(k), centroid.key_logits(k))


def test_spreads_and_query_logits_match_their_formula(gen):
    b, hkv, g, n, d, p, C = 1, 2, 2, 200, 8, 2, 5
    k = torch.randn(b, hkv, n, d, generator=gen, dtype=torch.float64) * 1.5
    q = torch.randn(4, hkv, g, d, generator=gen, dtype=torch.float64)
    params = _params(gen, hkv, g, d, p)
    fmap = LearnedCentroidFeatures.fit(k, params, C, iters=3, seed=0)
    assign = fmap.assign(k)
    for h in range(hkv):
        for c in range(C):
            rows = k[0, h][assign[0, h] == c]
            if len(rows) == 0:
                continue
            r = rows - fmap.centroids[0, h, c]
            along = [(r @ params.U[h, :, i]).pow(2).mean() for i in range(p)]
            perp = ((r * r).sum(-1) - sum((r @ params.U[h, :, i]) ** 2 for i in range(p))).mean() / (d - p)
            torch.testing.assert_close(fmap.spreads[0, h, c], torch.stack([*along, perp]))
    logits = fmap.query_logits(q)
    for t in range(q.shape[0]):
        for h in range(hkv):
            for j in range(g):
                x = q[t, h, j]
                proj = params.U[h].T @ x
                z = torch.cat([proj**2, (x @ x - proj @ proj)[None]]) / (2 * d)
                for c in range(C):
                    want = x @ fmap.centroids[0, h, c] / math.sqrt(d) + (params.tau[h, j] * z * fmap.spreads[0, h, c]).sum()
                    want = want + params.gamma[h, j, 0] + params.gamma[h, j, 1] * (x @ x) / (2 * d)
                    torch.testing.assert_close(logits[t, h, j, c], want)


def test_rc_with_the_learned_map_matches_the_rule_counted_token_by_token(gen):
    """Exact part over anchors and retrieved rows, plus exp(a(q)_c) for every unread row of cluster c
    (value: the row's own), one normalisation: what the summary and the subtraction must give."""
    hkv, g, n, d, C = 2, 2, 160, 8, 6
    k = torch.randn(1, hkv, n, d, generator=gen, dtype=torch.float64)
    v = torch.randn(1, hkv, n, d, generator=gen, dtype=torch.float64)
    q = torch.randn(1, hkv * g, d, generator=gen, dtype=torch.float64)
    ka, va = torch.randn(1, hkv, 5, d, generator=gen, dtype=torch.float64), torch.randn(1, hkv, 5, d, generator=gen, dtype=torch.float64)
    fmap = LearnedCentroidFeatures.fit(k, _params(gen, hkv, g, d, 2), C, iters=3)
    summary = Summary.empty(1, hkv, C, d, dtype=torch.float64)
    summary.fold(fmap.key_logits(k), v)
    ret = torch.stack([torch.randperm(n, generator=gen)[:12] for _ in range(hkv)])[None]  # (1, Hkv, 12)
    kr = torch.gather(k, 2, ret[..., None].expand(-1, -1, -1, d))
    vr = torch.gather(v, 2, ret[..., None].expand(-1, -1, -1, d))
    qg = group_queries(q, hkv)
    got = rc_state(qg, [TokenSet(ka, va)], d**-0.5, TokenSet(kr, vr), Completion(fmap, summary))
    out = got.num / got.den[..., None]
    aq = fmap.query_logits(qg)  # (1, Hkv, G, C)
    assign = fmap.assign(k)[0]
    for h in range(hkv):
        unread = torch.ones(n, dtype=torch.bool)
        unread[ret[0, h]] = False
        for j in range(g):
            x = qg[0, h, j]
            ex = torch.cat([ka[0, h], kr[0, h]]) @ x / math.sqrt(d)
            num = (torch.exp(ex)[:, None] * torch.cat([va[0, h], vr[0, h]])).sum(0)
            den = torch.exp(ex).sum()
            for i in torch.nonzero(unread).flatten():
                w = torch.exp(aq[0, h, j, assign[h, i]])
                num, den = num + w * v[0, h, i], den + w
            torch.testing.assert_close(out[0, h, j], num / den)


def test_learned_map_persists(gen):
    k = torch.randn(1, 2, 100, 8, generator=gen)
    fmap = LearnedCentroidFeatures.fit(k, _params(gen, 2, 2, 8, 2).to("cpu"), 4, iters=2)
    back = feature_map_from_tensors("learned", feature_map_tensors(fmap))
    q = torch.randn(1, 2, 2, 8, generator=gen)
    torch.testing.assert_close(back.query_logits(q), fmap.query_logits(q))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("learned")
    path = save_tiny_model(root / "llama", "llama", max_positions=2048)
    lm = load_model(path, device="cpu")
    texts = [TEXT * 3, ("Numbers and rivers. " + TEXT) * 3]
    cfg = CalibrationConfig(features=4, directions=2, queries=16, steps=30, tail=16)
    maps = calibrate(lm, texts, cfg, show_progress=False)
    maps.save(root / "maps")
    return lm, root / "maps", maps


def test_calibration_never_ends_worse_than_centroids(tiny):
    _, folder, maps = tiny
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["layers"] == 2 and manifest["settings"]["features"] == 4
    for report in manifest["per_layer"]:
        assert torch.all(torch.tensor(report["loss"]) <= torch.tensor(report["centroid_loss"]) + 1e-9)
        assert math.isfinite(report["log_mass_ratio"])
    back = read_maps(folder)
    for a, b in zip(back.layers, maps.layers, strict=True):
        torch.testing.assert_close(a.tau, b.tau.float())
        assert a.U.shape == (2, 16, 2) and a.tau.shape == (2, 2, 3) and a.gamma.shape == (2, 2, 2)
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_calibration_batches_match_the_loss_of_each_item(gen):
    """The fit's fast paths against plain references: unread counts and value sums per cluster
    (all tokens less the read ones) against a sum over the unread tokens in float64, and the loss
    of items stacked by shape against the mean of each item's own loss."""
    from rcengine.engine.calibration.fit import _items, _loss, _mean_loss, _stack
    from rcengine.engine.rule.budget import retrieval_count

    hkv, g, d = 2, 2, 16
    cfg = CalibrationConfig(features=4, queries=32, sink=2, tail=8, kmeans_iters=3)
    U, _ = torch.linalg.qr(torch.randn(hkv, d, 2, generator=gen))
    items = []
    for n in (240, 100):  # 32 calibration queries, then 25: two shapes
        q, k, v = (torch.randn(h, n, d, generator=gen) for h in (hkv * g, hkv, hkv))
        its = _items(q, k, v, U, cfg)
        qn = min(cfg.queries, n // 4)
        mid = slice(cfg.sink, n - qn - cfg.tail)
        k_mid, v_mid = k[:, mid].double(), v[:, mid].double()
        cluster = CentroidFeatures.fit(k[:, mid][None], cfg.features, cfg.kmeans_iters, cfg.seed).assign(k[:, mid][None])[0]
        s_mid = torch.einsum("hgqd,hnd->hgqn", q[:, n - qn:].reshape(hkv, g, qn, d), k[:, mid]) * d ** -0.5
        for it, b in zip(its, (cfg.budget / 2, cfg.budget, 2 * cfg.budget, 4 * cfg.budget), strict=True):
            top = s_mid.amax(dim=1).topk(retrieval_count(b, k_mid.shape[1]), dim=-1).indices
            unread = torch.ones(hkv, qn, k_mid.shape[1], dtype=torch.float64).scatter_(-1, top, 0.0)
            onehot = torch.nn.functional.one_hot(cluster, cfg.features).double()
            torch.testing.assert_close(it.cnt.double(), torch.einsum("hnc,hqn->hqc", onehot, unread))
            torch.testing.assert_close(it.vsum.double(), torch.einsum("hnc,hqn,hnd->hqcd", onehot, unread, v_mid),
                                       rtol=1e-5, atol=1e-4)
        items += its
    tau = torch.rand(hkv, g, 3, generator=gen)
    gamma = torch.randn(hkv, g, 2, generator=gen) * 0.1
    batches = _stack(items)
    assert [b.cnt.shape[0] for b in batches] == [4, 4]
    expected = sum(_loss(it, tau, gamma, 1.0)[0] for it in items) / len(items)
    torch.testing.assert_close(_mean_loss(batches, len(items), tau, gamma, 1.0), expected, rtol=1e-5, atol=1e-6)


def test_damaged_or_foreign_maps_are_refused(tiny, tmp_path):
    lm, folder, maps = tiny
    other = load_model(save_tiny_model(tmp_path / "qwen2", "qwen2"), device="cpu")
    with pytest.raises(ModelMismatchError, match="calibrated for another model"):
        Engine(other, EngineConfig(estimator=EstimatorSpec("learned", 4, maps=str(folder))))
    with pytest.raises(MapsError, match="the learned estimator needs maps"):
        Engine(lm, EngineConfig(estimator=EstimatorSpec("learned", 4)))
    damaged = tmp_path / "damaged"
    LearnedMaps(maps.layers, dict(maps.manifest)).save(damaged)
    data = bytearray((damaged / "maps.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (damaged / "maps.safetensors").write_bytes(bytes(data))
    with pytest.raises(MapsError, match="checksum"):
        read_maps(damaged)
    with pytest.raises(MapsError, match="not"):
        read_maps(folder, shape=(3, 2, 2, 16))


def test_engine_with_learned_maps_persists_and_reopens_without_them(tiny, tmp_path):
    lm, folder, _ = tiny
    moved = tmp_path / "maps"
    moved.mkdir()
    for f in folder.iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    cfg = EngineConfig(method="rc", budget=0.1, tail=16, offload="disk", estimator=EstimatorSpec("learned", 4, maps=str(moved)))
    engine = Engine(lm, cfg, show_progress=False)
    doc = engine.prefill(TEXT * 3, store=tmp_path / "store")
    first = doc.ask(" What is the number?", SamplingConfig(max_new_tokens=4))
    doc.close()
    for f in moved.iterdir():
        f.unlink()
    moved.rmdir()
    reopened = engine.open(tmp_path / "store")
    assert reopened.engine.config.estimator.kind == "learned"
    assert isinstance(reopened.state.maps[0], LearnedCentroidFeatures)
    assert reopened.ask(" What is the number?", SamplingConfig(max_new_tokens=4)).text == first.text
    reopened.close()


def test_the_embedded_model_ships_maps_made_for_it():
    from rcengine.engine.calibration.maps_file import default_maps_path

    lm = load_model(None, device="cpu")
    engine = Engine(lm, EngineConfig(estimator=EstimatorSpec("learned")), show_progress=False)
    assert engine.config.estimator.maps == str(default_maps_path().resolve())
    manifest = read_maps(default_maps_path(), lm.fingerprint(), (8, 2, 2, 64)).manifest
    assert manifest["settings"]["features"] == 64 and len(manifest["per_layer"]) == 8


def test_maps_on_a_full_file_system_say_so_and_leave_nothing(tiny, tmp_path, monkeypatch):
    """safetensors does its own I/O and says "No space left on device" only in its message."""
    _, _, maps = tiny
    import rcengine.engine.calibration.maps_file as maps_file

    def full(_tensors, path):  # noqa: ANN001, ANN202
        Path(path).write_bytes(b"partial")
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(maps_file, "save_file", full)
    with pytest.raises(NoSpaceError, match=r"no room to write .*maps.safetensors on its file system"):
        maps.save(tmp_path / "new" / "maps")
    assert list((tmp_path / "new").iterdir()) == []  # the folder it made is gone, and the temporary
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    with pytest.raises(NoSpaceError):
        maps.save(tmp_path / "kept")
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["notes.txt"]
