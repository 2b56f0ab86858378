"""`--transposed-type auto`: the type of the transposed copies, chosen per file by measurement.

Decode reads ffn_down, attn_q and attn_output through their transposed copies, so it computes with
the copies' values. A copy in the original's type (`same`) reads the fewest bytes but requantizes
a 4-bit weight along its other axis; `q8_0` reads 1.7-1.9x the bytes of a 4-bit row and costs
almost nothing. Which decodes faster at equal quality depends on the model, so the converter
measures it:
- each candidate's copy cost: the KL divergence, on calibration text, of the dense model whose
  copied weights are replaced by the copies' values (F16), against the original;
- the sparsity's own cost K(s) on the converted file at its lowest and next level.
Costs add, as the sparse kinds do, so `same` matches q8_0's quality at level s by running at the
lower level s' where K(s') = K(s) - (c_same - c_q8) (K log-log interpolated through the two
measured levels). `same` is chosen only if, at every level of the file, it reaches that quality
and then reads fewer weight bytes per decoded token than q8_0 at s.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf.gguf_reader import ReaderTensor

from . import gguf_io, schema, transpose
from .gguf_io import ModelInfo, NewTensor

AUTO = "auto"
CANDIDATES = schema.TRANSPOSED_CANDIDATES  # q8_0 first: the safe one wins ties


def effective_weight(t: ReaderTensor, policy: str) -> np.ndarray:
    """The weight decode computes with when it reads `t` through its `policy` copy: float32
    [ne1, ne0], laid out as the original."""
    qtype = transpose.transposed_type(t.tensor_type, int(t.shape[1]), policy)
    copy = transpose.transposed_copy(t, qtype)
    as_copy = t._replace(tensor_type=qtype, shape=np.array([t.shape[1], t.shape[0]]), data=copy)
    return np.ascontiguousarray(transpose.dequantized(as_copy).T)


def copied_weights(info: ModelInfo, kinds: Sequence[schema.Kind]) -> list[str]:
    return [k.weight_name(il) for il in range(info.n_layer) for k in kinds]


def policies_differ(info: ModelInfo, kinds: Sequence[schema.Kind]) -> bool:
    """Whether the candidates give any copy a different type (not for float or Q8_0 models)."""
    for name in copied_weights(info, kinds):
        t = info.tensor(name)
        types = {transpose.transposed_type(t.tensor_type, int(t.shape[1]), p) for p in CANDIDATES}
        if len(types) > 1:
            return True
    return False


def write_effective_model(
    info: ModelInfo, out: Path, policy: str, kinds: Sequence[schema.Kind], dtype: str = "f16"
) -> None:
    """The dense model with each copied weight replaced by the values of its `policy` copy, stored
    as F16 (or F32) so that nothing else changes."""
    qtype = transpose.Q.F16 if dtype == "f16" else transpose.Q.F32
    np_type = np.float16 if dtype == "f16" else np.float32
    replaced = set(copied_weights(info, kinds))
    new = [
        NewTensor(
            t.name,
            (int(t.shape[0]), int(t.shape[1])),
            qtype,
            lambda t=t: effective_weight(t, policy).astype(np_type),
        )  # fmt: skip
        for t in info.reader.tensors
        if t.name in replaced
    ]
    gguf_io.write_model(info.reader, info.arch, out, {}, new, drop=lambda name: name in replaced)


def decode_weight_bytes(
    info: ModelInfo, kinds: Sequence[schema.Kind], policy: str | None, level: float
) -> float:
    """Weight bytes one decoded token reads at `level` with every channel equally likely active
    and the copies in `policy` (None: dense): ffn_up and the copies the runtime reads (the
    copy-cost rule) read the active share of their rows, everything else is read whole."""
    total = float(sum(info.tensor(n).n_bytes for n in schema.decode_matrices(info.tensors)))
    if policy is None or level <= 0:
        return total
    for il in range(info.n_layer):
        for kind in kinds:
            w = info.tensor(kind.weight_name(il))
            qtype = transpose.transposed_type(w.tensor_type, int(w.shape[1]), policy)
            copy_bytes = int(w.shape[0]) * gguf_io.row_nbytes(qtype, int(w.shape[1]))
            if schema.sparse_kernel_pays(level, copy_bytes, w.n_bytes):
                total -= w.n_bytes - (1.0 - level) * copy_bytes
            if kind is schema.FFN:
                total -= level * info.tensor(f"blk.{il}.ffn_up.weight").n_bytes
    return total


@dataclass(frozen=True)
class LevelVerdict:
    level: float
    q8_0_bytes: float
    same_level: float | None  # the level at which `same` matches q8_0's quality at `level`
    same_bytes: float | None

    @property
    def same_wins(self) -> bool:
        return self.same_bytes is not None and self.same_bytes < self.q8_0_bytes


@dataclass(frozen=True)
class CopyChoice:
    policy: str
    copy_kld: dict[str, float]  # candidate -> measured copy cost
    level_kld: dict[float, float]  # the sparsity's own cost at the measured levels
    verdicts: list[LevelVerdict]

    @property
    def decode_copy_cost(self) -> float:
        """What the chosen copies add to decode's KL divergence beyond q8_0 copies."""
        return max(0.0, self.copy_kld[self.policy] - self.copy_kld[CANDIDATES[0]])

    def summary(self) -> str:
        costs = ", ".join(f"{p} {v:.4f}" for p, v in self.copy_kld.items())
        cells = []
        for v in self.verdicts:
            at = "unreachable" if v.same_level is None else f"same@{v.same_level:.3f}"
            ratio = "" if v.same_bytes is None else f" ({v.same_bytes / v.q8_0_bytes:.3f}x bytes)"
            cells.append(f"{v.level:g}: {at}{ratio}")
        return f"copies {self.policy} (copy KLD {costs}; at equal quality {'; '.join(cells)})"


def equal_quality_level(level_kld: dict[float, float], level: float, extra: float) -> float | None:
    """The level s' with K(s') = K(level) - extra, K log-log interpolated (and extrapolated)
    through the measured levels; `level` itself when extra <= 0, None when unreachable."""
    if extra <= 0:
        return level
    (s0, k0), (s1, k1) = sorted(level_kld.items())[:2]
    k0, k1 = max(k0, 1e-6), max(k1, k0 * (1 + 1e-6))
    slope = math.log(k1 / k0) / math.log(s1 / s0)  # K ~ s**slope
    k_level = k0 * (level / s0) ** slope
    if k_level - extra <= 0:
        return None
    return level * ((k_level - extra) / k_level) ** (1.0 / slope)


def choose(
    copy_kld: dict[str, float],
    level_kld: dict[float, float],
    levels: Sequence[float],
    weight_bytes: Callable[[str, float], float],
) -> CopyChoice:
    """`same` where it reads fewer bytes than q8_0 at equal quality at every level, else q8_0."""
    extra = copy_kld["same"] - copy_kld["q8_0"]
    verdicts = []
    for s in levels:
        s_same = equal_quality_level(level_kld, s, extra)
        same_bytes = None if s_same is None else weight_bytes("same", s_same)
        verdicts.append(LevelVerdict(s, weight_bytes("q8_0", s), s_same, same_bytes))
    policy = "same" if verdicts and all(v.same_wins for v in verdicts) else "q8_0"
    return CopyChoice(policy, copy_kld, level_kld, verdicts)


FALLBACK_LEVELS = (0.3, 0.5)  # judged at where a file has no numeric level (kld:X only)


def probe_levels(levels: Sequence[float]) -> list[float]:
    """The two sparsities K is measured at: the lowest two levels (one more above a single one)."""
    ordered = sorted(set(levels))
    return ordered[:2] if len(ordered) > 1 else [ordered[0], min(0.9, ordered[0] + 0.2)]
