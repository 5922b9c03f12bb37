"""Tensor (Megatron) partitioning: shards simulated in one process equal the model; weights split 1/n."""
from __future__ import annotations

import operator

import pytest
import torch

from _models import MODELS
from partitioner import partition
from partitioner.sharding import Shard, local_size
from partitioner.sharding import ALL_GATHER, ALL_REDUCE
from passes._keys import LOCAL_SLICE, SHARD

_SHARDED = {"gpt2", "llama", "bert", "t5", "vit", "mlp", "moe"}


def _outputs(out):
    if hasattr(out, "logits"):
        return out.logits
    return out


def _plan(name: str, n: int):
    model, args, kwargs = MODELS[name]()
    plan = partition(model, n, args, kwargs, strategy="tensor", device="h100", training=False)
    return model, args, kwargs, plan


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "t5", "vit", "mlp", "moe"])
def test_tensor_plan_equals_model_and_splits_weights(name, n):
    model, args, kwargs, plan = _plan(name, n)
    with torch.no_grad():
        torch.testing.assert_close(_outputs(plan(*args, **kwargs)), _outputs(model(*args, **kwargs)))
    info = plan.sharding
    assert len(plan.stages[0].shards) == n and all(isinstance(s.module, torch.fx.GraphModule) for s in plan.stages[0].shards)
    for stage in plan.stages[0].shards:
        stage.module.graph.lint()
    print(f"{name} n={n}: largest shard holds {info.sharded_fraction:.3f} of the split parameters; "
          f"{len(info.column)} column-, {len(info.row)} row-parallel, {len(info.replicated)} replicated")
    assert info.row, plan.report()
    # each split parameter's piece is 1/n of it, or 1/(n/rep) where shards share KV heads (rep of them)
    full = dict(model.named_parameters(remove_duplicate=False))
    want = sum(full[k].numel() * local_size(s, full[k].shape[s.dim], n) // full[k].shape[s.dim]
               for k, s in info.param_shards.items() if k in full)
    assert info.sharded_fraction == pytest.approx(
        want / sum(full[k].numel() for k in info.param_shards if k in full), abs=1e-3)
    assert info.sharded_fraction == pytest.approx(1 / n, abs=1e-3) or any(s.rep > 1 or s.segments
                                                                          for s in info.param_shards.values())
    n_reduce = sum(node.target is ALL_REDUCE for node in plan.stages[0].shards[0].module.graph.nodes)
    assert n_reduce == len(info.row) + len(info.vocab)
    assert max(s.cost.param_bytes for s in plan.stages[0].shards) < sum(p.numel() * 4 for p in model.parameters())
    assert "replicated" in plan.report() or not info.replicated


# a second batch: batch 3 (the examples': 2, the MLP's 8), sequence 11 (16; MoE 5 for 8), decoder sequence 5 (8)
_OTHER_SIZES = {"gpt2": dict(batch=3, seq=11), "llama": dict(batch=3, seq=11), "bert": dict(batch=3, seq=11),
                "t5": dict(batch=3, seq=11, decoder_seq=5), "vit": dict(batch=3), "mlp": dict(batch=3),
                "moe": dict(batch=3, seq=5)}


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("name", list(_OTHER_SIZES))
def test_tensor_plan_made_on_the_example_runs_another_batch_size_and_length_equal_to_the_model(name, n):
    model, args, kwargs, plan = _plan(name, n)
    other = MODELS[name](**_OTHER_SIZES[name])             # the same sizes of weights; only its inputs are used
    assert other.args[0].shape != args[0].shape
    with torch.no_grad():
        torch.testing.assert_close(_outputs(plan(*other.args, **other.kwargs)),
                                   _outputs(model(*other.args, **other.kwargs)))


@pytest.mark.parametrize("n", [2, 4])
def test_moe_experts_split_on_the_experts_dim_and_the_sum_over_experts_is_all_reduced(n):
    model, args, kwargs, plan = _plan("moe", n)
    info = plan.sharding
    assert info.expert == ("einsum",) and info.row == ("sum_1",) and not info.column
    assert {k: (s.dim, s.blocks) for k, s in info.param_shards.items()} == {"w_in": (0, 1), "w_out": (0, 1)}
    params = dict(plan.stages[0].shards[n - 1].module.named_parameters())
    assert params["w_in"].shape[0] == params["w_out"].shape[0] == model.w_in.shape[0] // n
    torch.testing.assert_close(params["w_in"], model.w_in[-(model.w_in.shape[0] // n):])
    assert params["router.weight"].shape == model.router.weight.shape      # the router stays whole
    assert "softmax over the sharded dim" in info.replicated["linear"]
    code = plan.stages[0].shards[0].module.code
    assert code.count("_c10d_functional.all_reduce") == 1
    assert "expert-parallel" in plan.report() and "einsum" in plan.report()
    with torch.no_grad():
        torch.testing.assert_close(plan(*args, **kwargs), model(*args, **kwargs))


@pytest.mark.parametrize("n", [2, 4])
def test_llama_untied_embedding_splits_by_vocabulary_and_looks_up_zeros_outside_its_rows(n):
    model, args, kwargs = MODELS["llama"]()
    model.model.embed_tokens.padding_idx = 0          # local padding row only on shard 0
    args = (args[0].clone(),)
    args[0][0, :3] = torch.tensor([0, model.config.vocab_size - 1, model.config.vocab_size // n])  # edges
    plan = partition(model, n, args, kwargs, strategy="tensor", device="h100", training=False)
    info = plan.sharding
    assert info.vocab == ("embedding",) and "embedding" not in info.row
    assert info.param_shards["model.embed_tokens.weight"] == Shard(0)
    table = model.model.embed_tokens.weight
    for r, stage in enumerate(plan.stages[0].shards):
        local = dict(stage.module.named_parameters())["model.embed_tokens.weight"]
        torch.testing.assert_close(local, table.chunk(n)[r])
        code = stage.module.code
        assert "embedding.default" in code and "masked_fill" in code
        assert f"embedding.default(model_embed_tokens_weight, masked_fill_scalar, {0 if r == 0 else -1})" in code
    assert "vocabulary-parallel" in plan.report()
    with torch.no_grad():
        torch.testing.assert_close(plan(*args, **kwargs).logits, model(*args, **kwargs).logits)


@pytest.mark.parametrize("n", [2, 4])
def test_gpt2_tied_embedding_and_head_split_together_by_vocabulary(n):
    model, args, kwargs, plan = _plan("gpt2", n)
    info = plan.sharding
    assert info.vocab == ("embedding",) and info.gathered == ("linear",) and "linear" in info.column
    # one table: the graph reads it under one name, both model keys map to it, one piece per shard
    name = plan.state_keys["lm_head.weight"]
    assert plan.state_keys["transformer.wte.weight"] == name and info.param_shards[name] == Shard(0)
    table = model.transformer.wte.weight
    for r, stage in enumerate(plan.stages[0].shards):
        params = dict(stage.module.named_parameters(remove_duplicate=False))
        pieces = {id(p) for k, p in params.items() if plan.state_keys.get("lm_head.weight") == k or
                  k in ("lm_head.weight", "transformer.wte.weight")}
        assert len(pieces) == 1
        torch.testing.assert_close(params[name], table.chunk(n)[r])
    with torch.no_grad():
        torch.testing.assert_close(plan(*args, **kwargs).logits, model(*args, **kwargs).logits)


@pytest.mark.parametrize("n", [2, 4])
def test_llama_untied_head_splits_by_vocabulary_and_gathers_the_logits(n):
    model, args, kwargs, plan = _plan("llama", n)
    info = plan.sharding
    assert info.gathered == ("linear_14",) and "linear_14" in info.column
    assert info.param_shards["lm_head.weight"] == Shard(0)
    for r, stage in enumerate(plan.stages[0].shards):
        local = dict(stage.module.named_parameters())["lm_head.weight"]
        torch.testing.assert_close(local, model.lm_head.weight.chunk(n)[r])
        gathers = [node for node in stage.module.graph.nodes if node.target is ALL_GATHER]
        assert len(gathers) == 1 and gathers[0].args[1] == n
        out = next(iter(stage.module.graph.find_nodes(op="output"))).args[0][0]
        assert out.target is torch.ops.aten.movedim.int and out.args[1:] == (0, 2)
    assert "all-gathered" in plan.report()
    with torch.no_grad():
        torch.testing.assert_close(plan(*args, **kwargs).logits, model(*args, **kwargs).logits)


def test_head_with_indivisible_classes_stays_replicated_with_reason():
    _, _, _, plan = _plan("vit", 4)            # 10 labels on 4 shards
    assert not plan.sharding.gathered and "not divisible by n = 4" in plan.sharding.replicated["linear_12"]
    assert _plan("vit", 2)[3].sharding.gathered == ("linear_12",)


def test_gpt2_has_two_all_reduces_per_block_forward_and_backward():
    _, _, _, plan = _plan("gpt2", 2)
    blocks = {b: (f, bw) for b, f, bw, _ in plan.sharding.per_block()}
    assert blocks["transformer.h.0"] == blocks["transformer.h.1"] == (2, 2)
    assert blocks["transformer.wte"] == (1, 0)        # the vocabulary-parallel lookup's all-reduce
    report = plan.report()
    assert "column-parallel" in report and "row-parallel" in report and "addmm_1" in report


def test_llama_kv_heads_fewer_than_shards_are_shared_and_query_heads_still_split():
    # 2 KV heads on 4 shards (Megatron's KV replication): shards 0, 1 hold KV head 0, shards 2, 3 KV head 1;
    # each shard holds 1 of the 4 query heads and a quarter of o_proj
    model, args, kwargs, plan = _plan("llama", 4)
    info = plan.sharding
    assert not info.replicated and len(info.row) == 4     # o_proj and down_proj of both layers
    assert info.param_shards["model.layers.0.self_attn.k_proj.weight"] == Shard(0, rep=2)
    assert info.param_shards["model.layers.0.self_attn.q_proj.weight"] == Shard(0)
    k_proj = model.model.layers[0].self_attn.k_proj.weight
    for r, stage in enumerate(plan.stages[0].shards):
        params = dict(stage.module.named_parameters())
        torch.testing.assert_close(params["model.layers.0.self_attn.k_proj.weight"], k_proj.chunk(2)[r // 2])
        assert params["model.layers.0.self_attn.q_proj.weight"].shape[0] == 16
    with torch.no_grad():
        torch.testing.assert_close(plan(*args, **kwargs).logits, model(*args, **kwargs).logits)


def test_llama_grouped_kv_heads_shard_when_n_divides_them():
    _, _, _, plan = _plan("llama", 2)
    assert len(plan.sharding.row) == 4                   # o_proj and down_proj of both layers
    local = [n for n in plan.stages[0].shards[0].module.graph.nodes if n.target is torch.ops.aten.expand.default]
    assert any(len(n.args[1]) == 5 and n.args[1][1] == 1 for n in local)   # repeat_kv expands 1 local KV head


def test_shard_rewrites_head_count_in_views():
    _, _, _, plan = _plan("gpt2", 4)
    code = plan.stages[0].shards[1].module.code
    assert "_c10d_functional.all_reduce" in code and "wait_tensor" in code
    # c_attn is [64, 192] (q|k|v): each shard holds 1/4 of every block
    params = dict(plan.stages[0].shards[1].module.named_parameters())
    assert tuple(params["transformer.h.0.attn.c_attn.weight"].shape) == (64, 48)
    assert tuple(params["transformer.h.0.attn.c_proj.weight"].shape) == (16, 64)
    assert tuple(params["transformer.h.0.attn.c_proj.bias"].shape) == (64,)   # added once, after the all-reduce


def test_drawing_has_one_cluster_per_shard_and_the_collectives(tmp_path):
    _, _, _, plan = _plan("gpt2", 2)
    text = open(plan.draw(str(tmp_path / "plan.dot"))).read()
    assert text.count("subgraph cluster_shard") == 2
    assert text.count("all-reduce (sum)") == len(plan.sharding.row) + len(plan.sharding.vocab)


def test_unknown_strategy_is_refused():
    model, args, kwargs = MODELS["mlp"]()
    with pytest.raises(ValueError, match="tensor"):
        partition(model, 2, args, kwargs, strategy="sequence")


def test_tensor_plan_made_on_meta_loads_onto_real_weights_and_refuses_another_architecture(tmp_path):
    from _models import llama
    from partitioner import load_plan
    meta_model, meta_args, kwargs = llama(device="meta")
    plan = partition(meta_model, 2, meta_args, kwargs, strategy="tensor", device="h100", training=False)
    path = plan.save(tmp_path / "tp.json")
    model, args, kwargs = llama()
    loaded = load_plan(path, model, args, kwargs)
    assert loaded.strategy == "tensor" and loaded.sharding.decisions() == plan.sharding.decisions()
    with torch.no_grad():
        torch.testing.assert_close(_outputs(loaded(*args, **kwargs)), _outputs(model(*args, **kwargs)))
    other, other_args, other_kwargs = llama(hidden=128)
    with pytest.raises(ValueError, match="does not match the plan"):
        load_plan(path, other, other_args, other_kwargs)


def test_loading_a_tensor_plan_whose_decisions_this_model_does_not_reproduce_is_refused(tmp_path):
    import json
    from _models import llama
    from partitioner import load_plan
    model, args, kwargs = llama()
    path = partition(model, 2, args, kwargs, strategy="tensor", device="h100", training=False).save(tmp_path / "tp.json")
    saved = json.loads(open(path).read())
    params = saved["decisions"]["sharding"]["params"]
    params.pop(sorted(params)[0])                                   # as if an older fxpart had split less
    open(path, "w").write(json.dumps(saved))
    with pytest.raises(ValueError, match="shards differently from the plan"):
        load_plan(path, model, args, kwargs)


# -- graphs captured with symbolic batch and sequence (passes.capture's default) ---------------------------------

class _BatchHeadsAttention(torch.nn.Module):
    """Attention on ``[batch * heads, seq, head_dim]`` (``nn.MultiheadAttention``'s and Bloom's ``bmm``): views
    whose head dim is ``batch * heads``, a symbolic size. ``alibi``: Bloom's bias ``[batch * heads, 1, seq]``
    through ``baddbmm``; ``relative``: DeBERTa's position projection ``repeat``ed by the batch size, its scores
    gathered at the relative positions."""

    def __init__(self, d: int = 32, heads: int = 4, *, alibi: bool = False, relative: bool = False, n_pos: int = 8):
        super().__init__()
        self.heads, self.alibi, self.relative, self.n_pos = heads, alibi, relative, n_pos
        self.q, self.k, self.v, self.out = (torch.nn.Linear(d, d) for _ in range(4))
        self.register_buffer("slopes", 2.0 ** -torch.arange(1, heads + 1, dtype=torch.float32))
        self.rel = torch.nn.Parameter(torch.randn(n_pos, d))
        self.rel_norm = torch.nn.LayerNorm(d)
        self.pos_proj = torch.nn.Linear(d, d)

    def forward(self, x):
        b, s, d = x.shape
        h, hd = self.heads, d // self.heads
        q, k, v = (p(x).view(b, s, h, hd).transpose(1, 2).reshape(b * h, s, hd) for p in (self.q, self.k, self.v))
        if self.alibi:
            bias = (self.slopes[:, None, None] * torch.arange(s, dtype=x.dtype)).repeat(b, 1, 1)    # [b * h, 1, s]
            scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=hd ** -0.5)
        else:
            scores = torch.bmm(q, k.transpose(1, 2)) * hd ** -0.5
        if self.relative:
            pos = self.pos_proj(self.rel_norm(self.rel)).view(self.n_pos, h, hd).transpose(0, 1)   # [h, P, hd]
            c2p = torch.bmm(q, pos.repeat(b, 1, 1).transpose(1, 2))                               # [b * h, s, P]
            where = (torch.arange(s)[:, None] - torch.arange(s)[None, :]).clamp(0, self.n_pos - 1)
            scores = scores + torch.gather(c2p, -1, where.expand(b * h, s, s))
        out = torch.bmm(scores.softmax(-1), v).view(b, h, s, hd).transpose(1, 2).reshape(b, s, d)
        return self.out(out)


class _FlatFeatures(torch.nn.Module):
    """An MLP whose hidden features are flattened with the sequence (``[b, f * s]``) and offset by a replicated
    tensor of that shape, beside a plain MLP. ``with_batch``: flattened with the batch too (``[b * f * s]``)."""

    def __init__(self, d: int = 16, f: int = 32, *, with_batch: bool = False):
        super().__init__()
        self.with_batch = with_batch
        self.up, self.down = torch.nn.Linear(d, f), torch.nn.Linear(f, d)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, f), torch.nn.ReLU(), torch.nn.Linear(f, d))

    def forward(self, x):
        b, s, d = x.shape
        f = self.up.out_features
        flat_shape = (-1,) if self.with_batch else (b, -1)
        hidden = self.up(x).transpose(1, 2).reshape(flat_shape)
        offset = x.repeat(1, 1, f // d).transpose(1, 2).reshape(flat_shape)
        hidden = torch.relu(hidden + offset).view(b, f, s).transpose(1, 2)
        return self.down(hidden) + self.mlp(x)


_EXAMPLE, _OTHER = torch.randn(2, 6, 32), torch.randn(3, 5, 32)


def _symbolic_plan(model, n: int, x):
    """A tensor plan of ``model`` on ``x``, whose capture kept the batch and sequence dims symbolic."""
    torch.manual_seed(0)
    plan = partition(model.eval(), n, (x,), strategy="tensor", device="h100", training=False)
    assert all(isinstance(d, str) for d in plan.signature.inputs[0].dims[:2]), plan.signature.describe()
    return plan


def _equal_at_both_shapes(plan, model, d: int = 32):
    with torch.no_grad():
        for x in (_EXAMPLE[..., :d], _OTHER[..., :d]):
            torch.testing.assert_close(plan(x), model(x))


def _shard_nodes(plan, target):
    return [node for node in plan.stages[0].shards[0].module.graph.nodes if node.target == target]


@pytest.mark.parametrize("n", [2, 4])
def test_a_view_to_batch_times_heads_gets_the_local_head_count_divided_at_run_time(n):
    torch.manual_seed(0)
    model = _BatchHeadsAttention()
    plan = _symbolic_plan(model, n, _EXAMPLE)
    assert not plan.sharding.replicated and plan.sharding.row == ("linear_3",)
    # the sizes batch * heads are graph nodes: each shard's view divides them by n when it runs
    divided = [node for node in _shard_nodes(plan, operator.floordiv) if node.args[1] == n]
    views = [node for node in _shard_nodes(plan, torch.ops.aten.view.default) +
             _shard_nodes(plan, torch.ops.aten.reshape.default) if any(a in divided for a in node.args[1])]
    assert len(views) == 3                              # q, k, v to [b * h / n, s, hd]
    bmm = _shard_nodes(plan, torch.ops.aten.bmm.default)[0]
    assert bmm.meta[SHARD] == Shard(0, blocks=2, folded=True)     # 2 batch blocks of 4 heads at the example
    _equal_at_both_shapes(plan, model)


@pytest.mark.parametrize("n", [2, 4])
def test_alibi_bias_of_batch_times_heads_is_cut_by_heads_within_each_batch_block(n):
    torch.manual_seed(0)
    model = _BatchHeadsAttention(alibi=True)
    plan = _symbolic_plan(model, n, _EXAMPLE)
    assert not plan.sharding.replicated
    # the replicated bias [b * h, 1, s] viewed as [b, h, 1, s]: each shard takes its h / n heads of every batch
    unflatten, = _shard_nodes(plan, torch.ops.aten.unflatten.int)
    assert unflatten.args[1:] == (0, [-1, 4])
    _equal_at_both_shapes(plan, model)


@pytest.mark.parametrize("n", [2, 4])
def test_repeat_by_the_batch_size_keeps_the_relative_position_projection_split(n):
    torch.manual_seed(0)
    model = _BatchHeadsAttention(relative=True)
    plan = _symbolic_plan(model, n, _EXAMPLE)
    info = plan.sharding
    assert info.param_shards["pos_proj.weight"] == Shard(0) and not info.replicated
    repeat, = _shard_nodes(plan, torch.ops.aten.repeat.default)
    assert repeat.meta[SHARD] == Shard(0, blocks=2, folded=True)
    _equal_at_both_shapes(plan, model)


def test_features_flattened_with_the_sequence_are_cut_at_a_fraction_of_their_length_at_run_time():
    torch.manual_seed(0)
    model = _FlatFeatures()
    plan = _symbolic_plan(model, 2, _EXAMPLE[..., :16])
    info = plan.sharding
    assert info.param_shards["up.weight"] == Shard(0) and info.param_shards["down.weight"] == Shard(1)
    assert not info.replicated
    # the replicated offset [b, f * s] is cut at f * s * r / n, read from its length when the shard runs
    assert [node.args[1] for node in _shard_nodes(plan, torch.ops.aten.sym_size.int)
            if node.meta.get(LOCAL_SLICE)] == [1]
    _equal_at_both_shapes(plan, model, d=16)


def test_features_flattened_with_batch_and_sequence_stay_whole_with_the_reason():
    torch.manual_seed(0)
    model = _FlatFeatures(with_batch=True)
    plan = _symbolic_plan(model, 2, _EXAMPLE[..., :16])
    info = plan.sharding
    # [b, f, s] -> [b * f * s] holds b pieces of f * s / n per shard: both change with the symbolic sizes
    why = info.replicated["linear"]
    assert why.startswith("reshape") and "changes with the symbolic sizes" in why, why
    assert "up.weight" not in info.param_shards and info.param_shards["mlp.0.weight"] == Shard(0)
    _equal_at_both_shapes(plan, model, d=16)


class _SamePadded(torch.nn.Module):
    """TF-style "same" padding (MobileNet, EfficientNet ports): F.pad on the spatial dims before each conv."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 64, 3, stride=2)
        self.conv2 = torch.nn.Conv2d(64, 64, 3)
        self.head = torch.nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(torch.nn.functional.pad(x, (0, 1, 0, 1))))
        x = torch.relu(self.conv2(torch.nn.functional.pad(x, (1, 1, 1, 1))))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("n", [2, 4])
def test_padding_the_spatial_dims_keeps_channel_shards_and_the_plan_equals_the_model(n):
    torch.manual_seed(0)
    model, x = _SamePadded().eval(), torch.randn(2, 3, 16, 16)
    plan = partition(model, n, (x,), strategy="tensor", device="cpu")
    report = plan.report()
    assert "pad" not in "".join(line for line in report.splitlines() if "replicated" in line), report
    assert plan.sharding.param_shards["conv1.weight"] is not None
    with torch.no_grad():
        torch.testing.assert_close(plan(x), model(x))
        other = torch.randn(3, 3, 20, 20)                    # another batch and image size
        torch.testing.assert_close(plan(other), model(other))


def test_a_tensor_degree_nothing_shards_is_refused_with_the_analysis_reason():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"nothing in the graph shards 2 ways \(1 matmuls or convolutions stay whole: "
                                         r"linear: dim 0 of 0.weight has size 3, not divisible by n = 2\); plan with "
                                         r"strategy='pipeline' or 'data'"):
        partition(model, 2, (torch.randn(4, 3),), strategy="tensor", device="cpu")


def test_weights_shared_across_stages_are_listed_by_the_shard_graphs_the_ranks_run():
    """ALBERT runs one layer's weights at every depth. A tensor shard adds a row-parallel bias after the
    all-reduce, so a stage boundary can fall between a weight and its bias: the tied-parameter table must
    name the stages whose shard graphs hold each one, or the Runner's gradient sync refuses."""
    from transformers import AlbertConfig, AlbertForMaskedLM
    torch.manual_seed(0)
    config = AlbertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=128, embedding_size=32, max_position_embeddings=64)
    model = AlbertForMaskedLM(config).eval()
    ids = torch.randint(0, 1000, (8, 16))
    plan = partition(model, 4, (ids,), mesh={"tp": 2, "pp": 2}, n_virtual=4, device="h100")
    assert len(plan.stages) == 8 and plan.shared_params
    holders: dict = {}
    for s, stage in enumerate(plan.stages):
        for name, _ in stage.shards[0].module.named_parameters():
            holders.setdefault(name, []).append(s)
    assert plan.shared_params == {name: stages for name, stages in holders.items() if len(stages) > 1}


def test_a_value_entering_a_shard_that_the_model_writes_in_place_enters_as_a_copy():
    """Megatron's f passes a replicated value into the region as a view (identity forward); autograd forbids an
    in-place write into it (RegNet's in-place ReLU on a channel slice failed at tp=4), so f is followed by a copy
    there, and only there."""
    from transformers import RegNetConfig, RegNetForImageClassification
    from passes._util import written_bases
    from runtime.tensor_parallel import copy_to_region, megatron_graph, sum_in_replicas
    torch.manual_seed(0)
    model = RegNetForImageClassification(RegNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                                      groups_width=8, num_labels=10)).eval()
    import dataclasses
    from passes.devices import get_device_spec
    h100 = get_device_spec("h100")      # a link as slow against compute as gloo on a CPU: convs split as there
    cpu_like = dataclasses.replace(h100, link_bandwidth_Bps=h100.flops_per_s(torch.float32) / 26)
    plan = partition(model, 4, (torch.randn(4, 3, 32, 32),), strategy="tensor", device=cpu_like)
    gm = megatron_graph(plan.stages[0].shards[0].module, group_name="0",
                        param_shards=dict(plan.sharding.param_shards))
    f_nodes = [n for n in gm.graph.nodes if n.target in (copy_to_region, sum_in_replicas)]
    written = {w for n in gm.graph.nodes for w in written_bases(n)}
    copied = [n for n in f_nodes if any(u.target is torch.ops.aten.clone.default for u in n.users)]
    assert f_nodes and not written & set(f_nodes)
    assert copied and len(copied) < len(f_nodes)        # a copy only where the model writes


def test_interleaving_that_puts_a_tied_weight_twice_on_a_rank_is_not_combined_with_sharding():
    """FSDP cannot shard one parameter for two stages of a rank: the planner plans without interleaving (or
    without sharding when interleaving is asked for), and says so when both are pinned."""
    from transformers import AlbertConfig, AlbertForMaskedLM
    torch.manual_seed(0)
    config = AlbertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=128, embedding_size=32, max_position_embeddings=64)
    model, ids = AlbertForMaskedLM(config).eval(), torch.randint(0, 1000, (8, 16))
    plan = partition(model, 4, (ids,), mesh={"dp": 2, "pp": 2}, data_parallel="shard", device="h100")
    assert plan.data_parallel == "shard" and plan.n_virtual == 1
    plan = partition(model, 4, (ids,), mesh={"dp": 2, "pp": 2}, n_virtual=2, device="h100")
    assert plan.n_virtual == 2 and plan.data_parallel == "replicate"
    with pytest.raises(ValueError, match=r"tied across stages .* Use data_parallel='replicate', or schedule='1f1b'"):
        partition(model, 4, (ids,), mesh={"dp": 2, "pp": 2}, n_virtual=2, data_parallel="shard", device="h100")
