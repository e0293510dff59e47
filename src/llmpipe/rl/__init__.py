"""Reinforcement learning from preferences: pairs, judges, the reward model, GRPO and REINFORCE."""
