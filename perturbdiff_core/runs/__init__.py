"""The runs layer: a run's config, its folder, training (and pre-training, transfer,
distributed), checkpoints, and the pipeline that predicts, evaluates and reports after training.

Orchestration over the layers below (data, mmd, diffusion, evaluation); nothing below imports it.
"""
