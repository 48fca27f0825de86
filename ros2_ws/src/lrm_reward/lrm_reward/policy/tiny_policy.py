"""Tiny, untrained ACT checkpoints (and policy store versions of them) in about a second on a CPU.

What it is for: tests and examples of the policy runner, policy_node and the sim's policy controller,
which need a real lerobot checkpoint (weights + pre/post processors, identity normalisation) with chosen
input features and action size — not a good policy. Like ``lrm_reward.core.tiny_model`` for the reward
model. `bias` makes every action a known constant, so a test can tell versions apart by their output.

What it is not: training (``lrm_reward.refinement.refine``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lrm_reward.refinement.feature_topics import ENV_STATE_KEY, STATE_KEY
from lrm_reward.refinement.policy_store import PolicyStore, PolicyVersion


def save_tiny_act(
    folder: Path, inputs: dict[str, tuple[int, ...]], action_dim: int, bias: float | None = None
) -> Path:
    """An untrained ACT checkpoint with the given inputs (images: (3, H, W)); `bias`: constant output."""
    import torch
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.factory import get_policy_class, make_policy_config, make_pre_post_processors

    kinds = {STATE_KEY: FeatureType.STATE, ENV_STATE_KEY: FeatureType.ENV}
    features = {k: PolicyFeature(kinds.get(k, FeatureType.VISUAL), shape) for k, shape in inputs.items()}
    cfg = make_policy_config(
        "act",
        input_features=features,
        output_features={"action": PolicyFeature(FeatureType.ACTION, (action_dim,))},
        device="cpu",
        push_to_hub=False,
        pretrained_backbone_weights=None,
        dim_model=16,
        n_heads=2,
        dim_feedforward=16,
        n_encoder_layers=1,
        n_decoder_layers=1,
        use_vae=False,
        chunk_size=3,
        n_action_steps=3,
    )
    torch.manual_seed(0)
    policy = get_policy_class("act")(cfg)
    if bias is not None:  # the action head outputs exactly `bias` whatever it sees
        with torch.no_grad():
            policy.model.action_head.weight.zero_()
            policy.model.action_head.bias.fill_(float(bias))
    stats = {
        k: {
            "mean": np.zeros(s[0] if len(s) == 1 else (s[0], 1, 1)),
            "std": np.ones(s[0] if len(s) == 1 else (s[0], 1, 1)),
        }
        for k, s in {**inputs, "action": (action_dim,)}.items()
    }
    pre, post = make_pre_post_processors(cfg, dataset_stats=stats)
    for part in (policy, pre, post):
        part.save_pretrained(folder)
    return folder


def store_tiny_act(
    store_root: Path,
    name: str,
    inputs: dict[str, tuple[int, ...]],
    action_dim: int,
    bias: float | None = None,
    promote: bool = True,
) -> PolicyVersion:
    """Commit a tiny ACT as the next version of `<store_root>/<name>` (checksummed), and promote it."""
    store = PolicyStore(store_root, name)
    store.dir.mkdir(parents=True, exist_ok=True)
    with store:
        staging = store.new_staging_dir()
        save_tiny_act(staging, inputs, action_dim, bias)
        version = store.commit(staging, {"parent": None, "policy_type": "act", "note": "tiny test policy"})
        if promote:
            store.promote(version)
    return version
