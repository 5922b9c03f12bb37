"""Pipeline partitioning of real models: plans run like the model, cost what the model costs, and explain themselves.

Models come from ``tests/_models.py`` (tiny Hugging Face configs with random weights and
``passes.zoo`` models). Each (model, stage count) is planned once and shared by the tests
that read the plan.
"""
from __future__ import annotations

import functools
import itertools
import json
import re
import shutil

import numpy as np
import pytest
import torch
from torch.utils._pytree import tree_structure

import partitioner
import passes
from partitioner.pipeline import PipelineCosts, solve_cuts
from _models import MODELS, gpt2, llama

STAGE_COUNTS = (2, 4)
CASES = [(name, n) for name in MODELS for n in STAGE_COUNTS]
CASE_IDS = [f"{name}-{n}" for name, n in CASES]


@functools.lru_cache(maxsize=None)
def _model(name: str):
    return MODELS[name]()


@functools.lru_cache(maxsize=None)
def _plan(name: str, n: int):
    model, args, kwargs = _model(name)
    return partitioner.partition(model, n, args, kwargs, strategy="pipeline", device="h100")


@functools.lru_cache(maxsize=None)
def _training_estimate(name: str):
    model, args, kwargs = _model(name)
    return passes.estimate(model, args, kwargs, training=True)


def _compute_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """Compute nodes, less the symbolic sizes a stage recomputes from its inputs (they belong to no module)."""
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")
            and n.target is not torch.ops.aten.sym_size.int]


def _module_paths(node: torch.fx.Node) -> list[str]:
    return [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]


def _stage_cost(work, comm, start: int, end: int) -> float:
    return work[end] - work[start] + comm[start] + comm[end]


# -- every model, 2 and 4 stages ------------------------------------------------------------------

@pytest.mark.parametrize("name,n", CASES, ids=CASE_IDS)
def test_plan_returns_what_the_model_returns(name, n):
    model, args, kwargs = _model(name)
    plan = _plan(name, n)   # planning a training step needs autograd on: plan outside no_grad
    with torch.no_grad():
        out, expected = plan(*args, **kwargs), model(*args, **kwargs)
    assert tree_structure(out) == tree_structure(expected)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("name,n", CASES, ids=CASE_IDS)
def test_plan_has_one_nonempty_stage_per_device(name, n):
    plan = _plan(name, n)
    assert plan.strategy == "pipeline"
    assert len(plan.stages) == n
    assert [s.index for s in plan.stages] == list(range(n))
    for stage in plan.stages:
        assert stage.cost.n_nodes >= 1
        assert _compute_nodes(stage.module), f"stage {stage.index} has no compute node"
        stage.module.graph.lint()


@pytest.mark.parametrize("name,n", CASES, ids=CASE_IDS)
def test_stage_holds_only_parameters_its_graph_reads(name, n):
    model, _, _ = _model(name)
    held = set()
    for stage in _plan(name, n).stages:
        read = {node.target for node in stage.module.graph.nodes if node.op == "get_attr"}
        for pname, p in stage.module.named_parameters(remove_duplicate=False):
            assert pname in read, f"stage {stage.index} holds {pname} but never reads it"
            held.add(id(p))
        for bname, _ in stage.module.named_buffers(remove_duplicate=False):
            assert bname in read, f"stage {stage.index} holds buffer {bname} but never reads it"
        assert stage.cost.param_bytes == sum(p.numel() * p.element_size() for p in stage.module.parameters())
    # the stages hold the model's own parameters (no copies), and all of them
    assert held == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("name,n", CASES, ids=CASE_IDS)
def test_stage_flops_sum_to_the_model_flops(name, n):
    stages, est = _plan(name, n).stages, _training_estimate(name)
    assert est.flops > 0
    assert sum(s.cost.flops for s in stages) == est.flops
    assert sum(s.cost.backward_flops for s in stages) == est.backward_flops


@pytest.mark.parametrize("n", STAGE_COUNTS)
def test_gpt2_tied_embedding_and_head_are_shared_between_their_stages(n):
    model, _, _ = _model("gpt2")
    plan = _plan("gpt2", n)
    tied = model.transformer.wte.weight
    assert model.lm_head.weight is tied
    holders = [s.index for s in plan.stages if any(p is tied for p in s.module.parameters())]
    assert holders == [0, n - 1]      # the embedding opens the first stage, the head closes the last
    [(key, stages)] = [(k, v) for k, v in plan.shared_params.items() if v == holders]
    assert plan.stages[holders[0]].module.get_parameter(key) is tied
    assert key in str(plan)


# -- report and drawing ---------------------------------------------------------------------------

def _table_rows(report: str) -> list[str]:
    lines = report.splitlines()
    sep = next(i for i, line in enumerate(lines) if line.startswith("-----"))
    return list(itertools.takewhile(bool, lines[sep + 1:]))


@pytest.mark.parametrize("n", STAGE_COUNTS)
def test_report_has_one_row_per_stage(n):
    plan = _plan("llama", n)
    assert str(plan) == plan.report()
    rows = _table_rows(plan.report())
    assert [row.split()[0] for row in rows] == [str(i) for i in range(n)]
    assert "lower bound" in plan.report()


@pytest.mark.parametrize("n", STAGE_COUNTS)
def test_draw_writes_one_cluster_per_stage(tmp_path, n):
    plan = _plan("gpt2", n)
    path = plan.draw(tmp_path / "p.dot")
    text = open(path).read()
    assert text.lstrip().startswith("digraph")
    assert sorted(set(re.findall(r"cluster_stage(\d+)", text)), key=int) == [str(i) for i in range(n)]
    if shutil.which("dot") is None:
        pytest.skip("Graphviz `dot` is not installed: .svg not checked")
    svg = open(plan.draw(tmp_path / "p.svg")).read()
    assert "<svg" in svg
    assert svg.count('class="cluster"') == n


# -- errors ---------------------------------------------------------------------------------------

def test_zero_devices_is_refused():
    model, args, kwargs = _model("mlp")
    with pytest.raises(ValueError, match=r"n_devices must be a positive int, got 0"):
        partitioner.partition(model, 0, args, kwargs, device="h100")


def test_unknown_strategy_is_refused():
    model, args, kwargs = _model("mlp")
    with pytest.raises(ValueError, match=r"strategy='bogus'.*use one of"):
        partitioner.partition(model, 2, args, kwargs, device="h100", strategy="bogus")


def test_more_devices_than_cuttable_nodes_is_refused():
    model, x = torch.nn.Linear(8, 4), torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"into 50 non-empty stages.*use at most 1 stages"):
        partitioner.partition(model, 50, (x,), strategy="pipeline", device="h100")


def test_impossible_memory_limit_says_what_each_stage_needs():
    model, args, kwargs = _model("mlp")
    with pytest.raises(ValueError, match=r"memory_limit=1000 B.*needs stage 0: [\d.]+ KiB, stage 1: [\d.]+ KiB"):
        partitioner.partition(model, 2, args, kwargs, strategy="pipeline", device="h100", memory_limit=1000)


# -- pinned cuts ----------------------------------------------------------------------------------

def test_cut_at_module_path_starts_the_stage_at_that_module():
    model, args, kwargs = _model("gpt2")
    plan = partitioner.partition(model, 3, args, kwargs, strategy="pipeline", device="h100", cuts=["transformer.h.1", "transformer.ln_f"])
    first, second, third = ([_module_paths(node) for node in _compute_nodes(s.module)] for s in plan.stages)
    assert "transformer.h.1" in second[0] and not any("transformer.h.1" in p for p in first + third)
    assert "transformer.h.0" in first[-1] and not any("transformer.h.0" in p for p in second + third)
    assert "transformer.ln_f" in third[0] and not any("transformer.ln_f" in p for p in first + second)
    with torch.no_grad():
        torch.testing.assert_close(plan(*args, **kwargs), model(*args, **kwargs))


def test_cut_at_node_names_reproduces_a_plan():
    model, args, kwargs = _model("gpt2")
    planned = _plan("gpt2", 4)
    pinned = partitioner.partition(model, 4, args, kwargs, strategy="pipeline", device="h100", cuts=list(planned.cuts))
    assert pinned.cuts == planned.cuts
    assert [s.cost for s in pinned.stages] == [s.cost for s in planned.stages]


# -- save / load ----------------------------------------------------------------------------------

def test_plan_made_on_meta_applies_to_real_weights(tmp_path):
    meta_model, meta_args, meta_kwargs = llama("meta")
    assert all(p.is_meta for p in meta_model.parameters())
    plan = partitioner.partition(meta_model, 2, meta_args, meta_kwargs, strategy="pipeline", device="h100")
    path = plan.save(tmp_path / "plan.json")
    assert [c["node"] for c in json.load(open(path))["decisions"]["cuts"]] == list(plan.cuts)

    model, args, kwargs = llama()
    loaded = partitioner.load_plan(path, model, args, kwargs)
    # the meta capture is static and the real one symbolic, so node names may differ; the place may not
    where = lambda p: [(c["module"], c["op"], c["index"])
                       for c in json.load(open(p.save(tmp_path / "again.json")))["decisions"]["cuts"]]
    assert where(loaded) == where(plan)
    assert [s.cost.flops for s in loaded.stages] == [s.cost.flops for s in plan.stages]
    with torch.no_grad():
        torch.testing.assert_close(loaded(*args, **kwargs), model(*args, **kwargs))

    other, other_args, other_kwargs = llama(hidden=32)
    with pytest.raises(ValueError, match="does not match the plan"):
        partitioner.load_plan(path, other, other_args, other_kwargs)


# -- the solver -----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _costed(name: str, balance: str) -> PipelineCosts:
    model, args, kwargs = _model(name)
    gm = passes.capture(model, args, kwargs)
    spec = passes.get_device_spec("h100")
    passes.estimate(gm, args, kwargs, device=spec, training=True)
    return PipelineCosts.of(gm, training=True, link_Bps=spec.link_bandwidth_Bps, balance=balance)


@pytest.mark.parametrize("balance", ["time", "flops"])
@pytest.mark.parametrize("name", ["gpt2", "small_cnn"])
def test_solver_matches_brute_force_over_every_three_stage_split(name, balance):
    costs = _costed(name, balance)
    work, comm, n = costs.work, costs.comm, len(costs.order)
    positions = [k for k in range(1, n) if costs.cuttable[k]]
    brute = min(max(_stage_cost(work, comm, 0, i), _stage_cost(work, comm, i, j), _stage_cost(work, comm, j, n))
                for i, j in itertools.combinations(positions, 2))
    cuts = solve_cuts(costs, 3)
    bounds = [0] + cuts + [n]
    assert all(costs.cuttable[c] for c in cuts)
    solved = max(_stage_cost(work, comm, a, b) for a, b in zip(bounds[:-1], bounds[1:]))
    assert solved == pytest.approx(brute, rel=1e-12)


def test_memory_limit_just_above_the_optimum_keeps_it():
    model, args, kwargs = _model("gpt2")
    free = _plan("gpt2", 4)
    limit = max(s.cost.memory_bytes for s in free.stages) + 1
    plan = partitioner.partition(model, 4, args, kwargs, strategy="pipeline", device="h100", memory_limit=limit)
    assert all(s.cost.memory_bytes < limit for s in plan.stages)
    assert plan.bottleneck_s == pytest.approx(free.bottleneck_s)


def test_tight_memory_limit_counts_the_tied_head_replica():
    # the last stage holds a replica of the tied embedding: a limit under its memory must move the cuts
    model, args, kwargs = _model("gpt2")
    free = _plan("gpt2", 4)
    limit = int(0.95 * max(s.cost.memory_bytes for s in free.stages))
    plan = partitioner.partition(model, 4, args, kwargs, strategy="pipeline", device="h100", memory_limit=limit)
    assert all(s.cost.memory_bytes <= limit for s in plan.stages)
    assert plan.cuts != free.cuts


def _bottleneck(costs: PipelineCosts, cuts) -> float:
    bounds = [0, *cuts, len(costs.order)]
    return max(_stage_cost(costs.work, costs.comm, a, b) for a, b in zip(bounds[:-1], bounds[1:]))


@pytest.mark.parametrize("balance", ["time", "flops"])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_cuts_from_block_boundaries_recut_in_their_windows_are_the_exact_optimum(name, balance):
    from partitioner.pipeline import unit_boundaries
    from partitioner.search import _windows
    costs = _costed(name, balance)
    for n in range(2, 9):
        coarse = solve_cuts(costs, n, allowed=unit_boundaries(costs.order))
        windows = _windows(costs, tuple(coarse), n)
        fine = solve_cuts(costs, n, windows=windows)
        assert _bottleneck(costs, fine) == pytest.approx(_bottleneck(costs, solve_cuts(costs, n)), rel=1e-12), n


def test_a_deep_graph_searched_at_block_boundaries_gets_the_exact_flop_balanced_cuts(monkeypatch):
    # every graph counts as deep: the search cuts at block boundaries, then recuts the winner exactly
    monkeypatch.setattr("partitioner.search.COARSE_ABOVE", 0)
    model, args, kwargs = _model("llama")
    costs = _costed("llama", "flops")
    index = {node.name: k for k, node in enumerate(costs.order.nodes)}
    from partitioner.pipeline import unit_boundaries
    coarse = solve_cuts(costs, 2, allowed=unit_boundaries(costs.order))
    assert _bottleneck(costs, coarse) > 1.05 * _bottleneck(costs, solve_cuts(costs, 2))   # the grid alone misses it
    for n in (2, 3, 5):
        plan = partitioner.partition(model, n, args, kwargs, strategy="pipeline", device="h100", balance="flops")
        got = _bottleneck(costs, [index[name] for name in plan.cuts])
        assert got == pytest.approx(_bottleneck(costs, solve_cuts(costs, n)), rel=1e-9), n


def test_flop_balanced_plans_are_timed_in_seconds():
    model, args, kwargs = _model("gpt2")
    by_time = partitioner.partition(model, 4, args, kwargs, strategy="pipeline", device="h100")
    by_flops = partitioner.partition(model, 4, args, kwargs, strategy="pipeline", device="h100", balance="flops")
    # the same model on the same device: the steps differ by the balance of their cuts, not by units
    assert 0.5 < by_flops.cost.step_time_s / by_time.cost.step_time_s < 2.0
    assert by_time.cost.step_time_s <= by_flops.cost.step_time_s * (1 + 1e-9)


def test_state_no_graph_node_reads_is_kept_by_the_plan_for_the_whole_state_dict():
    """An eval-mode BatchNorm never reads ``num_batches_tracked``: no stage holds it, yet the assembled
    state dict (``Runner.full_state_dict``, ``merge_shards``) has every key of ``model.state_dict()``."""
    from passes import zoo
    from runtime.checkpoint import assemble
    case = zoo.make("small_cnn")
    model = case.model.eval()
    plan = partitioner.partition(model, 2, case.args, strategy="pipeline", device="h100", training=False)
    assert plan.unplaced and all(k.endswith("num_batches_tracked") for k in plan.unplaced)
    parts = [((s, 0, 0), dict(stage.module.state_dict())) for s, stage in enumerate(plan.stages)]
    whole = assemble(parts, mesh=plan.mesh, state_keys=plan.state_keys, split={}, unplaced=plan.unplaced)
    want = model.state_dict()
    assert list(whole) == list(want)
    for key, value in want.items():
        torch.testing.assert_close(whole[key], value)
    with pytest.raises(KeyError, match="no stage holds"):
        assemble(parts, mesh=plan.mesh, state_keys=plan.state_keys, split={})
