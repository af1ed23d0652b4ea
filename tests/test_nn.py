"""Shared blocks: attention masks against a direct computation, scan == unrolled, remat == plain,
text pooling at the end-of-text token, logical axis names on every parameter."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from colearn_jax.nn import layers
from colearn_jax.nn.attention import MultiHeadAttention, make_attention_mask, padded_attention
from colearn_jax.nn.text import TextTransformer
from colearn_jax.nn.transformer import BlockConfig, TransformerStack
from colearn_jax.nn.vit import VisionTransformer


def _direct_attention(params, xq, xkv, mask):
    q = np.einsum("bld,dhk->blhk", xq, params["query"]["kernel"]) + params["query"]["bias"]
    k = np.einsum("bld,dhk->blhk", xkv, params["key"]["kernel"]) + params["key"]["bias"]
    v = np.einsum("bld,dhk->blhk", xkv, params["value"]["kernel"]) + params["value"]["bias"]
    logits = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(mask, logits, -1e30)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    out = np.einsum("bhqs,bshk->bqhk", w, v)
    return np.einsum("bqhk,hkd->bqd", out, params["out"]["kernel"]) + params["out"]["bias"]


@pytest.mark.parametrize("kind", ["self", "causal", "cross_padded"])
def test_attention_matches_direct_computation(kind):
    rng = np.random.RandomState(0)
    xq = rng.randn(2, 5, 16).astype(np.float32)
    xkv = rng.randn(2, 7, 16).astype(np.float32) if kind == "cross_padded" else xq
    attn = MultiHeadAttention(num_heads=4)
    mask = None
    full = np.ones((2, 1, xq.shape[1], xkv.shape[1]), bool)
    if kind == "cross_padded":
        valid = np.array([[1] * 7, [1] * 4 + [0] * 3], bool)
        mask = make_attention_mask(None, jnp.asarray(valid))
        full = np.broadcast_to(np.asarray(mask), full.shape)
    if kind == "causal":
        full = np.broadcast_to(np.tril(np.ones((5, 5), bool)), full.shape)
    params = attn.init(jax.random.PRNGKey(0), xq, xkv, mask=mask, causal=kind == "causal")
    params = jax.tree.map(lambda p: p + 0.1 * rng.randn(*p.shape).astype(np.float32), nn.unbox(params))
    out = attn.apply(params, xq, xkv, mask=mask, causal=kind == "causal")
    ref = _direct_attention(jax.tree.map(np.asarray, params["params"]), xq, xkv, full)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    if kind == "causal":  # the first query ignores later tokens
        xq2 = xq.copy()
        xq2[:, 1:] += 1.0
        out2 = attn.apply(params, xq2, xq2, causal=True)
        np.testing.assert_allclose(out2[:, 0], out[:, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t_q,t_k,causal,masked", [(197, 197, False, False), (77, 77, True, False),
                                                    (77, 77, True, True), (10, 13, False, True)])
def test_padded_attention_equals_unpadded(t_q, t_k, causal, masked):
    """The cuDNN path pads odd lengths (ViT-B/16's 197, the text's 77) to a multiple of 64; with the XLA
    kernel here, the padding must change neither the output nor any gradient."""
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(keys[0], (2, t_q, 3, 8))
    k, v = (jax.random.normal(key, (2, t_k, 3, 8)) for key in keys[1:3])
    d_out = jax.random.normal(keys[3], (2, t_q, 3, 8))
    mask = None
    if masked:  # the first row's last three keys are padding
        mask = jnp.asarray(np.arange(t_k)[None, :] < np.array([[t_k - 3], [t_k]]))[:, None, None, :]

    def vjp(fn):
        out, pull = jax.vjp(fn, q, k, v)
        return (out, *pull(d_out))

    ref = vjp(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal))
    got = vjp(lambda q, k, v: padded_attention(q, k, v, mask=mask, causal=causal, implementation="xla"))
    assert got[0].shape == (2, t_q, 3, 8)
    for a, b in zip(ref, got):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def _stack_layers(unrolled, n):
    layers = [unrolled[f"layer_{i}"]["block"] for i in range(n)]
    return {"layers": {"block": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}}


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scan_equals_unrolled_and_remat_changes_nothing(remat):
    cfg = BlockConfig.clip_init(num_heads=2, width=16, num_layers=3, causal=True)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 16))
    unrolled = TransformerStack(3, cfg)
    params = nn.unbox(unrolled.init(jax.random.PRNGKey(0), x))["params"]
    ref = unrolled.apply({"params": params}, x)
    scanned = TransformerStack(3, cfg, scan=True, remat_policy=remat)
    stacked = _stack_layers(params, 3)
    chex.assert_trees_all_equal_shapes(stacked, nn.unbox(scanned.init(jax.random.PRNGKey(0), x))["params"])
    out = scanned.apply({"params": stacked}, x)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    g_ref = jax.grad(lambda p: unrolled.apply({"params": p}, x).sum())(params)
    g = jax.grad(lambda p: scanned.apply({"params": p}, x).sum())(stacked)
    chex.assert_trees_all_close(g, _stack_layers(g_ref, 3), rtol=1e-4, atol=1e-5)


def test_text_pools_at_end_of_text_and_ignores_padding():
    t = TextTransformer(vocab_size=300, context_length=8, width=16, num_layers=2, num_heads=2, output_dim=8)
    ids = np.array([[257, 10, 11, 258, 0, 0, 0, 0]], np.int32)
    variables = t.init(jax.random.PRNGKey(0), ids)
    out = t.apply(variables, ids)
    changed = ids.copy()
    changed[0, 5] = 42  # after the end-of-text token: invisible to it under the causal mask
    np.testing.assert_allclose(t.apply(variables, changed)["embedding"], out["embedding"], rtol=1e-6)
    changed[0, 1] = 12  # before it: changes the pooled feature
    assert not np.allclose(t.apply(variables, changed)["embedding"], out["embedding"])


def test_every_parameter_has_logical_axes_and_vit_shapes():
    vit = VisionTransformer(image_size=16, patch_size=4, width=32, num_layers=2, num_heads=2, output_dim=8)
    boxed = jax.eval_shape(vit.init, jax.random.PRNGKey(0), jnp.zeros((2, 16, 16, 3)))
    for leaf in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
        assert isinstance(leaf, nn.Partitioned), leaf
        assert len(leaf.names) == leaf.value.ndim
    out = vit.apply(nn.unbox(vit.init(jax.random.PRNGKey(0), jnp.zeros((2, 16, 16, 3)))), jnp.ones((2, 16, 16, 3)))
    chex.assert_shape(out["embedding"], (2, 8))
    chex.assert_shape(out["tokens"], (2, 17, 32))
    with pytest.raises(ValueError, match="expects images of shape"):
        vit.apply(nn.unbox(vit.init(jax.random.PRNGKey(0), jnp.zeros((2, 16, 16, 3)))), jnp.ones((2, 20, 20, 3)))


def test_vit_conv_stem_layout_and_gradients():
    """stem="conv" (Xiao et al. 2021): log2(patch) stride-2 3x3 convs (channels doubling up to width/2)
    and a 1x1 to the width give the patch stem's token grid; every stem layer gets gradient."""
    vit = VisionTransformer(image_size=32, patch_size=8, width=64, num_layers=1, num_heads=2, pool="none", stem="conv")
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    params = nn.unbox(vit.init(jax.random.PRNGKey(0), images))["params"]
    assert "patch_embed" not in params
    shapes = [params[f"stem_conv{i}"]["kernel"].shape for i in range(3)] + [params["stem_proj"]["kernel"].shape]
    assert shapes == [(3, 3, 3, 8), (3, 3, 8, 16), (3, 3, 16, 32), (1, 1, 32, 64)]
    chex.assert_shape(vit.apply({"params": params}, images)["tokens"], (2, 1 + 4 * 4, 64))
    grads = jax.grad(lambda p: jnp.sum(vit.apply({"params": p}, images)["tokens"] ** 2))(params)
    for name in ("stem_conv0", "stem_conv2", "stem_proj"):
        assert float(jnp.abs(grads[name]["kernel"]).max()) > 0, name
    with pytest.raises(ValueError, match="power of two"):
        VisionTransformer(image_size=24, patch_size=6, width=64, num_layers=1, num_heads=2, stem="conv").init(
            jax.random.PRNGKey(0), jnp.zeros((1, 24, 24, 3)))


@pytest.mark.parametrize("in_dims,x_shape,k_shape", [
    (1, (3, 5, 8), (8, 24)),      # widening (MLP fc): x is transposed for the weight gradient
    (1, (3, 5, 24), (24, 8)),     # narrowing (MLP proj): dy is transposed
    (1, (4, 8), (8, 2, 4)),       # q/k/v layout [embed, heads, kv]
    (2, (3, 5, 2, 4), (2, 4, 8)),  # output layout [heads, kv, embed]
])
def test_contract_values_and_grads_equal_einsum(in_dims, x_shape, k_shape):
    """layers.contract (2-D matmul, on CPU with its YNNPACK-friendly weight-gradient VJP) == einsum."""
    kx, kk, kc = jax.random.split(jax.random.PRNGKey(0), 3)
    x, k = jax.random.normal(kx, x_shape), jax.random.normal(kk, k_shape)
    letters = "abcdefgh"
    xs = letters[: len(x_shape)]
    ks = xs[len(x_shape) - in_dims:] + "wxyz"[: len(k_shape) - in_dims]
    eq = f"{xs},{ks}->{xs[: len(x_shape) - in_dims]}{ks[in_dims:]}"
    out_shape = jnp.einsum(eq, x, k).shape
    cot = jax.random.normal(kc, out_shape)

    def loss(f):
        return lambda x, k: jnp.sum(f(x, k) * cot)

    ref = jax.value_and_grad(loss(lambda x, k: jnp.einsum(eq, x, k)), argnums=(0, 1))(x, k)
    got = jax.jit(jax.value_and_grad(loss(lambda x, k: layers.contract(x, k, in_dims)), argnums=(0, 1)))(x, k)
    chex.assert_trees_all_close(got, ref, rtol=1e-5, atol=1e-5)


def test_contract_rejects_mismatched_kernel():
    with pytest.raises(ValueError, match="do not match kernel"):
        layers.contract(jnp.ones((2, 3)), jnp.ones((4, 5)))
