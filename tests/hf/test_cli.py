"""tools/convert_checkpoint.py and tools/evaluate.py end to end, in real processes.

A ReMoE GPT (one MoE + one dense layer) is trained 3 steps under TP2+SP / EP2 with torchrun (the
trainer's own entry point), converted to HF with --verify (the checkpoint is re-sharded into one
process), loaded with AutoModelForCausalLM(trust_remote_code=True), evaluated offline, converted
back to a trainer checkpoint (--hf-to-megatron --verify) and resumed by the trainer. Plus the CLI
error cases: one-line errors, exit code 2, nothing written.
"""

import functools
import glob
import json
import os
import sys
import sysconfig

import pytest

from tests.helpers.paths import ROOT
from tests.helpers.pretrain_utils import run_command
from tools.parity.tiny_gpt import free_port

pytestmark = pytest.mark.multiprocess

pytest.importorskip("transformers")

CONVERT = os.path.join(ROOT, "tools", "convert_checkpoint.py")
EVALUATE = os.path.join(ROOT, "tools", "evaluate.py")
MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
         "--num-query-groups", "2", "--seq-length", "32", "--num-experts", "4",
         "--moe-layer-freq", "1,0", "--micro-batch-size", "2", "--global-batch-size", "4",
         "--lr", "3e-3", "--log-interval", "1", "--eval-iters", "0",
         "--moe-relu-l1-reg-coeff-init", "1e-3"]


run = functools.partial(run_command, timeout=90)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 512-token BPE tokenizer and a 3-step TP2/EP2 checkpoint (mock data)."""
    from megatron.remoe.data.tokenizer import train_bpe_tokenizer

    out = tmp_path_factory.mktemp("hfcli")
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:30]
    texts = [open(f, encoding="utf-8", errors="replace").read()[:6000] for f in files]
    tok_dir = train_bpe_tokenizer(texts, 512).save(str(out / "tok"))
    ckpt = str(out / "ckpt")
    run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-port", str(free_port()), "-m", "megatron.remoe.pretrain", *MODEL,
         "--train-iters", "3", "--mock-data", "--tokenizer", tok_dir,
         "--tensor-model-parallel-size", "2", "--sequence-parallel",
         "--expert-model-parallel-size", "2", "--expert-tensor-parallel-size", "1",
         "--save", ckpt], timeout=120)
    text = out / "heldout.jsonl"  # three held-out documents
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[-3:]),
                    encoding="utf-8")
    return {"dir": out, "ckpt": ckpt, "tok": tok_dir, "text": str(text)}


@pytest.mark.core
@pytest.mark.timeout(200)
def test_tp2_ep2_checkpoint_convert_verify_evaluate_and_back(trained):
    out = trained["dir"]
    hf_dir, report = str(out / "hf"), str(out / "report.json")
    proc = run([sys.executable, CONVERT, "--load", trained["ckpt"], "--out", hf_dir, "--verify",
                "--report", report])
    assert "verify: PASS" in proc.stdout
    rep = json.load(open(report))
    v = rep["verify"]
    assert rep["saved_layout"]["tp"] == 2 and rep["saved_layout"]["ep"] == 2
    assert rep["iteration"] == 3 and rep["l1_reg_coeff"] > 0
    assert v["ok"] and v["max_abs_logit_diff"] < 1e-4 and v["routing_mismatches"] == 0
    assert v["sparsity_megatron"] == v["sparsity_hf"]
    assert v["greedy_megatron"] == v["greedy_hf"] == v["greedy_hf_cached"]
    assert len(v["greedy_megatron"]) == 16
    assert not [n for n in os.listdir(out) if "tmp" in n]  # no temporary leftovers

    # a fresh process loads it the standard way, offline
    code = ("import torch;from transformers import AutoModelForCausalLM, AutoTokenizer;"
            f"m=AutoModelForCausalLM.from_pretrained({hf_dir!r}, trust_remote_code=True);"
            f"t=AutoTokenizer.from_pretrained({hf_dir!r}, trust_remote_code=True);"
            "ids=t('def f(x):', return_tensors='pt').input_ids;"
            "o=m(input_ids=ids, output_router_logits=True);"
            "print(type(m).__name__, tuple(o.logits.shape), len(o.routing_maps))")
    proc = run([sys.executable, "-c", code])
    assert "ReMoEForCausalLM" in proc.stdout and "512)" in proc.stdout and " 1\n" in proc.stdout

    # offline evaluation: both backends agree
    results = {}
    for backend in ("native", "lm-eval"):
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            if backend == "lm-eval":
                continue
        res_dir = str(out / f"eval-{backend}")
        proc = run([sys.executable, EVALUATE, "--model", hf_dir, "--out", res_dir,
                    "--text", f"code={trained['text']}", "--max-chars-per-domain", "4000",
                    "--mc-items-per-domain", "12", "--backend", backend], timeout=120)
        assert "unreachable" in proc.stdout or "arc_easy" in proc.stdout
        results[backend] = json.load(open(os.path.join(res_dir, "results.json")))
        assert os.path.isfile(os.path.join(res_dir, "results.md"))
        tasks = results[backend]["tasks"]
        ppl, mc = tasks["remoe_ppl_code"], tasks["remoe_nextline"]
        assert 0 < ppl["bits_per_byte"] < 20 and ppl["tokens"] > 100
        assert 0 <= ppl["routing"]["experts_per_token"] <= 4
        assert mc["items"] == 12 and 0 <= mc["acc"] <= 1
    if "lm-eval" in results:
        a, b = results["native"]["tasks"], results["lm-eval"]["tasks"]
        for metric in ("bits_per_byte", "word_perplexity"):
            assert abs(a["remoe_ppl_code"][metric] - b["remoe_ppl_code"][metric]) <= \
                1e-9 * abs(a["remoe_ppl_code"][metric])
        assert a["remoe_nextline"]["acc"] == b["remoe_nextline"]["acc"]
        assert a["remoe_nextline"]["routing"] == b["remoe_nextline"]["routing"]

    # HF -> trainer checkpoint, verified against the HF folder, then resumed by the trainer
    back = str(out / "back")
    proc = run([sys.executable, CONVERT, "--hf-to-megatron", "--hf", hf_dir, "--save", back,
                "--verify"])
    assert "verify: PASS" in proc.stdout
    assert os.path.isfile(os.path.join(back, "latest_checkpointed_iteration.txt"))
    proc = run([sys.executable, "-m", "megatron.remoe.pretrain", *MODEL, "--train-iters", "2",
                "--mock-data", "--tokenizer", trained["tok"], "--load", back, "--no-load-optim",
                "--save", str(out / "resumed")], timeout=90)
    assert "resumed from" in proc.stdout
    assert os.path.isdir(str(out / "resumed" / "iter_0000002"))


@pytest.mark.timeout(120)
def test_cli_errors_are_one_line_and_write_nothing(trained, tmp_path):
    def err(cmd, needle, code=2):
        proc = run([sys.executable] + cmd, expect=code)
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        assert lines and lines[-1].startswith("error:") and needle in lines[-1], proc.stderr
        assert "Traceback" not in proc.stderr
        return proc

    err([CONVERT, "--load", trained["ckpt"]], "need --load CKPT_DIR and --out")
    err([CONVERT, "--load", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
        "no such directory")
    err([CONVERT, "--load", trained["ckpt"], "--out", str(tmp_path / "o"), "--iteration", "7"],
        "no checkpoint for iteration 7")
    err([CONVERT, "--load", str(tmp_path), "--out", str(tmp_path / "o")], "no checkpoint in")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    err([CONVERT, "--load", trained["ckpt"], "--out", str(busy)], "not empty")
    assert os.listdir(busy) == ["keep.txt"]
    err([CONVERT, "--hf-to-megatron", "--hf", str(tmp_path)], "needs --hf HF_DIR and --save")
    err([CONVERT, "--hf-to-megatron", "--hf", str(tmp_path), "--save", str(tmp_path / "s")],
        "not a Hugging Face model folder")
    err([CONVERT, "--load", trained["ckpt"], "--out", str(tmp_path / "o"), "--dtype", "fp8"],
        "invalid choice")
    # a failing parity check (impossible tolerance) exits 1 and writes nothing
    proc = run([sys.executable, CONVERT, "--load", trained["ckpt"], "--out",
                str(tmp_path / "strict"), "--verify", "--tolerance", "1e-30"], expect=1)
    assert "verify: FAIL" in proc.stdout and "nothing written" in proc.stderr
    assert not os.path.exists(tmp_path / "strict")
    assert not [n for n in os.listdir(tmp_path) if "tmp" in n]
    err([EVALUATE, "--model", str(tmp_path), "--out", str(tmp_path / "r")], "no evaluation text")
    err([EVALUATE, "--model", str(tmp_path), "--out", str(tmp_path / "r"), "--text",
         f"x={trained['text']}"], "not a Hugging Face model folder")
