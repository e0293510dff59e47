"""The checkable task: problems with one right answer, SFT on them, RL against the checker."""
