"""ddptrain.shared_staging: the process-mode stager that puts a whole state into one
shared buffer, checked through a real spawned process as DCP's helper receives it."""

from __future__ import annotations

import collections
import copy
import multiprocessing

import torch

from ddptrain.shared_staging import FlatSharedStager, SharedSlice


def sample_state() -> dict:
    generator = torch.Generator().manual_seed(0)
    model = collections.OrderedDict(
        weight=torch.randn(5, 3, generator=generator),
        bias=torch.randn(5, generator=generator).double(),
        num_batches_tracked=torch.tensor(7),  # 0-dim int64
        mask=torch.tensor([True, False, True]),
        empty=torch.empty(0, 4),
        half=torch.randn(3, 3, generator=generator).half().t(),  # not contiguous
    )
    return {"model": model,
            "optim": {"state": {0: {"momentum_buffer": torch.ones(2, 2)}},
                      "param_groups": [{"lr": 0.1, "params": [0]}]},
            "extra": {"rng": (3, (1, 2, 3), None), "name": "run", "epoch": 2}}


def flatten(state, prefix=""):
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return {prefix: state}
    out = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}/{key}"))
    return out


def receive(conn) -> None:
    """As DCP's helper: unpickle the staged state; send back what it holds."""
    staged = conn.recv()
    flat = flatten(staged)
    report = {key: ((value.tolist(), value.dtype, tuple(value.shape)),
                    value.untyped_storage().nbytes() == value.nbytes)
              if isinstance(value, torch.Tensor) else (value, None)
              for key, value in flat.items()}  # by value: this process exits next
    conn.send(report)


def through_a_process(staged):
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=receive, args=(child,), daemon=True)
    process.start()
    child.close()
    parent.send(staged)
    report = parent.recv()
    process.join(30)
    return report


def test_staged_state_arrives_whole_as_plain_tensors_over_their_own_slots():
    state = sample_state()
    stager = FlatSharedStager()
    staged = stager.stage(state)
    expected = copy.deepcopy(flatten(state))
    state["model"]["weight"].add_(1.0)  # later training steps: the copy is unaffected
    state["optim"]["param_groups"][0]["lr"] = 5.0
    report = through_a_process(staged)
    assert report.keys() == expected.keys()
    for key, value in expected.items():
        got, exact_storage = report[key]
        if isinstance(value, torch.Tensor):
            assert exact_storage, f"{key}: storage is larger than the tensor (DCP copies)"
            assert got == (value.tolist(), value.dtype, tuple(value.shape)), key
        else:
            assert got == value, key
    stager.close()


def test_buffer_is_reused_while_the_layout_stays_and_replaced_when_it_changes():
    stager = FlatSharedStager()
    first = stager.stage(sample_state())
    buffer = first["model"]["weight"].buffer
    assert buffer.is_shared()
    pieces = [v for v in flatten(first).values() if isinstance(v, SharedSlice)]
    assert len(pieces) == 7 and all(p.buffer is buffer for p in pieces)
    offsets = [p.offset for p in pieces]
    assert offsets == sorted(offsets) and all(o % 64 == 0 for o in offsets)
    again = sample_state()
    again["model"]["weight"].fill_(3.0)
    second = stager.stage(again)
    assert second["model"]["weight"].buffer is buffer
    assert torch.equal(second["model"]["weight"].tensor(), torch.full((5, 3), 3.0))
    grown = sample_state()
    grown["model"]["weight"] = torch.zeros(6, 3)
    third = stager.stage(grown)
    assert third["model"]["weight"].buffer is not buffer
    assert torch.equal(third["model"]["weight"].tensor(), torch.zeros(6, 3))
    stager.close()


def test_a_tensor_it_cannot_place_makes_it_decline():
    state = sample_state()
    state["model"]["sparse"] = torch.eye(3).to_sparse()
    assert FlatSharedStager().stage(state) is None
