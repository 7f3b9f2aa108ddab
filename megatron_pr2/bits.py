# Bit packing of expert ids (RouteBatch storage): ceil(log2 E) bits per id, little-endian bit
# order, so k * ceil(log2 E) / 8 bytes per token per layer.

import functools
import math
import sys

import torch
import torch.nn.functional as F


def bits_for(num_experts: int) -> int:
    """Bits per packed expert id (at least 1)."""
    return max(1, math.ceil(math.log2(num_experts)))


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integers (< 2**bits) into a flat uint8 tensor, little-endian bit order.

    Value i occupies bits [i * bits, (i + 1) * bits) of the byte stream. For bits <= 8, eight
    values form one int64 word of exactly `bits` bytes, so packing is a few whole-tensor ops.
    """
    flat = values.reshape(-1).to(torch.int64)
    count = flat.numel()
    if bits > 8:
        # Wide ids (more than 256 experts): bit planes, slower but general.
        shifts = torch.arange(bits, device=flat.device)
        plane = ((flat.unsqueeze(1) >> shifts) & 1).to(torch.uint8).reshape(-1)
        plane = torch.cat([plane, plane.new_zeros((-plane.numel()) % 8)])
        weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=flat.device)
        return (plane.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)
    flat = F.pad(flat, (0, (-count) % 8)).view(-1, 8)
    words = (flat << _word_shifts(bits, flat.device)).sum(dim=1)
    if _LITTLE_ENDIAN:  # the word's low `bits` bytes, as they lie in memory
        return words.view(torch.uint8).view(-1, 8)[:, :bits].reshape(-1)[: -(-count * bits // 8)]
    byte_shifts = torch.arange(bits, device=flat.device) * 8
    packed = ((words.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return packed[: -(-count * bits // 8)]


def unpack_bits(
    packed: torch.Tensor, bits: int, count: int, dtype: torch.dtype = torch.int64
) -> torch.Tensor:
    """Inverse of pack_bits: the first `count` values, in `dtype`.

    For bits <= 8 a value spans at most two bytes of its group of `bits` bytes; the work runs on
    int16 lanes (a quarter of int64's memory traffic), and bits == 8 is the bytes themselves.
    """
    if bits > 8:
        shifts = torch.arange(8, device=packed.device)
        plane = ((packed.to(torch.int64).unsqueeze(1) >> shifts) & 1).reshape(-1)[: count * bits]
        weights = 1 << torch.arange(bits, device=packed.device)
        return (plane.view(count, bits) * weights).sum(dim=1).to(dtype)
    if bits == 8:
        return packed[:count].to(dtype)
    if _LITTLE_ENDIAN and (packed.is_cuda or count <= _WORD_UNPACK_MAX):
        return _unpack_words(packed, bits, count).to(dtype)
    groups = -(-count // 8)
    data = torch.cat([packed, packed.new_zeros(groups * bits + 1 - packed.numel())])
    # Group g's bytes plus the next group's first byte (the pad byte for the last group).
    window = data.to(torch.int16).as_strided((groups, bits + 1), (bits, 1))
    values = torch.empty(groups, 8, dtype=torch.int16, device=packed.device)
    for j in range(8):
        byte, shift = divmod(j * bits, 8)
        value = window[:, byte] >> shift
        if shift + bits > 8:
            value = value | (window[:, byte + 1] << (8 - shift))
        values[:, j] = value & ((1 << bits) - 1)
    return values.view(-1)[:count].to(dtype)


# Eight values of one group are `bits` bytes = the low bytes of one little-endian int64 word.
_LITTLE_ENDIAN = sys.byteorder == "little"
# Above this many values the int16-lane loop of unpack_bits is faster on a CPU (int64 traffic dominates);
# small routes (one microbatch of a few layers) are launch / op bound: a handful of whole-tensor
# ops win there, and always on a GPU.
_WORD_UNPACK_MAX = 1 << 17


@functools.lru_cache(maxsize=None)
def _word_shifts(bits: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, 8 * bits, bits, device=device)


def _unpack_words(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """unpack_bits for bits < 8 as uint8: each group's bytes zero-extended to one int64 word,
    value j = (word >> j * bits) & mask (a few whole-tensor ops, no per-slot loop)."""
    groups = -(-count // 8)
    need = groups * bits
    if packed.numel() < need:  # pack_bits stores ceil(count * bits / 8) bytes: a short last group
        packed = F.pad(packed, (0, need - packed.numel()))
    words = F.pad(packed[:need].view(groups, bits), (0, 8 - bits))
    shifts = _word_shifts(bits, packed.device)
    values = (words.view(torch.int64) >> shifts).to(torch.uint8) & ((1 << bits) - 1)
    return values.view(-1)[:count]
