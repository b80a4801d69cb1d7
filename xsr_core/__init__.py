"""XSR core: pure PyTorch models, adapter math, reference database, training and evaluation.

This package never imports ComfyUI (``comfy``, ``folder_paths``, ``nodes``, ``server``,
``comfy_api``); the ComfyUI layer lives in the node pack's ``nodes/`` folder and calls into it.
"""

__version__ = "0.1.0"

# Largest LR side the pipeline accepts. The paper's setting is 32x32 -> 512x512 (x16); up to 64
# keeps the x16 output at <= 1024 px, the most an SD1.x U-Net handles without tiling.
MAX_LR_SIDE = 64
SCALE = 16
