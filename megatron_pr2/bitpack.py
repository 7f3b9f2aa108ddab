# Bit packing of expert ids (RouteBatch storage, the route codec): values of `bits` bits each,
# little-endian bit order. For bits < 8, eight values form a group of exactly `bits` bytes, which
# packing and unpacking handle as one word (a few whole-tensor ops, no per-value loop): int64,
# or int32 when packing ids of <= 4 bits.

import functools
import math
import sys

import torch


def bits_for(num_experts: int) -> int:
    """Bits per packed expert id (at least 1)."""
    return max(1, math.ceil(math.log2(num_experts)))


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integers (< 2**bits) into a flat uint8 tensor, little-endian bit order.

    Value i occupies bits [i * bits, (i + 1) * bits) of the byte stream. For bits <= 8, eight
    values form one word of exactly `bits` bytes (int32 up to 4 bits, else int64), so packing
    is a few whole-tensor ops.
    """
    if bits > 8:
        # Wide ids (more than 256 experts): bit planes, slower but general.
        flat = values.reshape(-1).to(torch.int64)
        shifts = torch.arange(bits, device=flat.device)
        plane = ((flat.unsqueeze(1) >> shifts) & 1).to(torch.uint8).reshape(-1)
        plane = torch.cat([plane, plane.new_zeros((-plane.numel()) % 8)])
        weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=flat.device)
        return (plane.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)
    flat = values.reshape(-1)
    count = flat.numel()
    if count % 8:
        flat = torch.cat([flat, flat.new_zeros((-count) % 8)])
    # The shift promotes the (narrow) ids to the word dtype, so no separate widening copy; an
    # int32 word (8 ids of <= 4 bits) moves half the bytes of an int64 one.
    word = torch.int32 if bits <= 4 else torch.int64
    words = (flat.view(-1, 8) << _word_shifts(bits, word, flat.device)).sum(dim=1, dtype=word)
    if sys.byteorder == "little":
        # A word's low `bits` bytes are its first bytes in memory: one strided copy instead of a
        # shift, mask and cast per byte (the packing runs once per recorded microbatch).
        packed = words.view(torch.uint8).view(-1, word.itemsize)[:, :bits].reshape(-1)
    else:
        byte_shifts = torch.arange(bits, device=flat.device) * 8
        packed = ((words.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return packed[: -(-count * bits // 8)]


@functools.lru_cache(maxsize=64)
def _word_shifts(bits: int, word: torch.dtype, device: torch.device) -> torch.Tensor:
    # [8] bit offsets of a group's ids in its word, made once per (bits, dtype, device); read
    # only (every packing shifts by it).
    return torch.arange(0, 8 * bits, bits, dtype=word, device=device)


def unpack_bits(
    packed: torch.Tensor, bits: int, count: int, dtype: torch.dtype = torch.int64
) -> torch.Tensor:
    """Inverse of pack_bits: the first `count` values, in `dtype`. For bits < 8 a group of 8
    values is `bits` bytes, read as one int64 word and split (group_words, split_words)."""
    if bits > 8:
        shifts = torch.arange(8, device=packed.device)
        plane = ((packed.to(torch.int64).unsqueeze(1) >> shifts) & 1).reshape(-1)[: count * bits]
        weights = 1 << torch.arange(bits, device=packed.device)
        return (plane.view(count, bits) * weights).sum(dim=1).to(dtype)
    if bits == 8:
        return packed[:count].to(dtype)
    groups = -(-count // 8)
    data = torch.cat([packed, packed.new_zeros(groups * bits + 8 - packed.numel())])
    window = data.as_strided((groups, 8), (bits, 1))
    return split_words(group_words(window), bits, dtype).view(-1)[:count]


def group_words(window: torch.Tensor) -> torch.Tensor:
    """[..., 8] uint8 (a group's bytes and the ones after it) -> [..., 1] int64 little-endian
    words: one memory pass instead of one shift per value and byte."""
    if sys.byteorder == "little":
        # (A copy with standard strides: a strided view may claim contiguity with stride bits.)
        return window.clone(memory_format=torch.contiguous_format).view(torch.int64)
    shifts = torch.arange(0, 64, 8, device=window.device)
    return (window.to(torch.int64) << shifts).sum(dim=-1, keepdim=True)  # wraps like the view


def split_words(words: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """[..., 1] int64 words -> [..., 8] values of `bits` (< 8) bits each, low bits first, in
    `dtype`. The uint8 cast keeps each shifted word's low byte (a wrap), then the mask."""
    values = (words >> torch.arange(0, 8 * bits, bits, device=words.device)).to(torch.uint8)
    values &= (1 << bits) - 1
    return values if dtype == torch.uint8 else values.to(dtype)
