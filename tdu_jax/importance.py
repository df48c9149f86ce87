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

Stages come from ``model.stages()`` (see ``tdu_jax.models.stages``); a model
without it is one stage, so any Flax module works (the generic path). Work runs in
jitted chunks of ``unit_chunk`` units x ``sample_batch`` images, compiled once per
layer. ``naive_importance`` is the obvious loop kept as the reference.

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

from tdu_jax import units as units_lib
from tdu_jax.models import layers as chain
from tdu_jax.models.stages import Stage, stage_variables

PyTree = Any
Progress = Callable[[int, int, float], None]  # (units done, units total, seconds elapsed)


class Importance(NamedTuple):
    """Per-unit ablation scores, aligned with ``units`` (global unit indices)."""

    units: np.ndarray  # int64 (U,)
    accuracy_drop: np.ndarray  # float64 (U,), percentage points
    loss_increase: np.ndarray  # float64 (U,), nats of mean cross-entropy
    base_accuracy: float  # percent on the sample
    base_loss: float
    sample_size: int
    seconds: float


def _pieces(model: nn.Module) -> tuple[Stage, ...]:
    """The model's stages; a model without ``stages()`` is one stage named None."""
    if hasattr(model, "stages"):
        return tuple(model.stages())
    return (Stage(None, model),)


def _sub(tree: PyTree, name: str | None) -> PyTree:
    if name is None:
        return tree
    return tree.get(name, {}) if tree else {}


def _apply_piece(piece: Stage, params, batch_stats, x):
    if piece.name is None:  # the whole model
        variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    else:
        variables = stage_variables(piece, params, batch_stats)
    return piece.module.apply(variables, x, train=False)


def _apply_from(pieces, params, batch_stats, x, start: int):
    for piece in pieces[start:]:
        x = _apply_piece(piece, params, batch_stats, x)
    return x


def _scores(logits_BxC, labels_B, valid_B):
    """(correct count, summed cross-entropy) over valid examples."""
    correct = jnp.sum((jnp.argmax(logits_BxC, -1) == labels_B) * valid_B)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_BxC.astype(jnp.float32), labels_B)
    return correct, jnp.sum(ce * valid_B)


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


def _copy_logits(pieces, s, rel_path, params, batch_stats, x, local):
    """Logits with weight unit ``local`` of the layer at ``rel_path`` (in piece s) zeroed."""
    name = pieces[s].name
    sub = jax.tree.map(lambda a: a, _sub(params, name))  # shallow copy of the dict tree
    layer = units_lib.get_path(sub, rel_path) if rel_path else sub
    kernel = layer["kernel"]
    size = kernel.size
    layer["kernel"] = (
        kernel.reshape(-1).at[jnp.where(local < size, local, size)].set(0, mode="drop")
    ).reshape(kernel.shape)
    if "bias" in layer:
        bias = layer["bias"]
        layer["bias"] = bias.at[jnp.where(local >= size, local - size, bias.size)].set(
            0, mode="drop"
        )
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


def layer_strategy(model: nn.Module, spec: units_lib.UnitSpec, layer: units_lib.Layer) -> str:
    """The strategy (``delta``, ``mask`` or ``copy``) used for ``layer``'s units."""
    pieces = _pieces(model)
    s, rel = _locate_piece(pieces, layer.path)
    if spec.granularity == "filter":
        return "mask"
    return "delta" if _can_delta(pieces, s, rel) else "copy"


def _locate_piece(pieces, path) -> tuple[int, tuple[str, ...]]:
    if pieces[0].name is None:
        return 0, tuple(path)
    for s, piece in enumerate(pieces):
        if path[0] == piece.name:
            return s, tuple(path[1:])
    raise ValueError(f"layer {'/'.join(path)} belongs to no stage of the model")


# ---------------------------------------------------------------- the engine
def _make_chunk_fn(pieces, s, spec, layer, rel_path):
    """Jitted fn(params, batch_stats, x_s, labels, valid, locals_U) -> (correct_U, ce_U)."""
    strategy = (
        "mask"
        if spec.granularity == "filter"
        else ("delta" if _can_delta(pieces, s, rel_path) else "copy")
    )
    if strategy == "mask":
        target = layer.bn_path if layer.bn_path is not None else layer.path
        _, target_rel = _locate_piece(pieces, target)
        one = functools.partial(_mask_logits, pieces, s, target_rel, layer.out_channels)
    elif strategy == "copy":
        one = functools.partial(_copy_logits, pieces, s, rel_path)

    def chunk(params, batch_stats, x, labels, valid, locals_U):
        if strategy == "delta":
            cache = _chain_cache(pieces, s, params, x)
            logits = jax.vmap(lambda u: _delta_logits(pieces, s, params, batch_stats, cache, u))(
                locals_U
            )
        else:
            logits = jax.vmap(lambda u: one(params, batch_stats, x, u))(locals_U)
        return jax.vmap(lambda lg: _scores(lg, labels, valid))(logits)

    return jax.jit(chunk), strategy


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
    model: nn.Module,
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
) -> Importance:
    """Exact ablation importance of units on an importance sample.

    Args:
      model: a Flax module; with ``stages()`` the staged fast path is used.
      params: the model's params (the tree ``spec`` was built from).
      batch_stats: BatchNorm running statistics ({} if none).
      images: float32 ``N x H x W x C``, already normalised (the importance sample).
      labels: int ``N``.
      spec: unit numbering from ``units.enumerate_units``.
      units: global unit indices to score (default: all, in order).
      unit_chunk: units per jitted call (bounds memory together with ``sample_batch``).
      sample_batch: images per jitted call.
      progress: optional ``progress(done, total, seconds)`` called after each chunk.

    Returns:
      ``Importance`` aligned with ``units``.
    """
    _check_sample(images, labels)
    if unit_chunk < 1 or sample_batch < 1:
        raise ValueError(
            f"unit_chunk and sample_batch must be >= 1; got {unit_chunk}, {sample_batch}"
        )
    start_time = time.perf_counter()
    pieces = _pieces(model)
    wanted = np.arange(spec.num_units) if units is None else np.asarray(units, np.int64)
    layer_pos, local = units_lib.locate(spec, wanted)
    n = images.shape[0]
    batch = min(sample_batch, n)
    batches = list(_batches(images, labels, batch))

    full = jax.jit(lambda p, bs, x: _apply_from(pieces, p, bs, x, 0))
    base_correct, base_ce = 0.0, 0.0
    for x, y, v in batches:
        c, ce = _scores(full(params, batch_stats, x), y, v)
        base_correct, base_ce = base_correct + float(c), base_ce + float(ce)

    correct = np.zeros(wanted.size)
    ce_sum = np.zeros(wanted.size)
    done = 0
    by_piece: dict[int, list[int]] = {}
    for pos in np.unique(layer_pos):
        s, _ = _locate_piece(pieces, spec.layers[int(pos)].path)
        by_piece.setdefault(s, []).append(int(pos))
    for s in sorted(by_piece):
        prefix = jax.jit(lambda p, bs, x, s=s: _apply_from(pieces[:s], p, bs, x, 0))
        fns = {}
        for pos in by_piece[s]:
            layer = spec.layers[pos]
            fns[pos] = _make_chunk_fn(pieces, s, spec, layer, _locate_piece(pieces, layer.path)[1])[
                0
            ]
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
    model: nn.Module,
    params: PyTree,
    batch_stats: PyTree,
    images: jax.Array,
    labels: jax.Array,
    spec: units_lib.UnitSpec,
    units: Sequence[int] | np.ndarray | None = None,
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

    @jax.jit
    def evaluate(p):
        variables = {"params": p, "batch_stats": batch_stats} if batch_stats else {"params": p}
        return _scores(model.apply(variables, images, train=False), labels, valid)

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
