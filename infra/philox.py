"""
Philox4x32-10, the counter-based generator of Salmon et al. (SC'11; Random123), the one cuRAND and
torch use on a GPU, in plain int64 tensor arithmetic so that it runs the same on any device:
philox(counter, key) is a pure function, so each row of a batch can own a stream (its key) and draw
its number at token t (the counter) in one vectorised call. rollout.uniforms turns it into uniforms;
tests/test_rollout.py checks Random123's known-answer vectors.
"""
import torch

PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
MASK32 = 0xFFFFFFFF


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of a * m for 32-bit a (int64 tensor) and constant m, in int64 without
    overflow: m is split into 16-bit halves."""
    p_lo, p_hi = a * (m & 0xFFFF), a * (m >> 16)                 # each < 2^48
    t = p_lo + ((p_hi & 0xFFFF) << 16)                            # < 2^49
    return (p_hi >> 16) + (t >> 32), t & MASK32


def philox(counter: list, key: list) -> list:
    """Philox4x32-10: four 32-bit counter words and two key words (int64 tensors that broadcast, or
    ints) -> four 32-bit random words. Ten rounds, the key bumped by the Weyl constants between
    them."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(10):
        if r:
            k0, k1 = (k0 + PHILOX_W[0]) & MASK32, (k1 + PHILOX_W[1]) & MASK32
        hi0, lo0 = _mulhilo(c0, PHILOX_M[0])
        hi1, lo1 = _mulhilo(c2, PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return [c0, c1, c2, c3]
