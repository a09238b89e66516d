from dataclasses import asdict
from pathlib import Path

from prefect import task

from mergeme.errors import PromotionRefused
from mergeme.registry.promotion import load_policy, promote


@task(name="promote")
def promote_release(
    model_name: str, version: str, policy_file: Path | None, reason: str, stage: str | None
) -> dict:
    """Make the version the champion if it passes the policy; raises PromotionRefused (the
    failed checks listed) otherwise, so the flow run fails visibly."""
    result = promote(model_name, version, load_policy(policy_file), reason, stage=stage)
    if not result.passed:
        raise PromotionRefused(result.summary())
    return asdict(result)
