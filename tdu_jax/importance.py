"""Exact ablation importance: what each unit contributes to accuracy on a sample.

For every unit u, ``accuracy_drop[u] = acc(theta, S) - acc(theta without u, S)`` in
percentage points and ``loss_increase[u]`` the rise of mean cross-entropy, with
BatchNorm in inference mode. Three exact strategies, chosen per layer:

* ``delta`` (weight units of chain stages, e.g. LeNet): removing one weight of
  output channel c changes only channel c of the layer's pre-activation, by
  ``-w * x``. That change is pushed through the channel-wise post-op and the next
  layer restricted to input channel c, then the rest of the model is recomputed.
  No parameters are copied.
* ``mask`` (filter units): the layer's (or its paired BatchNorm's) output channel is
  multiplied by zero through ``flax.linen.intercept_methods``, which equals zeroing
  the filter's parameters; only the stage that holds it and later stages run, and
  everything upstream of the layer is computed once per chunk, not per unit.
* ``copy`` (any other unit): the stage's parameters are copied with the unit zeroed
  and the stage plus the rest of the model is recomputed.

Stages come from ``model.stages()`` (see ``tdu_jax.models.stages``); any other model
is one stage (the generic path): a Linen module with any call signature, or any
adapter from ``tdu_jax.adapters`` (NNX, plain functions), whose filter units are then
scored by ``copy`` (zeroing the filter and its paired BatchNorm channel). Work runs in
jitted chunks of ``unit_chunk`` units x ``sample_batch`` images. The jitted functions
are cached per (model, layer, loss), so a second call with the same shapes traces
nothing. ``naive_importance`` is the obvious loop kept as the reference.

Example (fast path for a staged model; the generic path for any Flax module)::

    spec = units.enumerate_units(params, "weight")
    imp = ablation_importance(LeNet5(), params, {}, images, labels, spec)
    imp = ablation_importance(MyFlaxModel(), params, batch_stats, images, labels,
                              units.enumerate_units(params, "filter"))
"""

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tdu_jax import adapters
from tdu_jax import units as units_lib
from tdu_jax.models import layers as chain
from tdu_jax.models.stages import Stage, stage_variables

PyTree = Any
Progress = Callable[[int, int, float], None]  # (units done, units total, seconds elapsed)


class Importance(NamedTuple):
    """Per-unit ablation scores, aligned with ``units`` (global unit indices)."""

    units: np.ndarray  # int64 (U,)
    accuracy_drop: np.ndarray  # float64 (U,), percentage points
    loss_increase: np.ndarray  # float64 (U,), rise of the mean loss (cross-entropy: nats)
    base_accuracy: float  # percent on the sample
    base_loss: float
    sample_size: int
    seconds: float


LossFn = Callable[[jax.Array, jax.Array], jax.Array]  # (logits_BxC, labels_B) -> loss_B


def _as_staged(model: Any, batch_stats: PyTree) -> tuple[Any, PyTree]:
    """A Linen adapter of a staged model back to (module, batch_stats) for the fast path."""
    if (
        isinstance(model, adapters.LinenModel)
        and hasattr(model.module, "stages")
        and dict(model.eval_kwargs) == {"train": False}
    ):
        if model.state_key == "batch_stats":
            return model.module, batch_stats
        if model.state_key is None and set(batch_stats or {}) <= {"batch_stats"}:
            return model.module, (batch_stats or {}).get("batch_stats", {})
    return model, batch_stats


def _pieces(model: Any) -> tuple[Stage, ...]:
    """The model's stages; any other model is one stage named None holding its adapter."""
    if isinstance(model, nn.Module) and hasattr(model, "stages"):
        return tuple(model.stages())
    return (Stage(None, adapters.as_model(model)),)


def _is_linen(module: Any) -> bool:
    return isinstance(module, nn.Module | adapters.LinenModel)


def _sub(tree: PyTree, name: str | None) -> PyTree:
    if name is None:
        return tree
    return tree.get(name, {}) if tree else {}


def _apply_piece(piece: Stage, params, batch_stats, x):
    if piece.name is None:  # the whole model, through its adapter
        return piece.module.apply(params, batch_stats, x)
    return piece.module.apply(stage_variables(piece, params, batch_stats), x, train=False)


def _apply_from(pieces, params, batch_stats, x, start: int):
    for piece in pieces[start:]:
        x = _apply_piece(piece, params, batch_stats, x)
    return x


def cross_entropy_loss(logits_BxC: jax.Array, labels_B: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy in nats (the default loss), float32 (B,)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxC.astype(jnp.float32), labels_B)


def _scores(logits_BxC, labels_B, valid_B, loss_fn: LossFn | None = None):
    """(correct count, summed loss) over valid examples."""
    correct = jnp.sum((jnp.argmax(logits_BxC, -1) == labels_B) * valid_B)
    loss = (loss_fn or cross_entropy_loss)(logits_BxC, labels_B).astype(jnp.float32)
    return correct, jnp.sum(loss * valid_B)


# ---------------------------------------------------------------- strategies
def _mask_logits(pieces, s, target, channels, params, batch_stats, x, channel):
    """Logits with output channel ``channel`` of module ``target`` (path in piece s) zeroed."""
    keep = jnp.arange(channels) != channel

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name == "__call__" and module.scope is not None:
            if module.path == target:
                out = out * keep.astype(out.dtype)
        return out

    with nn.intercept_methods(interceptor):
        y = _apply_piece(pieces[s], params, batch_stats, x)
    return _apply_from(pieces, params, batch_stats, y, s + 1)


def _replace(tree: PyTree, path: Sequence[Any], fn: Callable) -> PyTree:
    """``tree`` with the node at ``path`` replaced by ``fn(node)`` (copies along the path)."""
    if not path:
        return fn(tree)
    return {**tree, path[0]: _replace(tree[path[0]], path[1:], fn)}


def _zero_weight(layer: dict, local) -> dict:
    kernel = layer["kernel"]
    size = kernel.size
    out = dict(layer)
    out["kernel"] = (
        kernel.reshape(-1).at[jnp.where(local < size, local, size)].set(0, mode="drop")
    ).reshape(kernel.shape)
    if "bias" in layer:
        bias = layer["bias"]
        out["bias"] = bias.at[jnp.where(local >= size, local - size, bias.size)].set(0, mode="drop")
    return out


def _zero_channel(names: tuple[str, ...], layer: dict, channel) -> dict:
    out = dict(layer)
    for name in names:
        if name in layer:
            out[name] = layer[name].at[..., channel].set(0)
    return out


def _copy_logits(pieces, s, rel_path, bn_rel_path, granularity, params, batch_stats, x, local):
    """Logits with unit ``local`` of the layer at ``rel_path`` (in piece s) zeroed.

    Weight units zero one kernel or bias entry; filter units zero ``kernel[..., c]``,
    ``bias[c]`` and, with ``bn_rel_path``, that BatchNorm's ``scale[c]`` and ``bias[c]``.
    """
    name = pieces[s].name
    sub = _sub(params, name)
    if granularity == "filter":
        sub = _replace(sub, rel_path, lambda layer: _zero_channel(("kernel", "bias"), layer, local))
        if bn_rel_path is not None:
            sub = _replace(sub, bn_rel_path, lambda bn: _zero_channel(("scale", "bias"), bn, local))
    else:
        sub = _replace(sub, rel_path, lambda layer: _zero_weight(layer, local))
    full = sub if name is None else {**params, name: sub}
    return _apply_from(pieces, full, batch_stats, x, s)


def _pad_amounts(module: chain.ConvStage) -> tuple[int, int]:
    if module.padding == "VALID":
        return 0, 0
    k = module.kernel_size
    return (k - 1) // 2, k - 1 - (k - 1) // 2


def _channel(a, c):
    """Channel ``c`` of the last axis (dynamic), keeping rank - 1 dims."""
    return jnp.take(a, c, axis=-1)


def _delta_logits(pieces, s, params, batch_stats, cache, local):
    """Logits without weight unit ``local`` of chain stage s, by delta propagation.

    ``cache`` holds ``x`` (stage input), ``h`` (pre-activation), ``y`` (stage output)
    and, when a next stage exists, ``h_next`` (its pre-activation).
    """
    module = pieces[s].module
    p = params[pieces[s].name]
    kernel, bias = p["kernel"], p["bias"]
    x, h, y = cache["x"], cache["h"], cache["y"]
    ksize = kernel.size
    in_kernel = local < ksize
    k_idx = jnp.where(in_kernel, local, 0)
    idx = jnp.unravel_index(k_idx, kernel.shape)
    c = jnp.where(in_kernel, idx[-1], local - ksize)
    w = jnp.where(in_kernel, kernel.reshape(-1)[k_idx], 0.0)
    b = jnp.where(in_kernel, 0.0, bias[jnp.clip(local - ksize, 0, bias.size - 1)])
    if isinstance(module, chain.ConvStage):
        kh, kw, ci, _ = idx
        lo, hi = _pad_amounts(module)
        xpad = jnp.pad(x, ((0, 0), (lo, hi), (lo, hi), (0, 0)))
        out_h, out_w = h.shape[1], h.shape[2]
        patch = jax.lax.dynamic_slice(xpad, (0, kh, kw, ci), (x.shape[0], out_h, out_w, 1))[..., 0]
        h_c = _channel(h, c) - w * patch - b
        y_c = chain.conv_post(h_c[..., None], module.pool)[..., 0]
    else:
        xf = x.reshape(x.shape[0], -1)
        i = idx[0]
        h_c = _channel(h, c) - w * jnp.take(xf, i, axis=1) - b
        y_c = chain.dense_post(h_c, module.relu)
    delta_y = y_c - _channel(y, c)  # (B, ...) change of output channel c
    if s + 1 == len(pieces):
        return y + delta_y[:, None] * jax.nn.one_hot(c, y.shape[-1], dtype=y.dtype)
    nxt = pieces[s + 1].module
    kn = params[pieces[s + 1].name]["kernel"]
    if isinstance(nxt, chain.DenseStage):
        spatial = int(np.prod(y.shape[1:-1]))
        rows = kn.reshape(spatial, y.shape[-1], kn.shape[-1])
        delta_h = delta_y.reshape(y.shape[0], spatial) @ jnp.take(rows, c, axis=1)
        y_next = chain.dense_post(cache["h_next"] + delta_h, nxt.relu)
    else:
        # The next conv restricted to input channel c, as patches @ kernel slice: the
        # patch extraction has a fixed kernel, so vmapping over units stays a batched
        # matmul instead of a grouped convolution.
        kh, kw = kn.shape[0], kn.shape[1]
        patches = jax.lax.conv_general_dilated_patches(
            delta_y[..., None],
            (kh, kw),
            (1, 1),
            nxt.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )  # (B, H', W', kh * kw)
        delta_h = patches @ jnp.take(kn, c, axis=2).reshape(kh * kw, kn.shape[-1])
        y_next = chain.conv_post(cache["h_next"] + delta_h, nxt.pool)
    return _apply_from(pieces, params, batch_stats, y_next, s + 2)


def _chain_cache(pieces, s, params, x):
    module, p = pieces[s].module, params[pieces[s].name]
    if isinstance(module, chain.ConvStage):
        h = chain.conv_linear(p["kernel"], p["bias"], x, module.padding)
        y = chain.conv_post(h, module.pool)
    else:
        h = chain.dense_linear(p["kernel"], p["bias"], x)
        y = chain.dense_post(h, module.relu)
    cache = {"x": x, "h": h, "y": y}
    if s + 1 < len(pieces):
        nxt, pn = pieces[s + 1].module, params[pieces[s + 1].name]
        if isinstance(nxt, chain.ConvStage):
            cache["h_next"] = chain.conv_linear(pn["kernel"], pn["bias"], y, nxt.padding)
        else:
            cache["h_next"] = chain.dense_linear(pn["kernel"], pn["bias"], y)
    return cache


def _can_delta(pieces, s, rel_path) -> bool:
    if rel_path or not chain.is_chain_stage(pieces[s].module) or pieces[s].name is None:
        return False
    return s + 1 == len(pieces) or chain.is_chain_stage(pieces[s + 1].module)


def _strategy(pieces, s, granularity, rel_path) -> str:
    if granularity == "filter":
        return "mask" if _is_linen(pieces[s].module) else "copy"
    return "delta" if _can_delta(pieces, s, rel_path) else "copy"


def layer_strategy(model: Any, spec: units_lib.UnitSpec, layer: units_lib.Layer) -> str:
    """The strategy (``delta``, ``mask`` or ``copy``) used for ``layer``'s units."""
    model, _ = _as_staged(model, {})
    pieces = _pieces(model)
    s, rel = _locate_piece(pieces, layer.path)
    return _strategy(pieces, s, spec.granularity, rel)


def _locate_piece(pieces, path) -> tuple[int, tuple[str, ...]]:
    if pieces[0].name is None:
        return 0, tuple(path)
    for s, piece in enumerate(pieces):
        if path[0] == piece.name:
            return s, tuple(path[1:])
    raise ValueError(f"layer {'/'.join(path)} belongs to no stage of the model")


# ---------------------------------------------------------------- the engine
@functools.cache
def _make_chunk_fn(pieces, s, granularity, layer, rel_path, loss_fn):
    """Jitted fn(params, batch_stats, x_s, labels, valid, locals_U) -> (correct_U, loss_U).

    Cached per (model stages, layer, loss): a second call with equal arguments reuses the
    jitted function, which traces once per input shape.
    """
    strategy = _strategy(pieces, s, granularity, rel_path)
    if strategy == "mask":
        target = layer.bn_path if layer.bn_path is not None else layer.path
        _, target_rel = _locate_piece(pieces, target)
        one = functools.partial(_mask_logits, pieces, s, target_rel, layer.out_channels)
    elif strategy == "copy":
        bn_rel = None
        if granularity == "filter" and layer.bn_path is not None:
            bn_s, bn_rel = _locate_piece(pieces, layer.bn_path)
            if bn_s != s:
                raise ValueError(f"{layer.name} and its BatchNorm lie in different stages")
        one = functools.partial(_copy_logits, pieces, s, rel_path, bn_rel, granularity)

    def chunk(params, batch_stats, x, labels, valid, locals_U):
        if strategy == "delta":
            cache = _chain_cache(pieces, s, params, x)
            logits = jax.vmap(lambda u: _delta_logits(pieces, s, params, batch_stats, cache, u))(
                locals_U
            )
        else:
            logits = jax.vmap(lambda u: one(params, batch_stats, x, u))(locals_U)
        return jax.vmap(lambda lg: _scores(lg, labels, valid, loss_fn))(logits)

    return jax.jit(chunk), strategy


@functools.cache
def _forward_fn(pieces, start: int, stop: int | None) -> Callable:
    """Jitted fn(params, batch_stats, x) applying ``pieces[start:stop]`` (cached)."""
    return jax.jit(lambda p, bs, x: _apply_from(pieces[:stop], p, bs, x, start))


@functools.cache
def _base_scores_fn(pieces, loss_fn) -> Callable:
    """Jitted fn(params, batch_stats, x, labels, valid) -> (correct, loss sum) (cached)."""
    return jax.jit(lambda p, bs, x, y, v: _scores(_apply_from(pieces, p, bs, x, 0), y, v, loss_fn))


def _check_sample(images, labels):
    if images.shape[0] == 0:
        raise ValueError("importance sample is empty: pass at least one image")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"images and labels differ in length: {images.shape[0]} vs {labels.shape[0]}"
        )


def _batches(images, labels, batch):
    """Fixed-size batches (the last zero-padded) with a validity weight."""
    n = images.shape[0]
    for start in range(0, n, batch):
        stop = min(start + batch, n)
        pad = batch - (stop - start)
        x = np.asarray(images[start:stop])
        y = np.asarray(labels[start:stop]).astype(np.int32)
        valid = np.ones(stop - start, np.float32)
        if pad:
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
            y = np.concatenate([y, np.zeros(pad, np.int32)])
            valid = np.concatenate([valid, np.zeros(pad, np.float32)])
        yield jnp.asarray(x), jnp.asarray(y), jnp.asarray(valid)


def ablation_importance(
    model: Any,
    params: PyTree,
    batch_stats: PyTree,
    images: jax.Array,
    labels: jax.Array,
    spec: units_lib.UnitSpec,
    *,
    units: Sequence[int] | np.ndarray | None = None,
    unit_chunk: int = 256,
    sample_batch: int = 1024,
    progress: Progress | None = None,
    loss_fn: LossFn | None = None,
) -> Importance:
    """Exact ablation importance of units on an importance sample.

    Args:
      model: a Linen module (with ``stages()`` the staged fast path is used; any call
        signature otherwise) or an adapter (``tdu_jax.from_linen/from_nnx/from_function``).
      params: the model's params (the tree ``spec`` was built from; dict or FrozenDict).
      batch_stats: the model's state: BatchNorm running statistics for a bare Linen
        module ({} if none), the adapter's ``state`` otherwise.
      images: ``N x ...`` model inputs, already preprocessed (the importance sample).
      labels: int ``N``.
      spec: unit numbering from ``units.enumerate_units``.
      units: global unit indices to score (default: all, in order).
      unit_chunk: units per jitted call (bounds memory together with ``sample_batch``).
      sample_batch: images per jitted call.
      progress: optional ``progress(done, total, seconds)`` called after each chunk.
      loss_fn: per-example ``loss_fn(logits_BxC, labels_B) -> (B,)`` behind
        ``loss_increase`` (default: softmax cross-entropy); hashable (a function).

    Returns:
      ``Importance`` aligned with ``units``.
    """
    _check_sample(images, labels)
    if unit_chunk < 1 or sample_batch < 1:
        raise ValueError(
            f"unit_chunk and sample_batch must be >= 1; got {unit_chunk}, {sample_batch}"
        )
    start_time = time.perf_counter()
    params, batch_stats = adapters.to_dict(params), adapters.to_dict(batch_stats)
    model, batch_stats = _as_staged(model, batch_stats)
    pieces = _pieces(model)
    wanted = np.arange(spec.num_units) if units is None else np.asarray(units, np.int64)
    layer_pos, local = units_lib.locate(spec, wanted)
    n = images.shape[0]
    batch = min(sample_batch, n)
    batches = list(_batches(images, labels, batch))

    base = _base_scores_fn(pieces, loss_fn)
    base_correct, base_ce = 0.0, 0.0
    for x, y, v in batches:
        c, ce = base(params, batch_stats, x, y, v)
        base_correct, base_ce = base_correct + float(c), base_ce + float(ce)

    correct = np.zeros(wanted.size)
    ce_sum = np.zeros(wanted.size)
    done = 0
    by_piece: dict[int, list[int]] = {}
    for pos in np.unique(layer_pos):
        s, _ = _locate_piece(pieces, spec.layers[int(pos)].path)
        by_piece.setdefault(s, []).append(int(pos))
    for s in sorted(by_piece):
        prefix = _forward_fn(pieces, 0, s)
        fns = {}
        for pos in by_piece[s]:
            layer = spec.layers[pos]
            rel = _locate_piece(pieces, layer.path)[1]
            fns[pos] = _make_chunk_fn(pieces, s, spec.granularity, layer, rel, loss_fn)[0]
        for b, (x, y, v) in enumerate(batches):
            x_s = prefix(params, batch_stats, x) if s > 0 else x
            for pos in by_piece[s]:
                where = np.flatnonzero(layer_pos == pos)
                chunk = min(unit_chunk, where.size)  # a small layer is not padded to a chunk
                for start in range(0, where.size, chunk):
                    sel = where[start : start + chunk]
                    ids = np.full(chunk, local[sel[-1]], np.int32)
                    ids[: sel.size] = local[sel]
                    c, ce = fns[pos](params, batch_stats, x_s, y, v, jnp.asarray(ids))
                    correct[sel] += np.asarray(c)[: sel.size]
                    ce_sum[sel] += np.asarray(ce)[: sel.size]
                    if b == len(batches) - 1:
                        done += sel.size
                        if progress is not None:
                            progress(done, wanted.size, time.perf_counter() - start_time)
    return Importance(
        units=wanted,
        accuracy_drop=100.0 * (base_correct - correct) / n,
        loss_increase=(ce_sum - base_ce) / n,
        base_accuracy=100.0 * base_correct / n,
        base_loss=base_ce / n,
        sample_size=n,
        seconds=time.perf_counter() - start_time,
    )


def naive_importance(
    model: Any,
    params: PyTree,
    batch_stats: PyTree,
    images: jax.Array,
    labels: jax.Array,
    spec: units_lib.UnitSpec,
    units: Sequence[int] | np.ndarray | None = None,
    loss_fn: LossFn | None = None,
) -> Importance:
    """Reference: for each unit, copy params, zero the unit, run the whole model.

    Same arguments and result as ``ablation_importance`` (one jitted forward over
    the whole sample per unit). Kept simple on purpose: tests and benchmarks
    compare the fast engine against it.
    """
    _check_sample(images, labels)
    start_time = time.perf_counter()
    wanted = np.arange(spec.num_units) if units is None else np.asarray(units, np.int64)
    labels = jnp.asarray(labels, jnp.int32)
    valid = jnp.ones(labels.shape[0], jnp.float32)

    model = adapters.as_model(model)

    @jax.jit
    def evaluate(p):
        return _scores(model.apply(p, batch_stats, images), labels, valid, loss_fn)

    base_correct, base_ce = (float(a) for a in evaluate(params))
    correct, ce = np.zeros(wanted.size), np.zeros(wanted.size)
    for i, u in enumerate(wanted):
        c, e = evaluate(units_lib.ablate(params, spec, np.array([u])))
        correct[i], ce[i] = float(c), float(e)
    n = labels.shape[0]
    return Importance(
        units=wanted,
        accuracy_drop=100.0 * (base_correct - correct) / n,
        loss_increase=(ce - base_ce) / n,
        base_accuracy=100.0 * base_correct / n,
        base_loss=base_ce / n,
        sample_size=n,
        seconds=time.perf_counter() - start_time,
    )
