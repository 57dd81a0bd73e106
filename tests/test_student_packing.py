"""Packed documents: every document in a row behaves exactly as if it were alone, in both
layouts of shared.student.packing (segments: one pass with varlen WKV and reset token shifts;
per_document: the row re-laid out as batches of whole documents)."""
from __future__ import annotations

import pytest
import torch

from shared.student import convert_teacher
from shared.student.packing import (
    DocumentBatch,
    PackedSegments,
    document_starts,
    packed_document_starts,
    packed_documents,
)
from shared.tiny import tiny_teacher

VOCAB = 101
LAYOUTS = ["segments", "per_document"]
COMBOS = [("block", "mlp"), ("block", "rwkv_cmix"), ("attention_only", "mlp")]
# row 0: documents of 5, 9 and 1 tokens, then 3 padding; row 1: 17 tokens and 1 of padding
DOCS = [[5, 9, 1], [17]]
WIDTH = 18

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def teacher():
    return tiny_teacher("llama", layers=4)


def packed_batch(seed: int = 0) -> tuple[list[list[torch.Tensor]], dict[str, torch.Tensor]]:
    """The documents, and the batch the data loader's collate makes of them (right padding,
    position_ids restarting per document and counting on into the padding)."""
    gen = torch.Generator().manual_seed(seed)
    docs = [[torch.randint(3, VOCAB, (n,), generator=gen) for n in row] for row in DOCS]
    ids = torch.zeros(len(DOCS), WIDTH, dtype=torch.long)
    pos = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(docs):
        at = 0
        for doc in row:
            ids[r, at:at + len(doc)] = doc
            pos[r, at:at + len(doc)] = torch.arange(len(doc))
            at += len(doc)
        mask[r, :at] = 1
        pos[r, at:] = pos[r, at - 1] + 1 + torch.arange(WIDTH - at)
    return docs, {"input_ids": ids, "position_ids": pos, "attention_mask": mask}


def test_document_batch_round_trip_and_grouping() -> None:
    _, batch = packed_batch()
    starts = document_starts(batch["position_ids"])
    assert starts.sum().item() == 4  # the padding continues the last document: no new start
    docs = DocumentBatch(starts)
    assert docs.num_documents == 4
    # lengths 5, 9, 4 (1 + 3 padding) and 18 (17 + 1): groups 3-4, 5-8, 9-16, 17-32
    assert sorted(docs.shapes) == [(1, 4), (1, 5), (1, 9), (1, 18)]
    x = torch.randn(2, WIDTH, 3, requires_grad=True)
    parts = docs.split(x)
    torch.testing.assert_close(docs.merge(parts), x, rtol=0, atol=0)
    docs.merge(parts).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))  # each token exactly once


def test_segments_cut_the_flattened_rows_at_document_starts() -> None:
    _, batch = packed_batch()
    segments = PackedSegments(document_starts(batch["position_ids"]))
    # row 0: 5, 9 and 1 + 3 padding; row 1 starts at flat index 18: 17 + 1 padding
    assert segments.cu_seqlens_cpu.tolist() == [0, 5, 14, 18, 36]
    assert segments.num_documents == 4
    assert segments.continues[:, :, 0].logical_not().nonzero().tolist() == [[0, 0], [0, 5],
                                                                            [0, 14], [1, 0]]


def test_rows_without_restarts_are_not_packed() -> None:
    pos = torch.arange(6).repeat(2, 1)
    assert packed_document_starts(pos, None, 2) is None
    # generation's left padding: positions 1,1,0,1,2 - the jump after the padding is no document
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    assert packed_document_starts(torch.tensor([[1, 1, 0, 1, 2]]), mask, 1) is None
    with pytest.raises(ValueError, match="right-padded"):
        packed_document_starts(torch.tensor([[1, 0, 1, 0, 1]]), torch.tensor([[0, 1, 1, 1, 1]]),
                               1)
    _, batch = packed_batch()
    assert isinstance(packed_documents(batch["position_ids"], None, 2, "segments"),
                      PackedSegments)
    assert isinstance(packed_documents(batch["position_ids"], None, 2), DocumentBatch)
    with pytest.raises(ValueError, match="choose one of per_document, segments"):
        packed_documents(batch["position_ids"], None, 2, "varlen")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mixer", ["rwkv6", "rwkv7"])
@pytest.mark.parametrize("mode,ffn", COMBOS)
def test_packed_documents_equal_separate_runs(teacher, mixer: str, mode: str, ffn: str,
                                              layout: str) -> None:
    """Attention layers (block-diagonal mask) and RWKV layers (zero state per document) alike."""
    student = convert_teacher(teacher, dict(layers=[1, 3], mixer=mixer, mode=mode, ffn=ffn)).eval()
    student.model.packed_layout = layout
    docs, batch = packed_batch()
    with torch.no_grad():
        packed = student(**batch, use_cache=False).logits
        for r, row in enumerate(docs):
            at = 0
            for doc in row:
                alone = student(doc[None]).logits[0]
                torch.testing.assert_close(packed[r, at:at + len(doc)], alone, rtol=1e-5, atol=1e-5)
                at += len(doc)
        # without position_ids the documents see each other: the test above can fail
        leaky = student(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert not torch.allclose(leaky[0, 5:14], packed[0, 5:14], atol=1e-4)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mixer", ["rwkv6", "rwkv7"])
def test_packed_align_forward_and_gradients(teacher, mixer: str, layout: str) -> None:
    """Teacher-forced alignment on packed rows: outputs and mixer gradients equal the per-document
    ones, and nothing flows between documents."""
    student = convert_teacher(teacher, dict(layers=[1, 3], mixer=mixer))
    student.model.packed_layout = layout
    docs, batch = packed_batch(seed=1)
    states = torch.randn(2, WIDTH, 64, generator=torch.Generator().manual_seed(2))
    inputs = {1: states, 3: states * 0.5}
    outs = student.align_forward(inputs, batch["attention_mask"], batch["position_ids"])
    real = batch["attention_mask"].bool()
    sum(o[real].square().sum() for o in outs.values()).backward()
    packed_grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()
    total = 0.0
    for r, row in enumerate(docs):
        at = 0
        for doc in row:
            sl = slice(at, at + len(doc))
            alone = student.align_forward({i: x[r:r + 1, sl] for i, x in inputs.items()})
            for i, out in alone.items():
                torch.testing.assert_close(outs[i][r:r + 1, sl], out, rtol=1e-5, atol=1e-5)
            total = total + sum(o.square().sum() for o in alone.values())
            at += len(doc)
    total.backward()
    assert packed_grads
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, dict(student.named_parameters())[name].grad,
                                   rtol=1e-4, atol=1e-5, msg=name)


def test_packed_rows_refuse_a_cache(teacher) -> None:
    student = convert_teacher(teacher, dict(layers=[1])).eval()
    _, batch = packed_batch()
    with pytest.raises(ValueError, match="use_cache=False"):
        student(**batch, use_cache=True)


def test_auto_layout_takes_segments_only_where_the_wkv_runs_on_fla(teacher) -> None:
    """``packed_layout: auto`` (the default): segments where fla's varlen kernels take the rows
    in one pass, per_document on the chunked path, where it batches documents of like length."""
    student = convert_teacher(teacher, dict(layers=[1, 3], mixer="rwkv7"))
    assert student.model.packed_layout == "auto"
    _, batch = packed_batch()
    hidden = torch.zeros(2, WIDTH, 64)  # float32 on the CPU: the chunked path
    layout = student.model.packed_documents(batch["position_ids"], batch["attention_mask"],
                                            hidden)
    assert isinstance(layout, DocumentBatch)
    student.config.rwkv_kernel = "fla"  # what auto resolves to on CUDA with fla installed
    layout = student.model.packed_documents(batch["position_ids"], batch["attention_mask"],
                                            hidden)
    assert isinstance(layout, PackedSegments)
    assert layout.cu_seqlens_cpu.tolist() == [0, 5, 14, 18, 36]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_host_copies_find_the_documents_without_reading_the_device(teacher, layout: str) -> None:
    """The trainer passes the batch's host copies (``host_positions``): the documents are found
    in them, the device tensors are not read (here they are on the meta device, which cannot be
    read at all: reading a CUDA tensor would wait for the GPU), and the student's outputs and
    gradients are those of the device-side detection."""
    _, batch = packed_batch()
    pos, mask = batch["position_ids"], batch["attention_mask"]
    want = packed_documents(pos, mask, 2, layout)
    got = packed_documents(pos.to("meta"), mask.to("meta"), 2, layout, host=(pos, mask))
    if layout == "segments":
        assert got.cu_seqlens_cpu.tolist() == want.cu_seqlens_cpu.tolist() == [0, 5, 14, 18, 36]
        assert got.cu_seqlens.device.type == got.continues.device.type == "meta"
        assert got.continues.shape == want.continues.shape
    else:
        assert got.shapes == want.shapes
    with pytest.raises((NotImplementedError, RuntimeError)):  # the device-side detection reads
        packed_documents(pos.to("meta"), mask.to("meta"), 2, layout)
    flat = torch.arange(WIDTH).repeat(2, 1)  # no restart in any row: not packed, host or device
    assert packed_documents(flat.to("meta"), None, 2, layout, host=(flat, None)) is None

    student = convert_teacher(teacher, dict(layers=[1, 3], mixer="rwkv7"))
    student.model.packed_layout = layout
    results = []
    for host in (None, (pos, mask)):
        student.zero_grad(set_to_none=True)
        extra = {} if host is None else {"host_positions": host}
        logits = student(**batch, use_cache=False, **extra).logits
        states = torch.randn(2, WIDTH, 64, generator=torch.Generator().manual_seed(3))
        outs = student.align_forward({1: states, 3: states}, mask, pos, host)
        (logits.square().mean() + sum(o.square().mean() for o in outs.values())).backward()
        results.append((logits.detach(), {i: o.detach() for i, o in outs.items()},
                        {n: p.grad for n, p in student.named_parameters() if p.grad is not None}))
    (logits0, outs0, grads0), (logits1, outs1, grads1) = results
    torch.testing.assert_close(logits1, logits0, rtol=0, atol=0)
    for i in outs0:
        torch.testing.assert_close(outs1[i], outs0[i], rtol=0, atol=0)
    assert grads1.keys() == grads0.keys()
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=0, atol=0, msg=name)
