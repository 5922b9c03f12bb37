"""finetune: candidates fit the budget (measured on real tensors), train, and grow with the budget."""
import re

import pytest
import torch
import torch.nn.functional as F

from passes import capture, estimate
from passes.finetune import LoRALinear, attach_classifier, finetune, insert_lora
from passes.monitor import measure_step
from passes.zoo import tiny_gpt


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


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


# -- with task data -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pretrained():
    from passes.zoo.tasks import pretrained_classifier
    return pretrained_classifier(d_model=64, n_layers=4, steps=300)


def _task_setup(pretrained, name, fraction):
    import copy
    from passes.zoo.tasks import TASKS
    task = TASKS[name]
    data = task.batches(8, 16, seed=1)
    (x0,), y0 = data[0]
    model = copy.deepcopy(pretrained)
    full = estimate(model, (x0,), training=True, optimizer="adamw", loss_fn=lambda o: task.loss_fn(o, y0))
    return model, task, data, x0, y0, int(fraction * full.peak_bytes), full


def test_task_data_moves_training_to_the_block_the_task_needs(pretrained):
    """Re-encoded inputs need the first block (where tokens are read); without data the budget buys a suffix."""
    model, task, data, x0, y0, limit, _ = _task_setup(pretrained, "recoded", 0.7)
    by_task = finetune(model, (x0,), memory_limit=limit, data=data, loss_fn=task.loss_fn)
    model, *_ = _task_setup(pretrained, "recoded", 0.7)
    by_budget = finetune(model, (x0,), memory_limit=limit, loss_fn=lambda o: task.loss_fn(o, y0))
    assert by_budget.candidate.modes[0] == 0 and by_task.candidate.modes[0] != 0
    scores = by_task.scores.parts
    assert max(scores, key=lambda b: scores[b].loss_drop) == "backbone.blocks.0"
    rows = {p.part: p for p in by_task.parts}
    assert rows["backbone.blocks.0"].decision != "frozen" and rows["backbone.blocks.0"].score > 0
    assert "backbone.blocks.0" in str(by_task) and "score" in str(by_task)


def test_task_data_leaves_the_first_block_frozen_when_the_signal_is_late(pretrained):
    model, task, data, x0, y0, limit, _ = _task_setup(pretrained, "xor", 0.7)
    plan = finetune(model, (x0,), memory_limit=limit, data=data, loss_fn=task.loss_fn)
    assert plan.candidate.modes[0] == 0 and any(plan.candidate.modes[1:])
    assert measure_step(plan.module, (x0,), loss_fn=lambda o: task.loss_fn(o, y0)).peak_bytes <= limit
    assert {n for n, p in plan.module.named_parameters() if p.requires_grad} == set(plan.trainable)


def test_larger_budgets_never_buy_less_value(pretrained):
    model, task, data, x0, y0, limit, full = _task_setup(pretrained, "recoded", 0.5)
    first = finetune(model, (x0,), memory_limit=limit, data=data, loss_fn=task.loss_fn)
    values, times = [first.value], []
    for fraction in (0.75, 1.0):
        model, *_ = _task_setup(pretrained, "recoded", fraction)
        plan = finetune(model, (x0,), memory_limit=int(fraction * full.peak_bytes), data=data, loss_fn=task.loss_fn,
                        scores=first.scores)
        assert plan.estimate.peak_bytes <= fraction * full.peak_bytes
        values.append(plan.value)
    assert values == sorted(values) and plan.candidate.full                # the whole budget: full fine-tuning
    # The step-time budget, on a fixed device spec: times measured on this machine's CPU would make how
    # much a fraction of the full step buys depend on the machine the test runs on.
    full = estimate(model, (x0,), training=True, optimizer="adamw", loss_fn=lambda o: task.loss_fn(o, y0),
                    device="h100")
    for fraction in (0.8, 1.0):
        model, *_ = _task_setup(pretrained, "recoded", 1.0)
        plan = finetune(model, (x0,), memory_limit=full.peak_bytes, time_limit=fraction * full.time_s, data=data,
                        loss_fn=task.loss_fn, scores=first.scores, device="h100")
        assert plan.estimate.time_s <= fraction * full.time_s
        times.append(plan.value)
    assert times == sorted(times)


def test_time_limit_without_data_trains_less_under_a_shorter_step(full_peak):
    """On a fixed device spec (h100): the measured CPU spec of the machine running the test would move how much
    of the full step the cheapest candidate takes (0.69 here, 0.72 on another), and with it which fractions fit."""
    model, idx = _gpt()
    full = estimate(model, (idx,), training=True, optimizer="adamw", loss_fn=_lm_loss(idx), device="h100")
    counts = []
    for fraction in (0.8, 0.9, 1.0):
        model, idx = _gpt()
        plan = finetune(model, (idx,), memory_limit=full.peak_bytes, time_limit=fraction * full.time_s,
                        loss_fn=_lm_loss(idx), device="h100")
        assert plan.estimate.time_s <= fraction * full.time_s
        counts.append(plan.n_trainable_params)
    assert counts == sorted(counts) and counts[0] < counts[-1]


def test_task_data_needs_a_two_argument_loss():
    model, idx = _gpt()
    with pytest.raises(TypeError, match="loss_fn"):
        finetune(model, (idx,), memory_limit=10**9, data=[((idx,), idx)])
    with pytest.raises(TypeError, match=r"data\[0\]"):
        finetune(model, (idx,), memory_limit=10**9, data=[idx], loss_fn=lambda out, target: out.sum())


def test_when_one_block_alone_removes_the_loss_left_it_trains_alone():
    """Scores saying every block removes all the loss left: one block in full (the last: the shortest backward)."""
    from passes.finetune import FULL
    from passes.task_probe import PartScore, TaskScores
    model, idx = _gpt()
    clf = attach_classifier(model, 2, pool="mean")
    labels = torch.tensor([0, 1])
    loss_fn = lambda logits, target: F.cross_entropy(logits, target)  # noqa: E731
    blocks = [f"backbone.blocks.{i}" for i in range(4)]
    scores = TaskScores(parts={b: PartScore(b, drops={FULL: 0.5}, raw_drops={FULL: 0.5}) for b in blocks},
                        head_drop=0.0, reference_drop=0.0, start_loss=1.0, reference_loss=0.5, n_probe_batches=1,
                        n_held_out_batches=1, steps=1, lr=1e-3, time_s=0.0)
    full = estimate(clf, (idx,), training=True, optimizer="adamw", loss_fn=lambda o: loss_fn(o, labels)).peak_bytes
    plan = finetune(clf, (idx,), memory_limit=int(0.9 * full), data=[((idx,), labels)], loss_fn=loss_fn,
                    scores=scores)
    assert plan.candidate.modes == (0, 0, 0, FULL) and not plan.candidate.full
    assert plan.value == 0.5
    assert "block 3 alone removes the loss left" in plan.part_table()
