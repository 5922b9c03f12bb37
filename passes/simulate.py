"""Simulate one forward (or training step) of a captured graph on fake tensors.

Reads a captured ``GraphModule`` and example inputs; writes nothing on the graph
(``passes.estimate`` turns the result into ``node.meta[COST]``). Nothing is computed
and no activation memory is allocated: every tensor is a ``FakeTensor``.

What is measured, per graph node and for the whole step:

* FLOPs of every ATen call that actually dispatches, forward and backward (the
  backward ops autograd runs are charged to the forward node that created their
  autograd node), with ``flops.count_flops``;
* memory: every storage the step allocates is followed from allocation to release
  (views share their base's storage and are counted once), so the peak is that of the
  step as eager PyTorch would run it: parameters, buffers, inputs, optimizer state,
  activations saved for backward, gradients and transient buffers. Matmul kernels copy
  inputs BLAS cannot read in place (strides neither row- nor column-major, e.g. the
  zero-stride gradient of ``logits.sum()``) into buffers they free before returning: no
  dispatched op shows those, so they are charged as transients from a table
  (``_KERNEL_COPIES``), as the allocator sees them.

The optimizer's state is created by one warm-up step before measuring, so the
measured step is a steady-state one (``zero_grad(set_to_none=True)`` semantics:
gradients are allocated during backward).
"""
from __future__ import annotations

import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from .capture import _inputs_on_model_device
from ._util import fetch_attr, flatten_inputs
from .flops import count_flops, has_flop_rule

__all__ = ["simulate", "simulate_module", "StepTrace", "NodeTrace", "OPTIMIZERS"]

aten = torch.ops.aten

LOSS = "(loss)"
OPTIMIZER = "(optimizer)"
OTHER = "(autograd)"
MODULE = "(module)"

OPTIMIZERS = ("sgd", "adamw")

_SKIP = {torch.ops.prim.device.default, torch.ops.aten.detach.default,
         torch.ops.profiler._record_function_enter_new.default, torch.ops.profiler._record_function_exit._RecordFunction}


@dataclass
class NodeTrace:
    """What one graph node did in the simulated step."""
    flops: int = 0
    backward_flops: int = 0
    output_bytes: int = 0      # new storage its forward allocated (views: 0)
    saved_bytes: int = 0       # of that, storage kept for backward
    flop_output_bytes: int = 0  # of output_bytes, outputs of ops that compute (FLOPs > 0): what a checkpoint keeps
    backward_bytes: int = 0    # storage its backward allocated (gradients, temporaries)


@dataclass
class StepTrace:
    """The simulated step: peak memory with its breakdown, and per-node traces."""
    peak_bytes: int
    peak_phase: str                     # "forward", "backward" or "optimizer"
    peak_node: str                      # node (or "(loss)", "(optimizer)") running at the peak
    peak_breakdown: dict[str, int]      # bytes by category at the peak
    resident: dict[str, int]            # bytes by category before the step starts
    nodes: dict[str, NodeTrace]
    uncounted_ops: Counter = field(default_factory=Counter)  # ops with no FLOP rule that may compute
    total_flops: int = 0
    total_backward_flops: int = 0


class _Tracker(TorchDispatchMode):
    """Follows every storage from allocation to release and charges ops to the current owner."""

    def __init__(self, nodes: dict[str, NodeTrace]):
        super().__init__()
        self.nodes = nodes
        self.owner = "(input)"
        self.phase = "setup"
        self.allocs: dict[int, list] = {}      # storage key -> [nbytes, category, owner, weakref]
        self.live = Counter()                   # category -> bytes
        self.live_total = 0
        self.peak = 0
        self.peak_at = ("setup", "(input)")
        self.peak_breakdown: dict[str, int] = {}
        self.autograd_owner: dict[int, str] = {}   # id(autograd Node) -> graph node name
        self.grad_fns: list = []                   # those autograd Nodes, kept alive while ids are used
        self.uncounted = Counter()
        self.total_flops = 0
        self.total_backward_flops = 0

    # -- storages -------------------------------------------------------------------------
    def track(self, t: torch.Tensor, category: str, owner: str | None = None) -> int | None:
        """Start following ``t``'s storage; returns its bytes if it is new."""
        st = t.untyped_storage()
        key = st._cdata
        if key in self.allocs:
            return None
        nbytes = st.nbytes()
        ref = weakref.ref(st, lambda _r, k=key: self._free(k))
        self.allocs[key] = [nbytes, category, owner or self.owner, ref]
        self.live[category] += nbytes
        self.live_total += nbytes
        self._check_peak()
        return nbytes

    def _check_peak(self, transient: int = 0) -> None:
        """Record a new peak; ``transient`` bytes are live only while the current op runs."""
        if self.live_total + transient > self.peak:
            self.peak = self.live_total + transient
            self.peak_at = (self.phase, self.owner)
            self.peak_breakdown = {k: v for k, v in self.live.items() if v}
            if transient:
                self.peak_breakdown["temporary"] = self.peak_breakdown.get("temporary", 0) + transient

    def _free(self, key: int) -> None:
        alloc = self.allocs.pop(key, None)
        if alloc is not None:
            self.live[alloc[1]] -= alloc[0]
            self.live_total -= alloc[0]

    def track_resident(self, params, buffers, inputs, opt) -> dict[str, int]:
        """Follow what exists before the step (parameters, buffers, inputs, optimizer state); its bytes by category."""
        for category, tensors in (("param", params), ("buffer", buffers), ("input", inputs),
                                  ("optimizer", tree_flatten(opt.state_dict()["state"])[0] if opt else [])):
            for t in tensors:
                if isinstance(t, torch.Tensor):
                    self.track(t, category)
        return {k: v for k, v in self.live.items() if v}

    def saving(self):
        """A ``saved_tensors_hooks`` context charging each storage autograd saves (once) to its creator."""
        saved_keys: set[int] = set()

        def pack(t):
            key = t.untyped_storage()._cdata
            alloc = self.allocs.get(key)
            if alloc is not None and alloc[1] == "activation" and key not in saved_keys:
                saved_keys.add(key)   # views of one storage are saved once
                self.nodes.setdefault(alloc[2], NodeTrace()).saved_bytes += alloc[0]
            return t

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    def recategorize(self, t: torch.Tensor, category: str) -> None:
        alloc = self.allocs.get(t.untyped_storage()._cdata)
        if alloc is not None and alloc[1] != category:
            self.live[alloc[1]] -= alloc[0]
            self.live[category] += alloc[0]
            alloc[1] = category

    # -- ops ------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _SKIP:
            return out
        owner = self.owner
        if self.phase == "backward":
            node = torch._C._current_autograd_node()
            owner = self.autograd_owner.get(id(node), OTHER) if node is not None else OTHER
        trace = self.nodes.setdefault(owner, NodeTrace())
        flops = count_flops(func, args, kwargs, out)
        if flops == 0 and not has_flop_rule(func) and _may_compute(func):
            self.uncounted[str(func.overloadpacket)] += 1
        category = "activation" if self.phase == "forward" else "temporary"
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                nbytes = self.track(t, category, owner) or 0
                if self.phase == "forward":
                    trace.output_bytes += nbytes
                    trace.flop_output_bytes += nbytes if flops else 0
                elif self.phase == "backward":
                    trace.backward_bytes += nbytes
        if func in _KERNEL_COPIES:
            # freed before the op returns: no dispatched op ever sees these copies
            self._check_peak(_KERNEL_COPIES[func](*args, **kwargs))
        if self.phase == "backward":
            trace.backward_flops += flops
            self.total_backward_flops += flops
        elif self.phase == "forward":
            trace.flops += flops
            self.total_flops += flops
        return out


_ZERO_FLOP_WORDS = (
    "view", "reshape", "permute", "transpose", "expand", "squeeze", "unsqueeze", "slice", "select",
    "split", "chunk", "cat", "stack", "copy", "clone", "_to_copy", "to", "detach", "alias", "t",
    "contiguous", "empty", "zeros", "ones", "full", "arange", "scalar_tensor", "new_", "fill",
    "index", "gather", "scatter", "embedding", "where", "masked", "sum", "mean", "amax", "amin",
    "max", "min", "argmax", "argmin", "softmax", "log_softmax", "layer_norm", "batch_norm",
    "group_norm", "rms_norm", "dropout", "native_dropout", "bernoulli", "pool", "nll_loss", "var",
    "std", "cumsum", "tril", "triu", "flip", "roll", "pad", "constant_pad", "topk", "sort", "_assert",
    "lift_fresh", "sym_", "unbind", "diff", "bitwise", "logical", "upsample", "repeat", "zero",
    "lerp", "addcmul", "addcdiv", "_foreach", "_fused", "threshold_backward", "silu_backward",
    "gelu_backward", "tanh_backward", "sigmoid_backward", "nonzero", "unique", "any", "all", "norm",
    "one_hot", "mse_loss", "cross_entropy", "binary_cross_entropy", "smooth_l1", "huber", "rand",
    "randn", "randint", "normal", "uniform", "linspace", "ne", "eq", "lt", "le", "gt", "ge", "item",
    "_local_scalar_dense", "as_strided", "narrow", "movedim", "unfold", "fold", "im2col", "col2im",
    "_unsafe", "_softmax", "_log_softmax", "native_layer_norm", "native_batch_norm", "_native_batch_norm",
    "native_group_norm", "_fused_rms_norm", "mul", "add", "sub", "div", "neg", "pow", "exp", "log",
    "sqrt", "rsqrt", "sin", "cos", "tanh", "sigmoid", "relu", "gelu", "silu", "erf", "abs", "sign",
    "clamp", "hardtanh", "leaky_relu", "elu", "mish", "softplus", "round", "floor", "ceil", "reciprocal",
    "isnan", "isinf", "maximum", "minimum", "rsub", "bucketize", "searchsorted", "histc", "bincount",
    "index_add", "index_put", "index_select", "masked_fill", "masked_scatter", "put", "take", "prod",
    "logsumexp", "_safe_softmax", "_pdist", "cdist", "trace", "diag", "eye", "outer",
)


def _may_compute(func) -> bool:
    """An op outside the counted families that is not elementwise or data movement."""
    if torch.Tag.pointwise in getattr(func, "tags", ()):
        return False
    name = func.overloadpacket.__name__.removesuffix("_")
    base = name.removesuffix("_backward").removesuffix("_backward_data")
    return not any(base == w or base.startswith(w) for w in _ZERO_FLOP_WORDS)


def _blas_ready(t: torch.Tensor) -> bool:
    """A matrix BLAS takes as it is: one of its last two strides is 1 and the other spans a row or column."""
    (rows, cols), (s0, s1) = t.shape[-2:], t.stride()[-2:]
    return (s1 == 1 and s0 >= max(1, cols)) or (s0 == 1 and s1 >= max(1, rows))


def _matrix_copies(*matrices: torch.Tensor) -> int:
    """Bytes of the contiguous copies a matmul kernel makes of inputs BLAS cannot read in place
    (CPU ``addmm_impl_cpu_``, CUDA ``prepare_matrix_for_cublas``): e.g. the gradient of
    ``logits.sum()``, an expanded scalar with zero strides, is copied whole in the LM head's backward."""
    return sum(m.numel() * m.element_size() for m in matrices if not _blas_ready(m))


def _batched_matrix_copies(*batches: torch.Tensor) -> int:
    """The same for ``bmm``: the CPU kernel copies one batch entry at a time, CUDA the whole batch."""
    return sum(b.numel() * b.element_size() // (b.shape[0] if b.is_cpu and b.shape[0] else 1)
               for b in batches if not _blas_ready(b))


# op -> bytes its kernel allocates and frees internally, from the op's arguments
_KERNEL_COPIES: dict[Any, Callable[..., int]] = {
    aten.mm.default: lambda a, b, **_: _matrix_copies(a, b),
    aten.addmm.default: lambda bias, a, b, **_: _matrix_copies(a, b),
    aten.bmm.default: lambda a, b, **_: _batched_matrix_copies(a, b),
    aten.baddbmm.default: lambda bias, a, b, **_: _batched_matrix_copies(a, b),
}


class _FakeRunner(torch.fx.Interpreter):
    """Runs the graph on fake values, marking which node owns each allocation."""

    def __init__(self, gm: torch.fx.GraphModule, attrs: dict[str, torch.Tensor], tracker: _Tracker):
        super().__init__(gm, garbage_collect_values=True)
        self.attrs = attrs
        self.tracker = tracker

    def get_attr(self, target, args, kwargs):
        if target in self.attrs:
            return self.attrs[target]
        return super().get_attr(target, args, kwargs)

    def call_function(self, target, args, kwargs):
        return _call_target(target, args, kwargs)

    def run_node(self, node: torch.fx.Node) -> Any:
        self.tracker.owner = node.name
        result = super().run_node(node)
        if torch.is_grad_enabled():
            self._claim_grad_fns(node.name, result)
        return result

    def _claim_grad_fns(self, name: str, result: Any) -> None:
        """Charge every autograd node this graph node created to it (linear makes t + addmm)."""
        stack = [t.grad_fn for t in tree_flatten(result)[0] if isinstance(t, torch.Tensor) and t.grad_fn]
        owners = self.tracker.autograd_owner
        while stack:
            fn = stack.pop()
            if fn is None or id(fn) in owners:
                continue
            owners[id(fn)] = name
            self.tracker.grad_fns.append(fn)   # alive until the step ends, so ids stay unique
            stack.extend(next_fn for next_fn, _ in fn.next_functions)


def _call_target(target: Callable, args: tuple, kwargs: dict) -> Any:
    """``target(*args, **kwargs)`` for a ``call_function`` node, with attention on meta tensors run
    as the fused kernel a real device runs. Interpreters of graphs that may run on meta call this
    (``recompute``'s checkpointed regions: a torch-function mode does not reach their recomputation,
    which the autograd engine runs)."""
    if target is torch.ops.aten.scaled_dot_product_attention.default and _meta_attention(args, kwargs):
        return _fused_attention(*args, **kwargs)
    return target(*args, **kwargs)


def _meta_attention(args, kwargs) -> bool:
    """On the meta device sdpa falls back to its math decomposition, which saves the
    seq x seq scores for backward; every real device (CUDA flash/efficient, CPU flash)
    runs a fused kernel that saves only the output and a per-row logsumexp."""
    return isinstance(args[0], torch.Tensor) and args[0].is_meta


def _fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None,
                     enable_gqa=False):
    # grouped KV heads (enable_gqa) go in as they are: the fused kernels broadcast them, copying nothing
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        # as sdpa itself does before picking a kernel: an additive float mask, which backward saves
        neg_inf = torch.scalar_tensor(float("-inf"), dtype=query.dtype, device=query.device)
        attn_mask = torch.where(attn_mask, torch.scalar_tensor(0.0, dtype=query.dtype, device=query.device), neg_inf)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]


class _FusedAttentionOnMeta(torch.overrides.TorchFunctionMode):
    """Eager forwards: the same fused-attention substitution the graph interpreter makes on meta tensors."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention and _meta_attention(args, kwargs):
            return _fused_attention(*args, **kwargs)
        return func(*args, **kwargs)


def simulate(gm: torch.fx.GraphModule, args: tuple, kwargs: dict, *, training: bool,
             optimizer: str | None = None, loss_fn: Callable | None = None,
             foreach: bool = False) -> StepTrace:
    """Run one forward (``training=False``, under ``no_grad``) or one training step on fakes.

    Args:
        gm: a captured graph (``passes.capture``).
        args, kwargs: example inputs, real or fake, any device (meta included).
        training: simulate forward + backward (+ optimizer step) instead of a forward.
        optimizer: None, "sgd" or "adamw" (PyTorch defaults; state created by a warm-up step).
        loss_fn: called on the model's outputs; None sums every floating-point output.
        foreach: use the optimizer's multi-tensor kernels (the default on GPUs).

    Returns:
        A ``StepTrace``.
    """
    if optimizer is not None and optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is not supported; use one of {OPTIMIZERS} or None")
    # a graph captured from a meta model has meta constants baked in: its inputs go to meta too
    args, kwargs = _inputs_on_model_device(gm, args, kwargs)
    nodes: dict[str, NodeTrace] = {n.name: NodeTrace() for n in gm.graph.nodes}
    tracker = _Tracker(nodes)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        attrs, params, buffers = _fake_state(gm, fake_mode, training)
        flat_inputs = [fake_mode.from_tensor(t) if isinstance(t, torch.Tensor) else t
                       for t in _flat_inputs(gm, args, kwargs)]
        opt = _warm_optimizer(optimizer, params, foreach) if training else None
    resident = tracker.track_resident(params, buffers, flat_inputs, opt)
    # a training step needs autograd even when the caller is inside torch.no_grad()
    with fake_mode, tracker, torch.set_grad_enabled(training):
        _run_step(_graph_forward(gm, attrs, tracker, flat_inputs), params, tracker, training, opt, loss_fn)
    return _trace(tracker, resident)


def simulate_module(model: torch.nn.Module, args: tuple, kwargs: dict, *, training: bool,
                    optimizer: str | None = None, loss_fn: Callable | None = None,
                    foreach: bool = False) -> StepTrace:
    """The same step as ``simulate``, run through the module's own ``forward`` (eager Python) on fakes.

    Eager Python keeps a tensor bound to a local variable alive until the name is rebound or the
    function returns, where a captured graph frees every value after its last use; this run's
    peak is the eager one. Allocations are charged to "(module)", not to graph nodes. Raises
    whatever the forward raises on fake tensors (e.g. ``Tensor.item()`` in the model's code).
    """
    if optimizer is not None and optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is not supported; use one of {OPTIMIZERS} or None")
    args, kwargs = _inputs_on_model_device(model, args, kwargs)
    tracker = _Tracker({})
    tracker.owner = MODULE
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        state, params, buffers, _ = _fake_module_state(model, fake_mode, training)
        args, kwargs = tree_map(lambda v: fake_mode.from_tensor(v) if isinstance(v, torch.Tensor) else v,
                                (tuple(args), dict(kwargs)))
        opt = _warm_optimizer(optimizer, params, foreach) if training else None
    resident = tracker.track_resident(params, buffers, tree_flatten((args, kwargs))[0], opt)

    def forward():
        with _FusedAttentionOnMeta():
            return torch.func.functional_call(model, state, args, kwargs)

    with fake_mode, tracker, torch.set_grad_enabled(training):
        _run_step(forward, params, tracker, training, opt, loss_fn)
    return _trace(tracker, resident)


def _trace(tracker: _Tracker, resident: dict) -> StepTrace:
    return StepTrace(
        peak_bytes=tracker.peak, peak_phase=tracker.peak_at[0], peak_node=tracker.peak_at[1],
        peak_breakdown=tracker.peak_breakdown, resident=resident, nodes=tracker.nodes,
        uncounted_ops=tracker.uncounted, total_flops=tracker.total_flops,
        total_backward_flops=tracker.total_backward_flops)


def _run_step(forward: Callable[[], Any], params, tracker, training, opt, loss_fn) -> None:
    """Forward (``forward()`` returns the model's outputs), then loss, backward and optimizer step."""
    tracker.phase = "forward"
    if not training:
        with torch.no_grad():
            forward()
        return
    hooks = [p.register_post_accumulate_grad_hook(lambda p: tracker.recategorize(p.grad, "grad"))
             for p in params if p.requires_grad]
    with tracker.saving():
        outputs = forward()
    tracker.owner = LOSS
    loss = step_loss(outputs, loss_fn)
    del outputs
    tracker.phase = "backward"
    loss.backward()
    del loss
    for h in hooks:
        h.remove()
    if opt is not None:
        tracker.phase, tracker.owner = "optimizer", OPTIMIZER
        opt.step()


def _graph_forward(gm, attrs, tracker, flat_inputs) -> Callable[[], Any]:
    def forward():
        runner = _FakeRunner(gm, attrs, tracker)
        # the interpreter rebuilds the model's output structure (the graph's out_spec)
        outputs = runner.run(*flat_inputs)
        runner.env.clear()   # drop the interpreter's references
        return outputs
    return forward


def step_loss(outputs: Any, loss_fn: Callable | None) -> torch.Tensor:
    """``loss_fn(outputs)``, or the sum of every floating-point output that needs a gradient."""
    if loss_fn is not None:
        loss = loss_fn(outputs)
        if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
            raise ValueError(f"loss_fn must return a one-element tensor, got {type(loss).__name__}"
                             f"{' of shape ' + str(tuple(loss.shape)) if isinstance(loss, torch.Tensor) else ''}")
        return loss
    floats = [t for t in tree_flatten(outputs)[0]
              if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
    if not floats:
        raise ValueError("the model returns no floating-point output that depends on trainable parameters, "
                         "so a training step has no backward; pass loss_fn or training=False")
    loss = floats[0].sum()
    for t in floats[1:]:
        loss = loss + t.sum()
    return loss


def _flat_inputs(gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> list:
    info = getattr(gm.graph._codegen, "pytree_info", None)
    return flatten_inputs(info.in_spec if info is not None else None, args, kwargs,
                          names=[n.target for n in gm.graph.nodes if n.op == "placeholder"])


def _fake_module_state(module: torch.nn.Module, fake_mode: FakeTensorMode, training: bool):
    """Fake copies of a module's parameters and buffers by every name (tied ones stay one tensor):
    (name -> fake, fake parameters, fake buffers, id(real) -> fake)."""
    state, params, buffers, seen = {}, [], [], {}
    for name, t in list(module.named_parameters(remove_duplicate=False)) + \
            list(module.named_buffers(remove_duplicate=False)):
        if id(t) not in seen:
            fake = fake_mode.from_tensor(t)
            if isinstance(t, torch.nn.Parameter):
                fake.requires_grad_(training and t.requires_grad)
                params.append(fake)
            else:
                buffers.append(fake)
            seen[id(t)] = fake
        state[name] = seen[id(t)]
    return state, params, buffers, seen


def _fake_state(gm: torch.fx.GraphModule, fake_mode: FakeTensorMode, training: bool):
    """Fake copies of the graph's parameters, buffers and other tensor constants it reads."""
    attrs, params, buffers, seen = _fake_module_state(gm, fake_mode, training)
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target not in attrs:
            value = fetch_attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                attrs[node.target] = seen.get(id(value)) or fake_mode.from_tensor(value)
    return attrs, params, buffers


def _warm_optimizer(optimizer: str | None, params: list[torch.Tensor], foreach: bool | None = None):
    """An optimizer whose state exists, as after earlier steps (``foreach=None``: PyTorch's default)."""
    trainable = [p for p in params if p.requires_grad]
    if optimizer is None or not trainable:
        return None
    if optimizer == "sgd":
        opt = torch.optim.SGD(trainable, lr=1e-3, foreach=foreach)
    else:
        opt = torch.optim.AdamW(trainable, lr=1e-3, foreach=foreach)
    for p in trainable:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt
