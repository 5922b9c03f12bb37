"""strategy="auto": the mesh it chooses on small models, memory limits, recomputation where memory needs it."""
import pytest
import torch

import partitioner
from passes import measure_step, zoo
from runtime.data_parallel import split_by_block


def _gpt(batch=8, seq=256):
    c = zoo.make("tiny_gpt", n_layers=4, d_model=128, n_heads=4, batch=batch, seq=seq)
    return c.model, c.args


def test_an_mlp_with_a_large_batch_on_four_devices_is_pure_data_parallel():
    c = zoo.make("mlp", depth=8, width=256, batch=4096)
    plan = partitioner.partition(c.model, 4, c.args, device="h100")
    assert plan.mesh == {"dp": 4, "tp": 1, "pp": 1}
    assert plan.strategy == "auto" and len(plan.candidates) > 4
    fitting = [cand for cand in plan.candidates if cand.fits]
    assert plan.cost.step_time_s == pytest.approx(min(cand.step_time_s for cand in fitting), rel=1e-9)


def test_no_device_of_an_auto_plan_exceeds_the_memory_limit():
    model, args = _gpt()
    alone = partitioner.partition(model, 1, args, device="h100", recompute=False).cost.peak_bytes
    fastest = partitioner.partition(model, 4, args, device="h100")
    limit = int(min(alone * 0.45, fastest.cost.peak_bytes * 0.7))   # neither one device nor the fastest plan fits
    plan = partitioner.partition(model, 4, args, device="h100", memory_limit=limit)
    assert plan.cost.peak_bytes <= limit < fastest.cost.peak_bytes
    assert all(s.cost.memory_bytes <= limit for s in plan.stages)
    assert all(cand.peak_bytes <= limit for cand in plan.candidates if cand.fits)


def test_blocks_are_recomputed_only_where_activations_do_not_fit_otherwise():
    model, args = _gpt()      # one micro-batch: accumulating gradients would be the other way to fit
    plain = partitioner.partition(model, 1, args, device="h100", n_microbatches=1, recompute=False)
    again = partitioner.partition(model, 1, args, device="h100", n_microbatches=1, recompute=True)
    assert again.decisions.recompute and not plain.decisions.recompute
    assert again.cost.peak_bytes < 0.8 * plain.cost.peak_bytes      # activations: block inputs only
    assert again.cost.step_time_s > plain.cost.step_time_s          # each block's forward runs twice
    between = (plain.cost.peak_bytes + again.cost.peak_bytes) // 2
    chosen = partitioner.partition(model, 1, args, device="h100", n_microbatches=1, memory_limit=between)
    assert chosen.decisions.recompute and chosen.cost.peak_bytes <= between
    roomy = partitioner.partition(model, 1, args, device="h100", n_microbatches=1, memory_limit=2 * plain.cost.peak_bytes)
    assert not roomy.decisions.recompute                             # it costs time: only when needed
    with pytest.raises(ValueError, match="memory_limit"):
        partitioner.partition(model, 1, args, device="h100", n_microbatches=1, memory_limit=between, recompute=False)
    assert "recomputed" in chosen.report()


def test_recomputed_blocks_hold_less_when_measured_and_give_the_same_gradients(tmp_path):
    model, args = _gpt()
    plan = partitioner.partition(model, 1, args, device="h100", recompute=True)
    graph = plan.stages[0].module
    units = split_by_block(graph, recompute=True)
    assert sum(type(m).__name__ == "Recomputed" for m in units.modules()) == 4     # one per block
    plain = measure_step(graph, args, optimizer=None)
    recomputed = measure_step(units, args, optimizer=None)
    assert recomputed.peak_bytes < 0.8 * plain.peak_bytes, (recomputed.peak_bytes, plain.peak_bytes)

    torch.manual_seed(0)
    graph.zero_grad()
    _first(graph(*args)).float().pow(2).mean().backward()
    want = {n: p.grad.clone() for n, p in graph.named_parameters()}
    graph.zero_grad()
    _first(units(*args)).float().pow(2).mean().backward()                # units share the graph's parameters
    for name, p in graph.named_parameters():
        torch.testing.assert_close(p.grad, want[name], msg=name)


def test_a_saved_plan_keeps_its_recompute_decision(tmp_path):
    model, args = _gpt()
    plan = partitioner.partition(model, 2, args, device="h100", strategy="pipeline", recompute=True)
    loaded = partitioner.load_plan(plan.save(tmp_path / "plan.json"), model, args)
    assert loaded.decisions.recompute
    assert loaded.cost.peak_bytes == plan.cost.peak_bytes


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@pytest.mark.parametrize("name", ["tiny_gpt", "llama"])
def test_the_compute_floor_that_prunes_candidates_never_exceeds_their_simulated_step(name, monkeypatch):
    import sys
    search_module = sys.modules["partitioner.search"]
    seen = {}

    def spy(planner, meshes, **kwargs):
        seen.update(planner=planner, meshes=meshes)
        return search_module.search(planner, meshes, **kwargs)
    monkeypatch.setattr(sys.modules["partitioner.partition"], "search", spy)
    kwargs = dict(n_layers=4, d_model=128, n_heads=4, batch=16, seq=128) if name == "tiny_gpt" else {}
    c = zoo.make(name, **kwargs)
    plan = partitioner.partition(c.model, 8, c.args, c.kwargs, device="h100")
    assert any("cannot beat" in cand.reason for cand in plan.candidates)      # the floor did prune
    planner, checked = seen["planner"], 0
    for mesh in seen["meshes"]:
        for m in search_module._microbatch_counts(planner.batch, mesh, None):
            for mode in (("replicate", "shard") if mesh["dp"] > 1 else ("replicate",)):
                for again in (False, True):
                    for sched, v in search_module._schedules(planner, mesh, m, None):     # interleaved too
                        cand = planner.evaluate(mesh, m, sched, mode, recompute=again, n_virtual=v)
                        if cand.fits:
                            checked += 1
                            assert planner.compute_floor(mesh, m, again, v) <= cand.step_time_s * (1 + 1e-9), \
                                cand.label()
    assert checked > 10
