"""`remoe dial` / tools/compute_dial.py end to end on a small trained ReLU model.

A 2-layer ReMoE GPT (4 experts, both layers MoE) is trained 40 steps by the trainer's own entry
point; then, on held-out text: tau = 0 reproduces the undialled numbers; calibration to half the
undialled experts per token lands within 2% with one global threshold and with per-layer budgets
(both forms); the dial exported to HF (`convert_checkpoint.py --dial --verify`) passes the parity
check and, loaded back from the HF folder, gives the same experts per token and loss; bad
thresholds and targets are one-line errors, exit 2, nothing written.
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

pytestmark = pytest.mark.multiprocess

pytest.importorskip("transformers")

CONVERT = os.path.join(ROOT, "tools", "convert_checkpoint.py")
MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
         "--num-query-groups", "2", "--seq-length", "32", "--num-experts", "4",
         "--micro-batch-size", "4", "--global-batch-size", "4", "--lr", "3e-3",
         "--log-interval", "10", "--eval-iters", "0", "--moe-relu-l1-reg-coeff-init", "1e-6"]


run = functools.partial(run_command, timeout=120)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from megatron.remoe.data.tokenizer import train_bpe_tokenizer

    out = tmp_path_factory.mktemp("dial")
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:40]
    texts = [open(f, encoding="utf-8", errors="replace").read()[:8000] for f in files]
    tok_dir = train_bpe_tokenizer(texts, 512).save(str(out / "tok"))
    ckpt = str(out / "ckpt")
    run([sys.executable, "-m", "megatron.remoe.pretrain", *MODEL, "--train-iters", "40",
         "--mock-data", "--tokenizer", tok_dir, "--save", ckpt], timeout=180)
    held = out / "heldout.jsonl"
    held.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[-6:]),
                    encoding="utf-8")
    return {"dir": out, "ckpt": ckpt, "text": f"code={held}"}


def dial(args, capsys, expect=0):
    from megatron.remoe.dial_calibration import main

    rc = main(args)
    captured = capsys.readouterr()
    assert rc == expect, captured.out[-3000:] + captured.err[-3000:]
    return captured


def read(path):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


@pytest.mark.timeout(400)
def test_calibration_export_and_reload(trained, tmp_path, capsys):
    common = ["--load", trained["ckpt"], "--text", trained["text"], "--tokens-per-domain",
              "3000"]
    dial([*common, "--thresholds", "0", "--out", str(tmp_path / "zero")], capsys)
    zero = read(tmp_path / "zero" / "dial.json")
    base = zero["undialled"]
    assert zero["experts_per_token"] == base["experts_per_token"]
    assert zero["valid_loss"] == base["valid_loss"]
    assert zero["thresholds"] == [0.0, 0.0]
    assert base["experts_per_token"] > 1.0, base  # a model with room to dial down

    target = round(base["experts_per_token"] / 2, 4)
    results = {}
    for method, form in (("global", "cut"), ("per-layer", "cut"), ("global", "shift"),
                         ("per-layer", "shift")):
        out = tmp_path / f"{method}-{form}"
        dial([*common, "--target-experts-per-token", str(target), "--method", method,
              "--form", form, "--out", str(out)], capsys)
        r = read(out / "dial.json")
        assert set(r) >= {"thresholds", "experts_per_token", "valid_loss"}
        assert abs(r["experts_per_token"] - target) <= 0.02 * target, (method, form, r)
        assert len(r["thresholds"]) == 2 and max(r["thresholds"]) > 0
        assert r["valid_loss"] > base["valid_loss"] - 0.05
        results[(method, form)] = r
    glob_cut = results[("global", "cut")]
    assert glob_cut["thresholds"][0] == glob_cut["thresholds"][1] > 0

    # export the calibrated dial, verify parity, and evaluate the HF folder with the same tool
    hf_dir = tmp_path / "hf"
    proc = run([sys.executable, CONVERT, "--load", trained["ckpt"], "--out", str(hf_dir),
                "--dial", str(tmp_path / "per-layer-cut" / "dial.json"), "--verify"])
    assert "verify: PASS" in proc.stdout and "compute dial cut" in proc.stdout
    cfg = read(hf_dir / "config.json")
    pl = results[("per-layer", "cut")]
    assert cfg["router_dial"] == {"thresholds": pl["thresholds"], "form": "cut",
                                  "max_experts": None}
    taus = ",".join(repr(t) for t in pl["thresholds"])
    dial(["--load", str(hf_dir), "--text", trained["text"], "--tokens-per-domain", "3000",
          "--thresholds", taus, "--out", str(tmp_path / "from-hf")], capsys)
    again = read(tmp_path / "from-hf" / "dial.json")
    assert abs(again["experts_per_token"] - pl["experts_per_token"]) < 1e-9
    assert abs(again["valid_loss"] - pl["valid_loss"]) < 1e-4
    assert abs(again["undialled"]["valid_loss"] - base["valid_loss"]) < 1e-4
    # a dialled HF folder does not become a training checkpoint (training refuses a dial)
    proc = run([sys.executable, CONVERT, "--hf-to-megatron", "--hf", str(hf_dir), "--save",
                str(tmp_path / "ck")], expect=2)
    assert proc.stderr.count("\n") == 1 and "router_dial" in proc.stderr
    assert not (tmp_path / "ck").exists()


@pytest.mark.timeout(200)
def test_bad_inputs_are_one_line_and_write_nothing(trained, tmp_path, capsys):
    common = ["--load", trained["ckpt"], "--text", trained["text"], "--tokens-per-domain",
              "500"]
    cases = [(["--thresholds", "-0.1"], "negative"),
             (["--thresholds", "nan"], "not finite"),
             (["--thresholds", "0.1,0.2,0.3"], "3 thresholds for 2 MoE layers"),
             (["--thresholds", "0.1,x"], "expected numbers"),
             (["--target-experts-per-token", "5"], "above the number of experts E = 4"),
             (["--target-experts-per-token", "3.99"], "above the undialled model"),
             (["--target-experts-per-token", "0"], "must be > 0"),
             (["--target-experts-per-token", "1", "--max-experts", "9"], "above E = 4"),
             (["--sweep", "--sweep-forms", "clip"], "--sweep-forms")]
    for i, (extra, needle) in enumerate(cases):
        out = tmp_path / f"bad{i}"
        err = dial([*common, *extra, "--out", str(out)], capsys, expect=2).err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], \
            (extra, err)
        assert not out.exists(), extra
    # a non-empty --out is refused before any work
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    err = dial([*common, "--thresholds", "0", "--out", str(full)], capsys, expect=2).err
    assert "--overwrite" in err and os.listdir(full) == ["keep.txt"]
