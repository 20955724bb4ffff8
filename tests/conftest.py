# The interpreter flag is read when a Triton kernel is decorated, and importing diffusers or
# torch._dynamo imports triton: set it before anything else is imported.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """Fresh but reproducible random inputs: each test gets its own seed, derived from its name."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
