"""The GGUF contract is defined once per language (python/actsparse/schema.py and
native/include/actsparse-schema.h); this checks that the two definitions say the same."""

from __future__ import annotations

import re

import pytest

from actsparse import schema
from helpers import REPO

HEADER = (REPO / "native" / "include" / "actsparse-schema.h").read_text()


def _defines() -> dict[str, str]:
    return dict(re.findall(r"^#define (ACTSPARSE_\w+) (.+)$", HEADER, re.M))


def _c_string(expr: str, defines: dict[str, str]) -> str:
    """A C string expression of literals and ACTSPARSE_ macros, concatenated."""
    out = ""
    for token in re.findall(r'"[^"]*"|ACTSPARSE_\w+', expr):
        out += token[1:-1] if token.startswith('"') else _c_string(defines[token], defines)
    return out


def _initializers(table: str) -> list[list[str]]:
    body = re.search(rf"{table}\[[^\]]*\] = \{{(.*?)\n\}};", HEADER, re.S)
    assert body, f"{table} not found in the header"
    return [re.split(r",\s*", row.strip()) for row in re.findall(r"\{([^{}]*)\}", body.group(1))]


def _python_pattern(c_pattern: str) -> str:
    return c_pattern.replace("%d", "{}")


def test_keys_version_and_constants_agree() -> None:
    defines = _defines()
    keys = {
        name: value
        for name, value in vars(schema).items()
        if name.startswith("KEY_") and name != "KEY_PREFIX"
    }
    c_keys = {
        name[len("ACTSPARSE_") :]: _c_string(v, defines) for name, v in defines.items() if "_KEY_" in name
    }
    assert c_keys == keys
    assert all(k.startswith(schema.KEY_PREFIX) for k in keys.values())
    assert int(defines["ACTSPARSE_FORMAT_VERSION"]) == schema.FORMAT_VERSION
    assert float(defines["ACTSPARSE_LEVEL_TOLERANCE"]) == schema.LEVEL_TOLERANCE
    assert float(defines["ACTSPARSE_SPARSE_BYTES_MARGIN"]) == schema.SPARSE_BYTES_MARGIN


def test_kinds_agree_in_order_and_names() -> None:
    defines = _defines()
    rows = _initializers("ACTSPARSE_KINDS")
    c_kinds = [tuple(_python_pattern(_c_string(cell, defines)) for cell in row) for row in rows]
    py_kinds = [(k.name, k.thresh, k.weight, k.copy) for k in schema.KINDS]
    assert c_kinds == py_kinds
    enum = re.search(r"enum actsparse_kind \{(.*?)\};", HEADER, re.S).group(1)
    numbers = dict(re.findall(r"(ACTSPARSE_\w+) = (\d+)", enum))
    assert int(numbers["ACTSPARSE_N_KINDS"]) == len(schema.KINDS)


def test_architectures_and_activations_agree() -> None:
    rows = _initializers("ACTSPARSE_ARCH_ACTIVATION")
    assert {r[0].strip('"'): r[1].strip('"') for r in rows} == schema.ARCH_ACTIVATION


@pytest.mark.parametrize(
    ("name", "expected"),
    [("blk.3.ffn_act_thresh", True), ("blk.12.attn_output_t.weight", True), ("blk.0.ffn_down.weight", False),
     ("output.weight", False), ("blk.1.attn_q_in_thresh", True), ("blk.1.attn_q.weight", False)],
)  # fmt: skip
def test_sparsity_tensor_names(name: str, expected: bool) -> None:
    assert schema.is_sparsity_tensor(name) is expected


def test_level_matching_and_the_copy_cost_rule() -> None:
    levels = [0.3, 0.5, 0.7]
    assert schema.level_index(levels, 0.50004) == 1 and schema.level_index(levels, 0.5002) is None
    # (1 - 0.5) x 180 = 90 <= 0.8 x 120 = 96: the copy pays; at 0.4, 108 > 96: it does not
    assert schema.sparse_kernel_pays(0.5, 180, 120) and not schema.sparse_kernel_pays(0.4, 180, 120)
