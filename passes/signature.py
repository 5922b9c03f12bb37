"""``InputSignature``: what a captured graph accepts, input by input and dimension by dimension.

Reads a captured graph's placeholders (their fake values: static sizes, or symbols where the
capture kept a dimension dynamic) and the capture's range constraints; writes nothing on the
graph (``capture`` stores the signature in ``gm.meta[SIGNATURE]``). Runners and plans call
``flatten`` before running a graph: it fills the keyword constants the capture baked in
(``use_cache=False``) when a caller leaves them out, and turns a batch the graph cannot run
into an error that names the input, the dimension and the size the graph needs, instead of a
guard's ``AssertionError`` deep inside the graph.

>>> sig = InputSignature.of(gm)                                      # doctest: +SKIP
>>> sig.flatten((ids,), {})                                          # doctest: +SKIP
[tensor(...), False]
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx

__all__ = ["InputSignature", "InputSpec", "BatchError"]


class BatchError(ValueError):
    """Inputs a plan or graph cannot run: the message names the input, the dimension and what it needs."""


@dataclass(frozen=True)
class InputSpec:
    """One flat input: a tensor (dtype and one entry per dim: a size, or a symbol name) or a constant."""
    name: str
    kind: str                               # "tensor" or "constant"
    dtype: str = ""
    dims: tuple = ()                        # int (static) or str (symbol, or an expression of symbols)
    example: tuple = ()                     # the example batch's sizes
    value: Any = None                       # a constant's value (bool, int, float, str, None)

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "dtype": self.dtype, "dims": list(self.dims),
                "example": list(self.example), "value": self.value}


@dataclass(frozen=True)
class InputSignature:
    """The inputs of a captured graph, in its flat (pytree) order.

    ``ranges`` maps a symbol to its allowed ``(min, max)`` (max None: unbounded). ``static_reason``
    says why no dimension is dynamic when the capture could not keep any.
    """
    inputs: tuple[InputSpec, ...]
    in_spec: Any = None
    arg_names: tuple[str, ...] = ()         # the model's positional parameter names (keywords may name them)
    ranges: dict = field(default_factory=dict)
    static_reason: str = ""

    @classmethod
    def of(cls, gm: torch.fx.GraphModule, *, model: torch.nn.Module | None = None, ranges: dict | None = None,
           static_reason: str = "") -> "InputSignature":
        """The signature of ``gm``'s placeholders (``model`` names the positional inputs)."""
        info = getattr(gm.graph._codegen, "pytree_info", None)
        in_spec = info.in_spec if info else None
        names = _flat_names(in_spec, model)
        specs = []
        for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
            name = names[i] if names and i < len(names) else node.name
            val = node.meta.get("val", node.meta.get("example_value"))
            if isinstance(val, torch.Tensor):
                specs.append(InputSpec(name, "tensor", str(val.dtype).removeprefix("torch."),
                                       tuple(_dim(d) for d in val.shape), tuple(_hint(d) for d in val.shape)))
            else:
                specs.append(InputSpec(name, "constant", value=val if _plain(val) else repr(val)))
        # export assumes a dynamic size is at least 2 while tracing (sizes 0 and 1 specialise); the
        # graph it returns is not specialised to that and runs size 1 (a batch of one, one token)
        found = {str(k): (min(_bound(v.lower) or 0, 1), _bound(v.upper)) for k, v in (ranges or {}).items()}
        return cls(tuple(specs), in_spec, _positional_names(model), found, static_reason)

    # -- what it accepts ---------------------------------------------------------------------
    @property
    def symbols(self) -> list[str]:
        """Symbols of the dynamic dimensions, in order of first appearance."""
        seen = []
        for spec in self.inputs:
            for d in spec.dims:
                if isinstance(d, str) and d.isidentifier() and d not in seen:
                    seen.append(d)
        return seen

    @property
    def is_dynamic(self) -> bool:
        return bool(self.symbols)

    def describe(self) -> str:
        """One line per input: name, dtype and sizes (symbols for dynamic dims, with their ranges)."""
        lines = []
        for spec in self.inputs:
            if spec.kind == "constant":
                lines.append(f"{spec.name} = {spec.value!r} (constant)")
                continue
            dims = ", ".join(str(d) if isinstance(d, int) else f"{d}{self._range_text(d)}" for d in spec.dims)
            lines.append(f"{spec.name}: {spec.dtype}[{dims}]")
        if self.static_reason:
            lines.append(f"(static dimensions: {self.static_reason})")
        return "\n".join(lines)

    def _range_text(self, symbol: str) -> str:
        low, high = self.ranges.get(symbol, (0, None))
        return f" in [{low}, {high if high is not None else 'inf'}]" if low or high is not None else ""

    # -- checking and flattening ------------------------------------------------------------
    def flatten(self, args: tuple, kwargs: dict) -> list:
        """Flat inputs for the graph from ``model``-style ``(args, kwargs)``, checked.

        Keyword constants the capture baked in may be left out (they are filled in); a keyword
        naming a positional parameter is moved to its place.

        Raises:
            BatchError: a missing or unexpected input, a constant with another value, a tensor
                of another dtype or rank, a static size that differs, or a dynamic size out of
                its range or inconsistent with another input's.
        """
        args, kwargs = self._complete(tuple(args), dict(kwargs))
        if self.in_spec is not None:
            import torch.fx._pytree as fx_pytree
            try:
                flat = list(fx_pytree.tree_flatten_spec((args, kwargs), self.in_spec))
            except Exception as exc:   # noqa: BLE001 - re-raised with what the graph expects
                raise BatchError(f"the inputs do not have the structure the graph was captured with ({exc}); "
                                 f"it takes:\n{self.describe()}") from None
        else:
            flat = list(args) + list(kwargs.values())
        self.check(flat)
        return flat

    def _complete(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self.in_spec is None or self.in_spec.num_children != 2:
            return args, kwargs
        n_args = self.in_spec.child(0).num_children
        for i, name in enumerate(self.arg_names[len(args):n_args], start=len(args)):
            if name in kwargs:
                args = args + (kwargs.pop(name),)
        spec_kwargs = self.in_spec.child(1)
        keys = list(spec_kwargs.context or [])
        unexpected = [k for k in kwargs if k not in keys]
        if unexpected:
            raise BatchError(f"unexpected keyword input(s) {unexpected}: the graph was captured with keywords "
                             f"{keys}; capture (partition) again with the keywords you will pass")
        constants = self._constant_kwargs(n_args, keys, spec_kwargs)
        for key in keys:
            if key not in kwargs:
                if key not in constants:
                    raise BatchError(f"missing keyword input {key!r}: the graph was captured with it as a tensor "
                                     f"input; pass {key}=... as in the example")
                kwargs[key] = constants[key]
        return args, {k: kwargs[k] for k in keys}

    def _constant_kwargs(self, n_args: int, keys: list, spec_kwargs) -> dict:
        """Keyword inputs made only of constants: their captured values (a leaf each)."""
        flat_index = self.in_spec.child(0).num_leaves
        out = {}
        for key, child in zip(keys, spec_kwargs.children()):
            leaves = self.inputs[flat_index:flat_index + child.num_leaves]
            if child.num_leaves == 1 and leaves and leaves[0].kind == "constant":
                out[key] = leaves[0].value
            flat_index += child.num_leaves
        return out

    def check(self, flat: list) -> None:
        """Raise ``BatchError`` for the first flat input the graph cannot take (see ``flatten``)."""
        if len(flat) != len(self.inputs):
            raise BatchError(f"the graph takes {len(self.inputs)} inputs, got {len(flat)}:\n{self.describe()}")
        bound: dict[str, tuple[int, str]] = {}
        for spec, value in zip(self.inputs, flat):
            if spec.kind == "constant":
                if isinstance(value, torch.Tensor) or (value != spec.value and _plain(value)):
                    raise BatchError(f"{spec.name}={value!r}, but the graph was captured with {spec.name}="
                                     f"{spec.value!r}: constants are baked into the graph; partition (capture) "
                                     f"again with the value you need")
                continue
            self._check_tensor(spec, value, bound)
        for spec, value in zip(self.inputs, flat):     # dims that are expressions of symbols
            for d, (want, got) in enumerate(zip(spec.dims, value.shape if spec.kind == "tensor" else ())):
                if isinstance(want, str) and not want.isidentifier():
                    need = _evaluate(want, {k: v for k, (v, _) in bound.items()})
                    if need is not None and need != got:
                        raise BatchError(f"{spec.name} dim {d} has size {got}, but the graph needs {want} = {need}")

    def _check_tensor(self, spec: InputSpec, value: Any, bound: dict) -> None:
        if not isinstance(value, torch.Tensor):
            raise BatchError(f"{spec.name} must be a tensor ({spec.dtype}, {len(spec.dims)} dims), got "
                             f"{type(value).__name__}")
        if str(value.dtype).removeprefix("torch.") != spec.dtype:
            raise BatchError(f"{spec.name} has dtype {value.dtype}, but the graph was captured with {spec.dtype}; "
                             f"convert it (or partition with an example of that dtype)")
        if value.dim() != len(spec.dims):
            raise BatchError(f"{spec.name} has {value.dim()} dims {tuple(value.shape)}, but the graph takes "
                             f"{len(spec.dims)} ({self._shape_text(spec)})")
        for d, (want, got) in enumerate(zip(spec.dims, value.shape)):
            if isinstance(want, int):
                if want != got:
                    why = f" ({self.static_reason})" if self.static_reason else \
                        " (the model's code fixes it, e.g. a weight's size or a reshape)"
                    raise BatchError(f"{spec.name} dim {d} has size {got}, but this dimension is static in the "
                                     f"captured graph: it needs {want}{why}")
            elif want.isidentifier():
                low, high = self.ranges.get(want, (0, None))
                if got < low or (high is not None and got > high):
                    raise BatchError(f"{spec.name} dim {d} has size {got}, out of the range [{low}, "
                                     f"{high if high is not None else 'inf'}] the model accepts for it")
                if want in bound and bound[want][0] != got:
                    raise BatchError(f"{spec.name} dim {d} has size {got} but {bound[want][1]} has {bound[want][0]}: "
                                     f"the graph needs them equal")
                bound.setdefault(want, (int(got), f"{spec.name} dim {d}"))

    def _shape_text(self, spec: InputSpec) -> str:
        return "[" + ", ".join(str(d) for d in spec.dims) + "]"

    def bind(self, flat: list) -> dict[str, int]:
        """Symbol -> size for a flat batch (checked with ``check`` first)."""
        out = {}
        for spec, value in zip(self.inputs, flat):
            if spec.kind == "tensor":
                for want, got in zip(spec.dims, value.shape):
                    if isinstance(want, str) and want.isidentifier():
                        out[want] = int(got)
        return out

    # -- saving ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"inputs": [s.to_dict() for s in self.inputs], "arg_names": list(self.arg_names),
                "ranges": {k: list(v) for k, v in self.ranges.items()}, "static_reason": self.static_reason}


def _dim(d) -> int | str:
    if isinstance(d, int):
        return d
    expr = d.node.expr
    return int(expr) if expr.is_number else str(expr)


def _hint(d) -> int:
    if isinstance(d, int):
        return d
    value = d.node.hint
    return int(value if value is not None else d.node.shape_env.size_hint(d.node.expr))


def _bound(x) -> int | None:
    """An int range bound, None for infinity (sympy's oo, torch's int_oo)."""
    if getattr(x, "is_finite", True) is False or getattr(x, "is_infinite", False):
        return None
    try:
        return int(x)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None


def _plain(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _evaluate(expr: str, values: dict[str, int]) -> int | None:
    parsed = sympy.sympify(expr)
    if {str(s) for s in parsed.free_symbols} - set(values):
        return None
    return int(parsed.subs({sympy.Symbol(k): v for k, v in values.items()}))


def _positional_names(model) -> tuple[str, ...]:
    if model is None:
        return ()
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return ()
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def _flat_names(in_spec, model) -> list[str] | None:
    """A readable name per flat input of an export ``in_spec`` (``(args, kwargs)``): ``input_ids``,
    ``past[0]``, ``use_cache``."""
    if in_spec is None or in_spec.num_children != 2:
        return None
    positional = _positional_names(model)
    names = []
    args_spec, kwargs_spec = in_spec.children()
    for i, child in enumerate(args_spec.children()):
        head = positional[i] if i < len(positional) else f"args[{i}]"
        names += [head] if child.num_leaves == 1 and child.is_leaf() else \
            [f"{head}[{j}]" for j in range(child.num_leaves)]
    for key, child in zip(kwargs_spec.context or [], kwargs_spec.children()):
        names += [str(key)] if child.num_leaves == 1 and child.is_leaf() else \
            [f"{key}[{j}]" for j in range(child.num_leaves)]
    return names
