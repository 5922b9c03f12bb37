"""``compile_backend``: a ``torch.compile`` backend that costs (and rewrites) every captured graph.

Reads the graphs Dynamo captures (torch-level, parameters as placeholders, *real*
example tensors) and, through ``aot_autograd``, the ATen forward and backward graphs
(fake example tensors); writes one ``GraphRecord`` per graph into ``backend.graphs``
and ``node.meta[COST]`` on the graphs it costs. Then hands each graph to Inductor
(``compile_fx`` on a copy: it mutates what it is given) or runs it eagerly.

What a backend sees, per call of Dynamo (one per graph break, one per recompile):

* phase ``"dynamo"``: the torch-level graph, costed with ``passes.estimate`` on fakes
  of the example inputs (a training step when any input requires grad and grad is on:
  forward and backward FLOPs, peak memory). ``passes`` run here, before autograd, so a
  rewrite changes the forward and the backward alike.
* phases ``"forward"``, ``"backward"`` (training) or ``"inference"``: the ATen graphs
  autograd produced, costed as one forward each. ``aot_passes`` run here: where a
  recomputation decision (what the forward saves, what the backward recomputes) acts.

Writing a pass: a function ``gm -> gm`` (returning None means "mutated in place").
Mutate ``gm.graph``; the backend lints and recompiles after every pass.

>>> import torch
>>> from passes.backend import compile_backend
>>> def relu_to_gelu(gm):
...     for node in gm.graph.nodes:
...         if node.op == "call_function" and node.target in (torch.relu, torch.nn.functional.relu):
...             node.target, node.kwargs = torch.nn.functional.gelu, {}   # relu's `inplace` is not gelu's
...     return gm
>>> backend = compile_backend([relu_to_gelu], compiler="eager")
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
>>> x = torch.randn(2, 4)
>>> out = torch.compile(model, backend=backend)(x)
>>> torch.allclose(out, torch.nn.functional.gelu(model[0](x)))
True
>>> backend.graphs[0].passes
('relu_to_gelu',)

``torch.compile(model, backend="fxpart")`` uses the registered default (Inductor);
its records are in ``passes.backend.DEFAULT.graphs`` (``"fxpart_eager"``: no Inductor).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx

from ._keys import PHASE
from ._util import format_bytes, format_count, format_seconds, table

__all__ = ["compile_backend", "FxpartBackend", "GraphRecord", "register_backends", "DEFAULT"]

log = logging.getLogger(__name__)

COMPILERS = ("inductor", "eager")

Pass = Callable[[torch.fx.GraphModule], "torch.fx.GraphModule | None"]


@dataclass(frozen=True)
class GraphRecord:
    """What the backend measured on one graph (``*_flops``, ``peak_bytes``: on the example inputs)."""
    index: int                 # Dynamo graph number (graph breaks and recompiles count up)
    phase: str                 # "dynamo", "forward", "backward" or "inference"
    n_nodes: int
    input_shapes: tuple
    flops: int = 0
    backward_flops: int = 0    # phase "dynamo" of a training step only
    peak_bytes: int = 0
    time_s: float = 0.0
    passes: tuple[str, ...] = ()
    error: str = ""            # why costing failed (the graph still compiled)

    def to_dict(self) -> dict:
        return asdict(self)


class FxpartBackend:
    """A ``torch.compile`` backend; ``graphs`` holds a ``GraphRecord`` per graph it saw.

    Build one with ``compile_backend``. It keeps state (the records), hence a class.
    """

    def __init__(self, passes: Sequence[Pass] = (), *, compiler: str = "inductor",
                 aot_passes: Sequence[Pass] = (), device: Any = None, analyze: bool = True):
        if compiler not in COMPILERS:
            raise ValueError(f"compiler={compiler!r} is not supported; use one of {COMPILERS}")
        for fn in (*passes, *aot_passes):
            if not callable(fn):
                raise TypeError(f"a pass must be a function gm -> gm, got {fn!r}")
        self.passes, self.aot_passes = tuple(passes), tuple(aot_passes)
        self.compiler, self.device, self.analyze = compiler, device, analyze
        self.graphs: list[GraphRecord] = []
        self._n_dynamo = 0

    # -- the backend -------------------------------------------------------------------------
    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        index = self._n_dynamo
        self._n_dynamo += 1
        gm = copy.deepcopy(gm)      # Dynamo keeps its graph; ours is rewritten
        gm.meta[PHASE] = "dynamo"
        training = torch.is_grad_enabled() and any(
            isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)
        gm, applied = self._run_passes(gm, self.passes)
        self._record(gm, example_inputs, index, "dynamo", applied, training=training)
        if self.compiler == "inductor":
            import torch._functorch.config as functorch_config
            from torch._inductor.compile_fx import compile_fx
            # a cache hit would skip our inner compile, and with it the forward/backward records
            with functorch_config.patch(enable_autograd_cache=False):
                return compile_fx(gm, example_inputs, inner_compile=self._inductor_inner(index),
                                  config_patches={"fx_graph_cache": False})
        from torch._dynamo.backends.common import aot_autograd
        from functorch.compile import make_boxed_func

        def compiler_for(phase):
            def compile_graph(aot_gm, aot_inputs):
                return make_boxed_func(self._aot_graph(aot_gm, aot_inputs, index, phase).forward)
            return compile_graph
        return aot_autograd(fw_compiler=compiler_for("forward"), bw_compiler=compiler_for("backward"),
                            inference_compiler=compiler_for("inference"))(gm, example_inputs)

    def _inductor_inner(self, index: int) -> Callable:
        from torch._inductor.compile_fx import compile_fx_inner

        def inner(aot_gm, aot_inputs, **kwargs):
            phase = "backward" if kwargs.get("is_backward") else \
                "inference" if kwargs.get("is_inference") else "forward"
            return compile_fx_inner(self._aot_graph(aot_gm, aot_inputs, index, phase), aot_inputs, **kwargs)
        return inner

    def _aot_graph(self, gm: torch.fx.GraphModule, example_inputs: list, index: int,
                   phase: str) -> torch.fx.GraphModule:
        gm.meta[PHASE] = phase
        gm, applied = self._run_passes(gm, self.aot_passes)
        self._record(gm, example_inputs, index, phase, applied, training=False)
        return gm

    # -- passes and analyses ---------------------------------------------------------------
    def _run_passes(self, gm: torch.fx.GraphModule, passes: Sequence[Pass]) -> tuple[torch.fx.GraphModule, tuple]:
        """Run ``passes`` in order; returns the resulting graph and the names of the passes applied."""
        names = []
        for fn in passes:
            name = getattr(fn, "__name__", type(fn).__name__)
            try:
                out = fn(gm)
            except Exception as exc:
                raise RuntimeError(f"pass {name} failed on {gm.meta.get(PHASE)} graph: {exc}") from exc
            if out is not None and out is not gm:
                if not isinstance(out, torch.fx.GraphModule):
                    raise TypeError(f"pass {name} returned {type(out).__name__}; a pass returns the GraphModule "
                                    f"(or None after mutating it in place)")
                out.meta.setdefault(PHASE, gm.meta.get(PHASE))
                gm = out
            gm.graph.lint()
            gm.recompile()
            names.append(name)
        return gm, tuple(names)

    def _record(self, gm, example_inputs, index: int, phase: str, applied: tuple, *, training: bool) -> None:
        shapes = tuple(tuple(int(_hint(d)) for d in t.shape) for t in example_inputs if isinstance(t, torch.Tensor))
        n_nodes = len(gm.graph.nodes)
        if not self.analyze:
            self.graphs.append(GraphRecord(index, phase, n_nodes, shapes, passes=applied))
            return
        try:
            est = _estimate_graph(gm, example_inputs, training=training, device=self.device)
        except Exception as exc:  # noqa: BLE001 - costing never stops a compile; the record says why
            log.debug("costing %s graph %d failed", phase, index, exc_info=True)
            self.graphs.append(GraphRecord(index, phase, n_nodes, shapes, passes=applied,
                                           error=f"{type(exc).__name__}: {str(exc).strip()[:200]}"))
            return
        # a graph recompiled with dynamic shapes has symbolic sizes in its meta: record their hints
        self.graphs.append(GraphRecord(index, phase, n_nodes, shapes, int(_hint(est.flops)),
                                       int(_hint(est.backward_flops)), int(_hint(est.peak_bytes)),
                                       float(_hint(est.time_s)), applied))

    # -- reading the records ----------------------------------------------------------------
    def report(self) -> str:
        """A table with one row per graph seen."""
        rows = [(r.index, r.phase, r.n_nodes, " ".join(str(s) for s in r.input_shapes[:2]),
                 format_count(r.flops), format_count(r.backward_flops), format_bytes(r.peak_bytes),
                 format_seconds(r.time_s), ",".join(r.passes) or "-", r.error or "") for r in self.graphs]
        return table(["graph", "phase", "nodes", "inputs", "FLOPs", "bwd FLOPs", "peak", "time", "passes", "error"],
                     rows, align="rlrlrrrrll")

    def reset(self) -> None:
        """Forget the records (call ``torch._dynamo.reset()`` too to recompile)."""
        self.graphs.clear()
        self._n_dynamo = 0

    def __repr__(self) -> str:
        return (f"FxpartBackend(compiler={self.compiler!r}, passes={[getattr(p, '__name__', p) for p in self.passes]}, "
                f"{len(self.graphs)} graphs)")


def compile_backend(passes: Sequence[Pass] = (), *, compiler: str = "inductor", aot_passes: Sequence[Pass] = (),
                    device: Any = None, analyze: bool = True) -> FxpartBackend:
    """A ``torch.compile`` backend that costs every captured graph, runs ``passes``, then compiles.

    Args:
        passes: functions ``gm -> gm`` run in order on each torch-level graph Dynamo captures
            (before autograd: a rewrite changes the forward and the backward alike).
        compiler: ``"inductor"`` (``compile_fx`` on a copy) or ``"eager"`` (``aot_autograd``,
            graphs run as they are).
        aot_passes: functions ``gm -> gm`` run on each ATen forward / backward / inference graph
            after autograd (``gm.meta["fxpart.phase"]`` says which).
        device: the ``DeviceSpec`` (or name) times are estimated for; None: this machine.
        analyze: cost the graphs (off: only record sizes and passes).

    Returns:
        An ``FxpartBackend``: pass it as ``torch.compile(model, backend=...)``; afterwards
        ``backend.graphs`` lists a ``GraphRecord`` per graph and ``backend.report()`` prints them.

    Raises:
        ValueError: an unknown ``compiler``. TypeError: a pass that is not callable.

    Example:
        >>> backend = compile_backend(compiler="eager")
        >>> _ = torch.compile(torch.nn.Linear(8, 4), backend=backend)(torch.randn(2, 8))
        >>> [(r.phase, r.flops) for r in backend.graphs]
        [('dynamo', 128), ('forward', 128)]
    """
    return FxpartBackend(passes, compiler=compiler, aot_passes=aot_passes, device=device, analyze=analyze)


def _hint(d):
    """A concrete number for a (possibly symbolic) size or cost: its hint on a recompile with dynamic shapes."""
    if isinstance(d, (torch.SymInt, torch.SymFloat)):
        return d.node.hint if d.node.hint is not None else d.node.shape_env.size_hint(d.node.expr)
    return d


def _concrete_fakes(example_inputs: list) -> tuple:
    """Fakes of the inputs with concrete shapes (real tensors from Dynamo, symbolic fakes from AOT)."""
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    out = []
    with unset_fake_temporarily():
        for t in example_inputs:
            if isinstance(t, torch.SymInt):
                out.append(int(_hint(t)))
            elif isinstance(t, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in (*t.shape, *t.stride())):
                with mode:
                    fake = torch.empty_strided([_hint(d) for d in t.shape], [_hint(d) for d in t.stride()],
                                               dtype=t.dtype, device=t.device)
                out.append(fake.requires_grad_(t.requires_grad))
            elif isinstance(t, torch.Tensor) and not isinstance(t, torch._subclasses.FakeTensor):
                # detached: an input that is an earlier graph's output (a graph break) has history
                out.append(mode.from_tensor(t.detach()).requires_grad_(t.requires_grad))
            else:
                out.append(t)
    return tuple(out)


def _estimate_graph(gm: torch.fx.GraphModule, example_inputs: list, *, training: bool, device: Any):
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from .estimate import estimate
    fakes = _concrete_fakes(example_inputs)
    with unset_fake_temporarily():   # Inductor calls us inside its fake mode; the estimate makes its own
        return estimate(gm, fakes, device=device, training=training)


def register_backends() -> None:
    """Register ``backend="fxpart"`` (Inductor) and ``"fxpart_eager"``; again is a no-op (notebook re-runs)."""
    from torch._dynamo.backends.registry import register_backend
    known = set(torch._dynamo.list_backends(exclude_tags=()))
    for name, backend in (("fxpart", _fxpart), ("fxpart_eager", _fxpart_eager)):
        if name not in known:
            register_backend(backend, name=name)


# the registry keeps these functions; they read the module's globals at call time, so a reloaded
# module's DEFAULT is the one that records
def _fxpart(gm, example_inputs):
    return DEFAULT(gm, example_inputs)


def _fxpart_eager(gm, example_inputs):
    return DEFAULT_EAGER(gm, example_inputs)


DEFAULT = compile_backend()                        # backend="fxpart"; records in DEFAULT.graphs
DEFAULT_EAGER = compile_backend(compiler="eager")  # backend="fxpart_eager"
