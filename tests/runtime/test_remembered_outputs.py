"""Outputs remembered for a graph file: found again only for that very file and those feeds."""

from __future__ import annotations

import os

import numpy as np

from lora_edge.runtime.session import forget_outputs, remember_outputs, remembered_outputs


def test_remembered_for_the_same_file_and_feeds_only(tmp_path):
    graph = tmp_path / "g.onnx"
    graph.write_bytes(b"first")
    feeds = [{"input_ids": np.arange(6, dtype=np.int64).reshape(2, 3)}]
    outputs = [[np.ones(3, np.float32)]]
    try:
        remember_outputs(graph, feeds, outputs)
        assert remembered_outputs(graph, feeds) is outputs
        link = tmp_path / "link.onnx"
        link.symlink_to(graph)
        assert remembered_outputs(link, feeds) is outputs  # the same file through a link
        other = [{"input_ids": np.arange(6, dtype=np.int64).reshape(3, 2)}]
        assert remembered_outputs(graph, other) is None  # another shape
        changed = [{"input_ids": np.arange(1, 7, dtype=np.int64).reshape(2, 3)}]
        assert remembered_outputs(graph, changed) is None  # other values
        graph.write_bytes(b"second")  # rewritten: another size (and mtime)
        assert remembered_outputs(graph, feeds) is None
        remember_outputs(graph, feeds, outputs)
        replacement = tmp_path / "new.onnx"
        replacement.write_bytes(b"second")
        os.utime(replacement, ns=(graph.stat().st_atime_ns, graph.stat().st_mtime_ns))
        os.replace(replacement, graph)  # same size and mtime, another inode
        assert remembered_outputs(graph, feeds) is None
        assert remembered_outputs(tmp_path / "missing.onnx", feeds) is None
    finally:
        forget_outputs()
    remember_outputs(graph, feeds, outputs)
    forget_outputs()
    assert remembered_outputs(graph, feeds) is None
