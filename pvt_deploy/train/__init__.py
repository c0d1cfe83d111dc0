"""MMCR self-supervised pretraining and fine-tuning of PVT v2 (needs torch; ``pvt-deploy[train]``).

Modules: ``mmcr`` (objective, projector, momentum encoder), ``recipes`` (ours and birder's: optimizer, schedule,
augmentation, DDP conventions), ``augment`` and ``birder_augment`` (the two recipes' views on torch tensors),
``data`` (image folders, seeded resumable sampler, DataLoader), ``distributed`` (torchrun/DDP helpers), ``loop``
(optimizer, schedule, checkpoints, metrics, run.json), ``pretrain`` and ``finetune`` (the two runs),
``checkpoints`` (birder's file layout for training outputs, resume).
"""
