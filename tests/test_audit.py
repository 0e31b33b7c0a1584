"""Communication audit from compiled HLO: counts, bytes, gathered activations."""

import jax
import pytest

from workbench.analysis.audit import audit, audit_text, format_audit
from workbench.analysis.scaling import halo_messages
from workbench.execute.run import compile_forward
from workbench.mesh import ShardLayout
from workbench.model.unet import UNetConfig

HLO = """
ENTRY %main {
  %p = f32[1,10,10,10,8]{4,3,2,1,0} parameter(0)
  %cp.1 = f32[1,1,10,10,8]{4,3,2,1,0} collective-permute(%a), channel_id=1, source_target_pairs={{0,1}}
  %cp.2 = bf16[1,10,1,10,8]{4,3,2,1,0} collective-permute(%b), channel_id=2, source_target_pairs={{1,0}}
  %ags = (f32[1,4,4,4,8]{4,3,2,1,0}, f32[1,8,8,8,8]{4,3,2,1,0}) all-gather-start(%c), dimensions={1}
  %agd = f32[1,8,8,8,8]{4,3,2,1,0} all-gather-done(%ags)
  %ag.2 = f32[64]{0} all-gather(%d), dimensions={0}
  %ar = (f32[8]{0}, f32[8]{0}) all-reduce(%e, %f), to_apply=%add
  ROOT %conv = f32[1,8,8,8,16]{4,3,2,1,0} convolution(%g, %h), window={size=3x3x3}, dim_labels=b012f_012io->b012f
  %wgrad = f32[3,3,3,8,16]{4,3,2,1,0} convolution(%g, %i), window={size=8x8x8}, dim_labels=f012b_i012o->012bf
}
"""


def test_counts_and_bytes_from_text():
    r = audit_text(HLO)
    c = r["collectives"]
    assert c["collective-permute"] == {"count": 2, "bytes": 4 * 800 + 2 * 800, "largest_bytes": 3200}
    assert c["all-gather"]["count"] == 2  # the -done half is not counted again
    assert c["all-gather"]["bytes"] == 4 * 4096 + 4 * 64
    assert c["all-reduce"] == {"count": 1, "bytes": 64, "largest_bytes": 64}
    assert c["all-to-all"]["count"] == 0
    assert r["activation_bytes"] == 4 * 8**3 * 16  # the weight gradient is not an activation
    assert r["halo_bytes"] == 4800 and r["halo_ratio"] == pytest.approx(4800 / 32768)
    assert r["convolution_dtypes"] == ["f32"]
    # the gathered activation is flagged, the gathered vector is not
    assert [g["shape"] for g in r["activation_all_gathers"]] == ["f32[1,8,8,8,8]"]
    assert len(r["warnings"]) == 1 and "GSPMD replicated volume-shaped arrays" in r["warnings"][0]
    text = format_audit(r)
    assert "collective-permute" in text and "warning:" in text and "all-to-all" not in text


def test_no_collectives():
    r = audit_text("ENTRY %m {\n  ROOT %x = f32[4]{0} add(%a, %b)\n}")
    assert r["halo_ratio"] is None and r["warnings"] == []
    assert "no collectives" in format_audit(r)


def test_explicit_halo_traffic_is_exact():
    cfg = UNetConfig.preset("small")
    compiled = compile_forward(cfg, ShardLayout((32, 32, 32), "2x2x2", multiple=4), backend="explicit").compiled
    r = audit(compiled)
    c = r["collectives"]
    assert c["collective-permute"]["count"] == 12 * 3  # 12 padded conv inputs x 3 axes, one two-way message
    # the layer spec's halo messages (analysis.scaling): 16³ blocks, the decoder's two parts padded apart
    messages = halo_messages(cfg, (16, 16, 16), "2x2x2", train=False)
    assert len(messages) == 12 * 3 and r["halo_bytes"] == sum(m["bytes"] for m in messages) == 199_440
    assert c["all-gather"]["count"] == 0 and c["all-to-all"]["count"] == 0 and r["warnings"] == []
    assert 0.2 < r["halo_ratio"] < 1.0
    one = audit(compile_forward(cfg, ShardLayout((32, 32, 32), "1x1x1", multiple=4), backend="explicit").compiled)
    assert one["halo_bytes"] == 0 and one["activation_bytes"] > 8 * r["activation_bytes"] * 0.9
    assert jax.device_count() >= 8
