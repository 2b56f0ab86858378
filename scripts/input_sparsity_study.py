#!/usr/bin/env python3
"""CHESS+attn against input sparsity on every projection (R-Sparse's scores, with and without its
low-rank term) at equal weights read per token, on the transformers reference (float32).

R-Sparse (METHODS.md §4) keeps input i of a linear layer where |x_i| ||W[:, i]||_2 > t and sends
the rest through a rank-r part of W's SVD: y = W (x m) + U_r S_r V_r^T (x (1 - m)). Here every
projection (q, k, v, o, gate, up, down) gets one threshold, the quantile of its scores over
calibration text, and the same share of its weights: CHESS+attn's share at each level (it reads
gate, k and v whole). A rank share spends that part of each matrix's budget on the low-rank
factors, r (d_in + d_out) weights, and keeps correspondingly fewer inputs. KL divergence against
dense over the second half of held-out windows, as llama-perplexity scores it.

usage: scripts/input_sparsity_study.py MODEL.gguf CHESS_SPARSE.gguf OUT.json [--windows 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from actsparse import reference  # noqa: E402
from actsparse.data import calibration_corpus, heldout_corpus  # noqa: E402

CTX = 512
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
READ_WHOLE_BY_CHESS = ("gate", "k", "v")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument("chess", type=Path, help="the model converted with CHESS+attn thresholds")
    p.add_argument("out", type=Path)
    p.add_argument("--windows", type=int, default=8, help="held-out windows of 512 tokens")
    p.add_argument("--calib-windows", type=int, default=4)
    p.add_argument("--levels", default="0.3,0.5,0.7")
    p.add_argument("--rank-shares", default="0,0.05,0.1")
    p.add_argument("-t", "--threads", type=int, default=2)
    a = p.parse_args()

    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer

    model = reference.load_model(a.model, threads=a.threads)
    path = a.model.resolve()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)

    def windows(text: str, n: int) -> list[list[int]]:
        ids = tok(text[: 25_000 * n + 50_000], add_special_tokens=False)["input_ids"]
        return [ids[i * CTX : (i + 1) * CTX] for i in range(n) if len(ids) >= (i + 1) * CTX]

    held = windows(heldout_corpus().text, a.windows)
    calib = windows(calibration_corpus().text[100_000:], a.calib_windows)
    module = {
        "q": lambda L: L.self_attn.q_proj, "k": lambda L: L.self_attn.k_proj,
        "v": lambda L: L.self_attn.v_proj, "o": lambda L: L.self_attn.o_proj,
        "gate": lambda L: L.mlp.gate_proj, "up": lambda L: L.mlp.up_proj, "down": lambda L: L.mlp.down_proj,
    }  # fmt: skip
    linears = {(il, k): module[k](L) for il, L in enumerate(model.model.layers) for k in PROJECTIONS}
    norms = {key: lin.weight.detach().norm(dim=0) for key, lin in linears.items()}
    plain = {key: lin.forward for key, lin in linears.items()}
    rank_shares = [float(x) for x in a.rank_shares.split(",")]
    factors = {}
    for key, lin in linears.items():
        if any(rank_shares):  # (U S, V^T); only where a rank is spent
            U, S, Vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
            factors[key] = (U * S, Vh)

    samples: dict = {key: [] for key in linears}

    def recording(key):  # noqa: ANN001, ANN202
        lin = linears[key]

        def forward(x):  # noqa: ANN001, ANN202
            s = (x.abs() * norms[key]).reshape(-1)
            samples[key].append(s[torch.randint(0, s.numel(), (min(s.numel(), 200_000),))])
            return F.linear(x, lin.weight, lin.bias)

        return forward

    for key, lin in linears.items():
        lin.forward = recording(key)
    with torch.inference_mode():
        for w in calib:
            model(torch.tensor([w]))
    scores = {key: torch.cat(v)[:1_000_000] for key, v in samples.items()}
    for key, lin in linears.items():
        lin.forward = plain[key]

    def scored(w: list[int]):  # noqa: ANN202
        return F.log_softmax(model(torch.tensor([w])).logits[0, CTX // 2 : -1].double(), -1)

    with torch.inference_mode():
        dense = [scored(w) for w in held]

    def divergence() -> dict[str, float]:
        total, top, n = 0.0, 0, 0
        with torch.inference_mode():
            for w, d in zip(held, dense, strict=True):
                lp = scored(w)
                total += float((d.exp() * (d - lp)).sum())
                top += int((d.argmax(-1) == lp.argmax(-1)).sum())
                n += lp.shape[0]
        return {"kld_mean": total / n, "same_top": top / n}

    def input_sparse(key, t: float, r: int):  # noqa: ANN001, ANN202
        lin, c = linears[key], norms[key]
        if r:
            US, Vh = factors[key]
            A, B = US[:, :r].contiguous(), Vh[:r].contiguous()

        def forward(x):  # noqa: ANN001, ANN202
            kept = x * ((x.abs() * c) > t)
            y = F.linear(kept, lin.weight, lin.bias)
            return y + F.linear(F.linear(x - kept, B), A) if r else y

        return forward

    size = {key: lin.weight.shape for key, lin in linears.items()}  # (d_out, d_in)
    total = sum(o * i for o, i in size.values())
    runs = []
    for level in (float(x) for x in a.levels.split(",")):
        t0 = time.perf_counter()
        with reference.chess_masks(model, a.chess, level):
            m = divergence()
        share = sum(o * i * (1 if k[1] in READ_WHOLE_BY_CHESS else 1 - level) for k, (o, i) in size.items())
        share /= total
        runs.append({"method": "CHESS+attn", "level": level, "weight_share": share, **m})
        print(json.dumps(runs[-1]), f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        for rank_share in rank_shares:
            used, ranks = 0.0, []
            for key, (o, i) in size.items():
                budget = share * o * i
                r = int(rank_share * budget / (i + o))
                kept = max(0.0, budget - r * (i + o)) / (o * i)
                t = float(torch.quantile(scores[key].float(), 1 - kept))
                linears[key].forward = input_sparse(key, t, r)
                used += kept * o * i + r * (i + o)
                ranks.append(r)
            t0 = time.perf_counter()
            m = divergence()
            for key, lin in linears.items():
                lin.forward = plain[key]
            runs.append({"method": "input sparsity, R-Sparse scores", "rank_share": rank_share,
                         "level": level, "weight_share": used / total, "mean_rank": sum(ranks) / len(ranks),
                         **m})  # fmt: skip
            print(json.dumps(runs[-1]), f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    a.out.write_text(json.dumps({"model": str(a.model), "windows": len(held), "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
