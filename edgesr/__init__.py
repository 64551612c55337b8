"""edgesr: prune super-resolution networks, convert them for phones and boards, measure them there.

This package holds what every stage shares and that needs only numpy and Pillow: errors and exit codes,
image I/O, the bundled and user data sets, PSNR/SSIM, and manifests. The stages live beside it:
``compress`` (torch), ``convert`` (litert-torch, coremltools), ``device_bench`` (no torch).
"""

__version__ = "0.1.0"
