"""Learned completion maps on disk: ``maps.safetensors`` plus ``manifest.json``.

    maps.safetensors   per layer i: L{i}.U (Hkv, d, p), L{i}.tau (Hkv, G, p+1), L{i}.gamma (Hkv, G, 2)
    manifest.json      format, kind, the model's identity (its fingerprint less the dtype it was
                       loaded in) and its digest, the settings, the final loss per layer and head,
                       and the SHA-256 of maps.safetensors

Written atomically (each file to a temporary beside it, then renamed; the manifest last), verified
on open (checksum, shapes, model), and never unpickled.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ...storage import ModelMismatchError, fingerprint_digest
from ...storage.atomic_file import write_atomic
from ..rule.learned_maps import LearnedParams

FORMAT = 1
KIND = "learned-centroid"
MAPS_FILE = "maps.safetensors"
MANIFEST = "manifest.json"


class MapsError(ValueError):
    """Maps that cannot be used; the message says what and how to fix it."""


def model_identity(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The parts of a model fingerprint that maps depend on (not the dtype it was loaded in)."""
    return {k: v for k, v in fingerprint.items() if k != "dtype"}


@dataclass
class LearnedMaps:
    """Every layer's :class:`LearnedParams` and the manifest they came with."""

    layers: list[LearnedParams]
    manifest: dict[str, Any]

    def save(self, folder: str | Path) -> Path:
        """Into ``folder`` (made if missing, and removed again if the first write fails there)."""
        folder = Path(folder)
        made = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for i, p in enumerate(self.layers):
            tensors.update({f"L{i}.U": p.U, f"L{i}.tau": p.tau, f"L{i}.gamma": p.gamma})
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
        try:
            write_atomic(folder / MAPS_FILE, lambda tmp: save_file(tensors, str(tmp)))
        except BaseException:
            if made and not any(folder.iterdir()):
                folder.rmdir()
            raise
        manifest = dict(self.manifest, format=FORMAT, kind=KIND, layers=len(self.layers),
                        sha256=hashlib.sha256((folder / MAPS_FILE).read_bytes()).hexdigest())
        write_atomic(folder / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
        self.manifest = manifest
        return folder


def read_maps(folder: str | Path, fingerprint: dict[str, Any] | None = None,
              shape: tuple[int, int, int, int] | None = None) -> LearnedMaps:
    """Open and verify the maps in ``folder``.  With ``fingerprint`` (the loaded model's), maps made
    for another model are refused; with ``shape`` = (layers, KV heads, group size, head dim), maps
    of another shape are."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file() or not (folder / MAPS_FILE).is_file():
        raise MapsError(f"{folder} holds no learned maps ({MANIFEST} and {MAPS_FILE}): make them with `rcengine calibrate --out {folder}`")
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MapsError(f"{folder / MANIFEST} is not valid JSON ({e}): run `rcengine calibrate` again") from None
    if manifest.get("format") != FORMAT or manifest.get("kind") != KIND:
        raise MapsError(f"{folder} holds maps of format {manifest.get('format')!r} / kind {manifest.get('kind')!r}; "
                        f"this rcengine reads format {FORMAT} ({KIND}): run `rcengine calibrate` again")
    digest = hashlib.sha256((folder / MAPS_FILE).read_bytes()).hexdigest()
    if digest != manifest.get("sha256"):
        raise MapsError(f"{folder / MAPS_FILE} does not match its manifest's checksum (damaged): run `rcengine calibrate` again")
    if fingerprint is not None and manifest.get("model_digest") != fingerprint_digest(model_identity(fingerprint)):
        theirs = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
        raise ModelMismatchError(f"the maps in {folder} were calibrated for another model ({theirs.get('name')!r}), not the "
                                 "loaded one: run `rcengine calibrate` for this model")
    tensors = load_file(str(folder / MAPS_FILE))
    layers = []
    for i in range(int(manifest["layers"])):
        try:
            layers.append(LearnedParams(tensors[f"L{i}.U"], tensors[f"L{i}.tau"], tensors[f"L{i}.gamma"]))
        except KeyError as e:
            raise MapsError(f"{folder / MAPS_FILE} lacks {e.args[0]}: run `rcengine calibrate` again") from None
    if shape is not None:
        n_layers, hkv, g, d = shape
        p0 = layers[0] if layers else None
        ok = len(layers) == n_layers and all(
            p.U.shape[:2] == (hkv, d) and p.tau.shape[:2] == (hkv, g) and p.gamma.shape == (hkv, g, 2) for p in layers)
        if not ok:
            got = (len(layers), *(tuple(p0.U.shape[:2]) if p0 is not None else ()))
            raise MapsError(f"the maps in {folder} are for {got} (layers, KV heads, head dim), not {(n_layers, hkv, d)}: "
                            "run `rcengine calibrate` for this model")
    return LearnedMaps(layers, manifest)


@functools.lru_cache(maxsize=8)
def _cached(folder: str, mtime_ns: int) -> LearnedMaps:
    return read_maps(folder)


def default_maps_path() -> Path:
    """The embedded default model's learned maps."""
    return Path(__file__).resolve().parent.parent / "default_model" / "maps"


def layer_params(folder: str | Path | None, layer: int, num_kv_heads: int, head_dim: int,
                 device: torch.device | str = "cpu") -> LearnedParams:
    """One layer's parameters from ``folder`` (None: the embedded model's), read and verified once
    per process and file version; refused if made for another number of KV heads or head dim."""
    path = Path(folder if folder is not None else default_maps_path()).resolve()
    maps = _cached(str(path), (path / MAPS_FILE).stat().st_mtime_ns if (path / MAPS_FILE).exists() else 0)
    if layer >= len(maps.layers):
        raise MapsError(f"the maps in {folder} have {len(maps.layers)} layers; layer {layer} was asked for")
    params = maps.layers[layer]
    if tuple(params.U.shape[:2]) != (num_kv_heads, head_dim):
        raise MapsError(f"the maps in {path} are for {tuple(params.U.shape[:2])} (KV heads, head dim), not "
                        f"{(num_kv_heads, head_dim)}: run `rcengine calibrate` for this model")
    return params.to(device)
