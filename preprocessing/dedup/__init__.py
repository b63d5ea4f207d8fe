"""De-duplication (paper section 4.1), one module a step (layer: preprocessing):

- `model`: the 3072-128-3072 denoising, dropout-regularised ReLU autoencoder and its training (locally, in one Ray task on
  CPUs, or on Ray Train on GPUs);
- `semantic_hash`: its code layer binarised at ReLU > 0, packed into 16-byte hashes;
- `views`: each image hashed in shifted and zoomed crops (`grid`: the fixed order of those views);
- `groups`: images sharing a code, grouped in linear time;
- `verify`: candidate pairs accepted or refused on the two images' aligned pixels, star groups from verified pairs;
- `report`: what was removed and a picture of the largest groups;
- `dataset`: `dcgan dedup` and a build's dedup step, phase by phase.

Nothing is imported here, so that a light module (`grid`, read by the configuration) stays light.
"""
