"""finetune: curated synthetic text -> packed blocks -> peft LoRA adapter."""
