"""The dispatcher: supports() decides, per call, between a backend's kernel, native and a
refusal; "accelerated" is what a class defines; native_ran sees every native body run."""
import pytest
import torch

from halserve import hal
from halserve.errors import OpRefused
from halserve.hal.interface import OPS, SPEC_KEYS, MoeSpec, ProbeResult, spec_of
from halserve.hal.native import NativeBackend


class Doubling(NativeBackend):
    """A 'kernel' for silu_and_mul that is visibly not native (twice the answer), and one for
    rms_norm that hides a super() call."""

    name = "doubling"

    @classmethod
    def probe(cls):
        return ProbeResult(0, "test double")

    def supports(self, op, **spec):
        if op == "silu_and_mul" and spec.get("dtype") == torch.float16:
            return "native fallback: no fp16 kernel"
        if op == "silu_and_mul" and spec.get("intermediate_size") == 3:
            return "refused: intermediate size 3 is too odd"
        return super().supports(op, **spec)

    def silu_and_mul(self, x, out=None):
        i = x.shape[-1] // 2
        y = 2 * torch.nn.functional.silu(x[..., :i]) * x[..., i:]
        return y if out is None else out.copy_(y)

    def rms_norm(self, x, weight, eps, residual=None, out=None):
        return super().rms_norm(x, weight, eps, residual, out)


def _native_silu(x):
    return NativeBackend().silu_and_mul(x)


def test_routes_by_supports_kernel_native_refused():
    b = Doubling()
    x = torch.randn(3, 8)
    assert torch.allclose(b.silu_and_mul(x), 2 * _native_silu(x))
    assert b.native_ran["silu_and_mul"] == 0
    xh = x.half()
    assert torch.equal(b.silu_and_mul(xh), _native_silu(xh))
    assert b.native_ran["silu_and_mul"] == 1
    with pytest.raises(OpRefused, match=r"silu_and_mul\(.*intermediate_size=3.*too odd"):
        b.silu_and_mul(torch.randn(2, 6))
    # out= form goes the same way
    out = torch.empty(3, 4)
    assert b.silu_and_mul(x, out=out) is out and torch.allclose(out, 2 * _native_silu(x))


def test_supports_is_asked_once_per_spec():
    b = Doubling()
    asked = []
    real = b.supports
    b.supports = lambda op, **spec: asked.append((op, spec)) or real(op, **spec)
    x = torch.randn(3, 8)
    for _ in range(3):
        b.silu_and_mul(x)
    b.silu_and_mul(torch.randn(5, 8))  # same spec: rows are not part of it
    b.silu_and_mul(torch.randn(3, 10))
    assert [s["intermediate_size"] for _, s in asked] == [4, 5]
    assert asked[0][1] == spec_of("silu_and_mul", x)


def test_accelerated_is_derived_from_methods():
    assert NativeBackend.kernel_ops == frozenset()
    assert Doubling.kernel_ops == {"silu_and_mul", "rms_norm"}

    class Child(Doubling):  # inherits the kernels of a parent other than native
        name = "child"

    assert Child.kernel_ops == Doubling.kernel_ops

    class Liar(NativeBackend):  # a hand-kept set and a supports() that claim what is not there
        name = "liar"
        accelerated_ops = frozenset({"attention"})

        def supports(self, op, **spec):
            return True if op in OPS else super().supports(op, **spec)

    liar = Liar()
    assert Liar.kernel_ops == frozenset()
    assert liar.supports("attention").startswith("native fallback")
    assert liar.supports("nope").startswith("refused")
    assert Doubling().supports("silu_and_mul") is True
    assert Doubling().supports("attention").startswith("native fallback")


def test_native_ran_counts_hidden_super_calls():
    b = Doubling()
    x, w = torch.randn(4, 16), torch.ones(16)
    assert b.supports("rms_norm", **spec_of("rms_norm", x, w, 1e-6)) is True  # reported accelerated...
    b.rms_norm(x, w, 1e-6)
    assert b.native_ran["rms_norm"] == 1  # ...yet native ran: the suite can now see that
    n = NativeBackend()
    n.rms_norm(x, w, 1e-6)
    assert not n.native_ran  # the native backend running its own ops is not a fallback


def test_spec_of_matches_the_engine_call():
    b = NativeBackend()
    w = b.pack_weight(torch.randn(24, 16), "int8")
    spec = spec_of("linear", torch.randn(5, 16), w, torch.zeros(24))
    assert spec == {"dtype": torch.float32, "scheme": "int8", "act_scheme": "none", "k": 16, "n": 24,
                    "bias": True, "out": False, "contiguous": True}
    q = torch.randn(3, 4, 8)
    k = torch.randn(3, 2, 8)
    spec = spec_of("rotary", torch.arange(3), q, k, torch.randn(10, 6), False)
    assert (spec["head_dim"], spec["rot_dim"], spec["is_neox"], spec["num_heads"], spec["num_kv_heads"]) == \
        (8, 6, False, 4, 2)
    qkv = torch.randn(3, 16, 8)
    assert spec_of("rotary", torch.arange(3), qkv[:, :4], qkv[:, 4:6], torch.randn(10, 8))["contiguous"] is False
    moe = spec_of("moe", torch.randn(2, 8), torch.randn(2, 6), w, w, MoeSpec(top_k=2, num_expert_group=3))
    assert (moe["num_experts"], moe["top_k"], moe["num_expert_group"], moe["scoring"]) == (6, 2, 3, "softmax")
    for op in OPS:
        assert len(set(SPEC_KEYS[op])) == len(SPEC_KEYS[op])
    with pytest.raises(ValueError, match="unknown op"):
        spec_of("conv2d")


def test_native_refuses_a_dtype_it_lacks():
    class NoHalf(NativeBackend):
        name = "nohalf"

        @property
        def capabilities(self):
            caps = super().capabilities
            caps.dtypes = ("float32",)
            return caps

    with pytest.raises(OpRefused, match="float16"):
        NoHalf().silu_and_mul(torch.randn(2, 4).half())


def test_describe_is_true_for_native_and_a_backend():
    line = NativeBackend().describe()
    assert "accelerated=[none]" in line and "native=[" + ", ".join(OPS) + "]" in line
    line = Doubling().describe()
    assert "accelerated=[rms_norm, silu_and_mul]" in line


def _only(monkeypatch, eps: dict, known=("native",)):
    monkeypatch.setattr(hal, "_entry_points", lambda: eps)
    monkeypatch.setattr(hal, "KNOWN_BACKENDS", {n: hal.KNOWN_BACKENDS[n] for n in known})
    monkeypatch.setattr(hal, "_registered", {})
    monkeypatch.delenv(hal.ENV_VAR, raising=False)


def _ep(name: str, score: int, base=NativeBackend):
    cls = type(name.title(), (base,), {"name": name, "probe": classmethod(lambda c: ProbeResult(score, "oot"))})

    class Ep:
        value = f"pkg:{name}"

        def load(self):
            return cls

    Ep.name = name
    return Ep()


def test_out_of_tree_backend_through_the_registry(monkeypatch):
    _only(monkeypatch, {"zed": _ep("zed", 5, Doubling)})
    b = hal.select()
    assert b.name == "zed" and b.kernel_ops == Doubling.kernel_ops
    x = torch.randn(2, 8)
    assert torch.allclose(b.silu_and_mul(x), 2 * _native_silu(x))
    monkeypatch.setenv(hal.ENV_VAR, "native")
    assert hal.select().name == "native"


def test_probe_tie_rule(monkeypatch):
    # equal scores: in-tree preference order first, then out-of-tree by name
    _only(monkeypatch, {"bravo": _ep("bravo", 1), "alpha": _ep("alpha", 1)})
    assert hal.select().name == "native"
    assert [r[0] for r in hal.available()] == ["native", "alpha", "bravo"]
    _only(monkeypatch, {"bravo": _ep("bravo", 3), "alpha": _ep("alpha", 3)})
    assert hal.select().name == "alpha"
    _only(monkeypatch, {"bravo": _ep("bravo", 4), "alpha": _ep("alpha", 3)})
    assert hal.select().name == "bravo"


def test_cuda_fallbacks_are_answers_not_code_paths():
    """cuda's stride and int8 fallbacks used to hide in its op bodies while supports() said
    True; now they are supports answers, the native op runs, and native_ran shows it. Only
    the fallback paths run here (no Triton kernel is launched)."""
    from halserve.hal.cuda import CudaBackend

    b, n = CudaBackend(device="cpu"), NativeBackend()
    cache = torch.randn(20, 8)
    q = torch.randn(3, 4, 16)[..., ::2]  # head dim with stride 2
    k = torch.randn(3, 2, 16)[..., ::2]
    spec = spec_of("rotary", torch.arange(3), q, k, cache)
    assert b.supports("rotary", **spec).startswith("native fallback")
    q2, k2 = q.clone(), k.clone()
    b.rotary(torch.arange(3), q, k, cache)
    n.rotary(torch.arange(3), q2, k2, cache)
    assert torch.equal(q, q2) and torch.equal(k, k2) and b.native_ran["rotary"] == 1

    w = b.pack_weight(torch.randn(24, 16), "int8")
    x = torch.randn(5, 16)
    assert b.supports("linear", **spec_of("linear", x, w)).startswith("native fallback")
    assert torch.equal(b.linear(x, w), n.linear(x, w)) and b.native_ran["linear"] == 1

    kv = torch.zeros(2, 8, 4, 2, 8)[:, :4]  # a non-contiguous cache (half the blocks of a bigger one)
    key, val = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    assert b.supports("write_kv", **spec_of("write_kv", key, val, kv, torch.arange(3))).startswith("native")
    b.write_kv(key, val, kv, torch.tensor([0, -1, 5]))
    assert b.native_ran["write_kv"] == 1


def test_every_backend_op_takes_the_interface_keywords():
    """A backend's op method accepts every keyword-only parameter the interface's op has (a
    caller passing ``k_scale=1.0`` to a bf16 cache's write_kv must not get a TypeError from one
    backend and not another)."""
    import importlib
    import inspect

    from halserve.hal.interface import OPS, Backend
    from halserve.hal.native import NativeBackend

    checked = 0
    for mod in ("halserve.hal.native", "halserve.hal.cpu_amx.backend", "halserve.hal.cuda.backend",
                "halserve.hal.rocm.backend", "halserve.hal.riscv_rvv.backend"):
        m = importlib.import_module(mod)
        for cls in [c for c in vars(m).values() if isinstance(c, type) and issubclass(c, NativeBackend)
                    and c.__module__ == mod]:
            for op in OPS:
                if op not in vars(cls):
                    continue
                want = {p.name for p in inspect.signature(getattr(Backend, op)).parameters.values()
                        if p.kind == p.KEYWORD_ONLY}
                have = inspect.signature(vars(cls)[op]).parameters
                if not any(p.kind == p.VAR_KEYWORD for p in have.values()):
                    assert want <= set(have), f"{cls.__name__}.{op} lacks {sorted(want - set(have))}"
                checked += 1
    assert checked > 20
