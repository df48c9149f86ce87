"""tdu_jax: machine unlearning by time-inspired decay, in JAX/Flax.

The public API for any JAX model: wrap it (``from_linen``, ``from_nnx``, ``from_function``),
then units -> importance -> selection -> decay -> unlearning::

    import tdu_jax as tdu

    model, params, state = tdu.from_linen(cnn, variables)   # any call signature
    pairs = tdu.find_bn_pairs(model, params, state, images)  # Conv_0 -> BatchNorm_0
    spec = tdu.enumerate_units(params, "filter", bn_pairs=pairs)
    imp = tdu.ablation_importance(model, params, state, images, labels, spec)
    top = tdu.select_top_k(imp, 10)
    params = tdu.apply_decay(params, tdu.unit_mask(params, spec, top), lam=0.1, dt=1.0, steps=7)

``apply_decay`` is ``decay.decay`` and ``run_unlearning`` is ``unlearn.unlearn``: the
submodules ``tdu_jax.decay`` and ``tdu_jax.unlearn`` keep their names. ``run_unlearning`` is a
loop over step functions on an immutable ``UnlearnState`` (``init_unlearn``, ``select_units``,
``decay_once``, ``finetune_once``, ``evaluate_state``, ``unlearn_result``) that drive a run
step by step (see ``tdu_jax.unlearn``).

``forget`` does all of it in one call and sizes K and Δt itself on the training split (the
calibration of ``tdu_jax.calibrate``); it lives in ``tdu_jax.calibrated``::

    out = tdu.forget(model, params, state, train=train_split, forget_classes=(3,),
                     key=jax.random.key(0), preprocess=preprocess)

``forgetting_metrics`` judges any model the same way (membership-inference attacks, a linear
probe on the output layer's input, steps to relearn; ``tdu_jax.forgetting``), e.g. the
unlearned model beside one retrained without the class and the ``silence_classes`` control.
"""

from tdu_jax.adapters import (
    FunctionModel,
    LinenModel,
    Model,
    NNXModel,
    as_model,
    find_bn_pairs,
    from_function,
    from_linen,
    from_nnx,
    linen_bn_pairs,
    nnx_bn_pairs,
    preprocess_fn,
)
from tdu_jax.calibrated import DECAY_ONLY, ForgetResult, SweepConfig, forget
from tdu_jax.data import Split
from tdu_jax.decay import decay as apply_decay
from tdu_jax.decay import decay_step, rank_units, select_random_k, select_top_k
from tdu_jax.forgetting import forgetting_metrics, silence_classes
from tdu_jax.importance import Importance, ablation_importance, naive_importance
from tdu_jax.metrics import evaluate, predict
from tdu_jax.train import OptimizerConfig, fine_tune
from tdu_jax.units import UnitSpec, ablate, enumerate_units, unit_mask, unit_name
from tdu_jax.unlearn import (
    UnlearnConfig,
    UnlearnData,
    UnlearnResult,
    UnlearnSetup,
    UnlearnState,
    decay_once,
    evaluate_state,
    finetune_once,
    init_unlearn,
    select_units,
    unlearn_result,
)
from tdu_jax.unlearn import unlearn as run_unlearning

__version__ = "0.1.0"

__all__ = [
    "DECAY_ONLY",
    "ForgetResult",
    "FunctionModel",
    "Importance",
    "LinenModel",
    "Model",
    "NNXModel",
    "OptimizerConfig",
    "Split",
    "SweepConfig",
    "UnitSpec",
    "UnlearnConfig",
    "UnlearnData",
    "UnlearnResult",
    "UnlearnSetup",
    "UnlearnState",
    "ablate",
    "ablation_importance",
    "apply_decay",
    "as_model",
    "decay_once",
    "decay_step",
    "enumerate_units",
    "evaluate",
    "evaluate_state",
    "find_bn_pairs",
    "fine_tune",
    "forget",
    "forgetting_metrics",
    "finetune_once",
    "from_function",
    "from_linen",
    "from_nnx",
    "init_unlearn",
    "linen_bn_pairs",
    "naive_importance",
    "nnx_bn_pairs",
    "predict",
    "preprocess_fn",
    "rank_units",
    "run_unlearning",
    "select_random_k",
    "select_top_k",
    "select_units",
    "silence_classes",
    "unit_mask",
    "unit_name",
    "unlearn_result",
]
