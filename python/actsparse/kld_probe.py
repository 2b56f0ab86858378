"""The KL divergence of a converted file against its own dense run on calibration text, measured
with llama-perplexity, for the converter's searches (`--allocate`, `--sparsity kld:X`): the file's
thresholds at one level slot are rewritten between runs, the dense logits computed once."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from .calibration import CalibrationError


@dataclass(frozen=True)
class ProbeText:
    """How much calibration text each run reads."""

    tokens: int = 512
    window: int = 512
    threads: int = 2


class KLDProbe:
    """`with KLDProbe(model, level, text, shape) as probe: probe.kld()` (one-line CalibrationError
    when llama-perplexity fails)."""

    def __init__(self, model: Path, level_slot: float, text: str, shape: ProbeText) -> None:
        from . import evaluate

        self.model, self.level_slot, self.shape = model, level_slot, shape
        self.window = max(16, min(shape.window, shape.tokens))
        self.chunks = -(-shape.tokens // self.window)
        while evaluate.scored_tokens(self.window, self.chunks) < evaluate.KLD_MIN_SCORED:
            self.chunks += 1
        self._text = text
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> KLDProbe:
        from . import evaluate

        self._tmp = tempfile.TemporaryDirectory(prefix="actsparse-probe-")
        tmp = Path(self._tmp.name)
        self.text_file, self.base = tmp / "probe.txt", tmp / "dense.kld"
        # a generous prefix: llama-perplexity tokenizes the whole file on every run
        self.text_file.write_text(self._text[: 32 * self.window * self.chunks], encoding="utf-8")
        try:
            evaluate.dense_text_metrics(
                self.model, self.text_file, self.base, self.window, self.chunks, self.shape.threads
            )
        except evaluate.ToolOutputError as e:
            self._tmp.cleanup()
            raise CalibrationError(f"dense probe run: {e}") from None
        return self

    def kld(self, level: float | None = None) -> float:
        """Mean KL divergence at `level` (default: the level slot), with the file's thresholds as
        they are now."""
        from . import evaluate

        try:
            m, _ = evaluate.sparse_text_metrics(
                self.model, self.level_slot if level is None else level, self.text_file, self.base,
                self.window, self.chunks, self.shape.threads,
            )  # fmt: skip
        except evaluate.ToolOutputError as e:
            raise CalibrationError(f"probe run: {e}") from None
        return float(m["kld_mean"])

    def dense_kld(self, other: Path) -> float:
        """Mean KL divergence of another dense model (other weights, same vocabulary) against this
        model's dense run."""
        from . import evaluate

        try:
            shape = (self.window, self.chunks, self.shape.threads)
            return evaluate.dense_kld(other, self.text_file, self.base, *shape)
        except evaluate.ToolOutputError as e:
            raise CalibrationError(f"probe run: {e}") from None

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
