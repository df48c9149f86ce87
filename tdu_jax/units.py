"""Units: what is ablated and decayed.

A *layer* is any dict in the params tree holding a ``kernel`` (Flax Conv/Dense or
the chain stages of ``tdu_jax.models.layers``). Its units depend on the
*granularity*:

* ``weight``: every scalar of the kernel (C order), then every scalar of the bias.
* ``filter``: one output channel: ``kernel[..., c]``, ``bias[c]`` and, when
  ``include_bn`` is set, ``scale[c]`` and ``bias[c]`` of the paired BatchNorm. Without
  the BatchNorm channel a removed conv filter still emits the BN shift.

BatchNorm pairing is explicit (``bn_pairs={"Conv_0": "BatchNorm_0"}``, e.g. discovered
from a Linen or NNX model's computation by ``adapters.find_bn_pairs``); layers not named
there fall back to the sibling whose name swaps ``conv`` for ``bn`` (``conv1`` ->
``bn1``). A layer left unpaired while an unclaimed sibling normalisation of its
width (``scale`` and ``bias``, no ``kernel``) exists is an error, never a silent loss.

Units are numbered globally in a stable order: layers in the params tree's
flattening order (sorted keys), units within a layer as above.
"""

import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
GRANULARITIES = ("weight", "filter")


class Layer(NamedTuple):
    """One layer with units. ``path`` is its key path in ``params``."""

    path: tuple[str, ...]
    kernel_shape: tuple[int, ...]
    bias_size: int  # 0 when the layer has no bias
    bn_path: tuple[str, ...] | None  # paired BatchNorm, only when its channel joins the unit
    offset: int  # global index of this layer's first unit
    num_units: int

    @property
    def name(self) -> str:
        return _name(self.path)

    @property
    def out_channels(self) -> int:
        return self.kernel_shape[-1]


class UnitSpec(NamedTuple):
    """All units of a params tree at one granularity."""

    granularity: str
    include_bn: bool
    layers: tuple[Layer, ...]

    @property
    def num_units(self) -> int:
        return sum(layer.num_units for layer in self.layers)


def check_granularity(granularity: str) -> str:
    if granularity not in GRANULARITIES:
        raise ValueError(
            f"granularity must be one of {', '.join(GRANULARITIES)}; got {granularity!r}"
        )
    return granularity


def _name(path: Sequence[Any]) -> str:
    return "/".join(str(k) for k in path)


def get_path(tree: PyTree, path: Sequence[str]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _layer_dicts(params: PyTree, prefix: tuple[str, ...] = ()):
    """Yields (path, dict) for every dict holding a 'kernel', in sorted-key order."""
    if not isinstance(params, dict) and not hasattr(params, "keys"):
        return
    if "kernel" in params:
        yield prefix, params
        return
    for key in sorted(params.keys()):
        yield from _layer_dicts(params[key], (*prefix, key))


def _norm_dicts(params: PyTree, prefix: tuple[str, ...] = ()):
    """Yields (path, channels) for every dict with ``scale`` and ``bias`` and no ``kernel``."""
    if not isinstance(params, dict) and not hasattr(params, "keys"):
        return
    if "scale" in params and "bias" in params and "kernel" not in params:
        if np.ndim(params["scale"]) == 1:
            yield prefix, int(np.shape(params["scale"])[0])
        return
    for key in sorted(params.keys()):
        yield from _norm_dicts(params[key], (*prefix, key))


def _explicit_bn(params, bn_pairs, path, channels) -> tuple[str, ...] | None:
    bn_name = bn_pairs[_name(path)]
    if bn_name is None:
        return None
    bn_path, node = [], params
    for part in bn_name.split("/"):
        keys = [k for k in (node.keys() if hasattr(node, "keys") else ()) if str(k) == part]
        if not keys:
            raise ValueError(f"bn_pairs pairs {_name(path)} with {bn_name}, which is not in params")
        bn_path.append(keys[0])
        node = node[keys[0]]
    bn_path, bn = tuple(bn_path), node
    if "scale" not in bn or tuple(np.shape(bn["scale"])) != (channels,):
        raise ValueError(
            f"bn_pairs pairs {_name(path)} ({channels} channels) with {bn_name}, which has no "
            f"scale of shape ({channels},)"
        )
    return bn_path


def _paired_bn(params: PyTree, path: tuple[str, ...], channels: int) -> tuple[str, ...] | None:
    if not path or "conv" not in path[-1]:
        return None
    bn_path = (*path[:-1], path[-1].replace("conv", "bn"))
    try:
        bn = get_path(params, bn_path)
    except (KeyError, TypeError):
        return None
    if "scale" in bn and bn["scale"].shape == (channels,):
        return bn_path
    return None


def enumerate_units(
    params: PyTree,
    granularity: str = "weight",
    include: str | None = None,
    exclude: str | None = None,
    include_bn: bool = True,
    bn_pairs: Mapping[str, str | None] | Sequence[tuple[str, str | None]] | None = None,
) -> UnitSpec:
    """Lists the layers of ``params`` and numbers their units.

    Args:
      params: a Flax params tree.
      granularity: ``weight`` or ``filter``.
      include: optional regex; only layers whose name (``a/b/c``) matches are kept.
      exclude: optional regex; layers whose name matches are dropped.
      include_bn: for ``filter``, whether the paired BatchNorm channel is part of the unit.
      bn_pairs: explicit pairing ``{layer name: BatchNorm name or None}`` (names are
        ``a/b`` paths in ``params``; None: the layer has no BatchNorm). Layers not listed
        are paired by name (``conv`` -> ``bn``).

    Returns:
      A ``UnitSpec``; ``num_units`` > 0.

    Raises:
      ValueError: for ``filter`` with ``include_bn``, when a layer stays unpaired although
        an unclaimed normalisation of its width sits beside it (name the pair in
        ``bn_pairs``).
    """
    check_granularity(granularity)
    bn_pairs = dict(bn_pairs or {})
    all_layers = {_name(path) for path, _ in _layer_dicts(params)}
    unknown = sorted(set(bn_pairs) - all_layers)
    if unknown:
        raise ValueError(f"bn_pairs names layers not in params: {unknown}")
    layers, offset = [], 0
    for path, layer in _layer_dicts(params):
        name = _name(path)
        if include is not None and not re.search(include, name):
            continue
        if exclude is not None and re.search(exclude, name):
            continue
        kernel_shape = tuple(layer["kernel"].shape)
        bias_size = int(np.size(layer["bias"])) if "bias" in layer else 0
        if granularity == "weight":
            n, bn_path = int(np.prod(kernel_shape)) + bias_size, None
        else:
            n = kernel_shape[-1]
            bn_path = None
            if include_bn:
                if name in bn_pairs:
                    bn_path = _explicit_bn(params, bn_pairs, path, n)
                else:
                    bn_path = _paired_bn(params, path, n)
        layers.append(Layer(path, kernel_shape, bias_size, bn_path, offset, n))
        offset += n
    if not layers:
        raise ValueError(f"no layer with units left after include={include!r}, exclude={exclude!r}")
    if granularity == "filter" and include_bn:
        _check_pairing(params, layers, bn_pairs)
    return UnitSpec(granularity, include_bn, tuple(layers))


def _check_pairing(params: PyTree, layers: list[Layer], bn_pairs: dict) -> None:
    """ValueError for a layer left unpaired beside an unclaimed norm of its width."""
    claimed = {layer.bn_path for layer in layers if layer.bn_path is not None}
    claimed = {_name(p) for p in claimed} | {v for v in bn_pairs.values() if v is not None}
    free = [(p, c) for p, c in _norm_dicts(params) if _name(p) not in claimed]
    for layer in layers:
        if layer.bn_path is not None or layer.name in bn_pairs:
            continue
        candidates = [
            _name(p) for p, c in free if c == layer.out_channels and p[:-1] == layer.path[:-1]
        ]
        if candidates:
            raise ValueError(
                f"filter units of {layer.name} cannot be paired with a BatchNorm, but "
                f"{', '.join(candidates)} has its width ({layer.out_channels}); without the "
                "pair a removed filter keeps emitting the BatchNorm shift. Pass "
                f"bn_pairs={{{layer.name!r}: {candidates[0]!r}}} (or None if it has no "
                "BatchNorm; tdu_jax.find_bn_pairs discovers the pairs of a Linen or NNX "
                "model), or include_bn=False."
            )


def locate(spec: UnitSpec, units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Global unit indices -> (layer position in ``spec.layers``, index within layer)."""
    units = np.asarray(units, dtype=np.int64)
    if units.size and (units.min() < 0 or units.max() >= spec.num_units):
        raise ValueError(f"unit indices must be in [0, {spec.num_units}); got {units}")
    offsets = np.array([layer.offset for layer in spec.layers])
    layer_pos = np.searchsorted(offsets, units, side="right") - 1
    return layer_pos, units - offsets[layer_pos]


def unit_name(spec: UnitSpec, unit: int) -> str:
    """Human-readable name, e.g. ``dense1/kernel[3, 7]`` or ``stem/conv[filter 5]``."""
    (pos,), (local,) = locate(spec, np.array([unit]))
    layer = spec.layers[int(pos)]
    if spec.granularity == "filter":
        return f"{layer.name}[filter {local}]"
    kernel_size = int(np.prod(layer.kernel_shape))
    if local < kernel_size:
        index = ", ".join(str(i) for i in np.unravel_index(local, layer.kernel_shape))
        return f"{layer.name}/kernel[{index}]"
    return f"{layer.name}/bias[{local - kernel_size}]"


def unit_mask(params: PyTree, spec: UnitSpec, units: np.ndarray) -> PyTree:
    """Boolean pytree shaped like ``params``: True on the entries of the given units.

    Args:
      params: the params tree ``spec`` was built from.
      spec: the unit numbering.
      units: int array of global unit indices (any order, duplicates allowed).

    Returns:
      A pytree of bool ``jax.Array`` with the structure and shapes of ``params``. Under
      ``jax.jit`` ``units`` may be traced (indices out of range then select nothing).
    """
    if isinstance(units, jax.core.Tracer):
        return _traced_unit_mask(params, spec, units)
    masks = jax.tree.map(lambda p: np.zeros(np.shape(p), dtype=bool), params)
    layer_pos, local = locate(spec, units)
    for pos in np.unique(layer_pos):
        layer = spec.layers[int(pos)]
        idx = local[layer_pos == pos]
        m = get_path(masks, layer.path)
        if spec.granularity == "filter":
            m["kernel"][..., idx] = True
            if "bias" in m:
                m["bias"][idx] = True
            if layer.bn_path is not None:
                bn = get_path(masks, layer.bn_path)
                bn["scale"][idx] = True
                bn["bias"][idx] = True
        else:
            kernel_size = m["kernel"].size
            in_kernel = idx[idx < kernel_size]
            m["kernel"].reshape(-1)[in_kernel] = True
            if "bias" in m:
                m["bias"][idx[idx >= kernel_size] - kernel_size] = True
    return jax.tree.map(jnp.asarray, masks)


def _key(entry: Any) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return entry


def _traced_unit_mask(params: PyTree, spec: UnitSpec, units: jax.Array) -> PyTree:
    """``unit_mask`` for traced unit indices: per-layer scatters with out-of-range dropped."""
    units = jnp.asarray(units).reshape(-1)
    leaf_masks: dict[tuple, jax.Array] = {}

    def put(path, m):
        leaf_masks[path] = leaf_masks[path] | m if path in leaf_masks else m

    for layer in spec.layers:
        local = units - layer.offset
        inside = (local >= 0) & (local < layer.num_units)
        hit = jnp.zeros(layer.num_units, bool)
        hit = hit.at[jnp.where(inside, local, layer.num_units)].set(True, mode="drop")
        if spec.granularity == "filter":
            put((*layer.path, "kernel"), jnp.broadcast_to(hit, layer.kernel_shape))
            if layer.bias_size:
                put((*layer.path, "bias"), hit)
            if layer.bn_path is not None:
                put((*layer.bn_path, "scale"), hit)
                put((*layer.bn_path, "bias"), hit)
        else:
            kernel_size = int(np.prod(layer.kernel_shape))
            put((*layer.path, "kernel"), hit[:kernel_size].reshape(layer.kernel_shape))
            if layer.bias_size:
                put((*layer.path, "bias"), hit[kernel_size:])

    def leaf(key_path, p):
        path = tuple(_key(k) for k in key_path)
        return leaf_masks.get(path, jnp.zeros(np.shape(p), bool)).reshape(np.shape(p))

    return jax.tree_util.tree_map_with_path(leaf, params)


def check_mask_structure(params: PyTree, mask: PyTree) -> None:
    """Raises ValueError unless ``mask`` has the tree structure and shapes of ``params``."""
    p_def, m_def = jax.tree.structure(params), jax.tree.structure(mask)
    if p_def != m_def:
        raise ValueError(f"mask structure {m_def} does not match params structure {p_def}")
    for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask), strict=True):
        if np.shape(p) != np.shape(m):
            raise ValueError(f"mask leaf shape {np.shape(m)} != params leaf shape {np.shape(p)}")


def ablate(params: PyTree, spec: UnitSpec, units: np.ndarray) -> PyTree:
    """Params with the given units set to zero (everything else unchanged)."""
    mask = unit_mask(params, spec, units)
    return jax.tree.map(lambda p, m: jnp.where(m, jnp.zeros_like(p), p), params, mask)
