"""Finetuning for ScratchChat: instruction data, full SFT, LoRA adapters (peft), pretraining, judge evaluation.

Commands: ``python -m finetune sft|lora|pretrain|evaluate|bench`` (see each module). Dependencies run one way:
``finetune -> engine, weights``; only :mod:`finetune.lora` imports peft and only :mod:`finetune.train` matplotlib.
"""
