"""The study's Table 1: ImageNet-pretrained ResNet-18, SGD, staircase decay.

Variant configs (rgb.py, rgbir.py, dual.py) import this and choose the model;
every field can be overridden on the command line, e.g. `--config.optim.lr=0.01`.
Where the study's text is vague the defaults follow the study's code (README,
"Differences from the study's code").
"""

import ml_collections

from rf_jax.data import planet


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  config.model = ml_collections.ConfigDict()
  config.model.name = 'rgb'  # rgb | rgbir | dual (rf_jax/models/registry.py)
  # Ported torchvision ImageNet weights (scripts/port_weights.py); '' trains from scratch.
  config.model.weights = 'weights/resnet18-imagenet.msgpack'
  # The new IR stem slice: study | he_fan_in | he_fan_out | torch_conv_default | rgb_mean.
  config.model.ir_stem_init = 'study'
  # Regexes (full match on names like 'params/layer4_1/conv2/kernel') kept at their fresh init.
  config.model.dont_load = ()
  # First-stage width of every ResNet-18 trunk, doubling per stage: 64 is ResNet-18 (and the
  # ImageNet weights). Narrower only where the network's size does not matter (tests of logic).
  config.model.width = 64

  config.data = ml_collections.ConfigDict()
  config.data.raw_dir = 'data/planet'  # Kaggle- or course-layout directory
  config.data.layout = 'auto'  # auto | kaggle | course
  config.data.prepared_dir = ''  # TFDS data_dir; '' = ~/tensorflow_datasets
  config.data.val_fraction = planet.STUDY_VAL_FRACTION
  config.data.split_seed = planet.STUDY_SEED
  # Train input: resize_flip (the whole chip resized to crop_size, the study's code) | crop_flip.
  config.data.train_transform = 'resize_flip'
  config.data.crop_size = 224  # train input size
  config.data.eval_size = 224  # eval: the whole chip resized
  config.data.normalisation = 'dataset'  # dataset (train-split band stats) | course (8-bit only)
  config.data.num_workers = 2  # threads reading records (cache 'none') or filling the cache
  # Where a split's chips are held: none (each batch read from disk) | host (the split read once
  # into RAM) | device (the split in accelerator memory, batches gathered there; Kaggle train
  # split 21.2 GB). data/pipeline.py.
  config.data.cache = 'none'
  config.data.synthetic = ml_collections.ConfigDict()
  config.data.synthetic.num_chips = 0  # > 0: generate a synthetic dataset in the workdir
  config.data.synthetic.chip_size = 256
  config.data.synthetic.num_test = 0
  config.data.synthetic.seed = planet.STUDY_SEED

  config.optim = ml_collections.ConfigDict()
  config.optim.lr = 0.005
  config.optim.momentum = 0.9
  config.optim.decay_epochs = 10  # StepLR(step_size=10, gamma=0.3)
  config.optim.decay_rate = 0.3

  config.batch_size = 16  # global train batch
  config.eval_batch_size = 64
  config.num_epochs = 35
  config.seed = planet.STUDY_SEED  # parameter init and shuffling (the split has its own seed)
  config.dtype = 'float32'  # compute dtype: float32 | bfloat16 (params and loss stay float32)
  config.parallel = 'jit'  # several devices: 'jit' (mesh, sharded batch) or 'pmap'
  # XLA:CPU's measured speed-ups (rf_jax/xla_cpu.py's flags; the model's convolution and
  # max-pool, models/registry.tuned_ops). Applies only when JAX's backend is CPU; False runs
  # the plain lax model there too (e.g. for jax.jvp, which the tuned convolution lacks).
  config.cpu_tuning = True
  # XLA's compiled programs kept on disk (rf_jax/compilation.py): a later invocation (resume,
  # evaluate, predict) loads them instead of compiling again. '' = no cache; `~` is expanded when
  # used (a saved config.json serves every user); JAX_COMPILATION_CACHE_DIR, if set, wins.
  config.compilation_cache = '~/.cache/rf_jax/xla'

  config.checkpoint_every_steps = 0  # 0 = at the end of every epoch only
  config.log_every_steps = 10  # progress bar and non-finite-loss check

  config.eval = ml_collections.ConfigDict()
  config.eval.step = -1  # -1 = the best checkpoint by select_by
  # The best epoch: map (the study's text) | mean_precision_at_0.5 (what its code printed as mAP).
  config.eval.select_by = 'map'
  # Test-time augmentation, the probabilities averaged over views of each chip (steps.py):
  # none (the study) | flip (the chip and its mirror) | dihedral8 (4 rotations x 2 flips).
  config.eval.tta = 'none'
  config.eval.top_n = 50  # tail accuracy over the best tag's top-N chips
  # Folds of the cross-fitted tuned F2 (metrics.f2_tuned_crossfit): each chip is scored at
  # thresholds tuned on the other folds, unlike f2_tuned, tuned on the chips it scores.
  config.eval.crossfit_folds = 5

  # --mode compare: bootstrap intervals over the validation chips (rf_jax/bootstrap.py).
  config.compare = ml_collections.ConfigDict()
  # Resamples of the chips: at 2,000 a 95% percentile interval's ends carry a Monte-Carlo error
  # of ~0.06 of the bootstrap's standard deviation, and p-values resolve down to 0.001.
  config.compare.resamples = 2000
  config.compare.seed = 0  # the resampled chips: the same seed gives the same intervals
  return config
