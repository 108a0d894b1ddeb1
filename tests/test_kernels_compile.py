"""The fused kernels compile for the GPU machine's chip (sm_90) for every variant and dtype the
engine launches, checked on any machine that has Triton (no GPU needed: Triton compiles to a
cubin on the CPU).  Type errors in branches a run never takes (a CPU interpreter run executes
only what it reaches) are caught here."""

from __future__ import annotations

import os

import pytest
import torch

from rcengine.engine.decode import kernels
from rcengine.engine.rule.feature_maps import CentroidFeatures
from rcengine.engine.rule.summary import Summary

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter runs kernels; it does not compile them")

_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64", torch.int32: "i32"}


class _CompileOnly:
    """Stands in for a kernel: ``kernel[grid](*args, **constexprs)`` compiles it for sm_90."""

    def __init__(self, fn) -> None:  # noqa: ANN001
        self.fn, self.compiled = fn, 0

    def __getitem__(self, grid):  # noqa: ANN001, ANN204
        def launch(*args, **constexprs) -> None:  # noqa: ANN002, ANN003
            from triton.backends.compiler import GPUTarget
            from triton.compiler import ASTSource

            names = self.fn.arg_names
            signature = {}
            for name, value in zip(names, args, strict=False):
                if torch.is_tensor(value):
                    signature[name] = "*" + _TYPES[value.dtype]
                elif isinstance(value, float):
                    signature[name] = "fp32"
                else:
                    signature[name] = "i32"
            signature.update({name: "constexpr" for name in constexprs})
            triton.compile(ASTSource(fn=self.fn, signature=signature, constexprs=constexprs),
                           target=GPUTarget("cuda", 90, 32))
            self.compiled += 1

        return launch


@pytest.mark.parametrize("dtype,method,unit,lanes", [
    *[(dtype, method, unit, False) for dtype in (torch.bfloat16, torch.float32) for method in ("dense", "sink-tail", "topk", "rc")
      for unit in (1, 16)],
    (torch.bfloat16, "rc", 1, True), (torch.bfloat16, "rc", 16, True), (torch.bfloat16, "topk", 16, True),
])
def test_fused_kernels_compile_for_sm90(monkeypatch, dtype, method, unit, lanes):
    partial, combine = _CompileOnly(kernels._partial_kernel), _CompileOnly(kernels._combine_kernel)
    monkeypatch.setattr(kernels, "_partial_kernel", partial)
    monkeypatch.setattr(kernels, "_combine_kernel", combine)
    monkeypatch.setattr(kernels, "available", lambda device: True)
    hkv, g, d, cap = 8, 4, 128, 4096
    z = lambda *shape, dt=dtype: torch.zeros(*shape, dtype=dt)  # noqa: E731
    dense, selects, completes = method == "dense", method in ("topk", "rc"), method == "rc"
    keys = torch.randn(1, hkv, 256, d)
    fmap = CentroidFeatures.fit(keys, 64)
    summary = Summary.empty(1, hkv, 64, d)
    kernels.fused_attention(
        z(1, hkv, g, d), z(hkv, 4, d), z(hkv, 4, d), z(hkv, 160, d), z(hkv, 160, d), z(160, dt=torch.int64),
        z(1, dt=torch.int64), z(cap, hkv, 2, d) if (dense or selects) else None,
        z(1, hkv, 82, dt=torch.int64) if selects else None, unit, cap if dense else (82 * unit if selects else 0),
        z((), dt=torch.int64), z((), dt=torch.int64), dense, d**-0.5,
        centroids=fmap.centroids if completes else None, summary=summary if completes else None,
        clusters=z(hkv, cap, dt=torch.int32) if completes else None,
        tail_lane=z(160, dt=torch.int64) if lanes else None, q_lane=z(1, dt=torch.int64) if lanes else None,
    )
    assert partial.compiled == combine.compiled == 1


@pytest.mark.parametrize("bounds", [False, True])
def test_selection_kernel_compiles_for_sm90(monkeypatch, bounds):
    score = _CompileOnly(kernels._score_kernel)
    monkeypatch.setattr(kernels, "_score_kernel", score)
    a = torch.zeros(8, 4096, 128, dtype=torch.bfloat16)
    kernels.selection_scores(torch.zeros(1, 8, 4, 128, dtype=torch.bfloat16), a, 256 if bounds else 4096,
                             torch.zeros((), dtype=torch.int64), 16 if bounds else 1, a if bounds else None)
    assert score.compiled == 1
