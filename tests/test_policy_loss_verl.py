"""The registered `dapo_reweight` loss, called through verl's own actor loss path (ppo_loss)."""

import functools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from tensordict import TensorDict
from verl.utils import tensordict_utils as tu
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config import PolicyLossConfig
from verl.workers.utils.losses import ppo_loss

from recipe.dapo_reweight.main import fill_default_alpha
from verl_ext.core.paths import config_dir
from verl_ext.policy_loss import ReweightPolicyLossConfig, reweight_metrics
from verl_ext.weighting import WeightingSpec

REPO = Path(__file__).resolve().parents[1]


@functools.cache
def actor_config(*overrides, verl_vanilla=False):
    """verl's ActorConfig dataclass, built from our recipe's composed config as verl builds it.

    verl_vanilla: swap our policy-loss block for verl's stock one (loss_mode vanilla).
    """
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        cfg = compose("dapo_reweight", overrides=list(overrides))
    fill_default_alpha(cfg)  # as the recipe does before verl builds the dataclass
    actor = cfg.actor_rollout_ref.actor
    if verl_vanilla:
        with open_dict(actor):
            actor.policy_loss._target_ = "verl.workers.config.PolicyLossConfig"
            actor.policy_loss.loss_mode = "vanilla"
            for key in ("weighting", "alpha", "ppl_clamp", "ppl_iqr_filter"):
                actor.policy_loss.pop(key)
    return omega_conf_to_dataclass(actor)


def loss_inputs(batch=4, prompt_len=3, resp_len=6, seed=0, ratio_noise=0.0):
    """TensorDicts in the padded layout verl's ppo_loss reads, and the response log-prob leaf."""
    g = torch.Generator().manual_seed(seed)
    old = torch.log(torch.rand(batch, resp_len, generator=g).clamp(0.02, 0.98))
    new = (old + ratio_noise * torch.randn(batch, resp_len, generator=g)).requires_grad_(True)
    lengths = torch.tensor([resp_len, resp_len - 2, 2, resp_len - 1])[:batch]
    response_mask = (torch.arange(resp_len)[None] < lengths[:, None]).long()
    adv = torch.randn(batch, generator=g)[:, None].expand(batch, resp_len).clone() * response_mask
    old = old.masked_fill(~response_mask.bool(), float("-inf"))  # padding as −inf must not leak NaN
    attention_mask = torch.cat([torch.ones(batch, prompt_len), response_mask], dim=1).long()
    data = TensorDict(
        {
            "prompts": torch.ones(batch, prompt_len, dtype=torch.long),
            "responses": torch.ones(batch, resp_len, dtype=torch.long),
            "attention_mask": attention_mask,
            "response_mask": response_mask,
            "old_log_probs": old,
            "advantages": adv,
        },
        batch_size=[batch],
    )
    # Global-batch info as verl's actor sets it (one data-parallel rank holding the whole batch).
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=int(response_mask.sum()), global_batch_size=batch)
    # Model output is flat over each sequence's valid tokens; log-prob of response token t sits
    # at position prompt_len − 1 + t (verl left-shifts it).
    pieces = []
    for i in range(batch):
        seq = torch.zeros(prompt_len + int(lengths[i]))
        pieces.append(torch.cat([seq[: prompt_len - 1], new[i, : lengths[i]], seq[-1:]]))
    flat = torch.cat(pieces)
    return {"log_probs": flat}, data, new, old, response_mask, adv


def loss_and_grad(config, seed=0, ratio_noise=0.0):
    model_output, data, new, old, mask, adv = loss_inputs(seed=seed, ratio_noise=ratio_noise)
    loss, metrics = ppo_loss(config, model_output, data)
    loss.backward()
    return loss.detach(), new.grad.clone(), metrics, old, mask, adv


def test_recipe_config_builds_our_policy_loss_dataclass():
    cfg = actor_config()
    assert isinstance(cfg.policy_loss, ReweightPolicyLossConfig)
    assert cfg.policy_loss.loss_mode == "dapo_reweight"
    assert cfg.policy_loss.spec() == WeightingSpec.create("lowprob", 0.2)
    assert (cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.clip_ratio_c) == (0.2, 0.28, 10.0)


@pytest.mark.parametrize("ratio_noise", [0.0, 0.3])
def test_none_equals_verl_vanilla(ratio_noise):
    ours = actor_config("actor_rollout_ref.actor.policy_loss.weighting=none")
    vanilla = actor_config(verl_vanilla=True)
    assert type(vanilla.policy_loss) is PolicyLossConfig and vanilla.policy_loss.loss_mode == "vanilla"
    loss_a, grad_a, _, *_ = loss_and_grad(ours, ratio_noise=ratio_noise)
    loss_b, grad_b, _, *_ = loss_and_grad(vanilla, ratio_noise=ratio_noise)
    assert torch.equal(loss_a, loss_b)
    assert torch.equal(grad_a, grad_b)


@pytest.mark.parametrize("ratio_noise", [0.0, 0.3])
@pytest.mark.parametrize("scheme, alpha", [("lowprob", 0.2), ("dominate", 0.1)])
def test_token_scheme_scales_per_token_gradients(scheme, alpha, ratio_noise):
    """∂L/∂log π_t is scaled by exactly w_t (Eq. 8 for lowprob): a positive detached weight
    leaves every clip decision unchanged, so this holds for clipped tokens (gradient 0) too."""
    base = actor_config("actor_rollout_ref.actor.policy_loss.weighting=none")
    weighted = actor_config(
        f"actor_rollout_ref.actor.policy_loss.weighting={scheme}", f"actor_rollout_ref.actor.policy_loss.alpha={alpha}"
    )
    _, grad_none, _, old, mask, adv = loss_and_grad(base, ratio_noise=ratio_noise)
    _, grad_w, metrics, *_ = loss_and_grad(weighted, ratio_noise=ratio_noise)
    p = old.exp()
    w = 1 + alpha * (1 - p) if scheme == "lowprob" else alpha * p + 1 - alpha
    valid = mask.bool() & (adv != 0)
    torch.testing.assert_close(grad_w[valid], (grad_none * w)[valid], rtol=1e-5, atol=1e-7)
    assert torch.all(grad_w[~mask.bool()] == 0)
    assert torch.isfinite(grad_w).all()
    assert 1 - alpha <= metrics["actor/reweight/loss_weight_mean"].values[0] <= 1 + alpha


def test_ppl_in_the_loss_leaves_advantages_to_the_trainer():
    ppl = actor_config("actor_rollout_ref.actor.policy_loss.weighting=ppl")
    none = actor_config("actor_rollout_ref.actor.policy_loss.weighting=none")
    assert torch.equal(loss_and_grad(ppl)[1], loss_and_grad(none)[1])


def test_reweight_metrics_keys_under_actor_prefix():
    _, _, _, old, mask, _ = loss_inputs()
    groups = np.array(["a", "a", "b", "b"], dtype=object)
    m = reweight_metrics(WeightingSpec.create("ppl", 0.01), old, mask, groups)
    assert set(m) == {
        "actor/reweight/weight_mean",
        "actor/reweight/weight_min",
        "actor/reweight/weight_max",
        "actor/reweight/frac_weight_above_1.05",
        "actor/reweight/ppl_abs_z_mean",
        "actor/reweight/alpha",
    }


@pytest.mark.parametrize(
    "override, message",
    [
        ("actor_rollout_ref.actor.policy_loss.weighting=lowprobb", "valid choices: lowprob, ppl, dominate, none"),
        ("actor_rollout_ref.actor.policy_loss.alpha=-1", "got -1.0"),
        ("actor_rollout_ref.actor.policy_loss.ppl_clamp=[1.2,0.8]", "low=1.2, high=0.8"),
    ],
)
def test_bad_config_fails_when_the_config_is_built(override, message):
    with pytest.raises(Exception, match=message):
        actor_config(override)


def test_registration_visible_in_fresh_process_that_only_imports_verl():
    """verl loads our `verl.plugins` entry point on `import verl`: what every Ray worker does."""
    code = (
        "import verl\n"
        "from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY\n"
        "from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY\n"
        "assert 'dapo_reweight' in POLICY_LOSS_REGISTRY\n"
        "assert 'dapo_reweight' in TRAINER_REGISTRY\n"
        "print('registered')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300, cwd="/")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "registered" in out.stdout
