"""Mask statistics and determinism of the counter hash and the codebook scheme."""

import hashlib
import subprocess
import sys

import pytest
import torch

from hf_turnover.masks import MAX_INSTANCE_ID, keep_bits, mask_values

N, D = 4000, 64


def _binomial_ok(bits: torch.Tensor, p: float, sigmas: float = 5.0) -> bool:
    n = bits.numel()
    return abs(bits.float().mean().item() - p) < sigmas * (p * (1 - p) / n) ** 0.5


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.8, 0.95])
def test_hash_keep_fraction_is_p(p):
    bits = keep_bits(torch.arange(N), D, "layer.0", p=p, seed=3)
    assert _binomial_ok(bits, p)
    # Per unit and per instance too: no unit or id is systematically kept.
    assert _binomial_ok(bits[:, 5], p) and _binomial_ok(bits[7, :].repeat(1), p, sigmas=6)


@pytest.mark.parametrize("p", [0.2, 0.5, 0.9])
def test_codebook_keep_fraction_is_p(p):
    # The AND of k primitives kept with p**(1/k) keeps with p; averaged over codebooks (layers) to remove the
    # variance of one finite codebook.
    rates = [
        keep_bits(torch.arange(2000), D, f"l{i}", p=p, seed=0, scheme="codebook").float().mean()
        for i in range(40)
    ]
    assert abs(torch.stack(rates).mean().item() - p) < 0.02


def test_codebook_picks_are_distinct_primitives():
    # Ids with equal picks get equal masks; with 16**4 combinations most of 500 ids differ.
    bits = keep_bits(torch.arange(500), D, "l", p=0.5, seed=0, scheme="codebook")
    assert len({tuple(r.tolist()) for r in bits}) > 450


@pytest.mark.parametrize("scheme", ["hash", "codebook"])
def test_flip_is_exact_complement(scheme):
    bits = keep_bits(torch.arange(300), D, "l", p=0.3, seed=1, scheme=scheme)
    own = mask_values(bits, "own", 0.3, torch.float32)
    flip = mask_values(bits, "flip", 0.3, torch.float32)
    assert torch.equal(own > 0, ~(flip > 0))
    assert torch.allclose(own[bits], torch.tensor(1 / 0.3)) and torch.allclose(
        flip[~bits], torch.tensor(1 / 0.7)
    )
    # Both are unbiased: E[own] = E[flip] = 1 per unit.
    assert abs(own.mean().item() - 1) < 0.05 and abs(flip.mean().item() - 1) < 0.05
    assert mask_values(bits, "full", 0.3, torch.float32) is None


@pytest.mark.parametrize("scheme", ["hash", "codebook"])
def test_batch_rows_equal_single_ids(scheme):
    ids = torch.tensor([5, 0, 2**40 + 3, MAX_INSTANCE_ID - 1, 17])
    batch = keep_bits(ids, D, "enc.3", p=0.5, seed=9, scheme=scheme)
    for row, i in zip(batch, ids, strict=True):
        assert torch.equal(row, keep_bits(i.view(1), D, "enc.3", p=0.5, seed=9, scheme=scheme)[0])


def test_bits_depend_on_seed_layer_and_id():
    base = keep_bits(torch.arange(50), D, "a", p=0.5, seed=0)
    assert not torch.equal(base, keep_bits(torch.arange(50), D, "b", p=0.5, seed=0))
    assert not torch.equal(base, keep_bits(torch.arange(50), D, "a", p=0.5, seed=1))
    # Large ids that collide after a float32 cast get different masks.
    big = torch.tensor([2**24, 2**24 + 1, 2**53, 2**53 + 1])
    assert torch.tensor(2**24, dtype=torch.float32) == torch.tensor(2**24 + 1, dtype=torch.float32)
    bits = keep_bits(big, D, "a", p=0.5, seed=0)
    assert not torch.equal(bits[0], bits[1]) and not torch.equal(bits[2], bits[3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_same_bits_in_every_dtype(dtype):
    bits = keep_bits(torch.arange(100), D, "a", p=0.5, seed=0)
    assert torch.equal(mask_values(bits, "own", 0.5, dtype) > 0, bits)
    assert torch.equal(mask_values(bits, "flip", 0.5, dtype) > 0, ~bits)


FRESH = """
import torch
from hf_turnover.masks import keep_bits
ids = torch.tensor([0, 1, 2**24 + 1, 2**61 + 12345])
for scheme in ("hash", "codebook"):
    print(scheme, keep_bits(ids, 32, "bert.encoder.layer.0", p=0.4, seed=7, scheme=scheme).int().tolist())
"""


def test_same_bits_in_a_fresh_process():
    out = subprocess.run([sys.executable, "-c", FRESH], capture_output=True, text=True, check=True).stdout
    ids = torch.tensor([0, 1, 2**24 + 1, 2**61 + 12345])
    expected = "".join(
        f"{s} {keep_bits(ids, 32, 'bert.encoder.layer.0', p=0.4, seed=7, scheme=s).int().tolist()}\n"
        for s in ("hash", "codebook")
    )
    assert out == expected


def _reference_bits(i: int, width: int, layer: str, p: float, seed: int) -> list[int]:
    """The documented hash in plain Python integers: checks the int64 tensor arithmetic (wrapping, shifts)."""
    m64 = (1 << 64) - 1

    def mix(x):
        x &= m64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m64
        return x ^ (x >> 31)

    digest = int.from_bytes(hashlib.blake2b(layer.encode(), digest_size=8).digest(), "little")
    key = mix(mix(seed + 0x9E3779B97F4A7C15) ^ digest)
    row = mix(i ^ key)
    return [int((mix(row + (j + 1) * 0x9E3779B97F4A7C15) >> 11) < int(p * 2**53)) for j in range(width)]


@pytest.mark.parametrize("p", [0.5, 0.37])
def test_tensor_hash_equals_plain_integer_reference(p):
    ids = [0, 1, 123456789, 2**24 + 1, 2**62 - 1]
    bits = keep_bits(
        torch.tensor(ids), 24, "bert.encoder.layer.1.output.adapters.t.adapter_down", p=p, seed=11
    )
    expected = [
        _reference_bits(i, 24, "bert.encoder.layer.1.output.adapters.t.adapter_down", p, 11) for i in ids
    ]
    assert bits.int().tolist() == expected
