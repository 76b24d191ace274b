"""A short CPU training run of a small ReLU-routed GPT: sparsity starts near 0.5 (Stage I, about E/2
experts per token) and the adaptive L1 drives it to the target 1 - k/E."""

import glob
import os
import sysconfig

import pytest
import torch

from megatron.remoe.model import build_controller, build_gpt_model, build_transformer_config

pytestmark = [pytest.mark.core, pytest.mark.slow, pytest.mark.timeout(240)]


def stdlib_bytes(n_bytes=400_000):
    """Real text: the first stdlib modules (sorted, deterministic), as a byte stream (vocab 256)."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    data = bytearray()
    for f in files:
        with open(f, "rb") as fh:
            data += fh.read()
        if len(data) >= n_bytes:
            break
    return torch.tensor(list(data[:n_bytes]), dtype=torch.long)


def test_sparsity_moves_to_target(single_rank):
    torch.manual_seed(0)
    cfg = build_transformer_config(
        router="relu", num_experts=8, moe_router_topk=1, num_layers=2, hidden_size=64,
        num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
        use_cpu_initialization=True, moe_router_dtype="fp32",
        moe_relu_l1_reg_coeff_init=1e-4)  # the paper's fastest-settling lambda_0 (spec section 1)
    ctrl = build_controller(cfg)
    seq, batch = 64, 8
    model = build_gpt_model(cfg, vocab_size=256, max_sequence_length=seq, controller=ctrl,
                            use_transformer_engine=False)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    data = stdlib_bytes()
    g = torch.Generator().manual_seed(1)
    pos = torch.arange(seq).unsqueeze(0).expand(batch, -1)
    sparsity, lambdas, losses = [], [], []
    for step in range(150):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        chunk = torch.stack([data[s:s + seq + 1] for s in starts])
        loss = model(chunk[:, :-1], pos, None, labels=chunk[:, 1:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        stats = ctrl.step()
        sparsity.append(stats.sparsity)
        lambdas.append(stats.l1_coeff)
        losses.append(float(loss))
    target = cfg.target_sparsity
    assert target == 0.875
    assert 0.3 < sparsity[0] < 0.7, sparsity[0]  # Stage I: about half the experts per token
    tail = sparsity[-30:]  # Stage III: oscillating around the target
    assert abs(sum(tail) / len(tail) - target) < 0.03, tail
    assert all(abs(s - target) < 0.06 for s in tail), tail
    assert max(lambdas) > 10 * lambdas[0]  # lambda had to grow to get there
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10  # and the model still learned
