"""drop_mapped_pages: a model file's mapped pages leave the RSS and read back as the file's."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from lora_edge.runtime.session import drop_mapped_pages


def _mapped_kb(path) -> int:
    """Resident kB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, current = 0, None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:
                current = fields[5] if len(fields) > 5 else None
            elif fields[0] == "Rss:" and current == str(path):
                total += int(fields[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps and madvise: Linux only")
def test_dropped_pages_leave_the_rss_and_read_back_unchanged(tmp_path):
    """A private read-write mapping (as safetensors loads weights) of 8 MB: resident, dropped, then equal."""
    path = (tmp_path / "model.safetensors").resolve()
    values = np.arange(2 * 1024 * 1024, dtype=np.float32)
    values.tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="c")  # copy-on-write: private, read-write
    assert float(mapped.sum()) == float(values.sum())  # every page touched
    before = _mapped_kb(path)
    assert before >= 7 * 1024
    assert drop_mapped_pages([path, tmp_path / "absent.safetensors"]) >= 8 * 1024 * 1024
    assert _mapped_kb(path) < before // 4
    np.testing.assert_array_equal(mapped, values)  # read again from the file


def test_nothing_mapped_drops_nothing(tmp_path):
    assert drop_mapped_pages([tmp_path / "model.safetensors"]) == 0
