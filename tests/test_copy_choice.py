"""--transposed-type auto: the equal-quality rule, the bytes it compares, the weights it measures,
and what the converter records and rewrites."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from actsparse import benchmark, convert, copy_choice, gguf_io, schema, transpose
from actsparse.gguf_io import field_value
from helpers import DECODE_CHECK_TOLERANCE, checked_decode_stats

CHESS_KINDS = schema.sparse_kinds("chess", True)
KIND_NAMES = [k.name for k in CHESS_KINDS]


def power_curve(a: float, g: float, levels: list[float]) -> dict[float, float]:
    return {s: a * s**g for s in levels}


def test_equal_quality_level_meets_its_definition() -> None:
    a, g = 0.9, 3.0
    measured = power_curve(a, g, [0.3, 0.4])
    s = copy_choice.equal_quality_level(measured, 0.6, 0.05)
    assert s is not None and s < 0.6
    assert a * s**g == pytest.approx(a * 0.6**g - 0.05, rel=1e-9)
    assert copy_choice.equal_quality_level(measured, 0.6, -0.01) == 0.6  # dearer q8_0: same level
    assert copy_choice.equal_quality_level(measured, 0.3, a * 0.3**g) is None  # nothing left to spend


def test_choose_keeps_same_only_where_every_level_wins() -> None:
    measured = power_curve(1.0, 3.0, [0.3, 0.4])
    levels = [0.3, 0.5, 0.7]

    def bytes_(policy: str, s: float) -> float:  # same reads half of q8_0's copy bytes
        return 100.0 - s * (60.0 if policy == "same" else 30.0)

    cheap = copy_choice.choose({"q8_0": 0.002, "same": 0.004}, measured, levels, bytes_)
    assert cheap.policy == "same" and all(v.same_wins for v in cheap.verdicts)
    # the same copies cost more than level 0.3 itself: q8_0, though same wins above
    dear = copy_choice.choose({"q8_0": 0.002, "same": 0.002 + 0.3**3}, measured, levels, bytes_)
    assert dear.policy == "q8_0"
    assert dear.verdicts[0].same_level is None and dear.verdicts[-1].same_wins
    assert dear.decode_copy_cost == 0.0 and cheap.decode_copy_cost == pytest.approx(0.002)


def test_effective_weight_is_what_the_copy_holds(small_sparse_model: Path, small_model_path: Path) -> None:
    """The weights the copy cost is measured with are the written copy's values, exactly."""
    src = {t.name: t for t in GGUFReader(small_model_path).tensors}
    out = {t.name: t for t in GGUFReader(small_sparse_model).tensors}
    policy = field_value(GGUFReader(small_sparse_model), schema.KEY_TRANSPOSED_TYPE)
    for kind in CHESS_KINDS:
        w = src[kind.weight_name(2)]
        written = transpose.dequantized(out[kind.copy_name(2)]).T
        assert np.array_equal(copy_choice.effective_weight(w, policy), written), kind.name


def test_decode_bytes_agree_with_the_bench(small_sparse_model: Path) -> None:
    info = gguf_io.describe_model(gguf_io.open_gguf(small_sparse_model), small_sparse_model)
    policy = field_value(info.reader, schema.KEY_TRANSPOSED_TYPE)
    assert copy_choice.decode_weight_bytes(info, CHESS_KINDS, None, 0.0) == pytest.approx(
        benchmark.weight_bytes_per_token(small_sparse_model)
    )
    for level in (0.3, 0.5, 0.7):
        bench = benchmark.weight_bytes_per_token(small_sparse_model, dict.fromkeys(KIND_NAMES, level))
        assert copy_choice.decode_weight_bytes(info, CHESS_KINDS, policy, level) == pytest.approx(bench), (
            level
        )
    same, q8 = (copy_choice.decode_weight_bytes(info, CHESS_KINDS, p, 0.7) for p in ("same", "q8_0"))
    assert same < q8  # a Q4_1 row is smaller than a Q8_0 one


def test_default_conversion_records_its_choice(small_sparse_model: Path) -> None:
    r = GGUFReader(small_sparse_model)
    policy = field_value(r, schema.KEY_TRANSPOSED_TYPE)
    costs = field_value(r, schema.KEY_TRANSPOSED_TYPE_KLD)
    assert policy in copy_choice.CANDIDATES
    assert len(costs) == len(copy_choice.CANDIDATES) and all(c > 0 for c in costs)
    assert costs[1] > costs[0]  # requantizing 4-bit weights along the other axis costs more than Q8_0
    tensors = {t.name: t for t in r.tensors}
    for il in range(3):
        for kind in CHESS_KINDS:
            w = tensors[kind.weight_name(il)]
            want = transpose.transposed_type(w.tensor_type, int(w.shape[1]), policy)
            assert tensors[kind.copy_name(il)].tensor_type == want


def test_rewrite_copies_changes_only_the_copies(
    small_sparse_model: Path, small_model_path: Path, tmp_path: Path
) -> None:
    """The path taken when `same` wins: copies rewritten in the original's type, all else kept."""
    f = tmp_path / "rewritten.gguf"
    shutil.copyfile(small_sparse_model, f)
    info = gguf_io.describe_model(gguf_io.open_gguf(small_model_path), small_model_path)
    first = field_value(GGUFReader(f), schema.KEY_TRANSPOSED_TYPE)
    other = next(c for c in copy_choice.CANDIDATES if c != first)
    choice = copy_choice.CopyChoice(other, {"q8_0": 0.01, "same": 0.02}, {}, [])
    convert.rewrite_copies(info, schema.sparse_kinds("chess", True), f, choice)
    before = {t.name: t for t in GGUFReader(small_sparse_model).tensors}
    after_reader = GGUFReader(f)
    after = {t.name: t for t in after_reader.tensors}
    assert before.keys() == after.keys()
    for name, t in before.items():
        if schema.is_sparsity_tensor(name) and name.endswith("_t.weight"):
            orig = before[name.replace("_t.weight", ".weight")]
            want = transpose.transposed_type(orig.tensor_type, int(orig.shape[1]), other)
            assert after[name].tensor_type == want
            assert np.array_equal(
                np.asarray(after[name].data).reshape(-1), transpose.transposed_copy(orig, want).reshape(-1)
            )
        else:
            assert np.array_equal(np.asarray(after[name].data), np.asarray(t.data)), name
    assert field_value(after_reader, schema.KEY_TRANSPOSED_TYPE) == other
    assert field_value(after_reader, schema.KEY_TRANSPOSED_TYPE_KLD) == pytest.approx([0.01, 0.02])
    assert field_value(after_reader, schema.KEY_LEVELS) == pytest.approx(
        field_value(GGUFReader(small_sparse_model), schema.KEY_LEVELS)
    )
    check = checked_decode_stats(f, 0.5, threads=2, tokens=6)["decode_check"]
    assert check["products"] > 0 and check["max_rel_err"] < DECODE_CHECK_TOLERANCE[other], check
