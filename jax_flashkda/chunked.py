"""Chunk-parallel KDA in pure JAX (docs/math.md §2, the chunk form): the fallback on every platform.

Everything that does not depend on the carried state (decays, L, Aqk, the unit-lower solve, W,
U) is computed for all chunks at once; only the state update runs in a lax.scan over chunks,
batched over rows and heads. Gradients come from plain autodiff.

Exact for any gate. A decay exp(Γ_r − Γ_s) is never split into exp(Γ_r)·exp(−Γ_s) over an
unbounded span: the chunk is cut into sub-chunks of 16 tokens; a block of rows in sub-chunk i
against earlier columns is factored at the reference point b_i (the token before sub-chunk i)
as exp(Γ_r − Γ_b)·exp(Γ_b − Γ_s), both factors ≤ 1 because g ≤ 0; the diagonal 16×16 blocks
are exponentiated per element. Every exponent is masked with -inf before exp, so masked
entries contribute exact zeros to the values and to the gradients (no inf·0).

Inputs come through preprocess.prepare (docs/robustness.md): log-decays are floored at -128,
so in-chunk sums of them stay accurate in fp32, and quarantined or uncovered tokens, and the
values of quarantined v columns, are zeros, so everything here is finite (a quarantined column
runs on zeros apart from the others; `quarantine` then writes its NaN over the results).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_flashkda.preprocess import compute_dtype, empty_result, prepare, quarantine
from jax_flashkda.reference import sequence_layout

SUB_CHUNK = 16
# exp(±80) is inside the fp32 range (and bf16's, which shares its exponent): the largest
# in-sub-chunk decay sum for which the diagonal blocks may be factored (docs/math.md §2).
SAFE_SPAN = 80.0
# Training (fwd+bwd) on a 2-core CPU at T=4096 H=4 K=V=128 fp32: 64 ≈ 32 (772 / 774 ms) < 16
# (1004 ms); 64 keeps fewer scan steps and stored per-chunk states. See
# benchmarks/results/cpu_pure_jax.json.
DEFAULT_CHUNK_SIZE = 64


def _through_reference(qs, ks, local, ref, gamma, upto):
    """Rows of sub-chunk i against columns s < (i + upto)·sub, as matmuls through the reference
    point b_i: Σ_d a_rd k_sd exp(Γ_rd − Γ_{b_i,d}) exp(Γ_{b_i,d} − Γ_sd).

    With upto = 0 (earlier sub-chunks only) both factors are ≤ 1 for any gate. With upto = 1
    the diagonal block is included, whose right factor exp(Γ_{b_i} − Γ_s) ≥ 1 is clamped at
    exp(SAFE_SPAN): exact while the caller has checked the span, finite (never inf·0 in the
    gradient) where lax.cond became a select under vmap.
    Inputs: qs, ks, local [..., ns, sub, K]; ref [..., ns, K]; gamma [..., C, K].
    Returns (K·Kᵀ, Q·Kᵀ) blocks [..., ns, sub, C].
    """
    ns, sub = local.shape[-3:-1]
    C = ns * sub
    cols = jnp.arange(C)[None, :] < ((jnp.arange(ns) + upto) * sub)[:, None]      # [ns, C]
    span = jnp.minimum(ref[..., :, None, :] - gamma[..., None, :, :], SAFE_SPAN)
    right = jnp.exp(jnp.where(cols[:, :, None], span, -jnp.inf))
    right = right * ks.reshape(*ks.shape[:-3], 1, C, ks.shape[-1])              # [.., ns, C, K]
    left = jnp.exp(local)
    return (jnp.einsum("...irk,...isk->...irs", ks * left, right),
            jnp.einsum("...irk,...isk->...irs", qs * left, right))


def _blocks_bounded(qs, ks, local, ref, gamma):
    """Every in-sub-chunk decay sum is above -SAFE_SPAN: one factored product per block row."""
    return _through_reference(qs, ks, local, ref, gamma, upto=1)


def _blocks_exact(qs, ks, local, ref, gamma):
    """Any gate: earlier sub-chunks through the reference point, the diagonal sub×sub blocks
    with one exp per element (masked to -inf before exp, so masked entries are exact zeros in
    values and gradients)."""
    ns, sub = local.shape[-3:-1]
    kk, qk = _through_reference(qs, ks, local, ref, gamma, upto=0)
    tri = jnp.tril(jnp.ones((sub, sub), bool))
    diff = local[..., :, None, :] - local[..., None, :, :]
    decay = jnp.exp(jnp.where(tri[:, :, None], diff, -jnp.inf))
    # A three-operand einsum, not sum(a[:, None] * b[None] * decay): the backward of that
    # broadcast form segfaults XLA:CPU in fp32 (jaxlib 0.10.2).
    kk_d = jnp.einsum("...rk,...sk,...rsk->...rs", ks, ks, decay)
    qk_d = jnp.einsum("...rk,...sk,...rsk->...rs", qs, ks, decay)
    # Place block i of [..., ns, sub, sub] at columns i·sub of [..., ns, sub, C].
    eye_ns = jnp.eye(ns, dtype=kk.dtype)
    place = lambda d: jnp.einsum("...irs,ij->...irjs", d, eye_ns).reshape(kk.shape)
    return kk + place(kk_d), qk + place(qk_d)


def _unit_lower_solve(lower, rhs, sub):
    """(I + L)^{-1} rhs for strictly lower L [..., C, C], by blocked forward substitution.

    XLA's batched triangular solve is ~10x slower than this on CPU. The diagonal sub×sub
    blocks are inverted by row substitution (unrolled, vectorised over all blocks), the block
    rows then follow by X_i = T_ii (R_i − Σ_{m<i} L_im X_m): only matmuls, cheap to
    differentiate.
    """
    *lead, C, _ = lower.shape
    ns = C // sub
    blocks = lower.reshape(*lead, ns, sub, ns, sub)
    diag = jnp.stack([blocks[..., i, :, i, :] for i in range(ns)], axis=-3)
    eye = jnp.eye(sub, dtype=lower.dtype)
    rows = [jnp.broadcast_to(eye[0], diag.shape[:-2] + (sub,))]
    for r in range(1, sub):
        done = jnp.stack(rows, axis=-2)
        rows.append(eye[r] - jnp.einsum("...c,...cd->...d", diag[..., r, :r], done))
    inv = jnp.stack(rows, axis=-2)                                  # [..., ns, sub, sub]

    rhs = rhs.reshape(*lead, ns, sub, rhs.shape[-1])
    out = []
    for i in range(ns):
        acc = rhs[..., i, :, :]
        for m in range(i):
            acc = acc - blocks[..., i, :, m, :] @ out[m]
        out.append(inv[..., i, :, :] @ acc)
    return jnp.concatenate(out, axis=-2)


def _intra_chunk(q, k, v, g, beta, scale, sub):
    """The state-independent part. Inputs [..., C, D] (leading axes: chunks, rows, heads).

    Returns Q̃ = scale·Q⊙exp(Γ), W, U, K̂ = K⊙exp(Γ_C − Γ), exp(Γ_C) and Aqk.
    """
    *lead, C, K = k.shape
    ns = C // sub
    gs = g.reshape(*lead, ns, sub, K)
    # Cumulating per sub-chunk first keeps Γ_r − Γ_{b_i} exact even after a huge decay.
    local = jnp.cumsum(gs, axis=-2)                           # Γ_r − Γ_{b_i}
    totals = local[..., -1, :]
    ref = jnp.concatenate([jnp.zeros_like(totals[..., :1, :]),
                           jnp.cumsum(totals[..., :-1, :], axis=-2)], axis=-2)  # Γ_{b_i}
    gamma = (local + ref[..., None, :]).reshape(*lead, C, K)  # Γ_r from the chunk start

    qs = q.reshape(*lead, ns, sub, K)
    ks = k.reshape(*lead, ns, sub, K)
    # Both branches are rematerialised in the backward: under autodiff lax.cond keeps the
    # residuals of both, so without it the untaken exact branch would allocate (zero-filled)
    # its [.., sub, sub, K] decays on every call.
    kk, qk = jax.lax.cond(jnp.min(local) > -SAFE_SPAN, jax.checkpoint(_blocks_bounded),
                          jax.checkpoint(_blocks_exact), qs, ks, local, ref, gamma)
    kk, qk = kk.reshape(*lead, C, C), qk.reshape(*lead, C, C)

    strict = jnp.tril(jnp.ones((C, C), bool), -1)
    lower = jnp.where(strict, beta[..., :, None] * kk, 0)
    aqk = scale * jnp.where(strict | jnp.eye(C, dtype=bool), qk, 0)

    g_exp = jnp.exp(gamma)
    rhs = beta[..., None] * jnp.concatenate([k * g_exp, v], axis=-1)
    wu = _unit_lower_solve(lower, rhs, sub)
    w, u = wu[..., :K], wu[..., K:]
    g_last = gamma[..., -1:, :]
    k_hat = k * jnp.exp(g_last - gamma)
    return scale * q * g_exp, w, u, k_hat, jnp.exp(g_last[..., 0, :]), aqk


def _to_chunks(x, C):
    """[B, T, H, D...] (T a multiple of C) -> [T/C, B, H, C, D...]."""
    B, T, H = x.shape[:3]
    x = x.reshape(B, T // C, C, H, *x.shape[3:])
    return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 3, 2)


def _from_chunks(x):
    """[T/C, B, H, C, D] -> [B, T, H, D]."""
    n, B, H, C, D = x.shape
    return jnp.moveaxis(x, 0, 1).transpose(0, 1, 3, 2, 4).reshape(B, n * C, H, D)


def _state_chain(w, u, k_hat, decay, h0, resets=None):
    """The sequential part: a scan over chunks of S <- diag(decay) S + K̂ᵀ(U − W S).

    Inputs [NC, B, H, ...]; h0 [B, H, K, V]. With resets = (first [NC], seq [NC], h0_all
    [N, H, K, V]) (varlen, B == 1), a chunk that starts sequence n first loads h0_all[n].
    Returns the state entering each chunk, Vn = U − W S per chunk and the last state.
    """
    def step(s, x):
        w_c, u_c, kh_c, d_c = x[:4]
        if resets is not None:
            first, n = x[4:]
            s = jnp.where(first, resets[2][n][None], s)
        vn = u_c - jnp.einsum("bhck,bhkv->bhcv", w_c, s)
        s_next = d_c[..., None] * s + jnp.einsum("bhck,bhcv->bhkv", kh_c, vn)
        return s_next, (s, vn)

    xs = (w, u, k_hat, decay) + (() if resets is None else resets[:2])
    last, (s_in, vn) = jax.lax.scan(step, h0, xs)
    return s_in, vn, last


def _packed_layout(cu, T, C):
    """Lay N sequences (legal offsets cu) out in a packed buffer where each starts at a chunk
    boundary.

    Static size: T + N(C − 1) rounded up to a chunk multiple bounds Σ ceil(len_n / C)·C.
    Returns, for packed positions, the source token and validity; per chunk, its sequence and
    whether it starts it; per sequence, its last chunk; per token, its packed position.
    """
    N = cu.shape[0] - 1
    n_chunks = -(-(T + N * (C - 1)) // C)
    lens = cu[1:] - cu[:-1]
    chunk_start = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(-(-lens // C))])

    chunk = jnp.arange(n_chunks, dtype=jnp.int32)
    # Empty sequences own no chunk; chunks past the last sequence get id N.
    seq_c = jnp.searchsorted(chunk_start[1:], chunk, side="right")
    seq_cc = jnp.minimum(seq_c, N - 1)
    first = (chunk == chunk_start[seq_cc]) & (seq_c < N)

    pos = jnp.arange(n_chunks * C, dtype=jnp.int32)
    seq_p = seq_c[pos // C]
    seq_pc = seq_cc[pos // C]
    offset = pos - C * chunk_start[seq_pc]
    valid = (seq_p < N) & (offset < lens[seq_pc])
    src = jnp.where(valid, cu[seq_pc] + offset, 0)

    seq_t, _ = sequence_layout(cu, T)
    seq_tc = jnp.minimum(seq_t, N - 1)
    token_valid = seq_t < N
    dst = jnp.where(token_valid,
                    C * chunk_start[seq_tc] + jnp.arange(T, dtype=jnp.int32) - cu[seq_tc], 0)
    last_chunk = jnp.maximum(chunk_start[1:] - 1, 0)
    return src, valid, seq_cc, first, last_chunk, lens > 0, dst, token_valid


def kda_chunked(q, k, v, g, beta, *, scale=None, initial_state=None,
                use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False,
                use_beta_sigmoid_in_kernel=False, A_log=None, dt_bias=None, lower_bound=None,
                state_v_first=False, cu_seqlens=None, chunk_size: int = DEFAULT_CHUNK_SIZE):
    """KDA in chunk form; same arguments and results as `reference.kda_recurrent`.

    q,k,g [B,T,H,K], v [B,T,H,V], beta [B,T,H]. Returns o [B,T,H,V] in v's dtype and the
    final state [N,H,K,V] ([N,H,V,K] when state_v_first), fp32 or fp64 for fp64 inputs.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    sub = min(SUB_CHUNK, C)
    assert C % sub == 0, f"chunk_size {C} must be a multiple of {sub}"
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    assert cu_seqlens is None or B == 1, "cu_seqlens needs B == 1"
    if B == 0 or T == 0:
        return empty_result(v, initial_state, state_v_first, N, K,
                            compute_dtype(q, k, v, g, beta))
    p = prepare(
        q, k, v, g, beta, scale=scale, initial_state=initial_state, state_v_first=state_v_first,
        cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm_in_kernel,
        use_gate=use_gate_in_kernel, use_beta_sigmoid=use_beta_sigmoid_in_kernel, A_log=A_log,
        dt_bias=dt_bias, lower_bound=lower_bound)
    q, k, vc, g, beta, scale, h0 = p.q, p.k, p.v, p.g, p.beta, p.scale, p.h0

    # Padding tokens (q = k = v = 0, beta = 0, g = 0) neither decay nor update the state.
    if p.cu is None:
        pad = -T % C
        widths = lambda x: [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
        q, k, vc, g, beta = (jnp.pad(x, widths(x)) for x in (q, k, vc, g, beta))
    else:
        src, valid, seq_c, first, last_chunk, nonempty, dst, token_valid = _packed_layout(
            p.cu, T, C)

        def pack(x):
            m = valid.reshape(-1, *([1] * (x.ndim - 2)))
            return jnp.where(m, x[0, src], 0)[None]

        q, k, vc, g, beta = (pack(x) for x in (q, k, vc, g, beta))

    chunks = [_to_chunks(x, C) for x in (q, k, vc, g)]
    beta_c = _to_chunks(beta[..., None], C)[..., 0]
    q_tilde, w, u, k_hat, decay, aqk = _intra_chunk(*chunks, beta_c, scale, sub)

    if p.cu is None:
        s_in, vn, final = _state_chain(w, u, k_hat, decay, h0)
    else:
        s_in, vn, _ = _state_chain(w, u, k_hat, decay, h0[:1], (first, seq_c, h0))
        # State after each sequence's last chunk; empty sequences keep their initial state.
        s_last = s_in[last_chunk, 0]
        s_fin = (decay[last_chunk, 0][..., None] * s_last
                 + jnp.einsum("nhck,nhcv->nhkv", k_hat[last_chunk, 0], vn[last_chunk, 0]))
        final = jnp.where(nonempty[:, None, None, None], s_fin, h0)

    o = (jnp.einsum("nbhck,nbhkv->nbhcv", q_tilde, s_in)
         + jnp.einsum("nbhcs,nbhsv->nbhcv", aqk, vn))
    o = _from_chunks(o)
    if p.cu is None:
        o = o[:, :T]
    else:
        o = jnp.where(token_valid[:, None, None], o[0, dst], 0)[None]
    o, final = quarantine(o, final, p)
    if state_v_first:
        final = jnp.swapaxes(final, -1, -2)
    return o.astype(v.dtype), final
