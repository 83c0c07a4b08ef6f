"""LoRA adapter lifecycle: validation of PEFT folders and the persisted registry."""
