"""Move params, optimiser state and model state between the functional, Equinox, Flax linen and NNX forms, exactly.

:func:`migrate` takes a model in any form and the form wanted, matches their layers by
structure (names where both agree, else order within each kind, shapes as constraints), compares
every pair's settings, moves the values and, given an example batch, proves the two compute the
same function; :func:`plan` shows the match as a table. Underneath, two functions do the moving:

* :func:`to_functional` takes an Equinox module, an NNX module (its params), Flax variables
  (``{'params': ...}``), a Flax ``TrainState``, an NNX ``(model, nnx.Optimizer)`` pair, an Equinox
  ``(model, opt_state)`` pair or a :class:`pureflax.TrainState` (of any form) and returns the
  functional form: a params dict with Flax's paths, or a functional ``TrainState``.
* :func:`from_functional` fills the structure of ``like`` (an instance of the form you
  want; its arrays may be ``jax.ShapeDtypeStruct``) with the values of a functional tree,
  the way orbax restores into an abstract target.

A model's params *and* its running statistics (BatchNorm) without an optimiser are its
*variables*: Linen's ``{'params', 'batch_stats'}``, an NNX module, an Equinox ``(model,
eqx.nn.State)`` pair; :func:`variables_to_functional` / :func:`variables_from_functional` move them.
Values are carried, never re-initialised: round trips are bit for bit. What each layer kind
transposes, permutes or reshapes is :data:`LAYOUTS` (``print(layouts_table())``);
:func:`register_layer` adds a class of any library. Any mismatch raises :class:`ConversionError`
naming the path, both shapes and both dtypes.

Examples:
    >>> import equinox as eqx, jax
    >>> from pureflax import vae
    >>> from pureflax.compat import equinox_models, convert
    >>> params = jax.jit(vae.init, static_argnums=1)(jax.random.PRNGKey(0), vae.VAEConfig(latent_dim=4))
    >>> like = eqx.filter_eval_shape(equinox_models.VAE, latent_dim=4, key=jax.random.PRNGKey(1))  # shapes suffice
    >>> model = convert.from_functional(params, like=like)
    >>> bool((model.encoder.layers[0].weight == params['encoder']['Dense_0']['kernel'].T).all())
    True
    >>> back = convert.to_functional(model)
    >>> bool((back['encoder']['Dense_0']['kernel'] == params['encoder']['Dense_0']['kernel']).all())
    True
"""

from pureflax.compat.convert.api import from_functional, to_functional, variables_from_functional, variables_to_functional
from pureflax.compat.convert.checks import check_layers
from pureflax.compat.convert.layouts import LAYOUTS, Layout, Rule, layouts_table, register_layer
from pureflax.compat.convert.engine import migrate, plan, transfer
from pureflax.compat.convert.params import (
    opt_state_from_functional, opt_state_to_functional, param_names, params_from_functional, params_to_functional,
)
from pureflax.compat.convert.plan import Plan
from pureflax.compat.convert.stats import state_from_functional, state_to_functional
from pureflax.compat.convert.trees import ConversionError

__all__ = [
    "LAYOUTS", "ConversionError", "Layout", "Plan", "Rule", "check_layers", "from_functional", "layouts_table", "migrate",
    "opt_state_from_functional", "opt_state_to_functional", "param_names", "params_from_functional", "params_to_functional",
    "plan", "register_layer", "state_from_functional", "state_to_functional", "to_functional", "transfer",
    "variables_from_functional", "variables_to_functional",
]
