"""Real-size Stable Diffusion 1.5 / CLIP configs, written literally (no download), for benchmarks and tests.

They are the published configs' structural keys (runwayml/stable-diffusion-v1-5, lllyasviel's SD1.5
ControlNets, openai/clip-vit-large-patch14), so random-weight models built from them have the real
shapes and cost.
"""

from __future__ import annotations

# runwayml/stable-diffusion-v1-5 unet/config.json, written literally (no download)
SD15_UNET_CONFIG = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# lllyasviel/control_v11f1e_sd15_tile config.json (structural keys): a ControlNet copies the U-Net's
# encoder, so its config is the U-Net's down/mid part plus the hint-embedding keys
SD15_CONTROLNET_CONFIG = {
    **{
        k: v
        for k, v in SD15_UNET_CONFIG.items()
        if k not in ("center_input_sample", "out_channels", "sample_size", "up_block_types")
    },
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb",
}

SD15_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "sample_size": 512,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "act_fn": "silu",
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
}

CLIP_L_TEXT_CONFIG = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}

# openai/clip-vit-large-patch14 vision tower
CLIP_L14_VISION_CONFIG = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
