"""`actsparse eval`: text metrics against dense, realized sparsity, outputs, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from actsparse import data, generation
from actsparse.evaluate import summarize
from helpers import run_cli


@pytest.fixture(scope="module")
def text_report(small_sparse_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("eval")
    models = [small_sparse_dir / n for n in ("chess-attn.gguf", "chess.gguf", "cats.gguf")]
    proc = run_cli(
        "eval",
        *models,
        "--levels",
        "0.3,0.6",
        "--tasks",
        "none",
        "--ctx",
        "128",
        "--chunks",
        "4",
        "--gen-windows",
        "2",
        "--json",
        out / "r.json",
        "--markdown",
        out / "r.md",
        "--png",
        out / "r.png",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "r.json").read_text())
    report["_md"] = (out / "r.md").read_text()
    report["_png"] = (out / "r.png").read_bytes()
    return report


def test_eval_runs_dense_once_and_every_method_level(text_report: dict) -> None:
    runs = text_report["runs"]
    assert runs[0]["label"] == "dense" and runs[0]["level"] == 0
    assert [(r["label"], r["level"]) for r in runs[1:]] == [
        (label, level) for label in ("CHESS+attn", "CHESS", "CATS") for level in (0.3, 0.6)
    ]
    assert text_report["heldout"]["corpus"] == "lambada"


def test_eval_kl_divergence_grows_with_sparsity(text_report: dict) -> None:
    by = {(r["label"], r["level"]): r["text"] for r in text_report["runs"][1:]}
    dense_ppl = text_report["runs"][0]["text"]["ppl"]
    for label in ("CHESS+attn", "CHESS", "CATS"):
        low, high = by[(label, 0.3)], by[(label, 0.6)]
        assert 0 < low["kld_mean"] < high["kld_mean"]
        assert low["kld_mean"] <= low["kld_p99"]
        assert 1.0 >= low["same_top"] > high["same_top"] > 0.0
        assert high["ppl"] > dense_ppl
    # Attention thresholds remove information too: CHESS with them diverges more than without.
    assert by[("CHESS+attn", 0.6)]["kld_mean"] > by[("CHESS", 0.6)]["kld_mean"]


def test_eval_reports_realized_sparsity_near_target(text_report: dict) -> None:
    for r in text_report["runs"][1:]:
        overall = r["realized"]["overall"]
        # Held-out text differs from the 4096 calibration tokens; per-level accuracy is checked
        # with a full calibration in test_convert.py.
        assert abs(overall["ffn"] - r["level"]) < 0.06, (r["label"], r["level"], overall)
        if r["label"] == "CHESS+attn":
            assert abs(overall["attn_q_in"] - r["level"]) < 0.08
            assert abs(overall["attn_o_in"] - r["level"]) < 0.08
        else:
            assert overall["attn_q_in"] is None and overall["attn_o_in"] is None
        assert len(r["realized"]["layers"]) == 30


def test_eval_writes_markdown_png_and_claims(text_report: dict) -> None:
    md = text_report["_md"]
    assert "| CATS | 0.6 |" in md and "| dense | 0 |" in md
    assert text_report["_png"].startswith(b"\x89PNG\r\n\x1a\n")
    claims = text_report["summary"]["chess_vs_cats"]
    assert [c["level"] for c in claims] == [0.3, 0.6]
    for c in claims:
        assert c["holds"] == (c["chess"] <= c["cats"])


def test_eval_reports_generation_quality(text_report: dict) -> None:
    """With the prompt dense and each later token decoded alone, KL divergence still grows with the
    level, over the positions llama-perplexity scores."""
    by = {(r["label"], r["level"]): r["generation"] for r in text_report["runs"][1:]}
    assert text_report["runs"][0]["generation"] == {}
    for label in ("CHESS+attn", "CHESS", "CATS"):
        low, high = by[(label, 0.3)], by[(label, 0.6)]
        assert low["tokens"] == high["tokens"] == 2 * (128 - 1 - 64)
        assert 0 < low["kld_mean"] < high["kld_mean"]
        assert 1.0 >= low["same_top"] >= high["same_top"] > 0.0
    assert "KLD mean, generation" in text_report["_md"]


def test_generation_positions_line_up_with_the_dense_reference(small_sparse_model: Path) -> None:
    """At level 0 the one-token decodes after the prompt are dense: they agree with the batched
    dense logits to the rounding of another kernel (mat-vec against batched products), which a
    shifted row would not (its KL divergence is of the order of the model's cross-entropy)."""
    options = generation.GenerationOptions(ctx=64, windows=1)
    found = generation.measure(small_sparse_model, [0.0, 0.5], data.heldout_text()[:20_000], options)
    assert found[0.0]["tokens"] == found[0.5]["tokens"] == 64 - 1 - 32
    assert found[0.0]["kld_mean"] < 0.02 and found[0.0]["same_top"] >= 0.9, found[0.0]
    assert found[0.5]["kld_mean"] > 10 * found[0.0]["kld_mean"], found


def test_summarize_recomputes_differences_to_dense() -> None:
    report = {
        "runs": [
            {"label": "dense", "level": 0.0, "text": {"ppl": 10.0}, "tasks": {"average": {"acc": 0.5}}},
            {
                "label": "CHESS",
                "level": 0.5,
                "text": {"ppl": 11.0, "kld_mean": 0.1},
                "tasks": {"average": {"acc": 0.45}},
            },
            {"label": "CATS", "level": 0.5, "text": {"ppl": 12.0, "kld_mean": 0.05}, "tasks": {}},
        ]
    }
    s = summarize(report)
    chess = s["vs_dense"][0]
    assert chess["ppl_increase"] == pytest.approx(0.1) and chess["avg_acc_drop_points"] == pytest.approx(5.0)
    assert "avg_acc_drop_points" not in s["vs_dense"][1]
    assert s["chess_vs_cats"] == [
        {"claim": "CHESS KLD <= CATS KLD", "level": 0.5, "chess": 0.1, "cats": 0.05, "holds": False}
    ]


def test_eval_refuses_a_model_without_thresholds(small_model_path: Path, tmp_path: Path) -> None:
    proc = run_cli("eval", small_model_path, "--tasks", "none", "--json", tmp_path / "r.json")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "convert_with_thresholds.py" in proc.stderr
    assert not (tmp_path / "r.json").exists()


def test_eval_dense_only_measures_a_plain_model(small_model_path: Path, tmp_path: Path) -> None:
    proc = run_cli(
        "eval",
        small_model_path,
        "--dense-only",
        "--tasks",
        "none",
        "--ctx",
        "128",
        "--chunks",
        "2",
        "--json",
        tmp_path / "r.json",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = json.loads((tmp_path / "r.json").read_text())["runs"]
    assert len(runs) == 1 and runs[0]["label"] == "dense" and runs[0]["text"]["ppl"] > 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tasks", "arc_easy,nosuchtask"], "known: arc_easy"),
        (["--levels", "0.45"], "available: 0.3, 0.4, 0.5, 0.6, 0.7"),
        (["--levels", "1.5"], "(0, 1)"),
    ],
)
def test_eval_bad_arguments_get_one_line(
    small_sparse_model: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    proc = run_cli("eval", small_sparse_model, *args, "--json", tmp_path / "r.json")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "r.json").exists()


def test_eval_failure_leaves_no_report(small_sparse_model: Path, tmp_path: Path) -> None:
    # A model file that vanishes mid-run stands in for any failed measurement: the engine
    # fails, the command exits non-zero and no report file appears.
    model = tmp_path / "m.gguf"
    shutil.copyfile(small_sparse_model, model)
    with open(model, "r+b") as f:  # keep the header valid, cut the tensor data
        f.truncate(model.stat().st_size // 2)
    proc = run_cli(
        "eval", model, "--tasks", "none", "--ctx", "128", "--chunks", "2", "--json", tmp_path / "r.json"
    )
    assert proc.returncode != 0
    assert len([x for x in proc.stderr.splitlines() if x.startswith("error:")]) == 1
    assert not (tmp_path / "r.json").exists()


def test_report_names_the_layer_farthest_from_its_level() -> None:
    """The results page's per-layer line: for each CHESS+attn level, the layer whose realized FFN
    sparsity on the held-out text deviates most from the level, with its signed deviation."""
    from actsparse import report

    def run(label: str, level: float, ffn: list[float]) -> dict:
        layers = [{"layer": i, "ffn": f, "attn_q_in": None, "attn_o_in": None} for i, f in enumerate(ffn)]
        return {"label": label, "level": level, "text": {}, "realized": {"layers": layers}}

    text = {"runs": [
        {"label": "dense", "level": 0.0, "text": {"ppl": 10.0}},
        run("CHESS+attn", 0.5, [0.49, 0.47, 0.52]),
        run("CATS", 0.5, [0.2, 0.5, 0.5]),  # another method: not in this line
        run("CHESS+attn", 0.7, [0.71, 0.70, 0.72]),
    ]}  # fmt: skip
    lines = report.discussion({"text": text, "tasks": {"runs": [], "tasks": {}}, "bench": {"levels": []}})
    line = next(x for x in lines if "farthest from its level" in x)
    assert line.endswith("0.5: layer 1 -0.030, 0.7: layer 2 +0.020.")


def test_markdown_of_a_task_only_evaluation_names_no_heldout_text() -> None:
    """`--chunks 0` measures tasks only: the tables describe no held-out text and no text metrics."""
    from actsparse.evaluate import markdown_tables

    tasks = {"average": {"acc": 0.5, "acc_norm": 0.5}, "boolq": {"acc": 0.5, "acc_norm": 0.5}}
    report = {
        "heldout": {"corpus": "lambada", "chunks": 0, "ctx": 512}, "threads": 2,
        "tasks": {"names": ["boolq"], "limit": 10},
        "runs": [{"label": "dense", "level": 0.0, "text": {}, "realized": {}, "tasks": tasks}],
    }  # fmt: skip
    md = markdown_tables(report)
    assert "Held-out text" not in md and "PPL" not in md
    assert "boolq" in md and "| dense | 0 |" in md


def test_eval_counts_each_run_s_decode_bytes(text_report: dict, small_sparse_model: Path) -> None:
    """bytes_share is the bench's bytes per token at the run's realized sparsity, over dense's."""
    from actsparse.benchmark import weight_bytes_per_token

    runs = text_report["runs"]
    assert runs[0]["bytes_share"] == 1.0
    by = {(r["label"], r["level"]): r for r in runs[1:]}
    for label in ("CHESS+attn", "CHESS", "CATS"):
        assert 0 < by[(label, 0.6)]["bytes_share"] < by[(label, 0.3)]["bytes_share"] < 1.0
    r = by[("CHESS+attn", 0.6)]
    o = r["realized"]["overall"]
    want = weight_bytes_per_token(small_sparse_model, o, level=0.6)
    assert r["bytes_share"] == pytest.approx(want / weight_bytes_per_token(small_sparse_model))
    assert "bytes/token" in text_report["_md"]
