"""What a scheduled program runs while each halo message travels (workbench.analysis.schedule)."""

import pytest
from conftest import plan_cli

from workbench.analysis.scaling import simulate_step
from workbench.analysis.schedule import format_schedule, halo_schedule, parse_entry, scheduler_flags, timeline
from workbench.model.unet import UNetConfig

# Halo bytes overlapped in XLA:GPU's schedule (H100, XLA's default flags) of a depth-2,
# 8-filter paper-style model's training step at 32³ on 2x2x2, with the explicit backend's
# interior/boundary split on every layer (--comm-overlap on) and the one-phase exchange held by
# the interior: every forward halo byte has compute under it, none of the backward pass's at this
# tiny size (the chained exchange before it: forward 0, backward 37,888 of 67,264 bytes; the paper
# model at 512³ hides 95.6 % of its backward bytes, README).
FORWARD_OVERLAP, BACKWARD_OVERLAP = 1.0, 0.0

FWD = "jit(step)/jvp(jit(forward_block))/shard_map/UNet3D"
BWD = "jit(step)/transpose(jvp(jit(forward_block)))/shard_map/UNet3D"
ASYNC = 'backend_config={"collective_backend_config":{"is_sync":false}}'
# A hand-made XLA:GPU-style scheduled module (2x2x2 mesh: z stride 4, y 2, x 1):
# * forward, down0/conv0, z: an interior convolution between start and done (overlapped);
# * forward, down0/conv1, y: a synchronous permute (nothing can run beside it);
# * backward, down0/conv1, x: only a small fusion between; the layer's weight gradient
#   was computed first (tied to the input gradient by an optimization barrier);
# * an all-reduce with a Triton GEMM fusion between start and done;
# * a six-element tuple, which XLA prints with /*index=5*/ inside its shape.
SCHEDULED = f"""HloModule t, is_scheduled=true, entry_computation_layout={{()->()}}

%gemm_comp (p0: bf16[64,16], p1: bf16[512,16]) -> bf16[64,512] {{
  %p0 = bf16[64,16]{{1,0}} parameter(0)
  %p1 = bf16[512,16]{{1,0}} parameter(1)
  ROOT %dot.1 = bf16[64,512]{{1,0}} dot(%p0, %p1), lhs_contracting_dims={{1}}, rhs_contracting_dims={{1}}
}}

%fused_neg (a: bf16[1,8,4,4,4]) -> bf16[1,8,4,4,4] {{
  %a = bf16[1,8,4,4,4]{{4,3,2,1,0}} parameter(0)
  ROOT %n = bf16[1,8,4,4,4]{{4,3,2,1,0}} negate(%a)
}}

ENTRY %main (x: bf16[1,8,4,4,4], w: bf16[8,8,3,3,3], dy: bf16[1,8,4,4,4], g: bf16[64,16], h: bf16[512,16]) -> f32[32] {{
  %x = bf16[1,8,4,4,4]{{4,3,2,1,0}} parameter(0)
  %w = bf16[8,8,3,3,3]{{4,3,2,1,0}} parameter(1)
  %dy = bf16[1,8,4,4,4]{{4,3,2,1,0}} parameter(2)
  %g = bf16[64,16]{{1,0}} parameter(3)
  %h = bf16[512,16]{{1,0}} parameter(4)
  %face = bf16[1,1,4,4,8]{{4,3,2,1,0}} fusion(%x), kind=kLoop, calls=%fused_neg, metadata={{op_name="{FWD}/down0/conv0/slice"}}
  %cp.s = (bf16[1,1,4,4,8]{{4,3,2,1,0}}, bf16[1,1,4,4,8]{{4,3,2,1,0}}) collective-permute-start(%face), channel_id=1, source_target_pairs={{{{0,4}},{{1,5}},{{2,6}},{{3,7}}}}, metadata={{op_name="{FWD}/down0/conv0/ppermute"}}, {ASYNC}
  %t6 = (f32[1]{{0}}, f32[1]{{0}}, f32[1]{{0}}, f32[1]{{0}}, f32[1]{{0}}, /*index=5*/f32[1]{{0}}) fusion(%x), kind=kLoop, calls=%fused_neg
  %interior = (bf16[1,8,2,2,2]{{4,3,2,1,0}}, u8[0]{{0}}) custom-call(%x, %w), window={{size=3x3x3}}, dim_labels=bf012_oi012->bf012, custom_call_target="__cudnn$convBiasActivationForward", metadata={{op_name="{FWD}/down0/conv0/conv_general_dilated"}}
  %cp.d = bf16[1,1,4,4,8]{{4,3,2,1,0}} collective-permute-done(%cp.s), metadata={{op_name="{FWD}/down0/conv0/ppermute"}}
  %boundary = bf16[1,8,4,4,4]{{4,3,2,1,0}} fusion(%cp.d, %interior, %t6), kind=kLoop, calls=%fused_neg
  %cp3 = bf16[1,4,1,4,8]{{4,3,2,1,0}} collective-permute(%boundary), channel_id=2, source_target_pairs={{{{0,2}},{{1,3}},{{4,6}},{{5,7}}}}, metadata={{op_name="{FWD}/down0/conv1/ppermute"}}
  %dyb = bf16[1,8,4,4,4]{{4,3,2,1,0}} fusion(%cp3, %dy), kind=kLoop, calls=%fused_neg
  %dw = (bf16[8,8,3,3,3]{{4,3,2,1,0}}, u8[0]{{0}}) custom-call(%boundary, %dyb), window={{size=3x3x3}}, dim_labels=bf012_oi012->bf012, custom_call_target="__cudnn$convBackwardFilter", metadata={{op_name="{BWD}/down0/conv1/conv_general_dilated"}}
  %dx = (bf16[1,8,4,4,4]{{4,3,2,1,0}}, u8[0]{{0}}) custom-call(%dyb, %w), window={{size=3x3x3}}, dim_labels=bf012_oi012->bf012, custom_call_target="__cudnn$convBackwardInput", metadata={{op_name="{BWD}/down0/conv1/conv_general_dilated"}}
  %bar = ((bf16[1,8,4,4,4]{{4,3,2,1,0}}, u8[0]{{0}}), (bf16[8,8,3,3,3]{{4,3,2,1,0}}, u8[0]{{0}})) tuple(%dx, %dw), metadata={{op_name="{BWD}/down0/conv1/optimization_barrier"}}
  %face2 = bf16[1,4,4,1,8]{{4,3,2,1,0}} fusion(%bar), kind=kLoop, calls=%fused_neg
  %cp2.s = (bf16[1,4,4,1,8]{{4,3,2,1,0}}, bf16[1,4,4,1,8]{{4,3,2,1,0}}) collective-permute-start(%face2), channel_id=3, source_target_pairs={{{{1,0}},{{3,2}},{{5,4}},{{7,6}}}}, metadata={{op_name="{BWD}/down0/conv1/ppermute"}}, {ASYNC}
  %other = f32[16]{{0}} fusion(%g), kind=kLoop, calls=%fused_neg
  %cp2.d = bf16[1,4,4,1,8]{{4,3,2,1,0}} collective-permute-done(%cp2.s)
  %ars = f32[32]{{0}} all-reduce-start(%other), replica_groups={{{{0,1,2,3,4,5,6,7}}}}, to_apply=%add, {ASYNC}
  %gemm = bf16[64,512]{{1,0}} fusion(%g, %h), kind=kCustom, calls=%gemm_comp
  ROOT %ard = f32[32]{{0}} all-reduce-done(%ars)
}}
"""


def test_schedule_parser_on_a_hand_made_module():
    assert [i["name"] for i in parse_entry(SCHEDULED)][5:8] == ["face", "cp.s", "t6"]  # the 6-tuple is read
    r = halo_schedule(SCHEDULED, mesh="2x2x2", flags=scheduler_flags("--xla_gpu_autotune_level=0", 0.0))
    by = {p["name"]: p for p in r["permutes"]}
    assert r["scheduled"] and set(by) == {"cp.s", "cp3", "cp2.s"}
    cp = by["cp.s"]
    assert (cp["pass"], cp["layer"], cp["axis"], cp["bytes"]) == ("forward", "UNet3D/down0/conv0", "z", 256)
    # 8 outputs of 2x2x2, each 27 taps x 8 input channels, 2 FLOPs a multiply-add
    assert cp["overlapped"] and cp["convolutions"] == 1 and cp["flops"] == 2 * 64 * 27 * 8 and not cp["is_sync"]
    assert cp["fusions"] == 1 and cp["fusion_bytes"] == 6 * 4  # the 6-tuple
    assert by["cp3"]["is_sync"] and not by["cp3"]["overlapped"] and by["cp3"]["axis"] == "y"
    back = by["cp2.s"]
    assert (back["pass"], back["axis"], back["overlapped"], back["fusion_bytes"]) == ("backward", "x", False, 64)
    assert back["weight_gradient_first"] and back["independent_convolutions"] == 0
    assert r["passes"]["forward"] == {
        "count": 2,
        "bytes": 512,
        "overlapped": 1,
        "overlapped_bytes": 256,
        "overlapped_fraction": 0.5,
        "sync": 1,
        "two_way": 0,
    }
    assert r["passes"]["backward"]["overlapped_fraction"] == 0.0 and r["passes"]["total"]["count"] == 3
    # the GEMM inside the Triton fusion: 64 x 512 outputs, 16 deep
    assert r["all_reduce"] == {
        "count": 1,
        "bytes": 128,
        "overlapped": 1,
        "largest_bytes": 128,
        "largest_overlapped": True,
    }
    layers = {(e["pass"], e["layer"]): e for e in r["layers"]}
    assert layers[("backward", "UNet3D/down0/conv1")]["reasons"] == [
        "the layer's weight-gradient convolution is computed before the message is sent (1 fusions only between)"
    ]
    assert layers[("forward", "UNet3D/down0/conv1")]["reasons"] == [
        "every convolution of the program feeds the message or needs it (1 synchronous (nothing between start and done))"
    ]
    text = format_schedule(r, "XLA:GPU H100")
    assert "latency-hiding scheduler off" in text and "1 of 2   permutes" in text and "(50.0%)" in text


def test_timeline_and_the_step_it_predicts():
    events = timeline(SCHEDULED, mesh="2x2x2")
    kinds = [e["event"] for e in events]
    assert kinds == ["compute", "start", "compute", "done", "compute", "sync", "compute", "start", "compute", "done",
                     "start", "compute", "done"]  # fmt: skip
    assert events[2]["flops"] == 2 * 64 * 27 * 8 and events[2]["bytes"] == 24  # the conv by FLOPs, the rest by bytes
    assert events[-2]["flops"] == 2 * 64 * 512 * 16 and events[1]["axis"] == "z" and events[1]["bytes"] == 256
    assert events[3]["id"] == events[1]["id"] and events[-1]["id"] == events[-3]["id"] != events[1]["id"]
    # compute 1 s each side of a 1.5 s message, then a 0.5 s synchronous one and 1 s more:
    # 1 s of the message hides, 0.5 s waits, the sync message waits whole
    toy = [
        {"event": "compute", "flops": 100, "bytes": 0},
        {"event": "start", "id": 1, "kind": "collective-permute", "bytes": 15},
        {"event": "compute", "flops": 0, "bytes": 100},
        {"event": "done", "id": 1},
        {"event": "sync", "kind": "all-reduce", "bytes": 5},
        {"event": "compute", "flops": 100, "bytes": 0},
    ]
    r = simulate_step(toy, 3.0, lambda e: e["bytes"] / 10, flop_rate=100.0, byte_rate=100.0)
    assert r == pytest.approx({"step_s": 4.0, "communication_s": 2.0, "exposed_s": 1.0, "hidden_s": 1.0})


def test_scheduler_flags():
    off = scheduler_flags("--xla_gpu_autotune_level=0", 0.0)
    assert off["latency_hiding_scheduler"] is False and off["xla_gpu_enable_latency_hiding_scheduler"] is False
    on = scheduler_flags("--xla_gpu_enable_latency_hiding_scheduler=true", 0.0)
    assert on["latency_hiding_scheduler"] and on["xla_gpu_enable_latency_hiding_scheduler"]
    assert scheduler_flags("", 0.2)["latency_hiding_scheduler"]  # XLA's threshold for its collective passes
    assert not scheduler_flags("", 0.1)["latency_hiding_scheduler"]


def test_plan_reports_the_halo_overlap_of_the_h100_schedule():
    """One tiny deviceless XLA:GPU compile (.venv-gpu-plan, as `make install` creates it):
    `workbench plan --compiler h100` reports the overlapped halo bytes per pass and the flags."""
    import json

    config = {**UNetConfig.preset("paper").as_dict(), "depth": 2, "base_filters": 8}
    args = ["--resolution", "32", "--mesh", "2x2x2", "--model-config", json.dumps(config), "--train"]
    proc = plan_cli([*args, "--json", "--no-reference", "--compiler", "h100", "--comm-overlap", "on"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout)["communication"]["schedule"]
    assert r["scheduled"] and r["flags"]["latency_hiding_scheduler"] is False
    assert "--xla_gpu_autotune_level=0" in r["flags"]["xla_flags"]
    forward, backward = r["passes"]["forward"], r["passes"]["backward"]
    # 6 halo layers (5 in the backward pass: the first conv reads the image), each sending its
    # 7 neighbours at once on 2x2x2 (3 faces, 3 edges, 1 corner), two-way messages (axes of two devices)
    assert (forward["count"], backward["count"]) == (42, 35) == (forward["two_way"], backward["two_way"])
    assert forward["overlapped_fraction"] == FORWARD_OVERLAP and backward["overlapped_fraction"] == BACKWARD_OVERLAP
