"""The grid field's row-sparse training path: lookup gradients, touched rows, RowAdam."""

import pytest
import torch
import torch.nn.functional as F

from gen3d_plugins.grid_field import RowAdam, TrilinearLookup, touched_rows, unique_rows


def test_unique_rows_finds_each_row_once_and_maps_every_entry_to_it():
    scratch: dict = {}
    for n_rows, n in [(1000, 5000), (1000, 37), (50, 400)]:  # the scratch is reused, then resized
        index = torch.randint(0, n_rows, (n,))
        rows, inverse = unique_rows(index, n_rows, scratch)
        assert torch.equal(rows.sort().values, index.unique())
        assert torch.equal(rows[inverse], index)


def test_sparse_lookup_gradient_sums_like_the_dense_one():
    table = torch.randn(64, 5, requires_grad=True)
    idx, w = torch.randint(0, 64, (300, 8)), torch.rand(300, 8)
    upstream = torch.randn(300, 5)
    (TrilinearLookup.apply(table, idx, w) * upstream).sum().backward()
    dense = table.detach().clone().requires_grad_()
    (F.embedding_bag(idx, dense, per_sample_weights=w, mode="sum") * upstream).sum().backward()
    rows, summed = touched_rows(table.grad)
    assert table.grad.is_sparse and torch.equal(rows.sort().values, idx.unique())
    torch.testing.assert_close(summed, dense.grad[rows])


@pytest.mark.parametrize("betas", [(0.9, 0.99), (0.0, 0.99)])  # beta1 0: no first moment is kept
def test_row_adam_is_adam_on_touched_rows_and_leaves_the_rest(betas):
    torch.manual_seed(0)
    start = torch.randn(20, 3)
    ours, reference = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    row_adam, adam = RowAdam([ours], lr=0.05, betas=betas), torch.optim.Adam([reference], lr=0.05, betas=betas, eps=1e-8)
    touched = torch.arange(12)  # rows 12..19 never get a gradient
    for _ in range(5):
        grad = torch.zeros(20, 3)
        grad[touched] = torch.randn(12, 3)
        # a row-sparse gradient with repeated rows, as the lookup's backward makes
        ours.grad = torch.sparse_coo_tensor(torch.cat([touched, touched])[None], torch.cat([grad[touched] / 2] * 2),
                                            (20, 3), check_invariants=True)
        reference.grad = grad
        row_adam.step()
        adam.step()
    torch.testing.assert_close(ours.data[touched], reference.data[touched])
    assert torch.equal(ours.data[12:], start[12:])
    assert torch.equal(row_adam.state[ours]["exp_avg_sq"][12:], torch.zeros(8, 3))
    assert ("exp_avg" in row_adam.state[ours]) == (betas[0] > 0)
