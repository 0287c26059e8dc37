"""semrecon core: vision-language semantic priors for MRI reconstruction.

Import-light on purpose: heavy libraries (torch models, transformers, sigpy) are imported
where they are used, so ``semrecon --help`` stays fast.
"""

__version__ = "0.1.0"
