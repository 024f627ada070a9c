"""The fast paths of nanoprompt, each tested against the readable form it replaces, never required to run:
fused Triton kernels (each file: kernel(s), autograd wrapper and PyTorch reference) and the captured
CUDA-graph training step (captured.py), and vprompt.py's text pass of prompts that share their first
tokens (shared_prefix.py).

HAS_TRITON is False when triton is missing: the names still import, the kernel entry points then
raise, and the references (plain PyTorch) work everywhere. kernel_available(device) says whether the
kernels can run on a device (CUDA, or CPU when TRITON_INTERPRET=1 was set before this import).
"""
from .kl_ce import (HAS_TRITON, INTERPRETED, KLCELoss, KLCEStats, fused_kl_ce, kernel_available,
                    kl_ce_reference, promptsrc_logit_loss, promptsrc_logit_loss_reference, proreg_loss,
                    proreg_loss_reference)
from .captured import CapturedStep
from .shared_prefix import shared_prefix_encode
from .gpa import (GaussianPromptAverage, gpa_sum_reference, gpa_update_, gpa_update_reference,
                  gpa_weights)

__all__ = ["CapturedStep", "HAS_TRITON", "INTERPRETED", "KLCELoss", "KLCEStats", "fused_kl_ce", "kernel_available",
           "kl_ce_reference", "promptsrc_logit_loss", "promptsrc_logit_loss_reference", "proreg_loss",
           "proreg_loss_reference", "GaussianPromptAverage", "gpa_sum_reference", "gpa_update_",
           "gpa_update_reference", "gpa_weights", "shared_prefix_encode"]
