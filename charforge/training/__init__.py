"""Training: LoRA/QLoRA adapters with TRL + PEFT, their servable export and checks."""
