"""The inference-time compute dial (megatron/remoe/dial.py, the HF modeling file), in process.

* tau = 0 (both forms, no cap) is bit-identical to the undialled model, megatron and HF;
* the dial's routing is the hand-computed one (logit > tau; the m largest gates with a cap) and
  realised experts per token fall monotonically as tau rises;
* megatron (allgather and alltoall dispatchers) and the exported HF model agree at the same
  thresholds (the converter's parity check, extended to the dial boundary);
* bad dials and a dial in training mode are one-line errors.
"""

import pytest
import torch

pytest.importorskip("transformers")

from megatron.remoe import dial as D  # noqa: E402
from megatron.remoe.hf.parity import verify_parity  # noqa: E402
from megatron.remoe.hf.to_hf import megatron_to_hf  # noqa: E402
from megatron.remoe.router import relu_routers, set_dial  # noqa: E402

pytestmark = pytest.mark.timeout(120)

SMALL = dict(num_layers=3, hidden_size=64, num_attention_heads=4, num_query_groups=2,
             ffn_hidden_size=128, use_cpu_initialization=True, init_method_std=0.02,
             moe_router_dtype="fp32")


def build(dispatcher="alltoall", seed=0, moe_layer_freq=(1, 0, 1)):
    """A ReLU model with a dense layer in the middle and wide gate distributions (tokens with
    0..4 active experts)."""
    from megatron.remoe.model import build_gpt_model, build_transformer_config

    torch.manual_seed(seed)
    cfg = build_transformer_config(router="relu", num_experts=4, moe_router_topk=1,
                                   moe_token_dispatcher_type=dispatcher,
                                   moe_layer_freq=list(moe_layer_freq), **SMALL)
    model = build_gpt_model(cfg, vocab_size=256, max_sequence_length=64, controller=None,
                            use_transformer_engine=False)
    with torch.no_grad():
        for _, r in relu_routers(model):
            r.weight.mul_(20)
    return model.eval(), cfg


def ids(seed=1, shape=(2, 32)):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


def gates_and_logits(model, x):
    """Per MoE layer: (router logits, dispatched gates, routing map), megatron token order."""
    seen = {}
    handles = []
    for n, r in relu_routers(model):
        handles.append(r.register_forward_hook(
            lambda m, a, o, n=n: seen.setdefault(n, {}).update(probs=o[0], map=o[1])))
        handles.append(r.register_forward_pre_hook(
            lambda m, a, n=n: seen.setdefault(n, {}).update(
                logits=torch.nn.functional.linear(a[0].float(), m.weight.float()).reshape(
                    -1, m.weight.shape[0]))))
    try:
        with torch.no_grad():
            pos = torch.arange(x.shape[1]).expand_as(x)
            logits = model(x, pos, None)
    finally:
        for h in handles:
            h.remove()
    return logits, seen


def test_tau_zero_is_bit_identical_megatron_and_hf(single_rank):
    model, cfg = build()
    x = ids()
    ref, ref_seen = gates_and_logits(model, x)
    hf, _ = megatron_to_hf(model, cfg, 256, 64)
    with torch.no_grad():
        hf_ref = hf(input_ids=x).logits
    for form in D.FORMS:
        dial = set_dial(model, {"thresholds": [0.0, 0.0], "form": form})
        assert dial.layer_numbers == (1, 3) and dial.is_identity
        out, seen = gates_and_logits(model, x)
        assert torch.equal(out, ref), form
        for n in ref_seen:
            assert torch.equal(seen[n]["probs"], ref_seen[n]["probs"])
            assert torch.equal(seen[n]["map"], ref_seen[n]["map"])
        hf.config.router_dial = {"thresholds": [0.0, 0.0], "form": form, "max_experts": None}
        with torch.no_grad():
            assert torch.equal(hf(input_ids=x).logits, hf_ref), form
    set_dial(model, None)
    hf.config.router_dial = None
    assert torch.equal(gates_and_logits(model, x)[0], ref)


def test_dial_routing_matches_hand_computation_and_is_monotone(single_rank):
    model, _ = build()
    x = ids(2, (4, 32))
    counts = {form: [] for form in D.FORMS}
    for form in D.FORMS:
        for tau in (0.0, 0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 100.0):
            set_dial(model, {"thresholds": [tau], "form": form})
            _, seen = gates_and_logits(model, x)
            total = 0.0
            for n, s in seen.items():
                lg = s["logits"]
                want = torch.relu(lg) * (lg > tau) if form == "cut" else torch.relu(lg - tau)
                torch.testing.assert_close(s["probs"], want, rtol=0, atol=1e-6)
                assert torch.equal(s["map"], s["probs"] > 0)
                # away from the boundary the map is exactly logit > tau
                clear = (lg - tau).abs() > 1e-5
                assert torch.equal(s["map"][clear], (lg > tau)[clear])
                total += s["map"].float().sum(-1).mean().item()
            counts[form].append(total / len(seen))
    for form, c in counts.items():
        assert all(a >= b for a, b in zip(c, c[1:])), (form, c)
        assert c[0] > 1.2 and c[-1] == 0.0, (form, c)  # from several experts down to none
    # with a cap: never more than m experts per token, and the kept ones are the m largest
    set_dial(model, {"thresholds": [0.0], "max_experts": 1})
    _, seen = gates_and_logits(model, x)
    for s in seen.values():
        assert s["map"].sum(-1).max() == 1
        g = torch.relu(s["logits"])
        kept = s["probs"].max(-1).values
        assert torch.equal(kept, g.max(-1).values)
    set_dial(model, None)


@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall"])
@pytest.mark.parametrize("form,cap", [("cut", None), ("shift", None), ("cut", 2)])
def test_megatron_hf_parity_with_thresholds(single_rank, dispatcher, form, cap):
    model, cfg = build(dispatcher, seed=4)
    x = ids(3)
    _, undialled = gates_and_logits(model, x)
    dial = set_dial(model, {"thresholds": [0.15, 0.3], "form": form, "max_experts": cap})
    hf, _ = megatron_to_hf(model, cfg, 256, 64)
    assert hf.config.router_dial == dial.to_dict()
    rep = verify_parity(model, hf, input_ids=x)
    print(rep.summary())
    assert rep.ok, rep.failures
    assert rep.routing_mismatches == 0 and rep.dial == dial.to_dict()
    _, seen = gates_and_logits(model, x)
    fewer = sum(int(undialled[n]["map"].sum() - seen[n]["map"].sum()) for n in seen)
    assert fewer > 0  # the dial really removed experts
    # an undialled HF model is caught by the parity check
    hf.config.router_dial = None
    rep = verify_parity(model, hf, input_ids=x, new_tokens=0)
    assert not rep.ok and any("dial differs" in f for f in rep.failures)
    set_dial(model, None)


def test_dial_in_training_is_refused(single_rank):
    model, cfg = build()
    hf, _ = megatron_to_hf(model, cfg, 256, 64)
    set_dial(model, 0.1)
    model.train()
    with pytest.raises(D.DialError, match="inference-only") as e:
        gates_and_logits(model, ids())
    assert "\n" not in str(e.value)
    model.eval()
    set_dial(model, None)
    hf.config.router_dial = {"thresholds": [0.1, 0.1], "form": "cut", "max_experts": None}
    hf.train()
    with pytest.raises(RuntimeError, match="inference-only"):
        hf(input_ids=ids())


@pytest.mark.parametrize("thresholds,needle", [
    ([-0.1], "negative"), ([float("nan")], "not finite"), ([float("inf")], "not finite"),
    ([0.1, 0.2, 0.3], "3 thresholds for 2 MoE layers"), (["x"], "not a number")])
def test_bad_dials_are_one_line_errors(single_rank, thresholds, needle):
    model, _ = build()
    with pytest.raises(D.DialError, match=needle) as e:
        set_dial(model, {"thresholds": thresholds})
    assert "\n" not in str(e.value)
    with pytest.raises(D.DialError, match="form"):
        set_dial(model, {"thresholds": [0.1], "form": "clip"})
    with pytest.raises(D.DialError, match="max_experts"):
        set_dial(model, {"thresholds": [0.1], "max_experts": 5})
    assert model.config.moe_relu_dial is None  # a refused dial leaves the model undialled


def test_hf_config_validates_router_dial():
    from megatron.remoe.hf.configuration_remoe import ReMoEConfig

    kw = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_experts=4)
    ok = ReMoEConfig(router_dial={"thresholds": [0.1, 0.0], "form": "shift",
                                  "max_experts": 2}, **kw)
    assert ReMoEConfig.from_dict(ok.to_dict()).router_dial == ok.router_dial
    for bad, needle in (({"thresholds": [0.1]}, "list of 2"),
                        ({"thresholds": [-1, 0]}, ">= 0"),
                        ({"thresholds": [float("nan"), 0]}, ">= 0"),
                        ({"thresholds": [0, 0], "form": "x"}, "form"),
                        ({"thresholds": [0, 0], "max_experts": 9}, "max_experts")):
        with pytest.raises(ValueError, match=needle):
            ReMoEConfig(router_dial=bad, **kw)
    with pytest.raises(ValueError, match="relu"):
        ReMoEConfig(router_type="topk", router_dial={"thresholds": [0, 0]}, **kw)


def test_threshold_for_hits_budgets():
    from megatron.remoe.dial_calibration import count_at, threshold_for

    g = torch.relu(torch.randn(4000, 8, generator=torch.Generator().manual_seed(0)))
    for budget in (0.1, 0.5, 1.0, 2.5, 3.9):
        for cap in (None, 2):
            want = min(budget, count_at(g, 0.0, cap))
            tau = threshold_for(g, want, cap)
            assert abs(count_at(g, tau, cap) - want) <= 1 / 4000 + 1e-9, (budget, cap)
    assert threshold_for(g, 10.0, None) == 0.0


def test_default_output_folder(tmp_path):
    from megatron.remoe.dial_calibration import default_out

    ckpt = tmp_path / "relu" / "checkpoints"
    (ckpt / "iter_0000600").mkdir(parents=True)
    assert default_out(str(ckpt), True) == str(tmp_path / "relu" / "dial-sweep")
    assert default_out(str(ckpt / "iter_0000600"), False) == str(tmp_path / "relu" / "dial")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert default_out(str(hf), False) == str(hf) + "-dial"
