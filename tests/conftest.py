import os
import sys

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

# The core subset (`pytest -m core`): what proves the product on a megatron-core release. CI runs it
# on the newest release (Python 3.12 lane, .ci/run) and scripts/version_matrix.sh on every minor in
# the supported range. Node ids or their prefixes; kept here, in one place.
CORE_TESTS = (
    "tests/test_compat.py",  # router installation guard, signatures, numbering, layout, noise
    "tests/test_router.py",  # router/regulariser/controller numerics, MoE layer vs dense reference
    "tests/test_router_counts.py",
    "tests/test_moe_parallel.py::test_single_process_matches_dense_reference",
    "tests/test_moe_parallel.py::test_layout_matches_single_process[ep2_alltoall]",
    "tests/test_moe_parallel.py::test_layout_matches_single_process[ep2_allgather]",
    "tests/test_moe_parallel.py::test_layout_matches_single_process[tp2_sp]",
    "tests/test_sparsity_training.py",  # ReLU routers train, sparsity moves toward 1 - k/E
    "tests/test_train_loop.py::test_single_process_trains_and_logs",
    "tests/test_train_loop.py::test_resume_equals_uninterrupted_run",  # save -> resume, bit-exact
    "tests/test_parity.py::test_relu_parity[tp2_ep2]",  # TP2 x EP2 (4 processes) vs 1 process
    "tests/test_parity.py::test_exact_resume[tp2_ep2]",
    # interleaved 1F1B (PP2 x VP2) vs 1 process: its p2p settings were silently wrong with PP = 2
    "tests/test_parity.py::test_relu_parity[pp2_vp2]",
    "tests/test_hf_cli.py::test_tp2_ep2_checkpoint_convert_verify_evaluate_and_back",  # --verify
    "tests/test_reliability.py::test_unloadable_checkpoints_fall_back_or_stop_with_exit_2",
    "tests/test_cpu_experts.py",  # the CPU expert path vs SequentialMLP / dense, 1 process, EP2, TP2
    "tests/test_cpu_settings.py",  # fused Adam, grouped experts and bf16 in the trainer; allocator
    "tests/test_recompute.py",  # recompute x counts and x the Stage I bound
    "tests/test_relu_config_refusals.py",  # CUDA graphs, dispatch override at build, finalize()
    "tests/test_per_token_loss.py::test_per_token_loss_gives_the_default_modes_gradients",
    # sparse regime (0-expert tokens, 0-token experts, idle EP rank, all-zero map) vs float64
    "tests/test_moe_sparse.py::test_sparse_regime_one_process[cpu-",
    "tests/test_moe_sparse.py::test_sparse_regime_ep2",
    "tests/test_attach.py",  # the integration API: spec function, attach, lambda in checkpoints
    "tests/test_integration.py",  # a megatron-core-only loop == remoe train, bit for bit
    # TE <-> local checkpoints (TE emulated): one key set, offline tools, a resume across impls
    "tests/test_te_checkpoint_layout.py::test_te_and_local_moe_models_share_checkpoint_keys",
    "tests/test_te_checkpoint_layout.py::test_dp_reshardable_optimizer_state_does_not_cross_"
    "transformer_impl",
    "tests/test_te_checkpoint_layout.py::test_te_checkpoint_loads_in_every_offline_tool[te]",
    "tests/test_te_checkpoint_layout.py::test_resume_with_the_other_transformer_impl_equals_"
    "uninterrupted_run[te-to-local]",
    "tests/test_integration_examples.py",  # Megatron-LM flags/spec, Bridge callback (0.19+ only)
)


# Tests by kind. The fast unit tests are what is left: `pytest -m "not multiprocess and not slow"`
# (README, "Tests"). Node ids or their prefixes (a test function's id covers its parameters; an id
# cut inside its brackets, e.g. "...::test_x[2-", covers the parameter sets that start so).
# multiprocess: starts real processes -- gloo workers (dist_utils.run_workers), torchrun, the trainer
# or a tool or a Python script as a subprocess, worker pools (also in a module fixture the test uses).
MULTIPROCESS_TESTS = (
    "tests/test_ablate.py::test_tool_collects_real_runs_and_skips_finished",
    "tests/test_attach.py::test_ranks_without_routers_get_the_loaded_state_and_skip_together",
    "tests/test_bad_inputs.py::test_bad_input_exits_2_with_one_line_and_writes_nothing",
    "tests/test_bad_inputs.py::test_bad_input_as_a_real_process",
    "tests/test_chaos_resume.py",
    "tests/test_cli_config.py::test_pretrain_exits_2_with_one_line_and_no_checkpoint_dir",
    "tests/test_cli_demo.py",
    "tests/test_compat.py::test_known_noise_is_filtered_and_real_warnings_still_show",
    "tests/test_compute_dial_cli.py",
    "tests/test_controller.py::test_same_lambda_on_every_rank",
    "tests/test_controller.py::test_trainer_resume_with_option",
    "tests/test_cpu_experts.py::test_grouped_equals_sequential_mlp_and_dense_reference",
    "tests/test_cpu_experts.py::test_state_dict_and_sharded_keys_are_sequential_mlps",
    "tests/test_cpu_experts.py::test_bf16_expert_grads_go_to_fp32_main_grad_as_ddp_would",
    "tests/test_cpu_settings.py::test_fused_cpu_adam_gives_the_adam_loops_losses",
    "tests/test_cpu_settings.py::test_grouped_experts_train_like_sequential_mlp",
    "tests/test_cpu_settings.py::test_bf16_on_cpu_keeps_router_and_lambda_fp32_and_follows_fp32",
    "tests/test_data_preprocess.py::test_output_independent_of_worker_count",  # 2 worker processes
    "tests/test_data_preprocess.py::test_multi_domain_cli",
    "tests/test_data_preprocess.py::test_bad_inputs_cli[2-",
    "tests/test_dead_rank.py",
    "tests/test_elastic.py::test_draws_are_identical_on_every_rank",  # 2 gloo workers
    "tests/test_elastic.py::test_default_path_is_unchanged_until_the_first_cut",
    "tests/test_elastic.py::test_elastic_resume_equals_uninterrupted_run",
    "tests/test_gpu.py::test_train_steps_single_gpu",
    "tests/test_hf_cli.py",
    "tests/test_integration.py",  # remoe train and the foreign loop under torchrun
    # two fresh interpreters import the package and its dependencies
    "tests/test_library_import.py::test_importing_every_module_changes_no_warning_filter_and_no_foreign_logger",
    "tests/test_moe_parallel.py",
    "tests/test_moe_sparse.py::test_sparse_regime_ep2",
    "tests/test_parity.py",
    "tests/test_per_token_loss.py::test_per_token_loss_with_tensor_and_data_parallel",
    "tests/test_reliability.py::test_reference_keeps_last_two_verified_checkpoints",
    "tests/test_reliability.py::test_kill9_during_save_then_resume",
    "tests/test_reliability.py::test_sigterm_mid_run_saves_exits_0_and_resumes_identically",
    "tests/test_reliability.py::test_sigusr1_on_one_rank_stops_both_ranks",
    "tests/test_reliability.py::test_corrupt_newest_checkpoint_falls_back_with_warning",
    "tests/test_reliability.py::test_unloadable_checkpoints_fall_back_or_stop_with_exit_2",
    "tests/test_reliability.py::test_nan_stop_policy_exits_3_naming_step_and_layers",
    "tests/test_reliability.py::test_nan_skip_step_skips_and_continues",
    "tests/test_reliability.py::test_nan_on_one_rank_is_seen_by_all_and_skips_are_bounded",
    "tests/test_reliability.py::test_exit_duration_in_mins_saves_and_exits_0",
    "tests/test_reliability.py::test_signal_handler_defers_then_second_signal_kills",
    "tests/test_run_lock.py::test_second_trainer_refused_then_stale_lock_taken_over",
    "tests/test_save_failures.py",
    "tests/test_te_checkpoint_layout.py::test_emulation_writes_te_layout_before_the_fix_and_local_"
    "keys_after",
    "tests/test_te_checkpoint_layout.py::test_te_checkpoint_loads_in_every_offline_tool",
    "tests/test_te_checkpoint_layout.py::test_resume_with_the_other_transformer_impl_equals_"
    "uninterrupted_run",
    "tests/test_step_history.py::test_rss_benchmark_smoke",
    "tests/test_train_loop.py::test_single_process_trains_and_logs",
    "tests/test_train_loop.py::test_saved_config_round_trips",
    "tests/test_train_loop.py::test_resume_equals_uninterrupted_run",
    "tests/test_train_loop.py::test_two_processes_train",
    "tests/test_train_loop.py::test_resume_tp2_checkpoint_on_one_process",
)
# gpu: needs a CUDA GPU (skipped without one); scripts/gpu_check.sh runs them on a GPU machine.
GPU_TESTS = (
    "tests/test_gpu.py::test_relu_router_bf16_model_routes_like_fp32",
    "tests/test_gpu.py::test_controller_and_regulariser_stay_fp32_in_bf16",
    "tests/test_gpu.py::test_te_moe_layer_is_exact_with_variable_k",
    "tests/test_gpu.py::test_te_spec_gpt_forward_backward_bf16",
    "tests/test_gpu.py::test_train_steps_single_gpu",
    "tests/test_moe_sparse.py::test_sparse_regime_one_process[cuda-",
)
# slow: one process, but more than ~2 s each on the 2-core CI machine (measured under load).
SLOW_TESTS = (
    "tests/test_ablate.py::test_plots_vs_E_and_G",
    "tests/test_analysis_e2e.py::test_report_in_memory_relu_vs_topk",
    "tests/test_analysis_e2e.py::test_cli_on_checkpoints",
    "tests/test_bench_dtype.py",  # imports torch/megatron-core for the machine line; matplotlib
    "tests/test_hf_evaluate.py::test_backends_agree_and_routing_counts",
    "tests/test_integration_examples.py::test_megatron_lm_flags_give_a_remoe_config_and_the_spec_function",
    "tests/test_sparsity_training.py",
)
KINDS = {"core": CORE_TESTS, "multiprocess": MULTIPROCESS_TESTS, "gpu": GPU_TESTS, "slow": SLOW_TESTS}


def pytest_configure(config):
    config.addinivalue_line("markers", "core: the core subset (tests/conftest.py CORE_TESTS)")
    config.addinivalue_line("markers", "multiprocess: starts real processes (tests/conftest.py "
                                       "MULTIPROCESS_TESTS)")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (tests/conftest.py GPU_TESTS)")
    config.addinivalue_line("markers", "slow: single-process but slow (tests/conftest.py SLOW_TESTS)")


def listed(nodeid: str, prefixes) -> bool:
    """Whether a test's node id is one of `prefixes` or under one (a file, a test's parameters)."""
    return any(nodeid == t or nodeid.startswith((t + "::", t + "[")) or
               (t.endswith(".py") and nodeid.startswith(t)) or
               ("[" in t and not t.endswith("]") and nodeid.startswith(t)) for t in prefixes)


@pytest.hookimpl(tryfirst=True)  # before -k/-m deselect: the stale-entry check sees every test
def pytest_collection_modifyitems(config, items):
    for item in items:
        for marker, prefixes in KINDS.items():
            if listed(item.nodeid, prefixes):
                item.add_marker(getattr(pytest.mark, marker))
    check_kind_lists(config, [item.nodeid for item in items])


def check_kind_lists(config, nodeids: list) -> None:
    """A renamed test must not silently lose its marker: every listed id of a collected file has to
    match a collected test (checked when whole files are collected, not single node ids)."""
    if any("::" in str(arg) for arg in config.args):
        return
    files = {n.split("::")[0] for n in nodeids}
    stale = [t for prefixes in KINDS.values() for t in prefixes
             if t.split("::")[0] in files and not any(listed(n, [t]) for n in nodeids)]
    if stale:
        raise pytest.UsageError(f"tests/conftest.py lists tests that do not exist: {stale}; "
                                "rename or remove them there")


@pytest.fixture(autouse=True)
def fresh_moe_aux_loss_scale():
    """megatron-core keeps the aux-loss gradient scale in a class attribute that a pipeline
    schedule sets in place (`copy_`) and a bare forward/backward initialises: its shape then
    depends on which test ran before (per-token mode passes a [1] tensor; 0.16 starts from a []
    one). Every test starts from the value it had before the previous test."""
    moe_utils = sys.modules.get("megatron.core.transformer.moe.moe_utils")
    scaler = getattr(moe_utils, "MoEAuxLossAutoScaler", None)
    saved = getattr(scaler, "main_loss_backward_scale", None)
    saved = saved.clone() if saved is not None else None
    yield
    if scaler is not None:
        scaler.main_loss_backward_scale = saved


@pytest.fixture(scope="module")
def single_rank():
    """A one-process gloo world with megatron-core's parallel state (TP=PP=EP=1)."""
    import torch

    from megatron.remoe.training.distributed import ParallelConfig, destroy_distributed, init_distributed

    destroy_distributed()
    os.environ.pop("MASTER_PORT", None)
    init_distributed(ParallelConfig(), seed=1234)
    torch.set_num_threads(1)
    yield
    destroy_distributed()


# ------------------------------------------------------------------------------------------------
# No process left behind: every process this test session starts inherits REMOE_TEST_SESSION (the
# trainer subprocesses, their torchrun workers, megatron-core's checkpoint writers, multiprocessing
# helpers). After each test module, any such process still alive that is not a multiprocessing
# helper owned by this pytest process itself (those end with it) fails the module, and is killed.
# ------------------------------------------------------------------------------------------------
SESSION_TOKEN = f"{os.getpid()}-{os.urandom(4).hex()}"
os.environ["REMOE_TEST_SESSION"] = SESSION_TOKEN
_OWN_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.spawn",
                "multiprocessing.forkserver")


def processes_left_behind() -> list:
    """psutil.Process objects started by this session that are still alive (see above)."""
    import psutil

    me, left = os.getpid(), []
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            if proc.environ().get("REMOE_TEST_SESSION") != SESSION_TOKEN:
                continue
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.ppid() == me and any(h in " ".join(proc.cmdline()) for h in _OWN_HELPERS):
                continue
        except (psutil.Error, OSError):
            continue
        left.append(proc)
    return left


@pytest.fixture(scope="module", autouse=True)
def no_process_left_behind(request):
    yield
    import time

    import psutil

    deadline = time.time() + 10.0  # a killed trainer's workers take a moment to go
    left = processes_left_behind()
    while left and time.time() < deadline:
        time.sleep(0.2)
        left = processes_left_behind()
    if not left:
        return
    described = []
    for proc in left:
        try:
            described.append(f"pid {proc.pid} (parent {proc.ppid()}): "
                             f"{' '.join(proc.cmdline())[:160]}")
            proc.kill()
        except psutil.Error:
            pass
    pytest.fail(f"{request.module.__name__} left {len(left)} process(es) behind:\n  "
                + "\n  ".join(described), pytrace=False)
