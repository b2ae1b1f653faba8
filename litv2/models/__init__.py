from .hilo import HiLo, hilo_head_split
from .litv2 import (
    LITv2,
    ConvFFN,
    DeformableTokenMerging,
    checkpoint_filter_fn,
    load_checkpoint,
    load_filtered_state_dict,
    litv2_b,
    litv2_b_384,
    litv2_m,
    litv2_s,
)
