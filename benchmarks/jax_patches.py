"""Speed and memory experiments on the rf_jax side (`--jax-patch NAME`, repeatable).

Each is applied by monkeypatching in the rf_jax child process only, before the model and the
steps are built; rf_jax itself is unchanged. docs/performance.md has the measured effects.

  lax_conv_grad                  the ResNets' convolutions with lax's kernel gradient (XLA's
                                 relayouts) instead of rf_jax/models/conv.py's
  eval_no_loss                   the eval step without the per-example loss (a lower bound)
  batchnorm_bias_only            every BatchNorm replaced by its bias add: a lower bound on what
                                 any BatchNorm rewrite could reach in training (no statistics,
                                 no normalising) and exactly what folding it into the convs
                                 leaves in evaluation
  matmul_precision_default       jax_default_matmul_precision='default'
"""

from __future__ import annotations

NAMES = ('lax_conv_grad', 'eval_no_loss', 'batchnorm_bias_only', 'matmul_precision_default')


def apply(names: tuple[str, ...]) -> list[str]:
  """Applies the experiments `names` ('none' and '' are skipped); returns those applied."""
  import jax  # pylint: disable=g-import-not-at-top
  applied = []
  for name in names:
    if name in ('none', ''):
      continue
    if name not in NAMES:
      raise ValueError(f'--jax-patch={name!r} is not one of {", ".join(NAMES)}')
    if name == 'lax_conv_grad':
      from rf_jax.models import conv  # pylint: disable=g-import-not-at-top
      conv.conv_general_dilated = jax.lax.conv_general_dilated
    elif name == 'eval_no_loss':
      _patch_eval_without_loss()
    elif name == 'batchnorm_bias_only':
      _patch_batchnorm_bias_only()
    else:
      jax.config.update('jax_default_matmul_precision', 'default')
    applied.append(name)
  return applied


def _patch_eval_without_loss() -> None:
  """`runner.create_runner` then compiles an eval step that returns the scores only."""
  from rf_jax import steps  # pylint: disable=g-import-not-at-top
  full = steps.eval_step

  def eval_step(state, batch, tta='none'):
    return {'scores': full(state, batch, tta)['scores']}

  steps.eval_step = eval_step


def _patch_batchnorm_bias_only() -> None:
  """models/resnet.py's BatchNorms become modules that only add their bias."""
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  class BiasOnly(nn.Module):  # takes what models/resnet.py passes to nn.BatchNorm
    use_running_average: bool = False
    momentum: float = 0.9
    epsilon: float = 1e-5
    use_fast_variance: bool = False
    dtype: object = None
    param_dtype: object = None
    axis_name: object = None

    @nn.compact
    def __call__(self, x):
      self.variable('batch_stats', 'unused', lambda: jnp.zeros(()))  # the steps expect some
      return x + self.param('bias', nn.initializers.zeros, (x.shape[-1],))

  nn.BatchNorm = BiasOnly  # this process only: models/resnet.py looks it up when it builds
