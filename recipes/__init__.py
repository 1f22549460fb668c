"""lmcor.recipes: how lmcor's own default corrector is built (data, noise model, training)."""
