#!/usr/bin/env python
"""The Python steps of scripts/gpu_check.sh (none needs CUDA itself):

    train ARGS...                  the trainer (megatron.remoe.pretrain) with deterministic kernels
    compare FULL RESUMED EXIT TARGET   uninterrupted vs resumed run: every step bit-identical,
                                   Stage III (sparsity >= TARGET) reached by step EXIT
    junit XML MODE                 a pytest JUnit report: no failure, and the cases this machine
                                   exists for ran (MODE cuda: the GPU cases; cpu: the CPU ones)
    summary STEPS_JSONL OUT_JSON   the steps' results -> one summary; exit 1 unless all passed
"""

from __future__ import annotations

import json
import runpy
import sys
import xml.etree.ElementTree as ET

COMPARED = ("lm_loss", "moe_relu_l1_reg_coeff", "moe_relu_sparsity", "lr", "grad_norm")
# test cases that must run (not skip) on the machine of each mode: name prefix -> expected count
REQUIRED = {
    "cuda": {"test_sparse_regime_one_process[cuda-": 16,
             "test_relu_router_bf16_model_routes_like_fp32": 1,
             "test_controller_and_regulariser_stay_fp32_in_bf16": 1},
    "cpu": {"test_sparse_regime_one_process[cpu-": 32, "test_sparse_regime_ep2[": 16},
}


def train(argv: list) -> None:
    import torch  # noqa: PLC0415 -- the other steps (compare, junit, summary) run without torch

    # CUDA's scatter/index-add kernels (token unpermutation) are atomic by default: comparing a
    # resumed run with an uninterrupted one bit for bit needs the same bits from the same work
    torch.use_deterministic_algorithms(True, warn_only=True)
    sys.argv = ["megatron.remoe.pretrain", *argv]
    runpy.run_module("megatron.remoe.pretrain", run_name="__main__", alter_sys=True)


def read_train_metrics(path: str) -> list:
    with open(path, encoding="utf-8") as fh:
        return [r for r in map(json.loads, fh) if r.get("split") == "train"]


def compare(full_path: str, resumed_path: str, exit_iteration: int, target: float) -> int:
    full, resumed = read_train_metrics(full_path), read_train_metrics(resumed_path)
    report = {"iterations_full": [r["iteration"] for r in full],
              "iterations_resumed": [r["iteration"] for r in resumed],
              "lm_loss_full": [r["lm_loss"] for r in full],
              "sparsity_full": [r["moe_relu_sparsity"] for r in full]}
    problems = []
    if report["iterations_full"] != report["iterations_resumed"] or not full:
        problems.append("the two runs logged different iterations")
    diffs = [(a["iteration"], key, a[key], b[key]) for a, b in zip(full, resumed)
             for key in COMPARED if a[key] != b[key]]
    before = [d for d in diffs if d[0] <= exit_iteration]
    if before:  # the same computation twice gave different bits: no resume test possible
        problems.append(f"not deterministic: steps <= {exit_iteration} differ before any resume, "
                        f"first {before[0]}")
    elif diffs:
        problems.append(f"resume is not bit-identical: first difference {diffs[0]}")
    stage3 = next((r["iteration"] for r in full if r["moe_relu_sparsity"] >= target), None)
    report["stage3_from_iteration"] = stage3
    if stage3 is None or stage3 > exit_iteration:
        problems.append(f"Stage III (sparsity >= {target}) not reached by step {exit_iteration} "
                        f"(first at {stage3})")
    report["problems"] = problems
    print(json.dumps(report))
    return 1 if problems else 0


def junit(path: str, mode: str) -> int:
    cases = ET.parse(path).getroot().iter("testcase")
    counts, ran, problems = {"passed": 0, "failed": 0, "skipped": 0}, {}, []
    for case in cases:
        name = case.get("name", "")
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
            problems.append(f"failed: {case.get('classname')}::{name}")
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
            reason = case.find("skipped").get("message", "")
            print(f"skipped: {name}: {reason}")
        else:
            counts["passed"] += 1
            for prefix in REQUIRED[mode]:
                if name.startswith(prefix):
                    ran[prefix] = ran.get(prefix, 0) + 1
    for prefix, want in REQUIRED[mode].items():
        if ran.get(prefix, 0) != want:
            problems.append(f"{prefix}*: {ran.get(prefix, 0)} passed, {want} expected")
    print(json.dumps({"counts": counts, "problems": problems}))
    return 1 if problems else 0


def summary(steps_path: str, out_path: str) -> int:
    with open(steps_path, encoding="utf-8") as fh:
        steps = [json.loads(line) for line in fh if line.strip()]
    meta = steps.pop(0) if steps and steps[0].get("kind") == "meta" else {}
    passed = bool(steps) and all(s["status"] == "passed" for s in steps)
    with open(out_path, "w", encoding="utf-8") as fh:
        json.dump({**meta, "passed": passed, "steps": steps}, fh, indent=1)
    for s in steps:
        print(f"{s['status']:>8}  {s['seconds']:>4}s  {s['version']:>7}  {s['step']}"
              + (f"  ({s['note']})" if s.get("note") else ""))
    print("GPU CHECK " + ("PASSED" if passed else "FAILED"))
    return 0 if passed else 1


def main(argv: list) -> int:
    verb, args = argv[0], argv[1:]
    if verb == "train":
        train(args)
        return 0
    if verb == "compare":
        return compare(args[0], args[1], int(args[2]), float(args[3]))
    if verb == "junit":
        return junit(args[0], args[1])
    if verb == "summary":
        return summary(args[0], args[1])
    print(f"unknown verb {verb!r}; see the module docstring", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
