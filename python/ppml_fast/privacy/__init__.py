"""DP training: PrivacyEngine, DPOptimizer, per-sample norms and clipped sums."""
