"""The model under every torch engine: the one frozen base per (model, device, dtype) of a process (base.py),
LoRA adapters on it (lora.py), the attention registration of the trainer's model (attention.py), adapter
checkpoints' integrity records (integrity.py), export to PEFT/merged folders (export.py), and handing freed
memory back to the OS (allocator.py)."""
