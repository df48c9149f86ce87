"""Adapters: any JAX model -> one object the engine uses.

Every entry point of ``tdu_jax`` (importance, metrics, fine-tuning, unlearning) talks to a
model through two pure functions over pytrees:

* ``model.apply(params, state, images) -> logits``: evaluation mode (BatchNorm running
  statistics, no dropout);
* ``model.train_apply(params, state, images, rng) -> (logits, new_state)``: training mode
  (BatchNorm batch statistics, dropout drawing from ``rng``).

``params`` is a nested dict of arrays (what units, importance, masks and decay act on);
``state`` is everything else the model carries (BatchNorm statistics), opaque to the engine.
Three adapters build such an object, and ``as_model`` turns a bare Linen module into one:

* ``from_linen(module, variables)`` for a Linen module with any call signature (``train=``,
  ``training=``, ``deterministic=``, ``use_running_average=`` or none, detected or given);
* ``from_nnx(model)`` for an NNX module (``nnx.split`` / ``nnx.merge``);
* ``from_function(apply_fn, variables)`` for plain functions
  ``apply_fn(variables, images) -> logits``.

Adapters are frozen dataclasses compared by value (module, graphdef, functions), so the
jitted work the engine caches per model is reused when an equal adapter is built again.

Example::

    model, params, state = adapters.from_linen(MyCNN(), variables)
    logits = model.apply(params, state, images)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

PyTree = Any

# Call keywords that switch a Linen module between modes: name -> (eval value, train value).
MODE_KEYWORDS = {
    "train": (False, True),
    "training": (False, True),
    "is_training": (False, True),
    "deterministic": (True, False),
    "use_running_average": (True, False),
}


@runtime_checkable
class Model(Protocol):
    """What the engine needs from a model (see the module docstring)."""

    def apply(self, params: PyTree, state: PyTree, images: jax.Array) -> jax.Array: ...

    def train_apply(
        self, params: PyTree, state: PyTree, images: jax.Array, rng: jax.Array
    ) -> tuple[jax.Array, PyTree]: ...


def to_dict(tree: PyTree) -> PyTree:
    """A FrozenDict (or any nested mapping of arrays) as plain nested dicts."""
    if isinstance(tree, flax.core.FrozenDict):
        tree = flax.core.unfreeze(tree)
    if isinstance(tree, Mapping):
        return {k: to_dict(v) for k, v in tree.items()}
    return tree


def _call_keywords(module: nn.Module) -> tuple[tuple[str, Any], tuple[str, Any]]:
    """(eval kwargs, train kwargs) detected from ``module.__call__``'s parameter names."""
    try:
        names = inspect.signature(type(module).__call__).parameters
    except (TypeError, ValueError):
        return (), ()
    found = [(n, MODE_KEYWORDS[n]) for n in names if n in MODE_KEYWORDS]
    return (
        tuple((n, v[0]) for n, v in found),
        tuple((n, v[1]) for n, v in found),
    )


@dataclasses.dataclass(frozen=True)
class LinenModel:
    """A Linen module as a ``Model``.

    Attributes:
      module: the (unbound) Linen module.
      eval_kwargs: call keywords for evaluation mode, e.g. ``(("train", False),)``.
      train_kwargs: call keywords for training mode.
      mutable: collections updated in training mode (e.g. ``("batch_stats",)``).
      rng_names: PRNG streams given to training-mode calls (dropout).
      state_key: None: ``state`` is a dict of collections (``{"batch_stats": ...}``);
        a name: ``state`` is that one collection's tree (the ``(params, batch_stats)``
        convention of ``tdu_jax.models``).
    """

    module: nn.Module
    eval_kwargs: tuple[tuple[str, Any], ...] = ()
    train_kwargs: tuple[tuple[str, Any], ...] = ()
    mutable: tuple[str, ...] = ()
    rng_names: tuple[str, ...] = ("dropout",)
    state_key: str | None = None

    def variables(self, params: PyTree, state: PyTree) -> dict:
        if self.state_key is not None:
            return {"params": params, **({self.state_key: state} if state else {})}
        return {"params": params, **(state or {})}

    def apply(self, params, state, images):
        return self.module.apply(self.variables(params, state), images, **dict(self.eval_kwargs))

    def train_apply(self, params, state, images, rng):
        rngs = {name: jax.random.fold_in(rng, i) for i, name in enumerate(self.rng_names)}
        kwargs = dict(self.train_kwargs)
        variables = self.variables(params, state)
        if not self.mutable:
            return self.module.apply(variables, images, rngs=rngs, **kwargs), state
        logits, updates = self.module.apply(
            variables, images, rngs=rngs, mutable=list(self.mutable), **kwargs
        )
        if self.state_key is not None:
            return logits, updates.get(self.state_key, {})
        return logits, {**(state or {}), **to_dict(updates)}


def from_linen(
    module: nn.Module,
    variables: PyTree,
    *,
    eval_kwargs: Mapping[str, Any] | None = None,
    train_kwargs: Mapping[str, Any] | None = None,
    rng_names: tuple[str, ...] = ("dropout",),
) -> tuple[LinenModel, PyTree, PyTree]:
    """Wraps a Linen module with any call signature.

    Args:
      module: the Linen module.
      variables: its variables (``module.init(...)``), a dict or FrozenDict.
      eval_kwargs: call keywords for evaluation; default: detected from ``__call__``
        (``train=False``, ``training=False``, ``deterministic=True``,
        ``use_running_average=True``; none when the call takes none of them).
      train_kwargs: call keywords for training; default: the detected opposites.
      rng_names: PRNG streams for training-mode calls.

    Returns:
      ``(model, params, state)``: params = ``variables["params"]`` and state = the other
      collections, both plain dicts.
    """
    variables = to_dict(variables)
    if "params" not in variables:
        raise ValueError(f"variables have no 'params' collection; got {sorted(variables)}")
    detected_eval, detected_train = _call_keywords(module)
    model = LinenModel(
        module,
        tuple(eval_kwargs.items()) if eval_kwargs is not None else detected_eval,
        tuple(train_kwargs.items()) if train_kwargs is not None else detected_train,
        tuple(sorted(k for k in variables if k != "params")),
        tuple(rng_names),
    )
    state = {k: v for k, v in variables.items() if k != "params"}
    return model, variables["params"], state


def as_model(model: Any) -> Model:
    """A ``Model`` for ``model``: adapters pass through; a bare Linen module gets the
    ``(params, batch_stats)`` convention with its call keywords detected."""
    if isinstance(model, nn.Module):
        eval_kw, train_kw = _call_keywords(model)
        return LinenModel(model, eval_kw, train_kw, ("batch_stats",), state_key="batch_stats")
    if isinstance(model, Model):
        return model
    raise TypeError(
        f"expected a Linen module or an adapter (from_linen, from_nnx, from_function); got "
        f"{type(model).__name__}. Wrap an NNX module with tdu_jax.from_nnx(model) and a plain "
        "function with tdu_jax.from_function(apply_fn, variables)."
    )


@dataclasses.dataclass(frozen=True)
class FunctionModel:
    """Plain functions as a ``Model``.

    Attributes:
      apply_fn: ``apply_fn(variables, images) -> logits`` in evaluation mode, where
        ``variables = {"params": params, **state}``.
      train_apply_fn: optional ``train_apply_fn(variables, images, rng) -> (logits,
        new_state)``; default: ``apply_fn`` with ``state`` unchanged.
    """

    apply_fn: Callable
    train_apply_fn: Callable | None = None

    def apply(self, params, state, images):
        return self.apply_fn({"params": params, **(state or {})}, images)

    def train_apply(self, params, state, images, rng):
        if self.train_apply_fn is None:
            return self.apply(params, state, images), state
        return self.train_apply_fn({"params": params, **(state or {})}, images, rng)


def from_function(
    apply_fn: Callable, variables: PyTree, train_apply_fn: Callable | None = None
) -> tuple[FunctionModel, PyTree, PyTree]:
    """Wraps ``apply_fn(variables, images) -> logits`` (see ``FunctionModel``).

    Returns:
      ``(model, params, state)`` with params = ``variables["params"]``.
    """
    variables = to_dict(variables)
    if "params" not in variables:
        raise ValueError(f"variables have no 'params' entry; got {sorted(variables)}")
    state = {k: v for k, v in variables.items() if k != "params"}
    return FunctionModel(apply_fn, train_apply_fn), variables["params"], state


@dataclasses.dataclass(frozen=True)
class NNXModel:
    """An NNX module as a ``Model``, through ``nnx.merge`` of a graphdef per mode.

    ``params`` and ``state`` are plain dicts (``nnx.to_pure_dict``); the module's own RNG
    state is replaced, in training mode, by keys folded from ``rng`` (one per stream).
    """

    eval_graphdef: Any
    train_graphdef: Any
    params_treedef: Any
    state_treedef: Any
    rng_treedef: Any
    rng_leaves: tuple = dataclasses.field(compare=False, hash=False, repr=False)

    def _merge(self, graphdef, params, state, rng=None):
        from flax import nnx

        p = jax.tree.unflatten(self.params_treedef, jax.tree.leaves(params))
        s = jax.tree.unflatten(self.state_treedef, jax.tree.leaves(state))
        leaves = list(self.rng_leaves)
        if rng is not None:
            if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
                rng = jax.random.wrap_key_data(rng)
            for i, leaf in enumerate(leaves):
                if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                    leaves[i] = jax.random.fold_in(rng, i)
        rngs = jax.tree.unflatten(self.rng_treedef, leaves)  # fresh Variables in this trace
        return nnx.merge(graphdef, p, rngs, s)

    def apply(self, params, state, images):
        return self._merge(self.eval_graphdef, params, state)(images)

    def train_apply(self, params, state, images, rng):
        from flax import nnx

        module = self._merge(self.train_graphdef, params, state, rng)
        logits = module(images)
        _, _, _, new_state = nnx.split(module, nnx.Param, nnx.RngState, ...)
        return logits, nnx.to_pure_dict(new_state)


def from_nnx(model: Any) -> tuple[NNXModel, PyTree, PyTree]:
    """Wraps an NNX module (left unchanged: its modes are set on clones).

    Args:
      model: an ``nnx.Module`` whose ``__call__(images)`` returns logits; evaluation and
        training modes come from ``.eval()`` / ``.train()``.

    Returns:
      ``(model, params, state)``: ``nnx.Param`` variables and all other non-RNG variables
      (BatchNorm statistics) as plain dicts.
    """
    from flax import nnx

    if not isinstance(model, nnx.Module):
        raise TypeError(f"from_nnx needs an nnx.Module; got {type(model).__name__}")
    ev, tr = nnx.clone(model), nnx.clone(model)
    ev.eval()
    tr.train()
    eval_graphdef, params, rng_state, state = nnx.split(ev, nnx.Param, nnx.RngState, ...)
    train_graphdef, *_ = nnx.split(tr, nnx.Param, nnx.RngState, ...)
    rng_leaves, rng_treedef = jax.tree.flatten(rng_state)
    adapter = NNXModel(
        eval_graphdef,
        train_graphdef,
        jax.tree.structure(params),
        jax.tree.structure(state),
        rng_treedef,
        tuple(rng_leaves),
    )
    return adapter, nnx.to_pure_dict(params), nnx.to_pure_dict(state)


def linen_bn_pairs(model: LinenModel, params: PyTree, state: PyTree, images: jax.Array) -> dict:
    """BatchNorm pairing discovered from the computation of a Linen model.

    A conv/dense layer and a BatchNorm are paired when the BatchNorm's input is exactly the
    layer's output (same traced value), whatever the layers are called (``Conv_0`` ->
    ``BatchNorm_0`` included). Runs one abstract forward pass (``jax.eval_shape``).

    Args:
      model: a ``LinenModel`` (or a bare Linen module, see ``as_model``).
      params, state: its variables.
      images: a batch of inputs (only shapes and dtypes are used).

    Returns:
      ``{layer name: BatchNorm name}`` with names as ``a/b`` paths in ``params``, ready for
      ``units.enumerate_units(..., bn_pairs=...)``.
    """
    model = as_model(model)
    if not isinstance(model, LinenModel):
        raise TypeError("linen_bn_pairs needs a Linen model; pass bn_pairs explicitly otherwise")
    pairs: dict[str, str] = {}

    def forward(p, s, x):
        outputs = []  # (layer path, output value) of every kernel layer call

        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            module = context.module
            if context.method_name != "__call__" or module.scope is None:
                return out
            if isinstance(module, nn.BatchNorm) and args:
                for path, value in outputs:
                    if value is args[0]:
                        pairs[path] = "/".join(module.path)
            elif isinstance(module, nn.Conv | nn.Dense | nn.ConvTranspose):
                outputs.append(("/".join(module.path), out))
            return out

        with nn.intercept_methods(interceptor):
            return model.apply(p, s, x)

    jax.eval_shape(forward, params, state, jnp.asarray(images))
    return pairs


def _as_array(images: Any) -> jax.Array:
    return jnp.asarray(images)


@functools.cache
def _dataset_preprocess(dataset: str) -> Callable:
    from tdu_jax import data

    return functools.partial(data.to_float, dataset=data.check_dataset(dataset))


def preprocess_fn(dataset: str | None = None, preprocess: Callable | None = None) -> Callable:
    """The function turning stored images into model inputs.

    Args:
      dataset: ``mnist`` / ``cifar10``: uint8 images normalised by ``data.to_float``.
      preprocess: any ``preprocess(images) -> inputs`` (jit-able, hashable).

    Returns:
      ``preprocess``, the dataset's normalisation, or (neither given) ``jnp.asarray``:
      images are already model inputs (e.g. float). The same object for equal arguments,
      so jitted steps keyed on it do not retrace.
    """
    if dataset is not None and preprocess is not None:
        raise ValueError("give dataset (uint8 images normalised for it) or preprocess, not both")
    if dataset is not None:
        return _dataset_preprocess(dataset)
    return preprocess if preprocess is not None else _as_array


@contextlib.contextmanager
def _recording_calls(classes: tuple[type, ...], record: Callable) -> Any:
    """Temporarily wraps ``cls.__call__`` of ``classes`` to ``record(module, input, output)``.

    Class-level and restored on exit: used only inside one abstract trace (not thread-safe).
    """
    originals = {cls: cls.__dict__["__call__"] for cls in classes if "__call__" in cls.__dict__}

    def wrap(original):
        def call(self, x, *args, **kwargs):
            out = original(self, x, *args, **kwargs)
            record(self, x, out)
            return out

        return call

    try:
        for cls, original in originals.items():
            cls.__call__ = wrap(original)
        yield
    finally:
        for cls, original in originals.items():
            cls.__call__ = original


def nnx_bn_pairs(model: NNXModel, params: PyTree, state: PyTree, images: jax.Array) -> dict:
    """BatchNorm pairing discovered from the computation of an NNX model.

    As ``linen_bn_pairs``: an ``nnx.BatchNorm`` whose input is exactly the output of an
    ``nnx.Conv`` / ``nnx.Linear`` / ``nnx.ConvTranspose`` is paired with it. Runs one
    abstract forward pass, recording those modules' calls.

    Returns:
      ``{layer name: BatchNorm name}`` with ``a/b`` paths in ``params``.
    """
    from flax import nnx

    pairs: dict[str, str] = {}

    def forward(p, s, x):
        module = model._merge(model.eval_graphdef, p, s)
        paths = {id(node): "/".join(map(str, path)) for path, node in nnx.iter_graph(module)}
        outputs = []  # (layer path, output value)

        def record(called, inputs, out):
            if isinstance(called, nnx.BatchNorm):
                for path, value in outputs:
                    if value is inputs and id(called) in paths:
                        pairs[path] = paths[id(called)]
            elif id(called) in paths:
                outputs.append((paths[id(called)], out))

        classes = (nnx.Conv, nnx.Linear, nnx.ConvTranspose, nnx.BatchNorm)
        with _recording_calls(classes, record):
            return module(x)

    jax.eval_shape(forward, params, state, jnp.asarray(images))
    return pairs


def head_input(model: Any, params: PyTree, state: PyTree, inputs: jax.Array) -> jax.Array:
    """The input of a Linen or NNX model's output layer, in evaluation mode.

    The output layer is the last ``Dense`` / ``Conv`` (``nnx.Linear`` / ``nnx.Conv``) called in
    the forward pass; its output must have the logits' shape (a model that transforms the
    head's output, or ends in another layer, is refused). Traceable: jit it.

    Args:
      model: a Linen module, ``LinenModel`` or ``NNXModel``; anything else (a plain
        function) cannot be looked into and raises ValueError: give its features yourself.
      params, state: the model's variables.
      inputs: a batch of model inputs (B, ...).

    Returns:
      The output layer's input, e.g. (B, D) for a dense head.
    """
    adapted = as_model(model)
    calls = []  # (input, output) of every kernel layer call, in call order
    if isinstance(adapted, LinenModel):

        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            kernel_layer = isinstance(context.module, nn.Dense | nn.Conv)
            if context.method_name == "__call__" and kernel_layer and args:
                calls.append((args[0], out))
            return out

        with nn.intercept_methods(interceptor):
            logits = adapted.apply(params, state, inputs)
    elif isinstance(adapted, NNXModel):
        from flax import nnx

        module = adapted._merge(adapted.eval_graphdef, params, state)
        record = lambda _, x, out: calls.append((x, out))
        with _recording_calls((nnx.Linear, nnx.Conv), record):
            logits = module(inputs)
    else:
        raise ValueError(
            f"{type(adapted).__name__} cannot be looked into; pass features_fn(params, state, "
            "inputs) -> (N, D) giving the input of its output layer"
        )
    if not calls or calls[-1][1].shape != logits.shape:
        found = calls[-1][1].shape if calls else "no Dense/Conv call"
        raise ValueError(
            f"the last Dense/Conv layer's output ({found}) is not the logits {logits.shape}; "
            "pass features_fn(params, state, inputs) -> (N, D) giving the output layer's input"
        )
    return calls[-1][0]


def find_bn_pairs(model: Any, params: PyTree, state: PyTree, images: jax.Array) -> dict:
    """BatchNorm pairs ``{layer: BatchNorm}`` from the computation of a Linen or NNX model.

    Args:
      model: a Linen module or ``LinenModel`` (``linen_bn_pairs``) or an ``NNXModel``
        (``nnx_bn_pairs``); a plain-function model must name its pairs explicitly.
      params, state: the model's variables.
      images: a batch of inputs (only shapes and dtypes are used).

    Returns:
      The pairing, ready for ``units.enumerate_units(..., bn_pairs=...)``.
    """
    if isinstance(model, NNXModel):
        return nnx_bn_pairs(model, params, state, images)
    if isinstance(model, nn.Module | LinenModel):
        return linen_bn_pairs(model, params, state, images)
    raise TypeError(
        f"cannot discover BatchNorm pairs of a {type(model).__name__}; pass "
        "bn_pairs={'layer': 'its_batchnorm', ...} to enumerate_units explicitly"
    )
