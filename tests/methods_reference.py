"""Independent NumPy references of the literature quantizers (from the papers, not from n2uq_tf).

Nothing here imports TensorFlow or n2uq_tf. Forward values follow the papers' formulas with
np.round; gradients are the papers' (STE) formulas, or derived by hand where the method
differentiates a smooth function (DoReFa's tanh/max, DAQ's soft assignment).
"""

import math

import numpy as np


def n_of(bits):
    return 2 ** bits - 1


# ----------------------------------------------------------------- DoReFa (Zhou et al. 2016)

def quantize_k(r, bits):
    n = n_of(bits)
    return np.round(r * n) / n


def dorefa_activation(x, bits):
    x = np.asarray(x, np.float64)
    return quantize_k(np.clip(x, 0, 1), bits), ((x >= 0) & (x <= 1)).astype(np.float64)


def dorefa_weights(w, bits, g):
    """(w_q, dL/dw) for L = sum(g * w_q); gradient through tanh and the max, STE on round."""
    w = np.asarray(w, np.float64)
    if bits == 1:
        e = np.mean(np.abs(w))
        return e * np.where(w >= 0, 1.0, -1.0), g.astype(np.float64)
    t = np.tanh(w)
    big = np.max(np.abs(t))
    r = t / (2 * big) + 0.5
    wq = 2 * quantize_k(r, bits) - 1
    # d(2r_i)/dw_k = [i = k] (1 - t_k^2) / M - t_i / M^2 dM/dw_k, dM/dw_k = [k = argmax] sign(t_k)(1 - t_k^2)
    grad = g * (1 - t ** 2) / big
    j = np.unravel_index(np.argmax(np.abs(t)), t.shape)
    grad[j] -= np.sign(t[j]) * (1 - t[j] ** 2) * np.sum(g * t) / big ** 2
    return wq, grad


# ----------------------------------------------------------------- PACT (Choi et al. 2018)

def pact(x, alpha, bits, g):
    """(y_q, dL/dx, dL/dalpha): Eq. 1-3, STE: dy/dx = 1 on [0, alpha), dy/dalpha = 1 for x >= alpha."""
    n = n_of(bits)
    x = np.asarray(x, np.float64)
    y = np.clip(x, 0, alpha)
    yq = np.round(y * n / alpha) * alpha / n
    return yq, g * ((x >= 0) & (x < alpha)), np.sum(g * (x >= alpha))


# ----------------------------------------------------------------- LSQ (Esser et al. 2020)

def lsq(v, s, q_n, q_p, g, count):
    """(v_q, dL/dv, dL/ds) with the step gradient scaled by 1 / sqrt(count * Q_P)."""
    v = np.asarray(v, np.float64)
    ratio = v / s
    vq = np.round(np.clip(ratio, -q_n, q_p)) * s
    inside = (ratio > -q_n) & (ratio < q_p)
    ds = np.where(inside, -ratio + np.round(ratio), np.where(ratio <= -q_n, -q_n, q_p))
    return vq, g * inside, np.sum(g * ds) / math.sqrt(count * q_p)


# ----------------------------------------------------------------- DAQ (Kim, Lee, Ham 2021)

def daq_scores(f, sigma):
    """Similarities exp(-|f - q|) to q = 0, 1 times the Gaussian kernel around the nearest level."""
    phi = np.stack([np.exp(-np.abs(f)), np.exp(-np.abs(f - 1))])
    nearest = np.where(phi[0] >= phi[1], 0, 1)
    levels = np.array([0.0, 1.0])[:, None]
    kernel = np.exp(-(levels - nearest[None].reshape(1, -1)) ** 2 / sigma ** 2).reshape(phi.shape)
    return phi * kernel


def daq_beta(f, temperature, sigma):
    s = daq_scores(np.asarray(f, np.float64).reshape(-1), sigma)
    return (temperature / np.abs(s[0] - s[1])).reshape(np.shape(f))


def daq_soft(r, temperature, sigma):
    """floor(r) + soft argmax with rescaled levels (-c, 1 + c): the DASR value (float64)."""
    r = np.asarray(r, np.float64).reshape(-1)
    fl = np.floor(r)
    f = r - fl
    s = daq_scores(f, sigma)
    beta = temperature / np.abs(s[0] - s[1])
    z = beta * s
    p = np.exp(z - z.max(axis=0))
    p /= p.sum(axis=0)
    c = 1 / (math.exp(temperature) - 1)
    return fl + (-c) * p[0] + (1 + c) * p[1]


def daq_soft_slope(r, temperature, sigma):
    """d DASR / dr with beta held constant, by hand: with beta |s0 - s1| = T, p0 p1 = e^T / (1 + e^T)^2,
    d(sum q~ p)/df = (1 + 2c) beta p0 p1 (s0 + s1) = T e^T (s0 + s1) / ((e^T - 1)(e^T + 1) |s0 - s1|)."""
    r = np.asarray(r, np.float64).reshape(-1)
    f = r - np.floor(r)
    s = daq_scores(f, sigma)
    e = math.exp(temperature)
    return temperature * e * (s[0] + s[1]) / ((e - 1) * (e + 1) * np.abs(s[0] - s[1]))


def daq_activation_train(x, u, bits, temperature, sigma, g):
    """(y, dL/dx, dL/du) of y = u/n DASR(n clip(x/u, 0, 1))."""
    n = n_of(bits)
    x = np.asarray(x, np.float64).reshape(-1)
    r = n * np.clip(x / u, 0, 1)
    soft = daq_soft(r, temperature, sigma)
    slope = daq_soft_slope(r, temperature, sigma)
    inside = (x > 0) & (x < u)
    y = u / n * soft
    dx = np.where(inside, slope, 0.0)
    # inside: dy/du = soft/n - slope x/u; above u: r = n, soft = n (up to e-8), dy/du = soft/n; below: 0
    du = np.where(inside, soft / n - slope * x / u, np.where(x >= u, soft / n, 0.0))
    return y, g.reshape(-1) * dx, np.sum(g.reshape(-1) * du)


def daq_activation_infer(x, u, bits):
    n = n_of(bits)
    return np.round(n * np.clip(np.asarray(x, np.float64) / u, 0, 1)) * u / n


def daq_weights_infer(w, lower, upper, bits):
    n = n_of(bits)
    w = np.asarray(w, np.float64)
    std = w.std()
    r = n * np.clip(((w - w.mean()) / std - lower) / (upper - lower), 0, 1)
    return std * (upper - lower) / 2 * (2 * np.round(r) - n) / n


# ----------------------------------------------------------------- Table 4 weight variants

def noscale(w, bits):
    n = n_of(bits)
    k = np.round((np.clip(w, -1, 1) + 1) * n / 2)
    return (2 * k - n) / n


def learnable(w, alpha, bits, g, axes, grad_scale):
    """(w_q, dL/dw, dL/dalpha): alpha q(w/alpha); LSQ-style gradients."""
    n = n_of(bits)
    ratio = w / alpha
    q = (2 * np.round((np.clip(ratio, -1, 1) + 1) * n / 2) - n) / n
    inside = np.abs(ratio) < 1
    d_alpha = np.where(inside, q - ratio, np.sign(ratio))
    return alpha * q, g * inside, np.sum(g * d_alpha, axis=axes, keepdims=True) * grad_scale
