"""Finetuning for ScratchChat: instruction data, full SFT, LoRA adapters (peft), pretraining, judge evaluation.

Commands: ``python -m finetune sft|lora|pretrain|evaluate|bench`` (see each module). The commands are thin over the
shared training code: :mod:`finetune.args` (options, CLI), :mod:`finetune.runs` (base model and data setup),
:mod:`finetune.train` (the loop, metrics, plot), :mod:`finetune.checkpoint` (resume state) and
:mod:`finetune.distributed` (DDP and batching). Dependencies run one way: ``finetune -> engine, weights``; only
:mod:`finetune.lora` imports peft and only :mod:`finetune.train` matplotlib.
"""
