"""End to end: the routing analysis of a tiny in-process model (2 layers, hidden 64, 4 experts) on
tiny real-text datasets, in memory and through the CLI on a dist_checkpointing checkpoint."""

import importlib.util
import os
import re

import numpy as np
import pytest
import torch

from megatron.remoe import analysis as A
from tests.helpers.paths import ROOT

needs_mpl = pytest.mark.skipif(not A.have_matplotlib(),
                               reason="matplotlib (the optional 'plots' extra) is not installed")

TEXTS = {
    "verse": ["In the beginning God created the heaven and the earth. And the earth was without "
              "form, and void; and darkness was upon the face of the deep."] * 6,
    "code": ["def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i))\n"] * 6,
    "prose": ["The committee met on Tuesday to discuss the budget for the new library, which "
              "opened in 1998 and now serves 40,000 readers a year."] * 6,
}


def _tool():
    spec = importlib.util.spec_from_file_location("analyze_routing_cli",
                                                  os.path.join(ROOT, "tools", "analyze_routing.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def world(single_rank, tmp_path_factory):
    """Tokenizer, per-domain train/valid datasets and a TrainConfig for the tiny model."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron.remoe.data.tokenizer import train_bpe_tokenizer
    from megatron.remoe.training.config import TrainConfig

    root = tmp_path_factory.mktemp("analysis")
    tok = train_bpe_tokenizer([t for ts in TEXTS.values() for t in ts], vocab_size=300)
    tok_dir = tok.save(str(root / "tok"))
    prefixes = {"train": {}, "valid": {}}
    for split, reps in (("train", 3), ("valid", 1)):
        os.makedirs(root / split, exist_ok=True)
        for domain, texts in TEXTS.items():
            prefix = str(root / split / domain)
            builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
            for text in texts * reps:
                ids = tok.encode(text) + [tok.eod]
                builder.add_document(torch.tensor(ids), [len(ids)])
            builder.finalize(prefix + ".idx")
            prefixes[split][domain] = prefix
    cfg = TrainConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                      seq_length=32, num_experts=4, moe_router_topk=1, train_iters=1,
                      router="relu", moe_relu_routing=True, tokenizer=tok_dir,
                      data_path=list(prefixes["train"].values()),
                      valid_data_path=list(prefixes["valid"].values()),
                      make_vocab_size_divisible_by=64)
    return dict(root=root, tok=tok, prefixes=prefixes, cfg=cfg)


def _model(cfg, seed):
    from megatron.core import tensor_parallel

    from megatron.remoe.model import build_gpt_model
    from megatron.remoe.training.config import transformer_config
    from megatron.remoe.training.data import padded_vocab_size

    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    tcfg = transformer_config(cfg, use_cpu_initialization=True)
    vocab = padded_vocab_size(300, cfg)
    model = build_gpt_model(tcfg, vocab_size=vocab, max_sequence_length=cfg.seq_length,
                            use_transformer_engine=False, rotary_base=cfg.rotary_base)
    for p in model.parameters():
        tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(p)
    with torch.no_grad():  # ReLU gates: a spread of 0..4 experts per token
        for m in model.modules():
            if isinstance(m, torch.nn.Module) and hasattr(m, "layer_number") and \
                    hasattr(m, "weight") and m.__class__.__name__ == "ReLURouter":
                m.weight.normal_(0, 0.3)
    return model


def _eval_tokens(w, n=120):
    return A.make_eval_tokens(w["prefixes"]["valid"], n, w["cfg"].seq_length, w["tok"])


@pytest.mark.timeout(60)
def test_capture_is_independent_of_batching(world):
    model = _model(world["cfg"], 1)
    ev = _eval_tokens(world)
    a = A.capture_routing(model, ev, batch_size=1)
    b = A.capture_routing(model, ev, batch_size=3)
    assert a.routing.shape == (2, len(ev.token_ids), 4)
    assert a.layer_numbers == [1, 2] and a.router == "relu"
    np.testing.assert_array_equal(a.routing, b.routing)
    np.testing.assert_array_equal(a.top1, b.top1)
    assert (a.top1 >= 0).tolist() == a.routing.any(axis=2).tolist()
    np.testing.assert_array_equal(a.token_ids, ev.token_ids)
    # the captured map is the router's own output on this token's hidden state: re-run one
    # sequence alone and compare
    one = A.EvalTokens(ev.domain_names, [ev.sequences[2]], [ev.seq_domain[2]], ev.seq_length)
    c = A.capture_routing(model, one)
    start = sum(len(s) for s in ev.sequences[:2])
    np.testing.assert_array_equal(c.routing, a.routing[:, start:start + len(ev.sequences[2])])


@pytest.mark.slow
@needs_mpl
@pytest.mark.timeout(60)
def test_report_in_memory_relu_vs_topk(world, tmp_path):
    import dataclasses

    cfg = world["cfg"]
    relu = _model(cfg, 1)
    topk = _model(dataclasses.replace(cfg, router="topk", moe_relu_routing=False), 2)
    later = _model(cfg, 1)
    with torch.no_grad():
        for p_, q in zip(relu.parameters(), later.parameters(), strict=True):
            q.copy_(p_ + 0.05 * torch.randn_like(p_))
    ev = _eval_tokens(world)
    freq = A.token_frequencies(list(world["prefixes"]["train"].values()), 320)
    res = A.analyze([("ReMoE", relu), ("TopK", topk)], ev, str(tmp_path / "out"),
                    tokenizer=world["tok"], freq_counts=freq, freq_source="train",
                    compare={"ReMoE": ("ReMoE-later", later)})
    out = tmp_path / "out"
    expected = ["report.md", "summary.csv", "experts_vs_frequency.csv", "experts_vs_frequency.png",
                "domain_expert_share.csv", "domain_expert_share_ReMoE.png",
                "domain_expert_share_TopK.png", "active_experts.csv", "active_experts.png",
                "top_tokens.csv", "flip_rate.csv", "flip_rate.png", "expert_load.png",
                "expert_load.csv", "analysis.json"]
    for name in expected:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    # every figure has titles, axis labels and a legend/colorbar (checked before saving, too)
    assert len(res.figures) == 6
    for name, fig in res.figures.items():
        assert A.figure_problems(fig) == [], name
        plotted = [ax for ax in fig.axes if ax.has_data() and ax.get_label() != "<colorbar>"]
        assert plotted and all(ax.get_xlabel() and ax.get_ylabel() for ax in plotted), name
        assert all(ax.get_title() for ax in plotted) or fig._suptitle is not None, name
    report = (out / "report.md").read_text()
    for img in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (out / img).is_file(), img
    for section in ("Fig. 7", "Fig. 9", "Fig. 12", "Tokens most routed", "flip rate",
                    "Per-layer summary"):
        assert section in report
    # TopK k=1: exactly one expert per token, no dead-token fraction
    topk_rows = res.summaries["TopK"]
    assert all(r["experts_per_token"] == 1 and r["zero_expert_fraction"] == 0 for r in topk_rows)
    # the CSV numbers are the library's
    import csv

    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [r["model"] for r in rows] == ["ReMoE", "ReMoE", "TopK", "TopK"]
    relu_rows = res.summaries["ReMoE"]
    assert float(rows[0]["experts_per_token"]) == pytest.approx(relu_rows[0]["experts_per_token"],
                                                                rel=1e-5)
    share = list(csv.DictReader(open(out / "domain_expert_share.csv")))
    for model in ("ReMoE", "TopK"):
        for layer in ("1", "2"):
            for d in TEXTS:
                s = sum(float(r["share"]) for r in share
                        if (r["model"], r["layer"], r["domain"]) == (model, layer, d))
                assert s == pytest.approx(1.0, abs=1e-4)
    flips = list(csv.DictReader(open(out / "flip_rate.csv")))
    assert len(flips) == 2 and all(0 < float(r["set_flip_rate"]) <= 1 for r in flips)
    tops = list(csv.DictReader(open(out / "top_tokens.csv")))
    assert tops and all(r["token"] for r in tops)


def _save_checkpoint(model, cfg, root, iteration):
    from megatron.core import dist_checkpointing

    from megatron.remoe.training.checkpointing import TRACKER, iteration_dir, sharded_metadata

    path = iteration_dir(str(root), iteration)
    os.makedirs(path)
    md = sharded_metadata()
    sd = {"model": model.sharded_state_dict(metadata=md), "iteration": iteration,
          "config": cfg.to_dict(), "layout": {"world_size": 1, "tp": 1, "pp": 1, "vp": None,
                                              "ep": 1, "cp": 1}}
    dist_checkpointing.save(sd, path, content_metadata=md)
    with open(os.path.join(str(root), TRACKER), "w") as fh:
        fh.write(f"{iteration}\n")
    return path


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_cli_on_checkpoints(world, tmp_path, capsys):
    cfg = world["cfg"]
    model = _model(cfg, 3)
    ckpt = tmp_path / "ckpt"
    _save_checkpoint(model, cfg, ckpt, 5)
    tool = _tool()
    out = tmp_path / "report"
    argv = ["--load", str(ckpt), "--label", "tiny", "--compare-load", str(ckpt / "iter_0000005"),
            "--tokens-per-domain", "100", "--out", str(out)]
    if not A.have_matplotlib():
        argv.append("--no-figures")
    assert tool.main(argv) == 0
    report = (out / "report.md").read_text()
    assert "tiny" in report and "iter_0000005" in report
    # the loaded weights are the saved ones: same routing as the in-memory model
    ev = A.make_eval_tokens(world["prefixes"]["valid"], 100, cfg.seq_length, world["tok"])
    cap = A.capture_routing(model, ev)
    import csv

    rows = list(csv.DictReader(open(out / "summary.csv")))
    expect = A.layer_summary(cap.routing, cap.layer_numbers)
    for r, e in zip(rows, expect, strict=True):
        assert float(r["experts_per_token"]) == pytest.approx(e["experts_per_token"], rel=1e-5)
    # a checkpoint compared with itself never flips
    flips = list(csv.DictReader(open(out / "flip_rate.csv")))
    assert [float(r["set_flip_rate"]) for r in flips] == [0.0, 0.0]
    # default data = the run's validation prefixes, named by domain
    assert "verse" in report and "prose" in report

    # errors: one line, exit code 2
    def main(a):
        return tool.main(a + ([] if A.have_matplotlib() else ["--no-figures"]))

    capsys.readouterr()
    assert main(["--load", str(ckpt), "--out", str(out)]) == 2  # non-empty --out
    err = capsys.readouterr().err
    assert "not empty" in err and err.count("\n") == 1
    assert main(["--load", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["--load", str(ckpt), "--data", f"x={tmp_path}/missing",
                 "--out", str(tmp_path / "o3")]) == 2
    assert "missing.bin" in capsys.readouterr().err
    assert main(["--load", str(ckpt), "--compare-load", str(ckpt), "--compare-load",
                 str(ckpt), "--out", str(tmp_path / "o4")]) == 2


@pytest.mark.timeout(60)
def test_bf16_checkpoint_is_analysed_in_fp32(world, tmp_path):
    import dataclasses

    cfg = dataclasses.replace(world["cfg"], bf16=True)
    model = _model(world["cfg"], 4).to(torch.bfloat16)
    _save_checkpoint(model, cfg, tmp_path / "ckpt", 9)
    loaded, saved_cfg, info = A.load_checkpoint_model(str(tmp_path / "ckpt"), world["tok"])
    assert saved_cfg.bf16 and info["iteration"] == 9 and info["bf16_saved"]
    ref = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
    for name, p in loaded.state_dict().items():
        if torch.is_tensor(p) and p.is_floating_point() and name in ref:
            assert p.dtype == torch.float32, name
            torch.testing.assert_close(p, ref[name].float(), rtol=0, atol=0)
    ev = _eval_tokens(world, 40)
    cap = A.capture_routing(loaded, ev)
    assert cap.routing.shape[0] == 2 and np.isfinite(list(cap.domain_loss().values())).all()


@needs_mpl
@pytest.mark.timeout(30)
def test_figure_check_catches_missing_labels():
    plt = A.pyplot()
    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    ax.plot([1, 2], [4, 3])
    problems = A.figure_problems(fig)
    assert any("no title" in p for p in problems) and any("no x label" in p for p in problems)
    assert any("no legend" in p for p in problems)
    fig2 = A.fig_active_experts([("m", np.ones((2, 3)), [1, 2])], ["a", "b", "c"], k_ref=1)
    assert A.figure_problems(fig2) == []
    plt.close(fig)
    plt.close(fig2)
