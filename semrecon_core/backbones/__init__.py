"""Deep reconstruction backbones: U-Net, unrolled network, SIREN INR, LoRA adaptation, warm starts.

The engines in :mod:`semrecon_core.backbones.finetune` (``reconstruct_unet``, ``reconstruct_unrolled``,
``reconstruct_inr``) fit them scan-specifically; ``semrecon pretrain`` (:mod:`.pretrain`) makes warm starts.
Nothing here is imported by ``semrecon --help``.
"""
