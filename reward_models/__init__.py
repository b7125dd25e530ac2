"""Reward models: one module per family, all behind `visalign.RewardModel`."""
