"""Summary q/k/v projections without checkpoint weights share the base's parameters
(issue 9.14: a deep copy duplicated ~0.9 GB of q/k/v on a 7B model) and give the same
outputs as separate copies of the base (the released init)."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")
from transformers import Qwen2Config, Qwen2ForCausalLM

from lvlm_fast.nn.summary_proj import (
    SummaryLayout,
    SummaryLinear,
    install_summary_projections,
    summary_weights,
)


def _qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      head_dim=32, max_position_embeddings=256)
    return Qwen2ForCausalLM(cfg).eval()


def _params_bytes(model: torch.nn.Module) -> int:
    return sum(p.nbytes for p in model.parameters())  # parameters() de-duplicates ties


def test_install_shares_storage_and_adds_no_bytes():
    model = _qwen2()
    before = _params_bytes(model)
    ptrs = {(li, n): getattr(layer.self_attn, f"{n}_proj").weight.data_ptr()
            for li, layer in enumerate(model.model.layers) for n in "qkv"}
    install_summary_projections(model)
    assert _params_bytes(model) == before
    for li, layer in enumerate(summary_weights(model)):
        for n, lin in layer.items():
            proj = getattr(model.model.layers[li].self_attn, f"{n}_proj")
            assert proj.tied and lin is proj.base
            assert lin.weight.data_ptr() == ptrs[(li, n)]
            if lin.bias is not None:
                assert lin.bias.data_ptr() == proj.base.bias.data_ptr()


def test_shared_output_equals_a_separate_copy():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 12)
    lay = SummaryLayout()
    tied = SummaryLinear(base, lay)
    copied = SummaryLinear(base, lay, copy.deepcopy(base))  # the old default
    x = torch.randn(2, 23, 16, requires_grad=True)
    for first, stride, count in [(0, 1, 0), (3, 5, 4), (0, 2, 12), (22, 1, 1)]:
        lay.set(first, stride, count)
        torch.testing.assert_close(tied(x), copied(x), rtol=1e-6, atol=1e-6)
    # gradients of the tied projection reach the one shared weight from every row
    lay.set(3, 5, 4)
    tied(x).sum().backward()
    g_tied = base.weight.grad.clone()
    base.weight.grad = None
    copied(x).sum().backward()
    torch.testing.assert_close(g_tied, base.weight.grad + copied.summary.weight.grad)


def test_model_forward_unchanged_by_sharing():
    torch.manual_seed(1)
    ids = torch.randint(0, 64, (1, 19))
    ref, shared = _qwen2(), _qwen2()
    install_summary_projections(ref, share_base=False)  # separate copies (old behaviour)
    lay = install_summary_projections(shared)
    lay_ref = ref.model.layers[0].self_attn.q_proj.layout
    for layout in (lay, lay_ref):
        layout.set(2, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(shared(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


def test_untie_gives_separate_weights_once():
    model = _qwen2()
    install_summary_projections(model)
    proj = model.model.layers[1].self_attn.k_proj
    sep = proj.untie_summary()
    assert not proj.tied and sep.weight.data_ptr() != proj.base.weight.data_ptr()
    assert torch.equal(sep.weight, proj.base.weight)
    assert proj.untie_summary() is sep  # a no-op the second time
    # install(share_base=False) unties the projections installed earlier, idempotently
    install_summary_projections(model, share_base=False)
    assert not any(getattr(layer.self_attn, f"{n}_proj").tied
                   for layer in model.model.layers for n in "qkv")


def test_given_summary_weights_are_used_not_shared():
    base = torch.nn.Linear(8, 8)
    given = torch.nn.Linear(8, 8)
    lin = SummaryLinear(base, SummaryLayout(), given)
    assert lin.summary is given and not lin.tied
