"""Bad configurations and data conditions (the table in docs/reliability.md): each one stops the
trainer with exit code 2 and exactly one line on stderr that names the offending value and the fix,
and nothing is written or overwritten (no checkpoint directory created, an existing one unchanged
down to file mtimes).

The rows run `megatron.remoe.pretrain.main` in-process (every one of them fails before a process
group exists); two rows also run as real processes to check the exit code of the command itself.
"""

import os
import shutil

import pytest

from tests.helpers.pretrain_utils import run_pretrain
from tools.parity.tiny_gpt import build_corpus

pytestmark = pytest.mark.timeout(120)

TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--num-query-groups", "2", "--seq-length", "32", "--num-experts", "4",
        "--micro-batch-size", "2", "--train-iters", "2", "--eval-iters", "0"]
MOCK = ["--mock-data", "--vocab-size", "256"]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    """Real data (+ truncated copies), a real checkpoint of the TINY model, odd paths."""
    root = tmp_path_factory.mktemp("bad_inputs")
    data = build_corpus(root / "data", num_files=12, vocab=300, chars_per_file=3000)
    for which, suffix in (("bin", ".bin"), ("idx", ".idx")):
        prefix = str(root / "data" / f"trunc_{which}")
        for ext in (".bin", ".idx", ".meta.json"):
            if os.path.exists(data["train"] + ext):
                shutil.copy(data["train"] + ext, prefix + ext)
        with open(prefix + suffix, "r+b") as fh:
            fh.truncate(os.path.getsize(prefix + suffix) - 8)
        data[f"trunc_{which}"] = prefix
    data.update(broken_copies(data["train"]))
    ckpt = str(root / "ckpt")
    run_pretrain(TINY + MOCK + ["--train-iters", "1", "--save", ckpt])
    a_file = root / "a_file"
    a_file.write_text("not a directory\n")
    yaml_bad = root / "bad_type.yaml"
    yaml_bad.write_text("num_layers: 2.5\n")
    return {"data": data, "ckpt": ckpt, "file": str(a_file), "yaml_bad": str(yaml_bad)}


def _copy_prefix(src, dst):
    for ext in (".bin", ".idx", ".meta.json"):
        if os.path.exists(src + ext):
            shutil.copy(src + ext, dst + ext)
    return dst


def broken_copies(train):
    """Copies of a good prefix with one defect each: an index entry pointing past the end of the
    .bin, a token id beyond the vocabulary, and an empty dataset (no documents)."""
    import numpy as np

    from megatron.remoe.data.indexed import IDX_HEADER

    out = {}
    ptr = _copy_prefix(train, train + "_bad_ptr")
    with open(ptr + ".idx", "rb") as fh:
        n_seq = IDX_HEADER.unpack(fh.read(IDX_HEADER.size))[3]
    pointers = np.memmap(ptr + ".idx", np.int64, "r+", IDX_HEADER.size + 4 * n_seq, (n_seq,))
    pointers[n_seq // 2] = os.path.getsize(ptr + ".bin") + 4096
    pointers.flush()
    del pointers
    out["bad_ptr"] = ptr
    big = _copy_prefix(train, train + "_big_id")
    with open(big + ".idx", "rb") as fh:
        code = IDX_HEADER.unpack(fh.read(IDX_HEADER.size))[2]
    dtype = {4: np.int32, 8: np.uint16}[code]
    tokens = np.memmap(big + ".bin", dtype, "r+")
    tokens[len(tokens) // 3] = 1000  # the tokenizer has 300 tokens
    tokens.flush()
    del tokens
    out["big_id"] = big
    empty = train + "_empty"
    with open(empty + ".idx", "wb") as fh:
        fh.write(IDX_HEADER.pack(b"MMIDIDX\x00\x00", 1, code, 0, 1))
        fh.write(np.zeros(1, np.int64).tobytes())  # document index [0]
    open(empty + ".bin", "wb").close()
    out["empty"] = empty
    return out


def without(args, flag):
    i = args.index(flag)
    return args[:i] + args[i + 2:]


def real_data(c, tokenizer=None, prefix=None):
    d = c["data"]
    return ["--data-path", prefix or d["train"], "--tokenizer", tokenizer or d["tokenizer"]]


def resume(c, *changes):
    return TINY + MOCK + list(changes) + ["--save", c["ckpt"], "--load", c["ckpt"]]


# (row id, argv given the context, the value the message must name, the fix it must give)
ROWS = [
    ("flag-wrong-type", lambda c: TINY + MOCK + ["--hidden-size", "big"],
     "--hidden-size='big'", "pass an integer"),
    ("yaml-wrong-type", lambda c: ["--config", c["yaml_bad"]] + TINY[2:] + MOCK,
     "num_layers=2.5 is not a valid int", "fix the value of num_layers"),
    ("unknown-flag", lambda c: TINY + MOCK + ["--hiden-size", "64"],
     "unrecognized arguments: --hiden-size", "--help"),
    ("missing-required", lambda c: without(TINY, "--train-iters") + MOCK,
     "train_iters is required", "set --train-iters"),
    ("k-greater-than-E", lambda c: TINY + MOCK + ["--moe-router-topk", "9"],
     "moe_router_topk=9 must be in [1, num_experts=4]", "raise --num-experts"),
    ("zero-experts", lambda c: TINY + MOCK + ["--num-experts", "0"],
     "num_experts=0", "use --router dense"),
    ("tp-not-dividing-heads", lambda c: TINY + MOCK + ["--tensor-model-parallel-size", "3"],
     "num_attention_heads=4 is not divisible by tensor_model_parallel_size=3",
     "pick a TP size that divides it"),
    ("world-not-divisible", lambda c: TINY + MOCK + ["--tensor-model-parallel-size", "2",
                                                     "--sequence-parallel"],
     "world size 1 is not divisible by TP*PP*CP = 2", "change the parallel sizes"),
    ("global-batch", lambda c: TINY + MOCK + ["--global-batch-size", "3"],
     "global_batch_size=3", "use a multiple of 2"),
    ("bad-cpu-experts", lambda c: TINY + MOCK + ["--moe-cpu-experts", "fast"],
     "invalid choice: 'fast'", "choose from 'grouped', 'sequential'"),
    ("negative-lr", lambda c: TINY + MOCK + ["--lr", "-0.001"], "lr=-0.001 must be > 0",
     "set --lr to a positive value"),
    ("bad-nan-policy", lambda c: TINY + MOCK + ["--nan-policy", "ignore"],
     "invalid choice: 'ignore'", "choose from 'stop', 'skip-step'"),
    ("negative-max-skipped", lambda c: TINY + MOCK + ["--max-skipped-steps", "-1"],
     "max_skipped_steps=-1", "set --max-skipped-steps 0"),
    ("collective-timeout-zero", lambda c: TINY + MOCK + ["--distributed-timeout-minutes", "0"],
     "distributed_timeout_minutes=0.0 must be > 0", "set --distributed-timeout-minutes"),
    ("keep-last-zero", lambda c: TINY + MOCK + ["--keep-last-n-checkpoints", "0"],
     "keep_last_n_checkpoints=0 must be >= 1", "drop the flag to keep all"),
    ("exit-duration-zero", lambda c: TINY + MOCK + ["--exit-duration-in-mins", "0"],
     "exit_duration_in_mins=0.0 must be > 0", "drop the flag"),
    ("missing-dataset", lambda c: TINY + real_data(c, prefix="/nonexistent/corpus"),
     "/nonexistent/corpus.bin/.idx not found", "preprocess the data"),
    ("bad-blend", lambda c: TINY + ["--data-path", "0.5", c["data"]["train"], "0.5",
                                    "--tokenizer", c["data"]["tokenizer"]],
     "a weighted blend needs 'weight prefix' pairs, got 3 items", "fix the list"),
    ("truncated-bin", lambda c: TINY + real_data(c, prefix=c["data"]["trunc_bin"]),
     "trunc_bin.bin is truncated", "re-run tools/preprocess_data.py"),
    ("truncated-idx", lambda c: TINY + real_data(c, prefix=c["data"]["trunc_idx"]),
     "trunc_idx.idx is truncated", "re-run tools/preprocess_data.py"),
    ("index-past-end", lambda c: TINY + real_data(c, prefix=c["data"]["bad_ptr"]),
     "train_bad_ptr.idx is corrupt: sequence", "points past the end of"),
    ("token-id-beyond-vocab", lambda c: TINY + real_data(c, prefix=c["data"]["big_id"]),
     "train_big_id.bin holds token id 1000", "re-run tools/preprocess_data.py with this run's "
     "tokenizer"),
    ("empty-dataset", lambda c: TINY + real_data(c, prefix=c["data"]["empty"]),
     "train_empty.bin/.idx hold no documents", "preprocess a non-empty input"),
    ("empty-valid-split", lambda c: TINY + real_data(c) + ["--split", "100,0,0",
                                                           "--eval-iters", "1"],
     "split=100,0,0 leaves no validation documents", "give the valid part a non-zero share"),
    ("empty-train-split", lambda c: TINY + real_data(c) + ["--split", "0,100,0"],
     "split=0,100,0 leaves no training documents", "give the train part a non-zero share"),
    ("blend-weight-zero", lambda c: TINY + ["--data-path", "0", c["data"]["train"], "1",
                                            c["data"]["valid"], "--tokenizer",
                                            c["data"]["tokenizer"]],
     "blend weight 0 of ", "give it a positive weight or drop the prefix"),
    ("blend-weight-negative", lambda c: TINY + ["--data-path", "1", c["data"]["train"], "-0.5",
                                                c["data"]["valid"], "--tokenizer",
                                                c["data"]["tokenizer"]],
     "blend weight -0.5 of ", "give it a positive weight or drop the prefix"),
    ("tokenizer-mismatch", lambda c: TINY + real_data(c, tokenizer="gpt2"),
     "tokenizer mismatch", "use the same tokenizer or re-run preprocessing"),
    ("tokenizer-missing", lambda c: TINY + real_data(c, tokenizer="/nonexistent/tok"),
     "tokenizer '/nonexistent/tok' is neither 'gpt2' nor a directory", "fix: pass 'gpt2'"),
    ("vocab-mismatch", lambda c: TINY + real_data(c) + ["--vocab-size", "100"],
     "vocab_size=100 does not match the tokenizer", "drop --vocab-size"),
    ("save-unwritable", lambda c: TINY + MOCK + ["--save", "/sys/remoe-ckpt"],
     "save=/sys/remoe-ckpt cannot be created: /sys is not writable",
     "choose a writable --save directory"),
    ("save-is-a-file", lambda c: TINY + MOCK + ["--save", c["file"]],
     "exists and is not a directory", "point --save at a directory"),
    ("save-under-a-file", lambda c: TINY + MOCK + ["--save", os.path.join(c["file"], "ckpt")],
     "is a file", "choose another --save directory"),
    ("load-is-a-file", lambda c: TINY + MOCK + ["--load", c["file"]],
     "is not a directory", "pass the --save directory"),
    ("ckpt-other-hidden", lambda c: resume(c, "--hidden-size", "128"),
     "hidden_size=64 there, 128 in this run", "set --hidden-size 64"),
    ("ckpt-other-layers", lambda c: resume(c, "--num-layers", "4"),
     "num_layers=2 there, 4 in this run", "set --num-layers 2"),
    ("ckpt-other-experts", lambda c: resume(c, "--num-experts", "8"),
     "num_experts=4 there, 8 in this run", "set --num-experts 4"),
    ("ckpt-other-router", lambda c: resume(c, "--router", "dense"),
     "router='relu' there, 'dense' in this run", "set --router relu"),
    ("ckpt-other-vocab", lambda c: TINY + ["--mock-data", "--vocab-size", "1000", "--save",
                                           c["ckpt"], "--load", c["ckpt"]],
     "padded vocabulary of 256, this run 1024", "use the tokenizer/vocabulary of the saved run"),
]


def snapshot(path):
    """Every file and directory under `path` with size and mtime (None if `path` is absent)."""
    if not os.path.exists(path):
        return None
    out = {}
    for base, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(base, name)
            st = os.stat(full)
            out[os.path.relpath(full, path)] = (st.st_size, st.st_mtime_ns)
    st = os.stat(path)
    return out, st.st_mtime_ns


def check_one_line(err: str, value: str, fix: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("error: "), line
    assert value in line, (value, line)
    assert fix in line, (fix, line)
    return line


def test_table_has_at_least_20_rows():
    assert len(ROWS) >= 20 and len({r[0] for r in ROWS}) == len(ROWS)


@pytest.mark.multiprocess
@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(ctx, row, tmp_path, capsys):
    from megatron.remoe.pretrain import main

    _, make_argv, value, fix = row
    argv = make_argv(ctx)
    save = str(tmp_path / "ckpt")
    if "--save" not in argv:
        argv = argv + ["--save", save]
    watched = [ctx["ckpt"], ctx["file"], os.path.dirname(ctx["data"]["train"]), save]
    before = [snapshot(p) for p in watched]
    capsys.readouterr()
    assert main(argv) == 2
    check_one_line(capsys.readouterr().err, value, fix)
    assert [snapshot(p) for p in watched] == before
    assert not os.path.exists(save)


@pytest.mark.multiprocess
@pytest.mark.parametrize("row_id", ["truncated-bin", "ckpt-other-hidden"])
def test_bad_input_as_a_real_process(ctx, row_id, tmp_path):
    _, make_argv, value, fix = next(r for r in ROWS if r[0] == row_id)
    argv = make_argv(ctx)
    if "--save" not in argv:
        argv = argv + ["--save", str(tmp_path / "ckpt")]
    before = snapshot(ctx["ckpt"])
    proc = run_pretrain(argv, expect_rc=2, timeout=90)
    check_one_line(proc.stderr, value, fix)
    assert proc.stdout.strip() == ""
    assert snapshot(ctx["ckpt"]) == before
    assert not (tmp_path / "ckpt").exists()
