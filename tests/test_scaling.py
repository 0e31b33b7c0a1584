"""Scaling on paper: the analytic halo rule against compiled programs, node placement, async overlap."""

from workbench.analysis.audit import async_overlap, audit, audit_text
from workbench.analysis.scaling import busiest_device_halo_bytes, crossing_axes, halo_bytes, halo_messages
from workbench.analysis.schedule import halo_schedule
from workbench.mesh import ShardLayout
from workbench.model.unet import UNetConfig
from workbench.training.step import compile_train_step


def test_halo_rule_matches_a_compiled_training_step():
    """Forward and adjoint exchanges of every conv but the first, non-cubic block,
    an axis of one device (exchanges nothing), one of two (one two-way message) and one of
    four (every device's buffers, one message each way)."""
    cfg = UNetConfig.preset("small")
    layout = ShardLayout((32, 32, 64), "1x2x4", multiple=cfg.multiple)  # block 32 x 16 x 16
    text = compile_train_step(cfg, layout).as_text()
    r = audit_text(text)
    messages = halo_messages(cfg, layout.block_shape, "1x2x4")
    assert r["collectives"]["collective-permute"]["count"] == len(messages) == (2 * 10 - 1) * (1 + 2)
    assert r["halo_bytes"] == halo_bytes(cfg, layout.block_shape, "1x2x4")
    assert {m["axis"] for m in messages} == {"y", "x"}
    # the schedule reader tells the passes apart from the metadata, and the axes from the pairs
    s = halo_schedule(text, mesh="1x2x4")
    for name in ("forward", "backward"):
        mine = sorted((m["axis"], m["bytes"]) for m in messages if m["pass"] == name)
        assert sorted((p["axis"], p["bytes"]) for p in s["permutes"] if p["pass"] == name) == mine
        # XLA:CPU runs every collective synchronously: nothing overlaps
        assert s["passes"][name]["sync"] == len(mine) and s["passes"][name]["overlapped_fraction"] == 0.0


def test_halo_rule_reproduces_the_paper_model_audits():
    """XLA:GPU's audits of the paper model's training step (README Scale table: 512³ and
    1024³ on 2x2x2 / 4x4x4 / 8x8x8, compiled before axes of two devices were paired; and
    benchmarks/results/halo_overlap_after_2026-12-06.json, after) are exactly the rule at
    256³ and 128³ blocks: face area, not volume, so twice the block is ~4x the bytes."""
    cfg = UNetConfig.preset("paper")
    assert halo_bytes(cfg, (256,) * 3, paired=False) == 387_171_344
    assert len(halo_messages(cfg, (256,) * 3, paired=False)) == 162
    assert halo_bytes(cfg, (128,) * 3, "4x4x4") == 98_252_816  # no axis of two: nothing paired
    # paired: one two-way message per axis on 2x2x2, a result buffer of one face
    assert halo_bytes(cfg, (256,) * 3) == 387_171_344 // 2 == 193_585_672
    assert len(halo_messages(cfg, (256,) * 3)) == 81
    # inference pads the decoder's two inputs separately: same bytes, more messages
    forward = [m for m in halo_messages(cfg, (256,) * 3) if m["pass"] == "forward"]
    infer = halo_messages(cfg, (256,) * 3, train=False)
    assert sum(m["bytes"] for m in infer) == sum(m["bytes"] for m in forward)
    assert len(infer) == len(forward) + 3 * 3


def test_busiest_device_and_node_crossings():
    cfg = UNetConfig.preset("paper")
    total = halo_bytes(cfg, (256,) * 3, "4x4x4")
    # two devices per axis: one neighbour each (one two-way message); four: interior devices have two
    assert busiest_device_halo_bytes(cfg, (256,) * 3, "2x2x2") * 2 == total
    assert busiest_device_halo_bytes(cfg, (256,) * 3, "2x2x2") == halo_bytes(cfg, (256,) * 3, "2x2x2")
    assert busiest_device_halo_bytes(cfg, (256,) * 3, "4x4x4") == total
    # row-major placement, 8 devices per node: x stays inside a node from 8 along x on
    assert crossing_axes("2x2x2") == {"z": False, "y": False, "x": False}
    assert crossing_axes("2x2x4") == {"z": True, "y": False, "x": False}
    assert crossing_axes("2x4x4") == {"z": True, "y": True, "x": False}
    assert crossing_axes("8x8x8") == {"z": True, "y": True, "x": False}
    assert crossing_axes("1x1x16") == {"z": False, "y": False, "x": True}
    assert crossing_axes("2x2x2", devices_per_node=4) == {"z": True, "y": False, "x": False}


SCHEDULED = """HloModule m, is_scheduled=true

%fused (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  ROOT %cp = f32[8]{0} collective-permute(%p), source_target_pairs={{0,1}}
}

ENTRY %main (a: bf16[1,4,4,4,2]) -> bf16[1,4,4,4,2] {
  %a = bf16[1,4,4,4,2]{4,3,2,1,0} parameter(0)
  %cps = (bf16[1,1,4,4,2]{4,3,2,1,0}, bf16[1,1,4,4,2]{4,3,2,1,0}) collective-permute-start(%s), channel_id=1, source_target_pairs={{0,2},{1,3}}, backend_config={"collective_backend_config":{"is_sync":false}}
  %conv = (bf16[1,2,4,4,4]{4,3,2,1,0}, u8[0]{0}) custom-call(%x, %w), window={size=3x3x3}, dim_labels=bf012_oi012->bf012, custom_call_target="__cudnn$convBackwardInput"
  %f = f32[16]{0} fusion(%y), kind=kLoop, calls=%fused
  %cpd = bf16[1,1,4,4,2]{4,3,2,1,0} collective-permute-done(%cps)
  %ars = f32[32]{0} all-reduce-start(%g), replica_groups={{0,1,2,3}}, to_apply=%add, backend_config={"collective_backend_config":{"is_sync":true}}
  %ard = f32[32]{0} all-reduce-done(%ars)
  %ar2 = f32[4]{0} all-reduce(%h), replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %r = bf16[1,4,4,4,2]{4,3,2,1,0} add(%a, %a)
}
"""


def test_async_overlap_reads_the_schedule():
    r = async_overlap(SCHEDULED)
    by = {c["name"]: c for c in r["collectives"]}
    assert set(by) == {"cps", "ars", "ar2"}  # the entry's only; the fused computation's permute is not scheduled
    cp = by["cps"]
    assert cp["bytes"] == 2 * 16 * 2 and cp["pairs"] == [(0, 2), (1, 3)] and not cp["is_sync"]
    assert cp["convolutions"] == 1 and cp["fusions"] == 1 and cp["fusion_bytes"] == 64
    assert by["ars"]["is_sync"] and by["ars"]["bytes"] == 128 and by["ars"]["fusions"] == 0
    assert by["ar2"]["is_sync"]
    assert r["summary"]["collective-permute"] == {
        "count": 1,
        "sync": 0,
        "with_convolution": 1,
        "with_fusion": 1,
        "nothing_between": 0,
    }
    assert r["summary"]["all-reduce"]["count"] == 2 and r["summary"]["all-reduce"]["nothing_between"] == 2


def test_halo_rule_of_a_spec_with_strided_and_anisotropic_layers():
    """The same rule, from the layer spec, for an nnU-Net network: (1, 3, 3) kernels (no z
    halo), strided convolutions with the asymmetric (1, 0) halo (one message per axis, not
    two; the (1, 1) halos of the 2-device axes: one two-way message) and a decoder whose
    first conv pads the concatenation, against its compiled forward."""
    import jax
    import jax.numpy as jnp

    from workbench.execute.nnunet import make_nnunet_forward, nnunet_layout
    from workbench.model.nnunet import NNUNetModel
    from workbench.model.spec import NetworkSpec

    spec = NetworkSpec.plain(in_channels=2, num_outputs=3, kernels=[(1, 3, 3), (3, 3, 3), (3, 3, 3)],
                             strides=[1, (1, 2, 2), 2], features=[4, 8, 8], blocks=[2, 1, 1])  # fmt: skip
    layout = nnunet_layout(spec, (16, 32, 32), "2x2x2")  # blocks 8 x 16 x 16
    fn, _, in_sharding, var_sharding = make_nnunet_forward(spec, layout, deep_supervision=False)
    variables = jax.eval_shape(lambda: NNUNetModel.init(spec).variables)
    variables = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=var_sharding), variables)
    x = jax.ShapeDtypeStruct((1, *layout.padded_shape, 2), jnp.float32, sharding=in_sharding)
    r = audit(fn.lower(variables, x).compile())
    messages = halo_messages(spec, layout.block_shape, "2x2x2", train=False)
    assert r["collectives"]["collective-permute"]["count"] == len(messages) == 18
    assert r["halo_bytes"] == halo_bytes(spec, layout.block_shape, "2x2x2", train=False) == 54_976
    strided = [m for m in messages if m["conv"] == "encoder.stages.1.0.convs.0"]
    assert {(m["axis"], m["direction"]) for m in strided} == {("z", 0), ("y", 1), ("x", 1)}
