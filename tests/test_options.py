"""Strategy options (``--set``): a misspelt option fails before training instead of being ignored."""

from __future__ import annotations

import pytest

from sopkit.errors import UserError
from sopkit.registry import check_options
from sopkit.training.settings import StrategySettings


def check(options: dict[str, str], selected: list[str]) -> None:
    check_options(StrategySettings(3, options), selected)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"mk.init": "replicate"},
        {"mk.sampler": "sfc64", "adv-mk.eps": "0.5"},
        {"eps": "0.5"},  # bare: for every strategy that reads it (adv-mk), though not selected
        {"baseline-long.long_factor": "2"},  # scoped to a strategy that is not selected
    ],
)
def test_options_some_strategy_reads_are_accepted(options: dict[str, str]) -> None:
    check(options, ["baseline", "mk"])


@pytest.mark.parametrize(
    "options,message",
    [
        ({"mk.sampeler": "sfc64"}, "the mk strategy has no option 'sampeler'. Did you mean 'sampler'?"),
        # Every strategy with a training of its own takes epochs and milestones (its own schedule).
        ({"mk.eps": "1"}, "Its options: epochs, init, milestones, sampler."),
        ({"baseline.init": "replicate"}, "Its options: epochs, milestones."),
        ({"ensemble.epochs": "3"}, "Its options: member."),  # its members have the schedule
        ({"mkk.init": "replicate"}, "Option mkk.init: Unknown strategy 'mkk'"),
        ({"epss": "1"}, "no strategy has an option 'epss'. Did you mean 'eps'?"),
        ({"adv-mk.eps": "abc"}, "Option adv-mk.eps='abc' is not valid"),  # addressed, so checked
        ({"mk.init": "orthogonal"}, "Valid values"),  # a selected strategy's own error
    ],
)
def test_an_option_no_strategy_reads_is_a_user_error(options: dict[str, str], message: str) -> None:
    with pytest.raises(UserError) as error:
        check(options, ["baseline", "mk"])
    assert message in str(error.value)


def test_a_bare_value_another_strategy_rejects_does_not_stop_the_selected_ones() -> None:
    # A bare eps=-1 is invalid for adv-mk, which is not selected: it is only asked which keys it
    # reads. Selected, its error is the user's.
    check({"eps": "-1"}, ["baseline"])
    with pytest.raises(UserError, match="adv-mk.eps must be"):
        check({"eps": "-1"}, ["adv-mk"])
    # adv-mk stops at eps before it asks for grad_scale: its other keys are unknown, so bare keys
    # are not refused then.
    check({"eps": "-1", "grad_scale": "none"}, ["baseline"])


def test_the_keys_each_strategy_asks_for_are_recorded() -> None:
    settings = StrategySettings(3, {"init": "replicate"})
    check_options(settings, ["mk", "adv-mk"])
    assert {("mk", "init"), ("mk", "sampler"), ("adv-mk", "eps"), ("adv-mk", "grad_scale")} <= (
        settings.asked
    )
