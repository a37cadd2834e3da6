"""The MMD layer: kernels, kernel reductions, MMD estimators, kernel mean embeddings, the
two-sample test (and the E-test over an AnnData built on it).

Interfaces: :class:`~perturbdiff_core.mmd.kernels.Kernel`,
:class:`~perturbdiff_core.mmd.reductions.KernelReduction`,
:class:`~perturbdiff_core.mmd.estimators.MMDEstimator` and
:class:`~perturbdiff_core.mmd.embeddings.EmbeddingMap`; the plug-ins that implement them are
found through entry points. Imports the foundation and :mod:`perturbdiff_core.data` only.
"""
