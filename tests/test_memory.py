"""Giving back the pages of tensors a quantisation run no longer needs, without losing data (Linux)."""

import sys

import pytest
import torch

from lowbit.memory import drop_file_pages, release_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc/self/pagemap")


def _rss_file_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssFile:"))


@pytest.fixture
def mapped(tmp_path):
    """A 32 MiB float32 tensor mapped privately from a file, as safetensors loads weights."""
    data = torch.arange(8 << 20, dtype=torch.float32)
    path = tmp_path / "weights.bin"
    path.write_bytes(data.numpy().tobytes())
    return torch.from_file(str(path), shared=False, size=data.numel(), dtype=torch.float32), data


def test_file_pages_are_dropped_and_read_again(mapped):
    tensor, data = mapped
    assert torch.equal(tensor, data)  # every page resident now
    before = _rss_file_kib()
    assert drop_file_pages(tensor)
    assert _rss_file_kib() < before - 24 * 1024
    assert torch.equal(tensor, data)  # read again from the file


def test_a_written_page_is_never_dropped(mapped):
    tensor, data = mapped
    tensor[5 << 20] = -1.0  # a private copy of that page now holds the only copy of this value
    assert not drop_file_pages(tensor)
    release_pages(tensor)  # the kernel may decline; nothing may be lost either way
    assert tensor[5 << 20].item() == -1.0 and torch.equal(tensor[: 5 << 20], data[: 5 << 20])


def test_anonymous_memory_is_kept():
    tensor = torch.randn(2 << 20)
    copy = tensor.clone()
    assert not drop_file_pages(tensor)
    release_pages(tensor)
    assert torch.equal(tensor, copy)
