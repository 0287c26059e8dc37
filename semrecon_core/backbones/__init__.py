"""Deep reconstruction backbones: U-Net, unrolled network, SIREN INR, LoRA adaptation, warm starts.

Networks only: the engines in :mod:`semrecon_core.engines` fit them scan-specifically and
``semrecon pretrain`` (:mod:`.pretrain`) makes warm starts.
Nothing here is imported by ``semrecon --help``.
"""
