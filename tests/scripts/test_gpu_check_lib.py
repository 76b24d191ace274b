"""scripts/gpu_check_lib.py, the verdicts of the GPU check, on hand-made inputs: a resumed run that
differs after the resume point, a run that is not deterministic before it, Stage III not reached,
a skipped CUDA case, a failed test; and the summary's exit status."""

from __future__ import annotations

import json
import os
import sys

from tests.helpers.paths import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))  # a script directory, not a package

import gpu_check_lib as lib  # noqa: E402


def write_metrics(path, sparsities, loss_change_at=None):
    with open(path, "w", encoding="utf-8") as fh:
        for i, s in enumerate(sparsities, start=1):
            loss = 5.0 - 0.1 * i + (1e-7 if i == loss_change_at else 0.0)
            fh.write(json.dumps(dict(iteration=i, split="train", lm_loss=loss, lr=1e-3,
                                     grad_norm=1.0, moe_relu_sparsity=s,
                                     moe_relu_l1_reg_coeff=0.1)) + "\n")
        fh.write(json.dumps(dict(iteration=len(sparsities), split="valid", lm_loss=9.0)) + "\n")
    return str(path)


SPARSE = [0.5, 0.7, 0.9, 0.88, 0.86, 0.9]


def test_compare_passes_identical_runs_in_stage3(tmp_path, capsys):
    full = write_metrics(tmp_path / "a", SPARSE)
    assert lib.compare(full, write_metrics(tmp_path / "b", SPARSE), 4, 0.875) == 0
    assert json.loads(capsys.readouterr().out)["stage3_from_iteration"] == 3


def test_compare_fails_resume_difference_nondeterminism_and_no_stage3(tmp_path, capsys):
    full = write_metrics(tmp_path / "a", SPARSE)
    cases = {"resume is not bit-identical": (SPARSE, 5, 0.875),
             "not deterministic": (SPARSE, 2, 0.875),
             "Stage III": (SPARSE, None, 0.95)}
    for needle, (sparsities, change_at, target) in cases.items():
        other = write_metrics(tmp_path / "b", sparsities, loss_change_at=change_at)
        assert lib.compare(full, other, 4, target) == 1, needle
        problems = json.loads(capsys.readouterr().out)["problems"]
        assert len(problems) == 1 and needle in problems[0], (needle, problems)


def write_junit(path, cases):
    body = "".join(f'<testcase classname="tests.method.test_moe_sparse" name="{name}">{inner}</testcase>'
                   for name, inner in cases)
    path.write_text(f'<testsuites><testsuite name="pytest">{body}</testsuite></testsuites>')
    return str(path)


def test_junit_requires_the_cases_of_its_machine(tmp_path, capsys):
    cuda = [(f"test_sparse_regime_one_process[cuda-{i}]", "") for i in range(16)]
    cuda += [("test_relu_router_bf16_model_routes_like_fp32", ""),
             ("test_controller_and_regulariser_stay_fp32_in_bf16", ""),
             ("test_te_spec_gpt_forward_backward_bf16", '<skipped message="needs TE"/>')]
    assert lib.junit(write_junit(tmp_path / "ok.xml", cuda), "cuda") == 0
    skipped = [(cuda[0][0], '<skipped message="needs a CUDA GPU"/>')] + cuda[1:]
    assert lib.junit(write_junit(tmp_path / "skip.xml", skipped), "cuda") == 1
    failed = cuda + [("test_other", '<failure message="boom"/>')]
    assert lib.junit(write_junit(tmp_path / "fail.xml", failed), "cuda") == 1
    assert lib.junit(write_junit(tmp_path / "cpu.xml", cuda), "cpu") == 1  # no CPU case ran
    capsys.readouterr()


def test_summary_passes_only_when_every_step_passed(tmp_path, capsys):
    steps = tmp_path / "steps.jsonl"
    rows = [dict(kind="meta", mode="device"),
            dict(version="0.16.1", step="pytest", status="passed", exit=0, seconds=40, note="")]
    steps.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert lib.summary(str(steps), str(tmp_path / "s.json")) == 0
    rows.append(dict(version="0.19.2", step="train", status="failed", exit=125, seconds=0,
                     note="not run: time budget spent"))
    steps.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert lib.summary(str(steps), str(tmp_path / "s.json")) == 1
    written = json.loads((tmp_path / "s.json").read_text())
    assert written["passed"] is False and written["mode"] == "device" and len(written["steps"]) == 2
    assert "GPU CHECK FAILED" in capsys.readouterr().out
