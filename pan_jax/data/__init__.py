"""Datasets and input pipelines.

  sources    - dataset metadata and random-access splits (tfds or in-memory)
  pipeline   - grain train / eval pipelines
  transforms - augmentation and normalisation acting on image and mask
  prepare    - `python -m pan_jax.data.prepare`: builds the tfds datasets
  records    - turns source image / label files into checked records
  builder    - the tfds builder that writes them as array_record
  voc, cityscapes, folder, synthetic - what each source dataset looks like

Nothing here imports TensorFlow.
"""
