"""The sparse GGUF schema (docs/gguf-format.md) for Python: the contract between the converter and
the runtime. Key names, tensor names, the kinds of sparse input, each architecture's activation,
the level-matching tolerance and the copy-cost rule are defined here and nowhere else in Python.

native/include/actsparse-schema.h is the same contract for C and C++; tests/test_schema.py checks
that the two agree. Change both in one commit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

FORMAT_VERSION = 1
KEY_PREFIX = "actsparse."

KEY_FORMAT_VERSION = "actsparse.format_version"
KEY_METHOD = "actsparse.method"
KEY_LEVELS = "actsparse.levels"
KEY_DEFAULT_LEVEL = "actsparse.default_level"
KEY_ATTN = "actsparse.attn"
KEY_ACTIVATION = "actsparse.activation"
KEY_UP_STATISTIC = "actsparse.up_statistic"
KEY_TRANSPOSED_TYPE = "actsparse.transposed_type"
KEY_WEIGHTED_SCORES = "actsparse.weighted_scores"
KEY_CALIB_SOURCE = "actsparse.calibration.source"
KEY_CALIB_SHA256 = "actsparse.calibration.sha256"
KEY_CALIB_TOKENS = "actsparse.calibration.tokens"
KEY_CALIB_WINDOW = "actsparse.calibration.window"
KEY_CALIB_SPARSE_AWARE_TOKENS = "actsparse.calibration.sparse_aware_tokens"
KEY_TOOL = "actsparse.tool"
# Optional, f32 array [levels][n_layer][kinds]: the sparsity each layer's kind targets at each level
# (--allocate). Absent: every layer and kind targets the level itself.
KEY_ALLOCATION = "actsparse.allocation"
# Optional, f32 array [levels]: the KL budget (--sparsity kld:X) each level was found for, 0 where
# none. The runtime does not read it.
KEY_LEVEL_BUDGETS = "actsparse.level_budgets"
# Optional, f32 array [len(TRANSPOSED_CANDIDATES)]: each candidate copy type's measured KL cost
# (--transposed-type auto chose actsparse.transposed_type by it). The runtime does not read it.
KEY_TRANSPOSED_TYPE_KLD = "actsparse.transposed_type_kld"
TRANSPOSED_CANDIDATES = ("q8_0", "same")
# Not in files: a kv override at model load (bool) that keeps ffn_up of the layers with thresholds
# out of the CPU backend's repacked buffers, since sparse decode reads its single rows.
KEY_PLAIN_UP_ROWS = "actsparse.plain_up_rows"

# Two levels are the same level when they differ by less than this (the runtime matches --sparse
# values with it, so does every Python reader).
LEVEL_TOLERANCE = 1e-4

# The copy-cost rule: decode reads a transposed copy only where (1 - target) of its bytes is at
# most this share of the original's bytes, target being the layer's allocated sparsity at the level;
# elsewhere it multiplies the original by the masked input.
SPARSE_BYTES_MARGIN = 0.8


@dataclass(frozen=True)
class Kind:
    """One kind of sparse input: its thresholds, the product it feeds and that product's copy."""

    name: str  # as --sparse-stats, the statistics JSON and the mask trace name it
    thresh: str  # threshold tensor, "blk.{}..." formatted with the layer
    weight: str  # the product whose input is sparsified
    copy: str  # the product's transposed copy

    def thresh_name(self, il: int) -> str:
        return self.thresh.format(il)

    def weight_name(self, il: int) -> str:
        return self.weight.format(il)

    def copy_name(self, il: int) -> str:
        return self.copy.format(il)

    @property
    def weight_kind(self) -> str:
        """The product's per-layer tensor name without block and suffix ("ffn_down")."""
        return self.weight.split(".")[2]


FFN = Kind("ffn", "blk.{}.ffn_act_thresh", "blk.{}.ffn_down.weight", "blk.{}.ffn_down_t.weight")
ATTN_Q_IN = Kind("attn_q_in", "blk.{}.attn_q_in_thresh", "blk.{}.attn_q.weight", "blk.{}.attn_q_t.weight")
ATTN_O_IN = Kind(
    "attn_o_in", "blk.{}.attn_o_in_thresh", "blk.{}.attn_output.weight", "blk.{}.attn_output_t.weight"
)
# R-Sparse (--method r-sparse): the input of every other projection, scored |x_i| ||W[:, i]||.
ATTN_K_IN = Kind("attn_k_in", "blk.{}.attn_k_in_thresh", "blk.{}.attn_k.weight", "blk.{}.attn_k_t.weight")
ATTN_V_IN = Kind("attn_v_in", "blk.{}.attn_v_in_thresh", "blk.{}.attn_v.weight", "blk.{}.attn_v_t.weight")
FFN_GATE_IN = Kind(
    "ffn_gate_in", "blk.{}.ffn_gate_in_thresh", "blk.{}.ffn_gate.weight", "blk.{}.ffn_gate_t.weight"
)
FFN_UP_IN = Kind("ffn_up_in", "blk.{}.ffn_up_in_thresh", "blk.{}.ffn_up.weight", "blk.{}.ffn_up_t.weight")
# ffn_down's input (the gated product), read from the same copy as CHESS's FFN channels
FFN_DOWN_IN = Kind("ffn_down_in", "blk.{}.ffn_down_in_thresh", "blk.{}.ffn_down.weight", FFN.copy)
# numbered as the runtime numbers them
KINDS: tuple[Kind, ...] = (
    FFN,
    ATTN_Q_IN,
    ATTN_O_IN,
    ATTN_K_IN,
    ATTN_V_IN,
    FFN_GATE_IN,
    FFN_UP_IN,
    FFN_DOWN_IN,
)
# Files written before the R-Sparse kinds carry an allocation over these alone.
LEGACY_ALLOCATION_KINDS = 3

METHODS = ("chess", "cats", "r-sparse")

# Architectures whose llama.cpp graph has a separate gate, up and down projection (through
# llm_graph_context::build_ffn with a parallel gate), with the gate's activation.
ARCH_ACTIVATION = {
    "llama": "silu",
    "mistral3": "silu",
    "qwen2": "silu",
    "qwen3": "silu",
    "granite": "silu",
    "olmo2": "silu",
    "phi3": "silu",
    "gemma": "gelu",
    "gemma2": "gelu",
    "gemma3": "gelu",
}

_SUFFIXES = tuple(s for k in KINDS for s in (k.thresh[len("blk.{}") :], k.copy[len("blk.{}") :]))


def is_sparsity_tensor(name: str) -> bool:
    """A tensor the converter adds (thresholds or a transposed copy)."""
    return name.startswith("blk.") and name.endswith(_SUFFIXES)


def level_index(levels: Sequence[float], level: float) -> int | None:
    """Where `level` is in `levels` (the last match, as the runtime picks), or None."""
    matches = [i for i, v in enumerate(levels) if abs(v - level) < LEVEL_TOLERANCE]
    return matches[-1] if matches else None


def same_level(a: float, b: float) -> bool:
    return abs(a - b) < LEVEL_TOLERANCE


def sparse_kernel_pays(target: float, copy_bytes: float, original_bytes: float) -> bool:
    """The copy-cost rule at a layer's target sparsity."""
    return (1.0 - target) * copy_bytes <= SPARSE_BYTES_MARGIN * original_bytes


def decode_matrices(tensors: Mapping[str, Any]) -> list[str]:
    """The weights dense decode multiplies, in file order: every 2D weight but the norms, the added
    tensors and token_embd (only gathered) where output.weight exists."""
    out = []
    for name, t in tensors.items():
        if (
            not name.endswith(".weight")
            or is_sparsity_tensor(name)
            or "norm" in name.split(".")[-2]
            or len(t.shape) < 2
            or int(t.shape[1]) == 1
            or (name == "token_embd.weight" and "output.weight" in tensors)
        ):
            continue
        out.append(name)
    return out


def sparse_kinds(method: str, attn: bool) -> tuple[Kind, ...]:
    """The kinds a file of `method` carries, with attention (`attn`) or the FFN's alone (--no-attn).
    R-Sparse sparsifies the input of every projection; CHESS and CATS the FFN channels and, with
    attention, the q and o inputs."""
    if method == "r-sparse":
        ffn = (FFN_GATE_IN, FFN_UP_IN, FFN_DOWN_IN)
        return (ATTN_Q_IN, ATTN_O_IN, ATTN_K_IN, ATTN_V_IN, *ffn) if attn else ffn
    return (FFN, ATTN_Q_IN, ATTN_O_IN) if attn else (FFN,)


def copies(kinds: Sequence[Kind]) -> list[Kind]:
    """The kinds whose copy is a tensor of its own (ffn_down_t once, whichever kind reads it)."""
    seen: set[str] = set()
    return [k for k in kinds if not (k.copy in seen or seen.add(k.copy))]
