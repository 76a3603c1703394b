"""Where in the scan a diagnosis comes from: relevance maps in the scan's own voxel grid, a montage, a row block.

- target.py: the class margin, log p(c) - logsumexp over the other classes, in torch (differentiable) and numpy.
- rules.py: the attention relevance rules (Chefer et al., ICCV 2021) as small matrix updates.
- recorder.py: attention probabilities kept, with their gradients, while the model runs.
- llm_rollout.py: the LLM's relevance over its input positions, one class per LLM family.
- relevance.py: gradient-weighted relevance from the LLM through the Q-Former and the ViT to the patches,
  refined inside each patch by a gradient attribution against the local mean.
- occlusion.py: each patch replaced by the volume's background, forward only, on any backend.
- grid.py: the preprocessing undone: model-input grid <-> the scan's own voxels and affine.
- storage.py: one scan stored flipped, permuted or anisotropic (the placement checks' files).
- checks.py: pointing game, randomisation, deletion and placement on a model with a known answer.
- montage.py: the PNG; block.py: the row's `explanation` and the files; run.py: one scan end to end.
"""
