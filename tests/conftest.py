"""Session-wide test setup, run before any test module is imported.

TRITON_INTERPRET must be set before the first `import triton`, and modules other than
test_ops_triton import it indirectly (transformers' model classes import triton when it is
installed, so test_hf would otherwise make test_ops_triton's CPU kernels fail). CPU tensors never
dispatch to the Triton kernels (ops.triton_registry), so this only affects direct kernel calls.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
