"""Plans as a user meets them: any batch and length, keyword inputs, plans made on meta applied to
``eval()`` models, clear errors where a shape cannot vary, a warning where micro-batches change
what BatchNorm computes."""
from __future__ import annotations

import warnings

import pytest
import torch

from partitioner import load_plan, partition
from passes import zoo
from passes.signature import BatchError


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


_FAMILIES = {"gpt2": {}, "llama": {}, "bert": {}}


def _other_batches(case):
    """The example's inputs at other batch sizes and lengths (every tensor input resized alike)."""
    ids = case.args[0]
    for batch, seq in ((5, ids.shape[1]), (ids.shape[0], 9), (3, 11), (1, 1)):
        new_ids = torch.randint(0, 1000, (batch, seq), generator=torch.Generator().manual_seed(batch * seq))
        kwargs = {k: (torch.ones(batch, seq, dtype=v.dtype) if isinstance(v, torch.Tensor) else v)
                  for k, v in case.kwargs.items()}
        yield (new_ids,), kwargs


@pytest.mark.parametrize("strategy", ["pipeline", "tensor"])
@pytest.mark.parametrize("name", list(_FAMILIES))
def test_plan_runs_other_batch_sizes_and_lengths_equal_to_the_model(name, strategy):
    case = zoo.make(name)
    plan = partition(case.model, 2, case.args, case.kwargs, strategy=strategy, device="h100", training=False)
    with torch.no_grad():
        for args, kwargs in _other_batches(case):
            torch.testing.assert_close(_logits(plan(*args, **kwargs)), _logits(case.model(*args, **kwargs)),
                                       msg=lambda m, a=args: f"{name} {strategy} at {tuple(a[0].shape)}: {m}")


def test_keyword_constants_baked_into_the_capture_may_be_left_out_or_repeated():
    case = zoo.make("gpt2")
    plan = partition(case.model, 2, case.args, case.kwargs, strategy="pipeline", device="h100")
    with torch.no_grad():
        want = case.model(*case.args, use_cache=False).logits
        torch.testing.assert_close(plan(*case.args).logits, want)                  # use_cache left out
        torch.testing.assert_close(plan(input_ids=case.args[0], use_cache=False).logits, want)   # all by keyword
    with pytest.raises(BatchError, match=r"use_cache=True, but the graph was captured with use_cache=False"):
        plan(*case.args, use_cache=True)
    with pytest.raises(BatchError, match=r"unexpected keyword input\(s\) \['attention_mask'\]"):
        plan(*case.args, attention_mask=torch.ones_like(case.args[0]))


def test_a_dimension_the_model_fixes_is_named_with_the_size_it_needs():
    case = zoo.make("vit")           # position embeddings fix the image size
    plan = partition(case.model, 2, case.args, strategy="pipeline", device="h100", training=False)
    with pytest.raises(BatchError, match=r"pixel_values dim 2 has size 64, but this dimension is static in the "
                                         r"captured graph: it needs 32"):
        plan(torch.randn(2, 3, 64, 64))
    with pytest.raises(BatchError, match=r"pixel_values has dtype torch.float64, but the graph was captured with "
                                         r"float32"):
        plan(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    with torch.no_grad():                                              # the batch still varies
        images = torch.randn(5, 3, 32, 32)
        torch.testing.assert_close(plan(images).logits, case.model(images).logits)


def _gpt2_default_dropout(device: str):
    """GPT-2 as ``GPT2Config()`` builds it (sdpa, dropout 0.1), small; in train mode as constructed."""
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        return GPT2LMHeadModel(config)


@pytest.mark.parametrize("strategy", ["pipeline", "tensor"])
def test_plan_made_on_meta_loads_onto_an_eval_model_as_from_pretrained_returns_it(strategy, tmp_path):
    meta = _gpt2_default_dropout("meta")
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    plan = partition(meta, 2, (ids.to("meta"),), {"use_cache": False}, strategy=strategy, device="h100")
    path = plan.save(tmp_path / "plan.json")
    model = _gpt2_default_dropout("cpu").eval()
    loaded = load_plan(path, model, (ids,), {"use_cache": False})
    assert loaded.mesh == plan.mesh and len(loaded.stages) == len(plan.stages)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids, use_cache=False).logits)


def test_load_plan_names_the_first_parameter_that_differs(tmp_path):
    case = zoo.make("llama")
    path = partition(case.model, 2, case.args, case.kwargs, strategy="pipeline", device="h100").save(tmp_path / "p.json")
    other = zoo.make("llama", hidden=32)
    with pytest.raises(ValueError, match=r"parameter 'model.embed_tokens.weight' is float32\[1000, 32\], the plan's is "
                                         r"float32\[1000, 64\]"):
        load_plan(path, other.model, other.args, other.kwargs)
    deeper = zoo.make("llama", n_layers=3)
    with pytest.raises(ValueError, match=r"has parameters the plan does not, e.g. \['model.layers.2"):
        load_plan(path, deeper.model, deeper.args, deeper.kwargs)


def test_micro_batches_with_batch_norm_in_training_warn_that_statistics_change():
    case = zoo.make("small_cnn", batch=4, size=16)            # train mode: batch statistics
    with pytest.warns(UserWarning, match=r"normalises with batch statistics in training.*1/4 of the batch"):
        partition(case.model, 2, case.args, strategy="pipeline", device="h100", n_microbatches=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        partition(case.model.eval(), 2, case.args, strategy="pipeline", device="h100", n_microbatches=4)
