"""Training: the one loop, heads on cached features, cross-fitting over the shared folds."""
