"""The 8-bit maps re-implemented in NumPy from their written spec (adan_plugin/lowmem.py's docstring,
csrc/adan_quant.h): every kernel (CPU, CUDA block code on CPU tensors, CUDA and Triton on a GPU, Triton's
interpreter) must write these very codes and scales.  Also the test values that span the maps' range."""
import numpy as np
import torch

SIGNED, UNSIGNED = 127, 255
ERR = {k: 1.0 / c + 1.0 / (4 * c * c) for k, c in (("signed", SIGNED), ("unsigned", UNSIGNED))}


def np_quantize(x, sq):
    """(codes, scales) of float32 array x (memory order) by the written spec."""
    x = np.asarray(x, np.float32)
    n = x.size
    pad = np.zeros((-n) % 256, np.float32)
    blocks = np.concatenate([x, pad]).reshape(-1, 256)
    mag = np.sqrt(blocks) if sq else np.abs(blocks)
    absmax = mag.max(axis=1).astype(np.float32)
    cmax = UNSIGNED if sq else SIGNED
    with np.errstate(divide="ignore", invalid="ignore"):  # 0 * inf = NaN is part of the spec
        s = np.where(absmax >= np.float32(1e-30), np.float32(cmax * cmax) / absmax, np.float32(0)).astype(np.float32)
        v = (mag * s[:, None]).astype(np.float32)
    v = np.where(v < cmax * cmax, v, np.float32(cmax * cmax))  # NaN -> cmax
    # c: how many of the thresholds (j - 1/2)^2, j = 1..cmax, v reaches (round(sqrt(v)), ties up, exactly).
    thresholds = (np.arange(1, cmax + 1, dtype=np.float64) - 0.5) ** 2
    c = np.searchsorted(thresholds, v.astype(np.float64), side="right").astype(np.int32)
    if sq:
        c = np.where((c == 0) & (blocks > 0), 1, c)
        codes = c.astype(np.uint8)
    else:
        codes = np.where(blocks < 0, -c, c).astype(np.int8)
    return codes.reshape(-1)[:n], absmax


def np_dequantize(codes, scales, sq):
    c = np.asarray(codes).astype(np.int32)
    n = c.size
    c = np.concatenate([c, np.zeros((-n) % 256, np.int32)]).reshape(-1, 256)
    cmax = UNSIGNED if sq else SIGNED
    k = (np.asarray(scales, np.float32) / np.float32(cmax * cmax)).astype(np.float32)
    v = (c * np.abs(c)).astype(np.float32) * k[:, None]
    if sq:
        v = (v * v).astype(np.float32)
    return v.reshape(-1)[:n]


def at_thresholds(cmax):
    """Blocks of 256 values: cmax^2 first (the block's maximum, so that s = cmax^2 / A = 1 and v = |x|
    exactly), then every level threshold (j - 1/2)^2 and its two fp32 neighbours, with both signs; zeros
    fill the rest."""
    t = (np.arange(1, cmax + 1, dtype=np.float32) - np.float32(0.5)) ** 2
    vals = np.concatenate([t, np.nextafter(t, np.float32(0)), np.nextafter(t, np.float32(np.inf))])
    vals = np.concatenate([vals, -vals])
    blocks = []
    for k in range(0, vals.size, 255):  # 255 values + the maximum per block
        chunk = np.zeros(256, np.float32)
        chunk[0] = cmax * cmax
        chunk[1:1 + len(vals[k:k + 255])] = vals[k:k + 255]
        blocks.append(chunk)
    return np.concatenate(blocks)


def threshold_cases():
    """(state key, cmax, g) of the level-threshold check: a first step with betas 0 from zero states makes
    exp_avg = g (signed map) and sqrt(exp_avg_sq) = sqrt(fl(g*g)) = |g| (unsigned map), so every v the
    quantizer sees is a threshold or one of its fp32 neighbours (at_thresholds; s = 1)."""
    for key, cmax in (("exp_avg", SIGNED), ("exp_avg_sq", UNSIGNED)):
        g = torch.from_numpy(at_thresholds(cmax))
        yield key, cmax, (g.abs() if key == "exp_avg_sq" else g)


def threshold_spec(key, g):
    """(codes, scales) the spec gives for ``key``'s state after that step."""
    x = g.numpy()
    return np_quantize((x * x).astype(np.float32) if key == "exp_avg_sq" else x, sq=key == "exp_avg_sq")


def spread_values(numel, seed):
    # Magnitudes spread over 12 decades between blocks and within them, exact zeros, an all-zero block,
    # a block of one repeated value and a short last block.
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=gen) * torch.pow(10.0, torch.empty(numel).uniform_(-6, 6, generator=gen))
    x[::7] = 0.0
    x[256:512] = 0.0
    x[512:768] = -3.25
    return x


def assert_zero_state_step_is_the_spec(g, states, scales, keys):
    """After one step with betas 0 from zero states on gradient ``g`` (CPU float32): m = d = g,
    n = g*g, neg_pre_grad = -g exactly, so ``states``/``scales`` (any device; in the order of ``keys``,
    the four state names) must be the spec's codes and scales of those values, bit for bit."""
    gn = g.numpy()
    expected = {"exp_avg": gn, "exp_avg_sq": (gn * gn).astype(np.float32), "exp_avg_diff": gn, "neg_pre_grad": -gn}
    for key, st, sc in zip(keys, states, scales):
        codes, absmax = np_quantize(expected[key], sq=key == "exp_avg_sq")
        np.testing.assert_array_equal(st.cpu().numpy(), codes, err_msg=key)
        np.testing.assert_array_equal(sc.cpu().numpy(), absmax, err_msg=key)


def assert_states_within_one_level(sa, sb, keys, where=None) -> int:
    """Two kernels' states (state dicts of one parameter, any devices) after the same step from the same
    state: fp32 states (tensors under 4096 elements) to rounding; 8-bit codes at most one level apart, on
    under 1% of elements (fp32 rounding that moved a value across a level threshold); scales to rounding.
    Returns how many codes differ."""
    flips = 0
    for key in keys:
        a, b = sa[key].cpu(), sb[key].cpu()
        if a.dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
            continue
        diff = (a.int() - b.int()).abs()
        assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01, (where, key)
        flips += int((diff > 0).sum())
        torch.testing.assert_close(sa[key + "_scale"].cpu(), sb[key + "_scale"].cpu(), rtol=1e-5, atol=0)
    return flips
