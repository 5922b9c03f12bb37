"""Drawings: module clusters and collapsed boxes on the DOT, costs on nodes, plan charts and timelines."""
import shutil

import pydot
import pytest
import torch

from passes import capture, estimate, zoo
from passes.draw import draw_graph, module_path
from partitioner import partition
from partitioner.draw import schedule_timeline, stage_chart

needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz not installed")


@pytest.fixture(scope="module")
def costed_gpt():
    torch.manual_seed(0)
    model, inputs = zoo.tiny_gpt(n_layers=3, d_model=64, seq=16)
    gm = capture(model, inputs)
    estimate(gm, inputs, training=True, device="h100")
    return model, inputs, gm


@pytest.fixture(scope="module")
def plan(costed_gpt):
    model, inputs, _ = costed_gpt
    return partition(model, 3, inputs, strategy="pipeline", device="h100")


def _graph(drawing):
    (dot,) = pydot.graph_from_dot_data(drawing.to_string())
    return dot


def _names(dot):
    out = [n.get_name() for n in dot.get_nodes()]
    for sub in dot.get_subgraphs():
        out += _names(sub)
    return out


def test_depth_two_collapses_each_block_into_one_box_inside_the_blocks_cluster(costed_gpt):
    dot = _graph(draw_graph(costed_gpt[2], None, depth=2))
    (blocks,) = [s for s in dot.get_subgraphs() if s.get_name() == "cluster_blocks"]
    boxes = [n for n in blocks.get_nodes() if n.get_shape() == "box3d"]
    assert sorted(n.get_name() for n in boxes) == ["m_blocks_0", "m_blocks_1", "m_blocks_2"]
    assert all("MFLOP" in n.get_label() and "ops" in n.get_label() for n in boxes)
    assert any("legend" == n.get_name() for n in dot.get_nodes())
    assert ("m_blocks_0", "m_blocks_1") in {(e.get_source(), e.get_destination()) for e in dot.get_edges()}


def test_no_depth_draws_every_node_in_nested_module_clusters(costed_gpt):
    gm = costed_gpt[2]
    text = draw_graph(gm, None).to_string()
    assert "cluster_blocks_0_fc" in text and "cluster_blocks_0" in text
    calls = {f"n_{n.name}" for n in gm.graph.nodes if n.op == "call_function"}
    assert calls <= set(_names(_graph(draw_graph(gm, None))))


def test_costs_off_leaves_no_cost_labels(costed_gpt):
    assert "FLOP" not in draw_graph(costed_gpt[2], None, depth=1, costs=False).to_string()


def test_dynamo_module_paths_are_normalised():
    seen = []
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    torch._dynamo.reset()
    torch.compile(model, backend=lambda gm, ex: seen.append(gm) or gm.forward)(torch.randn(2, 4))
    linear = next(n for n in seen[0].graph.nodes if n.op == "call_function")
    assert module_path(linear) == "0"
    assert "cluster_0" in draw_graph(seen[0], None).to_string()


def test_draw_writes_dot_and_refuses_unknown_suffix(costed_gpt, tmp_path):
    path = draw_graph(costed_gpt[2], tmp_path / "g.dot", depth=2).path
    assert open(path).read().startswith("digraph")
    with pytest.raises(ValueError, match="suffix"):
        draw_graph(costed_gpt[2], tmp_path / "g.jpg")


@needs_dot
def test_svg_and_png_render(costed_gpt, tmp_path):
    drawing = draw_graph(costed_gpt[2], tmp_path / "g.png", depth=2)
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    assert drawing._repr_svg_().lstrip().startswith("<?xml")


def test_stage_chart_text_has_a_bar_per_stage_and_the_limit(plan):
    text = stage_chart(plan, memory_limit=max(s.cost.memory_bytes for s in plan.stages) * 1.5)
    assert text.count("stage  ") == 2 * len(plan.stages)
    assert "marks the limit" in text


def test_stage_chart_png(plan, tmp_path):
    pytest.importorskip("matplotlib")
    assert open(stage_chart(plan, tmp_path / "s.png"), "rb").read(4) == b"\x89PNG"


def test_schedule_timeline_chrome_trace_and_png(plan, tmp_path):
    import json
    timeline = schedule_timeline(plan, tmp_path / "t.json", schedule="1f1b", n_microbatches=4)
    events = json.loads((tmp_path / "t.json").read_text())
    assert len(events) == 2 * 4 * len(plan.stages)
    assert len(timeline.spans) == len(plan.stages) and 0 < max(timeline.bubble_fraction) < 1
    pytest.importorskip("matplotlib")
    schedule_timeline(plan, tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
