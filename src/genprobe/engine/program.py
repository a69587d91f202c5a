"""The fx program behind prefix reuse (:mod:`genprobe.engine.variants`): a traced model run node
by node, with parameter overrides, activation edits and a cache of the base run."""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.func import functional_call

from ..inputs import Inputs
from .edits import ActivationContext, ActivationFn


class Tracer(fx.Tracer):
    def __init__(self, leaves: frozenset[str]):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaves:
            return True
        # trace through a standard leaf when a module inside it needs its own call site
        inner = any(leaf.startswith(qualname + ".") for leaf in self.leaves) if qualname else False
        return super().is_leaf_module(m, qualname) and not inner


class Program:
    """A traced model, run node by node with parameter overrides and a cache of the base run."""

    def __init__(self, model: nn.Module, leaves: frozenset[str], alias: dict[str, str]):
        tracer = Tracer(leaves)
        graph = tracer.trace(model)
        self.gm = fx.GraphModule(tracer.root, graph)
        self.nodes = list(graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if not placeholders:
            raise fx.proxy.TraceError("the traced graph has no input")
        self.placeholders = placeholders
        self.defaults = {n: (n.args[0] if n.args else None) for n in placeholders}
        self.output = next(n for n in self.nodes if n.op == "output")
        modules = dict(self.gm.named_modules())
        self.module_keys: dict[fx.Node, list[tuple[str, str]]] = {}
        self.reads: dict[fx.Node, set[str]] = {}
        for n in self.nodes:
            if n.op == "call_module":
                mod = modules[n.target]
                local = list(mod.named_parameters(remove_duplicate=False)) + \
                    list(mod.named_buffers(remove_duplicate=False))
                pairs = [(ln, alias[f"{n.target}.{ln}"]) for ln, _ in local
                         if f"{n.target}.{ln}" in alias]
                self.module_keys[n] = pairs
                self.reads[n] = {c for _, c in pairs}
            elif n.op == "get_attr":
                self.reads[n] = {alias[n.target]} if n.target in alias else set()
        self.modules = modules
        self.pairs = {n: next(iter(n.users)) for n in self.nodes if self._foldable(n)}
        self._folded: dict[fx.Node, tuple[Tensor, Tensor]] = {}
        self.elementwise = {n: kind for n in self.nodes if (kind := self._elementwise_kind(n))}

    def _elementwise_kind(self, n: fx.Node) -> str | None:
        """``"relu"``/``"add"`` for a ReLU or a two-operand addition whose first operand is a node
        used by nothing else: run in place on that operand when its value is fresh memory."""
        if not n.args or not isinstance(n.args[0], fx.Node) or len(n.args[0].users) != 1:
            return None
        if (n.op == "call_module" and type(self.modules[n.target]) is nn.ReLU) or \
                (n.op == "call_function" and n.target in (torch.relu, nn.functional.relu)
                 and len(n.args) == 1) or (n.op == "call_method" and n.target == "relu" and len(n.args) == 1):
            return "relu"
        if n.op == "call_function" and n.target in (operator.add, torch.add) and len(n.args) == 2 \
                and not n.kwargs and n.args[1] is not n.args[0]:
            return "add"
        return None

    def _makes_fresh(self, n: fx.Node, acts: Mapping[str, ActivationFn]) -> bool:
        """Whether node `n`'s recomputed value is a newly allocated tensor nothing else holds."""
        if n.op == "call_module":
            return n.target not in acts and (n in self.elementwise or isinstance(
                self.modules[n.target], (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear,
                                         nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)))
        return n in self.elementwise

    def _foldable(self, n: fx.Node) -> bool:
        """A Conv2d call whose only user is an eval-mode BatchNorm2d call on its output alone."""
        if n.op != "call_module" or type(self.modules[n.target]) is not nn.Conv2d or len(n.users) != 1:
            return False
        bn_node = next(iter(n.users))
        if bn_node.op != "call_module" or bn_node.args != (n,) or bn_node.kwargs:
            return False
        bn = self.modules[bn_node.target]
        return (type(bn) is nn.BatchNorm2d and not bn.training and bn.running_mean is not None
                and bn.running_var is not None and bn.affine)

    def folded(self, conv_node: fx.Node, override: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(weight, bias) of the conv, edited by `override` where it is, with the following
        (unedited) BatchNorm folded in."""
        own = {ln: override[c] for ln, c in self.module_keys[conv_node] if c in override}
        if not own and conv_node in self._folded:
            return self._folded[conv_node]
        conv = self.modules[conv_node.target]
        bn = self.modules[self.pairs[conv_node].target]
        weight, bias = own.get("weight", conv.weight), own.get("bias", conv.bias)
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)            # (C_out,)
        bias = bias if bias is not None else torch.zeros_like(bn.running_mean)
        out = (weight * scale.view(-1, 1, 1, 1), (bias - bn.running_mean) * scale + bn.bias)
        if not own:
            self._folded[conv_node] = out
        return out

    def fusable(self, nodes: list[fx.Node], keys: set[str], acts: set[str]) -> set[fx.Node]:
        """Conv nodes of `nodes` whose conv→BN pair is recomputed and whose BatchNorm is not
        edited (the conv may be): folded there."""
        todo = set(nodes)
        return {c for c, b in self.pairs.items()
                if c in todo and b in todo and not self.reads[b] & keys
                and c.target not in acts}

    def affected(self, keys: set[str], act_modules: set[str]) -> list[fx.Node]:
        """Nodes to recompute for an edit, in graph (topological) order."""
        seeds = [n for n, r in self.reads.items() if r & keys]
        seeds += [n for n in self.nodes if n.op == "call_module" and n.target in act_modules]
        todo, seen = list(seeds), set(seeds)
        while todo:
            for user in todo.pop().users:
                if user not in seen:
                    seen.add(user)
                    todo.append(user)
        return sorted(seen, key=self.index.__getitem__)

    def run_node(self, n: fx.Node, get, override: Mapping[str, Tensor],
                 acts: Mapping[str, ActivationFn], ctx: ActivationContext):
        """Value of node `n`; `get(node)` gives input values; `override` maps edited canonical
        keys to their values (every other tensor is the private model's own: the base state)."""
        args = fx.node.map_arg(n.args, get)
        kwargs = fx.node.map_arg(n.kwargs, get)
        if n.op == "call_module":
            mod = self.modules[n.target]
            local = {ln: override[c] for ln, c in self.module_keys[n] if c in override}
            if local:
                out = functional_call(mod, local, tuple(args), dict(kwargs))
            else:
                out = mod(*args, **kwargs)
            fn = acts.get(n.target)
            return out if fn is None else fn(out, ctx)
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        if n.op == "call_method":
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        if n.op == "get_attr":
            for key in self.reads[n]:
                if key in override:
                    return override[key]
            obj = self.gm
            for part in n.target.split("."):
                obj = getattr(obj, part)
            return obj
        if n.op == "output":
            return args[0]
        raise RuntimeError(f"unexpected fx node op {n.op!r}")

    def has_call_site(self, module: str) -> bool:
        return any(n.op == "call_module" and n.target == module for n in self.nodes)

    def bind(self, x: Inputs) -> dict[fx.Node, Any]:
        """The graph's inputs for a batch `x`: a tensor is the first argument, a tuple the
        first arguments in order, a dict the arguments of those names; the rest keep their
        defaults. TypeError on a name the forward does not take."""
        env = dict(self.defaults)
        if isinstance(x, Tensor):
            env[self.placeholders[0]] = x
        elif isinstance(x, dict):
            named = {n.target: n for n in self.placeholders}
            for k, v in x.items():
                if k not in named:
                    raise TypeError(f"the traced forward takes no argument {k!r}")
                env[named[k]] = v
        else:
            if len(x) > len(self.placeholders):
                raise TypeError(f"the traced forward takes {len(self.placeholders)} arguments, got {len(x)}")
            env.update(zip(self.placeholders[:len(x)], x, strict=True))
        return env

    def run_base(self, x: Inputs) -> dict[fx.Node, Any]:
        env = self.bind(x)
        empty = ActivationContext(torch.empty(0, dtype=torch.long))
        for n in self.nodes:
            if n.op != "placeholder":
                env[n] = self.run_node(n, env.__getitem__, {}, {}, empty)
        return env

    def run_suffix(self, env, nodes: list[fx.Node], override, acts, ctx,
                   fused: set[fx.Node] = frozenset(), in_place: bool = False) -> Any:
        """Recompute `nodes` (the rest from `env`); conv nodes in `fused` run with their BN
        folded in, and the BN node then passes that value on. `in_place`: a ReLU or addition
        whose first operand is a fresh recomputed tensor with no other user overwrites it
        (same values, no new allocation; not under vmap)."""
        local: dict[fx.Node, Any] = {}
        fresh: set[fx.Node] = set()
        folded_bn = {self.pairs[c]: c for c in fused}

        def get(m):
            return local[m] if m in local else env[m]

        for n in nodes:
            if n in fused:
                w, b = self.folded(n, override)
                local[n] = self.modules[n.target]._conv_forward(get(n.args[0]), w, b)
                fresh.add(n)
            elif n in folded_bn:
                out = local[folded_bn[n]]
                fn = acts.get(n.target)
                local[n] = out if fn is None else fn(out, ctx)
                if fn is None:
                    fresh.add(n)
            elif in_place and n in self.elementwise and n.args[0] in fresh and (n.op != "call_module"
                                                                 or n.target not in acts):
                local[n] = self._in_place(n, local[n.args[0]], get)
                fresh.add(n)
            else:
                local[n] = self.run_node(n, get, override, acts, ctx)
                if self._makes_fresh(n, acts):
                    fresh.add(n)
        return get(self.output)

    def _in_place(self, n: fx.Node, first: Tensor, get) -> Tensor:
        if self.elementwise.get(n) == "relu":
            return first.relu_()
        if self.elementwise.get(n) == "add":
            other = get(n.args[1]) if isinstance(n.args[1], fx.Node) else n.args[1]
            if isinstance(other, (Tensor, int, float)) and torch.result_type(first, other) == first.dtype \
                    and (not isinstance(other, Tensor)
                         or torch.broadcast_shapes(first.shape, other.shape) == first.shape):
                return first.add_(other)
            return first + other
        raise RuntimeError(f"node {n.name} has no in-place form")
