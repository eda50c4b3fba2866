"""ImageNet ResNet-18 weights for the study models: porting, the weights file, loading.

  torchvision_resnet.py  torchvision ResNet-18 state dict <-> Flax variables (names, layouts)
  files.py               .pth/.safetensors in; the msgpack weights file + its SHA-256
  merge.py               generic merge of loaded variables into fresh ones (dont_load, one error)
  stem.py                the widened stem's new input channels (ir_stem_init)
  study.py               the pretrained trunk into a study model, as models/registry.py declares it

Training calls `load_pretrained(variables, model=..., path=config.model.weights,
ir_stem_init=..., dont_load=..., rng=...)`.
"""

from rf_jax.weights.errors import MissingPackageError
from rf_jax.weights.errors import UnsafeCheckpointError
from rf_jax.weights.errors import WeightsFileError
from rf_jax.weights.errors import WeightsFileNotFoundError
from rf_jax.weights.errors import WeightsMismatchError
from rf_jax.weights.files import load_weights_file
from rf_jax.weights.files import read_state_dict
from rf_jax.weights.files import save_weights_file
from rf_jax.weights.files import sha256_of
from rf_jax.weights.files import WEIGHTS_FORMAT
from rf_jax.weights.merge import merge
from rf_jax.weights.stem import new_stem_slice
from rf_jax.weights.stem import widen_stem
from rf_jax.weights.study import load_pretrained
from rf_jax.weights.study import merge_pretrained
from rf_jax.weights.torchvision_resnet import check_resnet18
from rf_jax.weights.torchvision_resnet import flax_name_to_torch
from rf_jax.weights.torchvision_resnet import flax_to_torchvision
from rf_jax.weights.torchvision_resnet import resnet18_shapes
from rf_jax.weights.torchvision_resnet import torchvision_to_flax
