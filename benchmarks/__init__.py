"""rf_jax against PyTorch: train/eval throughput, peak memory, input pipeline, conv profile.

`scripts/benchmark.py` is the command line. Every measurement runs in a fresh process (one per
framework run) so that imports, compiled code and heaps never leak from one into the next:

  orchestrate     the parent: spawns the children, alternates the frameworks A B A B over the
                  rounds, summarises, writes the JSON report
  summary         pooled images/s, rf_jax / PyTorch ratios, the markdown table
  jax_child       rf_jax's real steps (rf_jax.steps) on a random-init study model
  torch_child     the PyTorch reference (torch_models) with the same optimiser and loss
  torch_models    torchvision ResNet-18s matching the study models (shared with the tests)
  jax_patches     speed/memory experiments applied to the rf_jax child only (--jax-patch)
  convs           each ResNet-18 convolution shape timed alone (--conv-profile)
  op_profile      each train step's time per op kind, both frameworks (--profile)
  input_pipeline  host cost of the input pipeline: batches/s, CPU ms per chip
  common          settings, presets, timing and memory probes shared by all of them

It sits beside the rf_jax package, not in it: installing rf_jax installs none of it, and its
experiments (jax_patches' monkeypatches) stay out of whatever imports rf_jax. It runs from the
repository: scripts/benchmark.py puts the repository on sys.path, the children get it on
PYTHONPATH. torch is imported only inside the functions that run it.
"""
