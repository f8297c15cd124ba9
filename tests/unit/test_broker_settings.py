"""Broker and subscription settings that are not finite seconds above 0 are refused,
naming the setting, before anything connects: NaN passed the '<= 0' checks."""

from __future__ import annotations

import math

import pytest

from seamwork.brokers import NatsBroker, RabbitBroker
from seamwork.errors import ConfigError
from seamwork.messaging._ports import check_subscribe_settings

BAD = [math.nan, math.inf, 0, -1.0]


@pytest.mark.parametrize("bad", BAD)
def test_a_nats_duplicate_window_that_is_not_finite_seconds_is_refused(bad: float) -> None:
    with pytest.raises(ConfigError, match="duplicate_window"):
        NatsBroker("nats://127.0.0.1:1", duplicate_window=bad)


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("setting", ["publish_timeout", "connect_timeout", "reconnect_interval"])
def test_a_rabbitmq_timeout_that_is_not_finite_seconds_is_refused(setting: str, bad: float) -> None:
    # NaN slipped through min(...) <= 0 (min with NaN first is NaN); a NaN connect
    # timeout then expired at once on asyncio and raised ValueError on uvloop
    with pytest.raises(ConfigError, match=setting):
        RabbitBroker("amqp://guest:guest@127.0.0.1:1/", **{setting: bad})  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("setting", ["ack_wait", "retry_delay"])
def test_a_subscription_setting_that_is_not_finite_seconds_is_refused(
    setting: str, bad: float
) -> None:
    settings = {"ack_wait": 30.0, "retry_delay": 1.0, setting: bad}
    with pytest.raises(ConfigError, match=setting):
        check_subscribe_settings("g", 5, settings["ack_wait"], settings["retry_delay"])
