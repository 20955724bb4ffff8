# The interpreter flag is read when a Triton kernel is decorated, and importing diffusers or
# torch._dynamo imports triton: decide it before anything else is imported (torch itself does not
# import triton). Without a GPU the kernel tests run under the interpreter; on a GPU they run compiled,
# since the interpreter of triton 3.6 (the GPU image's) breaks with numpy >= 2.4. An explicit
# TRITON_INTERPRET in the environment always wins.
import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import zlib  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """Fresh but reproducible random inputs: each test gets its own seed, derived from its name."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-model tests (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    on tiny models extra threads only add contention, several times slower on a busy 2-core CI."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def assert_one_graph(fn, *args) -> None:
    """torch.compile traces ``fn(*args)`` as one graph: the custom ops in it cause no graph break."""
    explanation = torch._dynamo.explain(fn)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def fresh_seed() -> int:
    """A seed drawn from the per-test RNG, for builders that reseed the global RNG themselves (the tiny
    models, ``unet_inputs``): draw it before calling them."""
    return int(torch.randint(0, 2**31 - 1, ()))
