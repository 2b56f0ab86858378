"""Calibration statistics, collected by running the model in this project's llama.cpp build.

`actsparse-calibrate` (native/tools) does the work; this module runs it, reports its progress and
reads the statistics GGUF it writes.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import engine, schema
from .gguf_io import GGUFError, atomic_output, field_value, open_gguf


class CalibrationError(RuntimeError):
    """Calibration could not run; the message is one line for the user."""


# The nodes --dump-layers stores rows of: FFN gate (before and after the activation), up, and the
# inputs of attention's q and o, of the FFN (ffn_norm) and of W_down.
DUMPED_NODES = ("ffn_gate", "ffn_act", "ffn_up", "attn_q_in", "attn_o_in", "ffn_in", "ffn_down_in")
# The dumped node each input kind's product reads: q, k and v share the attention input, gate and
# up the FFN's.
INPUT_NODES = {
    "attn_q_in": "attn_q_in", "attn_k_in": "attn_q_in", "attn_v_in": "attn_q_in", "attn_o_in": "attn_o_in",
    "ffn_gate_in": "ffn_in", "ffn_up_in": "ffn_in", "ffn_down_in": "ffn_down_in",
}  # fmt: skip


@dataclass
class LayerStats:
    mean_abs_up: np.ndarray
    act_hist: np.ndarray
    score_hist: np.ndarray | None
    q_in_hist: np.ndarray | None
    o_in_hist: np.ndarray | None
    dumps: dict[str, np.ndarray] = field(default_factory=dict)
    # weighted scores: ||W[:, i]|| per kind name ("ffn", "attn_q_in", ...), which every histogram
    # but act_hist (and the score factor of the CHESS one) is weighted by
    col_norms: dict[str, np.ndarray] = field(default_factory=dict)
    # the R-Sparse kinds' histograms of |x_i| ||W[:, i]||, by kind name ("ffn_gate_in", ...)
    input_hists: dict[str, np.ndarray] = field(default_factory=dict)

    def input_hist(self, kind: schema.Kind) -> np.ndarray | None:
        """The histogram the thresholds of an input kind (every kind but FFN's) are taken from."""
        if kind is schema.ATTN_Q_IN:
            return self.q_in_hist
        if kind is schema.ATTN_O_IN:
            return self.o_in_hist
        return self.input_hists.get(kind.name)

    def input_dump(self, kind: schema.Kind) -> np.ndarray | None:
        """The dumped rows [tokens, inputs] entering the product of an input kind (--dump-layers)."""
        return self.dumps.get(INPUT_NODES[kind.name])


@dataclass
class CalibrationStats:
    activation: str
    tokens: int
    window: int
    layers: list[LayerStats]
    has_scores: bool = True  # the CHESS pass ran (CATS needs only the first)
    source: str = ""  # calibration text name and sha256, as given to the collector
    source_sha256: str = ""
    weighted_scores: bool = False  # collected with --column-norms


def run_collector(
    model: Path,
    text_file: Path,
    out_file: Path,
    *,
    tokens: int,
    window: int,
    threads: int,
    chess: bool = True,
    source: tuple[str, str] = ("", ""),
    dump_layers: tuple[int, ...] = (),
    dump_tokens: int = 0,
    sparse: float = 0.0,
    mean_abs_up_from: Path | None = None,
    column_norms: Path | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> None:
    """Runs actsparse-calibrate; on_progress receives the tokens done so far."""
    cmd = [
        str(engine.binary("actsparse-calibrate")),
        "-m", str(model), "-f", str(text_file), "-o", str(out_file),
        "--calib-tokens", str(tokens), "-c", str(window), "-t", str(threads),
    ]  # fmt: skip
    if not chess:
        cmd.append("--cats-only")
    if source[0]:
        cmd += ["--source", source[0], "--source-sha256", source[1]]
    if dump_layers:
        cmd += ["--dump-layers", ",".join(map(str, dump_layers)), "--dump-tokens", str(dump_tokens)]
    if sparse:
        cmd += ["--sparse", f"{sparse:g}"]
    if mean_abs_up_from is not None:
        cmd += ["--mean-abs-up", str(mean_abs_up_from)]
    if column_norms is not None:
        cmd += ["--column-norms", str(column_norms)]
    errors: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stderr is not None
        for line in proc.stderr:
            parts = line.split()
            if len(parts) == 3 and parts[0] == "progress":
                if on_progress is not None:
                    on_progress(int(parts[1]))
            elif line.strip():
                errors.append(line.strip())
        rc = proc.wait()
    if rc != 0:
        msg = next((e for e in reversed(errors) if e.startswith("error:")), errors[-1] if errors else "")
        raise CalibrationError(msg.removeprefix("error: ") or f"actsparse-calibrate exited with {rc}")


def read_stats(path: Path) -> CalibrationStats:
    try:
        reader = open_gguf(path)
    except GGUFError as e:
        raise CalibrationError(str(e)) from None
    tensors = {t.name: t for t in reader.tensors}

    def get(name: str) -> np.ndarray | None:
        t = tensors.get(name)
        if t is None:
            return None
        return np.array(t.data, dtype=t.data.dtype).reshape([int(x) for x in reversed(t.shape)])

    if field_value(reader, "actsparse.stats.version") is None:
        raise CalibrationError(f"{path} is not a statistics file written by actsparse-calibrate")
    n_layer = int(field_value(reader, "actsparse.stats.n_layer"))
    chess_kinds = schema.sparse_kinds("chess", True)  # their histograms have fields of their own
    layers = []
    for il in range(n_layer):
        p = f"blk.{il}."
        dumps = {}
        for kind in DUMPED_NODES:
            d = get(p + "dump." + kind)
            if d is not None:
                dumps[kind] = d
        layers.append(
            LayerStats(
                mean_abs_up=get(p + "ffn_up_mean_abs").reshape(-1),
                act_hist=get(p + "ffn_act_hist").reshape(-1),
                score_hist=_flat(get(p + "ffn_score_hist")),
                q_in_hist=_flat(get(p + "attn_q_in_hist")),
                o_in_hist=_flat(get(p + "attn_o_in_hist")),
                dumps=dumps,
                col_norms={
                    kind.name: v.reshape(-1)
                    for kind in schema.KINDS
                    if (v := get(f"{p}{kind.name}_col_norm")) is not None
                },
                input_hists={
                    kind.name: v.reshape(-1)
                    for kind in schema.KINDS
                    if kind not in chess_kinds and (v := get(f"{p}{kind.name}_hist")) is not None
                },
            )
        )
    return CalibrationStats(
        activation=str(field_value(reader, "actsparse.stats.activation")),
        tokens=int(field_value(reader, "actsparse.stats.tokens")),
        window=int(field_value(reader, "actsparse.stats.window")),
        layers=layers,
        has_scores=bool(field_value(reader, "actsparse.stats.has_scores", True)),
        source=str(field_value(reader, "actsparse.stats.source", "")),
        source_sha256=str(field_value(reader, "actsparse.stats.source_sha256", "")),
        weighted_scores=bool(field_value(reader, "actsparse.stats.column_norms", False)),
    )


def _flat(a: np.ndarray | None) -> np.ndarray | None:
    return None if a is None else a.reshape(-1)


def collect(model: Path, text: str, save_to: Path | None = None, **kwargs: object) -> CalibrationStats:
    """Run the collector on `text` and return its statistics.

    The statistics file is kept at `save_to` (renamed into place only when complete), else removed.
    """
    with tempfile.TemporaryDirectory(prefix="actsparse-calib-") as tmp:
        text_file = Path(tmp) / "calib.txt"
        text_file.write_text(text, encoding="utf-8")
        out = Path(tmp) / "stats.gguf"
        run_collector(model, text_file, out, **kwargs)  # type: ignore[arg-type]
        stats = read_stats(out)
        if save_to is not None:
            with atomic_output(save_to) as dest:
                shutil.copyfile(out, dest)
        return stats
