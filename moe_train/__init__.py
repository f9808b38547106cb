"""moe-train: DeepSeek V2 MoE full fine-tuning with sharded experts."""
