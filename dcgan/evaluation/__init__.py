"""Evaluation of a trained run (layer: dcgan): the paper's feature + L2-SVM protocols, latent walks and arithmetic,
forgetting, guided backprop, memorisation checks and FID/KID, driven by `driver.evaluate`."""
