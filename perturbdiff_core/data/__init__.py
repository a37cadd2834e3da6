"""From AnnData perturbation screens to validated cell sets, splits and loaders."""
