"""CPU lanes (mlx_ft.lanes): a micro-batch split over MLX CPU streams is the same step."""

from __future__ import annotations

import numpy as np
import pytest
from test_mlx_support import examples, mlx_backend, randomize_b

from common.train.batching import make_batch
from mlx_ft import lanes


def rows_of(batch) -> list[tuple]:
    """Each row's unpadded (ids, mask, positions) per segment: what a split must keep."""
    out = []
    for ids, mask, seg, pos in zip(batch.input_ids, batch.loss_mask, batch.segment_ids, batch.position_ids,
                                   strict=True):
        for s in sorted(set(seg) - {0}):
            keep = [t for t, x in enumerate(seg) if x == s]
            out.append(([ids[t] for t in keep], [mask[t] for t in keep], [pos[t] for t in keep]))
    return out


@pytest.mark.parametrize("lanes_n", [2, 3, 4])
def test_split_keeps_every_example_whole_and_balances_tokens(lanes_n):
    exs = examples(lengths=(11, 6, 8, 9, 12, 5))
    for batch in (make_batch([[e] for e in exs], 0), make_batch([exs[:3], exs[3:]], 0), make_batch([exs], 0)):
        parts = lanes.split(batch, lanes_n, 0)
        assert 1 < len(parts) <= lanes_n
        assert sorted(r for p in parts for r in rows_of(p)) == sorted(rows_of(batch))  # no example cut or lost
        assert sum(p.n_tokens for p in parts) == batch.n_tokens
        assert sum(p.n_supervised for p in parts) == batch.n_supervised
        if len(batch.input_ids) >= lanes_n:  # whole rows, longest first to the lightest part
            sizes = [p.n_tokens for p in parts]
            assert max(sizes) - min(sizes) <= max(map(len, batch.input_ids)), sizes


def test_a_packed_row_is_cut_at_the_example_boundary_nearest_its_middle():
    exs = examples(lengths=(11, 6, 8, 9, 12, 5))  # starts at 11, 17, 25, 34, 46 of 51 tokens
    halves = lanes.split(make_batch([exs], 0), 2, 0)
    assert [p.n_tokens for p in halves] == [26, 25]  # 25 | 26, the longer part first
    assert [p.position_ids[0][0] for p in halves] == [0, 0]  # each part starts an example


def test_split_of_one_example_or_one_lane_is_the_batch():
    batch = make_batch([examples(lengths=(9,))], 0)
    assert lanes.split(batch, 2, 0) == [batch]
    two = make_batch([[e] for e in examples()], 0)
    assert lanes.split(two, 1, 0) == [two]


def test_lanes_default_to_the_cores_on_linux_cpu_only(monkeypatch):
    monkeypatch.setattr(lanes.sys, "platform", "linux")
    monkeypatch.setattr(lanes.os, "sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    assert lanes.default_lanes(True) == 2 and lanes.default_lanes(False) == 1
    monkeypatch.setattr(lanes.sys, "platform", "darwin")  # Accelerate's BLAS is threaded already
    assert lanes.default_lanes(True) == 1


@pytest.mark.mlx
def test_a_step_in_lanes_equals_the_step_in_one(tiny_model_dir):
    pytest.importorskip("mlx_lm")
    from mlx.utils import tree_flatten

    # Guards the lanes' sum: parts on their own streams must give the whole batch's loss, gradients and update.
    exs = examples(lengths=(11, 6, 8, 9, 12))
    micro = [make_batch([[e] for e in exs[:3]], 0), make_batch([exs[3:]], 0)]  # rows; then one packed row
    total = sum(m.n_supervised for m in micro)
    results = {}
    for n in (1, 2, 3):
        backend = mlx_backend(tiny_model_dir)
        randomize_b(backend)
        backend.set_lanes(n)
        losses = [backend.forward_backward(m, 1.0 / total) for m in micro]
        grads = {k: np.array(v) for k, v in tree_flatten(backend._grads)}
        stats = backend.optimizer_step(1e-2, 1.0)
        evals = [backend.eval_loss(m) for m in micro]
        results[n] = (losses, grads, stats.grad_norm, evals,
                      {k: np.array(v) for k, v in tree_flatten(backend.model.trainable_parameters())})
    one = results[1]
    for n in (2, 3):
        losses, grads, norm, evals, after = results[n]
        assert losses == pytest.approx(one[0], rel=1e-6)
        assert norm == pytest.approx(one[2], rel=1e-5)
        assert [c for _, c in evals] == [c for _, c in one[3]]
        assert [s for s, _ in evals] == pytest.approx([s for s, _ in one[3]], rel=1e-6)
        for k in one[1]:
            np.testing.assert_allclose(grads[k], one[1][k], atol=1e-6, err_msg=k)
            np.testing.assert_allclose(after[k], one[4][k], atol=1e-6, err_msg=k)
