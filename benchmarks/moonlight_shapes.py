"""Moonlight-16B-A3B matrix shapes (DeepseekV3 layout, ../shared/MOONLIGHT.md): what Muon sees."""

HIDDEN = 2048
EXPERTS, EXPERT_FFN, SHARED_FFN, DENSE_FFN = 64, 1408, 2816, 11264
HEADS, QK_NOPE, QK_ROPE, V_HEAD, KV_LORA = 16, 128, 64, 128, 512


def moe_layer_shapes() -> list[tuple[str, tuple[int, int], int]]:
    """(name, (rows, cols), count) of the Muon matrices of one MoE layer."""
    return [
        ("q_proj", (HEADS * (QK_NOPE + QK_ROPE), HIDDEN), 1),         # 3072 x 2048 (q_lora_rank none)
        ("kv_a_proj", (KV_LORA + QK_ROPE, HIDDEN), 1),                 # 576 x 2048
        ("kv_b_proj", (HEADS * (QK_NOPE + V_HEAD), KV_LORA), 1),       # 4096 x 512
        ("o_proj", (HIDDEN, HEADS * V_HEAD), 1),                       # 2048 x 2048
        ("router", (EXPERTS, HIDDEN), 1),                              # 64 x 2048
        ("shared_gate_up", (SHARED_FFN, HIDDEN), 2),                   # 2816 x 2048
        ("shared_down", (HIDDEN, SHARED_FFN), 1),                      # 2048 x 2816
        ("expert_gate_up", (EXPERT_FFN, HIDDEN), 2 * EXPERTS),         # 128 x (1408 x 2048)
        ("expert_down", (HIDDEN, EXPERT_FFN), EXPERTS),                # 64 x (2048 x 1408)
    ]


def dense_layer_shapes() -> list[tuple[str, tuple[int, int], int]]:
    """Layer 0's dense FFN (its attention is as in a MoE layer)."""
    return [("dense_gate_up", (DENSE_FFN, HIDDEN), 2), ("dense_down", (HIDDEN, DENSE_FFN), 1)]
