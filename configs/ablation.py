"""The paper's ablations: one configuration per row of Tables 1, 2 and 3.

All rows use the VOC recipe (configs/voc.py: ResNet-101, deep stem, OS16) and
differ only in the fields listed in VARIANTS, so every row is also a plain
command line: `--config=configs/ablation.py:t1_c357_avg_gp`, or
`--config=configs/voc.py` plus the row's `--config.model.*` overrides (what
`launch/sweep.py configs/ablation.py` prints).

Table 1 (FPA, naive bilinear decoder): the dilated-ResNet baseline, SE channel
attention, and pyramid kernels C333/C357 x pooling MAX/AVE x global pooling.
Table 2 (centre block, naive decoder): PSPNet's PPM, DeepLabv3's ASPP, FPA.
Table 3 (decoder, FPA centre): skip connections with 1x1/3x3 low-level convs
and no global context, GAU 1x1/3x3 (3x3 = the full PAN), and GAU without FPA.
"""

from configs import voc

_NAIVE = {'model.decoder': 'bilinear'}


def _fpa(kernels, pooling, gp):
  return {**_NAIVE, 'model.center': 'fpa', 'model.fpa.attention': 'pyramid',
          'model.fpa.kernels': kernels, 'model.fpa.pooling': pooling,
          'model.fpa.global_branch': 'add' if gp else 'none'}


def _gau(kernel, context, center='fpa'):
  return {'model.center': center, 'model.decoder': 'gau',
          'model.gau.low_level_kernel': kernel,
          'model.gau.global_context': context}


# Row name -> config overrides (dotted paths under the VOC config).
VARIANTS = {
    # Table 1.
    't1_baseline': {**_NAIVE, 'model.center': 'none'},
    't1_se': {**_NAIVE, 'model.center': 'fpa', 'model.fpa.attention': 'se',
              'model.fpa.global_branch': 'none'},
    # The paper names the pyramid kernels coarsest first: C357 is 7x7 on the
    # finest level, then 5x5, then 3x3.
    **{f't1_c{name}_{p}{"_gp" if gp else ""}': _fpa(kernels, p, gp)
       for name, kernels in (('333', (3, 3, 3)), ('357', (7, 5, 3)))
       for p in ('max', 'avg') for gp in (False, True)},
    # Table 2.
    't2_ppm': {**_NAIVE, 'model.center': 'ppm'},
    't2_aspp': {**_NAIVE, 'model.center': 'aspp'},
    't2_fpa': _fpa((7, 5, 3), 'avg', True),
    # Table 3.
    't3_fpa_bilinear': _fpa((7, 5, 3), 'avg', True),
    't3_skip_1x1': _gau(1, False),
    't3_skip_3x3': _gau(3, False),
    't3_gau_1x1': _gau(1, True),
    't3_gau_3x3': _gau(3, True),
    't3_gau_no_fpa': _gau(3, True, center='none'),
}


def get_config(variant='t3_gau_3x3'):
  """Returns the VOC configuration of one table row (see VARIANTS)."""
  if variant not in VARIANTS:
    raise ValueError(f'unknown ablation variant {variant!r}; valid: '
                     f'{", ".join(VARIANTS)}')
  config = voc.get_config()
  for path, value in VARIANTS[variant].items():
    *parents, leaf = path.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def sweep(add):
  """Adds every row: `add(**overrides)` with dotted config paths as keys."""
  for overrides in VARIANTS.values():
    add(**overrides)
