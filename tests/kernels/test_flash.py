"""Tiled FlashAttention equals naive softmax attention, and its memory grows linearly."""

import subprocess
import sys

import pytest
import torch

from tuili.kernels.flash import flash_attention


def naive(q, k, v, causal=True, key_lengths=None):
    """softmax over the full (T × S) score matrix, keys repeated for GQA."""
    b, h, t, d = q.shape
    s = k.shape[2]
    group = h // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = q @ k.transpose(-1, -2) / d**0.5
    q_pos, k_pos = torch.arange(t)[:, None] + (s - t), torch.arange(s)[None, :]
    if causal:
        scores = scores.masked_fill(k_pos > q_pos, -torch.inf)
    if key_lengths is not None:
        scores = scores.masked_fill(k_pos >= key_lengths.view(b, 1, 1, 1), -torch.inf)
    return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize(
    "b, h, hkv, t, s, d", [(1, 4, 4, 37, 37, 16), (2, 8, 2, 70, 70, 32), (1, 6, 1, 5, 90, 8), (3, 4, 2, 1, 33, 16)]
)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("blocks", [(16, 16), (7, 13), (128, 128)])
def test_equals_naive_attention(b, h, hkv, t, s, d, causal, blocks):
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(b, h, t, d, generator=g),
        torch.randn(b, hkv, s, d, generator=g),
        torch.randn(b, hkv, s, d, generator=g),
    )
    out = flash_attention(q, k, v, causal=causal, block_q=blocks[0], block_k=blocks[1])
    torch.testing.assert_close(out, naive(q, k, v, causal), atol=1e-5, rtol=1e-5)


def test_ragged_key_lengths_hide_the_padding():
    g = torch.Generator().manual_seed(1)
    q, k, v = (
        torch.randn(3, 4, 1, 16, generator=g),
        torch.randn(3, 2, 50, 16, generator=g),
        torch.randn(3, 2, 50, 16, generator=g),
    )
    lengths = torch.tensor([50, 17, 1])
    out = flash_attention(q, k, v, causal=False, key_lengths=lengths, block_k=8)
    torch.testing.assert_close(out, naive(q, k, v, False, lengths), atol=1e-5, rtol=1e-5)
    k[1, :, 17:] = 1e3  # whatever sits past a sequence's length is never seen
    torch.testing.assert_close(flash_attention(q, k, v, causal=False, key_lengths=lengths, block_k=8), out)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        flash_attention(torch.randn(1, 3, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))


PEAK = """
import sys, torch
from tuili.kernels.flash import flash_attention

def peak_kib():  # VmHWM belongs to this process's memory map (ru_maxrss would include the parent's peak)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))

torch.set_num_threads(1)
q, k, v = (torch.randn(1, 1, 8192, 64) for _ in range(3))
before = peak_kib()
if sys.argv[1] == "naive":
    torch.softmax((q @ k.transpose(-1, -2)) / 8 + torch.full((8192, 8192), 0.0).triu(1).masked_fill(
        torch.ones(8192, 8192, dtype=torch.bool).triu(1), -torch.inf), -1) @ v
else:
    flash_attention(q, k, v, block_q=256, block_k=256)
print(peak_kib() - before)
"""


def test_peak_memory_at_8k_tokens_is_a_tenth_of_naive_or_less():
    """Peak resident memory each adds, measured in a fresh process: the naive (T × S) scores take
    hundreds of MB at 8k tokens; the tiled loop only its blocks."""
    grown = {}
    for kind in ("naive", "flash"):
        result = subprocess.run([sys.executable, "-c", PEAK, kind], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        grown[kind] = int(result.stdout.split()[-1])  # KiB
    assert grown["naive"] > 200_000  # the 8192² fp32 score matrix alone is 256 MiB
    assert grown["flash"] <= grown["naive"] / 10
