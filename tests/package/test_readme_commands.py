"""Every shell command README.md shows runs as written (issue 26, item 7).

The commands are read from README.md's ```bash blocks (continuation lines joined, trailing comments
dropped) and looked up in COMMANDS, which says for each one either the flags appended to shorten it
(a run of 600 steps becomes one of 5; appended flags win over earlier ones) or why it is skipped
(it installs, needs a GPU, the network or a cluster, or is the test suite itself). A README command
that COMMANDS does not know fails `test_every_readme_command_is_listed`, and so does an entry of
COMMANDS that the README no longer shows: a new README command must be added here.

The commands run in a scratch directory that links every top-level entry of the repository except
`runs/`, so relative paths (`runs/demo/...`, `examples/...`) resolve as they do for a user at the
repository root and nothing is written into the checkout. The environment is the README's: the
current interpreter's bin directory first on PATH (an activated `.venv`), this checkout first on
PYTHONPATH, Hugging Face hub access off. Commands that read a demo run (`runs/demo/...`) run after
the README command that makes it, in README order, and reuse it (the demo corpus and tokenizer are
built once, by the first demo command).

Where it runs: CI runs the commands (marked `readme`) in the newest lane (scripts/test_newest.sh,
`-m "core or readme"`), where `remoe`, `python` and `torchrun` are the Python 3.12 environment's,
i.e. what `pip install` gives a user; `bash scripts/demo.sh` runs `.venv/bin/remoe`, the pinned
environment the pinned lane set up. It is also the demo's end-to-end test (it asserts the summary
lines and files that tests/cli/test_demo.py asserted before it was folded in here). The pinned lane
(scripts/test.sh, `-m "not readme"`) keeps `test_every_readme_command_is_listed`.
"""

import hashlib
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from megatron.remoe.data import sources
from tests.helpers.paths import ROOT

REPO = Path(ROOT)
# one README command, shortened: `remoe demo --compare --iters 5` took 1,426 s at load average 50
COMMAND_TIMEOUT_S = 2400


@dataclass(frozen=True)
class Case:
    extra: str = ""                 # flags appended to the command as written
    skip: Optional[str] = None      # why it is not run here
    needs: Optional[str] = None     # the README command whose output it reads (run first)
    installed_venv: bool = False    # runs scripts/setup_env.sh: only where .venv is already set up
    expect: tuple = ()              # paths (relative to the scratch root) the command must create
    output: tuple = ()              # strings its standard output must contain


DEMO_COMPARE = "remoe demo --compare"
SHORT_RUN = "--train-iters 3 --eval-iters 1"
SHORT_GRID = "--set train_iters=2 eval_interval=2 eval_iters=1 save_interval=2 log_interval=1"
# the demo's summary (print_summary in megatron/remoe/cli/demo.py): each line it always prints
DEMO_SUMMARY = ("ReMoE demo finished", "validation loss", "shakespeare", "sparsity", "target 0.875",
                "lambda", "tokens/s", "parameters", "checkpoint", "settings             1 process(es) x ")

COMMANDS = {
    # Quick start
    # 2 steps (the demo evaluates after each step, eval_interval = iters // 4 or 1)
    "bash scripts/demo.sh": Case(extra="--iters 2", installed_venv=True, output=DEMO_SUMMARY,
                                 expect=("runs/demo/relu/summary.json",
                                         "runs/demo/relu/metrics.jsonl",
                                         "runs/demo/relu/checkpoints/iter_0000002")),
    "bash scripts/test.sh": Case(skip="the whole test suite, this test included"),
    # Install
    'pip install -e ".[test]"': Case(skip="installs packages (network)"),
    'pip install -c constraints-cpu.txt torch==2.13.0 megatron-core==0.16.1 -e ".[test]"':
        Case(skip="installs packages (network)"),
    'pip install -c constraints-newest.txt torch==2.13.0 megatron-core==0.19.2 -e ".[test]"':
        Case(skip="installs packages (network)"),
    # Data
    "python tools/preprocess_data.py --input data/*.jsonl --output-prefix data/bin/web "
    "--tokenizer gpt2 --append-eod --workers 4":
        Case(skip="the user's own data/*.jsonl and the gpt2 tokenizer from the HF hub (network); "
                  "tests/data/test_preprocess.py runs the tool on local files"),
    "python tools/build_demo_corpus.py --out-dir runs/demo/data":
        Case(expect=("runs/demo/data",)),
    # Training
    DEMO_COMPARE: Case(extra="--iters 1", output=DEMO_SUMMARY + ("Side by side", "TopK MoE", "Dense"),
                       expect=("runs/demo/relu/checkpoints/iter_0000001",
                               "runs/demo/topk/checkpoints/iter_0000001",
                               "runs/demo/dense/checkpoints/iter_0000001")),
    "bash scripts/train_torchrun.sh examples/remoe/182m/remoe.yaml "
    "--data-path /data/pile/train_text_document --valid-data-path /data/pile/val_text_document":
        Case(skip="8 GPUs and the Pile"),
    "sbatch --nodes 4 scripts/train_slurm.sbatch examples/remoe/469m/remoe.yaml --data-path ...":
        Case(skip="a SLURM cluster"),
    "OMP_NUM_THREADS=1 torchrun --nproc-per-node 4 -m megatron.remoe.pretrain "
    "--config examples/remoe/cpu-demo.yaml --mock-data --vocab-size 8192 "
    "--tensor-model-parallel-size 2 --sequence-parallel --expert-model-parallel-size 2 "
    "--global-batch-size 8 --train-iters 50 --save runs/tp2-sp-ep2":
        Case(extra=SHORT_RUN, expect=("runs/tp2-sp-ep2/latest_checkpointed_iteration.txt",)),
    # Routing analysis
    "python tools/analyze_routing.py --load runs/demo/relu/checkpoints --out runs/demo/analysis":
        Case(needs=DEMO_COMPARE, extra="--tokens-per-domain 2048", expect=("runs/demo/analysis",)),
    # Hugging Face export and evaluation
    "python tools/convert_checkpoint.py --load runs/demo/relu/checkpoints --out runs/demo/hf --verify":
        Case(needs=DEMO_COMPARE, expect=("runs/demo/hf/config.json",)),
    "python tools/evaluate.py --model runs/demo/hf --out runs/demo/eval --demo-corpus runs/demo/data":
        Case(needs="python tools/convert_checkpoint.py --load runs/demo/relu/checkpoints "
                   "--out runs/demo/hf --verify", extra="--max-chars-per-domain 4000 --mc-items-per-domain 8",
             expect=("runs/demo/eval",)),
    "python tools/convert_checkpoint.py --hf-to-megatron --hf runs/demo/hf --save runs/continued --verify":
        Case(needs="python tools/convert_checkpoint.py --load runs/demo/relu/checkpoints "
                   "--out runs/demo/hf --verify", expect=("runs/continued",)),
    # Compute dial
    "remoe dial --load runs/demo/relu/checkpoints --target-experts-per-token 0.75 "
    "--demo-corpus runs/demo/data --out runs/demo/dial":
        Case(needs=DEMO_COMPARE, extra="--tokens-per-domain 512", expect=("runs/demo/dial/dial.json",)),
    "remoe dial --load runs/demo/relu/checkpoints --sweep --demo-corpus runs/demo/data "
    "--out runs/demo/dial-sweep":
        Case(needs=DEMO_COMPARE, extra="--tokens-per-domain 512 --sweep-multiples 0.5,1 "
                                       "--sweep-methods global --sweep-forms cut",
             expect=("runs/demo/dial-sweep",)),
    # Ablations
    "python tools/ablate.py examples/remoe/ablations/cpu-small.yaml":
        Case(extra=f"--only relu-s1 {SHORT_GRID}",
             expect=("runs/ablations/cpu-small/relu-s1/summary.json",)),
    "OMP_NUM_THREADS=2 python tools/ablate.py examples/remoe/ablations/cpu-converge.yaml":
        Case(extra=f"--only relu-s1 {SHORT_GRID}",
             expect=("runs/ablations/cpu-converge/relu-s1/summary.json",)),
    "remoe ablate examples/remoe/ablations/182m-routers.yaml --print "
    "--set data_path=/data/pile/train_text_document": Case(),
    # Parity across layouts
    "OMP_NUM_THREADS=1 python tools/parity_table.py":
        Case(skip="the reduced parity matrix (27 trainer jobs, no flag shortens it), which "
                  "tests/training/test_parity.py runs in CI"),
    # Tests
    '.venv/bin/python -m pytest -q -m "not multiprocess and not slow"':
        Case(skip="the fast test suite itself"),
}


def readme_commands(text: str) -> list:
    """The commands of the ```bash blocks, in order, each on one line without its comment."""
    commands, pending, lang = [], "", None
    for line in text.splitlines():
        if line.startswith("```"):
            if lang is None:
                lang = line[3:].strip()
            else:
                assert not pending, f"README code block ends inside a continued command: {pending}"
                lang = None
            continue
        if lang not in ("bash", "sh", "shell"):
            continue
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending = f"{pending} {stripped}" if pending else stripped
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        commands.append(" ".join(re.sub(r"\s#\s.*$", "", pending).split()))
        pending = ""
    return commands


README_COMMANDS = readme_commands((REPO / "README.md").read_text())


def test_every_readme_command_is_listed():
    unknown = [c for c in README_COMMANDS if c not in COMMANDS]
    stale = [c for c in COMMANDS if c not in README_COMMANDS]
    assert not unknown, ("README commands this test does not know (add each to COMMANDS with its "
                         f"shortening flags or a skip reason): {unknown}")
    assert not stale, f"COMMANDS entries the README no longer shows (remove them): {stale}"
    assert len(README_COMMANDS) == len(set(README_COMMANDS)), "a README command appears twice"


def _archives_cached() -> bool:
    archives = os.path.join(sources.default_cache_dir(), "archives")
    return all(os.path.isfile(os.path.join(archives, a.filename)) for a in sources.ARCHIVES)


def _venv_set_up() -> bool:
    """scripts/setup_env.sh would install nothing: .venv exists and its stamp is current."""
    stamp = REPO / ".venv" / ".remoe-installed"
    if not stamp.is_file():
        return False
    digest = hashlib.sha256((REPO / "pyproject.toml").read_bytes()
                            + (REPO / "constraints-cpu.txt").read_bytes()).hexdigest()[:16]
    return stamp.read_text().strip() == f"{digest}-test"


class Scratch:
    """A directory that looks like the repository root to the commands; runs each one once."""

    def __init__(self, root: Path):
        self.root = root
        for entry in REPO.iterdir():
            if entry.name not in ("runs", ".git"):
                (root / entry.name).symlink_to(entry)
        # an activated venv: the interpreter's bin directory on PATH (first, unless already there)
        path = os.environ.get("PATH", "")
        bin_dir = os.path.dirname(sys.executable)
        if bin_dir not in path.split(os.pathsep):
            path = bin_dir + os.pathsep + path
        self.env = dict(os.environ, PATH=path,
                        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                        PYTHONWARNINGS="ignore")
        self.done = {}

    def run(self, command: str) -> subprocess.CompletedProcess:
        if command not in self.done:
            case = COMMANDS[command]
            if case.needs:
                prerequisite = self.run(case.needs)
                assert prerequisite.returncode == 0, f"prerequisite failed: {case.needs}"
            line = f"{command} {case.extra}".strip()
            self.done[command] = subprocess.run(
                ["bash", "-c", line], cwd=self.root, env=self.env, capture_output=True, text=True,
                timeout=COMMAND_TIMEOUT_S)
        return self.done[command]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return Scratch(tmp_path_factory.mktemp("readme"))


@pytest.mark.readme
@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.timeout(3 * COMMAND_TIMEOUT_S)
@pytest.mark.parametrize("command", README_COMMANDS, ids=lambda c: c[:70])
def test_readme_command_runs(scratch, command):
    case = COMMANDS.get(command)
    if case is None:
        pytest.fail(f"not in COMMANDS (see test_every_readme_command_is_listed): {command}")
    if case.skip:
        pytest.skip(case.skip)
    if case.installed_venv and not _venv_set_up():
        pytest.skip("no set-up .venv in this checkout: scripts/setup_env.sh would install packages")
    if not _archives_cached() and ("demo" in command or case.needs or "ablate.py" in command):
        pytest.skip("demo corpus archives are not cached (one-time download: `remoe demo` online)")
    proc = scratch.run(command)
    tail = (proc.stdout[-3000:] + "\n--- stderr ---\n" + proc.stderr[-3000:])
    assert proc.returncode == 0, f"`{command} {case.extra}` exited {proc.returncode}:\n{tail}"
    for path in case.expect:
        assert (scratch.root / path).exists(), f"`{command}` did not create {path}:\n{tail}"
    for needle in case.output:
        assert needle in proc.stdout, f"`{command}` did not print {needle!r}:\n{tail}"
