"""finetune: candidates fit the budget (measured on real tensors), train, and grow with the budget."""
import re

import pytest
import torch
import torch.nn.functional as F

from passes import capture, estimate
from passes.finetune import LoRALinear, attach_classifier, finetune, insert_lora
from passes.monitor import measure_step
from passes.zoo import tiny_gpt


def _gpt():
    torch.manual_seed(0)
    model, (idx,) = tiny_gpt(n_layers=4, d_model=32, n_heads=4, batch=2, seq=16, vocab_size=256)
    return model, idx


def _lm_loss(idx):
    return lambda logits: F.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten())


@pytest.fixture(scope="module")
def full_peak():
    model, idx = _gpt()
    return estimate(model, (idx,), training=True, optimizer="adamw", loss_fn=_lm_loss(idx)).peak_bytes


def test_half_memory_plan_measured_peak_under_limit_and_loss_falls(full_peak):
    model, idx = _gpt()
    loss_fn = _lm_loss(idx)
    limit = full_peak // 2
    plan = finetune(model, (idx,), memory_limit=limit, loss_fn=loss_fn)
    assert plan.estimate.peak_bytes <= limit < plan.full_estimate.peak_bytes
    measured = measure_step(plan.module, (idx,), loss_fn=loss_fn)
    assert measured.peak_bytes <= limit
    assert "this plan" in str(plan) and "full fine-tuning" in str(plan)

    opt = torch.optim.AdamW([p for p in plan.module.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = loss_fn(plan.module(idx))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_larger_limit_never_trains_less(full_peak):
    counts = []
    for frac in (0.45, 0.7, 1.0):
        model, idx = _gpt()
        plan = finetune(model, (idx,), memory_limit=int(full_peak * frac), loss_fn=_lm_loss(idx))
        counts.append(plan.n_trainable_params)
        assert plan.estimate.peak_bytes <= full_peak * frac
    assert counts == sorted(counts) and counts[0] < counts[-1]
    assert counts[-1] == sum(p.numel() for p in model.parameters())     # the full budget: full fine-tuning


def test_frozen_params_have_requires_grad_false(full_peak):
    model, idx = _gpt()
    plan = finetune(model, (idx,), memory_limit=int(full_peak * 0.6), loss_fn=_lm_loss(idx))
    names = dict(plan.module.named_parameters())
    assert set(plan.trainable) == {n for n, p in names.items() if p.requires_grad}
    assert 0 < len(plan.trainable) < len(names)
    assert sum(names[n].numel() for n in plan.trainable) == plan.n_trainable_params


def test_impossible_limit_raises_naming_smallest_reachable_peak():
    model, idx = _gpt()
    with pytest.raises(ValueError, match="smallest reachable step peaks at") as err:
        finetune(model, (idx,), memory_limit=1000, loss_fn=_lm_loss(idx))
    smallest = int(re.search(r"peaks at (\d+) B", str(err.value)).group(1))
    plan = finetune(model, (idx,), memory_limit=smallest, loss_fn=_lm_loss(idx))   # the figure is reachable
    assert plan.estimate.peak_bytes == smallest


def test_adapters_leave_outputs_unchanged_and_graph_rewrite_matches_module():
    model, idx = _gpt()
    gm = capture(model, (idx,))
    before = model(idx)
    rank, qkv = 2, model.blocks[3].qkv
    lora = LoRALinear(qkv, rank)
    model.blocks[3].qkv = lora
    torch.testing.assert_close(model(idx), before)          # B = 0: outputs unchanged at the start
    with torch.no_grad():
        lora.lora_B.normal_()
    insert_lora(gm, targets={"blocks.3.qkv": (lora.lora_A, lora.lora_B)}, scale=lora.scale)
    gm.graph.lint()
    assert sum(n.target is torch.ops.aten.linear.default for n in gm.graph.nodes) == 4 * 4 + 1 + 2
    torch.testing.assert_close(gm(idx), model(idx))          # the costed graph computes what the module does


def test_classifier_head_always_trains_and_pools():
    model, idx = _gpt()
    clf = attach_classifier(model, 3, pool="last")
    assert clf(idx).shape == (2, 3)
    labels = torch.tensor([0, 2])
    loss_fn = lambda logits: F.cross_entropy(logits, labels)  # noqa: E731
    full = estimate(clf, (idx,), training=True, optimizer="adamw", loss_fn=loss_fn).peak_bytes
    plan = finetune(clf, (idx,), memory_limit=full // 2, loss_fn=loss_fn)
    assert {"head.weight", "head.bias"} <= set(plan.trainable)
    assert measure_step(plan.module, (idx,), loss_fn=loss_fn).peak_bytes <= full // 2
