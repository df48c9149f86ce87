"""Units: what is ablated and decayed.

A *layer* is any dict in the params tree holding a ``kernel`` (Flax Conv/Dense or
the chain stages of ``tdu_jax.models.layers``). Its units depend on the
*granularity*:

* ``weight``: every scalar of the kernel (C order), then every scalar of the bias.
* ``filter``: one output channel: ``kernel[..., c]``, ``bias[c]`` and, when
  ``include_bn`` is set, ``scale[c]`` and ``bias[c]`` of the paired BatchNorm (the
  sibling whose name swaps ``conv`` for ``bn``, e.g. ``conv1`` -> ``bn1``). Without
  the BatchNorm channel a removed conv filter still emits the BN shift.

Units are numbered globally in a stable order: layers in the params tree's
flattening order (sorted keys), units within a layer as above.
"""

import re
from collections.abc import Sequence
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
        return "/".join(self.path)

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
) -> UnitSpec:
    """Lists the layers of ``params`` and numbers their units.

    Args:
      params: a Flax params tree.
      granularity: ``weight`` or ``filter``.
      include: optional regex; only layers whose name (``a/b/c``) matches are kept.
      exclude: optional regex; layers whose name matches are dropped.
      include_bn: for ``filter``, whether the paired BatchNorm channel is part of the unit.

    Returns:
      A ``UnitSpec``; ``num_units`` > 0.
    """
    check_granularity(granularity)
    layers, offset = [], 0
    for path, layer in _layer_dicts(params):
        name = "/".join(path)
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
            bn_path = _paired_bn(params, path, n) if include_bn else None
        layers.append(Layer(path, kernel_shape, bias_size, bn_path, offset, n))
        offset += n
    if not layers:
        raise ValueError(f"no layer with units left after include={include!r}, exclude={exclude!r}")
    return UnitSpec(granularity, include_bn, tuple(layers))


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
      A pytree of bool ``jax.Array`` with the structure and shapes of ``params``.
    """
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
