"""NAT and DiNAT image classifiers (Flax NNX) and a converter for the official checkpoints.

    from flax import nnx
    from natten_jax import models
    model = models.dinat_tiny(rngs=nnx.Rngs(0))            # official config, rpb=True
    model = models.nat_mini(rngs=nnx.Rngs(0), rpb=False)   # fused-kernel friendly
    model.eval()
    logits = model(images)                                 # images: [B, 224, 224, 3]
    models.load_torch_checkpoint("dinat_tiny_in1k_224.pth", model)   # needs torch

``rpb=True`` (the official models' relative positional biases) runs on
``natten_jax.unfused.na2d_qk`` / ``na2d_av``; ``rpb=False`` on :func:`natten_jax.na2d`;
``dense_attention="cudnn"`` (or ``"xla"``, ``"auto"``) swaps in dense self-attention (a
benchmark baseline). ``natten_jax.models.training``: AdamW and one training step.
"""

from natten_jax.models import training
from natten_jax.models.convert import convert_torch_state_dict, load_torch_checkpoint
from natten_jax.models.nat import (
    CHECKPOINT_URLS,
    CONFIGS,
    DENSE_IMPLEMENTATIONS,
    NAT,
    ConvDownsampler,
    ConvTokenizer,
    Mlp,
    NATAttention,
    NATLayer,
    NATLevel,
    count_params,
    create_model,
    dinat_base,
    dinat_large,
    dinat_large_384,
    dinat_mini,
    dinat_small,
    dinat_tiny,
    nat_base,
    nat_mini,
    nat_small,
    nat_tiny,
)

__all__ = [
    "CHECKPOINT_URLS", "CONFIGS", "DENSE_IMPLEMENTATIONS", "NAT", "ConvDownsampler", "ConvTokenizer", "Mlp",
    "NATAttention", "NATLayer", "NATLevel", "count_params", "create_model",
    "convert_torch_state_dict", "load_torch_checkpoint", "training",
    "nat_mini", "nat_tiny", "nat_small", "nat_base",
    "dinat_mini", "dinat_tiny", "dinat_small", "dinat_base", "dinat_large", "dinat_large_384",
]
