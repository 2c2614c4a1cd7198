"""RoPE tables from a model's config, computed at export time the way transformers' `modeling_rope_utils` does.

The graph needs cos/sin rows for positions 0..max_context-1, so every variant whose frequencies do not change with
the sequence length is computed here once, in float32 like transformers (a 1-ulp difference in `base ** x` between
numpy and torch is the only deviation). `longrope` switches factor sets at a sequence length; a bundle has one
table, so it takes the set transformers uses for a sequence of `max_context` tokens and says which. Variants that
rescale with the running length (`dynamic`) or are not implemented are refused by name.

Partial rotary (`partial_rotary_factor` < 1) rotates the first `rotary_dim` dims of each head with rotate_half
over those dims. The graph instead rotates all dims with zero frequencies for the rest, after reordering each q/k
head (`rotary_order`) so rotate_half over the whole head pairs the same dims: cos 1 and sin 0 leave the others
bit for bit, q·k is unchanged by a permutation applied to both, and GroupQueryAttention's built-in rotary (whose
partial tables must be a multiple of 16 dims wide) and the static graph's plain rotary need no second path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgespec.export.errors import ExportError

SCALINGS = ("default", "linear", "llama3", "longrope", "yarn")


@dataclass
class RopeSpec:
    """One RoPE variant of a model; Gemma 3 has two (local and global layers)."""

    theta: float
    rotary_dim: int  # dims rotated per head: head_dim · partial_rotary_factor
    scaling: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_positions: int = 0  # llama3, longrope
    short_factor: list[float] | None = None  # longrope
    long_factor: list[float] | None = None  # longrope
    attention_factor: float = 1.0  # longrope, yarn: cos and sin are multiplied by it
    beta_fast: float = 32.0  # yarn: the ramp between extrapolated and interpolated frequencies
    beta_slow: float = 1.0
    truncate: bool = True


@dataclass
class RopeTable:
    """cos/sin rows for positions 0..max_context-1, as GroupQueryAttention wants them: [max_ctx, head_dim/2]."""

    cos: np.ndarray
    sin: np.ndarray
    note: str = ""

    @staticmethod
    def from_inv_freq(inv_freq: np.ndarray, max_context: int, scaling: float = 1.0, note: str = "") -> RopeTable:
        pos = np.arange(max_context, dtype=np.float64)[:, None]
        angles = pos * inv_freq.astype(np.float64)[None, :]
        return RopeTable(cos=(np.cos(angles) * scaling).astype(np.float32),
                         sin=(np.sin(angles) * scaling).astype(np.float32), note=note)


def rope_from_parameters(params: dict, head_dim: int, max_position_embeddings: int) -> RopeSpec:
    """A `RopeSpec` from one standardized `config.rope_parameters` dict (transformers 5 moves rope_theta,
    partial_rotary_factor and original_max_position_embeddings into it)."""
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in SCALINGS:
        raise ExportError(f"unsupported: RoPE scaling {kind!r} (edge-export implements {', '.join(SCALINGS)})")
    rotary_dim = int(head_dim * params.get("partial_rotary_factor", 1.0) or 1.0)
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
        raise ExportError(f"unsupported: rotary dimension {rotary_dim} of a {head_dim}-wide head")
    spec = RopeSpec(theta=float(params["rope_theta"]), rotary_dim=rotary_dim, scaling=kind)
    if kind == "linear":
        spec.factor = float(params["factor"])
    elif kind == "llama3":
        spec.factor = float(params["factor"])
        spec.low_freq_factor = float(params["low_freq_factor"])
        spec.high_freq_factor = float(params["high_freq_factor"])
        spec.original_max_positions = int(params["original_max_position_embeddings"])
    elif kind == "longrope":
        original = int(params["original_max_position_embeddings"])
        factor = params.get("factor") or max_position_embeddings / original
        attention = params.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        spec.factor, spec.attention_factor, spec.original_max_positions = float(factor), float(attention), original
        spec.short_factor = [float(x) for x in params["short_factor"]]
        spec.long_factor = [float(x) for x in params["long_factor"]]
    elif kind == "yarn":
        _yarn_parameters(spec, params, max_position_embeddings)
    return spec


def _yarn_parameters(spec: RopeSpec, params: dict, max_position_embeddings: int) -> None:
    """transformers' `_compute_yarn_parameters`: the factor, the attention factor (mscale) and the ramp's betas."""
    original = int(params["original_max_position_embeddings"])
    factor = params.get("factor") or max_position_embeddings / original
    attention = params.get("attention_factor")
    if attention is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        attention = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
                     if mscale and mscale_all_dim else _yarn_mscale(factor, 1.0))
    spec.factor, spec.attention_factor, spec.original_max_positions = float(factor), float(attention), original
    spec.beta_fast = float(params.get("beta_fast") or 32)
    spec.beta_slow = float(params.get("beta_slow") or 1)
    spec.truncate = bool(params.get("truncate", True))


def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inverse_frequencies(rope: RopeSpec, max_context: int) -> tuple[np.ndarray, str]:
    """float32 inverse frequencies [rotary_dim/2] and a note on any choice made for this `max_context`."""
    dim = rope.rotary_dim
    exponents = np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)
    powers = np.float32(rope.theta) ** exponents
    if rope.scaling == "longrope":
        long = max_context > rope.original_max_positions  # transformers: long once the sequence passes the original
        factors = np.asarray(rope.long_factor if long else rope.short_factor, np.float32)
        note = "" if rope.long_factor == rope.short_factor else (
            f"longrope: {'long' if long else 'short'} factors, as transformers uses for a sequence of {max_context} "
            f"tokens (original context {rope.original_max_positions})")
        return np.float32(1.0) / (factors * powers), note
    inv_freq = np.float32(1.0) / powers
    if rope.scaling == "linear":
        return inv_freq / np.float32(rope.factor), ""
    if rope.scaling == "llama3":
        return _llama3(inv_freq, rope), ""
    if rope.scaling == "yarn":
        return _yarn(powers, rope), ""
    return inv_freq, ""


def _llama3(inv_freq: np.ndarray, rope: RopeSpec) -> np.ndarray:
    """Llama 3.1's frequency-dependent interpolation (transformers' `_compute_llama3_parameters`)."""
    old = rope.original_max_positions
    low_wavelen, high_wavelen = old / rope.low_freq_factor, old / rope.high_freq_factor
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(rope.factor), inv_freq).astype(np.float32)
    smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / np.float32(rope.factor) + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(powers: np.ndarray, rope: RopeSpec) -> np.ndarray:
    """YaRN: original frequencies for the fast dims, frequencies divided by the factor for the slow ones, a linear
    ramp between the dims where `beta_fast` and `beta_slow` rotations fit in the original context."""
    dim, base = rope.rotary_dim, rope.theta

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(rope.original_max_positions / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation = 1 - ramp
    interpolated = np.float32(1.0) / (np.float32(rope.factor) * powers)
    return interpolated * (1 - extrapolation) + (np.float32(1.0) / powers) * extrapolation


def rope_table(rope: RopeSpec, head_dim: int, max_context: int) -> RopeTable:
    """The [max_context, head_dim/2] table; past rotary_dim/2 it is cos 1, sin 0 (see `rotary_order`), unscaled
    by longrope's attention factor, which transformers applies to the rotated dims only."""
    inv_freq, note = inverse_frequencies(rope, max_context)
    table = RopeTable.from_inv_freq(inv_freq, max_context, rope.attention_factor, note)
    rest = head_dim // 2 - len(inv_freq)
    table.cos = np.concatenate([table.cos, np.ones((max_context, rest), np.float32)], axis=1)
    table.sin = np.concatenate([table.sin, np.zeros((max_context, rest), np.float32)], axis=1)
    return table


def rotary_order(head_dim: int, rotary_dim: int) -> np.ndarray:
    """Dim order within a q/k head under which rotating the whole head equals rotating its first `rotary_dim` dims.

    rotate_half over `rotary_dim` pairs dim i with i + rotary_dim/2; over the whole head it pairs i with
    i + head_dim/2. Putting the rotated halves at 0.. and head_dim/2.. and the passed-through dims after each
    gives the same pairs, and the passed-through dims get zero frequencies.
    """
    half, rest = rotary_dim // 2, (head_dim - rotary_dim) // 2
    return np.concatenate([np.arange(half), rotary_dim + np.arange(rest), half + np.arange(half),
                           rotary_dim + rest + np.arange(rest)])
