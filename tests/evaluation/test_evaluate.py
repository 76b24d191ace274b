"""megatron.remoe.evaluation on a tiny in-process ReMoE HF model (no megatron, no subprocess).

* rolling log-likelihood equals the model's own cross-entropy when a text fits one window, and
  the sum over windows predicts every token once when it does not;
* bits-per-byte / perplexities follow their definitions; the native and lm-eval backends give the
  same numbers and the same routing statistics;
* the next-line multiple-choice items are deterministic, well-formed and use other documents;
* realised experts per token are counted over real (non-padding) tokens only.
"""

import math

import pytest
import torch

pytest.importorskip("transformers")

from megatron.remoe import evaluation as ev  # noqa: E402

pytestmark = pytest.mark.timeout(90)

DOCS = {
    "prose": ["The quick brown fox jumps over the lazy dog.\nIt was a bright cold day in April.\n"
              "The clocks were striking thirteen, and the rain kept falling.\n"
              "Nobody in the village remembered a spring like this one.\n" * 3,
              "Call me Ishmael. Some years ago, never mind how long precisely.\n"
              "Having little or no money in my purse, and nothing in particular.\n"
              "I thought I would sail about a little and see the watery part.\n" * 3],
    "code": ["".join(f"def add_{i}(a, b):\n    total = a + b + {i}  # add {i} more\n"
                     f"    return total * {i}\n\n" for i in range(6)),
             "".join(f"for name_{i} in sorted(os.listdir('.')):\n"
                     f"    print(name_{i}, os.path.getsize(name_{i}))\n" for i in range(6))],
}


@pytest.fixture(scope="module")
def sm():
    from megatron.remoe.data.tokenizer import train_bpe_tokenizer
    from megatron.remoe.hf.configuration_remoe import ReMoEConfig
    from megatron.remoe.hf.modeling_remoe import ReMoEForCausalLM

    texts = [d for docs in DOCS.values() for d in docs]
    tok = train_bpe_tokenizer(texts * 4, 300)
    torch.manual_seed(0)
    cfg = ReMoEConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                      moe_layers=[1, 1], max_position_embeddings=24, eos_token_id=tok.eod,
                      initializer_range=0.05)
    model = ReMoEForCausalLM(cfg).eval()
    return ev.ScoringModel(model, tok.backend, tok.eod, max_length=24, batch_size=3)


def test_rolling_loglikelihood_matches_model_loss(sm):
    text = "def add(a, b):\n    return a"
    ids = sm.encode(text)
    assert len(ids) < sm.max_length
    x = torch.tensor([[sm.eot_id] + ids])
    with torch.no_grad():
        out = sm.model(input_ids=x, labels=x)
    ll = sm.rolling_loglikelihood([text])[0]
    assert abs(-ll / len(ids) - out.loss.item()) < 1e-5
    # longer than one window: every token predicted exactly once
    long_text = DOCS["prose"][0]
    n = len(sm.encode(long_text))
    assert n > 3 * sm.max_length
    pairs = []
    orig = sm.score
    sm.score = lambda p, tag="": pairs.extend(p) or orig(p, tag)
    try:
        sm.rolling_loglikelihood([long_text])
    finally:
        sm.score = orig
    assert sum(len(c) for _, c in pairs) == n
    assert all(len(c) + len(x) <= sm.max_length + 1 for x, c in pairs)


def test_perplexity_definitions(sm):
    docs = DOCS["code"]
    r = ev.native_perplexity(sm, docs, "t")
    nbytes = sum(len(d.encode()) for d in docs)
    assert r["bytes"] == nbytes
    assert math.isclose(r["bits_per_byte"], -r["loglikelihood"] / nbytes / math.log(2))
    assert math.isclose(r["byte_perplexity"], 2 ** r["bits_per_byte"], rel_tol=1e-9)
    assert r["token_perplexity"] > 1


def test_nextline_items_deterministic_and_wellformed():
    a = ev.build_nextline_items(DOCS, items_per_domain=5, num_choices=4, seed=7)
    b = ev.build_nextline_items(DOCS, items_per_domain=5, num_choices=4, seed=7)
    c = ev.build_nextline_items(DOCS, items_per_domain=5, num_choices=4, seed=8)
    assert a == b and a != c
    assert len(a) == 10
    for it in a:
        assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4
        assert it["context"].endswith("\n") and it["distractor_source"] == "domain"
        gold = it["choices"][it["gold"]]
        ctx = it["context"].rstrip("\n").split("\n")
        doc = next(d for d in DOCS[it["domain"]]
                   if "\n".join(ctx + [gold]) in "\n".join(ev.nonblank_lines(d)))
        # distractors come from the other document of the domain
        others = [ch for i, ch in enumerate(it["choices"]) if i != it["gold"]]
        assert not set(others) & set(doc.split("\n"))
    single = ev.build_nextline_items({"prose": DOCS["prose"][:1], "code": DOCS["code"][:1]}, 3)
    assert single and all(it["distractor_source"] == "other-domains" for it in single)


@pytest.mark.slow
def test_backends_agree_and_routing_counts(sm, tmp_path):
    if not ev.have_lm_eval():
        pytest.skip("lm-evaluation-harness not installed")
    docs = {d: ev.cap_documents(v, 600, min_doc_chars=200) for d, v in DOCS.items()}
    items = ev.build_nextline_items(docs, items_per_domain=4)
    sm.tallies.clear()
    native = ev.evaluate(sm, docs, items, backend="native", paper_tasks=())
    sm.tallies.clear()
    lmeval = ev.evaluate(sm, docs, items, backend="lm-eval", paper_tasks=(),
                         work_dir=str(tmp_path / "tasks"))
    for name, t in native["tasks"].items():
        u = lmeval["tasks"][name]
        for key in ("bits_per_byte", "word_perplexity", "acc", "acc_norm"):
            if key in t:
                assert math.isclose(t[key], u[key], rel_tol=1e-9), (name, key)
        r = t["routing"]
        assert r == u["routing"]
        assert 0 <= r["experts_per_token"] <= 4 and len(r["sparsity_per_layer"]) == 2
    md = ev.results_markdown(native)
    assert "| remoe_nextline |" in md and "experts/token" in md


def test_routing_tally_ignores_padding():
    t = ev.RoutingTally()
    maps = [torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)]
    t.add(maps, torch.tensor([True, False]))
    s = t.summary()
    assert s["experts_per_token"] == 2.0 and s["routed_tokens"] == 1
    assert s["sparsity_per_layer"] == [0.5]
