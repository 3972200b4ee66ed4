"""Property-based differential test: random layer configurations, every backend against the float64
oracle, the output and every gradient, within the bound of tests/bounds.py.

The configurations cover heads, n, k, k', dk, d and T (0 and 1 included), every gating and
activation, shared keys, separate embeddings per head, every query norm (batchnorm in training and
in eval), the pre-norm, float64 and float32, expert ids near the table end, duplicate picks across
heads, and exact score ties (small-integer inputs, where the tie rule decides every pick). Other
inputs are kept clear of near-ties (utils.untie_layer), where correct backends may differ.

CI runs the "ci" hypothesis profile (30 fixed examples: about two minutes on 2 cores, 97-132 s
measured there, 3.5 minutes with the cores shared by other work); a long random run is
`python -m pytest tests/test_differential.py --hypothesis-profile=long` (2,000 examples).
"""
import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import bounds
import peer_kernels
from conftest import DEVICE, device_for
from peer_kernels import _device, reference
from utils import NearTieError, untie_layer

BACKENDS = ["reference", "cpp"] + (["triton"] if DEVICE.type == "cuda" or _device.INTERPRETED else [])


@st.composite
def configs(draw):
    n = draw(st.integers(1, 6))
    k_sub = draw(st.integers(1, n))
    heads = draw(st.integers(1, 3))
    exact_ties = draw(st.booleans())
    return dict(
        T=draw(st.sampled_from([0, 1, 2, 3, 5, 8])), dim=draw(st.integers(1, 12)), heads=heads, n=n, k_sub=k_sub,
        k=draw(st.integers(1, min(k_sub * k_sub, 8))), dim_key=draw(st.integers(1, 6)),
        gating=draw(st.sampled_from(reference.GATINGS)), activation=draw(st.sampled_from(reference.ACTIVATIONS)),
        shared_keys=draw(st.booleans()), separate_embed_per_head=draw(st.booleans()),
        query_norm=None if exact_ties else draw(st.sampled_from(["batchnorm", "layernorm", None])),
        pre_rmsnorm=False if exact_ties else draw(st.booleans()), training=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float64, torch.float32])), favor_last=draw(st.booleans()),
        duplicate_heads=heads > 1 and draw(st.booleans()), exact_ties=exact_ties, seed=draw(st.integers(0, 2 ** 16)))


def build(c):
    """The layer and its input for configuration c, seeded."""
    torch.manual_seed(c["seed"])
    layer = peer_kernels.PEER(
        c["dim"], heads=c["heads"], num_experts=c["n"] ** 2, num_experts_per_head=c["k"], dim_key=c["dim_key"],
        product_key_topk=c["k_sub"], activation=c["activation"], gating=c["gating"], query_norm=c["query_norm"],
        pre_rmsnorm=c["pre_rmsnorm"], shared_keys=c["shared_keys"], separate_embed_per_head=c["separate_embed_per_head"],
        dtype=c["dtype"], device=DEVICE).train(c["training"])
    x = torch.randn(c["T"], c["dim"], dtype=c["dtype"], device=DEVICE)
    with torch.no_grad():
        for p in layer.parameters():          # off the initial values (norms at identity, ...)
            p.add_(torch.randn_like(p) * 0.2)
        if c["query_norm"] == "batchnorm":
            layer.query_norm.running_mean.normal_()
            layer.query_norm.running_var.uniform_(0.5, 2)
        if c["exact_ties"]:                   # small integers: every score exact, many equal
            x.copy_(torch.randint(-2, 3, x.shape))
            layer.to_queries.weight.copy_(torch.randint(-1, 2, layer.to_queries.weight.shape))
            layer.keys.copy_(torch.randint(-1, 2, layer.keys.shape))
        if c["duplicate_heads"]:              # heads 0 and 1 pick the same experts
            weight = layer.to_queries.weight.view(2, c["heads"], c["dim_key"], c["dim"])
            weight[:, 1] = weight[:, 0]
        shape_keys(layer, c)
    if not c["exact_ties"] and c["T"] > (1 if c["training"] and c["query_norm"] == "batchnorm" else 0):
        for _ in range(10):
            try:
                untie_layer(layer, x)
                break
            except NearTieError:              # the near-tie is in the parameters: redraw those that route
                with torch.no_grad():
                    layer.keys.normal_()
                    shape_keys(layer, c)
                    for p in layer.query_norm.parameters() if c["query_norm"] == "layernorm" else ():
                        p.normal_()           # a 1-wide layernormed half is its bias for every token
        else:
            raise NearTieError(f"config {c}: near-ties remain after 10 draws of the routing parameters")
    return layer, x


def shape_keys(layer, c):
    if c["favor_last"]:                       # the last sub-keys, hence the table's last rows, win
        layer.keys[:, -1] *= 3
    if c["duplicate_heads"] and not c["shared_keys"]:
        layer.keys[1] = layer.keys[0]


@given(configs())
def test_every_backend_matches_the_float64_oracle(c):
    layer, x = build(c)
    dy = torch.randn_like(x)

    def on(backend):
        """A copy of the layer on `backend`, and x, on that backend's device."""
        candidate = copy.deepcopy(layer).to(device_for(backend))
        candidate.backend = backend
        return candidate, x.to(device_for(backend))

    if c["T"] == 1 and c["training"] and c["query_norm"] == "batchnorm":
        for backend in BACKENDS:
            candidate, x_on = on(backend)
            with pytest.raises(ValueError, match="cannot normalise 1 token"):
                candidate(x_on)
        return
    if c["T"] == 0:
        for backend in BACKENDS:
            candidate, x_on = on(backend)
            assert candidate(x_on).shape == (0, c["dim"])
        return
    expected = bounds.expected_layer(layer, x, dy)
    for backend in BACKENDS:
        candidate, x_on = on(backend)
        try:
            bounds.check_all(bounds.layer_results(candidate, x_on, dy.to(x_on.device)), expected)
        except AssertionError as error:
            raise AssertionError(f"backend {backend!r}, config {c}: {error}") from None
