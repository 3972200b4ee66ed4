"""Run by tests/test_install.py with the fresh environment's Python, from a folder outside the
repository: a small forward and backward on each backend and an optimizer step, asserting that each
ran the installed wheel's code and not a fallback. Argument: the fresh environment's site-packages.

A backend that falls back says so with a warning starting "peer_kernels": here that is an error.
Triton kernel launches are recorded at the interpreter's entry point, so the Triton backend and the
optimizer count as run only if a kernel of peer_kernels.kernels was launched.
"""
import importlib.metadata
import os
import pkgutil
import sys
import warnings
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET") == "1", "the Triton kernels run under the interpreter here"
warnings.filterwarnings("error", message="peer_kernels")

import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import peer_kernels  # noqa: E402
import peer_kernels.kernels  # noqa: E402
import peer_kernels.ops  # noqa: E402  (the Triton ops: what the wheel of 0.1.0's first cut could not import)

site_packages = Path(sys.argv[1]).resolve()
for module in pkgutil.walk_packages(peer_kernels.__path__, "peer_kernels."):
    imported = __import__(module.name, fromlist=["_"])
    assert site_packages in Path(imported.__file__).resolve().parents, (module.name, imported.__file__)
assert importlib.metadata.version("peer_kernels") == peer_kernels.__version__
assert not any("__editable__" in type(finder).__module__ for finder in sys.meta_path), sys.meta_path

launched = []
_run = InterpretedFunction.run


def _recording_run(self, *args, **kwargs):
    launched.append(f"{self.fn.__module__}.{self.fn.__name__}")
    return _run(self, *args, **kwargs)


InterpretedFunction.run = _recording_run

SHAPE = dict(heads=2, num_experts=8 ** 2, num_experts_per_head=3, dim_key=4, query_norm="layernorm")
torch.manual_seed(0)
x = torch.randn(2, 5, 16)
oracle = peer_kernels.PEER(16, **SHAPE, backend="reference")
y_oracle = oracle(x)
y_oracle.square().mean().backward()
# from this seed every token's routing is clear of near-ties, so every backend picks the same experts
margin = peer_kernels.reference.routing_margin(oracle.queries(x.flatten(0, 1)).detach(), oracle.keys.detach(),
                                               SHAPE["num_experts_per_head"])
assert margin.min() > 1e-3, margin


def run(backend):
    """Forward and backward on `backend` with the oracle's weights; the backend the layer resolved to."""
    layer = peer_kernels.PEER(16, **SHAPE, backend=backend)
    layer.load_state_dict(oracle.state_dict())
    y = layer(x)
    y.square().mean().backward()
    torch.testing.assert_close(y, y_oracle, rtol=1e-4, atol=1e-5)
    for (name, param), expected in zip(layer.named_parameters(), oracle.parameters()):
        torch.testing.assert_close(param.grad, expected.grad, rtol=1e-4, atol=1e-5, msg=name)
    return layer.resolved_backend


assert run("triton") == "triton"
assert launched and all(name.startswith("peer_kernels.kernels.") for name in launched), launched
print("triton: ran", sorted(set(launched)))

launched.clear()
assert run("auto") == "cpp", "auto on a CPU resolves to the C++ backend when it builds"
assert not launched, launched
print("cpp: ran from", peer_kernels.csrc.sources_dir())
assert site_packages in peer_kernels.csrc.sources_dir().parents

layer = peer_kernels.PEER(16, **SHAPE, sparse_grad=True, backend="cpp")
layer(x).square().mean().backward()
touched = layer.w_up.grad.coalesce().indices()[0]
before = layer.w_up.detach().clone()
launched.clear()
optimizer = peer_kernels.optim.SparseAdamW([layer.w_down, layer.w_up], lr=1e-2)
optimizer.step()
assert launched and all(name.startswith("peer_kernels.kernels.optim.") for name in launched), launched
untouched = torch.ones(len(before), dtype=torch.bool)
untouched[touched] = False
assert torch.equal(layer.w_up[untouched], before[untouched])
assert not torch.equal(layer.w_up[touched], before[touched])
print("optim: ran", sorted(set(launched)))
