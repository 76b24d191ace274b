"""megatron.remoe behaves as a library on import (issue 25 item 4, issue 26 item 4): importing every
module of the package installs no warning filter and changes no logger outside `megatron.remoe`
(handlers, level, filters, propagation), the root logger included; the entry points install their
console themselves (logs.configure). The scripts in tools/ and bench/ are held to the same rule: tests
load them as modules, and their console is set up by their main().

Importing the package also imports torch, numpy, megatron-core, transformers..., and several of them
add warning filters and configure their own loggers at import. What the package itself changes is
therefore measured against a reference process that imports the same third-party modules, in the
same order, and nothing of megatron.remoe."""

import json
import os
import subprocess
import sys

import pytest

import megatron.remoe
from tests.helpers.paths import ROOT

PACKAGE_DIR = os.path.join(ROOT, "megatron", "remoe")

# Run in a fresh interpreter (cwd: the checkout): `package NAME...` imports megatron.remoe's modules
# and loads the scripts given as paths (tools/x.py), `reference MODULE...` imports the listed
# third-party modules; prints the process-wide logging/warnings state as JSON.
PROBE = r'''
import importlib, importlib.util, json, logging, os, sys, warnings

def pattern(p):
    return getattr(p, "pattern", p)

def logger_state(logger):
    return [logger.level, [type(h).__name__ for h in logger.handlers],
            [type(f).__name__ for f in logger.filters], logger.propagate, logger.disabled]

def state():
    loggers = {name: logger_state(logger) for name, logger in logging.root.manager.loggerDict.items()
               if isinstance(logger, logging.Logger)
               and not (name == "megatron.remoe" or name.startswith("megatron.remoe."))}
    return {"warnings.filters": [[a, pattern(m), c.__name__, pattern(mod), line]
                                 for a, m, c, mod, line in warnings.filters],
            "warnings.showwarning": warnings.showwarning.__module__ + "." +
                                    warnings.showwarning.__qualname__,
            "root": logger_state(logging.getLogger()),
            "logging.disable": logging.root.manager.disable, "loggers": loggers}

def load(name):
    if name.endswith(".py"):  # a script, loaded as a module (not run: __name__ is not __main__)
        spec = importlib.util.spec_from_file_location("probe_" + os.path.basename(name)[:-3], name)
        module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # as import does
        spec.loader.exec_module(module)
    else:
        importlib.import_module(name)

def third_party(module):  # neither ours nor another module of this checkout (tests.*, bench/machine);
    # installed packages count as third party even when the venv lives inside the checkout (.venv)
    path = os.path.abspath(getattr(module, "__file__", None) or "")
    return not path.startswith(os.getcwd() + os.sep) or "site-packages" in path.split(os.sep)

mode, names = sys.argv[1], sys.argv[2:]
failed = []
for name in names:
    try:
        load(name)
    except Exception as e:  # the reference may meet a module that only imports in its context
        failed.append(f"{name}: {type(e).__name__}: {e}")
out = {"state": state(), "failed": failed}
if mode == "package":
    out["ours"] = logger_state(logging.getLogger("megatron.remoe"))
    out["others"] = [n for n, m in list(sys.modules.items())
                     if n not in ("__main__", "__mp_main__") and third_party(m)]
print("PROBE " + json.dumps(out))
'''


def package_modules() -> list:
    """Every module of megatron/remoe, from the source tree."""
    names = []
    for dirpath, dirs, files in os.walk(PACKAGE_DIR):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for f in sorted(files):
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                names.append(rel[:-len(".__init__")] if rel.endswith(".__init__") else rel)
    return names


def scripts() -> list:
    """The entry-point scripts of tools/ and bench/ (paths relative to the checkout)."""
    return [os.path.join(folder, f) for folder in ("tools", "bench")
            for f in sorted(os.listdir(os.path.join(ROOT, folder))) if f.endswith(".py")]


def probe(mode: str, names: list) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for key in ("PYTHONWARNINGS", "REMOE_LOG_LEVEL", "RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-c", PROBE, mode, *names], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")][-1]
    return json.loads(line[len("PROBE "):])


@pytest.mark.multiprocess
def test_importing_every_module_changes_no_warning_filter_and_no_foreign_logger():
    modules = package_modules()
    assert len(modules) > 50 and {"megatron.remoe.training.loop", "megatron.remoe.cpu.backend",
                                  "megatron.remoe.cli.main"} <= set(modules)  # the walk found the tree
    tools = scripts()
    assert "tools/analyze_routing.py" in tools and "bench/bench_step.py" in tools
    ours = probe("package", modules + tools)
    assert ours["failed"] == [], ours["failed"]
    # the package's own logger: a NullHandler, records still propagate to the application's handlers
    assert ours["ours"] == [0, ["NullHandler"], [], True, False], ours["ours"]
    reference = probe("reference", ours["others"])
    got, want = ours["state"], reference["state"]
    assert got["warnings.filters"] == want["warnings.filters"], \
        [f for f in got["warnings.filters"] if f not in want["warnings.filters"]]
    assert got["warnings.showwarning"] == want["warnings.showwarning"]
    assert got["root"] == want["root"] and got["logging.disable"] == want["logging.disable"]
    changed = {name: (want["loggers"].get(name), state) for name, state in got["loggers"].items()
               if state != want["loggers"].get(name, [0, [], [], True, False])}
    assert not changed, changed  # {logger: (reference state, state after our imports)}


@pytest.mark.parametrize("orig_argv, ours", [
    (["python", "-m", "megatron.remoe.ablation", "--help"], True),
    (["python", "-u", "-W", "ignore", "-m", "megatron.remoe.pretrain"], True),
    (["python", "-m", "pytest", "-m", "megatron.remoe"], False),  # pytest's -m is not python's
    (["python", "-m", "mytrainer.train"], False),
    (["python", "-c", "import megatron.remoe", "-m", "megatron.remoe.x"], False),
    (["python", "train.py", "-m", "megatron.remoe.x"], False),
    (["/usr/bin/remoe", "train"], False),  # the console script: cli.main sets up the console
])
def test_only_python_m_of_our_own_module_counts_as_our_entry_point(monkeypatch, orig_argv, ours):
    monkeypatch.setattr(sys, "orig_argv", orig_argv)
    assert megatron.remoe._started_as_our_module() is ours
