"""Instance masks for turn-over dropout, as pure functions of (seed, layer, instance id, unit).

The keep-bit ``b`` of unit ``j`` of a masked layer for training instance ``i`` is

    b = splitmix64(row_key(seed, layer, i) + (j + 1) * GOLDEN) >> 11  <  floor(p * 2**53)

computed with int64 tensor ops on the activations' device. Integer arithmetic wraps identically on every
device and in every torch version, so the bits are the same on CPU and CUDA, in float32/float16/bfloat16
models, for any batch size and in any process. Ids may be anything in ``[0, 2**62)``: they are never cast to
float (the authors' reference code hashes through ``sin()`` in float, which collides above 2**24 and changes
masks under bfloat16).

Mask values for a keep probability ``p``:

* ``own``  (the sub-network trained on the instance):   ``b / p``
* ``flip`` (the sub-network that never saw it):        ``(1 - b) / (1 - p)``
* ``full`` (no mask, the paper's footnote-4 ``f_D``):     no multiplication at all

Both masked networks are unbiased estimates of the full one. The paper's flipped mask ``1/p - m`` equals
``(1 - b)/(1 - p)`` only at ``p = 0.5``.

Nothing here is stored: a batch of ``B`` ids on a layer of width ``d`` costs ``O(B * d)`` memory whatever the
number of training instances is.
"""

from __future__ import annotations

import hashlib

import torch

MASK_MODES = ("own", "flip", "full")
MASK_SCHEMES = ("hash", "codebook")
MAX_INSTANCE_ID = 2**62

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB
_UNIFORM_BITS = 53
_CPU_BLOCK = 1 << 15  # int64 hash elements per block on CPU: 256 KiB temporaries stay in L2


def _signed(value: int) -> int:
    """Two's-complement int64 view of an unsigned 64-bit Python int."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _shr(x: torch.Tensor, shift: int) -> torch.Tensor:
    """Logical right shift of int64 tensors (torch's ``>>`` is arithmetic)."""
    return (x >> shift) & ((1 << (64 - shift)) - 1)


def _mix_(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser on int64 tensors, in place (one temporary instead of eight new tensors);
    multiplication wraps modulo 2**64 on every backend."""
    x.bitwise_xor_(_shr(x, 30)).mul_(_signed(_MUL1))
    x.bitwise_xor_(_shr(x, 27)).mul_(_signed(_MUL2))
    return x.bitwise_xor_(_shr(x, 31))


def _mix_int(x: int) -> int:
    """splitmix64 finaliser on a Python int, for per-layer constants."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * _MUL1) & _MASK64
    x = ((x ^ (x >> 27)) * _MUL2) & _MASK64
    return x ^ (x >> 31)


def layer_key(seed: int, layer: str) -> int:
    """A 64-bit key for (seed, layer name): stable across processes, unlike Python's ``hash``."""
    digest = int.from_bytes(hashlib.blake2b(layer.encode(), digest_size=8).digest(), "little")
    return _signed(_mix_int(_mix_int(seed + _GOLDEN) ^ digest))


def _uniform53(x: torch.Tensor) -> torch.Tensor:
    """The top 53 bits of a hash as a non-negative int64 in [0, 2**53)."""
    return _shr(x, 64 - _UNIFORM_BITS)


def _threshold(p: float) -> int:
    return int(p * 2**_UNIFORM_BITS)  # p * 2**53 is exact in float64


def _row_keys(ids: torch.Tensor, key: int) -> torch.Tensor:
    return _mix_(ids ^ key)  # (B,)


def _unit_counters(width: int, device: torch.device) -> torch.Tensor:
    units = torch.arange(1, width + 1, dtype=torch.int64, device=device)
    return units * _signed(_GOLDEN)  # (d,), wraps like the unsigned product


def hash_keep_bits(ids: torch.Tensor, width: int, key: int, p: float) -> torch.Tensor:
    """Keep-bits (B, d) from one counter-based hash per (id, unit)."""
    rows = _row_keys(ids, key)  # (B,)
    counters = _unit_counters(width, ids.device)  # (d,)
    bits = torch.empty(len(ids), width, dtype=torch.bool, device=ids.device)
    # The hash is ~15 elementwise int64 passes: on CPU, blocks of rows keep them in cache (about 2x faster
    # than whole-batch temporaries); on accelerators one block avoids extra launches.
    step = max(1, _CPU_BLOCK // max(width, 1)) if ids.device.type == "cpu" else max(len(ids), 1)
    for start in range(0, len(ids), step):
        hashed = _mix_(rows[start : start + step, None] + counters[None, :])  # (b, d)
        torch.lt(_uniform53(hashed), _threshold(p), out=bits[start : start + step])
    return bits


def codebook_keep_bits(ids: torch.Tensor, width: int, key: int, p: float, size: int, k: int) -> torch.Tensor:
    """Keep-bits (B, d) by the paper's Appendix-D composition: the AND of ``k`` primitive masks.

    The codebook holds ``size`` primitive masks, split into ``k`` groups of ``size // k``; an instance picks one
    primitive per group by a hash of its id, so the ``k`` picks are always distinct and independent. Each
    primitive keeps a unit with probability ``p ** (1 / k)``, so their AND keeps it with probability ``p``
    (the appendix prints ``1 - p ** (1 / k)``, which cannot give ``p`` after an AND). The codebook is
    ``size x d`` bits, regenerated from the hash on every call.
    """
    group = size // k
    primitive_ids = torch.arange(size, dtype=torch.int64, device=ids.device)
    codebook = hash_keep_bits(primitive_ids, width, _signed(_mix_int(key)), p ** (1.0 / k))  # (K, d)
    slots = torch.arange(k, dtype=torch.int64, device=ids.device)
    picks = _uniform53(_mix_(_row_keys(ids, key)[:, None] + slots[None, :] * _signed(_GOLDEN))) % group
    picks = picks + slots[None, :] * group  # (B, k), pick r lies in group r
    bits = codebook[picks[:, 0]]  # (B, d)
    for slot in range(1, k):  # AND in place: B x d bits of memory, not B x k x d
        bits &= codebook[picks[:, slot]]
    return bits


def keep_bits(
    ids: torch.Tensor,
    width: int,
    layer: str,
    *,
    p: float,
    seed: int,
    scheme: str = "hash",
    codebook_size: int = 64,
    codebook_k: int = 4,
) -> torch.Tensor:
    """Boolean keep-bits of shape ``(len(ids), width)`` for the masked layer named ``layer``.

    ``ids`` is an int64 tensor of instance ids in ``[0, 2**62)`` on the device where the mask is needed.
    """
    key = layer_key(seed, layer)
    if scheme == "hash":
        return hash_keep_bits(ids, width, key, p)
    if scheme == "codebook":
        return codebook_keep_bits(ids, width, key, p, codebook_size, codebook_k)
    raise ValueError(f"Unknown mask scheme {scheme!r}; use one of {MASK_SCHEMES}.")


def mask_values(bits: torch.Tensor, mode: str, p: float, dtype: torch.dtype) -> torch.Tensor | None:
    """Multiplicative mask for ``mode``: ``b/p`` (own), ``(1-b)/(1-p)`` (flip), ``None`` (full)."""
    if mode == "own":
        return bits.to(dtype).mul_(1.0 / p)
    if mode == "flip":
        return (~bits).to(dtype).mul_(1.0 / (1.0 - p))
    if mode == "full":
        return None
    raise ValueError(f"Unknown mask mode {mode!r}; use one of {MASK_MODES}.")
