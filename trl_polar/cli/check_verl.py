"""``trl-polar check-verl -- <main_ppo overrides>``: which reward function the installed verl will call for these
overrides, with which settings; exits 1 when it is not trl_polar's (`trl_polar.integrations.verl_check`)."""

from __future__ import annotations

from typing import Annotated

import typer


def check_verl_command(
    overrides: Annotated[
        list[str] | None, typer.Argument(help="The overrides given to `python -m verl.trainer.main_ppo`, after --.")
    ] = None,
) -> None:
    """Compose the overrides with the installed verl's config (as main_ppo does), load the reward function verl will
    call with verl's own loader, and print it with its reward_kwargs and TRL_POLAR_* settings. Exits 1, saying what
    to change, when verl would score with anything but trl_polar (verl falls back to its own scorer silently).

    Example: trl-polar check-verl -- reward.custom_reward_function.path=pkg://trl_polar.integrations.verl
    reward.custom_reward_function.name=compute_score_async"""
    from ..integrations.verl_check import check_verl

    check = check_verl(list(overrides or []))
    typer.echo(check.report())
    if not check.ok:
        raise typer.Exit(1)
