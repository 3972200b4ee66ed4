"""What is measured: shapes, presets, the ops (retrieval, experts, fused, layer, and step: the layer's
training step with an optimizer), their inputs,
byte and flop counts, and how an output is checked against the reference."""
import copy
import dataclasses
import math

import torch

from peer_kernels import PEER, reference

MODES = ("forward", "backward", "forward+backward", "step")
OPS = ("retrieval", "experts", "fused", "layer", "step")


def modes_of(op, modes):
    """The step op has one mode, the whole step (forward, backward, optimizer); the others the rest."""
    return ("step",) if op == "step" else tuple(m for m in modes if m != "step")
# The bench dtype's tolerance on the relative RMS error against the reference (which computes
# half-precision inputs in float32); a provider above it gets no row.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2}
# The checked inputs keep every top-k boundary at least this far from a tie. Scores are O(1) here
# (unit-variance queries and keys); implementations that compute in float32 differ by about 1e-6.
ROUTING_MARGIN = 1e-3


@dataclasses.dataclass(frozen=True)
class Shape:
    """T tokens, d model dim, n sub-keys per half (N = n*n experts), h heads, k experts per head,
    k_sub (k') sub-keys kept per half, dk sub-key dim."""
    T: int
    d: int
    n: int
    h: int
    k: int
    k_sub: int
    dk: int
    dtype: str = "bfloat16"
    activation: str = "gelu"
    gating: str = "softmax"

    @property
    def N(self):
        return self.n * self.n

    @property
    def torch_dtype(self):
        return getattr(torch, self.dtype)

    def label(self):
        return (f"T={self.T} d={self.d} N={self.n}^2 h={self.h} k={self.k} k'={self.k_sub} dk={self.dk} "
                f"{self.dtype}")


@dataclasses.dataclass(frozen=True)
class Preset:
    shapes: tuple
    ops: tuple = OPS
    modes: tuple = MODES
    left_out: tuple = ()         # (provider, why) pairs: run only when named with --providers
    check_tokens: int = None     # check on the first check_tokens tokens of an input set (None: all)
    cpu_dtype: str = None        # the shapes' dtype on a CPU (None: as they say)

    def shapes_on(self, device):
        """The shapes as run on `device`."""
        if device.type == "cuda" or self.cpu_dtype is None:
            return self.shapes
        return tuple(dataclasses.replace(shape, dtype=self.cpu_dtype) for shape in self.shapes)


PAPER = Shape(T=8192, d=1024, n=1024, h=8, k=16, k_sub=16, dk=128)


def _sweep_shapes():
    """The paper shape, then one axis at a time: N, T, d and h*k."""
    variants = [dict(n=n) for n in (128, 256, 512)]
    variants += [dict(T=T) for T in (2048, 4096, 16384)]
    variants += [dict(d=d) for d in (512, 2048)]
    variants += [dict(h=h, k=k, k_sub=k) for h, k in ((4, 16), (16, 16), (8, 32))]
    return (PAPER,) + tuple(dataclasses.replace(PAPER, **v) for v in variants)


PRESETS = {
    "paper": Preset(shapes=(PAPER,)),
    "sweep": Preset(shapes=_sweep_shapes(), ops=("experts", "fused", "layer"), modes=("forward", "forward+backward"),
                    left_out=(("compile", "it compiles again for every shape, minutes in all"),), check_tokens=4096),
    "cpu": Preset(shapes=(Shape(T=2048, d=256, n=256, h=4, k=8, k_sub=8, dk=64, dtype="float32"),),
                  left_out=(("compile", "compiling the four ops takes about a minute on 2 cores (cold cache), half "
                                        "of this preset's 2-minute budget"),)),
    # Checks the wiring of every provider: seconds; a few minutes with Triton under TRITON_INTERPRET=1.
    "smoke": Preset(shapes=(Shape(T=64, d=32, n=8, h=2, k=4, k_sub=4, dk=16, dtype="float32"),)),
}

# bench --dry-run's sizes: one token tile of the interpreter's 16, two heads; k and k' at most 4.
DRY_RUN = Shape(T=16, d=16, n=8, h=2, k=4, k_sub=4, dk=16)


def dry_run(preset):
    """The preset at interpreter sizes, for a dry run of its GPU code path on a CPU (bench --dry-run):
    each shape keeps its dtype (on the CPU too), gating and activation, its token count up to
    DRY_RUN's (so that a decode preset still straddles the interpreter's decode threshold), the
    other sizes are DRY_RUN's, and the shapes that differ only in size become one."""
    shapes = []
    for shape in preset.shapes:
        small = dataclasses.replace(DRY_RUN, T=min(shape.T, DRY_RUN.T), k=min(shape.k, DRY_RUN.k),
                                    k_sub=min(shape.k_sub, DRY_RUN.k_sub), dtype=shape.dtype,
                                    activation=shape.activation, gating=shape.gating)
        if small not in shapes:
            shapes.append(small)
    return dataclasses.replace(preset, shapes=tuple(shapes), check_tokens=None, cpu_dtype=None)


LAYER_PARAMS = ("to_queries.weight", "keys", "w_down", "w_up")


class Workload:
    """The inputs of one op at one shape: `shared` tensors (weights, keys, the layer module), one copy,
    and `sets` of per-token tensors (x, queries, ids, gates, and dy for the backward), several so that
    each set has left the cache by the time it comes round again."""

    def __init__(self, op, shape, device, shared, sets):
        self.op, self.shape, self.device, self.shared, self.sets = op, shape, device, shared, sets

    def inputs(self, i):
        return {**self.shared, **self.sets[i % len(self.sets)]}

    def for_check(self, tokens, dtype=None):
        """A one-set workload of set 0's first `tokens` tokens (all of them for None), optionally
        cast to `dtype` (then the shared tensors are copies, a layer module a deep copy)."""
        def leaf(t):
            cast = dtype if dtype is not None and t.is_floating_point() else t.dtype
            return t.detach().to(cast).requires_grad_(t.requires_grad)

        token_dim = 1 if self.op in ("layer", "step", "decode") else 0
        first = {name: leaf(t.narrow(token_dim, 0, min(tokens or t.shape[token_dim], t.shape[token_dim])))
                 for name, t in self.sets[0].items()}
        if dtype is None:
            return Workload(self.op, self.shape, self.device, self.shared, [first])
        shared = {name: copy.deepcopy(t).to(dtype) if isinstance(t, torch.nn.Module) else leaf(t)
                  for name, t in self.shared.items()}
        shape = dataclasses.replace(self.shape, dtype=str(dtype).removeprefix("torch."))
        return Workload(self.op, shape, self.device, shared, [first])


def _param(shape, std, dtype, device):
    return (torch.randn(shape, device=device) * std).to(dtype).requires_grad_()


def _retrieved(queries, keys, shape):
    """Expert ids and gates as the model would route them (distinct ids within a head)."""
    with torch.no_grad():
        scores, ids = reference.product_key_topk(queries, keys, shape.k, shape.k_sub)
        return ids, reference.gate(scores, shape.gating).to(queries.dtype)


def _separate_near_ties(tokens, queries_of, keys, shape, rounds=50):
    """Redraws the rows of `tokens` (T, ...) whose routing has a near-tie (routing_margin below
    ROUTING_MARGIN) until none has. Two correct implementations may break a near-tie differently
    (summation order), and one expert picked otherwise changes that token's output and two rows of
    the table gradients by far more than rounding: the check inputs must leave no such choice."""
    rows = torch.arange(tokens.shape[0], device=tokens.device)  # those still to look at
    with torch.no_grad():
        for _ in range(rounds):
            margin = reference.routing_margin(queries_of(tokens[rows]), keys, shape.k, shape.k_sub)
            rows = rows[margin < ROUTING_MARGIN]
            if not len(rows):
                return
            tokens[rows] = torch.randn_like(tokens[rows])


def make_workload(op, shape, device, num_sets):
    """Fresh random inputs at unit scale: x ~ N(0, 1), queries ~ N(0, 1), keys ~ N(0, 1/dk) and
    expert rows ~ N(0, 1/d), so sub-key scores, u.x and y all have unit-order variance. Seeded: the
    same preset draws the same inputs. Set 0, the one checked, has no near-tie in its routing."""
    torch.manual_seed(0)
    if op == "decode":
        return _decode_workload(shape, device, num_sets)
    dtype = shape.torch_dtype
    T, d, h, dk = shape.T, shape.d, shape.h, shape.dk
    if op in ("layer", "step"):
        layer = PEER(d, heads=h, num_experts=shape.N, num_experts_per_head=shape.k, dim_key=dk,
                     product_key_topk=shape.k_sub, activation=shape.activation, gating=shape.gating,
                     query_norm=None, backend="reference", device=device, dtype=dtype)
        sets = [{"x": _param((1, T, d), 1.0, dtype, device),
                 "dy": torch.randn(1, T, d, device=device, dtype=dtype)} for _ in range(num_sets)]
        _separate_near_ties(sets[0]["x"][0], layer.queries, layer.keys, shape)
        return Workload(op, shape, device, {"layer": layer}, sets)
    keys = _param((h, shape.n, 2, dk), dk ** -0.5, dtype, device)
    shared, sets = {}, []
    if op in ("retrieval", "fused"):
        shared["keys"] = keys
    if op in ("experts", "fused"):
        shared["w_down"] = _param((shape.N, d), d ** -0.5, dtype, device)
        shared["w_up"] = _param((shape.N, d), d ** -0.5, dtype, device)
    for _ in range(num_sets):
        queries = _param((T, h, 2, dk), 1.0, dtype, device)
        if not sets and op != "experts":  # the expert op is checked with its ids given: no ties
            _separate_near_ties(queries, lambda q: q, keys, shape)
        if op == "retrieval":
            sets.append({"queries": queries, "dy": torch.randn(T, h, shape.k, device=device)})
            continue
        x = _param((T, d), 1.0, dtype, device)
        dy = torch.randn(T, d, device=device, dtype=dtype)
        if op == "fused":
            sets.append({"x": x, "queries": queries, "dy": dy})
        else:
            ids, gates = _retrieved(queries, keys, shape)
            sets.append({"x": x, "expert_ids": ids, "gates": gates.requires_grad_(), "dy": dy})
    return Workload(op, shape, device, shared, sets)


def num_input_sets(op, shape, device):
    """Enough input sets to cover 4x the GPU's L2 cache (at least 2, at most 8); 2 on a CPU."""
    if device.type != "cuda":
        return 2
    size = shape.torch_dtype.itemsize
    rows = {"x": shape.d * size, "dy": shape.d * size, "queries": shape.h * 2 * shape.dk * size,
            "ids_gates": shape.h * shape.k * (8 + size), "scores_dy": shape.h * shape.k * 4}
    per_token = sum(rows[name] for name in {
        "retrieval": ("queries", "scores_dy"), "experts": ("x", "dy", "ids_gates"),
        "fused": ("x", "dy", "queries"), "layer": ("x", "dy"), "step": ("x", "dy"), "decode": ("x",)}[op])
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return max(2, min(8, math.ceil(4 * l2 / (per_token * shape.T))))


# ---- calling an op --------------------------------------------------------------------------------

def call(op, runner, inputs, shape):
    """The op's outputs as a tuple; the first is the one the backward starts from."""
    if op == "retrieval":
        return runner.fn(inputs["queries"], inputs["keys"], shape.k, shape.k_sub)
    if op == "experts":
        return (runner.fn(inputs["x"], inputs["expert_ids"], inputs["gates"], inputs["w_down"], inputs["w_up"],
                          shape.activation),)
    if op == "fused":
        return (runner.fn(inputs["x"], inputs["queries"], inputs["keys"], inputs["w_down"], inputs["w_up"],
                          shape.k, shape.k_sub, shape.gating, shape.activation),)
    if op == "decode":
        with torch.no_grad():
            return (runner.fn(inputs["x"]),)
    return (runner.fn(inputs["x"]),)


GRAD_INPUTS = {"retrieval": ("queries", "keys"), "experts": ("x", "gates", "w_down", "w_up"),
               "fused": ("x", "queries", "keys", "w_down", "w_up"), "layer": ("x",), "step": ("x",)}


def grad_targets(op, runner, inputs):
    """What the backward differentiates: the op's float inputs; for the layer, x and its parameters
    (in LAYER_PARAMS order, whatever the module calls them)."""
    return [inputs[name] for name in GRAD_INPUTS[op]] + list(runner.params)


def backward(op, runner, inputs, outputs):
    """Gradients of <outputs[0], dy> (None where an input is unused), never accumulated into .grad."""
    return torch.autograd.grad(outputs[0], grad_targets(op, runner, inputs), inputs["dy"], allow_unused=True)


# ---- checking ------------------------------------------------------------------------------------

def rel_rms(actual, expected, chunk=1 << 24):
    """||actual - expected|| / ||expected|| in float64, over chunks of `chunk` elements so that a
    gradient of a billion-element table needs no float64 copy of itself. inf if actual is not finite."""
    if actual is None and expected is None:
        return 0.0
    actual = torch.zeros_like(expected) if actual is None else actual.detach()
    expected = torch.zeros_like(actual) if expected is None else expected.detach()
    if actual.shape != expected.shape:
        return math.inf
    squared_error = squared_norm = 0.0
    for a, e in zip(actual.reshape(-1).split(chunk), expected.reshape(-1).split(chunk)):
        a, e = a.double(), e.double()
        if not torch.isfinite(a).all():
            return math.inf
        squared_error += (a - e).square().sum().item()
        squared_norm += e.square().sum().item()
    return math.sqrt(squared_error) / max(math.sqrt(squared_norm), 1e-30)


def _retrieval_error(outputs, expected, inputs, shape):
    """Scores against the reference's scores; and the ids must be what the scores say: distinct
    within a head, in range, and scoring (by the reference's sub-key scores) what was returned.
    Ids themselves may differ from the reference's on (near-)ties, so they are not compared."""
    scores, ids = outputs
    if ids.shape != expected[1].shape or ids.min() < 0 or ids.max() >= shape.N:
        return math.inf
    if (ids.sort(dim=-1).values.diff(dim=-1) == 0).any():
        return math.inf
    with torch.no_grad():
        sub = reference.sub_key_scores(inputs["queries"], inputs["keys"])  # (T, h, 2, n)
        rescored = sub[:, :, 0].gather(-1, ids // shape.n) + sub[:, :, 1].gather(-1, ids % shape.n)
    return max(rel_rms(scores, expected[0]), rel_rms(scores, rescored))


def output_error(op, outputs, expected, inputs, shape):
    if op == "retrieval":
        return _retrieval_error(outputs, expected, inputs, shape)
    return rel_rms(outputs[0], expected[0])


def grad_error(grads, expected):
    return max(rel_rms(g, e) for g, e in zip(grads, expected))


# ---- what a case moves and computes --------------------------------------------------------------

MODE_FACTOR = {"forward": 1, "backward": 2, "forward+backward": 3, "step": 3}


def gather_bytes(op, shape, mode):
    """Expert-row bytes: T*h*k rows of w_down and of w_up (d elements each) read by the forward; the
    backward reads them again and scatters as many row gradients. None for retrieval alone. For a
    decode step, all it must read (decode_floor_bytes), so that its share of the copy bandwidth is
    its share of the bytes floor."""
    if op == "retrieval":
        return None
    if op == "decode":
        return decode_floor_bytes(shape)
    size = shape.torch_dtype.itemsize
    return MODE_FACTOR[mode] * shape.T * shape.h * shape.k * 2 * shape.d * size


def flops(op, shape, mode):
    """Matmul flops of the forward (backward counted as twice the forward): sub-key scores
    2*T*h*2*n*dk, experts 2*2*T*h*k*d, the layer's query projection 2*T*d*2*h*dk."""
    T = shape.T
    retrieval = 2 * T * shape.h * 2 * shape.n * shape.dk
    experts = 4 * T * shape.h * shape.k * shape.d
    forward = {"retrieval": retrieval, "experts": experts, "fused": retrieval + experts,
               "layer": 2 * T * shape.d * 2 * shape.h * shape.dk + retrieval + experts}[
        op if op not in ("step", "decode") else "layer"]
    return MODE_FACTOR[mode] * forward


# ---- decode: the layer's inference step at a few tokens per step ------------------------------------------

DECODE_TOKENS = (1, 8, 64, 512)
# The paper's layer at the token counts of a decode step (one token per running sequence): bf16 on a
# GPU, fp32 on a CPU.
PRESETS["decode"] = Preset(shapes=tuple(dataclasses.replace(PAPER, T=T) for T in DECODE_TOKENS), ops=("decode",),
                           modes=("forward",), cpu_dtype="float32")
_DECODE_LAYERS = {}


def decode_floor_bytes(shape):
    """What a decode step must read: the query projection (d x 2*h*dk), the per-head sub-keys
    (h*n*2*dk) and the T*h*k rows of both expert tables (d each)."""
    size = shape.torch_dtype.itemsize
    return size * (shape.d * 2 * shape.h * shape.dk + shape.h * shape.n * 2 * shape.dk
                   + shape.T * shape.h * shape.k * 2 * shape.d)


def _decode_workload(shape, device, num_sets):
    """The layer in eval mode (no query norm, as the layer op's) and `num_sets` inputs (1, T, d). The
    layer is made once per shape but T, and kept: at the paper's shapes in fp32 its tables are
    8 GB, drawn in a minute on 2 cores."""
    key = (dataclasses.replace(shape, T=0), str(device))
    if key not in _DECODE_LAYERS:
        _DECODE_LAYERS.clear()
        _DECODE_LAYERS[key] = PEER(shape.d, heads=shape.h, num_experts=shape.N, num_experts_per_head=shape.k,
                                   dim_key=shape.dk, product_key_topk=shape.k_sub, activation=shape.activation,
                                   gating=shape.gating, query_norm=None, backend="reference", device=device,
                                   dtype=shape.torch_dtype).eval()
    layer = _DECODE_LAYERS[key]
    sets = [{"x": torch.randn(1, shape.T, shape.d, device=device, dtype=shape.torch_dtype)} for _ in range(num_sets)]
    _separate_near_ties(sets[0]["x"][0], layer.queries, layer.keys, shape)
    return Workload("decode", shape, device, {"layer": layer}, sets)
