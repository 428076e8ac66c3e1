"""The plain-PyTorch reference is torch.nn.RNN with b_hh folded into u: outputs and every gradient."""

import pytest
import torch

from asr.errors import UserError
from asr.ops import recurrence
from ops_cases import grads, loop_oracle, make_rnn, op_from_rnn, random_problem, rnn_reference

T, N, I, H = 7, 4, 3, 5
RAGGED = torch.tensor([7, 3, 5, 1])


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("directions", [1, 2])
@pytest.mark.parametrize("ragged", [False, True], ids=["full", "ragged"])
def test_reference_matches_torch_rnn_outputs_and_grads(activation, directions, ragged):
    rnn = make_rnn(I, H, activation, directions)
    torch.manual_seed(1)
    x = torch.randn(T, N, I, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(directions, N, H, dtype=torch.float64, requires_grad=True)
    lengths = RAGGED if ragged else None
    inputs = [x, h0, *rnn.parameters()]

    y_ref, h_ref = rnn_reference(rnn, x, h0, lengths)
    y_op, h_op = op_from_rnn(rnn, x, h0, lengths, activation, "reference")
    torch.testing.assert_close(y_op, y_ref)
    torch.testing.assert_close(h_op, h_ref)
    if ragged:
        assert (y_op[3:, 1] == 0).all() and (y_op[1:, 3] == 0).all()

    for g_op, g_ref, name in zip(grads([y_op, h_op], inputs), grads([y_ref, h_ref], inputs),
                                 ["x", "h0"] + [n for n, _ in rnn.named_parameters()]):
        torch.testing.assert_close(g_op, g_ref, msg=lambda m: f"grad of {name}: {m}")


def test_two_direction_api_with_one_direction_matches_three_dim_api():
    rnn = make_rnn(I, H, "relu", 1)
    x = torch.randn(T, N, I, dtype=torch.float64)
    h0 = torch.randn(1, N, H, dtype=torch.float64)
    y3, h3 = op_from_rnn(rnn, x, h0, RAGGED, "relu", "reference", single_direction_api=True)
    y4, h4 = op_from_rnn(rnn, x, h0, RAGGED, "relu", "reference", single_direction_api=False)
    torch.testing.assert_close(y3, y4)
    torch.testing.assert_close(h3, h4)


@pytest.mark.parametrize("activation", ["relu", "clipped_relu", "tanh"])
def test_reference_matches_per_sequence_loop_including_clip_and_zero_length(activation):
    # Large inputs so the clip at 20 is actually reached.
    u, w, h0 = random_problem(T, N, 2, H, scale=15.0)
    lengths = torch.tensor([7, 0, 4, 1])
    y, h_last = recurrence(u, w, h0, lengths, activation, backend="reference")
    y_loop, h_loop = loop_oracle(u, w, h0, lengths, activation)
    torch.testing.assert_close(y, y_loop)
    torch.testing.assert_close(h_last, h_loop)
    if activation == "clipped_relu":
        assert y.max() == 20.0 and (y >= 0).all()
    torch.testing.assert_close(h_last[1], h0[1])  # zero length: the state passes through


def test_reference_gradcheck_clipped_relu():
    u, w, h0 = random_problem(4, 3, 2, 3, scale=8.0)
    lengths = torch.tensor([4, 2, 3])
    args = [t.requires_grad_() for t in (u, w, h0)]
    assert torch.autograd.gradcheck(
        lambda u, w, h0: recurrence(u, w, h0, lengths, "clipped_relu", backend="reference"), args)


def test_h0_none_means_zeros():
    u, w, _ = random_problem(T, N, 1, H)
    y_none, h_none = recurrence(u[:, :, 0], w[0], None, RAGGED, "tanh", backend="reference")
    y_zero, h_zero = recurrence(u[:, :, 0], w[0], torch.zeros(N, H, dtype=u.dtype), RAGGED, "tanh", backend="reference")
    torch.testing.assert_close(y_none, y_zero)
    torch.testing.assert_close(h_none, h_zero)
    assert y_none.shape == (T, N, H) and h_none.shape == (N, H)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(u=torch.zeros(3, 2)), "u must be"),
        (dict(w_hh=torch.zeros(4, 4)), "w_hh must have shape"),
        (dict(h0=torch.zeros(2, 5)), "h0 must have shape"),
        (dict(lengths=torch.tensor([1, 2])), "lengths must be"),
        (dict(lengths=torch.tensor([1.0, 2.0, 3.0])), "int64"),
        (dict(lengths=torch.tensor([1, 2, 9])), r"lengths must lie in \[0, T=7\]"),
        (dict(activation="sigmoid"), "activation must be"),
        (dict(backend="fast"), "backend must be"),
        (dict(w_hh=torch.zeros(5, 5, dtype=torch.float64)), "w_hh is torch.float64"),
    ],
)
def test_bad_arguments_raise_user_error(change, message):
    args = dict(u=torch.zeros(7, 3, 5), w_hh=torch.zeros(5, 5), h0=None, lengths=None, activation="relu",
                backend="reference")
    args.update(change)
    with pytest.raises(UserError, match=message):
        recurrence(**args)
