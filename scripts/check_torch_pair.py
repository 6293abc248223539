"""Exit 0 when torch and torchvision are installed and work together, 1 otherwise.

The Makefile calls this to keep a user's matching pair rather than reinstalling one:
an unmatched pair imports but fails on the first compiled op (torchvision::nms).
"""

import sys

try:
    import torch
    import torchvision

    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    torchvision.ops.nms(boxes, torch.tensor([1.0]), 0.5)
except Exception as exc:  # any failure means "install the pinned pair"
    print(f"torch/torchvision pair not usable: {exc!r}", file=sys.stderr)
    sys.exit(1)
print(f"torch {torch.__version__} + torchvision {torchvision.__version__}: OK")
