"""Tensor plans on the families people train, from tiny configs: the plan equals the model at 2 and 4
shards, splits what a hand-written Megatron plan splits (and says why for anything it keeps
whole), MoE experts are counted and split, and 2-rank training equals single-process training.

The slow tests launch this file as a script once per rank (as ``test_tensor_runtime`` does).
"""
from __future__ import annotations

import os
import re
import sys

import pytest
import torch
import torch.nn.functional as F

from passes.zoo import MODELS
from partitioner import partition
from partitioner.sharding import Shard

# decoder LMs: (registry name, sizes); gpt2 with a short position table, as Megatron's tests use
DECODERS = {
    "gpt2": ("gpt2", dict(n_positions=32)), "llama": ("llama", {}), "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}), "qwen2_tied": ("qwen2", dict(tie=True)), "gemma": ("gemma", {}), "phi3": ("phi3", {}),
    "phi3_gqa": ("phi3", dict(n_kv_heads=2)), "falcon": ("falcon", {}), "mixtral": ("mixtral", {}),
    "qwen2_moe": ("qwen2_moe", {}), "gptj": ("gptj", {}), "gpt_neox": ("gpt_neox", {}), "bloom": ("bloom", {}),
    "opt": ("opt", {}),
}
OTHERS = {name: (name, {}) for name in ("bert", "deberta", "bart", "whisper", "t5", "vit", "mha_vit", "list_moe",
                                        "resnet")}
CASES = {**DECODERS, **OTHERS}

# what a hand-written Megatron / torchtitan plan keeps whole: norms, biases, position tables (learned, relative,
# bucketed), routers and 1-output gates, BERT's LM-head transform, class tokens, patch embeddings, convolutions
_MEGATRON_WHOLE = re.compile(r"norm|\.ln|LayerNorm|position|wpe|embed_positions|rel_embeddings|relative_attention_bias|"
                             r"\.gate\.weight|router|transform\.dense|"
                             r"shared_expert_gate|cls_token|class_token|pos_embedding|patch|conv_proj|token_type|"
                             r"final_logits_bias|\.bias$|conv|embedder|shortcut")


def _case(name: str):
    model_name, sizes = CASES[name]
    return MODELS[model_name](**sizes)


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _plan(name: str, n: int, **kwargs):
    case = _case(name)
    plan = partition(case.model, n, case.args, case.kwargs, strategy="tensor", device="h100", training=False)
    return case, plan


def _split_names(model, info) -> set:
    """Every state-dict name of the parameters the plan splits (tied aliases too)."""
    cut = {id(p) for k, p in model.named_parameters(remove_duplicate=False) if k in info.param_shards}
    return {k for k, p in model.named_parameters(remove_duplicate=False) if id(p) in cut}


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("name", list(CASES))
def test_plan_equals_the_model_and_splits_what_megatron_splits(name, n):
    case, plan = _plan(name, n)
    with torch.no_grad():
        torch.testing.assert_close(_logits(plan(*case.args, **case.kwargs)), _logits(case()))
    for stage in plan.stages[0].shards:
        stage.module.graph.lint()
    info = plan.sharding
    params = dict(case.model.named_parameters(remove_duplicate=False))
    split = _split_names(case.model, info)
    megatron = {k for k, p in params.items() if p.dim() >= 2 and not _MEGATRON_WHOLE.search(k)}
    missed = {k: info.whole_params.get(k, "(no report line)") for k in megatron - split}
    # a classifier of 10 labels cannot split 4 ways; everything else Megatron splits is split
    assert all("not divisible by n = 4" in why for why in missed.values()), missed
    if name in DECODERS:
        assert info.split_fraction >= 0.95, plan.report()
    print(f"{name} n={n}: {info.split_fraction:.3f} of the parameter bytes split")


# sizes of a second batch (the example's: batch 2, sequence 16, decoder sequence 8, 32x32 images); positions
# tables and patch grids fix the image sizes of the ViTs and Whisper's frames
OTHER_SIZES = {**{name: dict(batch=3, seq=11) for name in (*DECODERS, "bert", "deberta")},
               "bart": dict(batch=3, seq=11, decoder_seq=5), "t5": dict(batch=3, seq=11, decoder_seq=5),
               "whisper": dict(batch=3, decoder_seq=5), "vit": dict(batch=3), "mha_vit": dict(batch=3),
               "list_moe": dict(batch=3, seq=5), "resnet": dict(batch=3, image_size=40)}


@pytest.mark.parametrize("name", list(CASES))
def test_plan_made_on_the_example_runs_another_batch_size_and_length_equal_to_the_model(name):
    case, plan = _plan(name, 4)
    model_name, sizes = CASES[name]
    other = MODELS[model_name](**sizes, **OTHER_SIZES[name])
    assert other.args[0].shape != case.args[0].shape
    with torch.no_grad():
        torch.testing.assert_close(_logits(plan(*other.args, **other.kwargs)),
                                   _logits(case.model(*other.args, **other.kwargs)))


@pytest.mark.parametrize("name", ["bert", "resnet", "whisper", "mixtral", "mha_vit"])
def test_every_parameter_of_two_or_more_dims_is_split_or_has_a_report_line(name):
    case, plan = _plan(name, 4)
    info = plan.sharding
    params = dict(case.model.named_parameters(remove_duplicate=False))
    split = _split_names(case.model, info)
    whole = {k for k, p in params.items() if p.dim() >= 2 and k not in split}
    reported = {id(params[t]) for t in info.whole_params if t in params}
    assert {k for k in whole if id(params[k]) not in reported} == set()
    report = plan.report()
    assert all(k in report for k in info.whole_params)
    assert "parameters every shard holds whole" in report or not info.whole_params


def test_mistral_kv_heads_fewer_than_shards_are_shared_by_pairs_of_shards():
    case, plan = _plan("mistral", 4)
    info = plan.sharding
    attn = case.model.model.layers[0].self_attn
    assert info.param_shards["model.layers.0.self_attn.k_proj.weight"] == Shard(0, rep=2)
    assert info.param_shards["model.layers.0.self_attn.v_proj.weight"] == Shard(0, rep=2)
    assert info.param_shards["model.layers.0.self_attn.q_proj.weight"] == Shard(0)
    assert info.param_shards["model.layers.0.self_attn.o_proj.weight"] == Shard(1)
    for r, stage in enumerate(plan.stages[0].shards):
        local = dict(stage.module.named_parameters())
        torch.testing.assert_close(local["model.layers.0.self_attn.k_proj.weight"], attn.k_proj.weight.chunk(2)[r // 2])
        torch.testing.assert_close(local["model.layers.0.self_attn.q_proj.weight"], attn.q_proj.weight.chunk(4)[r])
    assert not info.replicated


@pytest.mark.parametrize("n", [2, 4])
def test_falcon_multi_query_fused_qkv_splits_query_heads_and_holds_the_one_kv_head_whole(n):
    case, plan = _plan("falcon", n)
    info = plan.sharding
    # query_key_value rows: 4 query heads | 1 key head | 1 value head (16 rows each); x @ W.T everywhere
    assert info.param_shards["transformer.h.0.self_attention.query_key_value.weight"] == \
        Shard(0, segments=((64, 1), (16, n), (16, n)))
    assert info.param_shards["transformer.h.0.self_attention.dense.weight"] == Shard(1)
    assert info.param_shards["lm_head.weight"] == Shard(0)          # tied to the word embeddings
    qkv = case.model.transformer.h[0].self_attention.query_key_value.weight
    local = dict(plan.stages[0].shards[n - 1].module.named_parameters())["transformer.h.0.self_attention.query_key_value.weight"]
    torch.testing.assert_close(local, torch.cat([qkv[:64].chunk(n)[n - 1], qkv[64:]]))


@pytest.mark.parametrize("n_kv_heads,n", [(4, 4), (2, 4), (1, 2)])
def test_phi3_fused_qkv_is_sliced_into_query_and_kv_parts_and_gate_up_chunked(n_kv_heads, n):
    case = MODELS["phi3"](n_kv_heads=n_kv_heads)
    plan = partition(case.model, n, case.args, case.kwargs, strategy="tensor", device="h100", training=False)
    info = plan.sharding
    kv = 16 * n_kv_heads
    rep = max(1, n // n_kv_heads)
    want = Shard(0, 3) if kv == 64 else Shard(0, segments=((64, 1), (kv, rep), (kv, rep)))
    assert info.param_shards["model.layers.0.self_attn.qkv_proj.weight"] == want
    assert info.param_shards["model.layers.0.mlp.gate_up_proj.weight"] == Shard(0, 2)     # gate | up, chunked
    with torch.no_grad():
        torch.testing.assert_close(plan(*case.args, **case.kwargs).logits, case().logits)


def test_gptj_mlp_shares_the_attention_input_and_both_split():
    _, plan = _plan("gptj", 2)
    info = plan.sharding
    assert info.param_shards["transformer.h.0.mlp.fc_in.weight"] == Shard(0)
    assert info.param_shards["transformer.h.0.attn.q_proj.weight"] == Shard(0)
    assert not info.replicated


def test_qwen2_moe_sheds_the_one_output_gate_and_splits_the_shared_expert():
    _, plan = _plan("qwen2_moe", 2)
    info = plan.sharding
    gate = "model.layers.0.mlp.shared_expert_gate.weight"
    assert gate not in info.param_shards and "size 1, not divisible by n = 2" in info.whole_params[gate]
    assert "softmax" in info.whole_params["model.layers.0.mlp.gate.weight"]          # the router
    for name in ("shared_expert.gate_proj", "shared_expert.up_proj"):
        assert info.param_shards[f"model.layers.0.mlp.{name}.weight"] == Shard(0)
    assert info.param_shards["model.layers.0.mlp.shared_expert.down_proj.weight"] == Shard(1)


@pytest.mark.parametrize("experts", [None, "batched_mm"])
def test_mixtral_experts_split_inside_each_expert_on_the_grouped_and_batched_paths(experts):
    case = MODELS["mixtral"](experts=experts)
    plan = partition(case.model, 2, case.args, case.kwargs, strategy="tensor", device="h100", training=False)
    info = plan.sharding
    assert info.param_shards["model.layers.0.mlp.experts.gate_up_proj"] == Shard(1, 2)    # [E, gate | up, d]
    assert info.param_shards["model.layers.0.mlp.experts.down_proj"] == Shard(2)          # [E, d, I]
    code = plan.stages[0].shards[0].module.code
    assert ("grouped_mm_fallback" in code) == (experts is None)
    with torch.no_grad():
        torch.testing.assert_close(plan(*case.args, **case.kwargs).logits, case().logits)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_moe_flops_through_the_grouped_custom_op_equal_the_batched_path(name):
    from passes import estimate
    counts = []
    for experts in (None, "batched_mm"):
        case = MODELS[name](experts=experts)
        est = estimate(case.model, case.args, case.kwargs, training=True, loss_fn=lambda out: out.logits.sum())
        counts.append((est.flops, est.backward_flops))
    assert counts[0] == counts[1]


def test_flop_rule_of_grouped_mm_reads_the_shapes_of_its_operands():
    from passes.flops import count_flops
    import transformers.integrations.moe  # noqa: F401  registers the op
    op = torch.ops.transformers.grouped_mm_fallback.default
    x, w, offs = torch.randn(6, 8), torch.randn(3, 8, 5), torch.tensor([2, 4, 6], dtype=torch.int32)
    assert count_flops(op, (x, w, offs), {}, op(x, w, offs)) == 2 * 6 * 8 * 5


def test_list_moe_sheds_the_router_and_splits_every_expert():
    case, plan = _plan("list_moe", 2)
    info = plan.sharding
    assert "softmax over the sharded dim" in info.whole_params["router.weight"]
    for e in range(len(case.model.experts)):
        assert info.param_shards[f"experts.{e}.0.weight"] == Shard(0)
        assert info.param_shards[f"experts.{e}.2.weight"] == Shard(1)


def test_bart_cross_attention_kv_of_every_layer_merge_with_their_queries():
    _, plan = _plan("bart", 2)
    info = plan.sharding
    for layer in (0, 1):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            assert f"model.decoder.layers.{layer}.encoder_attn.{proj}.weight" in info.param_shards
    assert not any("another sharded region" in why for why in info.replicated.values())


def test_torchvision_style_vit_splits_the_packed_in_proj_in_three_blocks():
    _, plan = _plan("mha_vit", 2)          # 12 heads of 8: q | k | v packed in in_proj_weight [288, 96]
    info = plan.sharding
    assert info.param_shards["layers.0.self_attention.in_proj_weight"] == Shard(0, 3)
    assert info.param_shards["layers.0.self_attention.out_proj.weight"] == Shard(1)


def _fast_link():
    """An H100 whose link moves a byte while it computes 10 FLOPs: channel-parallel convolutions pay."""
    from dataclasses import replace
    from passes.devices import get_device_spec
    h100 = get_device_spec("h100")
    return replace(h100, name="h100-fast-link", link_bandwidth_Bps=h100.flops_per_s(torch.float32) / 10)


def test_resnet_convolutions_split_by_channels_with_batch_norm_local_where_they_pay():
    case = MODELS["resnet"]()
    plan = partition(case.model, 2, case.args, case.kwargs, strategy="tensor", device=_fast_link(), training=False)
    info = plan.sharding
    # the stem is column-parallel (BatchNorm and max-pool local on its channels), the next conv row-parallel
    # (all-reduce), the one after column-parallel again
    stem, block = "resnet.embedder.embedder", "resnet.encoder.stages.0.layers.0.layer"
    assert info.param_shards[f"{stem}.convolution.weight"] == Shard(0)
    assert info.param_shards[f"{stem}.normalization.weight"] == Shard(0)
    assert info.param_shards[f"{block}.0.convolution.weight"] == Shard(1)
    assert info.param_shards[f"{block}.1.convolution.weight"] == Shard(0)
    local = dict(plan.stages[0].shards[1].module.named_buffers())
    running = case.model.resnet.embedder.embedder.normalization.running_mean
    torch.testing.assert_close(local[f"{stem}.normalization.running_mean"], running.chunk(2)[1])
    assert info.split_fraction > 0.95
    with torch.no_grad():
        torch.testing.assert_close(plan(*case.args).logits, case().logits)


def test_narrow_convolutions_stay_whole_where_the_all_reduce_costs_more_than_the_split_saves():
    case, plan = _plan("resnet", 2)           # 16-32 channels at 3x3: ~144 FLOPs per all-reduced byte
    info = plan.sharding
    conv = "resnet.encoder.stages.0.layers.0.layer.0.convolution.weight"
    assert conv not in info.param_shards and "do not pay" in info.whole_params[conv]


def test_in_place_activations_keep_a_column_parallel_layout():
    from torch import nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Hardswish(inplace=True), nn.Linear(32, 16)).eval()   # MobileNet's
    x = torch.randn(4, 16)
    plan = partition(model, 2, (x,), strategy="tensor", device="h100", training=False)
    assert "hardswish_" in plan.stages[0].shards[0].module.code
    assert plan.sharding.column == ("linear",) and plan.sharding.row == ("linear_1",)
    with torch.no_grad():
        torch.testing.assert_close(plan(x), model(x))


@pytest.mark.parametrize("name,n", [("llama", 4), ("falcon", 2)])
def test_shards_of_a_graph_with_symbolic_batch_and_sequence_run_other_shapes(name, n):
    # capture with torch.export's Dim.AUTO: view sizes and sym_size nodes carry the batch and sequence dims
    from torch.export import Dim
    from passes._util import flatten_inputs
    from partitioner.sharding import analyze, build_shard, simulate, sliced_params
    case = _case(name)
    kwargs = {"input_ids": case.args[0], "use_cache": False}
    ep = torch.export.export(case.model, (), kwargs, strict=False,
                             dynamic_shapes={"input_ids": {0: Dim.AUTO, 1: Dim.AUTO}, "use_cache": None})
    gm = ep.module()
    assert any(node.target == torch.ops.aten.sym_size.int for node in gm.graph.nodes)
    sh = analyze(gm, n)
    assert not sh.replicated
    sliced = sliced_params(gm, sh)
    shards = [build_shard(gm, sh, r, sliced=sliced) for r in range(n)]
    spec = gm.graph._codegen.pytree_info.in_spec
    for ids in (case.args[0], torch.randint(0, 1000, (3, 11))):
        inputs = {"input_ids": ids, "use_cache": False}
        with torch.no_grad():
            torch.testing.assert_close(simulate(shards, flatten_inputs(spec, (), inputs))[0],
                                       case.model(**inputs).logits)


# -- 2-rank training ---------------------------------------------------------------------------

TRAIN = {"phi3": 2, "falcon": 2, "mixtral": 2, "gpt2": 2, "mistral": 4}
N_STEPS = 3


def _token_loss(out, target):
    logits = out.logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def _sgd(params):
    return torch.optim.SGD(params, lr=0.5)


def _worker(name: str, out_path: str) -> None:
    """One rank: the tensor plan's forward, 3 SGD steps and the gathered state; rank 0 also trains the model."""
    import torch.distributed as dist
    from runtime import Runner
    case = _case(name)
    case.model.train()
    inputs = {"input_ids": case.args[0], **case.kwargs}       # keywords only: what Runner.step passes on
    target = torch.randint(0, case.model.config.vocab_size, case.args[0].shape, generator=torch.Generator().manual_seed(2))
    plan = partition(case.model, TRAIN[name], (), inputs, strategy="tensor", device="h100")
    runner = Runner(plan, loss_fn=_token_loss, optimizer_fn=_sgd)
    with torch.no_grad():
        want = case().logits
    result = {"forward": runner.forward(**inputs).logits, "model_forward": want,
              "losses": [runner.step(inputs, target) for _ in range(N_STEPS)],
              "param_shards": dict(plan.sharding.param_shards)}
    result["state"] = runner.full_state_dict()
    if dist.get_rank() == 0:
        ref = _case(name).model.train()
        opt = _sgd(ref.parameters())
        losses = []
        for _ in range(N_STEPS):
            loss = _token_loss(ref(**inputs), target)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        result["reference"] = {"losses": losses, "state": {k: v.detach().clone() for k, v in ref.state_dict().items()}}
        torch.save(result, out_path)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TRAIN))
def test_tensor_parallel_training_of_the_family_matches_single_process(name, tmp_path):
    from runtime.launch import run_local
    out = tmp_path / f"{name}.pt"
    run_local([__file__, name, str(out)], TRAIN[name], timeout_s=300)
    result = torch.load(out, weights_only=False)
    close = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(result["forward"], result["model_forward"], **close)
    ref = result["reference"]
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(ref["losses"]), **close)
    assert ref["losses"][-1] < ref["losses"][0]            # the steps do train
    assert list(result["state"]) == list(ref["state"])
    for key, want in ref["state"].items():
        torch.testing.assert_close(result["state"][key], want, **close, msg=lambda m, key=key: f"{name} {key}: {m}")
    if name == "mistral":          # 2 KV heads on 4 ranks: pairs of ranks share (and sum the gradient of) one
        assert result["param_shards"]["model.layers.0.self_attn.k_proj.weight"].rep == 2
    if name == "gpt2":
        assert result["param_shards"]["lm_head.weight"] == result["param_shards"]["transformer.wte.weight"]


def _worker_vocab_ce(out_path: str) -> None:
    """One rank of GPT-2 (tied head): logits kept split by vocabulary, Megatron's cross-entropy on them."""
    import torch.distributed as dist
    from runtime.tensor_parallel import megatron_graph, vocab_parallel_cross_entropy
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    case = _case("gpt2")
    inputs = {"input_ids": case.args[0], **case.kwargs}
    target = torch.randint(0, 1000, case.args[0].shape, generator=torch.Generator().manual_seed(2))
    target[0, 0] = -100                                      # an ignored position
    plan = partition(case.model, 2, (), inputs, strategy="tensor", device="h100")
    gm = megatron_graph(plan.stages[0].shards[rank].module, group_name=dist.group.WORLD.group_name,
                        param_shards=plan.sharding.param_shards, vocab_parallel_outputs=True)
    local = gm(*plan.signature.flatten((), inputs))[0]
    loss = vocab_parallel_cross_entropy(local, target, dist.group.WORLD.group_name)
    loss.backward()
    grads = {k: p.grad for k, p in gm.named_parameters(remove_duplicate=False)}
    ref = case.model
    ref_loss = F.cross_entropy(ref(**inputs).logits.reshape(-1, 1000), target.reshape(-1))
    ref_loss.backward()
    torch.save({"local_shape": tuple(local.shape), "loss": loss.item(), "ref_loss": ref_loss.item(),
                "head_grad": grads["lm_head.weight"], "ref_head_grad": ref.lm_head.weight.grad.chunk(2)[rank],
                "ln_grad": grads["transformer.ln_f.weight"], "ref_ln_grad": ref.transformer.ln_f.weight.grad},
               f"{out_path}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_vocab_parallel_cross_entropy_never_gathers_the_logits_and_equals_the_full_loss(tmp_path):
    from runtime.launch import run_local
    out = tmp_path / "vocab_ce.pt"
    run_local([__file__, "vocab_ce", str(out)], 2, timeout_s=300)
    for r in range(2):
        result = torch.load(f"{out}.{r}", weights_only=False)
        assert result["local_shape"][-1] == 500                 # each rank's half of the vocabulary
        assert result["loss"] == pytest.approx(result["ref_loss"], rel=1e-5)
        torch.testing.assert_close(result["head_grad"], result["ref_head_grad"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(result["ln_grad"], result["ref_ln_grad"], rtol=1e-4, atol=1e-6)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    if sys.argv[1] == "vocab_ce":
        _worker_vocab_ce(sys.argv[2])
    else:
        _worker(sys.argv[1], sys.argv[2])
