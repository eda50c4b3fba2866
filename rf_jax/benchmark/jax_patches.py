"""Speed and memory experiments on the rf_jax side (`--jax-patch NAME`, repeatable).

Each is applied by monkeypatching in the rf_jax child process only, before the model and the
steps are built; rf_jax itself is unchanged. docs/performance.md has the measured effects.

  conv_gw_taps, conv_gw_im2col   a convolution's kernel gradient as dots over its shifted input
  conv_gw_taps_3x3, ..._im2col_3x3   windows (9 dots / one im2col dot) instead of XLA:CPU's
                                 backprop-filter convolution; `_3x3`: only kernels up to 3x3
  eval_no_loss                   the eval step without the per-example loss (a lower bound)
  matmul_precision_default       jax_default_matmul_precision='default'
"""

from __future__ import annotations

import functools
import types

NAMES = ('conv_gw_taps', 'conv_gw_im2col', 'conv_gw_taps_3x3', 'conv_gw_im2col_3x3',
         'eval_no_loss', 'matmul_precision_default')


def apply(names: tuple[str, ...]) -> list[str]:
  """Applies the experiments `names` ('none' and '' are skipped); returns those applied."""
  import jax  # pylint: disable=g-import-not-at-top
  applied = []
  for name in names:
    if name in ('none', ''):
      continue
    if name not in NAMES:
      raise ValueError(f'--jax-patch={name!r} is not one of {", ".join(NAMES)}')
    if name.startswith('conv_gw_'):
      mode = name.split('_')[2]
      _patch_flax_conv(_kernel_grad_as_dots(mode, max_kernel=3 if name.endswith('3x3') else 7))
    elif name == 'eval_no_loss':
      _patch_eval_without_loss()
    else:
      jax.config.update('jax_default_matmul_precision', 'default')
    applied.append(name)
  return applied


def _patch_eval_without_loss() -> None:
  """`steps.create_runner` then compiles an eval step that returns the scores only."""
  from rf_jax import steps  # pylint: disable=g-import-not-at-top
  full = steps.eval_step

  def eval_step(state, batch, flips=False):
    return {'scores': full(state, batch, flips)['scores']}

  steps.eval_step = eval_step


def _weight_grad(x, g, kernel_shape, strides, padding, mode: str):
  """d(loss)/d(kernel) of an NHWC/HWIO convolution as dots over shifted input windows."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  kh, kw, cin, _ = kernel_shape
  _, ho, wo, _ = g.shape
  xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  sh, sw = strides
  taps = [lax.slice(xp, (0, i, j, 0),
                    (x.shape[0], i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, cin),
                    (1, sh, sw, 1))
          for i in range(kh) for j in range(kw)]
  dims = (((0, 1, 2), (0, 1, 2)), ((), ()))
  if mode == 'im2col':
    cols = jnp.concatenate(taps, axis=-1) if len(taps) > 1 else taps[0]
    return lax.dot_general(cols, g, dims).reshape(kernel_shape)
  return jnp.stack([lax.dot_general(t, g, dims) for t in taps]).reshape(kernel_shape)


def _kernel_grad_as_dots(mode: str, max_kernel: int):
  """A drop-in `lax.conv_general_dilated` whose VJP computes the kernel gradient with
  `_weight_grad` for plain NHWC convolutions with kernels up to `max_kernel`."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top

  @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
  def conv(x, w, strides, padding, dn):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=dn)

  def fwd(x, w, strides, padding, dn):
    return conv(x, w, strides, padding, dn), (x, w)

  def bwd(strides, padding, dn, res, g):
    x, w = res
    _, vjp_x = jax.vjp(
        lambda x_: lax.conv_general_dilated(x_, w, strides, padding, dimension_numbers=dn), x)
    return vjp_x(g)[0], _weight_grad(x, g, w.shape, strides, padding, mode)

  conv.defvjp(fwd, bwd)

  def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                           rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                           precision=None, **kwargs):
    nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ('NHWC', 'HWIO', 'NHWC'))
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    plain = (dn == nhwc and feature_group_count == 1 and not kwargs and precision is None
             and all(d == 1 for d in (lhs_dilation or (1, 1)))
             and all(d == 1 for d in (rhs_dilation or (1, 1)))
             and not isinstance(padding, str) and rhs.shape[0] <= max_kernel)
    if not plain:
      return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                      rhs_dilation, dimension_numbers, feature_group_count,
                                      precision=precision, **kwargs)
    return conv(lhs, rhs, tuple(window_strides), tuple(tuple(p) for p in padding), nhwc)

  return conv_general_dilated


def _patch_flax_conv(conv_general_dilated) -> None:
  """Makes `flax.linen.Conv` call `conv_general_dilated` instead of lax's."""
  import flax.linen.linear as linear  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  proxy = types.ModuleType('lax_proxy')
  proxy.__dict__.update({k: getattr(lax, k) for k in dir(lax) if not k.startswith('__')})
  proxy.conv_general_dilated = conv_general_dilated
  linear.lax = proxy
