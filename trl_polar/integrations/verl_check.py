"""Which reward function the installed verl will call for a set of ``main_ppo`` overrides, found by verl's own code.

verl scores with its own default scorer, without a word, when its config names no custom reward function where it
looks for one (verl 0.9 reads ``reward.custom_reward_function.*`` only; 0.7.1-0.8 also carry the top-level
``custom_reward_function.*`` over). `check_verl` composes the overrides with the installed verl's Hydra config, applies
the legacy-key migration when the installed ``main_ppo`` does, loads the function with verl's
``get_custom_reward_fn`` and says whether it is trl_polar's, with which settings, and what to change when it is not.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
from dataclasses import dataclass, field
from typing import Any

OURS = os.path.join("trl_polar", "integrations", "verl.py")
_PER_SAMPLE = ("compute_score", "compute_score_async")
_SETTINGS_KEYS = ("TRL_POLAR_MODEL", "TRL_POLAR_URL", "TRL_POLAR_CONFIG")


@dataclass
class VerlCheck:
    """What verl will call: its version, reward manager, the function (file, name), ``reward_kwargs``, the
    ``TRL_POLAR_*`` settings its workers get, and the problems that stop it from being trl_polar's reward."""

    verl_version: str
    manager: str
    path: str | None
    name: str | None
    function_file: str | None = None
    reward_kwargs: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def report(self) -> str:
        lines = [
            f"verl {self.verl_version}: reward manager {self.manager!r}",
            f"reward function: {self.name} from {self.path}" if self.path else "reward function: verl's default",
        ]
        if self.function_file:
            lines.append(f"  defined in {self.function_file}")
        lines.append(f"reward_kwargs: {self.reward_kwargs}")
        shown = {k: ("***" if k.endswith("API_KEY") else v) for k, v in self.settings.items()}
        lines.append(f"TRL_POLAR_* settings for the reward workers: {shown or 'none'}")
        lines += [f"PROBLEM: {p}" for p in self.problems]
        lines.append("OK: verl will score with trl_polar." if self.ok else "verl will NOT score with trl_polar.")
        return "\n".join(lines)


def _verl_config_dir() -> str:
    spec = importlib.util.find_spec("verl")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("verl is not installed in this environment: run check-verl where verl runs.")
    return os.path.join(list(spec.submodule_search_locations)[0], "trainer", "config")


def compose(overrides: list[str]) -> Any:
    """verl's ``ppo_trainer`` config with ``overrides``, as ``python -m verl.trainer.main_ppo`` builds it (legacy
    reward keys migrated when the installed ``main_ppo`` migrates them)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=_verl_config_dir(), version_base=None):
            config = hydra_compose(config_name="ppo_trainer", overrides=list(overrides))
    except HydraException as err:  # verl's main_ppo stops on the same override: say so in one line
        raise ValueError(f"verl's config refuses these overrides: {' '.join(str(err).split())}") from None
    main = importlib.util.find_spec("verl.trainer.main_ppo")
    with open(main.origin, encoding="utf-8") as f:
        migrates = "migrate_legacy_reward_impl(" in f.read()
    if migrates:
        from verl.experimental.reward_loop import migrate_legacy_reward_impl

        config = migrate_legacy_reward_impl(config)
    return config


def _manager(config: Any) -> str:
    reward = config.get("reward")
    if reward is not None and reward.get("reward_manager") is not None:
        return str(reward.reward_manager.name)
    return str(config.reward_model.get("reward_manager") or "naive")


def _function_config(config: Any) -> Any:
    reward = config.get("reward")
    if reward is not None and "custom_reward_function" in reward:
        return reward.custom_reward_function, "reward.custom_reward_function"
    return config.get("custom_reward_function") or {}, "custom_reward_function"


def _settings(config: Any, environ: dict[str, str]) -> dict[str, str]:
    env_vars = config.get("ray_kwargs", {}).get("ray_init", {}).get("runtime_env", {}).get("env_vars", {}) or {}
    found = {k: str(v) for k, v in environ.items() if k.startswith("TRL_POLAR_")}
    found.update({str(k): str(v) for k, v in dict(env_vars).items() if str(k).startswith("TRL_POLAR_")})
    return found


def _check_function(check: VerlCheck, raw: Any, legacy_manager: bool) -> None:
    code = getattr(raw, "__code__", None)
    check.function_file = code.co_filename if code is not None else repr(raw)
    if not check.function_file.endswith(OURS):
        check.problems.append(
            f"{check.name} from {check.path} is not trl_polar's reward (it is in {check.function_file})."
        )
        return
    if legacy_manager and check.name != "compute_score_batch":
        check.problems.append("the batch manager calls one function per batch: set the name to compute_score_batch.")
    elif not legacy_manager and check.name not in _PER_SAMPLE:
        check.problems.append(
            f"verl's {check.manager!r} manager calls one sample at a time: name compute_score_async."
        )
    elif check.manager == "remote" and inspect.iscoroutinefunction(raw):
        check.problems.append("verl's 'remote' manager refuses coroutines: name compute_score, or use 'naive'.")


def check_verl(overrides: list[str], environ: dict[str, str] | None = None) -> VerlCheck:
    """What the installed verl will call for ``overrides`` (see the module docs)."""
    import verl
    from verl.trainer.ppo.reward import get_custom_reward_fn

    config = compose(overrides)
    fn_config, where = _function_config(config)
    check = VerlCheck(
        verl_version=getattr(verl, "__version__", "?"),
        manager=_manager(config),
        path=fn_config.get("path"),
        name=fn_config.get("name"),
        reward_kwargs=dict(fn_config.get("reward_kwargs") or {}),
        settings=_settings(config, dict(os.environ if environ is None else environ)),
    )
    if not check.path:
        legacy = "custom_reward_function.path" if where.startswith("reward.") else "reward.custom_reward_function.path"
        given = [o for o in overrides if "custom_reward_function.path" in o]
        check.problems.append(
            f"{where}.path is empty, so verl scores with its own default scorer (a rule for known data sources, "
            f"NotImplementedError for others). Set {where}.path=pkg://trl_polar.integrations.verl and "
            f"{where}.name=compute_score_async"
            + (f" (this verl ignores {given[0].split('=')[0]}; it reads {where}, not {legacy})." if given else ".")
        )
        return check
    fn = get_custom_reward_fn(config)
    raw = fn.args[0] if getattr(fn, "args", None) else fn
    _check_function(check, raw, check.manager == "batch")
    loop = "reward" in config or bool(config.reward_model.get("use_reward_loop"))
    registry = importlib.import_module(
        "verl.experimental.reward_loop.reward_manager" if loop else "verl.workers.reward_manager"
    )
    try:
        registry.get_reward_manager_cls(check.manager)
    except Exception as err:  # verl's own refusal (e.g. "Unknown reward manager: batch" on 0.9)
        check.problems.append(f"verl refuses reward manager {check.manager!r} ({err}): use naive.")
    if (
        check.function_file
        and check.function_file.endswith(OURS)
        and not any(k in check.settings for k in _SETTINGS_KEYS)
    ):
        check.problems.append(
            "no TRL_POLAR_MODEL, TRL_POLAR_URL or TRL_POLAR_CONFIG for the reward workers: add "
            "+ray_kwargs.ray_init.runtime_env.env_vars.TRL_POLAR_URL=http://HOST:8000 (or export it before starting)."
        )
    return check
