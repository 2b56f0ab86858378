"""The transformers reference for this project's llama.cpp runtime (optional extra ``reference``).

    from actsparse import reference
    model = reference.load_model("MODEL.sparse.gguf")          # float32 transformers model
    with reference.chess_masks(model, "MODEL.sparse.gguf", 0.5):
        logits = reference.token_logits(model, tokens)         # teacher-forced, [n, vocab]

:func:`load_model` loads a GGUF with transformers (``from_pretrained(dir, gguf_file=name)``;
transformers dequantizes the weights to float32). :func:`chess_masks` installs the CHESS masks of
a sparse GGUF at one of its levels with the runtime's semantics (``native/src/actsparse-runtime.cpp``
and ``docs/gguf-format.md``), compared in float32:

* FFN: ``a = act(W_gate x)``; channel i is kept where ``|a_i| > t_i`` and zeroed otherwise, then
  ``W_down (a * (W_up x))``.
* attention: the input of ``q_proj`` is zeroed elementwise where ``|x_j| <= t_q`` (``k_proj`` and
  ``v_proj`` read the dense input); the input of ``o_proj`` (the attention output, heads
  concatenated) is zeroed where ``|x_j| <= t_o``. A threshold tensor of one value per level is a
  scalar for all channels.

What remains different from llama.cpp is arithmetic: llama.cpp multiplies the 4-bit weights with
activations quantized to 8 bits (q8_1) and keeps K/V in float16, its sparse decode kernels read
the Q8_0 transposed copies of ``ffn_down``/``attn_q``/``attn_output``, and its SiLU is ggml's.

:func:`request_logliks` scores the same token requests as :mod:`actsparse.zeroshot` (one forward
per question, choices right-padded: causal attention never looks at the padding).
"""

from __future__ import annotations

import contextlib
import os
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import schema
from .runtime import MASK_KINDS
from .sparse_file import read_sparse_file
from .zeroshot import shared_context

if TYPE_CHECKING:
    from .zeroshot import Request

__all__ = [
    "KINDS",
    "RecordedMasks",
    "ChessMasks",
    "ChessThresholds",
    "chess_masks",
    "install_chess_masks",
    "load_model",
    "read_thresholds",
    "request_logliks",
    "token_logits",
]

DEFAULT_THREADS = 2


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the transformers reference needs torch and transformers (extra 'reference')"
        ) from e
    return torch


def load_model(path: str | os.PathLike[str], threads: int | None = DEFAULT_THREADS) -> Any:
    """A GGUF loaded into transformers: float32, eval mode; ``threads`` torch threads (None: leave)."""
    torch = _torch()
    from transformers import AutoModelForCausalLM

    if threads is not None:
        torch.set_num_threads(threads)
    p = Path(path).resolve()
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    model.eval()
    return model


# --- thresholds -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChessThresholds:
    """One level's thresholds of a sparse GGUF, per layer: None where the layer has none.

    Each array is float32 with one value per channel, or a single value for all channels.
    """

    level: float
    levels: tuple[float, ...]
    ffn: tuple[np.ndarray | None, ...]
    q_in: tuple[np.ndarray | None, ...]
    o_in: tuple[np.ndarray | None, ...]


def read_thresholds(path: str | os.PathLike[str], level: float | None = None) -> ChessThresholds:
    """The thresholds of ``level`` (None: the file's default level) read with the gguf package."""
    f = read_sparse_file(path)
    row = f.level_row(level)
    level = f.levels[row]

    def pick(kind: schema.Kind) -> tuple[np.ndarray | None, ...]:
        return tuple(f.thresholds(kind, il, level) for il in range(f.model.n_layer))

    return ChessThresholds(
        level=level,
        levels=tuple(f.levels),
        ffn=pick(schema.FFN),
        q_in=pick(schema.ATTN_Q_IN),
        o_in=pick(schema.ATTN_O_IN),
    )


# --- masks ----------------------------------------------------------------------------------------


KINDS = MASK_KINDS  # the runtime's names (sparse_stats)


class _Site:
    """One masked input (layer and kind): its thresholds, the masks to replay instead of them
    (None: compare with the thresholds), and what it counted."""

    def __init__(self, t: Any, replay: Any | None) -> None:
        self.t = t
        self.replay = replay  # bool [tokens, n] from the runtime's recording
        self.zeroed = 0
        self.total = 0
        self.disagree = 0  # replayed decisions this engine's comparison would have made otherwise
        self.max_margin = 0.0  # the largest ||x| - t| / t among those

    def keep(self, x: Any) -> Any:
        """x with its masked entries zeroed (t broadcasts over the last dimension)."""
        own = x.abs() > self.t
        keep = own
        if self.replay is not None:
            n_tok = x.shape[-2]
            if self.replay.shape[0] < n_tok or self.replay.shape[1] != x.shape[-1]:
                raise ValueError(
                    f"recorded masks of shape {tuple(self.replay.shape)} do not cover an input of "
                    f"shape {tuple(x.shape)}"
                )
            keep = self.replay[:n_tok].expand_as(x)
            differ = keep != own
            self.disagree += int(differ.sum())
            if bool(differ.any()):
                margin = (x.abs() - self.t).abs() / self.t.clamp_min(1e-30)
                self.max_margin = max(self.max_margin, float(margin[differ].max()))
        self.zeroed += int(keep.numel() - keep.sum())
        self.total += keep.numel()
        return x * keep.to(x.dtype)


def _masked_mlp_forward(site: _Site) -> Any:
    def forward(self: Any, x: Any) -> Any:
        a = self.act_fn(self.gate_proj(x))
        return self.down_proj(site.keep(a) * self.up_proj(x))

    return forward


class ChessMasks:
    """Installed masks; :meth:`remove` restores the dense model (also on leaving a ``with``).

    :meth:`stats` is the fraction of inputs zeroed since installation, in the layout of the
    runtime's ``sparse_stats`` (which counts single-token decodes only). With replayed masks,
    :meth:`disagreements` says where this engine's own comparison would have decided otherwise.
    """

    def __init__(self, n_layer: int) -> None:
        self._undo: list[Any] = []
        self._sites: list[dict[str, _Site]] = [{} for _ in range(n_layer)]

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()

    def stats(self) -> dict[str, Any]:
        def frac(sites: list[_Site]) -> float | None:
            total = sum(x.total for x in sites)
            return sum(x.zeroed for x in sites) / total if total else None

        layers = [
            {"layer": il, **{k: frac([s[k]] if k in s else []) for k in KINDS}}
            for il, s in enumerate(self._sites)
        ]
        overall = {k: frac([s[k] for s in self._sites if k in s]) for k in KINDS}
        return {"layers": layers, "overall": overall}

    def disagreements(self) -> dict[str, dict[str, float]]:
        """Per kind: the replayed decisions that differ from ``|x| > t`` computed here (count and
        fraction of all), and the largest relative distance ``||x| - t| / t`` of such an input
        from its threshold: a few, all next to their thresholds, is rounding; anything else is a
        different mask."""
        out = {}
        for k in KINDS:
            sites = [s[k] for s in self._sites if k in s]
            total = sum(x.total for x in sites)
            count = sum(x.disagree for x in sites)
            margin = max((x.max_margin for x in sites), default=0.0)
            out[k] = {"count": count, "fraction": count / total if total else 0.0, "max_margin": margin}
        return out

    def __enter__(self) -> ChessMasks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _layers(model: Any) -> Any:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__}: no model.layers (not a Llama-like decoder)")
    return layers


RecordedMasks = dict[tuple[int, str], np.ndarray]  # (layer, kind) -> bool [tokens, n], 1 = active


def install_chess_masks(
    model: Any,
    thresholds: ChessThresholds | str | os.PathLike[str],
    level: float | None = None,
    replay: RecordedMasks | None = None,
) -> ChessMasks:
    """Install the masks of ``thresholds`` (or of the GGUF at that path, at ``level``) into a
    Llama-like transformers model (``model.layers[i].mlp.{gate,up,down}_proj``,
    ``self_attn.{q,o}_proj``); returns the handle that removes them.

    ``replay``: masks the runtime recorded token by token (``runtime.recorded_masks``), applied
    to a teacher-forced sequence from its first token instead of the comparison, so that the two
    engines can be compared with identical masks."""
    torch = _torch()
    if not isinstance(thresholds, ChessThresholds):
        thresholds = read_thresholds(thresholds, level)
    layers = _layers(model)
    if len(layers) != len(thresholds.ffn):
        raise ValueError(f"the model has {len(layers)} layers, the thresholds {len(thresholds.ffn)}")
    dtype = next(model.parameters()).dtype
    masks = ChessMasks(len(layers))

    def site(il: int, kind: str, t: np.ndarray) -> _Site:
        recorded = None
        if replay is not None:
            if (il, kind) not in replay:
                raise ValueError(f"no recorded masks for layer {il}, {kind}")
            recorded = torch.from_numpy(np.asarray(replay[(il, kind)], dtype=bool))
        masks._sites[il][kind] = _Site(torch.from_numpy(t).to(dtype), recorded)
        return masks._sites[il][kind]

    def pre_hook(s: _Site) -> Any:
        return lambda _module, args: (s.keep(args[0]), *args[1:])

    for il, layer in enumerate(layers):
        t_ffn, t_q, t_o = thresholds.ffn[il], thresholds.q_in[il], thresholds.o_in[il]
        if t_ffn is not None:
            mlp = layer.mlp
            mlp.forward = types.MethodType(_masked_mlp_forward(site(il, "ffn", t_ffn)), mlp)
            masks._undo.append(lambda mlp=mlp: delattr(mlp, "forward"))
        attn = layer.self_attn
        for proj, t, kind in ((attn.q_proj, t_q, "attn_q_in"), (attn.o_proj, t_o, "attn_o_in")):
            if t is not None:
                handle = proj.register_forward_pre_hook(pre_hook(site(il, kind, t)))
                masks._undo.append(handle.remove)
    return masks


@contextlib.contextmanager
def chess_masks(
    model: Any,
    thresholds: ChessThresholds | str | os.PathLike[str],
    level: float | None = None,
    replay: RecordedMasks | None = None,
) -> Iterator[ChessMasks]:
    """``with chess_masks(model, path, 0.5): ...`` runs the model with the masks of that level."""
    masks = install_chess_masks(model, thresholds, level, replay)
    try:
        yield masks
    finally:
        masks.remove()


# --- scoring --------------------------------------------------------------------------------------


def token_logits(model: Any, tokens: Sequence[int]) -> np.ndarray:
    """Teacher-forced logits of a token sequence: row i predicts token i + 1 (float32, [n, vocab])."""
    torch = _torch()
    with torch.inference_mode():
        out = model(torch.tensor([list(tokens)], dtype=torch.long))
    return out.logits[0].float().numpy()


def request_logliks(model: Any, questions: Sequence[Sequence[Request]]) -> list[list[float]]:
    """Log-likelihood of every request (zeroshot's Request: the same token ids), one inner list per
    question; the log-softmax is taken in float64.

    Per question, the token prefix all choices share (up to one token before the shortest
    context) runs once with a KV cache, which is then repeated for the choices; their remaining
    tokens run as one right-padded batch (causal attention never looks at the padding), and the
    output layer is applied only to the rows that predict continuation tokens.
    """
    torch = _torch()
    body = model.get_decoder()
    head = model.get_output_embeddings()
    out: list[list[float]] = []
    with torch.inference_mode():
        for reqs in questions:
            seqs = [list(r.tokens) for r in reqs]
            p = shared_context(reqs)
            cache = None
            if p > 0:
                cache = body(input_ids=torch.tensor([seqs[0][:p]]), use_cache=True).past_key_values
                cache.batch_repeat_interleave(len(reqs))
            width = max(len(s) for s in seqs) - p
            ids = torch.tensor([s[p:] + [0] * (width - len(s) + p) for s in seqs], dtype=torch.long)
            hidden = body(input_ids=ids, past_key_values=cache, use_cache=cache is not None).last_hidden_state
            lls = []
            for i, r in enumerate(reqs):
                c = len(r.context_tokens) - 1 - p  # row of the last context token
                n = len(r.continuation_tokens)
                rows = head(hidden[i, c : c + n]).double().log_softmax(-1)
                target = torch.tensor(r.continuation_tokens, dtype=torch.long)
                lls.append(float(rows.gather(1, target[:, None]).sum()))
            out.append(lls)
    return out
