"""The training engine: process groups and DeepSpeed set-up, the training loop, metrics.

``distributed`` creates the process group for each launcher; ``deepspeed_config`` loads the shipped
ZeRO configs and fills their "auto" values from the recipe.
"""
